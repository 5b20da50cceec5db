//! A calibrated compile: settings from the budget, calibration, the held-out selection.

use diffdfq_compiler::calib::{self, budget, CalibOptions, DeviceKind, Progress};
use diffdfq_compiler::quant::{rtn, Bits, QuantGraph};
use diffdfq_compiler::{evaluate, Error};

use super::{Args, DeviceArg, Method};

/// What a calibrated compile ships and reports.
pub(crate) struct Calibrated {
    pub q: QuantGraph,
    pub method: &'static str,
    /// report.json's `calibration`.
    pub report: serde_json::Value,
    /// The candidate the held-out selection kept ("" without it).
    pub shipped: &'static str,
}

/// `--method diffdfq` or `genie`: settings from `--budget`, calibration, then the held-out
/// selection (see [`select_candidate`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn calibrated(
    a: &Args,
    graph: &diffdfq_compiler::graph::Graph,
    size: &budget::ModelSize,
    bits: Bits,
    (layer_bits, act8): (Option<Vec<u8>>, Vec<String>),
    input_range: Option<(f32, f32)>,
    held: (&evaluate::EvalOptions, bool, &mut Option<evaluate::HeldOut>),
    stages: &mut Vec<(&'static str, f64)>,
) -> Result<Calibrated, Error> {
    let quiet = a.quiet();
    let model_name = a.model.display().to_string();
    let (eval_opts, select, held_out) = held;
    let mut shipped = "";
    let dev = calib::device(match a.device {
        DeviceArg::Cpu => DeviceKind::Cpu,
        DeviceArg::Cuda => DeviceKind::Cuda,
    })?;
    let diffusion = a.method == Method::Diffdfq;
    if !(a.budget.is_finite() && a.budget > 0.0) {
        return Err(Error::Input(format!(
            "--budget takes a positive number of minutes, got {}",
            a.budget
        )));
    }
    if uniform_w8a8(bits, layer_bits.as_deref()) {
        return w8a8(
            a,
            graph,
            bits,
            (layer_bits, act8),
            input_range,
            diffusion,
            stages,
        );
    }
    let fixed = budget::Fixed {
        samples: a.samples,
        synth_iters: a.synth_iters,
        recon_iters: a.recon_iters,
    };
    let plan = budget::plan(size, a.budget, fixed, diffusion);
    let s = plan.settings;
    if !quiet {
        eprintln!(
            "budget {} min: {} samples x {} synthesis iterations, {} reconstruction \
             iterations per block at batch {} (estimated {:.1} min on 2 cores)",
            a.budget,
            s.samples,
            s.synth_iters,
            s.recon_iters,
            s.recon_batch,
            plan.estimate_s / 60.0
        );
        if !plan.fits {
            eprintln!(
                "warning: the leanest settings exceed --budget {}; raise it, or fix \
                 --samples/--synth-iters/--recon-iters yourself",
                a.budget
            );
        }
    }
    let mut co = CalibOptions::new(bits, a.seed, diffusion);
    co.synth.samples = s.samples;
    co.synth.iters = s.synth_iters;
    co.synth.input_range = input_range;
    co.recon.iters = s.recon_iters;
    co.recon.batch = s.recon_batch;
    co.recon.eval_samples = s.eval_samples;
    co.layer_bits = layer_bits.clone();
    co.act8 = act8;
    let (q, rep) = calib::calibrate(graph, &co, &dev, Progress::new(quiet))
        .map_err(|e| e.context(&model_name))?;
    stages.push(("synthesis", rep.synthesis_s));
    stages.push(("reconstruction", rep.reconstruction_s));
    if !quiet {
        // Against the plan's per-stage estimates: where the cost model misses shows.
        eprintln!(
            "calibrated: synthesis {:.1} s (estimated {:.1}), reconstruction {:.1} s \
             (estimated {:.1}), {} blocks on levels {:?}",
            rep.synthesis_s,
            plan.estimate_synthesis_s,
            rep.reconstruction_s,
            plan.estimate_s - plan.estimate_synthesis_s,
            rep.recon.blocks.len(),
            rep.recon.levels
        );
    }
    let mut json =
        serde_json::to_value(&rep.recon).map_err(|e| Error::Internal(format!("report: {e}")))?;
    if let Some(o) = json.as_object_mut() {
        let b = serde_json::to_value(plan).map_err(|e| Error::Internal(format!("report: {e}")))?;
        o.insert("budget".into(), b);
    }
    let q = if select {
        let t0 = std::time::Instant::now();
        if held_out.is_none() {
            *held_out = Some(
                evaluate::held_out_samples(graph, eval_opts).map_err(|e| e.context(&model_name))?,
            );
        }
        let Some(held) = held_out.as_ref() else {
            return Err(Error::Internal("held-out samples".into()));
        };
        let (kept, q, sel) = select_candidate(graph, q, &co, input_range, held)
            .map_err(|e| e.context(&model_name))?;
        let secs = t0.elapsed().as_secs_f64();
        stages.push(("selection", secs));
        if !quiet {
            eprintln!("kept: {kept} (lowest output MSE on the held-out samples, {secs:.1} s)");
        }
        if let Some(o) = json.as_object_mut() {
            o.insert("selection".into(), sel);
        }
        shipped = kept;
        q
    } else {
        q
    };
    Ok(Calibrated {
        q,
        method: if diffusion { "diffdfq" } else { "genie" },
        report: json,
        shipped,
    })
}

/// Every weighted layer at 8 bits and 8-bit activations: nothing for calibration to win.
fn uniform_w8a8(bits: Bits, layer_bits: Option<&[u8]>) -> bool {
    bits.act == 8
        && match layer_bits {
            Some(b) => b.iter().all(|&w| w == 8),
            None => bits.weight == 8 && bits.first_last == 8,
        }
}

/// A calibrated method at W8A8 ships rtn's model without synthesizing or reconstructing: 8-bit
/// rounding errors are too small for reconstruction on synthetic samples to rank, and on every
/// real model measured the calibrated W8A8 model tied with rtn's on real inputs or lost to it,
/// while the held-out synthetic samples preferred it (README "Calibration", step 5).
fn w8a8(
    a: &Args,
    graph: &diffdfq_compiler::graph::Graph,
    bits: Bits,
    widths: (Option<Vec<u8>>, Vec<String>),
    input_range: Option<(f32, f32)>,
    diffusion: bool,
    stages: &mut Vec<(&'static str, f64)>,
) -> Result<Calibrated, Error> {
    let q = super::rtn_model(
        a,
        graph,
        bits,
        widths,
        input_range,
        rtn::WeightSteps::MinMax,
        stages,
    )?;
    if !a.quiet() {
        eprintln!(
            "W8A8: shipping rtn's model, not calibrated (8-bit rounding leaves calibration \
             nothing it can win; README \"Calibration\")"
        );
    }
    Ok(Calibrated {
        q,
        method: if diffusion { "diffdfq" } else { "genie" },
        report: serde_json::json!({
            "calibrated": false,
            "reason": "every layer at 8 weight bits with 8-bit activations: rtn's model ships",
        }),
        shipped: "rtn, not calibrated at W8A8",
    })
}

/// The candidate of a calibrated compile with the least output MSE against FP32 on the
/// held-out samples: the calibrated model (bias-corrected where biases were not learned) and
/// what `--method rtn` gives for the same bits, so that calibration never ships a model these
/// samples say is worse than rtn's. Whether to bias-correct is not put to them: samples
/// synthesized as the reconstruction's were rank the uncorrected model first on every real
/// model measured, where real inputs rank it last (README "Calibration", step 4). Ties keep
/// the calibrated model.
fn select_candidate(
    g: &diffdfq_compiler::graph::Graph,
    calibrated: QuantGraph,
    co: &CalibOptions,
    input_range: Option<(f32, f32)>,
    held: &evaluate::HeldOut,
) -> Result<(&'static str, QuantGraph, serde_json::Value), Error> {
    let name = if calib::corrects_biases(co) {
        "calibrated+bias-correction"
    } else {
        "calibrated"
    };
    let mut cands: Vec<(&'static str, QuantGraph)> = vec![(name, calibrated)];
    let rq = rtn::quantize(
        g,
        &rtn::RtnOptions {
            bits: co.bits,
            seed: co.seed,
            input_range,
            layer_bits: co.layer_bits.clone(),
            act8: co.act8.clone(),
            ..Default::default()
        },
    )?;
    cands.push(("rtn", rq));
    let mut mse = Vec::with_capacity(cands.len());
    for (_, c) in &cands {
        mse.push(evaluate::output_mse(c, held)?);
    }
    let best = (0..cands.len()).fold(0, |b, i| if mse[i] < mse[b] { i } else { b });
    let json = serde_json::json!({
        "metric": "output MSE against FP32 on the held-out samples",
        "candidates": cands.iter().zip(&mse).map(|((n, _), m)| serde_json::json!({
            "name": n,
            "output_mse": m,
        })).collect::<Vec<_>>(),
        "kept": cands[best].0,
    });
    let (kept, q) = cands.swap_remove(best);
    Ok((kept, q, json))
}
