//! Quantization (rtn) and lowering of the fixtures: blobs at every bit width, the memory plan,
//! determinism, integer runtime vs the float reference, and top-1 on the real Fashion-MNIST
//! test set through `diffdfq-run NAME.dfq`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use diffdfq_compiler::calib::FloatModel;
use diffdfq_compiler::graph::{BatchNorm, Graph, Node, Op, Value};
use diffdfq_compiler::import::{import_path, ImportOptions};
use diffdfq_compiler::lower::{lower, plan, plan_tensors, Lowered};
use diffdfq_compiler::npy;
use diffdfq_compiler::quant::rtn::{self, RtnOptions};
use diffdfq_compiler::quant::{Bits, QuantGraph};
use diffdfq_runtime::Model;

const FIXTURES: &[&str] = &["resnet_fmnist", "mobilenet_fmnist"];
const DATA: &str = "/usr/share/datasets/fashion-mnist";

fn model_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/models/{name}.onnx"))
}

fn graph(name: &str) -> Graph {
    import_path(&model_path(name), &ImportOptions::default()).unwrap()
}

fn fp32_top1(name: &str) -> f64 {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models/fixtures.json");
    let j = std::fs::read_to_string(p).unwrap();
    // {"name": {... "fp32_test_top1": 0.887, ...}}: a tiny scan instead of a JSON dependency.
    let at = j.find(&format!("\"{name}\"")).unwrap();
    let rest = &j[at..];
    let k = rest.find("\"fp32_test_top1\":").unwrap() + "\"fp32_test_top1\":".len();
    let v: String = rest[k..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    v.parse().unwrap()
}

fn quantize(g: &Graph, w: u8, a: u8) -> (QuantGraph, Lowered) {
    let opts = RtnOptions {
        bits: Bits {
            weight: w,
            act: a,
            first_last: 8,
        },
        ..Default::default()
    };
    let q = rtn::quantize(g, &opts).unwrap();
    let l = lower(&q).unwrap();
    (q, l)
}

fn gunzip(path: &str) -> Vec<u8> {
    let mut v = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut v)
        .unwrap();
    v
}

/// The first `n` test images, normalized as the fixtures were trained, and their labels.
fn fashion_test(n: usize) -> (Vec<f32>, Vec<u8>) {
    let img = gunzip(&format!("{DATA}/t10k-images-idx3-ubyte.gz"));
    let lab = gunzip(&format!("{DATA}/t10k-labels-idx1-ubyte.gz"));
    assert_eq!(&img[..4], &[0, 0, 8, 3]);
    assert_eq!(&lab[..4], &[0, 0, 8, 1]);
    let x = img[16..16 + n * 784]
        .iter()
        .map(|&p| (p as f32 / 255.0 - 0.2860) / 0.3530)
        .collect();
    (x, lab[8..8 + n].to_vec())
}

fn run_runtime(blob: &[u8], x: &[f32], per_out: usize) -> Vec<f32> {
    let m = Model::from_bytes(blob).unwrap();
    let mut buf = vec![0u8; m.arena_size() + 16];
    let at = buf.as_ptr().align_offset(16);
    let arena = &mut buf[at..at + m.arena_size()];
    let per_in = m.input().numel as usize;
    let mut out = vec![0f32; x.len() / per_in * per_out];
    for (xi, yi) in x.chunks_exact(per_in).zip(out.chunks_exact_mut(per_out)) {
        diffdfq_runtime::run(&m, xi, yi, arena).unwrap();
    }
    out
}

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

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &x)| if x > b.1 { (i, x) } else { b },
        )
        .0
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

/// The measurement table (run with `--ignored --nocapture`): weight bytes vs FP32, arena vs
/// its lower bound and rtn top-1 on the 10k test set, per fixture and bit width.
#[test]
#[ignore]
fn measure_table() {
    let n: usize = std::env::var("DFQ_MEASURE_N").map_or(10_000, |v| v.parse().unwrap());
    let (x, labels) = fashion_test(n);
    println!(
        "| model | W/A | weight bytes (FP32) | arena (lower bound, no reuse) | top-1 rtn (FP32) |"
    );
    for name in FIXTURES {
        let g = graph(name);
        for (w, a) in [(2, 8), (3, 8), (4, 8), (8, 8), (4, 4)] {
            let (_, l) = quantize(&g, w, a);
            if let Ok(dir) = std::env::var("DFQ_OUT") {
                std::fs::write(format!("{dir}/{name}_w{w}a{a}.dfq"), &l.blob).unwrap();
            }
            let t = std::time::Instant::now();
            let y = run_runtime(&l.blob, &x, 10);
            eprintln!("{name} W{w}A{a}: {:.1} s", t.elapsed().as_secs_f64());
            let c = y
                .chunks(10)
                .zip(&labels)
                .filter(|(r, &t)| argmax(r) == t as usize)
                .count();
            let (wb, fb) = l.weight_bytes();
            println!(
                "| {name} | W{w}A{a} | {wb} ({fb}, {:.1}x) | {} ({}, {}) | {:.4} ({:.4}) |",
                fb as f64 / wb as f64,
                l.arena_size,
                l.arena_lower_bound,
                l.arena_no_reuse,
                c as f64 / n as f64,
                fp32_top1(name)
            );
        }
    }
}
