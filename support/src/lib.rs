//! Fixture, dataset and runtime helpers shared by the compiler's tests and examples: the
//! fixture models, the Fashion-MNIST test set (Debian package `dataset-fashion-mnist`), rtn
//! quantization and runs of the integer runtime. A crate of its own so that examples use it
//! as a dependency, not by path.

use std::io::Read;
use std::path::{Path, PathBuf};

use diffdfq_compiler::graph::Graph;
use diffdfq_compiler::import::{import_path, ImportOptions};
use diffdfq_compiler::lower::{lower, Lowered};
use diffdfq_compiler::quant::rtn::{self, RtnOptions};
use diffdfq_compiler::quant::{Bits, QuantGraph};
use diffdfq_runtime::Model;

pub const FIXTURES: &[&str] = &["resnet_fmnist", "mobilenet_fmnist"];
pub const DATA: &str = "/usr/share/datasets/fashion-mnist";

pub fn model_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/models/{name}.onnx"))
}

pub fn graph(name: &str) -> Graph {
    import_path(&model_path(name), &ImportOptions::default()).unwrap()
}

pub fn fp32_top1(name: &str) -> f64 {
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

pub fn quantize(g: &Graph, w: u8, a: u8) -> (QuantGraph, Lowered) {
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

pub fn gunzip(path: &str) -> Vec<u8> {
    let mut v = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut v)
        .unwrap();
    v
}

/// The first `n` test images, normalized as the fixtures were trained, and their labels.
pub fn fashion_test(n: usize) -> (Vec<f32>, Vec<u8>) {
    let lab = gunzip(&format!("{DATA}/t10k-labels-idx1-ubyte.gz"));
    assert_eq!(&lab[..4], &[0, 0, 8, 1]);
    (fashion_images("t10k", n), lab[8..8 + n].to_vec())
}

/// The first `n` images of split `t10k` or `train`, normalized as the fixtures were trained.
pub fn fashion_images(split: &str, n: usize) -> Vec<f32> {
    let img = gunzip(&format!("{DATA}/{split}-images-idx3-ubyte.gz"));
    assert_eq!(&img[..4], &[0, 0, 8, 3]);
    img[16..16 + n * 784]
        .iter()
        .map(|&p| (p as f32 / 255.0 - 0.2860) / 0.3530)
        .collect()
}

pub use diffdfq_compiler::host::argmax;

/// Runs the integer runtime on every sample of `x`, on all cores (one arena per thread).
pub fn run_runtime(blob: &[u8], x: &[f32], per_out: usize) -> Vec<f32> {
    let m = Model::from_bytes(blob).unwrap();
    assert_eq!(m.output().numel as usize, per_out);
    diffdfq_compiler::host::run_batch(&m, x).unwrap()
}

/// Top-1 classes of the fake-quantized candle model (calibration's view of `q`) on `x`.
pub fn fake_quant_classes(q: &QuantGraph, x: &[f32]) -> Vec<usize> {
    use candle_core::{Device, Tensor};
    use diffdfq_compiler::quant::qmodel::{Mode, QModel};
    let m = QModel::new(q.clone(), &Device::Cpu).unwrap();
    let mut out = Vec::new();
    for chunk in x.chunks(784 * 500) {
        let xt =
            Tensor::from_vec(chunk.to_vec(), (chunk.len() / 784, 1, 28, 28), &Device::Cpu).unwrap();
        let y = m
            .forward(&xt, Mode::Quant)
            .unwrap()
            .flatten_from(1)
            .unwrap();
        out.extend(y.to_vec2::<f32>().unwrap().iter().map(|r| argmax(r)));
    }
    out
}
