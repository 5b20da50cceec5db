//! diffdfq-compile: ONNX CNN → ultra-low-bit integer artifact. `main.rs` holds the flags and
//! the pipeline in order; `widths.rs` checks the target and widths and chooses per-layer
//! bits, `calibrated.rs` runs calibration and its held-out selection.

mod calibrated;
mod widths;

use calibrated::calibrated;
use widths::{check_widths, choose_widths, resolve_target};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use diffdfq_compiler::calib::budget;
use diffdfq_compiler::emit::{self, header, report};
use diffdfq_compiler::import::{import_path, ImportOptions};
use diffdfq_compiler::quant::rtn;
use diffdfq_compiler::{evaluate, inspect, lower, mixed, Error};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Method {
    /// DiffDFQ calibration (synthesis, diffusion, progressive block reconstruction)
    Diffdfq,
    /// The same calibration without diffusion
    Genie,
    /// Min–max round-to-nearest weights; activation ranges and bias correction from BN statistics
    Rtn,
    /// rtn with each channel's weight step from the Lp clipping search (seconds, no samples)
    Lp,
}

/// Extra artifacts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Emit {
    /// NAME.nnef.tgz: the packed-integer tract graph as NNEF (tract-nnef with the diffdfq registry)
    Nnef,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    Cpu,
    /// NVIDIA GPU (builds with the `cuda` feature)
    Cuda,
}

#[derive(Parser)]
#[command(
    version,
    about = "Data-free ultra-low-bit quantizing compiler for ONNX CNNs",
    after_help = "Examples:\n  \
        diffdfq-compile model.onnx --bits 3 --target aarch64        DiffDFQ, 3-bit weights, for an ARM board\n  \
        diffdfq-compile model.onnx --bits 4 --method rtn --no-lib   round-to-nearest in seconds, no toolchain\n  \
        diffdfq-compile model.onnx --input-shape 1,3,224,224 --budget 30   a dynamic input, 30 minutes of calibration\n  \
        diffdfq-compile model.onnx --inspect                        ops, shapes, MACs and BatchNorms, then exit\n  \
        diffdfq-compile model.onnx --bits 3 --json > summary.json   the summary for a build pipeline"
)]
struct Args {
    /// FP32 ONNX model
    model: PathBuf,
    /// Print the imported graph (ops, shapes, parameters, MACs, BatchNorm layers) and exit
    #[arg(long)]
    inspect: bool,
    /// Weight bits of the inner layers: 2, 3, 4 or 8; a fraction (e.g. 2.5) means per-layer
    /// bits within the weight bytes of that many uniform bits (see --flash)
    #[arg(long, default_value_t = 4.0)]
    bits: f32,
    /// Weight-bytes budget (e.g. 40000, 40K, 1.5M): per-layer bits in {2,3,4,8} chosen by
    /// sensitivity on held-out synthetic samples to fit it
    #[arg(long, conflicts_with = "bits")]
    flash: Option<String>,
    /// Weight bits of every conv/linear layer in graph order, e.g. 8,2,2,4,8 (the order of
    /// the summary table's weighted rows)
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["bits", "flash"])]
    layer_bits: Option<Vec<u8>>,
    /// Activation bits: 8 or 4
    #[arg(long, default_value_t = 8)]
    act_bits: u8,
    /// Arena budget with --act-bits 4 (e.g. 30000, 30K): the activation tensors whose 4-bit
    /// codes cost most (sensitivity on held-out synthetic samples) keep 8 bits while the
    /// arena fits it
    #[arg(long)]
    arena: Option<String>,
    /// Weight bits of the first and the last layer
    #[arg(long, default_value_t = 8)]
    first_last_bits: u8,
    /// Target: a short name or a triple (x86_64, aarch64, ...); default: this machine
    #[arg(long)]
    target: Option<String>,
    /// CPU libNAME.a is built for, which decides its SIMD kernels: `native` (this machine) or
    /// a name the target's rustc knows (x86-64-v3, x86-64-v4, cortex-a55, neoverse-n1, ...);
    /// default: the target's baseline (x86_64: SSE2, aarch64: NEON)
    #[arg(long)]
    cpu: Option<String>,
    /// Output directory
    #[arg(short = 'o', long = "out-dir", default_value = "out")]
    out_dir: PathBuf,
    /// Artifact name (a C identifier); default: the model's file stem
    #[arg(long)]
    name: Option<String>,
    /// Quantization method
    #[arg(long, value_enum, default_value_t = Method::Diffdfq)]
    method: Method,
    /// Where calibration computes
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Seed of everything random
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Synthetic calibration samples (default 64; rtn: N(0,1) samples that set ranges of
    /// layers without a BatchNorm, default 32)
    #[arg(long)]
    samples: Option<usize>,
    /// Synthesis iterations per batch (default: from --budget; 400 when the full recipe fits)
    #[arg(long)]
    synth_iters: Option<usize>,
    /// Reconstruction iterations per block (default: from --budget; 200 when the full recipe
    /// fits)
    #[arg(long)]
    recon_iters: Option<usize>,
    /// Minutes calibration may take on 2 cores (diffdfq, genie): samples and iterations not
    /// given by flags are chosen from the model's MACs to fit, the same for the same model
    /// and flags on any machine; the report records them
    #[arg(long, default_value_t = 10.0)]
    budget: f64,
    /// The interval real inputs lie in, in the model's input units, e.g. -0.8102,2.0227 for
    /// pixels in [0, 1] normalized by mean 0.286 and std 0.353, or 0,255 for a model fed raw
    /// pixels: synthesized calibration images stay inside it (diffdfq, genie), and the
    /// data-free statistics take it as the input's mean ± 3σ (default -3,3)
    #[arg(long, value_delimiter = ',', num_args = 1, allow_hyphen_values = true)]
    input_range: Option<Vec<f32>>,
    /// Input shape overriding the model's, e.g. 1,3,224,224
    #[arg(long, value_delimiter = ',')]
    input_shape: Option<Vec<usize>>,
    /// Also write these artifacts (comma-separated)
    #[arg(long, value_enum, value_delimiter = ',')]
    emit: Vec<Emit>,
    /// Skip libNAME.a (no toolchain for the target needed)
    #[arg(long)]
    no_lib: bool,
    /// Held-out synthetic samples for the summary's per-layer SQNR and top-1 agreement
    /// (default: sized from the model's MACs to take about 20 s; 0 skips the measurement)
    #[arg(long)]
    eval_samples: Option<usize>,
    /// Print nothing on success
    #[arg(long)]
    quiet: bool,
    /// Print the summary as one JSON document on stdout (no progress); errors as JSON on stderr
    #[arg(long)]
    json: bool,
}

impl Args {
    /// Nothing on stderr but errors: `--quiet`, or `--json`, which owns the output.
    fn quiet(&self) -> bool {
        self.quiet || self.json
    }
}

fn run(a: &Args) -> Result<(), Error> {
    let quiet = a.quiet();
    let mut stages: Vec<(&str, f64)> = Vec::new();
    let t_start = std::time::Instant::now();
    // Before the import, so a zero costs no time. rtn and lp take `--samples` too: the
    // N(0, 1) samples behind the ranges of BN-less layers, where 0 was taken as one sample.
    if [a.samples, a.synth_iters, a.recon_iters].contains(&Some(0)) {
        return Err(Error::Input(
            "--samples, --synth-iters and --recon-iters must be at least 1".into(),
        ));
    }
    let opts = ImportOptions {
        input_shape: a.input_shape.clone(),
        ..Default::default()
    };
    let file = a
        .model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let graph = import_path(&a.model, &opts)?;
    if a.inspect {
        print!("{}", inspect::render(&file, &graph));
        return Ok(());
    }
    let (target, cpu, isa, kernels_line) = resolve_target(a)?;
    let kernels = isa.name();
    let name = match &a.name {
        Some(n) => n.clone(),
        None => header::name_from_stem(
            &a.model
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
    };
    header::check_name(&name).map_err(Error::Input)?;
    let (whole, mut bits, input_range) = check_widths(a)?;
    let macs: Vec<u64> = graph.nodes.iter().map(|n| graph.macs(n)).collect();
    let size = budget::ModelSize {
        macs: macs.iter().sum(),
        layers: macs.iter().filter(|&&m| m > 0).count(),
    };
    let (eval_n, eval_iters) = evaluate::plan(&size);
    // Whether held-out samples are used at all: the evaluation and the selection.
    let held_out_on = a.eval_samples.unwrap_or(eval_n) > 0;
    let eval_opts = evaluate::EvalOptions {
        samples: a.eval_samples.filter(|&n| n > 0).unwrap_or(eval_n),
        synth_iters: eval_iters,
        seed: a.seed,
        input_range,
    };
    // The held-out samples, synthesized once for the sensitivity and the evaluation.
    let mut held_out: Option<evaluate::HeldOut> = None;
    let mixed = choose_widths(
        a,
        &graph,
        whole,
        &mut bits,
        &eval_opts,
        &mut held_out,
        &mut stages,
    )?;
    let layer_bits = match (&a.layer_bits, &mixed) {
        (Some(b), _) => {
            bits.weight = b.iter().copied().min().unwrap_or(2);
            Some(b.clone())
        }
        (None, m) => m.as_ref().map(|m| m.bits.clone()),
    };
    let arena_choice = match &a.arena {
        None => None,
        Some(s) => {
            let budget = mixed::parse_bytes("--arena", s)?;
            let t0 = std::time::Instant::now();
            let activations = match &mixed {
                Some(m) => m.activations.clone(),
                None => {
                    let held = match held_out.take() {
                        Some(h) => h,
                        None => evaluate::held_out_samples(&graph, &eval_opts)
                            .map_err(|e| e.context(&a.model.display().to_string()))?,
                    };
                    let s = mixed::act_sensitivities(&graph, &eval_opts, &held)
                        .map_err(|e| e.context(&a.model.display().to_string()))?;
                    held_out = Some(held);
                    s
                }
            };
            let mut base = rtn::RtnOptions {
                bits,
                seed: a.seed,
                input_range,
                layer_bits: layer_bits.clone(),
                ..Default::default()
            };
            if let Some(n) = a.samples {
                base.samples = n;
            }
            let c = mixed::choose_act_bits(&graph, &base, isa, &activations, budget)
                .map_err(|e| e.context(&a.model.display().to_string()))?;
            let secs = t0.elapsed().as_secs_f64();
            stages.push(("arena choice", secs));
            if !quiet {
                eprintln!(
                    "mixed precision: {} of {} activation tensors keep 8-bit codes, arena {} of \
                     {budget} B ({} B with all at 4 bits; {secs:.1} s)",
                    c.act8.len(),
                    activations.len(),
                    c.arena_bytes,
                    c.all_4bit_arena_bytes
                );
            }
            Some((c, activations))
        }
    };
    let act8 = arena_choice
        .as_ref()
        .map(|(c, _)| c.act8.clone())
        .unwrap_or_default();
    // Which candidate a calibrated compile shipped (see `select_candidate`).
    let mut shipped = "";
    // Quantizer errors name the node; the file goes in front, as for import errors.
    let model_name = a.model.display().to_string();
    let (q, method, calibration) = match a.method {
        Method::Rtn | Method::Lp => {
            let lp = a.method == Method::Lp;
            let steps = if lp {
                rtn::WeightSteps::Lp
            } else {
                rtn::WeightSteps::MinMax
            };
            let widths = (layer_bits.clone(), act8.clone());
            let q = rtn_model(a, &graph, bits, widths, input_range, steps, &mut stages)?;
            (q, if lp { "lp" } else { "rtn" }, None)
        }
        Method::Diffdfq | Method::Genie => {
            let c = calibrated(
                a,
                &graph,
                &size,
                bits,
                (layer_bits.clone(), act8.clone()),
                input_range,
                (&eval_opts, held_out_on, &mut held_out),
                &mut stages,
            )?;
            shipped = c.shipped;
            (c.q, c.method, Some(c.report))
        }
    };
    let low = lower::lower_for(&q, isa)?;
    let evaluation = if held_out_on {
        let t0 = std::time::Instant::now();
        let held = match held_out.take() {
            Some(h) => h,
            None => evaluate::held_out_samples(&graph, &eval_opts)
                .map_err(|e| e.context(&model_name))?,
        };
        let ev = evaluate::evaluate(&q, &low.blob, &eval_opts, &held)
            .map_err(|e| e.context(&model_name))?;
        stages.push(("evaluation", t0.elapsed().as_secs_f64()));
        Some(ev)
    } else {
        None
    };
    let nnef = if a.emit.contains(&Emit::Nnef) {
        let graph = diffdfq_compiler::tract::from_dfq(&low.blob)?;
        Some(diffdfq_compiler::tract::nnef::to_tgz(&graph)?)
    } else {
        None
    };
    let weights = match (&mixed, &layer_bits) {
        (Some(m), _) => format!(
            "weights {}..{}-bit per layer within {} weight bytes",
            m.bits.iter().min().unwrap_or(&2),
            m.bits.iter().max().unwrap_or(&8),
            m.budget
        ),
        (None, Some(b)) => format!("weights {b:?}-bit per layer"),
        (None, None) => format!(
            "weights {}-bit (first/last {}-bit)",
            bits.weight, bits.first_last
        ),
    };
    let summary = format!(
        "Method {method}{}, {weights}, activations {}-bit{}, seed {}{}.",
        match shipped {
            "" => String::new(),
            k => format!(" (kept: {k})"),
        },
        bits.act,
        match &arena_choice {
            Some((c, _)) => format!(
                " ({} tensors at 8 within {} arena bytes)",
                c.act8.len(),
                c.budget_arena_bytes
            ),
            None => String::new(),
        },
        a.seed,
        input_range
            .map(|(lo, hi)| format!(", input range [{lo}, {hi}]"))
            .unwrap_or_default()
    );
    let e = emit::Emission {
        name: &name,
        target,
        cpu: cpu.as_ref(),
        blob: &low.blob,
        header: header::HeaderInfo {
            name: &name,
            source: &file,
            target: target.triple,
            kernels: &kernels_line,
            summary: &summary,
            arena_size: low.arena_size,
            model_len: low.blob.len(),
            input_shape: &low.input_shape,
            output_shape: &low.output_shape,
        },
        report: report::render(
            &report::ReportInfo {
                model: &file,
                name: &name,
                target: target.triple,
                cpu: a.cpu.as_deref(),
                kernels,
                method,
                seed: a.seed,
                bits,
                input_range,
                calibration,
                evaluation: evaluation.as_ref(),
                mixed: mixed_json(mixed.as_ref(), arena_choice.as_ref()),
            },
            &low,
        ),
        plot: emit::plot::render(&low, evaluation.as_ref(), mixed.as_ref())?,
        with_lib: !a.no_lib,
        nnef,
    };
    let written = emit::write_outputs(&a.out_dir, &e)?;
    stages.push(("total", t_start.elapsed().as_secs_f64()));
    if a.json {
        let mut doc: serde_json::Value = serde_json::from_str(&e.report)
            .map_err(|err| Error::Internal(format!("summary: {err}")))?;
        if let Some(o) = doc.as_object_mut() {
            o.insert(
                "files".into(),
                written.iter().map(|w| w.display().to_string()).collect(),
            );
            let t: serde_json::Map<String, serde_json::Value> = stages
                .iter()
                .map(|(n, s)| (n.to_string(), ((s * 10.0).round() / 10.0).into()))
                .collect();
            o.insert("seconds".into(), t.into());
        }
        println!("{doc}");
        return Ok(());
    }
    if !quiet {
        eprint!(
            "{}",
            emit::summary::render(&low, evaluation.as_ref(), mixed.as_ref(), &stages)
        );
        let (wb, fb) = low.weight_bytes();
        for w in &written {
            println!("wrote {}", w.display());
        }
        println!(
            "weights {wb} B ({:.1}x smaller than FP32 {fb} B), model {} B, arena {} B (lower bound {} B), {} MACs",
            fb as f64 / wb.max(1) as f64,
            low.blob.len(),
            low.arena_size,
            low.arena_lower_bound,
            low.macs()
        );
    }
    Ok(())
}

/// `--method rtn` (or `lp`, by `steps`) as the flags ask for it, timed as the stage `quantize`.
pub(crate) fn rtn_model(
    a: &Args,
    graph: &diffdfq_compiler::graph::Graph,
    bits: diffdfq_compiler::quant::Bits,
    (layer_bits, act8): (Option<Vec<u8>>, Vec<String>),
    input_range: Option<(f32, f32)>,
    weight_steps: rtn::WeightSteps,
    stages: &mut Vec<(&'static str, f64)>,
) -> Result<diffdfq_compiler::quant::QuantGraph, Error> {
    let mut ro = rtn::RtnOptions {
        bits,
        seed: a.seed,
        input_range,
        layer_bits,
        act8,
        weight_steps,
        ..Default::default()
    };
    // rtn's `--samples`: the N(0, 1) samples behind the ranges of BN-less layers whose
    // moments cannot be followed.
    if let Some(n) = a.samples {
        ro.samples = n;
    }
    let t0 = std::time::Instant::now();
    let q = rtn::quantize(graph, &ro).map_err(|e| e.context(&a.model.display().to_string()))?;
    stages.push(("quantize", t0.elapsed().as_secs_f64()));
    Ok(q)
}

fn main() -> ExitCode {
    diffdfq_compiler::calib::keep_freed_memory();
    let args: Args = match diffdfq_compiler::cli::parse("diffdfq-compile") {
        Ok(a) => a,
        Err(code) => return code,
    };
    if let Err(e) = diffdfq_compiler::interrupt::install("diffdfq-compile") {
        eprintln!("diffdfq-compile: error: {e}");
        return ExitCode::from(e.exit_code() as u8);
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if args.json => {
            let doc = serde_json::json!({
                "error": e.to_string(),
                "exit_code": e.exit_code(),
            });
            eprintln!("{doc}");
            ExitCode::from(e.exit_code() as u8)
        }
        Err(e) => {
            eprintln!("diffdfq-compile: error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// `mixed_precision` of the report: the `--flash` choice and the `--arena` one, when made.
fn mixed_json(
    m: Option<&mixed::Assignment>,
    arena: Option<&(mixed::ArenaChoice, Vec<mixed::ActSensitivity>)>,
) -> Option<serde_json::Value> {
    let mut j = m.map(mixed::Assignment::to_json);
    if let Some((c, acts)) = arena {
        let o = j.get_or_insert_with(|| serde_json::json!({ "activations_a4": acts }));
        o["arena"] = serde_json::json!(c);
    }
    j
}
