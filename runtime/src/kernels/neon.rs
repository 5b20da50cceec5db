//! aarch64 NEON kernels (Advanced SIMD, part of every AArch64 CPU the targets name), each
//! bit-identical to its portable twin in [`super`]: the 1×1 convolution four output channels
//! per pass ([`pointwise_quads_neon`]) and one at a time for the last few
//! ([`pointwise_neon`]), the tap rows of the other convolutions ([`tap_row_neon`]) and
//! requantization ([`requant_neon`]); with the dotprod extension (the `neondot` level) the
//! grouped 1×1 convolution on `udot` ([`pointwise_quads_dot`]). Each function's doc comment
//! states why its integer arithmetic cannot saturate or round differently from the portable
//! loops.

use core::arch::aarch64::*;

use crate::error::Error;
use crate::packing::Row;

/// [`super::pointwise_tile`] for `acc.len()` a multiple of 16: 16 pixels × all input channels
/// per block, the accumulators in four registers. Per channel the 16 codes widen to i16 and
/// `smlal`/`smlal2` add `w · a` into the i32 lanes. Exact: `|w| ≤ 255` and `a ≤ 255` are
/// valid i16, each product `≤ 255²` fits i32, and `smlal` wraps modulo 2³² as the portable
/// loop's `wrapping_add` does (it does not saturate), so any order of summation agrees.
#[target_feature(enable = "neon")]
pub(super) fn pointwise_neon(
    in_group: &[u8],
    plane: usize,
    codes: &[u8],
    zw: i32,
    p0: usize,
    acc: &mut [i32],
) -> Result<(), Error> {
    for (b, a16) in acc.chunks_exact_mut(16).enumerate() {
        let p = p0 + 16 * b;
        // SAFETY: `a16` holds exactly the 16 i32 the four loads read.
        let mut s = unsafe {
            let at = a16.as_ptr();
            [
                vld1q_s32(at),
                vld1q_s32(at.add(4)),
                vld1q_s32(at.add(8)),
                vld1q_s32(at.add(12)),
            ]
        };
        for (c, &q) in codes.iter().enumerate() {
            let w = (q as i32 - zw) as i16;
            if w == 0 {
                continue;
            }
            let xs = in_group
                .get(c * plane + p..c * plane + p + 16)
                .ok_or(Error::BadArgument)?;
            // SAFETY: `xs` holds exactly the 16 bytes the load reads.
            let x = unsafe { vld1q_u8(xs.as_ptr()) };
            let lo = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(x)));
            let hi = vreinterpretq_s16_u16(vmovl_high_u8(x));
            s[0] = vmlal_n_s16(s[0], vget_low_s16(lo), w);
            s[1] = vmlal_high_n_s16(s[1], lo, w);
            s[2] = vmlal_n_s16(s[2], vget_low_s16(hi), w);
            s[3] = vmlal_high_n_s16(s[3], hi, w);
        }
        // SAFETY: `a16` holds exactly the 16 i32 the four stores write.
        unsafe {
            let at = a16.as_mut_ptr();
            vst1q_s32(at, s[0]);
            vst1q_s32(at.add(4), s[1]);
            vst1q_s32(at.add(8), s[2]);
            vst1q_s32(at.add(12), s[3]);
        }
    }
    Ok(())
}

/// [`super::tap_row`] for strides 1 and 2, eight output pixels per step: the codes (every
/// second one at stride 2, de-interleaved by `ld2`) widen to i16 and `smlal`/`smlal2` add
/// `wv · a` into the accumulators. Exact for the reasons [`pointwise_neon`] gives (`|wv| ≤
/// 255`). Returns how many leading pixels it did: whole steps whose loads stay inside `xs`
/// (the portable loop does the rest).
#[target_feature(enable = "neon")]
pub(super) fn tap_row_neon(acc: &mut [i32], xs: &[u8], sw: usize, wv: i32) -> usize {
    let Ok(w) = i16::try_from(wv) else {
        return 0;
    };
    let mut i = 0;
    while let Some(dst) = acc.get_mut(i..i + 8) {
        let x = match sw {
            1 => match xs.get(i..i + 8) {
                // SAFETY: `src` holds exactly the 8 bytes the load reads.
                Some(src) => unsafe { vld1_u8(src.as_ptr()) },
                None => break,
            },
            2 => match xs.get(2 * i..2 * i + 16) {
                // SAFETY: `src` holds exactly the 16 bytes `ld2` reads; `.0` is the even ones.
                Some(src) => unsafe { vld2_u8(src.as_ptr()).0 },
                None => break,
            },
            _ => break,
        };
        let x = vreinterpretq_s16_u16(vmovl_u8(x));
        // SAFETY: `dst` holds exactly the 8 i32 loaded and stored.
        unsafe {
            let at = dst.as_mut_ptr();
            let a0 = vmlal_n_s16(vld1q_s32(at), vget_low_s16(x), w);
            let a1 = vmlal_high_n_s16(vld1q_s32(at.add(4)), x, w);
            vst1q_s32(at, a0);
            vst1q_s32(at.add(4), a1);
        }
        i += 8;
    }
    i
}

/// [`crate::numerics::ChannelRequant::apply`] on eight accumulators per step, in 64-bit lanes
/// as the scalar form computes: `smull` forms `acc · mult` exactly, the magnitude is rounded
/// half away from zero with a logical right shift (`ushl` by `−n`, `n ≤ 62`), the sign given
/// back, the zero point added and the clamp applied in 64 bits (`hi` wins when `lo > hi`, as
/// in `clamp_code`); the results lie in `[0, 255]`, so the narrowing steps keep them. Returns
/// how many leading accumulators it did.
#[target_feature(enable = "neon")]
pub(super) fn requant_neon(
    req: &crate::numerics::ChannelRequant,
    acc: &[i32],
    out: &mut [u8],
) -> usize {
    let (mult, n, half, zero, lo, hi) = req.constants();
    // `mult` comes from an i32 (`ChannelRequant::new`).
    let Ok(mult) = i32::try_from(mult) else {
        return 0;
    };
    let halfv = vdupq_n_s64(half);
    let zerov = vdupq_n_s64(zero);
    let (lov, hiv) = (vdupq_n_s64(lo), vdupq_n_s64(hi));
    let shr = vdupq_n_s64(-(n as i64));
    let round_clamp = |p: int64x2_t| {
        let neg = vshrq_n_s64::<63>(p);
        let mag = vsubq_s64(veorq_s64(p, neg), neg);
        let r = vshlq_u64(vreinterpretq_u64_s64(vaddq_s64(mag, halfv)), shr);
        let r = vsubq_s64(veorq_s64(vreinterpretq_s64_u64(r), neg), neg);
        let v = vaddq_s64(r, zerov);
        let v = vbslq_s64(vcgtq_s64(lov, v), lov, v);
        vbslq_s64(vcgtq_s64(v, hiv), hiv, v)
    };
    let quad = |a: int32x4_t| {
        let l = round_clamp(vmull_n_s32(vget_low_s32(a), mult));
        let h = round_clamp(vmull_high_n_s32(a, mult));
        vcombine_s32(vmovn_s64(l), vmovn_s64(h))
    };
    let mut i = 0;
    while let (Some(src), Some(dst)) = (acc.get(i..i + 8), out.get_mut(i..i + 8)) {
        // SAFETY: `src` holds exactly the 8 i32 the two loads read.
        let (a0, a1) = unsafe { (vld1q_s32(src.as_ptr()), vld1q_s32(src.as_ptr().add(4))) };
        let v = vcombine_s16(vmovn_s32(quad(a0)), vmovn_s32(quad(a1)));
        // SAFETY: `dst` holds exactly the 8 bytes the store writes.
        unsafe { vst1_u8(dst.as_mut_ptr(), vqmovun_s16(v)) };
        i += 8;
    }
    i
}

/// Input channels per weight slice of [`pointwise_quads_neon`] (a multiple of 8: packed rows
/// hold their codes in groups of 8).
const PW_KC: usize = 64;

/// The 1×1 convolution of [`super::conv2d`] (stride 1, no pads) for output channels
/// `first .. first + count` of a group, four at a time: each block of 16 input codes is
/// loaded and widened once and multiplied into the accumulators of four output channels
/// (`smlal` by lane: `acc_j += w_j · a`), 16 pixels per block, the 16 accumulator vectors in
/// registers over a slice of [`PW_KC`] input channels. Exact for the reasons
/// [`pointwise_neon`] gives (`|q − z_c| ≤ 255` is a valid i16). The weights of a slice are
/// unpacked into a stack buffer once per tile of [`super::CONV_TILE`] pixels. Returns the
/// first output channel it left to the one-channel path (fewer than four remain).
#[target_feature(enable = "neon")]
pub(super) fn pointwise_quads_neon(
    weights: &crate::packing::Weights<'_>,
    in_group: &[u8],
    plane: usize,
    z: i32,
    y: (u8, u8, u8),
    out: &mut [u8],
    range: (usize, usize),
) -> Result<usize, Error> {
    let bits = weights.bits;
    let slice = |g: &Slice<'_>, acc: &mut Acc| {
        let mut wq = [[0i16; 4]; PW_KC];
        weight_lanes(bits, g.rows, g.zw, g.c, g.kc, &mut wq)?;
        let wq = wq.get(..g.kc).ok_or(Error::BadArgument)?;
        // The closure has this function's target features, which are the callee's.
        quad_tile(g.xs, plane, wq, g.p0, g.n, acc)
    };
    pointwise_quads_by(weights, in_group, plane, z, y, out, range, slice)
}

/// The accumulators of [`pointwise_quads_by`]: four output channels × one tile.
type Acc = [[i32; super::CONV_TILE]; 4];

/// One slice of input channels of one tile, as [`pointwise_quads_by`] hands it over.
struct Slice<'a> {
    /// The four output channels' packed rows and weight zero points.
    rows: &'a [Row<'a>; 4],
    zw: &'a [i32; 4],
    /// The slice: input channels `c .. c + kc`, whose codes start `xs`.
    c: usize,
    kc: usize,
    xs: &'a [u8],
    /// The tile: output pixels `p0 .. p0 + n`.
    p0: usize,
    n: usize,
}

/// The loop both grouped 1×1 kernels share: four output channels at a time, tiles of
/// [`super::CONV_TILE`] pixels whose accumulators start at each channel's constant, slices of
/// [`PW_KC`] input channels added by `slice`, then requantization. Returns the first output
/// channel it left to the one-channel path (fewer than four remain).
#[allow(clippy::too_many_arguments)]
fn pointwise_quads_by(
    weights: &crate::packing::Weights<'_>,
    in_group: &[u8],
    plane: usize,
    z: i32,
    y: (u8, u8, u8),
    out: &mut [u8],
    (first, count): (usize, usize),
    slice: impl Fn(&Slice<'_>, &mut Acc) -> Result<(), Error>,
) -> Result<usize, Error> {
    let k = weights.k;
    if in_group.len() < k.checked_mul(plane).ok_or(Error::BadArgument)? {
        return Err(Error::BadArgument);
    }
    let mut co = first;
    while co + 4 <= first + count {
        let mut reqs = [crate::numerics::ChannelRequant::new(0, 0, 0, 0, 0); 4];
        let mut c0 = [0i32; 4];
        let mut zw = [0i32; 4];
        let mut rows = [Row::default(); 4];
        super::channel_constants(weights, co, z, y, &mut rows, &mut zw, &mut reqs, &mut c0)?;
        let mut p0 = 0;
        while p0 < plane {
            let n = super::CONV_TILE.min(plane - p0);
            let mut acc = [[0i32; super::CONV_TILE]; 4];
            for (a, &c) in acc.iter_mut().zip(&c0) {
                a.fill(c);
            }
            let mut c = 0;
            while c < k {
                let kc = PW_KC.min(k - c);
                let xs = in_group
                    .get(c * plane..k * plane)
                    .ok_or(Error::BadArgument)?;
                let (rows, zw) = (&rows, &zw);
                slice(
                    &Slice {
                        rows,
                        zw,
                        c,
                        kc,
                        xs,
                        p0,
                        n,
                    },
                    &mut acc,
                )?;
                c += kc;
            }
            for (j, (a, req)) in acc.iter().zip(&reqs).enumerate() {
                let dst = out
                    .get_mut((co + j) * plane + p0..(co + j) * plane + p0 + n)
                    .ok_or(Error::BadArgument)?;
                super::requant_tile(req, a.get(..n).ok_or(Error::BadArgument)?, dst);
            }
            p0 += n;
        }
        co += 4;
    }
    Ok(co)
}

/// `q − z_j` of input channels `c .. c + kc` (`c` a multiple of 8) for the four rows, one
/// `[i16; 4]` (the four output channels) per input channel of `out`.
fn weight_lanes(
    bits: u8,
    rows: &[Row<'_>; 4],
    zw: &[i32; 4],
    c: usize,
    kc: usize,
    out: &mut [[i16; 4]],
) -> Result<(), Error> {
    for (j, (row, &zwj)) in rows.iter().zip(zw).enumerate() {
        let mut codes = [0u8; 8];
        for (gi, lanes) in out.chunks_mut(8).take(kc.div_ceil(8)).enumerate() {
            let group = row.group(c / 8 + gi).ok_or(Error::BadArgument)?;
            crate::packing::unpack_group(bits, group, &mut codes);
            for (l, &q) in lanes.iter_mut().zip(&codes) {
                if let Some(v) = l.get_mut(j) {
                    *v = (q as i32 - zwj) as i16;
                }
            }
        }
    }
    Ok(())
}

/// `acc[j][i] += Σ_c w[c][j] · x_c[p0 + i]` for `i < n` over the input channels of `w`
/// (`xs` starts at the first of them): whole blocks of 16 pixels on `smlal` by lane, the
/// rest in the portable form.
#[target_feature(enable = "neon")]
fn quad_tile(
    xs: &[u8],
    plane: usize,
    w: &[[i16; 4]],
    p0: usize,
    n: usize,
    acc: &mut Acc,
) -> Result<(), Error> {
    let whole = n / 16 * 16;
    let mut p = 0;
    while p < whole {
        let mut s = [[vdupq_n_s32(0); 4]; 4];
        for (sj, aj) in s.iter_mut().zip(acc.iter()) {
            let a = aj.get(p..p + 16).ok_or(Error::BadArgument)?;
            // SAFETY: `a` holds exactly the 16 i32 the four loads read.
            unsafe {
                let at = a.as_ptr();
                *sj = [
                    vld1q_s32(at),
                    vld1q_s32(at.add(4)),
                    vld1q_s32(at.add(8)),
                    vld1q_s32(at.add(12)),
                ];
            }
        }
        for (c, wc) in w.iter().enumerate() {
            let at = c * plane + p0 + p;
            let src = xs.get(at..at + 16).ok_or(Error::BadArgument)?;
            // SAFETY: `src` holds exactly the 16 bytes the load reads, `wc` the 4 i16.
            let (x, wv) = unsafe { (vld1q_u8(src.as_ptr()), vld1_s16(wc.as_ptr())) };
            let lo = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(x)));
            let hi = vreinterpretq_s16_u16(vmovl_high_u8(x));
            let [s0, s1, s2, s3] = &mut s;
            mla_lane::<0>(s0, lo, hi, wv);
            mla_lane::<1>(s1, lo, hi, wv);
            mla_lane::<2>(s2, lo, hi, wv);
            mla_lane::<3>(s3, lo, hi, wv);
        }
        for (sj, aj) in s.iter().zip(acc.iter_mut()) {
            let a = aj.get_mut(p..p + 16).ok_or(Error::BadArgument)?;
            // SAFETY: `a` holds exactly the 16 i32 the four stores write.
            unsafe {
                let at = a.as_mut_ptr();
                vst1q_s32(at, sj[0]);
                vst1q_s32(at.add(4), sj[1]);
                vst1q_s32(at.add(8), sj[2]);
                vst1q_s32(at.add(12), sj[3]);
            }
        }
        p += 16;
    }
    for (c, wc) in w.iter().enumerate() {
        let at = c * plane + p0;
        let rest = xs.get(at + whole..at + n).ok_or(Error::BadArgument)?;
        for (aj, &wj) in acc.iter_mut().zip(wc) {
            let dst = aj.get_mut(whole..n).ok_or(Error::BadArgument)?;
            for (a, &v) in dst.iter_mut().zip(rest) {
                *a = a.wrapping_add(i32::from(wj) * i32::from(v));
            }
        }
    }
    Ok(())
}

/// `s += w[L] · (lo, hi)` over 16 pixels: the four quarters on `smlal`/`smlal2` by lane.
#[target_feature(enable = "neon")]
#[inline]
fn mla_lane<const L: i32>(s: &mut [int32x4_t; 4], lo: int16x8_t, hi: int16x8_t, w: int16x4_t) {
    s[0] = vmlal_lane_s16::<L>(s[0], vget_low_s16(lo), w);
    s[1] = vmlal_high_lane_s16::<L>(s[1], lo, w);
    s[2] = vmlal_lane_s16::<L>(s[2], vget_low_s16(hi), w);
    s[3] = vmlal_high_lane_s16::<L>(s[3], hi, w);
}

/// `acc + Σ_k a[4i + k] · b[4i + k]` per u32 lane `i` (`udot`, the dotprod extension). By
/// `asm!`: the dotprod intrinsics are not stable in the Rust versions the project builds with.
#[target_feature(enable = "neon,dotprod")]
#[inline]
fn udot(acc: uint32x4_t, a: uint8x16_t, b: uint8x16_t) -> uint32x4_t {
    let mut r = acc;
    // SAFETY: a register-only instruction of the dotprod extension, which this function's
    // target features (and so every caller's) include.
    unsafe {
        core::arch::asm!(
            "udot {r:v}.4s, {a:v}.16b, {b:v}.16b",
            r = inout(vreg) r,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    r
}

/// [`pointwise_quads_neon`] on `udot` (the `neondot` level): per 16-pixel block and four
/// input channels, the four rows of codes are interleaved into four vectors of four pixels ×
/// four channels (`zip1`/`zip2`), and `udot` adds `Σ_k q_{o,c+k} · a_{c+k}` for each of four
/// output channels, with the raw codes `q` as unsigned bytes; one more `udot` against ones
/// gives `Σ a` per pixel, and the zero point comes out at the end:
/// `Σ (q − z_o)·a = Σ q·a − z_o·Σ a`. Exact: every step is u32/i32 arithmetic modulo 2³²
/// (`udot` wraps, it does not saturate), so the result is the portable loop's wrapping sum.
/// Channels past `K` in the last four read a zero vector with zero weights.
#[target_feature(enable = "neon,dotprod")]
pub(super) fn pointwise_quads_dot(
    weights: &crate::packing::Weights<'_>,
    in_group: &[u8],
    plane: usize,
    z: i32,
    y: (u8, u8, u8),
    out: &mut [u8],
    range: (usize, usize),
) -> Result<usize, Error> {
    let bits = weights.bits;
    let slice = |g: &Slice<'_>, acc: &mut Acc| {
        let mut wq = [[0u32; 4]; PW_KC / 4];
        code_quads(bits, g.rows, g.c, g.kc, &mut wq)?;
        let wq = wq.get(..g.kc.div_ceil(4)).ok_or(Error::BadArgument)?;
        // The closure has this function's target features, which are the callee's.
        dot_tile(g.xs, plane, g.kc, wq, g.zw, g.p0, g.n, acc)
    };
    pointwise_quads_by(weights, in_group, plane, z, y, out, range, slice)
}

/// The raw codes of input channels `c .. c + kc` (`c` a multiple of 8) for the four rows,
/// four channels to a `u32` (channel `c + 4i + b` in byte `b`), one `[u32; 4]` (the four
/// output channels) per four input channels of `out`; channels past `kc` get code 0.
fn code_quads(
    bits: u8,
    rows: &[Row<'_>; 4],
    c: usize,
    kc: usize,
    out: &mut [[u32; 4]],
) -> Result<(), Error> {
    for (j, row) in rows.iter().enumerate() {
        let mut codes = [0u8; 8];
        for (gi, pair) in out.chunks_mut(2).take(kc.div_ceil(8)).enumerate() {
            let group = row.group(c / 8 + gi).ok_or(Error::BadArgument)?;
            crate::packing::unpack_group(bits, group, &mut codes);
            for (t, code) in codes.iter_mut().enumerate() {
                if gi * 8 + t >= kc {
                    *code = 0;
                }
            }
            let [a0, a1, a2, a3, b0, b1, b2, b3] = codes;
            for (quad, bytes) in pair.iter_mut().zip([[a0, a1, a2, a3], [b0, b1, b2, b3]]) {
                if let Some(v) = quad.get_mut(j) {
                    *v = u32::from_le_bytes(bytes);
                }
            }
        }
    }
    Ok(())
}

/// `acc[j][i] += Σ_c (q_{j,c} − z_j) · x_c[p0 + i]` for `i < n` over the `kc` input channels
/// whose codes `w` holds four to a `u32` (`xs` starts at the first of them): whole blocks of
/// 16 pixels on `udot`, the rest in the portable form.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "neon,dotprod")]
fn dot_tile(
    xs: &[u8],
    plane: usize,
    kc: usize,
    w: &[[u32; 4]],
    zw: &[i32; 4],
    p0: usize,
    n: usize,
    acc: &mut Acc,
) -> Result<(), Error> {
    let whole = n / 16 * 16;
    let ones = vdupq_n_u8(1);
    let row = |c: usize, p: usize| -> Result<uint8x16_t, Error> {
        if c >= kc {
            return Ok(vdupq_n_u8(0));
        }
        let at = c * plane + p0 + p;
        let src = xs.get(at..at + 16).ok_or(Error::BadArgument)?;
        // SAFETY: `src` holds exactly the 16 bytes the load reads.
        Ok(unsafe { vld1q_u8(src.as_ptr()) })
    };
    let mut p = 0;
    while p < whole {
        let mut s = [[vdupq_n_u32(0); 4]; 4];
        let mut sum_a = [vdupq_n_u32(0); 4];
        for (cq, wc) in w.iter().enumerate() {
            let c = 4 * cq;
            let (r0, r1, r2, r3) = (row(c, p)?, row(c + 1, p)?, row(c + 2, p)?, row(c + 3, p)?);
            // Pixel-major quads: x[q] holds pixels 4q .. 4q + 3, each as its four channels.
            let (t01, t23) = (vzip1q_u8(r0, r1), vzip1q_u8(r2, r3));
            let (u01, u23) = (vzip2q_u8(r0, r1), vzip2q_u8(r2, r3));
            let x = [
                vreinterpretq_u8_u16(vzip1q_u16(
                    vreinterpretq_u16_u8(t01),
                    vreinterpretq_u16_u8(t23),
                )),
                vreinterpretq_u8_u16(vzip2q_u16(
                    vreinterpretq_u16_u8(t01),
                    vreinterpretq_u16_u8(t23),
                )),
                vreinterpretq_u8_u16(vzip1q_u16(
                    vreinterpretq_u16_u8(u01),
                    vreinterpretq_u16_u8(u23),
                )),
                vreinterpretq_u8_u16(vzip2q_u16(
                    vreinterpretq_u16_u8(u01),
                    vreinterpretq_u16_u8(u23),
                )),
            ];
            for (sq, &xq) in sum_a.iter_mut().zip(&x) {
                *sq = udot(*sq, xq, ones);
            }
            for (sj, &wj) in s.iter_mut().zip(wc) {
                let wv = vreinterpretq_u8_u32(vdupq_n_u32(wj));
                for (sjq, &xq) in sj.iter_mut().zip(&x) {
                    *sjq = udot(*sjq, xq, wv);
                }
            }
        }
        for ((sj, aj), &z) in s.iter().zip(acc.iter_mut()).zip(zw) {
            let a = aj.get_mut(p..p + 16).ok_or(Error::BadArgument)?;
            let zv = vdupq_n_s32(z);
            for (q, (&sjq, &sa)) in sj.iter().zip(&sum_a).enumerate() {
                let dst = a.get_mut(4 * q..4 * q + 4).ok_or(Error::BadArgument)?;
                // SAFETY: `dst` holds exactly the 4 i32 loaded and stored.
                unsafe {
                    let at = dst.as_mut_ptr();
                    let qa = vreinterpretq_s32_u32(sjq);
                    let fix = vmulq_s32(zv, vreinterpretq_s32_u32(sa));
                    vst1q_s32(at, vaddq_s32(vld1q_s32(at), vsubq_s32(qa, fix)));
                }
            }
        }
        p += 16;
    }
    for (cq, wc) in w.iter().enumerate() {
        for (b, c) in (4 * cq..(4 * cq + 4).min(kc)).enumerate() {
            let at = c * plane + p0;
            let rest = xs.get(at + whole..at + n).ok_or(Error::BadArgument)?;
            for ((aj, &wj), &z) in acc.iter_mut().zip(wc).zip(zw) {
                let wv = i32::from(wj.to_le_bytes().get(b).copied().unwrap_or(0)) - z;
                let dst = aj.get_mut(whole..n).ok_or(Error::BadArgument)?;
                for (a, &v) in dst.iter_mut().zip(rest) {
                    *a = a.wrapping_add(wv * i32::from(v));
                }
            }
        }
    }
    Ok(())
}
