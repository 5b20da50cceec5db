//! The packed-integer tract graph: built from the lowered `.dfq`, it gives byte-identical
//! outputs to the runtime on both fixtures at every bit width (samples and random inputs),
//! before and after tract's optimizer; its NNEF archive reloads with the `diffdfq` registry into
//! a graph with the same outputs; bad archives are one-line errors.

use std::path::Path;

use diffdfq_compiler::tract::ops::PackedOp;
use diffdfq_compiler::tract::{self as dtract, nnef};
use diffdfq_compiler::{npy, Error};
use tract_nnef::prelude::TypedModel;

mod common;
use common::*;

fn sample(name: &str) -> Vec<f32> {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/models/{name}.sample.npy"));
    npy::read_f32(&p).unwrap().1
}

/// `n` inputs of 784 values: a seeded mix of normal-ish values, large magnitudes (saturating
/// the input codes) and zeros.
fn random_inputs(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n * 784)
        .map(|_| {
            let u = next();
            let v = (0..4).map(|_| next()).sum::<f64>() - 2.0;
            match (u * 10.0) as u32 {
                0 => 0.0,
                1 => (v * 20.0) as f32,
                _ => (v * 1.7) as f32,
            }
        })
        .collect()
}

fn packed_ops(m: &TypedModel) -> Vec<PackedOp> {
    m.eval_order()
        .unwrap()
        .into_iter()
        .filter_map(|i| m.node(i).op_as::<PackedOp>().cloned())
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn tract_graph_equals_runtime_at_every_bit_width() {
    for name in FIXTURES {
        let g = graph(name);
        let x = [sample(name), random_inputs(200, 7)].concat();
        for (w, a) in [(2, 8), (3, 8), (4, 8), (8, 8), (4, 4)] {
            let (_, l) = quantize(&g, w, a);
            let want = run_runtime(&l.blob, &x, 10);
            let model = dtract::from_dfq(&l.blob).unwrap();
            let got = dtract::run_samples(&model, &x).unwrap();
            assert_eq!(bits(&got), bits(&want), "{name} W{w}A{a}");
            // The custom ops survive tract's optimizer and still compute the same bytes.
            let opt = model.into_optimized().unwrap();
            assert!(opt.nodes.iter().any(|n| n.op.name().starts_with("Diffdfq")));
            let got = dtract::run_samples(&opt, &x).unwrap();
            assert_eq!(bits(&got), bits(&want), "{name} W{w}A{a} optimized");
        }
    }
}

#[test]
fn nnef_round_trip_is_identical_and_deterministic() {
    for name in FIXTURES {
        let g = graph(name);
        let x = [sample(name), random_inputs(100, 11)].concat();
        for w in [2, 3, 4, 8] {
            let (_, l) = quantize(&g, w, 8);
            let want = run_runtime(&l.blob, &x, 10);
            let model = dtract::from_dfq(&l.blob).unwrap();
            let tgz = nnef::to_tgz(&model).unwrap();
            assert_eq!(
                nnef::to_tgz(&model).unwrap(),
                tgz,
                "{name} W{w}: not deterministic"
            );
            let back = nnef::from_bytes(&tgz).unwrap();
            let got = dtract::run_samples(&back, &x).unwrap();
            assert_eq!(bits(&got), bits(&want), "{name} W{w} after NNEF");
            // The reloaded graph holds the same ops (records, weights, tensors) in the same order.
            assert!(
                packed_ops(&back) == packed_ops(&model),
                "{name} W{w}: ops differ"
            );
        }
    }
}

#[test]
fn bad_archives_and_blobs_are_one_line_input_errors() {
    let g = graph("resnet_fmnist");
    let (_, l) = quantize(&g, 4, 8);
    let tgz = nnef::to_tgz(&dtract::from_dfq(&l.blob).unwrap()).unwrap();
    let mut flipped = tgz.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x5a;
    for bad in [
        &tgz[..tgz.len() / 2],
        &flipped[..],
        b"not an archive",
        &[][..],
    ] {
        match nnef::from_bytes(bad) {
            Err(Error::Input(m)) => assert!(!m.is_empty()),
            Err(e) => panic!("not an input error: {e}"),
            Ok(_) => panic!("a corrupted archive loaded"),
        }
    }
    let mut blob = l.blob.clone();
    blob[100] ^= 1;
    assert!(matches!(dtract::from_dfq(&blob), Err(Error::Input(_))));
}

fn cli(bin: &str, args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new(bin).args(args).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn assert_bad_input(out: &std::process::Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.contains(needle), "{err:?} lacks {needle:?}");
}

#[test]
fn cli_emit_nnef_and_engine_tract_agree_byte_for_byte() {
    let compile = env!("CARGO_BIN_EXE_diffdfq-compile");
    let run = env!("CARGO_BIN_EXE_diffdfq-run");
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models");
    for (name, bits) in [("mobilenet_fmnist", "3"), ("resnet_fmnist", "2")] {
        let onnx = models.join(format!("{name}.onnx"));
        let x = models.join(format!("{name}.sample.npy"));
        let (a, b) = (t.join(format!("{name}_a")), t.join(format!("{name}_b")));
        for dir in [&a, &b] {
            let args = [
                onnx.to_str().unwrap(),
                "--bits",
                bits,
                "--no-lib",
                "--quiet",
                "--emit",
                "nnef",
                "--method",
                "rtn",
                "--eval-samples",
                "0",
                "-o",
                dir.to_str().unwrap(),
            ];
            assert!(cli(compile, &args).status.success());
        }
        // Deterministic, NNEF included.
        let mut names: Vec<_> = std::fs::read_dir(&a)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert!(names.contains(&format!("{name}.nnef.tgz")), "{names:?}");
        assert!(names.contains(&format!("{name}.report.svg")), "{names:?}");
        assert_eq!(names.len(), 6, "{names:?}");
        for n in &names {
            let same = std::fs::read(a.join(n)).unwrap() == std::fs::read(b.join(n)).unwrap();
            assert!(same, "{n} differs between runs");
        }
        let dfq = a.join(format!("{name}.dfq"));
        let tgz = a.join(format!("{name}.nnef.tgz"));
        let mut outs = Vec::new();
        for (i, extra) in [
            vec![dfq.to_str().unwrap()],
            vec![dfq.to_str().unwrap(), "--engine", "tract"],
            vec![tgz.to_str().unwrap()],
            vec![tgz.to_str().unwrap(), "--engine", "tract"],
        ]
        .into_iter()
        .enumerate()
        {
            let y = t.join(format!("{name}_{i}.npy"));
            let mut args = extra.clone();
            args.extend([
                "--input",
                x.to_str().unwrap(),
                "--output",
                y.to_str().unwrap(),
            ]);
            args.push("--argmax");
            let out = cli(run, &args);
            assert!(out.status.success(), "{args:?}");
            outs.push((std::fs::read(&y).unwrap(), out.stdout));
        }
        for o in &outs[1..] {
            assert!(*o == outs[0], "{name}: outputs differ between engines");
        }
        // Bad input: a corrupted archive, and the runtime asked to run NNEF.
        let bad = t.join(format!("{name}_bad.nnef.tgz"));
        let bytes = std::fs::read(&tgz).unwrap();
        std::fs::write(&bad, &bytes[..bytes.len() / 3]).unwrap();
        let y = t.join("never.npy");
        let (bad_s, x_s, y_s) = (
            bad.to_str().unwrap(),
            x.to_str().unwrap(),
            y.to_str().unwrap(),
        );
        let out = cli(run, &[bad_s, "--input", x_s, "--output", y_s]);
        assert_bad_input(&out, &format!("{name}_bad.nnef.tgz"));
        let tgz_s = tgz.to_str().unwrap();
        let out = cli(
            run,
            &[
                tgz_s, "--engine", "runtime", "--input", x_s, "--output", y_s,
            ],
        );
        assert_bad_input(&out, "--engine tract");
        assert!(!y.exists());
    }
}
