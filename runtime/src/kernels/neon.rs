//! aarch64 NEON kernels (Advanced SIMD, part of every AArch64 CPU the targets name), each
//! bit-identical to its portable twin in [`super`]: the 1×1 convolution ([`pointwise_neon`]),
//! the tap rows of the other convolutions ([`tap_row_neon`]) and requantization
//! ([`requant_neon`]). Each function's doc comment states why its integer arithmetic cannot
//! saturate or round differently from the portable loops.

use core::arch::aarch64::*;

use crate::error::Error;

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
