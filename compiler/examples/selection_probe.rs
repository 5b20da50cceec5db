//! Inputs for judging the held-out selection of a calibrated compile (README "Calibration",
//! step 4): writes the held-out synthetic samples the CLI would compare candidates on, and
//! Gaussian noise inputs of the same count, as `.npy`, so that each candidate's `.dfq` and
//! the FP32 model can be run on them with `diffdfq-run` and the proxies set against the
//! agreement on real inputs.
//!
//!   cargo run --release -p diffdfq-compiler --example selection_probe MODEL.onnx OUT_DIR [SEED]
//!
//! `RANGE=LO,HI` is `--input-range`; `SAMPLES=N ITERS=M` replace the CLI's sizing of the held-out
//! synthesis.
use std::path::Path;

use diffdfq_compiler::calib::budget::ModelSize;
use diffdfq_compiler::evaluate::{self, EvalOptions};
use diffdfq_compiler::import::{import_path, ImportOptions};
use diffdfq_compiler::npy;
use diffdfq_compiler::rng::Rng;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 3 {
        eprintln!("usage: selection_probe MODEL.onnx OUT_DIR [SEED]");
        std::process::exit(2);
    }
    let g = import_path(Path::new(&a[1]), &ImportOptions::default()).unwrap();
    let out = Path::new(&a[2]);
    std::fs::create_dir_all(out).unwrap();
    let seed = a.get(3).map_or(0, |s| s.parse().unwrap());
    let input_range = std::env::var("RANGE").ok().map(|v| {
        let (lo, hi) = v.split_once(',').expect("RANGE=LO,HI");
        (lo.parse().unwrap(), hi.parse().unwrap())
    });
    let macs: Vec<u64> = g.nodes.iter().map(|n| g.macs(n)).collect();
    let size = ModelSize {
        macs: macs.iter().sum(),
        layers: macs.iter().filter(|&&m| m > 0).count(),
    };
    let (samples, synth_iters) = evaluate::plan(&size);
    // `SAMPLES=N ITERS=M` override the CLI's sizing: how the proxy ranks with richer samples.
    let env = |k: &str, d: usize| std::env::var(k).map_or(d, |v| v.parse().expect(k));
    let (samples, synth_iters) = (env("SAMPLES", samples), env("ITERS", synth_iters));
    let opts = EvalOptions {
        samples,
        synth_iters,
        seed,
        input_range,
    };
    let mut shape = g.shape(g.inputs[0]).to_vec();
    shape[0] = samples;
    let held = evaluate::held_out_samples(&g, &opts).unwrap();
    let write = |name: &str, data: &[f32]| {
        let bytes = npy::to_bytes(&shape, data).unwrap();
        npy::write_atomic(&out.join(name), &bytes).unwrap();
    };
    write("held_out.npy", &held.samples);
    let mut noise = Rng::unmixed(seed ^ 0x5E1E).normals(held.samples.len());
    if let Some((lo, hi)) = input_range {
        noise.iter_mut().for_each(|v| *v = v.clamp(lo, hi));
    }
    write("gaussian.npy", &noise);
    println!(
        "{} held-out samples ({}, {synth_iters} synthesis iterations) and as many Gaussian inputs in {}",
        samples,
        held.source,
        out.display()
    );
}
