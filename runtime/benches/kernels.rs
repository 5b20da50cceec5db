//! Per-kernel timings (criterion): MobileNetV2's convolution shapes at 3- and 8-bit weights,
//! once per kernel level this CPU has (`kernels::use_kernels`), so one run compares the
//! portable loops with each SIMD level. Whole-model latency against onnxruntime is
//! `scripts/bench`.
//!
//!     cargo bench --manifest-path runtime/Cargo.toml --bench kernels

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use diffdfq_runtime::format::{pack_weights, row_bytes, ChannelRecord, Weights};
use diffdfq_runtime::kernels::{self, ConvGeom, Isa, QIn, QOut};
use diffdfq_runtime::numerics::code_max;
use diffdfq_runtime::quantize_multiplier;

/// (label, C_in, H, W, C_out, kernel, stride, groups)
type Shape = (
    &'static str,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
);

const SHAPES: &[Shape] = &[
    ("stem 3x3 s2 3->32 224", 3, 224, 224, 32, 3, 2, 1),
    ("1x1 96->24 56", 96, 56, 56, 24, 1, 1, 1),
    ("1x1 24->144 56", 24, 56, 56, 144, 1, 1, 1),
    ("1x1 960->160 7", 960, 7, 7, 160, 1, 1, 1),
    ("dw 3x3 s1 144 56", 144, 56, 56, 144, 3, 1, 144),
    ("dw 3x3 s2 144 56", 144, 56, 56, 144, 3, 2, 144),
    ("dw 3x3 s1 960 7", 960, 7, 7, 960, 3, 1, 960),
];

/// A deterministic byte stream (xorshift), so every run times the same data.
fn bytes(n: usize, seed: u64, max: u8) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (max as u64 + 1)) as u8
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let isas: Vec<Isa> = [Isa::Portable, Isa::Sse2, Isa::Avx2, Isa::Avx512Vnni]
        .into_iter()
        .filter(|&i| kernels::use_kernels(i))
        .collect();
    for &(label, c_in, h, w, c_out, k, s, groups) in SHAPES {
        let geom = ConvGeom {
            kernel_h: k,
            kernel_w: k,
            stride_h: s,
            stride_w: s,
            dilation_h: 1,
            dilation_w: 1,
            pad_top: k / 2,
            pad_left: k / 2,
            pad_bottom: k / 2,
            pad_right: k / 2,
            groups,
        };
        let (oh, ow) = ((h + 2 * (k / 2) - k) / s + 1, (w + 2 * (k / 2) - k) / s + 1);
        let kk = c_in / groups * k * k;
        let x = bytes(c_in * h * w, 7, 255);
        let mut group = c.benchmark_group(label);
        group.throughput(Throughput::Elements((c_out * oh * ow * kk) as u64));
        for bits in [3u8, 8] {
            let codes = bytes(c_out * kk, 11, code_max(bits));
            let rb = row_bytes(bits, kk).unwrap();
            let mut rows = vec![0u8; rb * c_out];
            pack_weights(bits, kk, &codes, &mut rows).unwrap();
            let (mult, shift) = quantize_multiplier(1.0 / (kk as f64 * 64.0));
            let mut chans = Vec::new();
            for row in codes.chunks_exact(kk) {
                let rec = ChannelRecord {
                    w_scale: 0.01,
                    bias: 100,
                    sum_q: row.iter().map(|&q| q as i32).sum(),
                    mult,
                    shift,
                    w_zero: (1u8 << (bits - 1)),
                    reserved: [0; 3],
                };
                chans.extend_from_slice(&rec.to_bytes());
            }
            let weights = Weights::new(bits, kk, c_out, &rows, &chans).unwrap();
            let mut y = vec![0u8; c_out * oh * ow];
            // The scratch region as the compiler sizes it for the widest level (the others
            // use what they need of it).
            let len = kernels::conv_scratch_len_for(
                Isa::Avx512Vnni,
                &geom,
                [1, c_in, h, w],
                [1, c_out, oh, ow],
                bits,
            )
            .unwrap();
            let mut scratch = vec![0u8; len];
            for &isa in &isas {
                kernels::use_kernels(isa);
                group.bench_function(
                    BenchmarkId::new(format!("W{bits}A8"), format!("{isa:?}")),
                    |b| {
                        b.iter(|| {
                            kernels::conv2d(
                                &geom,
                                &weights,
                                &QIn {
                                    data: &x,
                                    dims: [1, c_in, h, w],
                                    zero: 3,
                                },
                                &mut QOut {
                                    data: &mut y,
                                    dims: [1, c_out, oh, ow],
                                    zero: 0,
                                    lo: 0,
                                    hi: 255,
                                },
                                &mut scratch,
                            )
                            .unwrap()
                        })
                    },
                );
            }
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    // Short windows: 56 benchmarks in about two minutes on two cores.
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1))
        .sample_size(20);
    targets = bench
}
criterion_main!(benches);
