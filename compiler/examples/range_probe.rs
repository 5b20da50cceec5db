//! Where rtn's 8-bit error comes from on a real model: prints each tensor's rtn activation range
//! next to the range real inputs reach, then the fake-quant top-1 agreement with FP32 on them.
//!
//!   cargo run --release -p diffdfq-compiler --example range_probe MODEL.onnx INPUTS.npy [MODE]
//!
//! MODE: `full` (default: rtn as the CLI compiles it), `act` (float weights, quantized
//! activations), `weight` (quantized weights, float activations), `oracle` (activation ranges
//! from INPUTS themselves, clipped at the quantile in the `PCT` environment variable, default
//! 1.0), `mse` (each tensor's min–max range on INPUTS shrunk by the factor that quantizes
//! them with the least squared error: the best per-tensor ranges these inputs allow). `W`
//! sets the weight bits (default 8); `NO_BC=1` turns bias correction off (`act` runs without
//! it); `RANGE=LO,HI` is `--input-range`; `ONLY=i` quantizes node `i`'s weights
//! alone (`weight` mode); `ACT_ONLY=t` quantizes tensor `t` alone (`act` mode);
//! `LP=1` takes the weights' steps from the Lp(2.4) clipping search calibration starts from
//! instead of rtn's min–max; `FLOAT_T=t1,t2,…` leaves those tensors unquantized (any mode):
//! the most that wider codes on them could buy.
use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use diffdfq_compiler::host::argmax;
use diffdfq_compiler::import::{import_path, ImportOptions};
use diffdfq_compiler::quant::qmodel::{fake_quant, Mode, Overrides, QModel};
use diffdfq_compiler::quant::rtn::{self, RtnOptions};
use diffdfq_compiler::quant::{ActQuant, Bits, QOp};
use diffdfq_compiler::reference::FloatModel;

fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 3 {
        eprintln!("usage: range_probe MODEL.onnx INPUTS.npy [full|act|weight|oracle|mse]");
        std::process::exit(2);
    }
    let g = import_path(Path::new(&a[1]), &ImportOptions::default()).unwrap();
    let (shape, x) = diffdfq_compiler::npy::read_f32(Path::new(&a[2])).unwrap();
    let mode = a.get(3).map_or("full", |s| s.as_str());
    let lp = std::env::var("LP");
    let opts = RtnOptions {
        bits: Bits {
            weight: env("W", 8),
            act: 8,
            first_last: 8,
        },
        // Corrected biases belong to quantized weights (made after the Lp search with `LP=1`).
        bias_correction: mode != "act" && std::env::var("NO_BC").is_err() && lp.is_err(),
        input_range: std::env::var("RANGE").ok().map(|v| {
            let (lo, hi) = v.split_once(',').expect("RANGE=LO,HI");
            (lo.parse().unwrap(), hi.parse().unwrap())
        }),
        ..Default::default()
    };
    let mut q = rtn::quantize(&g, &opts).unwrap();
    if lp.is_ok() {
        for n in &mut q.nodes {
            if let Some(l) = n.op.layer_mut() {
                l.quantize_lp();
            }
        }
        if mode != "act" && std::env::var("NO_BC").is_err() {
            rtn::correct_biases(&mut q).unwrap();
        }
    }
    let dev = Device::Cpu;
    let n = shape[0];
    let xt = Tensor::from_vec(x, shape.as_slice(), &dev).unwrap();
    let chunk = 25;
    let batches = || {
        (0..n)
            .step_by(chunk)
            .map(|s| xt.narrow(0, s, chunk.min(n - s)).unwrap())
    };

    // Every stored tensor's float values on the inputs: min–max and a strided sample.
    let mut tap = g.clone();
    tap.outputs = q.tensors.iter().map(|t| t.source).collect();
    let fm = FloatModel::new(&tap, &dev).unwrap();
    let k = q.tensors.len();
    let (mut lo, mut hi) = (vec![f32::INFINITY; k], vec![f32::NEG_INFINITY; k]);
    let mut sample: Vec<Vec<f32>> = vec![Vec::new(); k];
    // The per-channel factors `fold`'s equalization put on a tensor, which the source graph's
    // values lack.
    let gains: Vec<Option<Tensor>> = (0..k)
        .map(|t| {
            let st = q.producer(t).and_then(|i| q.nodes[i].bn.as_ref())?;
            (!st.gain.is_empty())
                .then(|| Tensor::from_vec(st.gain.clone(), (1, st.gain.len(), 1, 1), &dev).unwrap())
        })
        .collect();
    for xs in batches() {
        for (t, y) in fm.forward(&[xs]).unwrap().into_iter().enumerate() {
            let y = match &gains[t] {
                Some(gn) => y.broadcast_mul(gn).unwrap(),
                None => y,
            };
            let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for &e in &v {
                lo[t] = lo[t].min(e);
                hi[t] = hi[t].max(e);
            }
            sample[t].extend(v.iter().step_by(7));
        }
    }
    let pct: f64 = env("PCT", 1.0);
    for t in 0..k {
        let (rl, rh) = q.tensors[t].quant.range();
        let producer = q.producer(t).map_or("input", |i| q.nodes[i].op.name());
        let v = &mut sample[t];
        v.sort_by(f32::total_cmp);
        let at = |f: f64| v[((v.len() - 1) as f64 * f) as usize];
        let (mut pl, mut ph) = (at(1.0 - pct), at(pct));
        if mode == "mse" {
            // The min–max range shrunk by whichever of 81 factors quantizes these values
            // with the least squared error.
            let bits = q.tensors[t].quant.bits;
            let few: Vec<f32> = v.iter().step_by(v.len() / 200_000 + 1).copied().collect();
            let few = Tensor::new(few.as_slice(), &dev).unwrap();
            let err = |f: f32| -> f32 {
                let a = ActQuant::from_range(lo[t] * f, hi[t] * f, bits);
                let e = (fake_quant(&few, &a, None).unwrap() - &few).unwrap();
                e.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap()
            };
            let best = (0..=80)
                .map(|i| 1.0 - i as f32 / 100.0)
                .map(|f| (err(f), f))
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .map_or(1.0, |(_, f)| f);
            (pl, ph) = (lo[t] * best, hi[t] * best);
        }
        println!(
            "{t:3} {producer:14} {:40} rtn [{rl:8.2}, {rh:8.2}] inputs [{:8.2}, {:8.2}] quantile [{pl:8.2}, {ph:8.2}]",
            q.tensors[t].name, lo[t], hi[t]
        );
        if (mode == "oracle" || mode == "mse") && !q.tensors[t].is_f32 {
            q.tensors[t].quant = match q.producer(t).map(|i| &q.nodes[i]) {
                // Pass-through ops keep their input's codes.
                Some(nd) if matches!(nd.op, QOp::MaxPool { .. } | QOp::Reshape) => {
                    q.tensors[nd.inputs[0]].quant
                }
                _ => ActQuant::from_range(pl, ph, q.tensors[t].quant.bits),
            };
        }
    }
    // `ACT_ONLY=t` (`act` mode): tensor `t` alone keeps its codes, every other stays float.
    if let Some(only) = std::env::var("ACT_ONLY")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        for (t, tq) in q.tensors.iter_mut().enumerate() {
            tq.is_f32 |= t != only;
        }
    }
    if let Ok(v) = std::env::var("FLOAT_T") {
        for t in v.split(',').filter_map(|s| s.parse::<usize>().ok()) {
            let Some(tq) = q.tensors.get_mut(t) else {
                eprintln!("FLOAT_T: no tensor {t} (the model has {})", k);
                std::process::exit(2);
            };
            tq.is_f32 = true;
        }
    }
    q.fit_accumulators();

    let fp = FloatModel::new(&g, &dev).unwrap();
    let qm = QModel::new(q.clone(), &dev).unwrap();
    // `act`: float weights in quantized mode; `weight`: dequantized weights in float mode.
    let weights: HashMap<usize, Tensor> = (0..q.nodes.len())
        .filter_map(|i| {
            let l = q.nodes[i].op.layer()?;
            let f = qm.float_weight(i)?.clone();
            Some((
                i,
                match mode {
                    "act" => f,
                    // `ONLY=i`: node i alone gets quantized weights.
                    "weight" if env("ONLY", i) != i => f,
                    _ => Tensor::from_vec(l.dequantized(), f.dims(), &dev).unwrap(),
                },
            ))
        })
        .collect();
    let forward = |xs: &Tensor| -> Tensor {
        let m = match mode {
            "weight" => Mode::Float,
            "act" => Mode::Quant,
            _ => return qm.forward(xs, Mode::Quant).unwrap(),
        };
        let mut vals = vec![None; q.tensors.len()];
        vals[q.input] = Some(qm.input(xs, m).unwrap());
        let mut ov = Overrides {
            weights: weights.clone(),
            ..Default::default()
        };
        qm.run(0..q.nodes.len(), &mut vals, m, &mut ov, None)
            .unwrap();
        vals[q.output].take().unwrap()
    };
    let rows = |y: Tensor| y.flatten_from(1).unwrap().to_vec2::<f32>().unwrap();
    let (mut agree, mut se, mut count) = (0, 0f64, 0usize);
    for xs in batches() {
        let yf = rows(fp.forward(std::slice::from_ref(&xs)).unwrap().remove(0));
        let yq = rows(forward(&xs));
        for (a, b) in yf.iter().zip(&yq) {
            agree += usize::from(argmax(a) == argmax(b));
            se += a
                .iter()
                .zip(b)
                .map(|(x, y)| f64::from(x - y).powi(2))
                .sum::<f64>();
            count += a.len();
        }
    }
    let rmse = (se / count.max(1) as f64).sqrt();
    println!("{mode}: fake-quant top-1 agreement with FP32 {agree}/{n}, output RMSE {rmse:.4}");
}
