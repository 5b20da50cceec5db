//! Forward + backward rate of calibration's convolutions on MobileNetV2-like shapes, against
//! candle's own `conv2d` and a plain matrix product of the same MACs, in the same run.
//!
//!     cargo run --release -p diffdfq-compiler --example conv_speed [BATCH]

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use diffdfq_compiler::reference::{conv, ConvArgs};

struct Case {
    name: &'static str,
    c_in: usize,
    c_out: usize,
    hw: usize,
    k: usize,
    stride: usize,
    groups: usize,
}

fn time(mut f: impl FnMut() -> candle_core::Result<()>) -> candle_core::Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn main() -> candle_core::Result<()> {
    diffdfq_compiler::calib::keep_freed_memory();
    let n: usize = std::env::args()
        .nth(1)
        .map_or(8, |s| s.parse().unwrap_or(8));
    let dev = Device::Cpu;
    let cases = [
        Case {
            name: "stem 3x3 s2",
            c_in: 3,
            c_out: 32,
            hw: 224,
            k: 3,
            stride: 2,
            groups: 1,
        },
        Case {
            name: "dw 3x3 s1",
            c_in: 32,
            c_out: 32,
            hw: 112,
            k: 3,
            stride: 1,
            groups: 32,
        },
        Case {
            name: "dw 3x3 s2",
            c_in: 96,
            c_out: 96,
            hw: 112,
            k: 3,
            stride: 2,
            groups: 96,
        },
        Case {
            name: "dw 5x5 s1",
            c_in: 144,
            c_out: 144,
            hw: 56,
            k: 5,
            stride: 1,
            groups: 144,
        },
        Case {
            name: "pw 16->96",
            c_in: 16,
            c_out: 96,
            hw: 112,
            k: 1,
            stride: 1,
            groups: 1,
        },
        Case {
            name: "pw 144->24",
            c_in: 144,
            c_out: 24,
            hw: 56,
            k: 1,
            stride: 1,
            groups: 1,
        },
        Case {
            name: "pw 384->64",
            c_in: 384,
            c_out: 64,
            hw: 14,
            k: 1,
            stride: 1,
            groups: 1,
        },
        Case {
            name: "3x3 64->64",
            c_in: 64,
            c_out: 64,
            hw: 28,
            k: 3,
            stride: 1,
            groups: 1,
        },
    ];
    println!("batch {n}; GFLOP/s of forward + both backward products (3 × 2 × MACs)");
    println!(
        "{:<12} {:>10} {:>10} {:>10}",
        "conv", "ours", "candle", "matmul"
    );
    for c in &cases {
        let p = c.k / 2;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (n, c.c_in, c.hw, c.hw), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(
            0f32,
            0.1,
            (c.c_out, c.c_in / c.groups, c.k, c.k),
            &dev,
        )?)?;
        let a = ConvArgs {
            pads: [p; 4],
            strides: [c.stride; 2],
            dil: 1,
            groups: c.groups,
        };
        let ho = (c.hw + 2 * p - c.k) / c.stride + 1;
        let macs = (n * c.c_out * ho * ho * (c.c_in / c.groups) * c.k * c.k) as f64;
        let r = Tensor::randn(0f32, 1., (n, c.c_out, ho, ho), &dev)?;
        let ours = time(|| {
            let y = conv(x.as_tensor(), w.as_tensor(), &None, &a)?;
            let g = (y * &r)?.sum_all()?.backward()?;
            assert!(g.get(&x).is_some() && g.get(&w).is_some());
            Ok(())
        })?;
        let theirs = time(|| {
            let y = x
                .as_tensor()
                .conv2d(w.as_tensor(), p, c.stride, 1, c.groups)?;
            let g = (y * &r)?.sum_all()?.backward()?;
            assert!(g.get(&x).is_some() && g.get(&w).is_some());
            Ok(())
        })?;
        // The same MACs as one product of two dense matrices.
        let k = c.c_in / c.groups * c.k * c.k;
        let m = Var::from_tensor(&Tensor::randn(0f32, 1., (c.c_out, k), &dev)?)?;
        let cols = Var::from_tensor(&Tensor::randn(
            0f32,
            1.,
            (k, macs as usize / (c.c_out * k)),
            &dev,
        )?)?;
        let mm = time(|| {
            let y = m.as_tensor().matmul(cols.as_tensor())?;
            let g = y.sum_all()?.backward()?;
            assert!(g.get(&m).is_some());
            Ok(())
        })?;
        let rate = |t: f64| 6.0 * macs / t / 1e9;
        println!(
            "{:<12} {:>10.2} {:>10.2} {:>10.2}",
            c.name,
            rate(ours),
            rate(theirs),
            rate(mm)
        );
    }
    Ok(())
}
