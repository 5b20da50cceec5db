//! `NAME.report.json`: per-layer bits, bytes and MACs; totals against FP32; the arena.

use serde::Serialize;

use crate::evaluate::Evaluation;
use crate::lower::Lowered;
use crate::quant::Bits;

#[derive(Serialize)]
struct Layer<'a> {
    name: &'a str,
    op: &'a str,
    out_shape: &'a [usize],
    weight_bits: Option<u8>,
    act_bits: u8,
    /// Present (true) only for a Conv fused with the table after it: its output is not in the
    /// arena.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    fused_table: bool,
    weight_bytes: usize,
    fp32_bytes: usize,
    macs: u64,
    /// SQNR (dB) of this op's output on the held-out samples, fake-quantized against float.
    #[serde(skip_serializing_if = "Option::is_none")]
    sqnr_db: Option<f64>,
}

/// Held-out quality figures (see `crate::evaluate`), rounded so that float noise below the
/// printed precision cannot change the report's bytes.
#[derive(Serialize)]
struct EvalOut {
    source: &'static str,
    samples: usize,
    synth_iters: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    top1_agreement: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_sqnr_db: Option<f64>,
}

#[derive(Serialize)]
struct BitsOut {
    weight: u8,
    act: u8,
    first_last: u8,
}

#[derive(Serialize)]
struct Totals {
    weight_bytes: usize,
    fp32_weight_bytes: usize,
    /// FP32 bytes / shipped weight bytes.
    weight_compression: f64,
    model_bytes: usize,
    arena_bytes: usize,
    arena_lower_bound: usize,
    arena_without_reuse: usize,
    /// Of `arena_bytes`: the kernels' scratch region (with a CPU's weight panels, `--cpu`).
    scratch_bytes: usize,
    macs: u64,
}

#[derive(Serialize)]
struct Report<'a> {
    model: &'a str,
    name: &'a str,
    target: &'a str,
    /// `--cpu` as given (absent: the target's baseline) and the SIMD kernels libNAME.a holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu: Option<&'a str>,
    kernels: &'a str,
    method: &'a str,
    seed: u64,
    bits: BitsOut,
    #[serde(skip_serializing_if = "Option::is_none")]
    input_range: Option<[f32; 2]>,
    input_shape: &'a [usize],
    output_shape: &'a [usize],
    layers: Vec<Layer<'a>>,
    totals: Totals,
    #[serde(skip_serializing_if = "Option::is_none")]
    calibration: Option<&'a serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    evaluation: Option<EvalOut>,
    /// `--flash` / fractional `--bits`: the budget, and each layer's bytes and sensitivity
    /// per choice of bits and the bits chosen.
    #[serde(skip_serializing_if = "Option::is_none")]
    mixed_precision: Option<&'a serde_json::Value>,
}

/// What the report says besides the lowered model.
pub struct ReportInfo<'a> {
    pub model: &'a str,
    pub name: &'a str,
    pub target: &'a str,
    pub cpu: Option<&'a str>,
    pub kernels: &'a str,
    pub method: &'a str,
    pub seed: u64,
    pub bits: Bits,
    /// `--input-range`, when given.
    pub input_range: Option<(f32, f32)>,
    /// Blocks, diffusion levels and losses of a calibrated method (no timings: the report is
    /// reproducible).
    pub calibration: Option<serde_json::Value>,
    /// Held-out figures, when measured (`--eval-samples 0` skips them).
    pub evaluation: Option<&'a Evaluation>,
    /// The mixed-precision choice, when made.
    pub mixed: Option<serde_json::Value>,
}

fn round(v: f64, digits: i32) -> f64 {
    let k = 10f64.powi(digits);
    (v * k).round() / k
}

/// Pretty JSON with a trailing newline; no timestamps or paths, so it is reproducible.
pub fn render(info: &ReportInfo, l: &Lowered) -> String {
    let (wb, fb) = l.weight_bytes();
    let r = Report {
        model: info.model,
        name: info.name,
        target: info.target,
        cpu: info.cpu,
        kernels: info.kernels,
        method: info.method,
        seed: info.seed,
        bits: BitsOut {
            weight: info.bits.weight,
            act: info.bits.act,
            first_last: info.bits.first_last,
        },
        input_range: info.input_range.map(|(lo, hi)| [lo, hi]),
        input_shape: &l.input_shape,
        output_shape: &l.output_shape,
        layers: l
            .layers
            .iter()
            .enumerate()
            .map(|(i, x)| Layer {
                name: &x.name,
                op: &x.op,
                out_shape: &x.out_shape,
                weight_bits: x.weight_bits,
                act_bits: x.act_bits,
                fused_table: !x.stored,
                weight_bytes: x.weight_bytes,
                fp32_bytes: x.fp32_bytes,
                macs: x.macs,
                sqnr_db: info
                    .evaluation
                    .and_then(|e| e.sqnr_db.get(i).copied().flatten())
                    .map(|v| round(v, 2)),
            })
            .collect(),
        totals: Totals {
            weight_bytes: wb,
            fp32_weight_bytes: fb,
            weight_compression: if wb > 0 {
                (fb as f64 / wb as f64 * 100.0).round() / 100.0
            } else {
                0.0
            },
            model_bytes: l.blob.len(),
            arena_bytes: l.arena_size,
            arena_lower_bound: l.arena_lower_bound,
            arena_without_reuse: l.arena_no_reuse,
            scratch_bytes: l.scratch_size,
            macs: l.macs(),
        },
        calibration: info.calibration.as_ref(),
        mixed_precision: info.mixed.as_ref(),
        evaluation: info.evaluation.map(|e| EvalOut {
            source: e.source,
            samples: e.samples,
            synth_iters: e.synth_iters,
            top1_agreement: e.top1_agreement.map(|a| round(a, 4)),
            output_sqnr_db: e.sqnr_db.last().copied().flatten().map(|v| round(v, 2)),
        }),
    };
    let mut s = serde_json::to_string_pretty(&r).unwrap_or_default();
    s.push('\n');
    s
}
