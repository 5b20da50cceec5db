//! The accuracy table: top-1 on the Fashion-MNIST test set through the integer runtime, per
//! fixture, method, bit width and seed, with compile times; plus the top-1 agreement of the
//! fake-quantized candle model with the runtime.
//!
//!   cargo run --release -p diffdfq-compiler --example calib_table -- \
//!       [--models resnet_fmnist,mobilenet_fmnist] [--methods rtn,genie,diffdfq] \
//!       [--configs 2/8,3/8,4/8,4/4] [--seeds 0,1,2] [--n 10000] \
//!       [--samples N] [--synth-iters N] [--recon-iters N] [--lr-round-x1e4 N]
//!       [--round-weight-x1000 N] [--lr-scale-x1e6 N] [--lr-bias-x1e6 N] [--act-init 0|1|2 (stats|data|best)]
//!       [--student-weight-x1e6 N] [--real-train N] [--input-range LO,HI]
//!
//! DIFFDFQ_SYNTH_CACHE=DIR keeps the synthesized samples of each (model, bits, seed, synthesis
//! settings) in DIR, so reconstruction experiments and the Genie ablation (which synthesizes
//! the same samples) skip stage 1; their `compile s` then counts reconstruction only.

use diffdfq_support::*;

use candle_core::Device;
use diffdfq_compiler::calib::{calibrate_on, CalibOptions, Progress};
use diffdfq_compiler::lower::lower;
use diffdfq_compiler::quant::{rtn, Bits};

fn list(args: &[String], flag: &str, default: &str) -> Vec<String> {
    let v = args
        .iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |s| s.as_str());
    v.split(',').map(str::to_string).collect()
}

fn main() {
    diffdfq_compiler::calib::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let models = list(&args, "--models", "resnet_fmnist,mobilenet_fmnist");
    let methods = list(&args, "--methods", "rtn,genie,diffdfq");
    let configs = list(&args, "--configs", "2/8,3/8,4/8,4/4");
    let seeds: Vec<u64> = list(&args, "--seeds", "0,1,2")
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let n: usize = list(&args, "--n", "10000")[0].parse().unwrap();
    let opt = |flag: &str| -> Option<usize> { list(&args, flag, "")[0].parse().ok() };
    let (x, labels) = fashion_test(n);
    println!(
        "| model | method | W/A | seed | top-1 runtime | FP32 | fake-quant agreement | compile s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for name in &models {
        let g = graph(name);
        let fp32 = fp32_top1(name);
        for method in &methods {
            for cfg in &configs {
                let (w, a) = cfg.split_once('/').unwrap();
                let bits = Bits {
                    weight: w.parse().unwrap(),
                    act: a.parse().unwrap(),
                    first_last: 8,
                };
                for &seed in &seeds {
                    let t = std::time::Instant::now();
                    let q = match method.as_str() {
                        "rtn" => rtn::quantize(
                            &g,
                            &rtn::RtnOptions {
                                bits,
                                seed,
                                ..Default::default()
                            },
                        )
                        .unwrap(),
                        m => {
                            let mut co = CalibOptions::new(bits, seed, m == "diffdfq");
                            if let Some(v) = opt("--samples") {
                                co.synth.samples = v;
                            }
                            if let Some(v) = opt("--synth-iters") {
                                co.synth.iters = v;
                            }
                            if let Some(v) = opt("--student-weight-x1e6") {
                                co.synth.student_weight = v as f64 / 1e6;
                            }
                            if let Some(v) = opt("--lr-round-x1e4") {
                                co.recon.lr_round = v as f64 / 1e4;
                            }
                            if let Some(v) = opt("--round-weight-x1000") {
                                co.recon.round_weight = v as f64 / 1e3;
                            }
                            if let Some(v) = opt("--lr-scale-x1e6") {
                                co.recon.lr_weight_scale = v as f64 / 1e6;
                            }
                            if let Some(v) = opt("--lr-bias-x1e6") {
                                co.recon.lr_bias = v as f64 / 1e6;
                            }
                            if let Some(v) = opt("--act-init") {
                                use diffdfq_compiler::calib::recon::ActInit;
                                co.recon.act_init =
                                    [ActInit::Stats, ActInit::Data, ActInit::Best][v.min(2)];
                            }
                            let ir = list(&args, "--input-range", "");
                            if let [lo, hi] = ir.as_slice() {
                                co.synth.input_range =
                                    Some((lo.parse().unwrap(), hi.parse().unwrap()));
                            }
                            if let Some(v) = opt("--recon-iters") {
                                co.recon.iters = v;
                            }
                            // DIFFDFQ_SYNTH_CACHE=DIR keeps synthesized samples between runs.
                            let cache = std::env::var_os("DIFFDFQ_SYNTH_CACHE").map(|d| {
                                std::path::PathBuf::from(d).join(format!(
                                    "{name}_w{w}a{a}_s{seed}_{}x{}_{}{}.f32",
                                    co.synth.samples,
                                    co.synth.iters,
                                    co.synth.student_weight,
                                    co.synth
                                        .input_range
                                        .map(|(lo, hi)| format!("_r{lo}_{hi}"))
                                        .unwrap_or_default()
                                ))
                            });
                            // --real-train N: the first N real training images instead of
                            // synthesized ones, to tell data quality from quantizer limits.
                            let real = opt("--real-train").map(|n| fashion_images("train", n));
                            let cache = if real.is_some() { None } else { cache };
                            let cached = real.or_else(|| {
                                let b = std::fs::read(cache.as_ref()?).ok()?;
                                Some(
                                    b.chunks_exact(4)
                                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                                        .collect::<Vec<f32>>(),
                                )
                            });
                            let (q, rep, samples) =
                                calibrate_on(&g, &co, &Device::Cpu, Progress::silent(), cached)
                                    .unwrap();
                            if let Some(p) = cache {
                                let b: Vec<u8> =
                                    samples.iter().flat_map(|v| v.to_le_bytes()).collect();
                                std::fs::write(p, b).unwrap();
                            }
                            eprintln!("{name} {m} W{w}A{a} seed {seed}: levels {:?} losses {:?} data-init {:?} synth {:.0}s recon {:.0}s", rep.recon.levels, rep.recon.losses, rep.recon.act_init_data, rep.synthesis_s, rep.reconstruction_s);
                            q
                        }
                    };
                    let secs = t.elapsed().as_secs_f64();
                    let l = lower(&q).unwrap();
                    let y = run_runtime(&l.blob, &x, 10);
                    let pred: Vec<usize> = y.chunks(10).map(argmax).collect();
                    let top1 = pred
                        .iter()
                        .zip(&labels)
                        .filter(|(p, &t)| **p == t as usize)
                        .count() as f64
                        / n as f64;
                    let agree = fake_quant_classes(&q, &x)
                        .iter()
                        .zip(&pred)
                        .filter(|(a, b)| a == b)
                        .count();
                    println!(
                        "| {name} | {method} | W{w}A{a} | {seed} | {:.2} | {:.2} | {:.2} | {secs:.0} |",
                        100.0 * top1,
                        100.0 * fp32,
                        100.0 * agree as f64 / n as f64
                    );
                }
            }
        }
    }
}
