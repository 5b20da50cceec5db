//! Every kernel against a plain reference written here (i64/i128 integer math, or f64 for the
//! float-facing ones): all weight widths 2/3/4/8, 4- and 8-bit activations, odd shapes,
//! strides, dilations, asymmetric pads, groups and depthwise.

#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

use diffdfq_runtime_testkit as common;

use common::*;
use diffdfq_runtime::format::{add_params, requant, ChannelRecord, Weights};
use diffdfq_runtime::kernels::{self, AddParams, ConvGeom, PoolGeom, QIn, QOut, Requant};
use diffdfq_runtime::numerics::code_max;
use diffdfq_runtime::Error;
use proptest::prelude::*;

// ------------------------------------------------------------------------------- convolution

#[derive(Clone, Debug)]
struct ConvProblem {
    bits: u8,
    a_bits: u8,
    groups: usize,
    cin_g: usize,
    cout_g: usize,
    h: usize,
    w: usize,
    geom: ConvGeom,
    seed: u64,
}

fn geom(
    k: (usize, usize),
    s: (usize, usize),
    d: (usize, usize),
    p: [usize; 4],
    groups: usize,
) -> ConvGeom {
    ConvGeom {
        kernel_h: k.0,
        kernel_w: k.1,
        stride_h: s.0,
        stride_w: s.1,
        dilation_h: d.0,
        dilation_w: d.1,
        pad_top: p[0],
        pad_left: p[1],
        pad_bottom: p[2],
        pad_right: p[3],
        groups,
    }
}

fn conv_problem() -> impl Strategy<Value = ConvProblem> {
    (
        (
            prop::sample::select(vec![2u8, 3, 4, 8]),
            prop::sample::select(vec![4u8, 8]),
        ),
        (1usize..4, 1usize..5, 1usize..5, 1usize..9, 1usize..9),
        (
            1usize..4,
            1usize..4,
            1usize..3,
            1usize..3,
            1usize..3,
            1usize..3,
        ),
        (0usize..3, 0usize..3, 0usize..3, 0usize..3),
        any::<u64>(),
    )
        .prop_map(
            |(
                (bits, a_bits),
                (groups, cin_g, cout_g, h, w),
                (kh, kw, sh, sw, dh, dw),
                (pt, pl, pb, pr),
                seed,
            )| ConvProblem {
                bits,
                a_bits,
                groups,
                cin_g,
                cout_g,
                h,
                w,
                geom: geom((kh, kw), (sh, sw), (dh, dw), [pt, pl, pb, pr], groups),
                seed,
            },
        )
}

/// Reference convolution: for every output, `Σ (q − z_c)(a − z) + bias` over the window with
/// padded taps contributing nothing, then the exact requantization.
#[allow(clippy::too_many_arguments)]
fn ref_conv(
    x: &[u8],
    (c_in, h, w): (usize, usize, usize),
    z: u8,
    g: &ConvGeom,
    codes: &[u8],
    chans: &[ChannelRecord],
    (c_out, oh, ow): (usize, usize, usize),
    (zo, lo, hi): (u8, u8, u8),
) -> Vec<u8> {
    let cin_g = c_in / g.groups;
    let cout_g = c_out / g.groups;
    let k = cin_g * g.kernel_h * g.kernel_w;
    let mut y = vec![0u8; c_out * oh * ow];
    for co in 0..c_out {
        let grp = co / cout_g;
        let ch = &chans[co];
        for oy in 0..oh {
            for ox in 0..ow {
                let mut acc = ch.bias as i64;
                for ci in 0..cin_g {
                    for ky in 0..g.kernel_h {
                        for kx in 0..g.kernel_w {
                            let iy =
                                (oy * g.stride_h + ky * g.dilation_h) as i64 - g.pad_top as i64;
                            let ix =
                                (ox * g.stride_w + kx * g.dilation_w) as i64 - g.pad_left as i64;
                            if iy < 0 || ix < 0 || iy >= h as i64 || ix >= w as i64 {
                                continue;
                            }
                            let a = x[(grp * cin_g + ci) * h * w + iy as usize * w + ix as usize]
                                as i64;
                            let q = codes[co * k + (ci * g.kernel_h + ky) * g.kernel_w + kx] as i64;
                            acc += (q - ch.w_zero as i64) * (a - z as i64);
                        }
                    }
                }
                y[(co * oh + oy) * ow + ox] =
                    ref_requant(acc, ch.mult, ch.shift, zo as i64, lo, hi);
            }
        }
    }
    y
}

fn check_conv(p: &ConvProblem) -> Result<(), TestCaseError> {
    let g = &p.geom;
    let (c_in, c_out) = (p.groups * p.cin_g, p.groups * p.cout_g);
    let oh = kernels::window_out_len(
        p.h,
        g.kernel_h,
        g.stride_h,
        g.dilation_h,
        g.pad_top,
        g.pad_bottom,
    );
    let ow = kernels::window_out_len(
        p.w,
        g.kernel_w,
        g.stride_w,
        g.dilation_w,
        g.pad_left,
        g.pad_right,
    );
    let (Some(oh), Some(ow)) = (oh, ow) else {
        // The geometry itself must be refused by the kernel.
        prop_assert!(g.check([1, c_in, p.h, p.w], [1, c_out, 1, 1]).is_none());
        return Ok(());
    };
    let mut rng = Gen::new(p.seed);
    let k = p.cin_g * g.kernel_h * g.kernel_w;
    let x = rng.codes(c_in * p.h * p.w, p.a_bits);
    let z = rng.code(p.a_bits);
    let codes = rng.codes(c_out * k, p.bits);
    let chans = random_channels(&mut rng, p.bits, k, &codes, p.a_bits);
    let out_max = code_max(p.a_bits);
    let zo = rng.code(p.a_bits);
    let lo = rng.range(0, zo as i64) as u8;
    let hi = rng.range(zo as i64, out_max as i64) as u8;
    let y = run_conv(
        g,
        None,
        (p.bits, k),
        &codes,
        &chans,
        (&x, [1, c_in, p.h, p.w], z),
        [1, c_out, oh, ow],
        (zo, lo, hi),
    );
    let want = ref_conv(
        &x,
        (c_in, p.h, p.w),
        z,
        g,
        &codes,
        &chans,
        (c_out, oh, ow),
        (zo, lo, hi),
    );
    prop_assert_eq!(y, want, "{:?}", p);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn conv_matches_reference(p in conv_problem()) {
        check_conv(&p)?;
    }
}

/// A fixed grid so every width and layout is covered on every run.
#[test]
fn conv_every_bit_width_and_layout() {
    let layouts = [
        // (groups, cin_g, cout_g, h, w, geom) — standard 3x3 pad 1
        (1, 3, 5, 7, 6, geom((3, 3), (1, 1), (1, 1), [1, 1, 1, 1], 1)),
        // 1x1
        (
            1,
            13,
            7,
            5,
            3,
            geom((1, 1), (1, 1), (1, 1), [0, 0, 0, 0], 1),
        ),
        // depthwise 3x3 stride 2, asymmetric pad (TF "same")
        (6, 1, 1, 9, 8, geom((3, 3), (2, 2), (1, 1), [0, 0, 1, 1], 6)),
        // grouped, dilated, odd kernel
        (
            3,
            2,
            3,
            10,
            9,
            geom((2, 3), (1, 2), (2, 1), [1, 0, 2, 1], 3),
        ),
        // depthwise with channel multiplier 2, 5x5
        (
            4,
            1,
            2,
            11,
            7,
            geom((5, 5), (1, 1), (1, 1), [2, 2, 2, 2], 4),
        ),
        // K not a multiple of 8, stride 3
        (
            1,
            5,
            4,
            12,
            12,
            geom((3, 3), (3, 3), (1, 1), [1, 2, 0, 1], 1),
        ),
        // Planes over the kernel's 256-pixel tile, tiles starting mid-row: 1×1, 3×3 pad 1,
        // depthwise stride 2 with a pad wider than a tap reaches.
        (
            1,
            3,
            2,
            20,
            17,
            geom((1, 1), (1, 1), (1, 1), [0, 0, 0, 0], 1),
        ),
        (
            1,
            2,
            3,
            25,
            23,
            geom((3, 3), (1, 1), (1, 1), [1, 1, 1, 1], 1),
        ),
        (
            2,
            1,
            1,
            41,
            37,
            geom((3, 3), (2, 2), (1, 2), [1, 4, 2, 1], 2),
        ),
    ];
    for bits in [2u8, 3, 4, 8] {
        for a_bits in [4u8, 8] {
            for (i, &(groups, cin_g, cout_g, h, w, g)) in layouts.iter().enumerate() {
                let p = ConvProblem {
                    bits,
                    a_bits,
                    groups,
                    cin_g,
                    cout_g,
                    h,
                    w,
                    geom: g,
                    seed: 1000 + i as u64,
                };
                check_conv(&p).unwrap();
            }
        }
    }
}

#[test]
fn conv_rejects_bad_arguments() {
    let codes = vec![1u8; 4 * 9];
    let mut rng = Gen::new(3);
    let chans = random_channels(&mut rng, 4, 9, &codes, 8);
    let (rows, cb) = pack_weights(4, 9, &codes, &chans);
    let w = Weights::new(4, 9, 4, &rows, &cb).unwrap();
    let g = geom((3, 3), (1, 1), (1, 1), [1, 1, 1, 1], 1);
    let x = vec![0u8; 16];
    let mut y = vec![0u8; 64];
    let mut scratch = vec![0u8; 9];
    let qin = QIn {
        data: &x,
        dims: [1, 1, 4, 4],
        zero: 0,
    };
    // scratch too small
    let r = kernels::conv2d(
        &g,
        &w,
        &qin,
        &mut QOut {
            data: &mut y,
            dims: [1, 4, 4, 4],
            zero: 0,
            lo: 0,
            hi: 255,
        },
        &mut scratch[..8],
    );
    assert_eq!(r, Err(Error::BadArgument));
    // wrong output shape
    let r = kernels::conv2d(
        &g,
        &w,
        &qin,
        &mut QOut {
            data: &mut y,
            dims: [1, 4, 3, 4],
            zero: 0,
            lo: 0,
            hi: 255,
        },
        &mut scratch,
    );
    assert_eq!(r, Err(Error::BadArgument));
    // input slice too short
    let r = kernels::conv2d(
        &g,
        &w,
        &QIn {
            data: &x[..15],
            dims: [1, 1, 4, 4],
            zero: 0,
        },
        &mut QOut {
            data: &mut y,
            dims: [1, 4, 4, 4],
            zero: 0,
            lo: 0,
            hi: 255,
        },
        &mut scratch,
    );
    assert_eq!(r, Err(Error::BadArgument));
    // weights for another K (K = 10 would pack into the same 8 bytes per row)
    assert_eq!(
        Weights::new(4, 17, 4, &rows, &cb).err(),
        Some(Error::BadArgument)
    );
    assert_eq!(
        Weights::new(4, 9, 3, &rows, &cb).err(),
        Some(Error::BadArgument)
    );
    assert_eq!(
        Weights::new(5, 9, 4, &rows, &cb).err(),
        Some(Error::BadArgument)
    );
}

// --------------------------------------------------------------------------- fully connected

fn check_fc(bits: u8, a_bits: u8, k: usize, n: usize, seed: u64) {
    let mut rng = Gen::new(seed);
    let x = rng.codes(k, a_bits);
    let z = rng.code(a_bits);
    let codes = rng.codes(n * k, bits);
    let chans = random_channels(&mut rng, bits, k, &codes, a_bits);
    let (rows, cb) = pack_weights(bits, k, &codes, &chans);
    let w = Weights::new(bits, k, n, &rows, &cb).unwrap();
    let zo = rng.code(a_bits);
    let hi = code_max(a_bits);
    let mut y = vec![0u8; n];
    kernels::fully_connected(
        &w,
        &QIn {
            data: &x,
            dims: [1, 1, 1, k],
            zero: z,
        },
        &mut QOut {
            data: &mut y,
            dims: [1, 1, 1, n],
            zero: zo,
            lo: 0,
            hi,
        },
    )
    .unwrap();
    for c in 0..n {
        let ch = &chans[c];
        let acc: i64 = ch.bias as i64
            + (0..k)
                .map(|i| (codes[c * k + i] as i64 - ch.w_zero as i64) * (x[i] as i64 - z as i64))
                .sum::<i64>();
        assert_eq!(
            y[c],
            ref_requant(acc, ch.mult, ch.shift, zo as i64, 0, hi),
            "bits {bits} a {a_bits} k {k} c {c}"
        );
    }
}

#[test]
fn fully_connected_matches_reference() {
    let mut seed = 7;
    for bits in [2u8, 3, 4, 8] {
        for a_bits in [4u8, 8] {
            for (k, n) in [(1, 1), (7, 3), (8, 10), (9, 2), (33, 17), (200, 5)] {
                seed += 1;
                check_fc(bits, a_bits, k, n, seed);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100, ..ProptestConfig::default() })]
    #[test]
    fn fully_connected_random(bits in prop::sample::select(vec![2u8, 3, 4, 8]), a8 in any::<bool>(), k in 1usize..80, n in 1usize..12, seed in any::<u64>()) {
        check_fc(bits, if a8 { 8 } else { 4 }, k, n, seed);
    }
}

// ------------------------------------------------------------------------ add / mul, broadcast

fn bcast_index(i: [usize; 4], dims: [usize; 4]) -> usize {
    let mut idx = 0;
    for d in 0..4 {
        idx = idx * dims[d] + if dims[d] == 1 { 0 } else { i[d] };
    }
    idx
}

fn for_each_index(dims: [usize; 4], mut f: impl FnMut([usize; 4])) {
    for a in 0..dims[0] {
        for b in 0..dims[1] {
            for c in 0..dims[2] {
                for d in 0..dims[3] {
                    f([a, b, c, d]);
                }
            }
        }
    }
}

fn ref_add_one(p: &AddParams, va: u8, za: u8, vb: u8, zb: u8, zo: u8, lo: u8, hi: u8) -> u8 {
    let sat = |v: i128| v.clamp(i32::MIN as i128, i32::MAX as i128);
    let ra = sat(ref_round_div(
        ((va as i128 - za as i128) << 20) * p.a.mult as i128,
        1i128 << (31 + p.a.shift),
    ));
    let rb = sat(ref_round_div(
        ((vb as i128 - zb as i128) << 20) * p.b.mult as i128,
        1i128 << (31 + p.b.shift),
    ));
    let s = sat(ra + rb);
    ref_requant(s as i64, p.out.mult, p.out.shift, zo as i64, lo, hi)
}

#[test]
fn add_and_mul_broadcast_match_reference_and_real_values() {
    let cases: [([usize; 4], [usize; 4]); 6] = [
        ([1, 3, 4, 5], [1, 3, 4, 5]), // residual
        ([1, 3, 4, 5], [1, 3, 1, 1]), // squeeze-excitation
        ([1, 3, 1, 1], [1, 3, 4, 5]),
        ([1, 3, 4, 5], [1, 1, 4, 5]),
        ([1, 3, 4, 5], [1, 1, 1, 5]), // rank-1 [W] right-aligned
        ([1, 2, 1, 5], [1, 1, 3, 1]), // both broadcast
    ];
    let mut rng = Gen::new(11);
    for a_bits in [8u8, 4] {
        for (da, db) in cases {
            let dy: [usize; 4] = std::array::from_fn(|i| da[i].max(db[i]));
            let n = dy.iter().product::<usize>();
            let xa = rng.codes(da.iter().product(), a_bits);
            let xb = rng.codes(db.iter().product(), a_bits);
            let (za, zb, zo) = (rng.code(a_bits), rng.code(a_bits), rng.code(a_bits));
            let (sa, sb) = (rng.f32(0.01, 0.2), rng.f32(0.01, 0.2));
            let hi = code_max(a_bits);
            // Add: output scale wide enough that nothing clamps.
            let so = (sa + sb) * (hi as f32 + 1.0) / hi as f32 * 1.01;
            let zo_add = hi / 2;
            let p = add_params(sa, sb, so);
            let mut y = vec![0u8; n];
            kernels::add(
                &p,
                &QIn {
                    data: &xa,
                    dims: da,
                    zero: za,
                },
                &QIn {
                    data: &xb,
                    dims: db,
                    zero: zb,
                },
                &mut QOut {
                    data: &mut y,
                    dims: dy,
                    zero: zo_add,
                    lo: 0,
                    hi,
                },
            )
            .unwrap();
            let mut i = 0;
            for_each_index(dy, |ix| {
                let (va, vb) = (xa[bcast_index(ix, da)], xb[bcast_index(ix, db)]);
                assert_eq!(
                    y[i],
                    ref_add_one(&p, va, za, vb, zb, zo_add, 0, hi),
                    "add {da:?} {db:?} at {ix:?}"
                );
                let real = sa * (va as f32 - za as f32) + sb * (vb as f32 - zb as f32);
                let got = so * (y[i] as f32 - zo_add as f32);
                assert!(
                    (got - real).abs() <= so * 0.5001 || y[i] == 0 || y[i] == hi,
                    "add real {got} vs {real}"
                );
                i += 1;
            });
            // Mul.
            let sm = sa * sb * 40.0;
            let q = requant((sa as f64) * (sb as f64) / sm as f64);
            let mut y = vec![0u8; n];
            kernels::mul(
                q,
                &QIn {
                    data: &xa,
                    dims: da,
                    zero: za,
                },
                &QIn {
                    data: &xb,
                    dims: db,
                    zero: zb,
                },
                &mut QOut {
                    data: &mut y,
                    dims: dy,
                    zero: zo,
                    lo: 0,
                    hi,
                },
            )
            .unwrap();
            let mut i = 0;
            for_each_index(dy, |ix| {
                let (va, vb) = (xa[bcast_index(ix, da)], xb[bcast_index(ix, db)]);
                let prod = (va as i64 - za as i64) * (vb as i64 - zb as i64);
                assert_eq!(
                    y[i],
                    ref_requant(prod, q.mult, q.shift, zo as i64, 0, hi),
                    "mul {da:?} {db:?}"
                );
                let real = sa * (va as f32 - za as f32) * sb * (vb as f32 - zb as f32);
                let want = ((real / sm).round() as i64 + zo as i64).clamp(0, hi as i64);
                assert!((y[i] as i64 - want).abs() <= 1, "mul real");
                i += 1;
            });
        }
    }
    // A shape that does not broadcast is refused.
    let mut y = [0u8; 6];
    let r = kernels::add(
        &AddParams::default(),
        &QIn {
            data: &[0; 6],
            dims: [1, 1, 2, 3],
            zero: 0,
        },
        &QIn {
            data: &[0; 2],
            dims: [1, 1, 1, 2],
            zero: 0,
        },
        &mut QOut {
            data: &mut y,
            dims: [1, 1, 2, 3],
            zero: 0,
            lo: 0,
            hi: 255,
        },
    );
    assert_eq!(r, Err(Error::BadArgument));
}

// ----------------------------------------------------------------------------------- pooling

#[derive(Clone, Debug)]
struct PoolProblem {
    a_bits: u8,
    c: usize,
    h: usize,
    w: usize,
    g: PoolGeom,
    ceil: bool,
    include_pad: bool,
    seed: u64,
}

fn pool_problem() -> impl Strategy<Value = PoolProblem> {
    (
        (
            any::<bool>(),
            1usize..4,
            1usize..10,
            1usize..10,
            any::<bool>(),
            any::<bool>(),
        ),
        (
            1usize..4,
            1usize..4,
            1usize..4,
            1usize..4,
            1usize..3,
            1usize..3,
        ),
        (0usize..3, 0usize..3, 0usize..3, 0usize..3),
        any::<u64>(),
    )
        .prop_map(
            |(
                (a8, c, h, w, ceil, include_pad),
                (kh, kw, sh, sw, dh, dw),
                (pt, pl, pb, pr),
                seed,
            )| PoolProblem {
                a_bits: if a8 { 8 } else { 4 },
                c,
                h,
                w,
                g: PoolGeom {
                    kernel_h: kh,
                    kernel_w: kw,
                    stride_h: sh,
                    stride_w: sw,
                    dilation_h: dh,
                    dilation_w: dw,
                    pad_top: pt,
                    pad_left: pl,
                    pad_bottom: pb,
                    pad_right: pr,
                },
                ceil,
                include_pad,
                seed,
            },
        )
}

fn pool_out_len(
    n: usize,
    k: usize,
    s: usize,
    d: usize,
    p0: usize,
    p1: usize,
    ceil: bool,
) -> Option<usize> {
    let eff = d * (k - 1) + 1;
    let padded = n + p0 + p1;
    if padded < eff {
        return None;
    }
    let span = padded - eff;
    Some(if ceil { span.div_ceil(s) } else { span / s } + 1)
}

fn check_pool(p: &PoolProblem) -> Result<(), TestCaseError> {
    let g = &p.g;
    let oh = pool_out_len(
        p.h,
        g.kernel_h,
        g.stride_h,
        g.dilation_h,
        g.pad_top,
        g.pad_bottom,
        p.ceil,
    );
    let ow = pool_out_len(
        p.w,
        g.kernel_w,
        g.stride_w,
        g.dilation_w,
        g.pad_left,
        g.pad_right,
        p.ceil,
    );
    let (Some(oh), Some(ow)) = (oh, ow) else {
        return Ok(());
    };
    let (din, dout) = ([1, p.c, p.h, p.w], [1, p.c, oh, ow]);
    // Windows that see no input element (pads ≥ kernel, ceil-mode overhang) must be refused.
    let mut empty = false;
    let mut rng = Gen::new(p.seed);
    let x = rng.codes(p.c * p.h * p.w, p.a_bits);
    let z = rng.code(p.a_bits);
    let zo = rng.code(p.a_bits);
    let hi = code_max(p.a_bits);
    let lo = rng.range(0, z as i64) as u8;
    let req = requant(rng.f32(0.3, 2.0) as f64);
    let mut want_max = vec![0u8; p.c * oh * ow];
    let mut want_avg = vec![0u8; p.c * oh * ow];
    for c in 0..p.c {
        for oy in 0..oh {
            for ox in 0..ow {
                let (mut m, mut sum, mut n_in, mut n_pad) = (None::<u8>, 0i128, 0i128, 0i128);
                for ky in 0..g.kernel_h {
                    for kx in 0..g.kernel_w {
                        let iy = (oy * g.stride_h + ky * g.dilation_h) as i64 - g.pad_top as i64;
                        let ix = (ox * g.stride_w + kx * g.dilation_w) as i64 - g.pad_left as i64;
                        let in_padded =
                            iy < (p.h + g.pad_bottom) as i64 && ix < (p.w + g.pad_right) as i64;
                        if in_padded {
                            n_pad += 1;
                        }
                        if iy >= 0 && ix >= 0 && iy < p.h as i64 && ix < p.w as i64 {
                            let a = x[(c * p.h + iy as usize) * p.w + ix as usize];
                            m = Some(m.map_or(a, |v| v.max(a)));
                            sum += a as i128 - z as i128;
                            n_in += 1;
                        }
                    }
                }
                let Some(m) = m else {
                    empty = true;
                    continue;
                };
                let i = (c * oh + oy) * ow + ox;
                want_max[i] = m.clamp(lo, hi);
                let count = if p.include_pad { n_pad } else { n_in };
                let q = ref_round_div(sum * req.mult as i128, count << (31 + req.shift));
                want_avg[i] = (q + zo as i128).clamp(0, hi as i128) as u8;
            }
        }
    }
    prop_assert_eq!(g.check(din, dout), !empty);
    let mut y = vec![0u8; p.c * oh * ow];
    let r = kernels::max_pool(
        g,
        &QIn {
            data: &x,
            dims: din,
            zero: z,
        },
        &mut QOut {
            data: &mut y,
            dims: dout,
            zero: z,
            lo,
            hi,
        },
    );
    if empty {
        prop_assert_eq!(r, Err(Error::BadArgument));
        return Ok(());
    }
    r.unwrap();
    prop_assert_eq!(&y, &want_max, "max {:?}", p);
    kernels::avg_pool(
        g,
        p.include_pad,
        req,
        &QIn {
            data: &x,
            dims: din,
            zero: z,
        },
        &mut QOut {
            data: &mut y,
            dims: dout,
            zero: zo,
            lo: 0,
            hi,
        },
    )
    .unwrap();
    prop_assert_eq!(&y, &want_avg, "avg {:?}", p);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
    #[test]
    fn pools_match_reference(p in pool_problem()) {
        check_pool(&p)?;
    }
}

#[test]
fn pools_fixed_cases() {
    // 3x3/2 pad 1 ceil mode on an even input (ResNet stem) and 2x2/2 on an odd one.
    for (h, k, s, pad, ceil) in [
        (8, 3, 2, 1, true),
        (7, 2, 2, 0, true),
        (7, 2, 2, 0, false),
        (5, 3, 1, 1, false),
    ] {
        for include_pad in [false, true] {
            for a8 in [true, false] {
                let g = PoolGeom {
                    kernel_h: k,
                    kernel_w: k,
                    stride_h: s,
                    stride_w: s,
                    dilation_h: 1,
                    dilation_w: 1,
                    pad_top: pad,
                    pad_left: pad,
                    pad_bottom: pad,
                    pad_right: pad,
                };
                let p = PoolProblem {
                    a_bits: if a8 { 8 } else { 4 },
                    c: 3,
                    h,
                    w: h + 1,
                    g,
                    ceil,
                    include_pad,
                    seed: h as u64,
                };
                check_pool(&p).unwrap();
            }
        }
    }
}

#[test]
fn global_avg_pool_matches_reference() {
    let mut rng = Gen::new(5);
    for a_bits in [4u8, 8] {
        for (c, h, w) in [(1, 1, 1), (3, 7, 7), (16, 2, 5)] {
            let x = rng.codes(c * h * w, a_bits);
            let (z, zo) = (rng.code(a_bits), rng.code(a_bits));
            let req = requant(rng.f32(0.5, 2.0) as f64);
            let mut y = vec![0u8; c];
            let hi = code_max(a_bits);
            kernels::global_avg_pool(
                req,
                &QIn {
                    data: &x,
                    dims: [1, c, h, w],
                    zero: z,
                },
                &mut QOut {
                    data: &mut y,
                    dims: [1, c, 1, 1],
                    zero: zo,
                    lo: 0,
                    hi,
                },
            )
            .unwrap();
            for ci in 0..c {
                let sum: i128 = x[ci * h * w..(ci + 1) * h * w]
                    .iter()
                    .map(|&a| a as i128 - z as i128)
                    .sum();
                let q = ref_round_div(
                    sum * req.mult as i128,
                    ((h * w) as i128) << (31 + req.shift),
                );
                assert_eq!(y[ci] as i128, (q + zo as i128).clamp(0, hi as i128));
            }
        }
    }
}

// ------------------------------------------------------------------- concat, lut, softmax, io

#[test]
fn concat_matches_reference_on_every_axis() {
    let mut rng = Gen::new(9);
    for axis in 0..4 {
        for a_bits in [4u8, 8] {
            let base = [1usize, 3, 2, 4];
            let extents = [2usize, 1, 3];
            let mut dy = base;
            dy[axis] = extents.iter().sum();
            let hi = code_max(a_bits);
            let zo = rng.code(a_bits);
            let so = 0.05f32;
            let mut y = vec![0u8; dy.iter().product()];
            let mut parts = Vec::new();
            let mut offset = 0;
            for &e in &extents {
                let mut d = base;
                d[axis] = e;
                let x = rng.codes(d.iter().product(), a_bits);
                let z = rng.code(a_bits);
                // one input with the output's scale (exact copy), others rescaled
                let s = if offset == 0 { so } else { rng.f32(0.02, 0.08) };
                let req = requant(s as f64 / so as f64);
                kernels::concat_part(
                    axis,
                    offset,
                    req,
                    &QIn {
                        data: &x,
                        dims: d,
                        zero: z,
                    },
                    &mut QOut {
                        data: &mut y,
                        dims: dy,
                        zero: zo,
                        lo: 0,
                        hi,
                    },
                )
                .unwrap();
                parts.push((x, d, z, req, offset));
                offset += e;
            }
            for (x, d, z, req, off) in &parts {
                for_each_index(*d, |ix| {
                    let mut oi = ix;
                    oi[axis] += off;
                    let flat = ((oi[0] * dy[1] + oi[1]) * dy[2] + oi[2]) * dy[3] + oi[3];
                    let v = x[((ix[0] * d[1] + ix[1]) * d[2] + ix[2]) * d[3] + ix[3]];
                    let want =
                        ref_requant(v as i64 - *z as i64, req.mult, req.shift, zo as i64, 0, hi);
                    assert_eq!(y[flat], want, "axis {axis}");
                    if *off == 0 {
                        assert_eq!(
                            want as i64,
                            (v as i64 - *z as i64 + zo as i64).clamp(0, hi as i64)
                        );
                    }
                });
            }
        }
    }
}

#[test]
fn lut_applies_the_table() {
    let mut rng = Gen::new(2);
    let table: Vec<u8> = (0..256).map(|_| rng.code(8)).collect();
    let x = rng.codes(77, 8);
    let mut y = vec![0u8; 77];
    kernels::lut(
        &table,
        &QIn {
            data: &x,
            dims: [1, 7, 1, 11],
            zero: 0,
        },
        &mut QOut {
            data: &mut y,
            dims: [1, 7, 1, 11],
            zero: 0,
            lo: 0,
            hi: 255,
        },
    )
    .unwrap();
    for (a, b) in x.iter().zip(&y) {
        assert_eq!(table[*a as usize], *b);
    }
}

#[test]
fn softmax_is_accurate_to_f32_resolution() {
    let mut rng = Gen::new(4);
    for a_bits in [4u8, 8] {
        for (rows, n) in [(1, 1), (1, 10), (3, 7), (1, 1000)] {
            let x = rng.codes(rows * n, a_bits);
            let s = rng.f32(0.01, 0.5);
            let mut out = vec![0f32; rows * n];
            kernels::softmax(
                &QIn {
                    data: &x,
                    dims: [1, 1, rows, n],
                    zero: rng.code(a_bits),
                },
                s,
                &mut out,
            )
            .unwrap();
            for r in 0..rows {
                let row = &x[r * n..(r + 1) * n];
                let e: Vec<f64> = row.iter().map(|&a| (s as f64 * a as f64).exp()).collect();
                let sum: f64 = e.iter().sum();
                let mut total = 0.0f64;
                for (i, &ei) in e.iter().enumerate() {
                    let want = ei / sum;
                    let got = out[r * n + i] as f64;
                    assert!((got - want).abs() <= 1e-6 * want + 1e-38, "{got} vs {want}");
                    total += got;
                }
                assert!((total - 1.0).abs() < 1e-5);
            }
        }
    }
}

#[test]
fn quantize_and_dequantize_at_the_boundary() {
    let mut rng = Gen::new(6);
    for bits in [4u8, 8] {
        let (s, z) = (rng.f32(0.01, 0.3), rng.code(bits));
        let x: Vec<f32> = (0..1000).map(|_| rng.f32(-60.0, 60.0)).collect();
        let mut q = vec![0u8; 1000];
        kernels::quantize(&x, s, z, bits, &mut q).unwrap();
        for (v, &c) in x.iter().zip(&q) {
            let want = ((v / s) as f64).round() as i64 + z as i64; // f64::round: half away from zero
            assert_eq!(c as i64, want.clamp(0, code_max(bits) as i64));
        }
        let mut back = vec![0f32; 1000];
        kernels::dequantize(&q, s, z, &mut back).unwrap();
        for (&c, &b) in q.iter().zip(&back) {
            assert_eq!(b, s * (c as f32 - z as f32));
        }
    }
    assert_eq!(
        kernels::quantize(&[1.0], 1.0, 0, 8, &mut [0u8; 2]),
        Err(Error::BadArgument)
    );
}

/// The vectorized input quantization equals the scalar definition on every kind of value:
/// exact halves, values past the code range and past `i32`, infinities, NaN, subnormals.
#[test]
fn quantize_equals_the_scalar_definition_everywhere() {
    let mut rng = Gen::new(9);
    let mut x: Vec<f32> = vec![
        0.0,
        -0.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        1e-45,
        3e9,
        -3e9,
    ];
    for i in -1200..1200 {
        x.push(i as f32 * 0.5); // every half, around and past the code range
    }
    x.extend((0..4000).map(|_| rng.f32(-1e4, 1e4)));
    for bits in [4u8, 8] {
        for &(s, z) in &[
            (1.0f32, 0u8),
            (0.5, 7),
            (0.0173, 128),
            (3.0, 255),
            (1e-30, 3),
        ] {
            let z = z.min(code_max(bits));
            let mut q = vec![0u8; x.len()];
            kernels::quantize(&x, s, z, bits, &mut q).unwrap();
            for (&v, &c) in x.iter().zip(&q) {
                let want = diffdfq_runtime::numerics::quantize_f32(v, s, z, bits);
                assert_eq!(c, want, "x {v}, scale {s}, zero {z}, {bits} bits");
            }
        }
    }
}

#[test]
fn dot_packed_equals_plain_dot() {
    let mut rng = Gen::new(8);
    for bits in [2u8, 3, 4, 8] {
        for k in [1usize, 7, 8, 9, 16, 31, 100] {
            let q = rng.codes(k, bits);
            let a = rng.codes(k, 8);
            let (rows, chans) = pack_weights(bits, k, &q, &[ChannelRecord::default()]);
            let w = diffdfq_runtime::format::Weights::new(bits, k, 1, &rows, &chans).unwrap();
            let want: i32 = q.iter().zip(&a).map(|(&x, &y)| x as i32 * y as i32).sum();
            assert_eq!(kernels::dot_packed(&w.row(0).unwrap(), &a), want);
        }
    }
    let _ = Requant::default();
}
