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
