//! The float reference on the fixture CNNs: against tract's FP32 execution, against the
//! onnxruntime outputs saved beside each fixture, BN taps, and gradients w.r.t. the input.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use diffdfq_compiler::graph::Op;
use diffdfq_compiler::import::{import_path, ImportOptions};
use diffdfq_compiler::npy;
use diffdfq_compiler::reference::FloatModel;
use tract_onnx::prelude::*;

const FIXTURES: &[&str] = &["resnet_fmnist", "mobilenet_fmnist"];

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/models")
}

fn sample(name: &str) -> (Vec<usize>, Vec<f32>) {
    npy::read_f32(&models().join(format!("{name}.sample.npy"))).unwrap()
}

fn candle_forward(name: &str, shape: &[usize], data: &[f32]) -> Vec<f32> {
    let opts = ImportOptions {
        input_shape: Some(shape.to_vec()),
        ..Default::default()
    };
    let g = import_path(&models().join(format!("{name}.onnx")), &opts).unwrap();
    let m = FloatModel::new(&g, &Device::Cpu).unwrap();
    let x = Tensor::from_vec(data.to_vec(), shape, &Device::Cpu).unwrap();
    m.forward(&[x]).unwrap()[0]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn tract_forward(name: &str, shape: &[usize], data: &[f32]) -> Vec<f32> {
    let plan = tract_onnx::onnx()
        .model_for_path(models().join(format!("{name}.onnx")))
        .unwrap()
        .with_input_fact(0, f32::fact(shape).into())
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let x = tract_ndarray::ArrayD::from_shape_vec(shape, data.to_vec()).unwrap();
    let out = plan
        .run(tvec!(tract_onnx::prelude::Tensor::from(x).into()))
        .unwrap();
    out[0]
        .to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

/// max |a − b| relative to max |b|.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn float_reference_matches_tract_and_onnxruntime() {
    for name in FIXTURES {
        let (shape, data) = sample(name);
        let ours = candle_forward(name, &shape, &data);
        let tract = tract_forward(name, &shape, &data);
        let (ort_shape, ort) = npy::read_f32(&models().join(format!("{name}.ort.npy"))).unwrap();
        assert_eq!(ort_shape[0], shape[0]);
        let (et, eo) = (rel_err(&ours, &tract), rel_err(&ours, &ort));
        println!("{name}: max |diff| / max |out|: vs tract {et:.2e}, vs onnxruntime {eo:.2e}");
        assert!(et <= 1e-4, "{name}: vs tract {et}");
        assert!(eo <= 1e-4, "{name}: vs onnxruntime {eo}");
    }
}

#[test]
fn bn_taps_report_input_statistics_of_every_batchnorm() {
    for name in FIXTURES {
        let opts = ImportOptions {
            batch: Some(4),
            ..Default::default()
        };
        let g = import_path(&models().join(format!("{name}.onnx")), &opts).unwrap();
        let m = FloatModel::new(&g, &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1f32, g.shape(g.inputs[0]), &Device::Cpu).unwrap();
        let f = m.forward_with_bn(std::slice::from_ref(&x)).unwrap();
        let bns: Vec<_> = g.batchnorms().collect();
        assert!(bns.len() >= 5, "{name}: only {} BN layers kept", bns.len());
        assert_eq!(f.bn.len(), bns.len());
        // The first BN's input statistics, recomputed by hand from the stem conv's output.
        let first = &f.bn[0];
        let (i, node, bn) = bns[0];
        assert_eq!(first.node, i);
        assert_eq!(first.mean.dims(), &[bn.mean.len()]);
        let src = g
            .nodes
            .iter()
            .position(|n| n.output == node.inputs[0])
            .unwrap();
        assert!(matches!(g.nodes[src].op, Op::Conv(_)));
        let mut sub = g.clone();
        sub.outputs = vec![node.inputs[0]];
        sub.prune();
        let pre = FloatModel::new(&sub, &Device::Cpu)
            .unwrap()
            .forward(&[x])
            .unwrap()
            .remove(0);
        let pre = pre
            .permute((1, 0, 2, 3))
            .unwrap()
            .flatten_from(1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let mean: Vec<f32> = first.mean.to_vec1().unwrap();
        let var: Vec<f32> = first.var.to_vec1().unwrap();
        for c in 0..pre.len() {
            let n = pre[c].len() as f64;
            let mu = pre[c].iter().map(|&v| v as f64).sum::<f64>() / n;
            let s2 = pre[c].iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / n;
            assert!(
                (mean[c] as f64 - mu).abs() < 1e-4 * (1.0 + mu.abs()),
                "{name} ch {c}: mean {} vs {mu}",
                mean[c]
            );
            assert!(
                (var[c] as f64 - s2).abs() < 1e-3 * (1.0 + s2),
                "{name} ch {c}: biased var {} vs {s2}",
                var[c]
            );
        }
    }
}

#[test]
fn gradient_with_respect_to_the_input_matches_finite_differences() {
    for name in FIXTURES {
        let g = import_path(
            &models().join(format!("{name}.onnx")),
            &ImportOptions::default(),
        )
        .unwrap();
        let m = FloatModel::new(&g, &Device::Cpu).unwrap();
        let (shape, data) = sample(name);
        let data = data[..shape[1..].iter().product::<usize>()].to_vec();
        let shape = g.shape(g.inputs[0]).to_vec();
        // A BNS-like loss: squared BN means and variances plus one logit.
        let loss = |x: &Tensor| -> Tensor {
            let f = m.forward_with_bn(std::slice::from_ref(x)).unwrap();
            let mut l = f.outputs[0].narrow(1, 3, 1).unwrap().sum_all().unwrap();
            for s in &f.bn {
                l = (l + s.mean.sqr().unwrap().mean_all().unwrap() + s.var.mean_all().unwrap())
                    .unwrap();
            }
            l
        };
        let x = Var::from_vec(data.clone(), shape.as_slice(), &Device::Cpu).unwrap();
        let grads = loss(x.as_tensor()).backward().unwrap();
        let gx: Vec<f32> = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(gx.iter().all(|v| v.is_finite()));
        assert!(gx.iter().any(|&v| v != 0.0));
        let eps = 1e-2f32;
        for &i in &[100usize, 400, 601] {
            let f = |d: f32| {
                let mut v = data.clone();
                v[i] += d;
                let x = Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap();
                loss(&x).to_scalar::<f32>().unwrap() as f64
            };
            let num = (f(eps) - f(-eps)) / (2.0 * eps as f64);
            let ana = gx[i] as f64;
            assert!(
                (num - ana).abs() <= 0.05 * num.abs().max(ana.abs()) + 1e-3,
                "{name} pixel {i}: numeric {num}, autograd {ana}"
            );
        }
    }
}

#[test]
fn exported_shape_subgraphs_and_decomposed_activations_fold_away() {
    // mobilenet_fmnist has a symbolic batch, a Shape→Gather→Unsqueeze→Concat→Reshape chain and
    // an `x·relu6(x+3)/6` head activation.
    let g = import_path(
        &models().join("mobilenet_fmnist.onnx"),
        &ImportOptions {
            batch: Some(3),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(g.shape(g.inputs[0]), &[3, 1, 28, 28]);
    let names: Vec<&str> = g.nodes.iter().map(|n| n.op.name()).collect();
    for gone in ["Clip", "AddConst", "DivConst", "MulConst", "SubConst"] {
        assert!(!names.contains(&gone), "{gone} left in {names:?}");
    }
    assert_eq!(names.iter().filter(|&&n| n == "HardSwish").count(), 10);
    let reshape = g.nodes.iter().find(|n| n.op == Op::Reshape).unwrap();
    assert_eq!(g.shape(reshape.output), &[3, 96]);
}
