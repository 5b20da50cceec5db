//! tract's FP32 latency on the ONNX model itself, batch 1, one thread (tract's default): the
//! median over the samples of an `.npy` of one optimized-plan run each, after three warm-up
//! runs — the tract row of `scripts/bench`.
//!
//!     cargo run --release -p diffdfq-compiler --example tract_speed MODEL.onnx INPUTS.npy

use std::path::Path;
use std::time::Instant;

use tract_onnx::prelude::*;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 3 {
        eprintln!("usage: tract_speed MODEL.onnx INPUTS.npy");
        std::process::exit(2);
    }
    let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
        eprintln!("tract_speed: {what}: {e}");
        std::process::exit(1)
    };
    let (shape, x) =
        diffdfq_compiler::npy::read_f32(Path::new(&a[2])).unwrap_or_else(|e| fail(&a[2], &e));
    let mut one = shape.clone();
    if one.is_empty() {
        fail(&a[2], &"a batch of samples has at least one axis");
    }
    one[0] = 1;
    let per: usize = one.iter().product();
    let plan = tract_onnx::onnx()
        .model_for_path(&a[1])
        .and_then(|m| m.with_input_fact(0, f32::fact(&one).into()))
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .unwrap_or_else(|e| fail(&a[1], &e));
    let sample = |i: usize| -> TValue {
        Tensor::from_shape(&one, &x[i * per..(i + 1) * per])
            .unwrap_or_else(|e| fail(&a[2], &e))
            .into_tvalue()
    };
    let n = x.len() / per;
    for i in 0..n.min(3) {
        plan.run(tvec!(sample(i)))
            .unwrap_or_else(|e| fail(&a[1], &e));
    }
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let input = tvec!(sample(i));
        let t0 = Instant::now();
        plan.run(input).unwrap_or_else(|e| fail(&a[1], &e));
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    match times.get(times.len() / 2) {
        Some(t) => println!("{:.2}", 1000.0 * t),
        None => fail(&a[2], &"no samples"),
    }
}
