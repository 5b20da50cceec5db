//! x86_64 SIMD kernels, each bit-identical to its portable twin in [`super`]: the SSE2 1×1
//! convolution (baseline), and at the AVX2 level the 1×1 convolution by groups of output
//! channels ([`pointwise_quads`]), the direct convolution of depthwise and small layers from
//! padded rows ([`direct_conv`]), wider general convolutions over gathered columns
//! ([`im2col_conv`]), the tap rows of the rest ([`tap_row_avx2`]) and requantization
//! ([`requant_avx2`]); the VNNI level adds `vpdpbusd` for ≤ 4-bit weights and
//! 16-lane requantization ([`requant_avx512`]). Each function's doc comment states why its
//! integer arithmetic cannot saturate or round differently from the portable loops.

use core::arch::x86_64::*;

use super::channel_constants;
use super::plan::{
    band_input_rows, padded_extent, padded_row, COL_OC, COL_PX, DIRECT_MAX_K, DIRECT_ROWS,
    DW_LANES, DW_MAX_TAPS, QUAD_KC,
};
use crate::error::Error;
use crate::packing::Row;

/// [`super::pointwise_tile`] for `acc.len()` a multiple of 16, 16 pixels × all input
/// channels per block with the accumulators in registers. Two channels at a time:
/// `pmaddwd` multiplies interleaved pairs `(a_c, a_{c+1})` by `(w_c, w_{c+1})` and adds
/// the two products into one i32 lane. Exact: `|w| ≤ 255` and `a ≤ 255` are valid i16,
/// the pair sum `≤ 2·255·255` fits i32, and the lane additions wrap as the portable
/// loop's do.
#[target_feature(enable = "sse2")]
pub(super) fn pointwise_sse2(
    in_group: &[u8],
    plane: usize,
    codes: &[u8],
    zw: i32,
    p0: usize,
    acc: &mut [i32],
) -> Result<(), Error> {
    let w = |c: usize| codes.get(c).map_or(0, |&q| (q as i32 - zw) as u16 as i32);
    let row = |c: usize, p: usize| -> Result<__m128i, Error> {
        let xs = in_group
            .get(c * plane + p..c * plane + p + 16)
            .ok_or(Error::BadArgument)?;
        // SAFETY: `xs` holds exactly the 16 bytes the unaligned load reads.
        Ok(unsafe { _mm_loadu_si128(xs.as_ptr().cast()) })
    };
    let zero = _mm_setzero_si128();
    for (b, a16) in acc.chunks_exact_mut(16).enumerate() {
        let p = p0 + 16 * b;
        let mut s = [zero; 4];
        let mut c = 0;
        while c < codes.len() {
            let x0 = row(c, p)?;
            // An odd last channel pairs with a zero weight (and reads its own row again).
            let (x1, w1) = if c + 1 < codes.len() {
                (row(c + 1, p)?, w(c + 1))
            } else {
                (x0, 0)
            };
            let wv = _mm_set1_epi32(w1 << 16 | w(c));
            let (l0, h0) = (_mm_unpacklo_epi8(x0, zero), _mm_unpackhi_epi8(x0, zero));
            let (l1, h1) = (_mm_unpacklo_epi8(x1, zero), _mm_unpackhi_epi8(x1, zero));
            let pairs = [
                _mm_unpacklo_epi16(l0, l1),
                _mm_unpackhi_epi16(l0, l1),
                _mm_unpacklo_epi16(h0, h1),
                _mm_unpackhi_epi16(h0, h1),
            ];
            for (sum, pair) in s.iter_mut().zip(pairs) {
                *sum = _mm_add_epi32(*sum, _mm_madd_epi16(pair, wv));
            }
            c += 2;
        }
        let mut out = [0i32; 16];
        for (chunk, sum) in out.chunks_exact_mut(4).zip(s) {
            // SAFETY: `chunk` holds exactly the 4 i32 the unaligned store writes.
            unsafe { _mm_storeu_si128(chunk.as_mut_ptr().cast(), sum) };
        }
        for (a, o) in a16.iter_mut().zip(out) {
            *a = a.wrapping_add(o);
        }
    }
    Ok(())
}

/// [`requant_avx2`] for the common case `shift ≥ 0` (a factor below one): the rounded
/// magnitude `(|acc|·mult + half) >> n` is below `2^31` (`|acc| ≤ 2^31`, `mult < 2^31`,
/// `n ≥ 31`), so everything after the 64-bit products runs in 32-bit lanes, eight at a time:
/// the sign comes back from `acc`'s own, and the result is clamped to `[lo − zero, hi −
/// zero]` before the zero point is added, which cannot wrap then (when `lo > hi` this gives
/// `hi`, as the scalar form does). `|i32::MIN|` is taken as the unsigned `2^31` by `vpabsd` and
/// the unsigned `vpmuludq`.
#[target_feature(enable = "avx2")]
fn requant_narrow_avx2(
    req: &crate::numerics::ChannelRequant,
    acc: &[i32],
    out: &mut [u8],
) -> usize {
    let (mult, n, half, zero, lo, hi) = req.constants();
    // Both halves of each 64-bit lane (see `requant_avx512`).
    let multv = _mm256_set1_epi32(mult as i32);
    let halfv = _mm256_set1_epi64x(half);
    let count = _mm_cvtsi32_si128(n as i32);
    let zerov = _mm256_set1_epi32(zero as i32);
    let (lo_z, hi_z) = (
        _mm256_set1_epi32((lo - zero) as i32),
        _mm256_set1_epi32((hi - zero) as i32),
    );
    let mut i = 0;
    while let (Some(src), Some(dst)) = (acc.get(i..i + 8), out.get_mut(i..i + 8)) {
        // SAFETY: `src` holds exactly the 8 i32 the load reads.
        let a = unsafe { _mm256_loadu_si256(src.as_ptr().cast()) };
        let mag = _mm256_abs_epi32(a);
        let even = _mm256_srl_epi64(_mm256_add_epi64(_mm256_mul_epu32(mag, multv), halfv), count);
        let odd = _mm256_srl_epi64(
            _mm256_add_epi64(_mm256_mul_epu32(_mm256_srli_epi64(mag, 32), multv), halfv),
            count,
        );
        // Magnitudes below 2^31 in the low half of each 64-bit lane: back into eight lanes.
        let r = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0b1010_1010);
        let sign = _mm256_srai_epi32(a, 31);
        let r = _mm256_sub_epi32(_mm256_xor_si256(r, sign), sign);
        // Clamped to `[lo − zero, hi − zero]` before the zero point is added: no wrap.
        let r = _mm256_min_epi32(_mm256_max_epi32(r, lo_z), hi_z);
        let v = _mm256_add_epi32(r, zerov);
        // `.max(lo).min(hi)`: `hi` wins when `lo > hi`, as in the scalar form.
        let w = _mm256_packus_epi32(v, v);
        let b = _mm256_packus_epi16(w, w);
        let bytes = _mm_unpacklo_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
        // SAFETY: `dst` holds exactly the 8 bytes the store writes.
        unsafe { _mm_storel_epi64(dst.as_mut_ptr().cast(), bytes) };
        i += 8;
    }
    i
}

/// [`requant_narrow_avx2`] sixteen accumulators per step with AVX-512F (implied by the VNNI
/// level's VL): the same 64-bit products and 32-bit tail, the codes narrowed by `vpmovusdb`
/// (every value is already in `[0, 255]`), for `shift ≥ 0`; other factors take
/// [`requant_wide_avx512`]. Returns how many leading accumulators it did.
#[target_feature(enable = "avx2,avx512f,avx512vl")]
pub(super) fn requant_avx512(
    req: &crate::numerics::ChannelRequant,
    acc: &[i32],
    out: &mut [u8],
) -> usize {
    let (mult, n, half, zero, lo, hi) = req.constants();
    if n < 31 || mult < 0 {
        return requant_wide_avx512(req, acc, out);
    }
    // Both halves of each 64-bit lane: `vpmuludq` reads the low one. (A zero-extended
    // broadcast led LLVM to a full 64-bit multiply, four `vpmuludq` per pair of lanes.)
    let multv = _mm512_set1_epi32(mult as i32);
    let halfv = _mm512_set1_epi64(half);
    let count = _mm_cvtsi32_si128(n as i32);
    let zerov = _mm512_set1_epi32(zero as i32);
    let (lo_z, hi_z) = (
        _mm512_set1_epi32((lo - zero) as i32),
        _mm512_set1_epi32((hi - zero) as i32),
    );
    let mut i = 0;
    while let (Some(src), Some(dst)) = (acc.get(i..i + 16), out.get_mut(i..i + 16)) {
        // SAFETY: `src` holds exactly the 16 i32 the load reads.
        let a = unsafe { _mm512_loadu_si512(src.as_ptr().cast()) };
        let mag = _mm512_abs_epi32(a);
        let even = _mm512_srl_epi64(_mm512_add_epi64(_mm512_mul_epu32(mag, multv), halfv), count);
        let odd = _mm512_srl_epi64(
            _mm512_add_epi64(_mm512_mul_epu32(_mm512_srli_epi64(mag, 32), multv), halfv),
            count,
        );
        let r = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
        let sign = _mm512_srai_epi32(a, 31);
        let r = _mm512_sub_epi32(_mm512_xor_si512(r, sign), sign);
        // Clamped to `[lo − zero, hi − zero]` before the zero point is added: no wrap.
        let r = _mm512_min_epi32(_mm512_max_epi32(r, lo_z), hi_z);
        let v = _mm512_add_epi32(r, zerov);
        let bytes = _mm512_cvtusepi32_epi8(v);
        // SAFETY: `dst` holds exactly the 16 bytes the store writes.
        unsafe { _mm_storeu_si128(dst.as_mut_ptr().cast(), bytes) };
        i += 16;
    }
    i
}

/// [`requant_avx2`]'s 64-bit form sixteen accumulators per step with AVX-512F, for the
/// factors of one or more that [`requant_avx512`] leaves: `vpmuldq` forms `acc · mult` exactly
/// (even and odd lanes apart), the magnitude is rounded half away from zero with a logical
/// shift, the sign given back, the zero point added and the clamp applied in 64-bit lanes
/// (`hi` wins when `lo > hi`), as the scalar form computes.
#[target_feature(enable = "avx2,avx512f,avx512vl")]
fn requant_wide_avx512(
    req: &crate::numerics::ChannelRequant,
    acc: &[i32],
    out: &mut [u8],
) -> usize {
    let (mult, n, half, zero, lo, hi) = req.constants();
    // Both halves of each 64-bit lane (see `requant_avx512`); `vpmuldq` reads the low one.
    let multv = _mm512_set1_epi32(mult as i32);
    let halfv = _mm512_set1_epi64(half);
    let zerov = _mm512_set1_epi64(zero);
    let (lov, hiv) = (_mm512_set1_epi64(lo), _mm512_set1_epi64(hi));
    // `n ≤ 62`: a shift count the instruction takes as is.
    let count = _mm_cvtsi32_si128(n as i32);
    let zero64 = _mm512_setzero_si512();
    let round_clamp = |p: __m512i| {
        let neg = _mm512_cmpgt_epi64_mask(zero64, p);
        let mag = _mm512_mask_sub_epi64(p, neg, zero64, p);
        let r = _mm512_srl_epi64(_mm512_add_epi64(mag, halfv), count);
        let v = _mm512_add_epi64(_mm512_mask_sub_epi64(r, neg, zero64, r), zerov);
        _mm512_min_epi64(_mm512_max_epi64(v, lov), hiv)
    };
    let mut i = 0;
    while let (Some(src), Some(dst)) = (acc.get(i..i + 16), out.get_mut(i..i + 16)) {
        // SAFETY: `src` holds exactly the 16 i32 the load reads.
        let a = unsafe { _mm512_loadu_si512(src.as_ptr().cast()) };
        let even = round_clamp(_mm512_mul_epi32(a, multv));
        let odd = round_clamp(_mm512_mul_epi32(_mm512_srli_epi64(a, 32), multv));
        // Codes in 0..=255: back into sixteen 32-bit lanes in order, then bytes.
        let v = _mm512_or_si512(even, _mm512_slli_epi64(odd, 32));
        let bytes = _mm512_cvtusepi32_epi8(v);
        // SAFETY: `dst` holds exactly the 16 bytes the store writes.
        unsafe { _mm_storeu_si128(dst.as_mut_ptr().cast(), bytes) };
        i += 16;
    }
    i
}

/// [`super::tap_row`] for strides 1 and 2, eight output pixels per step: the codes widen to
/// i32 lanes and `vpmulld` multiplies them by the tap's weight. Exact: `|wv| ≤ 255` and
/// `a ≤ 255`, so every product fits i32, and the lane additions wrap as the portable loop's
/// do. A last step of fewer than eight pixels (a short row: 7 or 14 wide) loads whole
/// vectors from `xs`, which runs on past the row, and masks the accumulators it adds to.
/// Returns how many leading pixels it did (steps whose loads stay inside `xs`).
#[target_feature(enable = "avx2")]
pub(super) fn tap_row_avx2(acc: &mut [i32], xs: &[u8], sw: usize, wv: i32) -> usize {
    let w = _mm256_set1_epi32(wv);
    // Stride 2: the even bytes of 16 into the low 8.
    let even = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1);
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mut i = 0;
    while i < acc.len() {
        let r = (acc.len() - i).min(8);
        let x = match sw {
            1 => match xs.get(i..i + 8) {
                // SAFETY: `src` holds exactly the 8 bytes the load reads.
                Some(src) => unsafe { _mm_loadl_epi64(src.as_ptr().cast()) },
                None => break,
            },
            2 => match xs.get(2 * i..2 * i + 16) {
                // SAFETY: `src` holds exactly the 16 bytes the load reads.
                Some(src) => {
                    _mm_shuffle_epi8(unsafe { _mm_loadu_si128(src.as_ptr().cast()) }, even)
                }
                None => break,
            },
            _ => break,
        };
        let prod = _mm256_mullo_epi32(_mm256_cvtepu8_epi32(x), w);
        let Some(dst) = acc.get_mut(i..i + r) else {
            break;
        };
        if r == 8 {
            // SAFETY: `dst` holds exactly the 8 i32 loaded and stored.
            unsafe {
                let a = _mm256_loadu_si256(dst.as_ptr().cast());
                _mm256_storeu_si256(dst.as_mut_ptr().cast(), _mm256_add_epi32(a, prod));
            }
        } else {
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(r as i32), lanes);
            // SAFETY: the mask enables lanes 0..r, exactly the `r` i32 `dst` holds; masked-off
            // lanes are neither read nor written.
            unsafe {
                let a = _mm256_maskload_epi32(dst.as_ptr(), mask);
                _mm256_maskstore_epi32(dst.as_mut_ptr(), mask, _mm256_add_epi32(a, prod));
            }
        }
        i += r;
    }
    i
}

/// [`crate::numerics::ChannelRequant::apply`] on eight accumulators per step, in 64-bit lanes
/// as the scalar form computes: `vpmuldq` forms `acc · mult` exactly (even and odd lanes
/// apart), the magnitude is rounded half away from zero with a logical shift, the sign given
/// back, the zero point added and the clamp applied before narrowing (`hi` wins when
/// `lo > hi`, as in `clamp_code`). Returns how many leading accumulators it did.
#[target_feature(enable = "avx2")]
pub(super) fn requant_avx2(
    req: &crate::numerics::ChannelRequant,
    acc: &[i32],
    out: &mut [u8],
) -> usize {
    let (mult, n, half, zero, lo, hi) = req.constants();
    let multv = _mm256_set1_epi64x(mult);
    let halfv = _mm256_set1_epi64x(half);
    let zerov = _mm256_set1_epi64x(zero);
    let (lov, hiv) = (_mm256_set1_epi64x(lo), _mm256_set1_epi64x(hi));
    // `n ≤ 62`: a shift count the instruction takes as is.
    let count = _mm_cvtsi32_si128(n as i32);
    let zero64 = _mm256_setzero_si256();
    let round_clamp = |p: __m256i| {
        let neg = _mm256_cmpgt_epi64(zero64, p);
        let mag = _mm256_sub_epi64(_mm256_xor_si256(p, neg), neg);
        let r = _mm256_srl_epi64(_mm256_add_epi64(mag, halfv), count);
        let v = _mm256_add_epi64(_mm256_sub_epi64(_mm256_xor_si256(r, neg), neg), zerov);
        let v = _mm256_blendv_epi8(v, lov, _mm256_cmpgt_epi64(lov, v));
        _mm256_blendv_epi8(v, hiv, _mm256_cmpgt_epi64(v, hiv))
    };
    if n >= 31 && mult >= 0 {
        return requant_narrow_avx2(req, acc, out);
    }
    let mut i = 0;
    while let (Some(src), Some(dst)) = (acc.get(i..i + 8), out.get_mut(i..i + 8)) {
        // SAFETY: `src` holds exactly the 8 i32 the load reads.
        let a = unsafe { _mm256_loadu_si256(src.as_ptr().cast()) };
        // `vpmuldq` multiplies the low (signed) 32 bits of each 64-bit lane: lanes 0, 2, 4, 6,
        // then the odd ones shifted down.
        let even = round_clamp(_mm256_mul_epi32(a, multv));
        let odd = round_clamp(_mm256_mul_epi32(_mm256_srli_epi64(a, 32), multv));
        // Codes in 0..=255: back into eight 32-bit lanes in order, then bytes.
        let v = _mm256_or_si256(even, _mm256_slli_epi64(odd, 32));
        let w = _mm256_packus_epi32(v, v);
        let b = _mm256_packus_epi16(w, w);
        let bytes = _mm_unpacklo_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
        // SAFETY: `dst` holds exactly the 8 bytes the store writes.
        unsafe { _mm_storel_epi64(dst.as_mut_ptr().cast(), bytes) };
        i += 8;
    }
    i
}

/// The 1×1 convolution of [`super::conv2d`] (stride 1, no pads) for output channels
/// `first ..` of a group, several at a time: each block of input codes is loaded and widened
/// once and multiplied into the accumulators of four output channels (eight with VNNI, whose
/// AVX-512 VL doubles the vector registers), 16 pixels per block. 8-bit weights: `vpmaddwd`
/// forms `(q_c − z)·a_c + (q_{c+1} − z)·a_{c+1}` per i32 lane (exact: `|q − z| ≤ 255` and
/// `a ≤ 255` are valid i16, a pair sum `≤ 2·255²` fits i32); ≤ 4-bit weights: four input
/// channels per byte product ([`quad4_block_vnni`]). Lane additions wrap as the portable
/// loop's do. Weights are unpacked from the packed rows [`QUAD_KC`] input channels at a time
/// into a stack buffer (no scratch). Returns the first output channel it left to the portable
/// path (fewer than four remain).
#[allow(clippy::too_many_arguments)]
pub(super) fn pointwise_quads(
    weights: &crate::packing::Weights<'_>,
    in_group: &[u8],
    plane: usize,
    z: i32,
    y: (u8, u8, u8),
    out: &mut [u8],
    (first, count): (usize, usize),
    vnni: bool,
    scratch: &mut [u8],
) -> Result<usize, Error> {
    let isa = if vnni {
        super::Isa::Avx512Vnni
    } else {
        super::Isa::Avx2
    };
    let k = weights.k;
    // The input interleaved once for every group of output channels, where the compiler
    // sized the scratch for it (`plan::pointwise_pre_bytes`) and more than one group runs.
    // SAFETY: every bit pattern is a valid `i32`; `align_to_mut` hands out only the aligned
    // middle of the bytes, which the copy then owns for this call.
    let (_, pre, _) = unsafe { scratch.align_to_mut::<i32>() };
    // Rows of whole blocks of 16 pixels: the kernel's last block reads zeros past the plane.
    let stride = plane.next_multiple_of(16);
    let pre = pre.get_mut(..k.div_ceil(4) * stride).filter(|_| {
        super::plan::byte_quads(isa, weights.bits) && plane <= super::CONV_TILE && count >= 8
    });
    let pre = match pre {
        Some(xq) => {
            // SAFETY: AVX2 is available: the caller runs this only when `active()` says so.
            unsafe { interleave_quads(in_group, plane, k, xq)? };
            Some((&*xq, stride))
        }
        None => None,
    };
    let mut co = first;
    if vnni && super::plan::byte_quads(isa, weights.bits) {
        let range = (co, first + count);
        co = pointwise_group::<8>(weights, in_group, plane, z, y, out, range, vnni, pre)?;
    }
    let range = (co, first + count);
    pointwise_group::<4>(weights, in_group, plane, z, y, out, range, vnni, pre)
}

/// `xq[qi · stride + p]`: the codes of input channels `4qi .. 4qi + 4` at pixel `p`, one per
/// byte of an `i32` (a channel past `k` repeats channel `k − 1`, as the kernel's own
/// interleave reads it, and pixels past the plane read 0; `stride` is the plane rounded up to
/// 16), the layout [`quad4_block_vnni`] multiplies; 16 pixels at a time with the same
/// interleave the kernel does per block, the rest code by code.
#[target_feature(enable = "avx2")]
fn interleave_quads(in_group: &[u8], plane: usize, k: usize, xq: &mut [i32]) -> Result<(), Error> {
    let stride = plane.next_multiple_of(16);
    if k == 0 || in_group.len() < k.checked_mul(plane).ok_or(Error::BadArgument)? {
        return Err(Error::BadArgument);
    }
    for (qi, row) in xq.chunks_exact_mut(stride).take(k.div_ceil(4)).enumerate() {
        let chan = |t: usize| (4 * qi + t).min(k - 1) * plane;
        let mut b = 0;
        while b + 16 <= plane {
            let r = |t: usize| -> Result<__m128i, Error> {
                let src = in_group
                    .get(chan(t) + b..chan(t) + b + 16)
                    .ok_or(Error::BadArgument)?;
                // SAFETY: `src` holds exactly the 16 bytes the load reads.
                Ok(unsafe { _mm_loadu_si128(src.as_ptr().cast()) })
            };
            let (r0, r1, r2, r3) = (r(0)?, r(1)?, r(2)?, r(3)?);
            let (l01, h01) = (_mm_unpacklo_epi8(r0, r1), _mm_unpackhi_epi8(r0, r1));
            let (l23, h23) = (_mm_unpacklo_epi8(r2, r3), _mm_unpackhi_epi8(r2, r3));
            let dst = row.get_mut(b..b + 16).ok_or(Error::BadArgument)?;
            // SAFETY: `dst` holds exactly the 16 i32 the four stores write.
            unsafe {
                let d = dst.as_mut_ptr().cast::<__m128i>();
                _mm_storeu_si128(d, _mm_unpacklo_epi16(l01, l23));
                _mm_storeu_si128(d.add(1), _mm_unpackhi_epi16(l01, l23));
                _mm_storeu_si128(d.add(2), _mm_unpacklo_epi16(h01, h23));
                _mm_storeu_si128(d.add(3), _mm_unpackhi_epi16(h01, h23));
            }
            b += 16;
        }
        for (p, v) in row.iter_mut().enumerate().skip(b) {
            let c = |t: usize| match p < plane {
                true => (in_group.get(chan(t) + p).copied().unwrap_or(0) as u32) << (8 * t),
                false => 0,
            };
            *v = (c(0) | c(1) | c(2) | c(3)) as i32;
        }
    }
    Ok(())
}

/// Elements (of `N` lanes) of [`pointwise_group`]'s stack panel: the weights of a group for
/// `K` ≤ 2048 (≤ 4-bit, quads) or ≤ 1024 (8-bit, pairs), 16 KiB at `N = 8`.
const PW_PANEL: usize = 512;

/// [`pointwise_quads`] for output channels `from .. end`, `N` at a time; returns where it
/// stopped (fewer than `N` left). `N = 8` only with `vnni` and ≤ 4-bit weights.
#[allow(clippy::too_many_arguments)]
fn pointwise_group<const N: usize>(
    weights: &crate::packing::Weights<'_>,
    in_group: &[u8],
    plane: usize,
    z: i32,
    y: (u8, u8, u8),
    out: &mut [u8],
    range: (usize, usize),
    vnni: bool,
    pre: Option<(&[i32], usize)>,
) -> Result<usize, Error> {
    let isa = if vnni {
        super::Isa::Avx512Vnni
    } else {
        super::Isa::Avx2
    };
    let per = super::plan::panel_slice_elems(isa, weights.bits);
    let x = (in_group, pre);
    // A stack panel only where it pays: a plane of several tiles, weights that fit.
    if plane > super::CONV_TILE && weights.k.div_ceil(QUAD_KC) * per <= PW_PANEL {
        let mut panel = [[0i32; N]; PW_PANEL];
        let p = Some(panel.as_mut_slice());
        pointwise_groups::<N>(weights, x, plane, z, y, out, range, vnni, p)
    } else {
        pointwise_groups::<N>(weights, x, plane, z, y, out, range, vnni, None)
    }
}

/// [`pointwise_group`] with the group's weights made once per group into `panel` (every
/// slot a group reads is overwritten first), or again per slice of each tile without one.
#[allow(clippy::too_many_arguments)]
fn pointwise_groups<const N: usize>(
    weights: &crate::packing::Weights<'_>,
    (in_group, pre): (&[u8], Option<(&[i32], usize)>),
    plane: usize,
    z: i32,
    (y_zero, y_lo, y_hi): (u8, u8, u8),
    out: &mut [u8],
    (from, end): (usize, usize),
    vnni: bool,
    mut panel: Option<&mut [[i32; N]]>,
) -> Result<usize, Error> {
    // Signed-byte weights (`q − z_c` at ≤ 4 bits, `q − 128` at 8 with VNNI): four input
    // channels per byte product.
    let isa = if vnni {
        super::Isa::Avx512Vnni
    } else {
        super::Isa::Avx2
    };
    let quads = super::plan::byte_quads(isa, weights.bits);
    let k = weights.k;
    if in_group.len() < k.checked_mul(plane).ok_or(Error::BadArgument)? {
        return Err(Error::BadArgument);
    }
    if N == 8 && !(vnni && quads) {
        return Err(Error::BadArgument);
    }
    let per = super::plan::panel_slice_elems(isa, weights.bits);
    // Weights made per slice without a panel: zeroed once here, each use overwrites the
    // elements it reads.
    let mut made = [[0i32; N]; QUAD_KC / 2];
    let mut co = from;
    while co + N <= end {
        let mut reqs = [crate::numerics::ChannelRequant::new(0, 0, 0, 0, 0); N];
        let mut c0 = [0i32; N];
        let mut zw = [0i32; N];
        let mut rows = [Row::default(); N];
        channel_constants(
            weights,
            co,
            z,
            (y_zero, y_lo, y_hi),
            &mut rows,
            &mut zw,
            &mut reqs,
            &mut c0,
        )?;
        let zfix = zero_fix(weights.bits, &zw);
        let cached = panel.is_some();
        if let Some(panel) = panel.as_deref_mut() {
            for (i, slot) in panel
                .chunks_exact_mut(per)
                .take(k.div_ceil(QUAD_KC))
                .enumerate()
            {
                let c = i * QUAD_KC;
                if quads {
                    weight_quads(weights.bits, &rows, &zw, c, QUAD_KC.min(k - c), slot)?;
                } else {
                    weight_pairs(weights.bits, &rows, &zw, c, QUAD_KC.min(k - c), slot)?;
                }
            }
        }
        let mut p0 = 0;
        while p0 < plane {
            let n = super::CONV_TILE.min(plane - p0);
            let mut acc = [[0i32; super::CONV_TILE]; N];
            for (a, &c) in acc.iter_mut().zip(&c0) {
                a.fill(c);
            }
            let mut c = 0;
            while c < k {
                let kc = QUAD_KC.min(k - c);
                let wp: &mut [[i32; N]] = match panel.as_deref_mut() {
                    Some(panel) => {
                        let at = c / QUAD_KC * per;
                        panel.get_mut(at..at + per).ok_or(Error::BadArgument)?
                    }
                    None => &mut made,
                };
                let blk = (in_group, plane, c, kc, p0, n);
                if quads {
                    if !cached {
                        weight_quads(weights.bits, &rows, &zw, c, kc, wp)?;
                    }
                    let wq = wp.get(..kc.div_ceil(4)).ok_or(Error::BadArgument)?;
                    // SAFETY: the caller runs this only when `active()` says the CPU has AVX2
                    // (and, with `vnni`, AVX-512 VNNI and VL).
                    unsafe {
                        if vnni {
                            quad4_block_vnni(blk, pre, wq, &zfix, &mut acc)?
                        } else {
                            quad4_block_avx2(blk, pre, wq, &zfix, &mut acc)?
                        }
                    };
                } else {
                    if !cached {
                        weight_pairs(weights.bits, &rows, &zw, c, kc, wp)?;
                    }
                    // SAFETY: AVX2 is available: the caller runs this only when `active()`
                    // says so.
                    unsafe { quad_block_avx2(in_group, plane, c, kc, wp, p0, n, &mut acc)? };
                }
                c += kc;
            }
            for (j, (a, req)) in acc.iter().zip(&reqs).enumerate() {
                let dst = out
                    .get_mut((co + j) * plane + p0..(co + j) * plane + p0 + n)
                    .ok_or(Error::BadArgument)?;
                let a = a.get(..n).ok_or(Error::BadArgument)?;
                super::requant_tile(req, a, dst);
            }
            p0 += n;
        }
        co += N;
    }
    Ok(co)
}

/// `(w_{c+1} << 16 | w_c as u16)` of input channels `c .. c + kc` (`c` a multiple of 8) for
/// the four rows, one pair per element of `out`; weights of channels past `kc` (a row's zero
/// padding) are 0.
fn weight_pairs<const N: usize>(
    bits: u8,
    rows: &[Row<'_>; N],
    zw: &[i32; N],
    c: usize,
    kc: usize,
    out: &mut [[i32; N]],
) -> Result<(), Error> {
    for (j, (row, &zwj)) in rows.iter().zip(zw).enumerate() {
        let mut codes = [0u8; 8];
        for gi in 0..kc.div_ceil(8) {
            let group = row.group(c / 8 + gi).ok_or(Error::BadArgument)?;
            crate::packing::unpack_group(bits, group, &mut codes);
            let w = |t: usize| {
                if gi * 8 + t < kc {
                    (codes.get(t).copied().unwrap_or(0) as i32 - zwj) as u16 as i32
                } else {
                    0
                }
            };
            for (t, pair) in out.iter_mut().skip(gi * 4).take(4).enumerate() {
                if let Some(v) = pair.get_mut(j) {
                    *v = w(2 * t) | w(2 * t + 1) << 16;
                }
            }
        }
    }
    Ok(())
}

/// Per channel, what [`weight_quads`]' bytes leave out of `q − z_c`: `128 − z_c` for 8-bit
/// weights (stored as `q − 128`), 0 for narrower ones.
fn zero_fix<const N: usize>(bits: u8, zw: &[i32; N]) -> [i32; N] {
    zw.map(|z| if bits == 8 { 128 - z } else { 0 })
}

/// The weights of input channels `c .. c + kc` (`c` a multiple of 8) for the rows (`N`
/// adjacent output channels, as [`channel_constants`] gives them) as signed
/// bytes, four input channels per `i32`, one element of `out` per four channels; channels
/// past `kc` get weight 0. ≤ 4-bit weights: `q − z_c` (`|q − z_c| ≤ 15`); 8-bit weights:
/// `q − 128`, the rest `(128 − z_c)·Σa` being added by the kernel ([`quad4_block_vnni`]'s
/// `zfix`).
fn weight_quads<const N: usize>(
    bits: u8,
    rows: &[Row<'_>; N],
    zw: &[i32; N],
    c: usize,
    kc: usize,
    out: &mut [[i32; N]],
) -> Result<(), Error> {
    let b = bits as usize;
    const LOW: u64 = 0x0101_0101_0101_0101;
    if b == 8 {
        for (j, row) in rows.iter().enumerate() {
            for gi in 0..kc.div_ceil(8) {
                let mut bytes = [0u8; 8];
                let have = row.group(c / 8 + gi).ok_or(Error::BadArgument)?;
                for (d, &x) in bytes.iter_mut().zip(have) {
                    *d = x;
                }
                // `q ^ 0x80` is `q − 128` as an i8.
                let mut d = u64::from_le_bytes(bytes) ^ (0x80 * LOW);
                let valid = kc - gi * 8;
                if valid < 8 {
                    d &= (1u64 << (8 * valid)) - 1;
                }
                for (t, quad) in out.iter_mut().skip(gi * 2).take(2).enumerate() {
                    if let Some(q) = quad.get_mut(j) {
                        *q = (d >> (32 * t)) as u32 as i32;
                    }
                }
            }
        }
        return Ok(());
    }
    if N.is_multiple_of(4) {
        // SAFETY: AVX2 is available: these kernels run only when `active()` says so.
        return unsafe { weight_quads_avx2(bits, rows, zw, c, kc, out) };
    }
    // Spreading a group's `8b` bits to one code per byte in three halvings (`b` ≤ 4): codes
    // 4–7 to the upper 32 bits, then pairs to 16-bit fields, then one code per byte; each
    // step shifts the upper half of every field up and masks both halves.
    let field = |w: usize| (1u64 << w) - 1;
    let m1 = field(4 * b) | field(4 * b) << 32;
    let m2 = field(2 * b) * 0x0001_0001_0001_0001;
    let m3 = field(b) * LOW;
    for (j, (row, &zwj)) in rows.iter().zip(zw).enumerate() {
        for gi in 0..kc.div_ceil(8) {
            // The group's 8 codes (see `format`'s packing) in the low `8b` bits.
            let v = row.group_bits(c / 8 + gi).ok_or(Error::BadArgument)?;
            let v = (v | v << (32 - 4 * b)) & m1;
            let v = (v | v << (16 - 2 * b)) & m2;
            let codes = (v | v << (8 - b)) & m3;
            // Per byte `q − z_c` as an i8 (SWAR): with each byte's top bit set first, no
            // borrow crosses a byte, since `q, z_c ≤ 15` (a valid blob; anything else only
            // gives other numbers, never a panic: the arithmetic wraps).
            let top = 0x80 * LOW;
            let mut d = ((codes | top).wrapping_sub((zwj as u64 & 0xff).wrapping_mul(LOW))) ^ top;
            let valid = kc - gi * 8;
            if valid < 8 {
                // Channels past `kc` (a row's zero padding) weigh 0.
                d &= (1u64 << (8 * valid)) - 1;
            }
            for (t, quad) in out.iter_mut().skip(gi * 2).take(2).enumerate() {
                if let Some(q) = quad.get_mut(j) {
                    *q = (d >> (32 * t)) as u32 as i32;
                }
            }
        }
    }
    Ok(())
}

/// Spreads four groups of `b`-bit codes (`b` ≤ 4), one per 64-bit lane in its low `8b` bits
/// with the higher bits 0, to one code per byte in three halvings: codes 4–7 to the upper 32
/// bits, then pairs to 16-bit fields, then one code per byte (as the scalar `weight_quads`).
#[derive(Clone, Copy)]
struct Spread([__m256i; 3], [__m128i; 3]);

impl Spread {
    #[target_feature(enable = "avx2")]
    fn new(b: usize) -> Self {
        let field = |w: usize| (1u64 << w) - 1;
        let splat = |v: u64| _mm256_set1_epi64x(v as i64);
        let count = |n: usize| _mm_cvtsi32_si128(n as i32);
        Spread(
            [
                splat(field(4 * b) | field(4 * b) << 32),
                splat(field(2 * b) * 0x0001_0001_0001_0001),
                splat(field(b) * 0x0101_0101_0101_0101),
            ],
            [count(32 - 4 * b), count(16 - 2 * b), count(8 - b)],
        )
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    fn apply(&self, v: __m256i) -> __m256i {
        let (m, s) = (&self.0, &self.1);
        let v = _mm256_and_si256(_mm256_or_si256(v, _mm256_sll_epi64(v, s[0])), m[0]);
        let v = _mm256_and_si256(_mm256_or_si256(v, _mm256_sll_epi64(v, s[1])), m[1]);
        _mm256_and_si256(_mm256_or_si256(v, _mm256_sll_epi64(v, s[2])), m[2])
    }
}

/// [`super::dot_packed`] on vectors for ≤ 4-bit rows, 32 codes per step (four groups of the
/// row, each 64-bit lane one group): the codes are spread to one per byte as in
/// [`weight_quads_avx2`] and multiplied with `vpmaddubsw` (`a ≤ 255` unsigned times `q ≤ 15`
/// signed: a pair sums to at most 7,650, no saturation). The `i32` lanes wrap as the scalar
/// sum does, so both give the same sum modulo 2³², the true one where it fits. The last
/// groups (fewer than four) go through the scalar loop.
#[target_feature(enable = "avx2")]
pub(super) fn dot_packed_avx2(row: &Row<'_>, a: &[u8]) -> Result<i32, Error> {
    let b = row.bits() as usize;
    if !(1..=4).contains(&b) {
        return Err(Error::BadArgument);
    }
    let spread = Spread::new(b);
    let steps = a.len() / 32;
    let mut acc = _mm256_setzero_si256();
    let ones = _mm256_set1_epi16(1);
    let g = |i: usize| {
        row.group_bits(i)
            .map(|v| v as i64)
            .ok_or(Error::BadArgument)
    };
    for step in 0..steps {
        let g0 = 4 * step;
        let x = a.get(32 * step..32 * step + 32).ok_or(Error::BadArgument)?;
        // SAFETY: `x` is 32 bytes.
        let x = unsafe { _mm256_loadu_si256(x.as_ptr().cast()) };
        let v = _mm256_setr_epi64x(g(g0)?, g(g0 + 1)?, g(g0 + 2)?, g(g0 + 3)?);
        // One code per byte, in order (`group_bits` leaves the higher bits 0).
        let q = spread.apply(v);
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(x, q), ones));
    }
    let mut lanes = [0i32; 8];
    // SAFETY: `lanes` is 32 bytes.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), acc) };
    let head = lanes.iter().fold(0i32, |s, &v| s.wrapping_add(v));
    Ok(head.wrapping_add(super::dot_packed_from(row, a, 4 * steps)))
}

/// `Σ q·a` of the eight 8-bit rows of the whole panel that starts at output channel `c0`
/// (the format's panel layout: each group of the eight rows is 64 bytes side by side): per
/// group, the 8 input codes widened to 16 bits once and `vpmaddwd` against two rows at a time
/// (a pair at most 2·255² = 130,050). Wrapping `i32` lanes, as [`super::dot_packed`].
#[target_feature(enable = "avx2")]
pub(super) fn dot8_panel_avx2(
    weights: &crate::packing::Weights<'_>,
    c0: usize,
    a: &[u8],
) -> Result<[i32; 8], Error> {
    let row = weights.row(c0).ok_or(Error::BadArgument)?;
    if row.bits() != 8 || a.len() != weights.k {
        return Err(Error::BadArgument);
    }
    let mut acc = [_mm256_setzero_si256(); 4];
    for (g, xs) in a.chunks(8).enumerate() {
        let w = row.span(g, 8).ok_or(Error::BadArgument)?;
        let mut x8 = [0u8; 8];
        for (d, &v) in x8.iter_mut().zip(xs) {
            *d = v;
        }
        // Codes past `K` are 0 in the row; their inputs read 0 here.
        let x = _mm256_cvtepu8_epi16(_mm_set1_epi64x(i64::from_le_bytes(x8)));
        for (p, acc) in acc.iter_mut().enumerate() {
            let pair = w.get(16 * p..16 * p + 16).ok_or(Error::BadArgument)?;
            // SAFETY: `pair` is 16 bytes: rows `2p` and `2p + 1` of group `g`.
            let wv = unsafe { _mm_loadu_si128(pair.as_ptr().cast()) };
            *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(_mm256_cvtepu8_epi16(wv), x));
        }
    }
    let mut dots = [0i32; 8];
    for (p, acc) in acc.iter().enumerate() {
        let mut lanes = [0i32; 8];
        // SAFETY: `lanes` is 32 bytes.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), *acc) };
        // Lanes 0–3 are row `2p`'s, 4–7 row `2p + 1`'s.
        for (half, dot) in lanes.chunks_exact(4).zip(dots.iter_mut().skip(2 * p)) {
            *dot = half.iter().fold(0i32, |s, &v| s.wrapping_add(v));
        }
    }
    Ok(dots)
}

/// [`weight_quads`] for ≤ 4-bit weights, four rows per step in the 64-bit lanes of one
/// register: the same three halvings and per-byte `q − z_c` as the scalar form, then each
/// lane's two 32-bit quads go to their four channels' adjacent slots.
#[target_feature(enable = "avx2")]
fn weight_quads_avx2<const N: usize>(
    bits: u8,
    rows: &[Row<'_>; N],
    zw: &[i32; N],
    c: usize,
    kc: usize,
    out: &mut [[i32; N]],
) -> Result<(), Error> {
    const LOW: u64 = 0x0101_0101_0101_0101;
    let b = bits as usize;
    if !(1..=4).contains(&b) {
        return Err(Error::BadArgument);
    }
    let halvings = Spread::new(b);
    let splat = |v: u64| _mm256_set1_epi64x(v as i64);
    let top = splat(0x80 * LOW);
    // Lanes' low halves (quad `2g`) to the lower 128 bits, high halves (quad `2g + 1`) above.
    let halves = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    // Four groups side by side (`4b` bytes, one panel span), each zero-extended into its
    // 64-bit lane: byte `i` of group `j` to byte `i` of 32-bit lane `j`, then widened.
    let spread = {
        let mut idx = [-1i8; 16];
        for (t, v) in idx.iter_mut().enumerate() {
            if t % 4 < b {
                *v = (t / 4 * b + t % 4) as i8;
            }
        }
        // SAFETY: `idx` is 16 bytes.
        unsafe { _mm_loadu_si128(idx.as_ptr().cast()) }
    };
    for j4 in (0..N).step_by(4) {
        let row = |j: usize| rows.get(j4 + j).copied().ok_or(Error::BadArgument);
        let zl = |j: usize| (zw.get(j4 + j).copied().unwrap_or(0) as u64 & 0xff).wrapping_mul(LOW);
        let zv = _mm256_setr_epi64x(zl(0) as i64, zl(1) as i64, zl(2) as i64, zl(3) as i64);
        let (r0, r1, r2, r3) = (row(0)?, row(1)?, row(2)?, row(3)?);
        // The four rows' groups lie side by side in their panel when the four channels share
        // it (the format's panel layout): one load per group, each group to its 64-bit lane.
        let block = r0.block(c / 8, kc.div_ceil(8), 4);
        for gi in 0..kc.div_ceil(8) {
            let v = match block {
                Some((bytes, stride)) => {
                    let span = bytes
                        .get(gi * stride..gi * stride + 4 * b)
                        .ok_or(Error::BadArgument)?;
                    // Fixed-size reads (a copy of `span.len()` bytes would call memcpy).
                    let (head, tail) = span.split_first_chunk::<8>().ok_or(Error::BadArgument)?;
                    let hi = match *tail {
                        [] => 0,
                        [a, b, c, d] => u32::from_le_bytes([a, b, c, d]) as i64,
                        [a, b, c, d, e, f, g, h] => i64::from_le_bytes([a, b, c, d, e, f, g, h]),
                        _ => return Err(Error::BadArgument),
                    };
                    let lo = i64::from_le_bytes(*head);
                    _mm256_cvtepu32_epi64(_mm_shuffle_epi8(_mm_set_epi64x(hi, lo), spread))
                }
                None => {
                    let g = |r: &Row<'_>| r.group_bits(c / 8 + gi).map(|v| v as i64);
                    let g = |r| g(r).ok_or(Error::BadArgument);
                    _mm256_setr_epi64x(g(&r0)?, g(&r1)?, g(&r2)?, g(&r3)?)
                }
            };
            // Both reads leave each lane's bits above `8b` 0.
            let codes = halvings.apply(v);
            // Per byte `q − z_c` as an i8, as in the scalar form (no borrow crosses a byte).
            let mut d = _mm256_xor_si256(_mm256_sub_epi64(_mm256_or_si256(codes, top), zv), top);
            let valid = kc - gi * 8;
            if valid < 8 {
                // Channels past `kc` (a row's zero padding) weigh 0.
                d = _mm256_and_si256(d, splat((1u64 << (8 * valid)) - 1));
            }
            let q = _mm256_permutevar8x32_epi32(d, halves);
            for (t, quad) in out.iter_mut().skip(gi * 2).take(2).enumerate() {
                let dst = quad.get_mut(j4..j4 + 4).ok_or(Error::BadArgument)?;
                let part = if t == 0 {
                    _mm256_castsi256_si128(q)
                } else {
                    _mm256_extracti128_si256(q, 1)
                };
                // SAFETY: `dst` holds exactly the 4 i32 the store writes.
                unsafe { _mm_storeu_si128(dst.as_mut_ptr().cast(), part) };
            }
        }
    }
    Ok(())
}

/// The 1×1 slice of [`pointwise_quads`] for ≤ 4-bit weights, four input channels per byte
/// product: per block of 16 pixels, the codes of four input channels are interleaved so that
/// each 32-bit lane holds one pixel's four codes, and each output channel adds
/// `Σ_{4 channels} (q − z_c)·a` into its lane, with `vpdpbusd` (`vnni`: exact, the four
/// products summed in i32) or with `vpmaddubsw` + `vpmaddwd` by ones (exact because
/// `|q − z_c| ≤ 15`: a pair sum `≤ 2·255·15 = 7650` never saturates i16). Channels past `kc`
/// read the last channel again with weight 0; the last `n % 16` pixels take the same sums in
/// plain code.
macro_rules! quad4_block {
    ($name:ident, $features:literal, $dot:expr, $dot2:expr) => {
        #[target_feature(enable = $features)]
        fn $name<const N: usize, const L: usize>(
            (in_group, plane, c, kc, p0, n): (&[u8], usize, usize, usize, usize, usize),
            pre: Option<(&[i32], usize)>,
            wq: &[[i32; N]],
            zfix: &[i32; N],
            acc: &mut [[i32; L]; N],
        ) -> Result<(), Error> {
            let quads = kc.div_ceil(4);
            // 8-bit weights come as `q − 128`: each channel adds `zfix_j·Σa` (`128 − z_j`).
            let fix = zfix.iter().any(|&z| z != 0);
            // Σa over the real channels of quad `qi`: weight 1 for each, 0 past `kc`.
            let ones = |qi: usize| -> i32 {
                let valid = (kc - 4 * qi).min(4);
                (0x0101_0101u64 & ((1u64 << (8 * valid)) - 1)) as i32
            };
            // Every load below reads 16 codes of a channel `c .. c + kc` at a pixel `< p0 + n`.
            if kc == 0
                || wq.len() < quads
                || p0 + n > plane
                || in_group.len() < (c + kc).checked_mul(plane).ok_or(Error::BadArgument)?
            {
                return Err(Error::BadArgument);
            }
            let dot = $dot;
            let dot2 = $dot2;
            let mut b = 0;
            // With the interleaved copy, a last partial block too: its rows run on in zeros
            // to a whole block, and the accumulators past `n` (inside `L`) go unused.
            while b + 16 <= n || (pre.is_some() && b < n) {
                let p = p0 + b;
                let mut lo = [_mm256_setzero_si256(); N];
                let mut hi = [_mm256_setzero_si256(); N];
                let (mut sum_lo, mut sum_hi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                // Pixels 0–7 and 8–15 of quad `qi`, four codes per 32-bit lane, in pixel
                // order: from the copy interleaved once per convolution
                // ([`interleave_quads`]), or interleaved here.
                let load = |qi: usize| -> Result<(__m256i, __m256i), Error> {
                    if let Some((xq, stride)) = pre {
                        let at = (c / 4 + qi) * stride + p;
                        let src = xq.get(at..at + 16).ok_or(Error::BadArgument)?;
                        // SAFETY: `src` holds exactly the 16 i32 the two loads read.
                        return Ok(unsafe {
                            (
                                _mm256_loadu_si256(src.as_ptr().cast()),
                                _mm256_loadu_si256(src.as_ptr().add(8).cast()),
                            )
                        });
                    }
                    // SAFETY: every channel index is `< kc` and `p + 16 ≤ p0 + n ≤ plane`,
                    // so each 16-byte load lies inside `in_group` (checked above).
                    let r = |t: usize| unsafe {
                        let ci = (4 * qi + t).min(kc - 1);
                        _mm_loadu_si128(in_group.as_ptr().add((c + ci) * plane + p).cast())
                    };
                    let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
                    let (l01, h01) = (_mm_unpacklo_epi8(r0, r1), _mm_unpackhi_epi8(r0, r1));
                    let (l23, h23) = (_mm_unpacklo_epi8(r2, r3), _mm_unpackhi_epi8(r2, r3));
                    Ok((
                        _mm256_set_m128i(
                            _mm_unpackhi_epi16(l01, l23),
                            _mm_unpacklo_epi16(l01, l23),
                        ),
                        _mm256_set_m128i(
                            _mm_unpackhi_epi16(h01, h23),
                            _mm_unpacklo_epi16(h01, h23),
                        ),
                    ))
                };
                // Two quads per step, their products summed before the widening ([`dot2`]).
                let mut qi = 0;
                while qi + 2 <= quads {
                    let ((x0, x1), (y0, y1)) = (load(qi)?, load(qi + 1)?);
                    let (wa, wb) = (
                        wq.get(qi).ok_or(Error::BadArgument)?,
                        wq.get(qi + 1).ok_or(Error::BadArgument)?,
                    );
                    for (((l, h), &a), &b) in lo.iter_mut().zip(&mut hi).zip(wa).zip(wb) {
                        let (a, b) = (_mm256_set1_epi32(a), _mm256_set1_epi32(b));
                        *l = dot2(*l, (x0, a), (y0, b));
                        *h = dot2(*h, (x1, a), (y1, b));
                    }
                    if fix {
                        let (a, b) = (_mm256_set1_epi32(ones(qi)), _mm256_set1_epi32(ones(qi + 1)));
                        sum_lo = dot2(sum_lo, (x0, a), (y0, b));
                        sum_hi = dot2(sum_hi, (x1, a), (y1, b));
                    }
                    qi += 2;
                }
                if qi < quads {
                    let (x0, x1) = load(qi)?;
                    for ((l, h), &w) in lo
                        .iter_mut()
                        .zip(&mut hi)
                        .zip(wq.get(qi).ok_or(Error::BadArgument)?)
                    {
                        let w = _mm256_set1_epi32(w);
                        *l = dot(*l, x0, w);
                        *h = dot(*h, x1, w);
                    }
                    if fix {
                        let w = _mm256_set1_epi32(ones(qi));
                        sum_lo = dot(sum_lo, x0, w);
                        sum_hi = dot(sum_hi, x1, w);
                    }
                }
                if fix {
                    for ((l, h), &z) in lo.iter_mut().zip(&mut hi).zip(zfix) {
                        let z = _mm256_set1_epi32(z);
                        *l = _mm256_add_epi32(*l, _mm256_mullo_epi32(sum_lo, z));
                        *h = _mm256_add_epi32(*h, _mm256_mullo_epi32(sum_hi, z));
                    }
                }
                for ((a, &l), &h) in acc.iter_mut().zip(&lo).zip(&hi) {
                    let dst = a.get_mut(b..b + 16).ok_or(Error::BadArgument)?;
                    // SAFETY: `dst` holds exactly the 16 i32 the two loads and stores touch.
                    unsafe {
                        let d = dst.as_mut_ptr().cast::<__m256i>();
                        _mm256_storeu_si256(d, _mm256_add_epi32(_mm256_loadu_si256(d), l));
                        let d1 = dst.as_mut_ptr().add(8).cast::<__m256i>();
                        _mm256_storeu_si256(d1, _mm256_add_epi32(_mm256_loadu_si256(d1), h));
                    }
                }
                b += 16;
            }
            for i in b..n {
                let p = p0 + i;
                for (qi, w4) in wq.iter().enumerate().take(quads) {
                    for t in 0..4 {
                        let ci = (4 * qi + t).min(kc - 1);
                        let a = *in_group
                            .get((c + ci) * plane + p)
                            .ok_or(Error::BadArgument)? as i32;
                        let real = (4 * qi + t < kc) as i32;
                        for ((acc_j, &w4j), &z) in acc.iter_mut().zip(w4).zip(zfix) {
                            let w = (w4j >> (8 * t)) as i8 as i32;
                            let s = acc_j.get_mut(i).ok_or(Error::BadArgument)?;
                            *s = s.wrapping_add(w * a).wrapping_add(real * z * a);
                        }
                    }
                }
            }
            Ok(())
        }
    };
}

// The closures expand inside the functions, whose target features they inherit.
// `dot2` adds two quads' products: with `vpmaddubsw`, two pair sums (each `|·| ≤ 7650`)
// added in i16 stay within `±15300`, so one `vpmaddwd` widens both (exact).
quad4_block!(
    quad4_block_avx2,
    "avx2",
    |s: __m256i, x, w| {
        _mm256_add_epi32(
            s,
            _mm256_madd_epi16(_mm256_maddubs_epi16(x, w), _mm256_set1_epi16(1)),
        )
    },
    |s: __m256i, (x, a): (__m256i, __m256i), (y, b): (__m256i, __m256i)| {
        let pairs = _mm256_add_epi16(_mm256_maddubs_epi16(x, a), _mm256_maddubs_epi16(y, b));
        _mm256_add_epi32(s, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
);
quad4_block!(
    quad4_block_vnni,
    "avx2,avx512vnni,avx512vl",
    |s: __m256i, x, w| _mm256_dpbusd_epi32(s, x, w),
    |s: __m256i, (x, a): (__m256i, __m256i), (y, b): (__m256i, __m256i)| {
        _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(s, x, a), y, b)
    }
);

/// One [`QUAD_KC`]-channel slice of [`pointwise_quads`]: input channels `c .. c + kc` into
/// the accumulators of pixels `p0 .. p0 + n` of four output channels. Whole blocks of 16
/// pixels in registers; the last `n % 16` pixels with the same pair sums in plain code.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2")]
fn quad_block_avx2<const N: usize, const L: usize>(
    in_group: &[u8],
    plane: usize,
    c: usize,
    kc: usize,
    wp: &[[i32; N]],
    p0: usize,
    n: usize,
    acc: &mut [[i32; L]; N],
) -> Result<(), Error> {
    let pairs = kc.div_ceil(2);
    // Every load below reads 16 codes of a channel `c .. c + kc` at a pixel `< p0 + n`.
    if kc == 0
        || wp.len() < pairs
        || p0 + n > plane
        || in_group.len() < (c + kc).checked_mul(plane).ok_or(Error::BadArgument)?
    {
        return Err(Error::BadArgument);
    }
    let mut b = 0;
    while b + 16 <= n {
        let p = p0 + b;
        let mut lo = [_mm256_setzero_si256(); N];
        let mut hi = [_mm256_setzero_si256(); N];
        for (pi, wq) in wp.iter().enumerate().take(pairs) {
            // An odd last channel pairs with itself; its weight pair's high half is 0.
            let (c0, c1) = (2 * pi, (2 * pi + 1).min(kc - 1));
            // SAFETY: `c0, c1 < kc` and `p + 16 ≤ p0 + n ≤ plane`, so both 16-byte loads lie
            // inside `in_group` (checked above).
            let (x0, x1) = unsafe {
                let at = |ci: usize| in_group.as_ptr().add((c + ci) * plane + p).cast();
                (
                    _mm256_cvtepu8_epi16(_mm_loadu_si128(at(c0))),
                    _mm256_cvtepu8_epi16(_mm_loadu_si128(at(c1))),
                )
            };
            // Per 128-bit lane: pixels 0–3 | 8–11 (lo) and 4–7 | 12–15 (hi), channel pairs.
            let (pl, ph) = (_mm256_unpacklo_epi16(x0, x1), _mm256_unpackhi_epi16(x0, x1));
            for ((l, h), &w) in lo.iter_mut().zip(&mut hi).zip(wq) {
                let w = _mm256_set1_epi32(w);
                *l = _mm256_add_epi32(*l, _mm256_madd_epi16(pl, w));
                *h = _mm256_add_epi32(*h, _mm256_madd_epi16(ph, w));
            }
        }
        for ((a, &l), &h) in acc.iter_mut().zip(&lo).zip(&hi) {
            let dst = a.get_mut(b..b + 16).ok_or(Error::BadArgument)?;
            // Back to pixel order: 0–7 and 8–15.
            let first = _mm256_permute2x128_si256(l, h, 0x20);
            let second = _mm256_permute2x128_si256(l, h, 0x31);
            // SAFETY: `dst` holds exactly the 16 i32 the two loads and stores touch.
            unsafe {
                let d = dst.as_mut_ptr().cast::<__m256i>();
                _mm256_storeu_si256(d, _mm256_add_epi32(_mm256_loadu_si256(d), first));
                let d1 = dst.as_mut_ptr().add(8).cast::<__m256i>();
                _mm256_storeu_si256(d1, _mm256_add_epi32(_mm256_loadu_si256(d1), second));
            }
        }
        b += 16;
    }
    let chan = |ci: usize| in_group.get((c + ci.min(kc - 1)) * plane..);
    for i in b..n {
        let p = p0 + i;
        for (pi, wq) in wp.iter().enumerate().take(pairs) {
            let a0 = chan(2 * pi)
                .and_then(|r| r.get(p))
                .ok_or(Error::BadArgument)?;
            let a1 = chan(2 * pi + 1)
                .and_then(|r| r.get(p))
                .ok_or(Error::BadArgument)?;
            for (acc_j, &w) in acc.iter_mut().zip(wq) {
                let (w0, w1) = (w as i16 as i32, w >> 16);
                let a = acc_j.get_mut(i).ok_or(Error::BadArgument)?;
                *a = a
                    .wrapping_add(w0 * *a0 as i32)
                    .wrapping_add(w1 * *a1 as i32);
            }
        }
    }
    Ok(())
}

/// [`direct_conv`]'s working memory, made once per convolution (on the stack) rather than
/// zeroed again for every output channel, which costs more than the MACs of a 7×7 plane.
pub(super) struct DirectScratch {
    rows: [u8; DIRECT_ROWS],
    taps: [(usize, i32); DIRECT_MAX_K],
    acc: [i32; super::CONV_TILE],
}

impl DirectScratch {
    pub(super) const fn new() -> Self {
        Self {
            rows: [0; DIRECT_ROWS],
            taps: [(0, 0); DIRECT_MAX_K],
            acc: [0; super::CONV_TILE],
        }
    }
}

/// One output channel of [`super::conv2d`] with every tap's weight in registers, a band of
/// output rows at a time (as many as fit [`super::CONV_TILE`] accumulators and their input
/// rows [`DIRECT_ROWS`]). The band's input rows are copied into the caller's [`DirectScratch`] (on the
/// stack, made once per convolution) with their pads
/// (and rows above or below the input) filled with `z`, the value padding reads in the tap
/// path; then every output pixel takes all `K` multiply–adds from that buffer, sixteen pixels
/// per step (taps paired into `vpmaddwd`, one store; a last partial step masks its lanes),
/// and the band is requantized in one pass. Exact: every product `|q − z_c|·a ≤ 255²` fits
/// i32 and the sums wrap like the portable loops', so the order of summation does not matter.
#[allow(clippy::too_many_arguments)]
pub(super) fn direct_conv(
    geom: &super::ConvGeom,
    s: &super::ConvShape,
    in_group: &[u8],
    codes: &[u8],
    (zw, z, c0): (i32, i32, i32),
    req: &crate::numerics::ChannelRequant,
    out_c: &mut [u8],
    scratch: &mut DirectScratch,
) -> Result<(), Error> {
    let (kh, kw) = (geom.kernel_h, geom.kernel_w);
    let (sh, sw, dh, dw) = (
        geom.stride_h,
        geom.stride_w,
        geom.dilation_h,
        geom.dilation_w,
    );
    let plane = s.h * s.w;
    let row_len = padded_row(geom, s);
    // Output rows per band: their accumulators and their input rows fit the buffers.
    let mut band = (super::CONV_TILE / s.out_w).clamp(1, s.out_h);
    while band > 1 && s.c_in_g * band_input_rows(geom, band) * row_len > DIRECT_ROWS {
        band -= 1;
    }
    let n_in = band_input_rows(geom, band);
    let DirectScratch { rows, taps, acc } = scratch;
    let rows = rows
        .get_mut(..s.c_in_g * n_in * row_len)
        .ok_or(Error::BadArgument)?;
    // (offset in `rows` of the tap's input for output pixel (0, 0) of the band, weight), in
    // the order of the codes `(c_in, ky, kx)`.
    let taps = taps.get_mut(..s.k).ok_or(Error::BadArgument)?;
    let mut slots = taps.iter_mut().zip(codes);
    for ci in 0..s.c_in_g {
        for ky in 0..kh {
            for kx in 0..kw {
                let (tap, &q) = slots.next().ok_or(Error::BadArgument)?;
                *tap = ((ci * n_in + ky * dh) * row_len + kx * dw, q as i32 - zw);
            }
        }
    }
    let taps = &*taps;
    // Weights `|q − z_c| ≤ 15` (every ≤ 4-bit layer) take the byte-product steps.
    let small = taps.iter().all(|&(_, w)| (-15..=15).contains(&w));
    let mut oy0 = 0;
    while oy0 < s.out_h {
        let oy1 = (oy0 + band).min(s.out_h);
        // Padded input row `py` is input row `py − pad_top`.
        for (r, row) in rows.chunks_exact_mut(row_len).enumerate() {
            let (ci, py) = (r / n_in, oy0 * sh + r % n_in);
            row.fill(z as u8);
            if let Some(iy) = py.checked_sub(geom.pad_top).filter(|&v| v < s.h) {
                let src = in_group
                    .get(ci * plane + iy * s.w..ci * plane + (iy + 1) * s.w)
                    .ok_or(Error::BadArgument)?;
                row.get_mut(geom.pad_left..geom.pad_left + s.w)
                    .ok_or(Error::BadArgument)?
                    .copy_from_slice(src);
            }
        }
        let n = (oy1 - oy0) * s.out_w;
        let a = acc.get_mut(..n).ok_or(Error::BadArgument)?;
        for (i, out_row) in a.chunks_mut(s.out_w).enumerate() {
            // Steps of 32 pixels on byte products where the weights allow (a last one of 16
            // or more too), then 16.
            let rest = out_row.len() % 32;
            let wide = match small {
                true if rest >= 16 => out_row.len(),
                true => out_row.len() - rest,
                false => 0,
            };
            let (head, tail) = out_row.split_at_mut(wide);
            for (j, step) in head.chunks_mut(32).enumerate() {
                let start = i * sh * row_len + 32 * j * sw;
                // SAFETY: AVX2 is available: the caller runs this only when `active()` says so.
                unsafe { direct_step32_avx2(rows, sw, taps, c0, start, step)? };
            }
            for (j, step) in tail.chunks_mut(16).enumerate() {
                let start = i * sh * row_len + (wide + 16 * j) * sw;
                // SAFETY: as above.
                unsafe { direct_step_avx2(rows, sw, taps, c0, start, step)? };
            }
        }
        let dst = out_c
            .get_mut(oy0 * s.out_w..oy0 * s.out_w + n)
            .ok_or(Error::BadArgument)?;
        super::requant_tile(req, a, dst);
        oy0 = oy1;
    }
    Ok(())
}

/// `dst.len()` (1–16) output pixels of one row: `c0` plus every tap's product, in two
/// registers of eight lanes; `start` is the first pixel's input column in the padded rows.
/// Taps go two at a time: their codes interleaved per pixel, `vpmaddwd` forms
/// `w_a·a + w_b·b` in one i32 lane (exact: `|w| ≤ 255`, `a ≤ 255` are valid i16 and the pair
/// sum fits i32); an odd last tap multiplies alone.
#[target_feature(enable = "avx2")]
fn direct_step_avx2(
    rows: &[u8],
    sw: usize,
    taps: &[(usize, i32)],
    c0: i32,
    start: usize,
    dst: &mut [i32],
) -> Result<(), Error> {
    let wide = dst.len() > 8;
    let (mut v0, mut v1) = (_mm256_set1_epi32(c0), _mm256_set1_epi32(c0));
    let mut pairs = taps.chunks_exact(2);
    for pair in &mut pairs {
        let &[(oa, wa), (ob, wb)] = pair else {
            continue; // `chunks_exact(2)`: never shorter
        };
        let (a0, a1) = direct_codes(rows, sw, wide, oa + start)?;
        let (b0, b1) = direct_codes(rows, sw, wide, ob + start)?;
        let w = _mm256_set1_epi32(wb << 16 | (wa as u16 as i32));
        let ab0 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(a0, b0));
        v0 = _mm256_add_epi32(v0, _mm256_madd_epi16(ab0, w));
        if wide {
            let ab1 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(a1, b1));
            v1 = _mm256_add_epi32(v1, _mm256_madd_epi16(ab1, w));
        }
    }
    for &(off, w) in pairs.remainder() {
        let w = _mm256_set1_epi32(w);
        let (x0, x1) = direct_codes(rows, sw, wide, off + start)?;
        v0 = _mm256_add_epi32(v0, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(x0), w));
        if wide {
            v1 = _mm256_add_epi32(v1, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(x1), w));
        }
    }
    store_lanes(dst, &[v0, v1]);
    Ok(())
}

/// Stores the lanes of `vs`, eight i32 each, into `dst` in order, as many as it holds (a
/// last, shorter part with a masked store).
#[inline]
#[target_feature(enable = "avx2")]
fn store_lanes(dst: &mut [i32], vs: &[__m256i]) {
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (part, &v) in dst.chunks_mut(8).zip(vs) {
        if part.len() == 8 {
            // SAFETY: `part` holds exactly the 8 i32 the store writes.
            unsafe { _mm256_storeu_si256(part.as_mut_ptr().cast(), v) };
        } else {
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(part.len() as i32), lanes);
            // SAFETY: the mask enables lanes 0..len, exactly the i32 `part` holds.
            unsafe { _mm256_maskstore_epi32(part.as_mut_ptr(), mask, v) };
        }
    }
}

/// [`direct_step_avx2`] for `dst.len()` (16–32) pixels of one row whose weights are all
/// within `±15`, computed 32 at a time (a short step's loads run into the row's slack): the
/// taps' codes interleaved in pairs, `vpmaddubsw` multiplies the unsigned codes by the signed
/// weight pair and adds the two products into one i16 lane; four pairs accumulate in i16
/// before widening to i32. Exact: a pair sum is at most `2·255·15 = 7650` in magnitude (no
/// saturation), four of them `30600 < 2^15`, and the i32 sums wrap as the portable loops' do.
#[target_feature(enable = "avx2")]
fn direct_step32_avx2(
    rows: &[u8],
    sw: usize,
    taps: &[(usize, i32)],
    c0: i32,
    start: usize,
    dst: &mut [i32],
) -> Result<(), Error> {
    // Lanes after the in-lane byte interleave: `lo` holds pixels 0–7 and 16–23, `hi` 8–15
    // and 24–31, as i16 once multiplied.
    let mut acc = [_mm256_set1_epi32(c0); 4];
    let zero = _mm256_setzero_si256();
    for quad in taps.chunks(8) {
        let (mut lo, mut hi) = (zero, zero);
        for pair in quad.chunks(2) {
            let (oa, wa) = pair.first().copied().ok_or(Error::BadArgument)?;
            // An odd last tap pairs with itself at weight 0.
            let (ob, wb) = pair.get(1).copied().unwrap_or((oa, 0));
            let a = direct_codes32(rows, sw, oa + start)?;
            let b = direct_codes32(rows, sw, ob + start)?;
            let w =
                _mm256_set1_epi16(((wb as i8 as u8 as u16) << 8 | wa as i8 as u8 as u16) as i16);
            lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(_mm256_unpacklo_epi8(a, b), w));
            hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(_mm256_unpackhi_epi8(a, b), w));
        }
        let widen = |v: __m128i| _mm256_cvtepi16_epi32(v);
        let [a0, a1, a2, a3] = &mut acc;
        *a0 = _mm256_add_epi32(*a0, widen(_mm256_castsi256_si128(lo)));
        *a1 = _mm256_add_epi32(*a1, widen(_mm256_castsi256_si128(hi)));
        *a2 = _mm256_add_epi32(*a2, widen(_mm256_extracti128_si256(lo, 1)));
        *a3 = _mm256_add_epi32(*a3, widen(_mm256_extracti128_si256(hi, 1)));
    }
    store_lanes(dst, &acc);
    Ok(())
}

/// The codes one tap reads for 32 pixels from `rows[at..]`, every `sw`-th code (`sw` 1 or
/// 2), in order.
#[inline]
#[target_feature(enable = "avx2")]
fn direct_codes32(rows: &[u8], sw: usize, at: usize) -> Result<__m256i, Error> {
    let src = rows.get(at..at + 32 * sw).ok_or(Error::BadArgument)?;
    // SAFETY: `src` holds exactly the `32·sw` bytes the loads read.
    Ok(unsafe {
        let p = src.as_ptr();
        if sw == 1 {
            _mm256_loadu_si256(p.cast())
        } else {
            // Even codes of each 16-bit pair, packed: lanes come out as (lo.0, hi.0, lo.1,
            // hi.1) in 64-bit quarters, which the permute puts back in order.
            let mask = _mm256_set1_epi16(0xff);
            let lo = _mm256_and_si256(_mm256_loadu_si256(p.cast()), mask);
            let hi = _mm256_and_si256(_mm256_loadu_si256(p.add(32).cast()), mask);
            _mm256_permute4x64_epi64(_mm256_packus_epi16(lo, hi), 0b11_01_10_00)
        }
    })
}

/// The codes one tap reads for eight pixels (and, when `wide`, the next eight) from
/// `rows[at..]`, every `sw`-th code (`sw` 1 or 2), in the low 8 bytes of each register.
#[inline]
#[target_feature(enable = "avx2")]
fn direct_codes(
    rows: &[u8],
    sw: usize,
    wide: bool,
    at: usize,
) -> Result<(__m128i, __m128i), Error> {
    let span = if wide { 16 } else { 8 } * sw;
    let src = rows.get(at..at + span).ok_or(Error::BadArgument)?;
    let even = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1);
    // SAFETY: `src` holds exactly the `span` bytes the loads read.
    Ok(unsafe {
        let p = src.as_ptr();
        match (sw, wide) {
            (1, false) => (_mm_loadl_epi64(p.cast()), _mm_setzero_si128()),
            (1, true) => {
                let x = _mm_loadu_si128(p.cast());
                (x, _mm_srli_si128(x, 8))
            }
            (_, false) => (
                _mm_shuffle_epi8(_mm_loadu_si128(p.cast()), even),
                _mm_setzero_si128(),
            ),
            (_, true) => (
                _mm_shuffle_epi8(_mm_loadu_si128(p.cast()), even),
                _mm_shuffle_epi8(_mm_loadu_si128(p.add(16).cast()), even),
            ),
        }
    })
}

/// A general convolution (any kernel, stride, dilation, pads; `K` too wide for
/// [`direct_conv`]) as a GEMM over gathered columns: per tile of [`COL_PX`] output pixels and
/// slice of [`QUAD_KC`] reduction indices `(c_in, ky, kx)`, the codes each index reads for
/// each pixel (`z` where the tap falls in the padding) are gathered once into a 4 KiB stack
/// buffer laid out as [`QUAD_KC`] rows of [`COL_PX`] codes, i.e. as [`pointwise_quads`]'
/// input, and the same 1×1 kernels multiply it into the accumulators of up to [`COL_OC`]
/// output channels. Their weights, as those kernels read them (pairs or quads of `q − z_c`),
/// are made once per block of output channels into `panel` (the scratch region past the
/// unpacked row) where it is large enough ([`super::plan::panel_elems`]), else again per
/// tile on the stack. Output channels `first .. first + count` of the group, a multiple of
/// the kernels' group width at a time; returns the first one left to the portable path. Exact
/// for the reasons given at the 1×1 kernels; every sum wraps like the portable loops'.
#[allow(clippy::too_many_arguments)]
pub(super) fn im2col_conv(
    geom: &super::ConvGeom,
    s: &super::ConvShape,
    weights: &crate::packing::Weights<'_>,
    in_group: &[u8],
    z: i32,
    y: (u8, u8, u8),
    out: &mut [u8],
    (first, count): (usize, usize),
    isa: super::Isa,
    panel: &mut [u8],
) -> Result<usize, Error> {
    let width = super::plan::col_width(isa, weights.bits);
    let vnni = isa == super::Isa::Avx512Vnni;
    let at = super::plan::panel_bytes(isa, geom, s, weights.bits).min(panel.len());
    let (panel, rest) = panel.split_at_mut(at);
    // SAFETY: every bit pattern is a valid `i32`; `align_to_mut` hands out only the aligned
    // middle of the bytes, which the panel then owns for this call.
    let (_, panel, _) = unsafe { panel.align_to_mut::<i32>() };
    let need = super::plan::panel_elems(isa, geom, s, weights.bits);
    let panel = panel.get_mut(..need).filter(|_| need > 0);
    // The input with its pads, once for every block of output channels, where the compiler
    // sized the scratch for it.
    let need = super::plan::padded_bytes(isa, geom, s);
    let padded = match rest.get_mut(..need).filter(|_| need > 0) {
        Some(xp) => {
            pad_input(geom, s, in_group, z as u8, xp)?;
            Some(&*xp)
        }
        None => None,
    };
    let end = first + count;
    let mut co = first;
    let mut panel = panel;
    while co + width <= end {
        let oc = (end - co).min(COL_OC) / width * width;
        let blk = (co, oc);
        let p = (panel.as_deref_mut(), padded);
        if width == 8 {
            im2col_block::<8>(geom, s, weights, in_group, z, y, out, blk, vnni, p)?;
        } else {
            im2col_block::<4>(geom, s, weights, in_group, z, y, out, blk, vnni, p)?;
        }
        co += oc;
    }
    Ok(co)
}

/// The group's input planes with their pads (and rows or columns outside the input) set to
/// `z`, each [`super::plan::padded_extent`] in size, back to back, then
/// [`super::plan::PAD_SLACK`] bytes for the gather's whole-vector loads.
fn pad_input(
    geom: &super::ConvGeom,
    s: &super::ConvShape,
    in_group: &[u8],
    z: u8,
    xp: &mut [u8],
) -> Result<(), Error> {
    let (rows, cols) = super::plan::padded_extent(geom, s);
    let plane = s.h * s.w;
    xp.fill(z);
    // Input columns that land inside the padded rows.
    let w = s.w.min(cols.saturating_sub(geom.pad_left));
    for (ci, dst) in xp.chunks_exact_mut(rows * cols).take(s.c_in_g).enumerate() {
        for (r, row) in dst.chunks_exact_mut(cols).enumerate() {
            let Some(iy) = r.checked_sub(geom.pad_top).filter(|&iy| iy < s.h) else {
                continue;
            };
            let at = ci * plane + iy * s.w;
            let src = in_group.get(at..at + w).ok_or(Error::BadArgument)?;
            row.get_mut(geom.pad_left..geom.pad_left + w)
                .ok_or(Error::BadArgument)?
                .copy_from_slice(src);
        }
    }
    Ok(())
}

/// [`gather_row`] from the padded input of [`pad_input`] (strides 1 and 2 along rows): each run
/// of pixels along an output row is one copy of whole 32-byte vectors from padded row
/// `oy·stride_h + dy`, column `ox·sw + dx`, whatever the pads; at stride 2 the even codes of
/// 64 bytes are packed into 32 as [`direct_codes32`] does. A copy may write up to 64 bytes past
/// its run's start: the next run, row or the column buffer's slack takes them.
#[target_feature(enable = "avx2")]
fn gather_padded(
    xp: &[u8],
    (cols, sh, sw, out_w): (usize, usize, usize, usize),
    base: usize,
    p0: usize,
    n: usize,
    dst: &mut [u8],
) -> Result<(), Error> {
    let (mut oy, mut ox) = (p0 / out_w, p0 % out_w);
    let mut q = 0;
    while q < n {
        let run = (out_w - ox).min(n - q);
        let at = base + oy * sh * cols + ox * sw;
        let d = dst.get_mut(q..q + 64).ok_or(Error::BadArgument)?;
        for (h, part) in d.chunks_exact_mut(32).enumerate().take(run.div_ceil(32)) {
            let v = direct_codes32(xp, sw, at + 32 * h * sw)?;
            // SAFETY: `part` holds exactly the 32 bytes the store writes.
            unsafe { _mm256_storeu_si256(part.as_mut_ptr().cast(), v) };
        }
        q += run;
        (oy, ox) = (oy + 1, 0);
    }
    Ok(())
}

/// [`im2col_conv`] for output channels `co .. co + oc` (`oc` a multiple of `N`, ≤ [`COL_OC`]).
#[allow(clippy::too_many_arguments)]
fn im2col_block<const N: usize>(
    geom: &super::ConvGeom,
    s: &super::ConvShape,
    weights: &crate::packing::Weights<'_>,
    in_group: &[u8],
    z: i32,
    (y_zero, y_lo, y_hi): (u8, u8, u8),
    out: &mut [u8],
    (co, oc): (usize, usize),
    vnni: bool,
    (panel, padded): (Option<&mut [i32]>, Option<&[u8]>),
) -> Result<(), Error> {
    let isa = if vnni {
        super::Isa::Avx512Vnni
    } else {
        super::Isa::Avx2
    };
    let quads = super::plan::byte_quads(isa, weights.bits);
    let k = s.k;
    let (rows_p, cols_p) = super::plan::padded_extent(geom, s);
    let (kh, kw) = (geom.kernel_h, geom.kernel_w);
    let plane = s.h * s.w;
    let out_plane = s.out_h * s.out_w;
    if oc % N != 0 || oc > COL_OC || in_group.len() < s.c_in_g * plane {
        return Err(Error::BadArgument);
    }
    let mut reqs = [crate::numerics::ChannelRequant::new(0, 0, 0, 0, 0); COL_OC];
    let mut c0 = [0i32; COL_OC];
    let mut zw = [0i32; COL_OC];
    let mut rows = [Row::default(); COL_OC];
    channel_constants(
        weights,
        co,
        z,
        (y_zero, y_lo, y_hi),
        rows.get_mut(..oc).ok_or(Error::BadArgument)?,
        &mut zw,
        &mut reqs,
        &mut c0,
    )?;
    // The weights of group `g` (`N` channels) for the slice at reduction index `c`: made into
    // `wp`, or read from the panel, which holds every (slice, group) in that order.
    let per = super::plan::panel_slice_elems(isa, weights.bits);
    let group_weights = |g: usize, c: usize, kc: usize, wp: &mut [[i32; N]]| {
        let rows_g: &[Row<'_>; N] = rows
            .get(g * N..g * N + N)
            .and_then(|r| r.try_into().ok())
            .ok_or(Error::BadArgument)?;
        let zw_g: &[i32; N] = zw
            .get(g * N..g * N + N)
            .and_then(|r| r.try_into().ok())
            .ok_or(Error::BadArgument)?;
        if quads {
            weight_quads(weights.bits, rows_g, zw_g, c, kc, wp)
        } else {
            weight_pairs(weights.bits, rows_g, zw_g, c, kc, wp)
        }
    };
    let panel = match panel {
        Some(p) if p.len() >= k.div_ceil(QUAD_KC) * per * oc => {
            let (slots, _) = p.as_chunks_mut::<N>();
            for (i, slot) in slots
                .chunks_exact_mut(per)
                .take(k.div_ceil(QUAD_KC) * oc / N)
                .enumerate()
            {
                let (c, g) = (i / (oc / N) * QUAD_KC, i % (oc / N));
                group_weights(g, c, QUAD_KC.min(k - c), slot)?;
            }
            Some(&*slots)
        }
        _ => None,
    };
    // One row of `COL_PX` codes per reduction index, and slack for `gather_padded`'s copies.
    let mut col = [0u8; QUAD_KC * COL_PX + 64];
    let mut colq = [0i32; QUAD_KC / 4 * COL_PX];
    let mut acc = [[0i32; COL_PX]; COL_OC];
    // Weights made per slice without a panel: zeroed once here, each use overwrites the
    // elements it reads.
    let mut wp = [[0i32; N]; QUAD_KC / 2];
    let mut p0 = 0;
    while p0 < out_plane {
        let n = COL_PX.min(out_plane - p0);
        for (a, &c) in acc.iter_mut().zip(&c0).take(oc) {
            a.fill(c);
        }
        let mut c = 0;
        while c < k {
            let kc = QUAD_KC.min(k - c);
            // Gather: row `v` of `col` holds, for each pixel of the tile, the code that
            // reduction index `c + v` reads.
            // Reduction index `c` is `(ci, ky, kx)`; counted up from there, not divided.
            let (mut ci, mut ky, mut kx) = (c / (kh * kw), c / kw % kh, c % kw);
            for v in 0..kc {
                let (ci, ky, kx) = {
                    let here = (ci, ky, kx);
                    kx += 1;
                    if kx == kw {
                        (kx, ky) = (0, ky + 1);
                        if ky == kh {
                            (ky, ci) = (0, ci + 1);
                        }
                    }
                    here
                };
                let tap = (ky * geom.dilation_h, kx * geom.dilation_w);
                if let Some(xp) = padded {
                    let base = (ci * rows_p + tap.0) * cols_p + tap.1;
                    let dst = col.get_mut(v * COL_PX..).ok_or(Error::BadArgument)?;
                    let shape = (cols_p, geom.stride_h, geom.stride_w, s.out_w);
                    // SAFETY: AVX2 is available: the caller runs this only when `active()`
                    // says so.
                    unsafe { gather_padded(xp, shape, base, p0, n, dst)? };
                    continue;
                }
                let chan = in_group
                    .get(ci * plane..(ci + 1) * plane)
                    .ok_or(Error::BadArgument)?;
                let dst = col
                    .get_mut(v * COL_PX..v * COL_PX + n)
                    .ok_or(Error::BadArgument)?;
                gather_row(geom, s, chan, tap, z as u8, p0, dst)?;
            }
            let blk = (col.as_slice(), COL_PX, 0, kc, 0, n);
            // Byte quads: the columns interleaved once for every group (see `pointwise_quads`).
            let pre = if quads {
                // SAFETY: AVX2 is available: the caller runs this only when `active()` says so.
                unsafe { interleave_quads(&col, COL_PX, kc, &mut colq)? };
                Some((colq.as_slice(), COL_PX))
            } else {
                None
            };
            for g in 0..oc / N {
                let acc_g: &mut [[i32; COL_PX]; N] = acc
                    .get_mut(g * N..g * N + N)
                    .and_then(|r| r.try_into().ok())
                    .ok_or(Error::BadArgument)?;
                let w: &[[i32; N]] = match panel {
                    Some(slots) => {
                        let at = (c / QUAD_KC * (oc / N) + g) * per;
                        slots.get(at..at + per).ok_or(Error::BadArgument)?
                    }
                    None => {
                        group_weights(g, c, kc, &mut wp)?;
                        &wp
                    }
                };
                if quads {
                    let wq = w.get(..kc.div_ceil(4)).ok_or(Error::BadArgument)?;
                    let zw_g: &[i32; N] = zw
                        .get(g * N..g * N + N)
                        .and_then(|r| r.try_into().ok())
                        .ok_or(Error::BadArgument)?;
                    let zfix = zero_fix(weights.bits, zw_g);
                    // SAFETY: the caller runs this only when `active()` says the CPU has AVX2
                    // (and, with `vnni`, AVX-512 VNNI and VL).
                    unsafe {
                        if vnni {
                            quad4_block_vnni(blk, pre, wq, &zfix, acc_g)?
                        } else {
                            quad4_block_avx2(blk, pre, wq, &zfix, acc_g)?
                        }
                    };
                } else {
                    // SAFETY: as above.
                    unsafe { quad_block_avx2(&col, COL_PX, 0, kc, w, 0, n, acc_g)? };
                }
            }
            c += kc;
        }
        for (j, (a, req)) in acc.iter().zip(&reqs).take(oc).enumerate() {
            let dst = out
                .get_mut((co + j) * out_plane + p0..(co + j) * out_plane + p0 + n)
                .ok_or(Error::BadArgument)?;
            super::requant_tile(req, a.get(..n).ok_or(Error::BadArgument)?, dst);
        }
        p0 += n;
    }
    Ok(())
}

/// One row of [`im2col_conv`]'s columns: for output pixels `p0 .. p0 + dst.len()`, the code
/// that the tap at offset `(dy, dx)` of each window reads from `chan` (one input plane), `z`
/// where it falls in the padding. A run of pixels along one output row reads every `sw`-th
/// code of one input row, so each run is a strided copy between its padded ends.
fn gather_row(
    geom: &super::ConvGeom,
    s: &super::ConvShape,
    chan: &[u8],
    (dy, dx): (usize, usize),
    z: u8,
    p0: usize,
    dst: &mut [u8],
) -> Result<(), Error> {
    let sw = geom.stride_w;
    // Pixel `ox` reads column `ox·sw + dx − pad_left`: those below `lo_ox` fall left of
    // column 0, those from `hi_ox` on right of the last (the same for every run).
    let lo_ox = geom.pad_left.saturating_sub(dx).div_ceil(sw);
    let hi_ox = (s.w + geom.pad_left).saturating_sub(dx).div_ceil(sw);
    // Each run is the tile's part of one output row: the first from `p0`, the rest whole.
    let (mut next_oy, mut next_ox) = (p0 / s.out_w, p0 % s.out_w);
    let mut rest = dst;
    while !rest.is_empty() {
        let (oy, ox0) = (next_oy, next_ox);
        (next_oy, next_ox) = (oy + 1, 0);
        let run = (s.out_w - ox0).min(rest.len());
        let (out, tail) = rest.split_at_mut(run);
        rest = tail;
        // Above or below the input: the whole run is padding.
        let Some(iy) = (oy * geom.stride_h + dy)
            .checked_sub(geom.pad_top)
            .filter(|&iy| iy < s.h)
        else {
            out.fill(z);
            continue;
        };
        let src_row = chan
            .get(iy * s.w..(iy + 1) * s.w)
            .ok_or(Error::BadArgument)?;
        let last = hi_ox.clamp(ox0, ox0 + run) - ox0;
        let first = (lo_ox.max(ox0) - ox0).min(last);
        let (left, mid_right) = out.split_at_mut(first);
        let (mid, right) = mid_right.split_at_mut(last - first);
        // Most runs have no pad at either end: no memset call for them.
        for pad in [left, right] {
            if !pad.is_empty() {
                pad.fill(z);
            }
        }
        if !mid.is_empty() {
            let ix0 = (ox0 + first) * sw + dx - geom.pad_left;
            let src = src_row
                .get(ix0..ix0 + (mid.len() - 1) * sw + 1)
                .ok_or(Error::BadArgument)?;
            if sw == 1 {
                mid.copy_from_slice(src);
            } else {
                for (d, &x) in mid.iter_mut().zip(src.iter().step_by(sw)) {
                    *d = x;
                }
            }
        }
    }
    Ok(())
}

/// Depthwise convolutions on small planes ([`super::plan::depthwise_lanes`]) with the channels
/// in the vector lanes, [`DW_LANES`] channels per block ([`lanes_block`]). Returns how many
/// leading channels it did: a multiple of [`DW_LANES`], 0 where `scratch` is smaller than
/// [`super::plan::lanes_bytes`] (a blob lowered for another CPU).
#[allow(clippy::too_many_arguments)]
pub(super) fn depthwise_lanes(
    geom: &super::ConvGeom,
    s: &super::ConvShape,
    weights: &crate::packing::Weights<'_>,
    input: &[u8],
    z: i32,
    y: (u8, u8, u8),
    out: &mut [u8],
    codes: &mut [u8],
    scratch: &mut [u8],
) -> Result<usize, Error> {
    let (rows, cols) = padded_extent(geom, s);
    let taps = geom.kernel_h * geom.kernel_w;
    let (plane, out_plane) = (s.h * s.w, s.out_h * s.out_w);
    let Some((xb, rest)) = scratch.split_at_mut_checked(rows * cols * DW_LANES) else {
        return Ok(0);
    };
    // SAFETY: every bit pattern is a valid `i32`; `align_to_mut` hands out only the aligned
    // middle of the bytes, which the accumulators then own for this call.
    let (_, acc, _) = unsafe { rest.align_to_mut::<i32>() };
    let Some(acc) = acc.get_mut(..DW_LANES * out_plane) else {
        return Ok(0);
    };
    if taps > DW_MAX_TAPS || codes.len() < taps {
        return Err(Error::BadArgument);
    }
    // Each tap's offset in pixels of `xb` from its output pixel's window origin, in the order
    // of the codes `(ky, kx)`; an odd count ends with a tap repeated at weight 0.
    let mut offs = [0usize; DW_MAX_TAPS + 1];
    for (t, o) in offs.iter_mut().take(taps).enumerate() {
        let (ky, kx) = (t / geom.kernel_w, t % geom.kernel_w);
        *o = ky * geom.dilation_h * cols + kx * geom.dilation_w;
    }
    let pairs = taps.div_ceil(2);
    if taps % 2 == 1 {
        let last = offs.get(taps - 1).copied().ok_or(Error::BadArgument)?;
        *offs.get_mut(taps).ok_or(Error::BadArgument)? = last;
    }
    let offs = offs.get(..2 * pairs).ok_or(Error::BadArgument)?;
    let mut c = 0;
    while c + DW_LANES <= geom.groups {
        // Weight pairs: `wp[p][j]` holds tap `2p`'s `q − z_c` of channel `c + j` in its low
        // 16 bits and tap `2p + 1`'s in its high 16, the layout `vpmaddwd` multiplies.
        let mut wp = [[0i32; DW_LANES]; DW_MAX_TAPS.div_ceil(2)];
        let mut init = [0i32; DW_LANES];
        let mut reqs = [crate::numerics::ChannelRequant::new(0, 0, 0, 0, 0); DW_LANES];
        let mut zw = [0i32; DW_LANES];
        let mut prow = [Row::default(); DW_LANES];
        channel_constants(weights, c, z, y, &mut prow, &mut zw, &mut reqs, &mut init)?;
        for (j, (row, &zwj)) in prow.iter().zip(&zw).enumerate() {
            let codes = codes.get_mut(..taps).ok_or(Error::BadArgument)?;
            row.unpack(codes)?;
            for (t, &q) in codes.iter().enumerate() {
                let w = (q as i32 - zwj) as u16 as i32;
                let slot = wp
                    .get_mut(t / 2)
                    .and_then(|p| p.get_mut(j))
                    .ok_or(Error::BadArgument)?;
                *slot |= if t % 2 == 0 { w } else { w << 16 };
            }
        }
        let block = input
            .get(c * plane..(c + DW_LANES) * plane)
            .ok_or(Error::BadArgument)?;
        let dst = out
            .get_mut(c * out_plane..(c + DW_LANES) * out_plane)
            .ok_or(Error::BadArgument)?;
        let wp = wp.get(..pairs).ok_or(Error::BadArgument)?;
        let bufs = (&mut *xb, &mut *acc);
        // SAFETY: AVX2 is available: the caller runs this only when `active()` says so.
        unsafe {
            lanes_block(
                geom,
                s,
                block,
                z,
                (rows, cols),
                (offs, wp, &init),
                &reqs,
                bufs,
                dst,
            )?
        };
        c += DW_LANES;
    }
    Ok(c)
}

/// One block of [`DW_LANES`] channels of [`depthwise_lanes`]. The input planes are copied
/// pixel-major into `xb` ([`lanes_input`]: 16-byte vectors of the block's codes, pads and rows
/// outside the input filled with `z`, the value the portable loops read there); each output
/// pixel takes every tap from there, two taps per step: their vectors interleaved per channel,
/// widened to i16, and `vpmaddwd` against the channels' weight pairs forms `w_a·a + w_b·b` per
/// channel in an i32 lane (exact: `|q − z_c| ≤ 255` and `a ≤ 255` are valid i16, a pair sum
/// `≤ 2·255²` fits i32; an odd last tap pairs with itself at weight 0). The lanes wrap as the
/// portable loops' sums do, so the order of summation does not matter. The accumulators go to
/// `acc` pixel-major, are requantized 16 channels at a time ([`requant_lanes`]) where every
/// channel's factor is below one (else one by one, [`ChannelRequant::apply`]), and go back to
/// channel-major through the same byte transpose.
///
/// [`ChannelRequant::apply`]: crate::numerics::ChannelRequant::apply
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
#[target_feature(enable = "avx2")]
fn lanes_block(
    geom: &super::ConvGeom,
    s: &super::ConvShape,
    block: &[u8],
    z: i32,
    extent: (usize, usize),
    (offs, wp, init): (&[usize], &[[i32; DW_LANES]], &[i32; DW_LANES]),
    reqs: &[crate::numerics::ChannelRequant; DW_LANES],
    (xb, acc): (&mut [u8], &mut [i32]),
    dst: &mut [u8],
) -> Result<(), Error> {
    let cols = extent.1;
    let out_plane = s.out_h * s.out_w;
    xb.fill(z as u8);
    lanes_input(geom, s, block, extent, xb)?;
    let load8 = |v: &[i32]| -> Result<(__m256i, __m256i), Error> {
        let v = v.get(..DW_LANES).ok_or(Error::BadArgument)?;
        // SAFETY: `v` holds exactly the 16 i32 the two loads read.
        Ok(unsafe {
            (
                _mm256_loadu_si256(v.as_ptr().cast()),
                _mm256_loadu_si256(v.as_ptr().add(8).cast()),
            )
        })
    };
    // The weight pairs in registers (or one load away) for the whole block.
    let mut wv = [(_mm256_setzero_si256(), _mm256_setzero_si256()); DW_MAX_TAPS.div_ceil(2)];
    for (v, w) in wv.iter_mut().zip(wp) {
        *v = load8(w)?;
    }
    let wv = wv.get(..wp.len()).ok_or(Error::BadArgument)?;
    let (init_lo, init_hi) = load8(init)?;
    // Every tap's pixel is within `last` pixels of its window's origin.
    let last = offs.iter().copied().max().unwrap_or(0);
    for (p, a) in acc.chunks_exact_mut(DW_LANES).take(out_plane).enumerate() {
        let (oy, ox) = (p / s.out_w, p % s.out_w);
        let origin = oy * geom.stride_h * cols + ox * geom.stride_w;
        // The window's pixels, checked once per output pixel.
        let win = xb
            .get(origin * DW_LANES..(origin + last + 1) * DW_LANES)
            .ok_or(Error::BadArgument)?;
        // SAFETY: every offset is at most `last`, so each 16-byte load lies inside `win`.
        let load = |o: usize| unsafe { _mm_loadu_si128(win.as_ptr().add(o * DW_LANES).cast()) };
        let (mut lo, mut hi) = (init_lo, init_hi);
        for (pair, &(w0, w1)) in offs.chunks_exact(2).zip(wv) {
            let &[oa, ob] = pair else {
                continue; // `chunks_exact(2)`: never shorter
            };
            let (xa, xc) = (load(oa), load(ob));
            let ab0 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(xa, xc));
            let ab1 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(xa, xc));
            lo = _mm256_add_epi32(lo, _mm256_madd_epi16(ab0, w0));
            hi = _mm256_add_epi32(hi, _mm256_madd_epi16(ab1, w1));
        }
        // SAFETY: `a` holds exactly the 16 i32 the two stores write.
        unsafe {
            _mm256_storeu_si256(a.as_mut_ptr().cast(), lo);
            _mm256_storeu_si256(a.as_mut_ptr().add(8).cast(), hi);
        }
    }
    let k = LaneRequant::new(reqs);
    let mut p0 = 0;
    while p0 < out_plane {
        let n = (out_plane - p0).min(16);
        let mut px = [_mm_setzero_si128(); 16];
        for (v, a) in px
            .iter_mut()
            .zip(acc.chunks_exact(DW_LANES).skip(p0))
            .take(n)
        {
            let (lo, hi) = load8(a)?;
            *v = k.apply(lo, hi);
        }
        // `t[j]`: channel j's codes for pixels `p0 .. p0 + 16`.
        for (j, t) in transpose16(&px).iter().enumerate() {
            let o = j * out_plane + p0;
            let d = dst.get_mut(o..o + n).ok_or(Error::BadArgument)?;
            if n == 16 {
                // SAFETY: `d` holds exactly the 16 bytes the store writes.
                unsafe { _mm_storeu_si128(d.as_mut_ptr().cast(), *t) };
            } else {
                let mut bytes = [0u8; 16];
                // SAFETY: `bytes` holds exactly the 16 bytes the store writes.
                unsafe { _mm_storeu_si128(bytes.as_mut_ptr().cast(), *t) };
                d.copy_from_slice(bytes.get(..n).ok_or(Error::BadArgument)?);
            }
        }
        p0 += n;
    }
    Ok(())
}

/// Requantization with each of [`DW_LANES`] lanes under its own channel's constants, the
/// 64-bit products of the even and odd lanes apart, each shifted by its own count
/// (`vpsrlvq`). Where every factor is below one (`n ≥ 31`, `mult ≥ 0`), the 32-bit tail of
/// [`requant_narrow_avx2`]; else the 64-bit rounding and clamp of [`requant_avx2`]. The
/// exactness arguments are theirs, lane by lane.
struct LaneRequant {
    /// Per half (lanes 0–7, 8–15): `mult`, `half`, `n`, and `zero`, `lo`, `hi` for the 64-bit
    /// form, of the even lanes, then of the odd ones, in 64-bit lanes; `lo − zero`,
    /// `hi − zero` and `zero` in 32-bit lanes for the narrow form.
    mult: [(__m256i, __m256i); 2],
    half: [(__m256i, __m256i); 2],
    n: [(__m256i, __m256i); 2],
    wide_zlh: [[(__m256i, __m256i); 2]; 3],
    lo_z: [__m256i; 2],
    hi_z: [__m256i; 2],
    zero: [__m256i; 2],
    narrow: bool,
}

impl LaneRequant {
    #[target_feature(enable = "avx2")]
    fn new(reqs: &[crate::numerics::ChannelRequant; DW_LANES]) -> Self {
        let mut c = [[0i64; DW_LANES]; 8];
        for (j, r) in reqs.iter().enumerate() {
            let (mult, n, half, zero, lo, hi) = r.constants();
            for (slot, v) in
                c.iter_mut()
                    .zip([mult, half, n as i64, zero, lo - zero, hi - zero, lo, hi])
            {
                if let Some(x) = slot.get_mut(j) {
                    *x = v;
                }
            }
        }
        let narrow = reqs.iter().all(|r| {
            let (mult, n, ..) = r.constants();
            n >= 31 && mult >= 0
        });
        let [mult, half, n, zero, lo_z, hi_z, lo, hi] = c;
        // 64-bit lanes of the even (`odd = 0`) or odd channels of half `h`.
        let wide = |v: &[i64; DW_LANES], h: usize, odd: usize| {
            let at = |i: usize| v.get(8 * h + 2 * i + odd).copied().unwrap_or(0);
            _mm256_setr_epi64x(at(0), at(1), at(2), at(3))
        };
        let lanes32 = |v: &[i64; DW_LANES], h: usize| {
            let at = |i: usize| v.get(8 * h + i).copied().unwrap_or(0) as i32;
            _mm256_setr_epi32(at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7))
        };
        let pair = |v: &[i64; DW_LANES]| {
            [
                (wide(v, 0, 0), wide(v, 0, 1)),
                (wide(v, 1, 0), wide(v, 1, 1)),
            ]
        };
        // `0 ≤ mult < 2^31` in both halves of its lane: `vpmuludq` and `vpmuldq` read the low
        // one (a zero-extended form led LLVM to a full 64-bit multiply, see `requant_avx512`).
        let mult = mult.map(|m| m | m << 32);
        LaneRequant {
            mult: pair(&mult),
            half: pair(&half),
            n: pair(&n),
            wide_zlh: [pair(&zero), pair(&lo), pair(&hi)],
            lo_z: [lanes32(&lo_z, 0), lanes32(&lo_z, 1)],
            hi_z: [lanes32(&hi_z, 0), lanes32(&hi_z, 1)],
            zero: [lanes32(&zero, 0), lanes32(&zero, 1)],
            narrow,
        }
    }

    /// The 16 codes of one pixel's accumulators (`lo`: channels 0–7, `hi`: 8–15), in order.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn apply(&self, lo: __m256i, hi: __m256i) -> __m128i {
        let mut v = [lo, hi];
        if !self.narrow {
            let zero64 = _mm256_setzero_si256();
            for (h, a) in v.iter_mut().enumerate() {
                let (Some(m), Some(hf), Some(n)) =
                    (self.mult.get(h), self.half.get(h), self.n.get(h))
                else {
                    continue;
                };
                let none = (zero64, zero64);
                let [z, lo, hi] = self.wide_zlh.map(|x| x.get(h).copied().unwrap_or(none));
                let round_clamp = |p: __m256i, odd: bool| {
                    let pick = |x: (__m256i, __m256i)| if odd { x.1 } else { x.0 };
                    let neg = _mm256_cmpgt_epi64(zero64, p);
                    let mag = _mm256_sub_epi64(_mm256_xor_si256(p, neg), neg);
                    let r = _mm256_srlv_epi64(_mm256_add_epi64(mag, pick(*hf)), pick(*n));
                    let r = _mm256_sub_epi64(_mm256_xor_si256(r, neg), neg);
                    let v = _mm256_add_epi64(r, pick(z));
                    let (lo, hi) = (pick(lo), pick(hi));
                    let v = _mm256_blendv_epi8(v, lo, _mm256_cmpgt_epi64(lo, v));
                    _mm256_blendv_epi8(v, hi, _mm256_cmpgt_epi64(v, hi))
                };
                let even = round_clamp(_mm256_mul_epi32(*a, m.0), false);
                let odd = round_clamp(_mm256_mul_epi32(_mm256_srli_epi64(*a, 32), m.1), true);
                // Codes in 0..=255: back into eight 32-bit lanes in order.
                *a = _mm256_or_si256(even, _mm256_slli_epi64(odd, 32));
            }
        }
        for (h, a) in v.iter_mut().enumerate().filter(|_| self.narrow) {
            let (Some(m), Some(hf), Some(n)) = (self.mult.get(h), self.half.get(h), self.n.get(h))
            else {
                continue;
            };
            let (Some(lo_z), Some(hi_z), Some(zero)) =
                (self.lo_z.get(h), self.hi_z.get(h), self.zero.get(h))
            else {
                continue;
            };
            let mag = _mm256_abs_epi32(*a);
            let even = _mm256_srlv_epi64(_mm256_add_epi64(_mm256_mul_epu32(mag, m.0), hf.0), n.0);
            let odd = _mm256_srlv_epi64(
                _mm256_add_epi64(_mm256_mul_epu32(_mm256_srli_epi64(mag, 32), m.1), hf.1),
                n.1,
            );
            let r = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0b1010_1010);
            let sign = _mm256_srai_epi32(*a, 31);
            let r = _mm256_sub_epi32(_mm256_xor_si256(r, sign), sign);
            // Clamped to `[lo − zero, hi − zero]` before the zero point is added: no wrap.
            let r = _mm256_min_epi32(_mm256_max_epi32(r, *lo_z), *hi_z);
            *a = _mm256_add_epi32(r, *zero);
        }
        let [lo, hi] = v;
        // Codes in 0..=255: i16 in channel order after the cross-lane permute, then bytes.
        let w = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0b11_01_10_00);
        let b = _mm256_packus_epi16(w, w);
        _mm_unpacklo_epi64(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1))
    }
}

/// Copies [`DW_LANES`] input planes (`block`, channel-major) into `xb` pixel-major: input
/// pixel `(iy, ix)` goes to padded pixel `(iy + pad_top, ix + pad_left)` when that is one of
/// the `rows × cols` the output reads. Sixteen pixels at a time through a 16×16 byte
/// transpose ([`transpose16`]), a last partial run code by code.
#[target_feature(enable = "avx2")]
fn lanes_input(
    geom: &super::ConvGeom,
    s: &super::ConvShape,
    block: &[u8],
    (rows, cols): (usize, usize),
    xb: &mut [u8],
) -> Result<(), Error> {
    let plane = s.h * s.w;
    let mut store = |p: usize, v: __m128i| -> Result<(), Error> {
        let (py, px) = (p / s.w + geom.pad_top, p % s.w + geom.pad_left);
        if py < rows && px < cols {
            let at = (py * cols + px) * DW_LANES;
            let d = xb.get_mut(at..at + DW_LANES).ok_or(Error::BadArgument)?;
            // SAFETY: `d` holds exactly the 16 bytes the store writes.
            unsafe { _mm_storeu_si128(d.as_mut_ptr().cast(), v) };
        }
        Ok(())
    };
    let mut p0 = 0;
    while p0 + 16 <= plane {
        let mut r = [_mm_setzero_si128(); DW_LANES];
        for (j, rj) in r.iter_mut().enumerate() {
            let src = block
                .get(j * plane + p0..j * plane + p0 + 16)
                .ok_or(Error::BadArgument)?;
            // SAFETY: `src` holds exactly the 16 bytes the load reads.
            *rj = unsafe { _mm_loadu_si128(src.as_ptr().cast()) };
        }
        for (i, &v) in transpose16(&r).iter().enumerate() {
            store(p0 + i, v)?;
        }
        p0 += 16;
    }
    for p in p0..plane {
        let mut bytes = [0u8; DW_LANES];
        for (j, b) in bytes.iter_mut().enumerate() {
            *b = *block.get(j * plane + p).ok_or(Error::BadArgument)?;
        }
        // SAFETY: `bytes` holds exactly the 16 bytes the load reads.
        store(p, unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) })?;
    }
    Ok(())
}

/// `out[i][j] = r[j][i]` for 16 vectors of 16 bytes: four rounds of one byte interleave,
/// `out[2i] = unpacklo(v[i], v[i + 8])`, `out[2i + 1] = unpackhi(v[i], v[i + 8])`. Round `n`
/// leaves each vector holding `2^n` channels of each of `16 / 2^n` pixels in order; after the
/// fourth, vector `i` holds pixel `i`'s 16 channels.
#[inline]
#[target_feature(enable = "avx2")]
fn transpose16(r: &[__m128i; 16]) -> [__m128i; 16] {
    let mut v = *r;
    for _ in 0..4 {
        let mut o = [_mm_setzero_si128(); 16];
        let (first, second) = v.split_at(8);
        for ((pair, &x), &y) in o.chunks_exact_mut(2).zip(first).zip(second) {
            if let [l, h] = pair {
                *l = _mm_unpacklo_epi8(x, y);
                *h = _mm_unpackhi_epi8(x, y);
            }
        }
        v = o;
    }
    v
}
