//! Every SIMD kernel this CPU can run against the portable loops (the reference that
//! `kernels/mod.rs` checks against plain integer math): random convolutions big enough for whole
//! vectors and ragged tails — 1×1, depthwise (over wide rows and, channels in lanes, small planes), small and wide general ones, strides 1–3, dilations, asymmetric
//! pads, groups, every weight width, 4- and 8-bit activations — and requantization constants
//! over their whole range; and fully connected layers of every width. Byte-identical outputs or the test fails. `use_kernels` switches
//! the kernels of the whole process, so this binary holds one test that switches in turn.

use diffdfq_runtime_testkit as common;

use common::*;
use diffdfq_runtime::format::ChannelRecord;
use diffdfq_runtime::kernels::{self, ConvGeom, Isa};
use diffdfq_runtime::numerics::{code_max, MULT_MIN, SHIFT_MAX, SHIFT_MIN};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

#[derive(Clone, Debug)]
struct Problem {
    bits: u8,
    a_bits: u8,
    groups: usize,
    cin_g: usize,
    cout_g: usize,
    h: usize,
    w: usize,
    geom: ConvGeom,
    /// Requantization constants over their whole valid range instead of realistic ones.
    wild_requant: bool,
    seed: u64,
}

fn problem() -> impl Strategy<Value = Problem> {
    let shape = prop_oneof![
        // 1×1, stride 1, no pads: the pointwise kernels.
        (1usize..3, 1usize..150, 1usize..10, 1usize..40, 1usize..40)
            .prop_map(|(g, ci, co, h, w)| (g, ci, co, h, w, (1, 1, 1, 1, [0; 4]))),
        // 1×1 over one tile of pixels with several groups of output channels: the input
        // interleaved once per convolution.
        (1usize..3, 1usize..200, 8usize..40, 1usize..16, 1usize..16)
            .prop_map(|(g, ci, co, h, w)| (g, ci, co, h, w, (1, 1, 1, 1, [0; 4]))),
        // 1×1 over more input channels than the kernels hold weights for at once.
        (1000usize..1100, 4usize..9, 1usize..6, 1usize..20).prop_map(|(ci, co, h, w)| (
            1,
            ci,
            co,
            h,
            w,
            (1, 1, 1, 1, [0; 4])
        )),
        // General convolutions reducing over more than the direct kernel holds (K > 64), up to
        // more output channels than one accumulator block: the gathered-column GEMM.
        (
            1usize..3,
            8usize..24,
            1usize..72,
            1usize..14,
            1usize..14,
            (1usize..4, 1usize..3),
            (0usize..3, 0usize..2)
        )
            .prop_map(|(g, ci, co, h, w, (k, st), (pt, pl))| {
                (g, ci, co, h, w, (3, k, st, st, [pt, pl, pl, pt]))
            }),
        // The same over rows wider than 32 output pixels: runs of a tile's columns that take
        // two vectors.
        (
            8usize..12,
            1usize..20,
            1usize..4,
            66usize..140,
            1usize..3,
            (0usize..3, 0usize..2)
        )
            .prop_map(|(ci, co, h, w, st, (pt, pl))| {
                (1, ci, co, h, w, (3, 3, 1, st, [pt, pl, pl, pt]))
            }),
        // Depthwise 3×3 / 5×5, strides 1–2, pads 0–2; rows wide enough for whole steps of
        // 32 output pixels at stride 2.
        depthwise(1..12, 1..40, 1..80),
        // Depthwise over 16 channels or more with small output planes (≤ 256 pixels): the
        // channels-in-lanes kernel, whole blocks of 16 channels and a ragged rest.
        depthwise(16..50, 1..24, 1..24),
        // General: any kernel, stride 1–3, pads.
        (
            1usize..3,
            1usize..4,
            1usize..4,
            1usize..30,
            1usize..30,
            (1usize..4, 1usize..4, 1usize..4, 1usize..4),
            (0usize..3, 0usize..3)
        )
            .prop_map(|(g, ci, co, h, w, (kh, kw, sh, sw), (pt, pl))| {
                (g, ci, co, h, w, (kh, kw, sh, sw, [pt, pl, pl, pt]))
            }),
    ];
    (
        prop::sample::select(vec![2u8, 3, 4, 8]),
        prop::sample::select(vec![4u8, 8]),
        shape,
        prop::sample::select(vec![1usize, 1, 2]),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(bits, a_bits, (groups, cin_g, cout_g, h, w, (kh, kw, sh, sw, p)), d, wild, seed)| {
                Problem {
                    bits,
                    a_bits,
                    groups,
                    cin_g,
                    cout_g,
                    h,
                    w,
                    geom: ConvGeom {
                        kernel_h: kh,
                        kernel_w: kw,
                        stride_h: sh,
                        stride_w: sw,
                        // Dilation only where the kernel is wider than one tap.
                        dilation_h: if kh > 1 { d } else { 1 },
                        dilation_w: if kw > 1 { d } else { 1 },
                        pad_top: p[0],
                        pad_left: p[1],
                        pad_bottom: p[2],
                        pad_right: p[3],
                        groups,
                    },
                    wild_requant: wild,
                    seed,
                }
            },
        )
}

/// Depthwise convolutions (3×3 / 5×5, strides 1–2, pads 0–2) over `c` channels of `h × w`.
#[allow(clippy::type_complexity)]
fn depthwise(
    c: std::ops::Range<usize>,
    h: std::ops::Range<usize>,
    w: std::ops::Range<usize>,
) -> impl Strategy<
    Value = (
        usize,
        usize,
        usize,
        usize,
        usize,
        (usize, usize, usize, usize, [usize; 4]),
    ),
> {
    let k = prop::sample::select(vec![3usize, 5]);
    (c, h, w, k, 1usize..3, 0usize..3, 0usize..3)
        .prop_map(|(c, h, w, k, s, p0, p1)| (c, 1, 1, h, w, (k, k, s, s, [p0, p1, p1, p0])))
}

/// The convolution's output codes under the kernels in use, or `None` for a geometry that
/// has no output.
/// The convolution's output with the scratch region sized for `scratch_for` (see
/// `common::run_conv`).
fn run(p: &Problem, scratch_for: Option<Isa>) -> Option<Vec<u8>> {
    let g = &p.geom;
    let (c_in, c_out) = (p.groups * p.cin_g, p.groups * p.cout_g);
    let oh = kernels::window_out_len(
        p.h,
        g.kernel_h,
        g.stride_h,
        g.dilation_h,
        g.pad_top,
        g.pad_bottom,
    )?;
    let ow = kernels::window_out_len(
        p.w,
        g.kernel_w,
        g.stride_w,
        g.dilation_w,
        g.pad_left,
        g.pad_right,
    )?;
    let mut rng = Gen::new(p.seed);
    let k = p.cin_g * g.kernel_h * g.kernel_w;
    let x = rng.codes(c_in * p.h * p.w, p.a_bits);
    let z = rng.code(p.a_bits);
    let codes = rng.codes(c_out * k, p.bits);
    let mut chans = random_channels(&mut rng, p.bits, k, &codes, p.a_bits);
    if p.wild_requant {
        for c in &mut chans {
            *c = ChannelRecord {
                mult: if rng.range(0, 9) == 0 {
                    0
                } else {
                    rng.range(MULT_MIN as i64, i32::MAX as i64) as i32
                },
                shift: rng.range(SHIFT_MIN as i64, SHIFT_MAX as i64) as i32,
                bias: rng.range(i32::MIN as i64 / 2, i32::MAX as i64 / 2) as i32,
                ..*c
            };
        }
    }
    let zo = rng.code(p.a_bits);
    // lo > hi too: the clamp's `hi` wins, in every kernel alike.
    let lo = rng.range(0, code_max(p.a_bits) as i64) as u8;
    let hi = rng.range(0, code_max(p.a_bits) as i64) as u8;
    let y = run_conv(
        g,
        scratch_for,
        (p.bits, k),
        &codes,
        &chans,
        (&x, [1, c_in, p.h, p.w], z),
        [1, c_out, oh, ow],
        (zo, lo, hi),
    );
    Some(y)
}

#[test]
fn simd_kernels_equal_the_portable_loops() {
    let simd: Vec<Isa> = [
        Isa::Sse2,
        Isa::Avx2,
        Isa::Avx512Vnni,
        Isa::Neon,
        Isa::NeonDot,
    ]
    .into_iter()
    .filter(|&isa| {
        let ok = kernels::use_kernels(isa);
        if !ok {
            println!("{isa:?}: not on this CPU, not compared");
        }
        ok
    })
    .collect();
    assert!(kernels::use_kernels(Isa::Portable));
    let mut runner = TestRunner::new(Config {
        cases: 400,
        ..Config::default()
    });
    let compared: Vec<std::cell::Cell<usize>> = simd.iter().map(|_| Default::default()).collect();
    runner
        .run(&problem(), |p| {
            assert!(kernels::use_kernels(Isa::Portable));
            let Some(want) = run(&p, None) else {
                return Ok(());
            };
            for (i, &isa) in simd.iter().enumerate() {
                assert!(kernels::use_kernels(isa));
                // With the least scratch (weights made per tile) and with the scratch the
                // compiler gives this level (weight panels made once).
                for scratch_for in [None, Some(isa)] {
                    let got = run(&p, scratch_for).unwrap();
                    prop_assert_eq!(
                        &got,
                        &want,
                        "{:?} (scratch for {:?}) differs from the portable loops: {:?}",
                        isa,
                        scratch_for,
                        p
                    );
                }
                compared[i].set(compared[i].get() + 1);
            }
            Ok(())
        })
        .unwrap();
    // Fully connected layers: every width, K across whole 32-code steps and ragged tails.
    let mut rng = Gen::new(41);
    let mut fcs = 0;
    for bits in [2u8, 3, 4, 8] {
        for a_bits in [4u8, 8] {
            for (k, n) in [
                (1, 3),
                (31, 2),
                (32, 5),
                (33, 4),
                (100, 9),
                (1280, 17),
                (2049, 3),
            ] {
                let (x, z) = (rng.codes(k, a_bits), rng.code(a_bits));
                let codes = rng.codes(n * k, bits);
                let chans = random_channels(&mut rng, bits, k, &codes, a_bits);
                let (rows, cb) = pack_weights(bits, k, &codes, &chans);
                let w = diffdfq_runtime::format::Weights::new(bits, k, n, &rows, &cb).unwrap();
                let zo = rng.code(a_bits);
                let fc = |isa: Isa| {
                    assert!(kernels::use_kernels(isa));
                    let mut y = vec![0u8; n];
                    let x = kernels::QIn {
                        data: &x,
                        dims: [1, 1, 1, k],
                        zero: z,
                    };
                    let mut out = kernels::QOut {
                        data: &mut y,
                        dims: [1, 1, 1, n],
                        zero: zo,
                        lo: 0,
                        hi: code_max(a_bits),
                    };
                    kernels::fully_connected(&w, &x, &mut out).unwrap();
                    y
                };
                let want = fc(Isa::Portable);
                for &isa in &simd {
                    assert_eq!(
                        fc(isa),
                        want,
                        "{isa:?}: fully connected W{bits}A{a_bits} k {k}"
                    );
                }
                fcs += 1;
            }
        }
    }
    println!("fully connected layers compared with the portable loops: {fcs}");
    kernels::use_kernels(Isa::Portable);
    let counts: Vec<usize> = compared.iter().map(std::cell::Cell::get).collect();
    println!("convolutions compared with the portable loops: {simd:?} {counts:?}");
    assert!(
        counts.iter().all(|&n| n >= 200),
        "too few problems had an output: {counts:?}"
    );
}
