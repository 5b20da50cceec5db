//! How good a compiled model is, measured without real data: held-out synthetic samples
//! (synthesized from the model's BatchNorm statistics with a seed calibration never uses, or
//! N(0, 1) noise for a model without BN) run through the float network, the fake-quantized one
//! (per-layer SQNR) and the integer runtime on the emitted blob (top-1 agreement).

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::calib::budget::ModelSize;
use crate::calib::synth::{self, SynthOptions};
use crate::calib::Progress;
use crate::graph::{Graph, Op};
use crate::host;
use crate::quant::qmodel::{Mode, Overrides, QModel};
use crate::quant::QuantGraph;
use crate::Error;

/// Seconds the held-out synthesis should take on 2 cores (estimated, never measured, so the
/// choice is the same on any machine).
pub const TARGET_S: f64 = 20.0;

/// Held-out sample counts and synthesis iterations, richest to leanest.
const LADDER: [(usize, usize); 7] = [
    (64, 200),
    (64, 100),
    (32, 100),
    (32, 50),
    (16, 50),
    (16, 25),
    (8, 25),
];

/// Samples fed through the float and fake-quantized models at once.
const CHUNK: usize = 8;

/// Held-out samples and iterations for a model of `size`: the richest [`LADDER`] step whose
/// estimated synthesis fits [`TARGET_S`], else the leanest.
pub fn plan(size: &ModelSize) -> (usize, usize) {
    LADDER
        .iter()
        .copied()
        .find(|&(n, it)| crate::calib::budget::synthesis_estimate(size, n, it) <= TARGET_S)
        .unwrap_or(LADDER[LADDER.len() - 1])
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub samples: usize,
    pub synth_iters: usize,
    /// The compile's `--seed`; the held-out stream is derived from it.
    pub seed: u64,
    pub input_range: Option<(f32, f32)>,
}

/// The figures of [`evaluate`], all reproducible.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    /// `synthesized` (from BN statistics) or `gaussian` (the model has no BN).
    pub source: &'static str,
    pub samples: usize,
    pub synth_iters: usize,
    /// Per quantized-graph node: SQNR in dB of its output, fake-quantized against float
    /// (`None` where the float output is all zero).
    pub sqnr_db: Vec<Option<f64>>,
    /// Share of samples whose top-1 class from the integer runtime equals the float
    /// network's (`None` when the output is not a vector of class scores).
    pub top1_agreement: Option<f64>,
}

/// Seed of the held-out samples: never the calibration's own.
fn held_out_seed(seed: u64) -> u64 {
    seed ^ 0xE7A1_0000_0000_0000
}

/// Held-out samples (flattened inputs) and where they came from: `synthesized` from the BN
/// statistics or `gaussian`. Made once per compile, read by the evaluation and by the
/// mixed-precision sensitivity.
pub struct HeldOut {
    pub source: &'static str,
    pub samples: Vec<f32>,
}

/// Measures `q` (and `blob`, the same model lowered) against its float network on `held`.
pub fn evaluate(
    q: &QuantGraph,
    blob: &[u8],
    opts: &EvalOptions,
    held: &HeldOut,
) -> Result<Evaluation, Error> {
    let dev = Device::Cpu;
    let per: usize = q.tensors[q.input].shape[1..].iter().product();
    let (source, samples) = (held.source, &held.samples);
    let n = samples.len() / per.max(1);
    let m = QModel::new(q.clone(), &dev)?;
    // Σ f² and Σ (f − q)² per node output.
    let mut sig = vec![0f64; q.nodes.len()];
    let mut err = vec![0f64; q.nodes.len()];
    let mut float_top = Vec::with_capacity(n);
    let out_dims = &q.tensors[q.output].shape;
    let classes = (out_dims.len() == 2).then(|| out_dims[1]);
    for chunk in samples.chunks(CHUNK * per) {
        let b = chunk.len() / per;
        let mut shape = q.tensors[q.input].shape.clone();
        shape[0] = b;
        let x = Tensor::from_vec(chunk.to_vec(), shape.as_slice(), &dev)?;
        let run = |mode| -> Result<Vec<Option<Tensor>>, Error> {
            let mut vals = vec![None; q.tensors.len()];
            vals[q.input] = Some(m.input(&x, mode)?);
            m.run(
                0..q.nodes.len(),
                &mut vals,
                mode,
                &mut Overrides::default(),
                None,
            )?;
            Ok(vals)
        };
        let fv = run(Mode::Float)?;
        let qv = run(Mode::Quant)?;
        for (i, node) in q.nodes.iter().enumerate() {
            let (Some(f), Some(qt)) = (&fv[node.output], &qv[node.output]) else {
                continue;
            };
            let f = f.flatten_all()?.to_vec1::<f32>()?;
            let qt = qt.flatten_all()?.to_vec1::<f32>()?;
            for (a, b) in f.iter().zip(&qt) {
                sig[i] += (*a as f64) * (*a as f64);
                err[i] += (*a as f64 - *b as f64).powi(2);
            }
        }
        if classes.is_some() {
            let logits = fv[q.output]
                .as_ref()
                .ok_or_else(|| Error::Internal("evaluation: output not computed".into()))?;
            for row in logits.to_vec2::<f32>()? {
                float_top.push(host::argmax(&row));
            }
        }
    }
    let sqnr_db = sig
        .iter()
        .zip(&err)
        .map(|(&s, &e)| match (s > 0.0, e > 0.0) {
            (false, _) => None,
            // Bit-exact: report the format's ceiling rather than infinity (JSON has none).
            (true, false) => Some(200.0),
            (true, true) => Some(10.0 * (s / e).log10()),
        })
        .collect();
    let top1_agreement = match classes {
        Some(_) => {
            let rt = runtime_top1(blob, samples)?;
            let same = rt.iter().zip(&float_top).filter(|(a, b)| a == b).count();
            Some(same as f64 / n.max(1) as f64)
        }
        None => None,
    };
    Ok(Evaluation {
        source,
        samples: n,
        synth_iters: if source == "synthesized" {
            opts.synth_iters
        } else {
            0
        },
        sqnr_db,
        top1_agreement,
    })
}

/// Mean squared error of `q`'s fake-quantized output against its float network on `held`: how
/// the CLI compares the candidates of a calibrated compile (the calibrated model and rtn's).
pub fn output_mse(q: &QuantGraph, held: &HeldOut) -> Result<f64, Error> {
    let dev = Device::Cpu;
    let per: usize = q.tensors[q.input].shape[1..].iter().product();
    let m = QModel::new(q.clone(), &dev)?;
    let (mut se, mut count) = (0f64, 0usize);
    for chunk in held.samples.chunks(CHUNK * per.max(1)) {
        let mut shape = q.tensors[q.input].shape.clone();
        shape[0] = chunk.len() / per.max(1);
        let x = Tensor::from_vec(chunk.to_vec(), shape.as_slice(), &dev)?;
        let f = m
            .forward(&x, Mode::Float)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let y = m
            .forward(&x, Mode::Quant)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (a, b) in f.iter().zip(&y) {
            se += (*a as f64 - *b as f64).powi(2);
        }
        count += f.len();
    }
    Ok(se / count.max(1) as f64)
}

/// Held-out samples for `g` (flattened inputs): `("synthesized", …)` from the BN statistics,
/// or `("gaussian", …)` for a model without BN.
pub fn held_out_samples(g: &Graph, opts: &EvalOptions) -> Result<HeldOut, Error> {
    let per: usize = g.shape(g.inputs[0])[1..].iter().product();
    let seed = held_out_seed(opts.seed);
    if g.nodes.iter().any(|n| matches!(n.op, Op::BatchNorm(_))) {
        let so = SynthOptions {
            samples: opts.samples,
            batch: opts.samples,
            iters: opts.synth_iters,
            seed,
            // Teacher statistics only: samples that owe nothing to the quantized model.
            student_weight: 0.0,
            // Inside the interval the input quantizer covers (the default one, ±3, when not
            // given): pixels past it would measure the input's clipping, which real inputs
            // do not hit, and hide every layer's own error behind it.
            input_range: Some(opts.input_range.unwrap_or((
                -crate::quant::ranges::INPUT_RANGE,
                crate::quant::ranges::INPUT_RANGE,
            ))),
            ..Default::default()
        };
        let s = synth::synthesize(g, None, &so, Progress::silent())
            .map_err(|e| e.context("held-out samples"))?;
        Ok(HeldOut {
            source: "synthesized",
            samples: s,
        })
    } else {
        let mut s = crate::quant::ranges::normal_samples(seed, opts.samples * per);
        if let Some((lo, hi)) = opts.input_range {
            s.iter_mut().for_each(|v| *v = v.clamp(lo, hi));
        }
        Ok(HeldOut {
            source: "gaussian",
            samples: s,
        })
    }
}

/// Top-1 class of every sample through the integer runtime.
fn runtime_top1(blob: &[u8], samples: &[f32]) -> Result<Vec<usize>, Error> {
    let model = diffdfq_runtime::Model::from_bytes(blob)
        .map_err(|e| Error::Internal(format!("evaluation: runtime: {e}")))?;
    let out_n = model.output().numel as usize;
    let y = host::run_batch(&model, samples).map_err(|e| e.context("evaluation"))?;
    Ok(y.chunks_exact(out_n.max(1)).map(host::argmax).collect())
}
