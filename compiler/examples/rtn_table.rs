//! The rtn measurement table: weight bytes vs FP32, arena vs its lower bound and rtn top-1 on
//! the Fashion-MNIST test set through the integer runtime, per fixture and bit width.
//!
//!   cargo run --release -p diffdfq-compiler --example rtn_table
//!   (DFQ_MEASURE_N=1000 for a quicker run, DFQ_OUT=DIR to keep the blobs)

use diffdfq_support::*;

fn main() {
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
