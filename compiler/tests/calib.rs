//! Calibration (DiffDFQ / Genie) at reduced settings: it beats rtn at 3 bits on the real test
//! set through the integer runtime, the fake-quantized model agrees with the runtime, blocks
//! follow the residual structure, and a compile is byte-identical across runs.

use std::process::Command;

use candle_core::Device;
use diffdfq_compiler::calib::{self, recon, CalibOptions, DeviceKind, Progress};
use diffdfq_compiler::lower::lower;
use diffdfq_compiler::quant::qmodel::QModel;
use diffdfq_compiler::quant::{Bits, QuantGraph};

mod common;
use common::*;

fn top1(q: &QuantGraph, x: &[f32], labels: &[u8]) -> (f64, Vec<usize>) {
    let l = lower(q).unwrap();
    let y = run_runtime(&l.blob, x, 10);
    let pred: Vec<usize> = y.chunks(10).map(argmax).collect();
    let ok = pred
        .iter()
        .zip(labels)
        .filter(|(p, &t)| **p == t as usize)
        .count();
    (ok as f64 / labels.len() as f64, pred)
}

/// Images on which the fake-quantized candle model and the runtime pick the same class.
fn agreement(q: &QuantGraph, x: &[f32]) -> usize {
    let (_, pred) = top1(q, x, &vec![0; x.len() / 784]);
    fake_quant_classes(q, x)
        .iter()
        .zip(&pred)
        .filter(|(a, b)| a == b)
        .count()
}

fn bits(w: u8, a: u8) -> Bits {
    Bits {
        weight: w,
        act: a,
        first_last: 8,
    }
}

#[test]
fn diffdfq_beats_rtn_at_3_bits_on_the_test_set() {
    let g = graph("resnet_fmnist");
    let (x, labels) = fashion_test(2000);
    let (rtn_top1, _) = top1(&quantize(&g, 3, 8).0, &x, &labels);
    let mut co = CalibOptions::new(bits(3, 8), 0, true);
    co.synth.samples = 64;
    co.synth.batch = 64;
    co.synth.iters = 15;
    co.recon.iters = 60;
    co.recon.eval_samples = 64;
    let (q, rep) = calib::calibrate(&g, &co, &Device::Cpu, Progress::silent()).unwrap();
    let (cal_top1, _) = top1(&q, &x, &labels);
    eprintln!(
        "resnet W3A8 on 2000 test images: rtn {rtn_top1:.4}, diffdfq (reduced) {cal_top1:.4}, levels {:?}",
        rep.recon.levels
    );
    assert!(
        cal_top1 > rtn_top1 + 0.005,
        "calibration {cal_top1} does not beat rtn {rtn_top1}"
    );
    // Progressive selection ends on clean samples.
    assert_eq!(rep.recon.levels.last(), Some(&0));
    assert_eq!(rep.recon.adaptability.len(), calib::synth::LEVELS);
}

#[test]
fn fake_quant_model_agrees_with_the_runtime() {
    let (x, _) = fashion_test(1000);
    for name in FIXTURES {
        let g = graph(name);
        for (w, a) in [(4, 8), (2, 8), (4, 4)] {
            let q = quantize(&g, w, a).0;
            let agree = agreement(&q, &x);
            eprintln!("{name} W{w}A{a}: fake quant agrees with the runtime on {agree}/1000");
            // 16 codes: a requantization that lands on a rounding boundary in float and not
            // in fixed point moves a whole step (the bias-corrected rtn MobileNet: 994/1000).
            let least = if a == 4 { 990 } else { 995 };
            assert!(agree >= least, "{name} W{w}A{a}: {agree}/1000");
        }
    }
}

#[test]
fn learned_weight_steps_and_biases_reach_the_runtime() {
    let g = graph("resnet_fmnist");
    let (x, _) = fashion_test(1000);
    let mut co = CalibOptions::new(bits(3, 8), 0, false);
    co.synth.samples = 32;
    co.synth.batch = 32;
    co.synth.iters = 5;
    co.recon.iters = 20;
    // Every layer learns, whatever its rows per weight (see the next test).
    co.recon.rows_per_weight = 0.0;
    co.recon.rows_per_weight_wide = 0.0;
    let (start, _) = calib::calibrate(&g, &co, &Device::Cpu, Progress::silent()).unwrap();
    co.recon.lr_weight_scale = 1e-2;
    co.recon.lr_bias = 1e-2;
    let (q, _) = calib::calibrate(&g, &co, &Device::Cpu, Progress::silent()).unwrap();
    let layers = |q: &QuantGraph| -> Vec<(Vec<f32>, Vec<f32>)> {
        q.nodes
            .iter()
            .filter_map(|n| n.op.layer())
            .filter(|l| l.bits == 3)
            .map(|l| (l.scales.clone(), l.bias.clone()))
            .collect()
    };
    for ((s0, b0), (s1, b1)) in layers(&start).iter().zip(&layers(&q)) {
        assert_ne!(s0, s1, "weight steps were not learned");
        assert_ne!(b0, b1, "biases were not learned");
    }
    let agree = agreement(&q, &x);
    assert!(agree >= 995, "learned steps/biases: {agree}/1000 agree");
}

#[test]
fn layers_with_too_few_rows_per_weight_keep_round_to_nearest() {
    let g = graph("resnet_fmnist");
    let mut co = CalibOptions::new(bits(3, 8), 0, false);
    co.synth.samples = 32;
    co.synth.batch = 32;
    co.synth.iters = 5;
    co.recon.iters = 20;
    let (q, rep, samples) =
        calib::calibrate_on(&g, &co, &Device::Cpu, Progress::silent(), None).unwrap();
    // 32 samples: the 7×7 3×3 conv reading 64 channels gets 32·49 = 1568 output values per
    // row against a fan-in of 576 (< 4×); the classifier 32 against 64.
    let nearest = ["/layers/layers.2/c2/c2.0/Conv", "/fc/Gemm"];
    assert_eq!(rep.recon.nearest, nearest);
    // At 4 bits a layer needs 64 values per weight: every 14×14 and 7×7 conv keeps nearest
    // but the 14×14 1×1 shortcut (6272 against a fan-in of 16); the 8-bit stem (25088 against
    // 9) and the 28×28 convs (25088 against 144) learn. The same samples, not synthesized again.
    let mut co4 = co.clone();
    co4.bits = bits(4, 8);
    let (_, rep4, _) = calib::calibrate_on(
        &g,
        &co4,
        &Device::Cpu,
        Progress::silent(),
        Some(samples.clone()),
    )
    .unwrap();
    let nearest4 = [
        "/layers/layers.1/c1/c1.0/Conv",
        "/layers/layers.1/c2/c2.0/Conv",
        "/layers/layers.2/c1/c1.0/Conv",
        "/layers/layers.2/c2/c2.0/Conv",
        "/layers/layers.2/short/short.0/Conv",
        "/fc/Gemm",
    ];
    assert_eq!(rep4.recon.nearest, nearest4);
    co.recon.rows_per_weight = f64::INFINITY;
    co.recon.rows_per_weight_wide = f64::INFINITY;
    let (start, rep, _) =
        calib::calibrate_on(&g, &co, &Device::Cpu, Progress::silent(), Some(samples)).unwrap();
    assert_eq!(rep.recon.nearest.len(), 10);
    let mut learned_moved = false;
    for (a, b) in q.nodes.iter().zip(&start.nodes) {
        let (Some(la), Some(lb)) = (a.op.layer(), b.op.layer()) else {
            continue;
        };
        if nearest.contains(&a.name.as_str()) {
            assert_eq!(la.codes, lb.codes, "'{}' left round-to-nearest", a.name);
        } else {
            learned_moved |= la.codes != lb.codes;
        }
    }
    assert!(learned_moved, "no learned layer moved off round-to-nearest");
}

#[test]
fn blocks_follow_the_residual_structure() {
    let q = quantize(&graph("resnet_fmnist"), 4, 8).0;
    let m = QModel::new(q, &Device::Cpu).unwrap();
    let b = recon::blocks(&m);
    let names: Vec<Vec<&str>> = b
        .iter()
        .map(|r| r.clone().map(|i| m.q.nodes[i].op.name()).collect())
        .collect();
    assert_eq!(
        names,
        vec![
            vec!["Conv"],
            vec!["Conv", "Conv", "Add"],
            vec!["Conv", "Conv", "Conv", "Add"],
            vec!["Conv", "Conv", "Conv", "Add"],
            vec!["GlobalAvgPool", "Reshape", "FullyConnected"],
        ]
    );
}

fn compile(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_diffdfq-compile"))
        .args(args)
        .args(["--eval-samples", "0"])
        .output()
        .unwrap()
}

#[test]
fn calibrated_compile_is_byte_identical_across_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_path("mobilenet_fmnist");
    let mut outs = Vec::new();
    for run in ["a", "b"] {
        let dir = tmp.path().join(run);
        let out = compile(&[
            m.to_str().unwrap(),
            "--bits",
            "2",
            "--method",
            "diffdfq",
            "--samples",
            "16",
            "--synth-iters",
            "3",
            "--recon-iters",
            "4",
            "--seed",
            "7",
            "--no-lib",
            "--quiet",
            "-o",
            dir.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty() && out.stdout.is_empty(),
            "--quiet printed"
        );
        outs.push(dir);
    }
    for f in ["dfq", "o", "h", "report.json", "report.svg"] {
        let name = format!("mobilenet_fmnist.{f}");
        let (a, b) = (
            std::fs::read(outs[0].join(&name)).unwrap(),
            std::fs::read(outs[1].join(&name)).unwrap(),
        );
        assert!(a == b, "{name} differs between runs");
    }
    let report = std::fs::read_to_string(outs[0].join("mobilenet_fmnist.report.json")).unwrap();
    assert!(report.contains("\"method\": \"diffdfq\"") && report.contains("\"levels\""));
}

#[test]
fn cuda_without_the_feature_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        return;
    }
    assert!(calib::device(DeviceKind::Cuda).is_err());
    let tmp = tempfile::tempdir().unwrap();
    let m = model_path("resnet_fmnist");
    let out = compile(&[
        m.to_str().unwrap(),
        "--device",
        "cuda",
        "-o",
        tmp.path().to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("--features cuda"), "{err}");
    assert!(std::fs::read_dir(tmp.path()).unwrap().next().is_none());
}

#[test]
fn input_range_bounds_the_synthesized_images() {
    let g = graph("resnet_fmnist");
    // Fashion-MNIST pixels in [0, 1], normalized by mean 0.286 and std 0.353.
    let (lo, hi) = (-0.8102f32, 2.0227f32);
    let mut so = calib::synth::SynthOptions {
        samples: 8,
        batch: 8,
        iters: 3,
        ..Default::default()
    };
    let free = calib::synth::synthesize(&g, None, &so, Progress::silent()).unwrap();
    assert!(free.iter().any(|&v| v < lo || v > hi));
    so.input_range = Some((lo, hi));
    let bounded = calib::synth::synthesize(&g, None, &so, Progress::silent()).unwrap();
    assert!(bounded.iter().all(|&v| (lo..=hi).contains(&v)));
    assert!(bounded.contains(&lo) && bounded.contains(&hi));
}
