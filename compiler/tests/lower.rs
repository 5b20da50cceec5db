//! Quantization (rtn) and lowering of the fixtures: blobs at every bit width, the memory plan,
//! determinism, integer runtime vs the float reference, and top-1 on the real Fashion-MNIST
//! test set through `diffdfq-run NAME.dfq`.

use std::path::Path;
use std::process::Command;

use candle_core::{Device, Tensor};
use diffdfq_compiler::graph::{BatchNorm, Graph, Node, Op, Value};
use diffdfq_compiler::lower::{lower, plan, plan_tensors};
use diffdfq_compiler::npy;
use diffdfq_compiler::quant::rtn::{self, RtnOptions};
use diffdfq_compiler::reference::FloatModel;
use diffdfq_runtime::Model;

mod common;
use common::*;

fn run_float(g: &Graph, x: &[f32], per_out: usize) -> Vec<f32> {
    let m = FloatModel::new(g, &Device::Cpu).unwrap();
    let shape = g.shape(g.inputs[0]).to_vec();
    let per: usize = shape.iter().product();
    let mut out = Vec::with_capacity(x.len() / per * per_out);
    for xi in x.chunks_exact(per) {
        let t = Tensor::from_vec(xi.to_vec(), shape.as_slice(), &Device::Cpu).unwrap();
        out.extend(
            m.forward(&[t]).unwrap()[0]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
    }
    out
}

#[test]
fn fixtures_lower_at_every_bit_width() {
    for name in FIXTURES {
        let g = graph(name);
        let mut sizes = Vec::new();
        for (w, a) in [(2, 8), (3, 8), (4, 8), (8, 8), (4, 4)] {
            let (q, l) = quantize(&g, w, a);
            let m = Model::from_bytes(&l.blob).unwrap();
            assert_eq!(m.arena_size(), l.arena_size, "{name} W{w}A{a}");
            assert_eq!(l.input_shape, vec![1, 1, 28, 28]);
            assert_eq!(l.output_shape, vec![1, 10]);
            // BN folded away: every weight layer carries its bits, first and last at 8.
            let bits: Vec<u8> = l.layers.iter().filter_map(|x| x.weight_bits).collect();
            assert_eq!((bits[0], *bits.last().unwrap()), (8, 8));
            assert!(bits[1..bits.len() - 1].iter().all(|&b| b == w), "{bits:?}");
            assert!(!l.layers.iter().any(|x| x.op == "BatchNorm"));
            // Every conv/linear quantized to codes inside its bit range.
            for i in q.layers() {
                let layer = q.nodes[i].op.layer().unwrap();
                assert!(layer.codes.iter().all(|&c| (c as u32) < (1 << layer.bits)));
            }
            if a == 4 {
                let four = q.tensors.iter().filter(|t| t.quant.bits == 4).count();
                assert!(four > 0 && four < q.tensors.len(), "{four}");
            }
            // A Conv feeding only the table after it runs fused: its output is not stored,
            // and keeps 8-bit codes (MobileNet's HardSwish layers; ResNet has no tables).
            let fused = q.fused_act_convs();
            assert_eq!(fused.is_empty(), *name == "resnet_fmnist", "{name}");
            for &i in &fused {
                assert_eq!(q.tensors[q.nodes[i].output].quant.bits, 8);
            }
            assert_eq!(m.n_tensors() as usize, q.tensors.len() - fused.len());
            sizes.push(l.weight_bytes().0);
        }
        // Fewer bits, fewer bytes (W2 < W3 < W4 < W8).
        assert!(
            sizes[0] < sizes[1] && sizes[1] < sizes[2] && sizes[2] < sizes[3],
            "{sizes:?}"
        );
    }
}

#[test]
fn memory_plan_is_valid_and_reuses() {
    for name in FIXTURES {
        let (q, l) = quantize(&graph(name), 4, 8);
        let ts = plan_tensors(&q);
        let p = plan::plan(&ts).unwrap();
        plan::check(&ts, &p).unwrap();
        assert!(l.arena_size >= l.arena_lower_bound, "{name}");
        assert!(
            l.arena_size < l.arena_no_reuse,
            "{name}: arena {} not below the sum of all tensors {}",
            l.arena_size,
            l.arena_no_reuse
        );
        // The runtime's own loader agrees that no live tensor is overwritten.
        Model::from_bytes(&l.blob).unwrap();
    }
}

#[test]
fn lowering_is_deterministic() {
    let g = graph("mobilenet_fmnist");
    let (q1, l1) = quantize(&g, 3, 8);
    let (q2, l2) = quantize(&g, 3, 8);
    assert_eq!(q1, q2);
    assert_eq!(l1.blob, l2.blob);
    assert_eq!(lower(&q1).unwrap().blob, l1.blob);
}

#[test]
fn runtime_tracks_the_float_reference_at_8_bits() {
    let (x, _) = fashion_test(64);
    for name in FIXTURES {
        let g = graph(name);
        let (_, l) = quantize(&g, 8, 8);
        let yq = run_runtime(&l.blob, &x, 10);
        let yf = run_float(&g, &x, 10);
        let scale = yf.iter().fold(0f32, |a, v| a.max(v.abs()));
        let err = yq
            .iter()
            .zip(&yf)
            .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
        let agree = yq
            .chunks(10)
            .zip(yf.chunks(10))
            .filter(|(a, b)| argmax(a) == argmax(b))
            .count();
        eprintln!("{name} W8A8: max |Δlogit| {err:.3} of {scale:.2}, top-1 agreement {agree}/64");
        assert!(err < 0.15 * scale, "{name}: {err} vs {scale}");
        assert!(agree >= 60, "{name}: {agree}/64");
    }
}

#[test]
fn bn_after_no_layer_is_an_error_naming_it() {
    let v = |name: &str| Value {
        name: name.into(),
        shape: vec![1, 2, 4, 4],
    };
    let g = Graph {
        values: vec![v("x"), v("y")],
        nodes: vec![Node {
            name: "lonely_bn".into(),
            op: Op::BatchNorm(BatchNorm {
                mean: vec![0.0; 2],
                var: vec![1.0; 2],
                scale: vec![1.0; 2],
                bias: vec![0.0; 2],
                eps: 1e-5,
            }),
            inputs: vec![0],
            output: 1,
        }],
        inputs: vec![0],
        outputs: vec![1],
        opset: 13,
    };
    let e = rtn::quantize(&g, &RtnOptions::default()).unwrap_err();
    assert!(e.to_string().contains("lonely_bn"), "{e}");
}

fn write_npy(path: &Path, shape: &[usize], data: &[f32]) {
    std::fs::write(path, npy::to_bytes(shape, data).unwrap()).unwrap();
}

#[test]
fn diffdfq_run_rejects_bad_blobs_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let (_, l) = quantize(&graph("mobilenet_fmnist"), 4, 8);
    let good = dir.path().join("m.dfq");
    std::fs::write(&good, &l.blob).unwrap();
    let mut bad = l.blob.clone();
    bad[100] ^= 1;
    let corrupt = dir.path().join("bad.dfq");
    std::fs::write(&corrupt, &bad).unwrap();
    let x = dir.path().join("x.npy");
    write_npy(&x, &[2, 1, 28, 28], &vec![0.1; 2 * 784]);
    let wrong = dir.path().join("wrong.npy");
    write_npy(&wrong, &[2, 1, 27, 28], &vec![0.1; 2 * 756]);
    let y = dir.path().join("y.npy");
    let run = |m: &Path, i: &Path| {
        Command::new(env!("CARGO_BIN_EXE_diffdfq-run"))
            .arg(m)
            .arg("--input")
            .arg(i)
            .arg("--output")
            .arg(&y)
            .output()
            .unwrap()
    };
    let ok = run(&good, &x);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let (shape, out) = npy::read_f32(&y).unwrap();
    assert_eq!(shape, vec![2, 10]);
    assert_eq!(out, run_runtime(&l.blob, &vec![0.1; 2 * 784], 10));
    for (m, i, needle) in [(&corrupt, &x, "bad.dfq"), (&good, &wrong, "m.dfq")] {
        let o = run(m, i);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err}");
    }
}

/// The accuracy check on real data: rtn at W8A8 through `diffdfq-run NAME.dfq` on all 10k
/// Fashion-MNIST test images stays within 1 pt of FP32.
#[test]
fn fashion_mnist_top1_w8a8_through_diffdfq_run() {
    if !Path::new(DATA).exists() {
        panic!("{DATA} missing: apt-get install dataset-fashion-mnist");
    }
    let name = "mobilenet_fmnist";
    let (_, l) = quantize(&graph(name), 8, 8);
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join(format!("{name}.dfq"));
    std::fs::write(&m, &l.blob).unwrap();
    let (x, labels) = fashion_test(10_000);
    let xp = dir.path().join("x.npy");
    write_npy(&xp, &[10_000, 1, 28, 28], &x);
    let yp = dir.path().join("y.npy");
    let o = Command::new(env!("CARGO_BIN_EXE_diffdfq-run"))
        .arg(&m)
        .arg("--input")
        .arg(&xp)
        .arg("--output")
        .arg(&yp)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (shape, y) = npy::read_f32(&yp).unwrap();
    assert_eq!(shape, vec![10_000, 10]);
    let correct = y
        .chunks(10)
        .zip(&labels)
        .filter(|(r, &t)| argmax(r) == t as usize)
        .count();
    let top1 = correct as f64 / 10_000.0;
    let fp32 = fp32_top1(name);
    eprintln!("{name} W8A8 rtn top-1 {top1:.4} (FP32 {fp32:.4})");
    assert!(top1 > fp32 - 0.01, "{top1} vs FP32 {fp32}");
}
