//! Latency of the integer runtime on one core, batch 1: the median over the samples of an
//! `.npy` of one `diffdfq_runtime::run` call each (the model is validated once, as a device
//! that keeps it in flash would; the arena is allocated once), with the kernels of the host
//! build (no `--cpu`); on stderr, what validating on every call costs. `scripts/bench` times
//! `libNAME.a` itself instead, through a C driver.
//!
//!     cargo run --release -p diffdfq-compiler --example runtime_speed MODEL.dfq INPUTS.npy

use std::path::Path;
use std::time::Instant;

use diffdfq_runtime::Model;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 3 {
        eprintln!("usage: runtime_speed MODEL.dfq INPUTS.npy");
        std::process::exit(2);
    }
    let blob = std::fs::read(&a[1]).unwrap_or_else(|e| {
        eprintln!("runtime_speed: {}: {e}", a[1]);
        std::process::exit(2)
    });
    let model = Model::from_bytes(&blob).unwrap_or_else(|e| {
        eprintln!("runtime_speed: {}: not a valid .dfq model: {e}", a[1]);
        std::process::exit(2)
    });
    let (shape, x) = diffdfq_compiler::npy::read_f32(Path::new(&a[2])).unwrap_or_else(|e| {
        eprintln!("runtime_speed: {}: {e}", a[2]);
        std::process::exit(2)
    });
    let per_in: usize = model.input().shape().iter().map(|&d| d as usize).product();
    let per_out: usize = model.output().shape().iter().map(|&d| d as usize).product();
    if shape.iter().skip(1).product::<usize>() != per_in {
        eprintln!(
            "runtime_speed: {}: samples of shape {shape:?} do not fit the model's input",
            a[2]
        );
        std::process::exit(2);
    }
    let mut arena = diffdfq_compiler::host::Arena::for_model(&model);
    let arena = arena.bytes();
    let mut y = vec![0f32; per_out];
    let mut times = Vec::new();
    for xs in x.chunks_exact(per_in) {
        let t0 = Instant::now();
        diffdfq_runtime::run(&model, xs, &mut y, arena).unwrap_or_else(|e| {
            eprintln!("runtime_speed: {}: {e}", a[1]);
            std::process::exit(1)
        });
        times.push(t0.elapsed().as_secs_f64());
    }
    println!("{:.2}", 1000.0 * median(times));
    // What validating on every call (`dfq_run_f32`) costs against validating once
    // (`dfq_prepare` + `dfq_run_prepared`, which skips only the checksum): on stderr, so that
    // scripts/bench reads the latency alone.
    let time = |f: &dyn Fn() -> bool| {
        median(
            (0..21)
                .map(|_| {
                    let t0 = Instant::now();
                    assert!(f());
                    t0.elapsed().as_secs_f64()
                })
                .collect(),
        )
    };
    let full = time(&|| Model::from_bytes(&blob).is_ok());
    let checksum = model.header().checksum;
    let prepared = time(&|| Model::from_verified_bytes(&blob, checksum).is_ok());
    eprintln!(
        "validation per call: {:.3} ms (dfq_run_f32), {:.3} ms (dfq_run_prepared), blob {} B",
        1000.0 * full,
        1000.0 * prepared,
        blob.len()
    );
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times.get(times.len() / 2).copied().unwrap_or(f64::NAN)
}
