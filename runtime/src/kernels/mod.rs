//! Integer kernels (docs/design.md §4), callable on their own: the compiler's reference graph
//! calls exactly these, and the executor ([`crate::run`]) binds them to arena slices.
//!
//! Every kernel checks its slices and shapes first and returns [`Error::BadArgument`] instead of
//! panicking; inner loops use iterators or `get`, never raw indexing. Activations are NCHW with
//! batch 1, given as 4 right-aligned dims (`[1, C, H, W]`; a rank-2 `[1, N]` is `[1, 1, 1, N]`).
//! The portable loops here are the reference; an ISA's SIMD kernels (`x86.rs`) replace inner
//! loops only, over the prefix of a slice they can take in whole vectors, and equal the
//! portable loops bit for bit (`runtime/tests/simd.rs`). Which run is fixed at compile time
//! ([`COMPILED`]); see [`Isa`].

use crate::error::Error;
use crate::geom::taps_in;
pub use crate::geom::{numel, window_out_len, ConvGeom, ConvShape, PoolGeom, MAX_EXTENT};
pub use crate::numerics::{AddParams, Requant};
use crate::packing::{unpack_group, ChannelRecord, Row, Weights};

/// The SIMD kernels this build holds, chosen at compile time from the target's features (the
/// compiler's `--cpu` sets `-C target-cpu`; no run-time detection in `no_std`): `avx512vnni`
/// (x86_64 with AVX2, AVX-512 VNNI and VL: `avx2`'s kernels, the 1×1 convolution of ≤ 4-bit
/// weights on `vpdpbusd`), `avx2` (x86_64 with AVX2: 1×1 and depthwise convolutions,
/// requantization), `sse2` (x86_64 baseline: the 1×1 convolution), `neondot` (aarch64 with the
/// dotprod extension: `neon`'s kernels, the grouped 1×1 convolution on `udot`), `neon`
/// (aarch64 with Advanced SIMD, every AArch64 target the compiler names: 1×1 convolution, tap
/// rows, requantization), else `portable` (loops the compiler vectorizes for the target). The compiler's `emit::runtime_lib::kernels` makes the
/// same choice for the header and report.
pub const KERNELS: &str = KERNELS_NUL.split_at(KERNELS_NUL.len() - 1).0;

/// A set of kernels: the portable loops, or an ISA's SIMD kernels on top of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Isa {
    /// The portable loops only: the reference every SIMD kernel equals bit for bit.
    Portable = 0,
    /// x86_64's baseline: the SSE2 1×1 convolution.
    Sse2 = 1,
    /// x86_64 with AVX2: 1×1 and depthwise/general convolution taps, requantization.
    Avx2 = 2,
    /// x86_64 with AVX2, AVX-512 VNNI and AVX-512 VL: `Avx2`, with the 1×1 convolution of
    /// ≤ 4-bit weights on `vpdpbusd`.
    Avx512Vnni = 3,
    /// aarch64 with NEON (Advanced SIMD): the 1×1 convolution, the tap rows of the other
    /// convolutions and requantization (`neon.rs`). Not ordered against the x86 levels: the
    /// `>=` tests below all sit behind `cfg(target_arch = "x86_64")`.
    Neon = 4,
    /// aarch64 with NEON and the dotprod extension: `Neon`, with the grouped 1×1 convolution
    /// on `udot`.
    NeonDot = 5,
}

impl Isa {
    /// The level's name, as [`KERNELS`] gives it for a build that holds it.
    pub const fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Sse2 => "sse2",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Neon => "neon",
            Isa::NeonDot => "neondot",
        }
    }
}

/// Whether the target features of this build include AVX-512 VNNI with VL (and AVX2).
const VNNI_BUILD: bool = cfg!(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "avx512vnni",
    target_feature = "avx512vl"
));

/// Whether this build is for aarch64 with NEON.
const NEON_BUILD: bool = cfg!(all(target_arch = "aarch64", target_feature = "neon"));

/// Whether this build is for aarch64 with NEON and dotprod.
const NEONDOT_BUILD: bool = cfg!(all(
    target_arch = "aarch64",
    target_feature = "neon",
    target_feature = "dotprod"
));

/// The kernels this build holds, named by [`KERNELS`].
pub const COMPILED: Isa = if VNNI_BUILD {
    Isa::Avx512Vnni
} else if cfg!(all(target_arch = "x86_64", target_feature = "avx2")) {
    Isa::Avx2
} else if cfg!(target_arch = "x86_64") {
    Isa::Sse2
} else if NEONDOT_BUILD {
    Isa::NeonDot
} else if NEON_BUILD {
    Isa::Neon
} else {
    Isa::Portable
};

/// Whether the NEON kernels run (at `neon` and `neondot`).
#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
#[inline(always)]
fn neon_active() -> bool {
    matches!(active(), Isa::Neon | Isa::NeonDot)
}

/// With `std` (host tools and tests only): the kernels in use, switched by [`use_kernels`].
#[cfg(feature = "std")]
static ACTIVE: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(COMPILED as u8);

/// The kernels in use: [`COMPILED`], fixed at compile time on a device.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code) // only the SIMD dispatch asks
)]
#[inline(always)]
fn active() -> Isa {
    #[cfg(feature = "std")]
    {
        match ACTIVE.load(core::sync::atomic::Ordering::Relaxed) {
            5 => Isa::NeonDot,
            4 => Isa::Neon,
            3 => Isa::Avx512Vnni,
            2 => Isa::Avx2,
            1 => Isa::Sse2,
            _ => Isa::Portable,
        }
    }
    #[cfg(not(feature = "std"))]
    {
        COMPILED
    }
}

/// Host tools and tests (`std` feature): run `isa`'s kernels from now on, in every thread, if
/// this CPU has them (checked at run time); returns whether it switched. The SIMD kernels are
/// compiled into every x86_64 build, so the tests compare them with the portable loops without
/// a special build.
#[cfg(feature = "std")]
pub fn use_kernels(isa: Isa) -> bool {
    let ok = match isa {
        Isa::Portable => true,
        #[cfg(target_arch = "x86_64")]
        Isa::Sse2 => true,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => std::is_x86_feature_detected!("avx2"),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => {
            std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("avx512vnni")
                && std::is_x86_feature_detected!("avx512vl")
        }
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        Isa::Neon => true,
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        Isa::NeonDot => std::arch::is_aarch64_feature_detected!("dotprod"),
        #[allow(unreachable_patterns)]
        _ => false,
    };
    if ok {
        ACTIVE.store(isa as u8, core::sync::atomic::Ordering::Relaxed);
    }
    ok
}

/// [`KERNELS`] with a NUL, for the C API.
pub(crate) const KERNELS_NUL: &str = if VNNI_BUILD {
    "avx512vnni\0"
} else if cfg!(all(target_arch = "x86_64", target_feature = "avx2")) {
    "avx2\0"
} else if cfg!(target_arch = "x86_64") {
    "sse2\0"
} else if NEONDOT_BUILD {
    "neondot\0"
} else if NEON_BUILD {
    "neon\0"
} else {
    "portable\0"
};
use crate::numerics::{self, clamp_code, mul_round, ADD_LEFT_SHIFT};

/// A quantized activation to read: codes, 4 right-aligned dims, zero point.
#[derive(Clone, Copy, Debug)]
pub struct QIn<'a> {
    /// Codes, `numel(dims)` of them (more are ignored).
    pub data: &'a [u8],
    /// Right-aligned dims, e.g. `[1, C, H, W]`.
    pub dims: [usize; 4],
    /// Zero point `z`.
    pub zero: u8,
}

/// A quantized activation to write: codes, dims, zero point and the output clamp.
#[derive(Debug)]
pub struct QOut<'a> {
    /// Codes, `numel(dims)` of them are written.
    pub data: &'a mut [u8],
    /// Right-aligned dims.
    pub dims: [usize; 4],
    /// Zero point `z`.
    pub zero: u8,
    /// Clamp low bound (code).
    pub lo: u8,
    /// Clamp high bound (code).
    pub hi: u8,
}

fn input_slice<'a>(x: &QIn<'a>) -> Result<&'a [u8], Error> {
    let n = numel(x.dims).ok_or(Error::BadArgument)?;
    x.data.get(..n).ok_or(Error::BadArgument)
}

/// `Σ q_i · a_i` over `a.len()` codes of a packed weight row (see [`crate::format`]: groups
/// of 8 codes in `bits` bytes). Wrapping `i32` arithmetic: exact as long as the true sum
/// fits, which the loader guarantees. A row of fewer than `ceil(a.len() / 8)` groups ends the
/// sum early.
#[inline]
pub fn dot_packed(row: &Row<'_>, a: &[u8]) -> i32 {
    dot_packed_from(row, a, 0)
}

/// [`dot_packed`] over the groups from `first` on (`a` still the whole input).
#[inline]
fn dot_packed_from(row: &Row<'_>, a: &[u8], first: usize) -> i32 {
    let mut acc = 0i32;
    let mut codes = [0u8; 8];
    for (g, xs) in a.chunks(8).enumerate().skip(first) {
        let Some(group) = row.group(g) else {
            break;
        };
        match group.len() {
            8 => {
                for (q, x) in group.iter().zip(xs) {
                    acc = acc.wrapping_add(*q as i32 * *x as i32);
                }
            }
            b => {
                unpack_group(b as u8, group, &mut codes);
                for (q, x) in codes.iter().zip(xs) {
                    acc = acc.wrapping_add(*q as i32 * *x as i32);
                }
            }
        }
    }
    acc
}

/// `Σ a_i` of activation codes.
#[inline]
pub fn sum_codes(a: &[u8]) -> i32 {
    a.iter().fold(0i32, |s, &v| s.wrapping_add(v as i32))
}

/// The zero-point expansion of `Σ (q − z_c)(a − z) + bias` from `Σ q·a`, `Σ q`, `Σ a`:
/// `Σqa − z·Σq − z_c·Σa + K·z_c·z + bias` (wrapping, exact when the result fits `i32`).
#[inline]
pub fn expand_acc(dot: i32, sum_q: i32, sum_a: i32, k: i32, z_w: i32, z_a: i32, bias: i32) -> i32 {
    dot.wrapping_sub(z_a.wrapping_mul(sum_q))
        .wrapping_sub(z_w.wrapping_mul(sum_a))
        .wrapping_add(k.wrapping_mul(z_w).wrapping_mul(z_a))
        .wrapping_add(bias)
}

/// Bytes of scratch a convolution needs: one weight row unpacked to `K` codes.
pub const fn conv_scratch_len(k: usize) -> usize {
    k
}

/// Output pixels per tile of [`conv2d`]: their `i32` accumulators live on the stack (1 KiB).
const CONV_TILE: usize = 256;

/// 2-D convolution (general, grouped, depthwise, 1×1; strides, dilations, asymmetric zero
/// padding). Output code `y[co, oy, ox] = requantize(Σ (q − z_co)(a − z) + bias_co)`.
///
/// Direct form, so that each weight is unpacked once per output channel (into `scratch`, `K`
/// bytes, see [`conv_scratch_len`]) and each multiply–add runs in a loop over a tile of output
/// pixels that the compiler vectorizes. The sum is rewritten as
/// `Σ (q − z_co)·a − z·(Σq − K·z_co) + bias_co`: the second term is per channel, so no `Σa`
/// per pixel is needed. Zero padding reads `a = z`. Every step is wrapping `i32` ring
/// arithmetic, so the result equals the plain sum bit for bit whenever it fits `i32` (which
/// the loader checks), in any order of summation.
pub fn conv2d(
    geom: &ConvGeom,
    weights: &Weights<'_>,
    x: &QIn<'_>,
    y: &mut QOut<'_>,
    scratch: &mut [u8],
) -> Result<(), Error> {
    let s = geom.check(x.dims, y.dims).ok_or(Error::BadArgument)?;
    if weights.k != s.k || weights.c_out != s.c_out {
        return Err(Error::BadArgument);
    }
    let input = input_slice(x)?;
    let plane = s.h * s.w;
    let out_plane = s.out_h * s.out_w;
    let out_len = s.c_out.checked_mul(out_plane).ok_or(Error::BadArgument)?;
    let out = y.data.get_mut(..out_len).ok_or(Error::BadArgument)?;
    if scratch.len() < s.k {
        return Err(Error::BadArgument);
    }
    // The first `K` bytes hold one unpacked row (the portable path); the rest, where the
    // compiler sized it so ([`conv_scratch_len_for`]), the gathered-column kernel's panel,
    // the channels-in-lanes depthwise kernel's buffers or the 1×1 kernel's interleaved input.
    let (codes, _panel) = scratch.split_at_mut(s.k);
    let taps = geom.kernel_h * geom.kernel_w;
    let z = x.zero as i32;
    let k = s.k as i32;
    let pointwise = plan::is_pointwise(geom, &s);
    // The AVX2 direct convolution's buffers, zeroed once per call, not per channel.
    #[cfg(target_arch = "x86_64")]
    let mut direct = x86::DirectScratch::new();
    #[allow(unused_mut)]
    let mut first_group = 0;
    #[cfg(target_arch = "x86_64")]
    if plan::depthwise_lanes(active(), geom, &s) {
        let y = (y.zero, y.lo, y.hi);
        first_group = x86::depthwise_lanes(geom, &s, weights, input, z, y, out, codes, _panel)?;
    }
    for g in first_group..geom.groups {
        let in_group = input
            .get(g * s.c_in_g * plane..(g + 1) * s.c_in_g * plane)
            .ok_or(Error::BadArgument)?;
        #[allow(unused_mut)]
        let mut first = g * s.c_out_g;
        #[cfg(target_arch = "x86_64")]
        if !pointwise && active() >= Isa::Avx2 && !plan::direct_fits(geom, &s) {
            first = x86::im2col_conv(
                geom,
                &s,
                weights,
                in_group,
                z,
                (y.zero, y.lo, y.hi),
                out,
                (first, s.c_out_g),
                active(),
                &mut *_panel,
            )?;
        }
        if pointwise {
            let y = (y.zero, y.lo, y.hi);
            let range = (first, s.c_out_g);
            first = pointwise_groups(weights, in_group, plane, z, y, out, range, &mut *_panel)?;
        }
        for co in first..(g + 1) * s.c_out_g {
            let ch = weights.channel(co).ok_or(Error::BadArgument)?;
            let row = weights.row(co).ok_or(Error::BadArgument)?;
            row.unpack(codes)?;
            let zw = ch.w_zero as i32;
            let req = numerics::ChannelRequant::new(ch.mult, ch.shift, y.zero as i32, y.lo, y.hi);
            let c0 = ch
                .bias
                .wrapping_sub(z.wrapping_mul(ch.sum_q.wrapping_sub(k.wrapping_mul(zw))));
            let out_c = out
                .get_mut(co * out_plane..(co + 1) * out_plane)
                .ok_or(Error::BadArgument)?;
            #[cfg(target_arch = "x86_64")]
            if !pointwise && active() >= Isa::Avx2 && plan::direct_fits(geom, &s) {
                x86::direct_conv(
                    geom,
                    &s,
                    in_group,
                    codes,
                    (zw, z, c0),
                    &req,
                    out_c,
                    &mut direct,
                )?;
                continue;
            }
            let mut p0 = 0;
            while p0 < out_plane {
                let n = CONV_TILE.min(out_plane - p0);
                let mut tile = [0i32; CONV_TILE];
                let acc = tile.get_mut(..n).ok_or(Error::BadArgument)?;
                acc.fill(c0);
                if pointwise {
                    pointwise_block(in_group, plane, codes, zw, p0, acc)?;
                } else {
                    for (chan, wrow) in in_group.chunks_exact(plane).zip(codes.chunks_exact(taps)) {
                        for (t, &q) in wrow.iter().enumerate() {
                            let wv = q as i32 - zw;
                            if wv != 0 {
                                let tap = (t / geom.kernel_w, t % geom.kernel_w);
                                conv_tap(geom, &s, chan, tap, wv, z, p0, acc)?;
                            }
                        }
                    }
                }
                let dst = out_c.get_mut(p0..p0 + n).ok_or(Error::BadArgument)?;
                requant_tile(&req, acc, dst);
                p0 += n;
            }
        }
    }
    Ok(())
}

/// The 1×1 convolution of [`conv2d`] for output channels `first .. first + count` by groups
/// of several output channels where the kernels in use have such a kernel (x86_64 AVX2 and
/// up, aarch64 NEON); returns the first channel left to the one-channel path (`first` where
/// none runs).
#[inline]
#[allow(clippy::too_many_arguments)]
fn pointwise_groups(
    weights: &Weights<'_>,
    in_group: &[u8],
    plane: usize,
    z: i32,
    y: (u8, u8, u8),
    out: &mut [u8],
    (first, count): (usize, usize),
    scratch: &mut [u8],
) -> Result<usize, Error> {
    #[cfg(target_arch = "x86_64")]
    if active() >= Isa::Avx2 {
        let vnni = active() == Isa::Avx512Vnni;
        let range = (first, count);
        return x86::pointwise_quads(weights, in_group, plane, z, y, out, range, vnni, scratch);
    }
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    if active() == Isa::NeonDot {
        // SAFETY: `active()` is NeonDot only where the CPU has dotprod (compiled for it, or
        // detected by `use_kernels`); NEON is part of this build's target features.
        return unsafe {
            neon::pointwise_quads_dot(weights, in_group, plane, z, y, out, (first, count))
        };
    }
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    if neon_active() {
        // SAFETY: NEON is part of this build's target features (`NEON_BUILD`).
        return unsafe {
            neon::pointwise_quads_neon(weights, in_group, plane, z, y, out, (first, count))
        };
    }
    let _ = (weights, in_group, plane, z, y, out, count, scratch);
    Ok(first)
}

/// [`pointwise_tile`] with the SIMD kernel where the target has one (x86_64: SSE2, aarch64:
/// NEON, part of each base ISA) for whole blocks of 16 pixels, the portable loop for the rest.
#[inline]
fn pointwise_block(
    in_group: &[u8],
    plane: usize,
    codes: &[u8],
    zw: i32,
    p0: usize,
    acc: &mut [i32],
) -> Result<(), Error> {
    #[cfg(target_arch = "x86_64")]
    if active() >= Isa::Sse2 {
        let done = acc.len() / 16 * 16;
        let (head, tail) = acc.split_at_mut(done);
        // SAFETY: SSE2 is part of every x86_64 CPU (the target's base ISA).
        unsafe { x86::pointwise_sse2(in_group, plane, codes, zw, p0, head)? };
        return pointwise_tile(in_group, plane, codes, zw, p0 + done, tail);
    }
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    if neon_active() {
        let done = acc.len() / 16 * 16;
        let (head, tail) = acc.split_at_mut(done);
        // SAFETY: NEON is part of this build's target features (`NEON_BUILD`).
        unsafe { neon::pointwise_neon(in_group, plane, codes, zw, p0, head)? };
        return pointwise_tile(in_group, plane, codes, zw, p0 + done, tail);
    }
    pointwise_tile(in_group, plane, codes, zw, p0, acc)
}

/// `out[i] = req.apply(acc[i])`: AVX2 or NEON eight at a time where they run.
#[inline]
fn requant_tile(req: &numerics::ChannelRequant, acc: &[i32], out: &mut [u8]) {
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if active() == Isa::Avx512Vnni {
        // SAFETY: `active()` is Avx512Vnni only where the CPU has AVX2 and AVX-512 VNNI and
        // VL (compiled for them, or detected by `use_kernels`); VL implies AVX-512F.
        done = unsafe { x86::requant_avx512(req, acc, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if active() >= Isa::Avx2 {
        // SAFETY: `active()` is Avx2 or above only where the CPU has AVX2 (compiled for it,
        // or detected by `use_kernels`).
        done += unsafe {
            x86::requant_avx2(
                req,
                acc.get(done..).unwrap_or_default(),
                out.get_mut(done..).unwrap_or_default(),
            )
        };
    }
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    if neon_active() {
        // SAFETY: as in `pointwise_block`.
        done = unsafe { neon::requant_neon(req, acc, out) };
    }
    for (o, &a) in out.iter_mut().zip(acc).skip(done) {
        *o = req.apply(a);
    }
}

/// `acc[i] += wv · xs[i · sw]` for every `i < acc.len()` (`xs` holds at least
/// `(acc.len() − 1)·sw + 1` codes; more are read but unused): one kernel tap along an output
/// row segment.
#[inline]
fn tap_row(acc: &mut [i32], xs: &[u8], sw: usize, wv: i32) {
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if active() >= Isa::Avx2 {
        // SAFETY: as in `requant_tile`.
        done = unsafe { x86::tap_row_avx2(acc, xs, sw, wv) };
    }
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    if neon_active() {
        // SAFETY: as in `pointwise_block`.
        done = unsafe { neon::tap_row_neon(acc, xs, sw, wv) };
    }
    let rest = acc.get_mut(done..).unwrap_or_default();
    let xs = xs.get(done * sw..).unwrap_or_default();
    if sw == 1 {
        for (a, &v) in rest.iter_mut().zip(xs) {
            *a = a.wrapping_add(wv * v as i32);
        }
    } else {
        for (a, &v) in rest.iter_mut().zip(xs.iter().step_by(sw)) {
            *a = a.wrapping_add(wv * v as i32);
        }
    }
}

/// Per output channel `co + j`, `j < rows.len()`: its packed row, weight zero point,
/// requantization and the constant `bias − z·(Σq − K·z_c)` its accumulators start from (the
/// zero-point terms folded as in [`conv2d`]).
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
))]
#[allow(clippy::too_many_arguments)]
fn channel_constants<'w>(
    weights: &crate::packing::Weights<'w>,
    co: usize,
    z: i32,
    (y_zero, y_lo, y_hi): (u8, u8, u8),
    rows: &mut [Row<'w>],
    zw: &mut [i32],
    reqs: &mut [crate::numerics::ChannelRequant],
    c0: &mut [i32],
) -> Result<(), Error> {
    let k = weights.k as i32;
    let each = rows.iter_mut().zip(zw).zip(reqs).zip(c0);
    for (j, (((row, zwj), req), c0j)) in each.enumerate() {
        let ch = weights.channel(co + j).ok_or(Error::BadArgument)?;
        *row = weights.row(co + j).ok_or(Error::BadArgument)?;
        *zwj = ch.w_zero as i32;
        *req = crate::numerics::ChannelRequant::new(ch.mult, ch.shift, y_zero as i32, y_lo, y_hi);
        *c0j = ch
            .bias
            .wrapping_sub(z.wrapping_mul(ch.sum_q.wrapping_sub(k.wrapping_mul(*zwj))));
    }
    Ok(())
}

mod plan;
pub use plan::conv_scratch_len_for;
#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
mod neon;
#[cfg(target_arch = "x86_64")]
mod x86;

/// The 1×1 case of [`conv2d`]: `acc[i] += Σ_c (q_c − z_w)·x_c[p0 + i]` over the input
/// channels. Both factors fit `i16` (`|q − z_w| ≤ 255`, `a ≤ 255`), written so that the
/// product maps onto 16-bit multiplies. (Four channels per pass over the accumulators
/// measured slower on MobileNetV2.)
#[inline]
fn pointwise_tile(
    in_group: &[u8],
    plane: usize,
    codes: &[u8],
    zw: i32,
    p0: usize,
    acc: &mut [i32],
) -> Result<(), Error> {
    let n = acc.len();
    for (c, &q) in codes.iter().enumerate() {
        let w = (q as i32 - zw) as i16;
        if w == 0 {
            continue;
        }
        let xs = in_group
            .get(c * plane + p0..c * plane + p0 + n)
            .ok_or(Error::BadArgument)?;
        for (a, &v) in acc.iter_mut().zip(xs) {
            *a = a.wrapping_add(i32::from(w) * i32::from(v as i16));
        }
    }
    Ok(())
}

/// Adds `wv · a` of kernel tap `(ky, kx)` to the accumulators of output pixels
/// `p0 .. p0 + acc.len()` (row-major), one output row segment at a time; taps that fall in
/// the padding read `a = z`.
#[allow(clippy::too_many_arguments)]
#[inline]
fn conv_tap(
    geom: &ConvGeom,
    s: &ConvShape,
    chan: &[u8],
    (ky, kx): (usize, usize),
    wv: i32,
    z: i32,
    p0: usize,
    acc: &mut [i32],
) -> Result<(), Error> {
    let pad = wv * z;
    let (sw, w) = (geom.stride_w, s.w);
    // Output columns whose input column `ox·sw + kx·dw − pad_left` lies inside the row.
    let off = (kx * geom.dilation_w) as isize - geom.pad_left as isize;
    let lo = if off >= 0 {
        0
    } else {
        (off.unsigned_abs()).div_ceil(sw)
    };
    let last = w as isize - 1 - off;
    let hi = if last < 0 { 0 } else { last as usize / sw + 1 };
    let mut done = 0;
    while done < acc.len() {
        let p = p0 + done;
        let (oy, ox0) = (p / s.out_w, p % s.out_w);
        let len = (s.out_w - ox0).min(acc.len() - done);
        let seg = acc.get_mut(done..done + len).ok_or(Error::BadArgument)?;
        done += len;
        let iy = (oy * geom.stride_h + ky * geom.dilation_h) as isize - geom.pad_top as isize;
        let xrow = if iy >= 0 && (iy as usize) < s.h {
            chan.get(iy as usize * w..(iy as usize + 1) * w)
        } else {
            None
        };
        let Some(xrow) = xrow else {
            for a in seg.iter_mut() {
                *a = a.wrapping_add(pad);
            }
            continue;
        };
        let (v0, v1) = (
            lo.max(ox0).min(ox0 + len),
            hi.min(ox0 + len).max(lo.max(ox0).min(ox0 + len)),
        );
        let (left, rest) = seg.split_at_mut(v0 - ox0);
        let (mid, right) = rest.split_at_mut(v1 - v0);
        for a in left.iter_mut().chain(right.iter_mut()) {
            *a = a.wrapping_add(pad);
        }
        if mid.is_empty() {
            continue;
        }
        // Input column of output column v0.
        let ix0 = (v0 * sw) as isize + off;
        let need = (mid.len() - 1) * sw + 1;
        if xrow.get(ix0 as usize..).is_none_or(|r| r.len() < need) {
            return Err(Error::BadArgument);
        }
        // The rest of the channel from there: a SIMD kernel may load past the row's end (never
        // past the channel's) for a last, partial vector whose extra lanes it discards.
        let start = (iy as usize * w).checked_add(ix0 as usize);
        let xs = start
            .and_then(|i| chan.get(i..))
            .ok_or(Error::BadArgument)?;
        tap_row(mid, xs, sw, wv);
    }
    Ok(())
}

/// The accumulators of a fully connected layer over the flattened input (`K = numel(x)`):
/// `acc_n = Σ_k (q_nk − z_n)(a_k − z) + bias_n` for each of the first `n` outputs, handed to
/// `emit(n, channel, acc)`.
fn fc_accumulators(
    weights: &Weights<'_>,
    x: &QIn<'_>,
    n: usize,
    mut emit: impl FnMut(usize, &ChannelRecord, i32),
) -> Result<(), Error> {
    let input = input_slice(x)?;
    if weights.k != input.len() || weights.c_out != n {
        return Err(Error::BadArgument);
    }
    let sum_a = sum_codes(input);
    let k = input.len() as i32;
    let mut finish = |c: usize, dot: i32| -> Result<(), Error> {
        let ch = weights.channel(c).ok_or(Error::BadArgument)?;
        let acc = expand_acc(
            dot,
            ch.sum_q,
            sum_a,
            k,
            ch.w_zero as i32,
            x.zero as i32,
            ch.bias,
        );
        emit(c, &ch, acc);
        Ok(())
    };
    let mut c = 0;
    while c < n {
        #[cfg(target_arch = "x86_64")]
        if active() >= Isa::Avx2 {
            if weights.bits == 8 && c + 8 <= n {
                // A whole panel of 8-bit rows: its eight dots at once.
                // SAFETY: `active()` says the CPU has AVX2.
                let dots = unsafe { x86::dot8_panel_avx2(weights, c, input)? };
                for (j, dot) in dots.into_iter().enumerate() {
                    finish(c + j, dot)?;
                }
                c += 8;
                continue;
            }
            if weights.bits <= 4 {
                let row = weights.row(c).ok_or(Error::BadArgument)?;
                // SAFETY: as above.
                finish(c, unsafe { x86::dot_packed_avx2(&row, input)? })?;
                c += 1;
                continue;
            }
        }
        let row = weights.row(c).ok_or(Error::BadArgument)?;
        finish(c, dot_packed(&row, input))?;
        c += 1;
    }
    Ok(())
}

/// Fully connected: `y[n] = requantize(acc_n)` ([`fc_accumulators`]), `numel(y) = N` outputs.
pub fn fully_connected(weights: &Weights<'_>, x: &QIn<'_>, y: &mut QOut<'_>) -> Result<(), Error> {
    let n_out = numel(y.dims).ok_or(Error::BadArgument)?;
    let out = y.data.get_mut(..n_out).ok_or(Error::BadArgument)?;
    let (zero, lo, hi) = (y.zero as i32, y.lo, y.hi);
    fc_accumulators(weights, x, n_out, |c, ch, acc| {
        if let Some(o) = out.get_mut(c) {
            *o = numerics::requantize(acc, ch.mult, ch.shift, zero, lo, hi);
        }
    })
}

/// Fully connected with `f32` output: `y[n] = f32(acc_n) · (s_n · s_x)` ([`fc_accumulators`]),
/// no requantization and no clamp (the model's logits keep their full range). Both products
/// are single IEEE `f32` operations, so every target gives the same bits.
pub fn fully_connected_f32(
    weights: &Weights<'_>,
    x: &QIn<'_>,
    s_x: f32,
    out: &mut [f32],
) -> Result<(), Error> {
    let out = out.get_mut(..weights.c_out).ok_or(Error::BadArgument)?;
    fc_accumulators(weights, x, out.len(), |c, ch, acc| {
        if let Some(o) = out.get_mut(c) {
            *o = acc as f32 * (ch.w_scale * s_x);
        }
    })
}

/// Softmax over rows of `last` values of `f32` logits, in place (f64 sums, as [`softmax`]).
pub fn softmax_f32_in_place(last: usize, data: &mut [f32]) -> Result<(), Error> {
    if last == 0 || !data.len().is_multiple_of(last) {
        return Err(Error::BadArgument);
    }
    for row in data.chunks_exact_mut(last) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut sum = 0.0f64;
        for v in row.iter() {
            sum += numerics::exp(*v as f64 - max);
        }
        for v in row.iter_mut() {
            *v = (numerics::exp(*v as f64 - max) / sum) as f32;
        }
    }
    Ok(())
}

/// Whether `input` broadcasts to `out` (each right-aligned dim equal or 1).
pub fn broadcasts_to(input: [usize; 4], out: [usize; 4]) -> bool {
    input
        .iter()
        .zip(out.iter())
        .all(|(&i, &o)| i == o || i == 1)
}

/// Element strides of `dims` when read broadcast to an output: 0 along broadcast dims.
fn broadcast_strides(dims: [usize; 4], out: [usize; 4]) -> [usize; 4] {
    let mut strides = [0usize; 4];
    let mut step = 1usize;
    for ((st, &d), &o) in strides.iter_mut().zip(dims.iter()).zip(out.iter()).rev() {
        *st = if d == 1 && o != 1 { 0 } else { step };
        step = step.saturating_mul(d);
    }
    strides
}

/// Applies `f(a, b)` elementwise with numpy broadcasting of both inputs to `y.dims`.
fn broadcast_binary(
    a: &QIn<'_>,
    b: &QIn<'_>,
    y: &mut QOut<'_>,
    mut f: impl FnMut(u8, u8) -> u8,
) -> Result<(), Error> {
    let da = input_slice(a)?;
    let db = input_slice(b)?;
    let od = y.dims;
    if !broadcasts_to(a.dims, od) || !broadcasts_to(b.dims, od) {
        return Err(Error::BadArgument);
    }
    let n = numel(od).ok_or(Error::BadArgument)?;
    let out = y.data.get_mut(..n).ok_or(Error::BadArgument)?;
    if a.dims == od && b.dims == od {
        for ((o, &va), &vb) in out.iter_mut().zip(da).zip(db) {
            *o = f(va, vb);
        }
        return Ok(());
    }
    let sa = broadcast_strides(a.dims, od);
    let sb = broadcast_strides(b.dims, od);
    let mut it = out.iter_mut();
    for i0 in 0..od[0] {
        for i1 in 0..od[1] {
            for i2 in 0..od[2] {
                let ba = i0 * sa[0] + i1 * sa[1] + i2 * sa[2];
                let bb = i0 * sb[0] + i1 * sb[1] + i2 * sb[2];
                for i3 in 0..od[3] {
                    let va = da.get(ba + i3 * sa[3]).copied().unwrap_or(a.zero);
                    let vb = db.get(bb + i3 * sb[3]).copied().unwrap_or(b.zero);
                    if let Some(o) = it.next() {
                        *o = f(va, vb);
                    }
                }
            }
        }
    }
    Ok(())
}

fn sat_i32(v: i64) -> i64 {
    v.clamp(i32::MIN as i64, i32::MAX as i64)
}

/// Quantized residual Add with broadcasting, see [`AddParams`].
pub fn add(p: &AddParams, a: &QIn<'_>, b: &QIn<'_>, y: &mut QOut<'_>) -> Result<(), Error> {
    let (za, zb) = (a.zero as i64, b.zero as i64);
    let (zy, lo, hi) = (y.zero as i64, y.lo, y.hi);
    let p = *p;
    // Each input's rescaled value depends on its code alone: 256 of each, made once.
    let table = |z: i64, r: Requant| {
        let mut t = [0i64; 256];
        for (v, e) in t.iter_mut().enumerate() {
            *e = sat_i32(mul_round((v as i64 - z) << ADD_LEFT_SHIFT, r.mult, r.shift));
        }
        t
    };
    let (ta, tb) = (table(za, p.a), table(zb, p.b));
    if a.dims == y.dims && b.dims == y.dims {
        // Same shapes (residual adds): the saturated sums a tile at a time, then requantized
        // by the SIMD pass ([`numerics::ChannelRequant`] equals `requantize` for every `i32`,
        // and the sum is one after `sat_i32`).
        let (da, db) = (input_slice(a)?, input_slice(b)?);
        let n = numel(y.dims).ok_or(Error::BadArgument)?;
        let out = y.data.get_mut(..n).ok_or(Error::BadArgument)?;
        let req = numerics::ChannelRequant::new(p.out.mult, p.out.shift, y.zero as i32, lo, hi);
        let tiles = out.chunks_mut(CONV_TILE).zip(da.chunks(CONV_TILE));
        for ((o, xa), xb) in tiles.zip(db.chunks(CONV_TILE)) {
            let mut sums = [0i32; CONV_TILE];
            for ((s, &va), &vb) in sums.iter_mut().zip(xa).zip(xb) {
                let ra = ta.get(va as usize).copied().unwrap_or(0);
                let rb = tb.get(vb as usize).copied().unwrap_or(0);
                *s = sat_i32(ra + rb) as i32;
            }
            requant_tile(&req, sums.get(..o.len()).ok_or(Error::BadArgument)?, o);
        }
        return Ok(());
    }
    broadcast_binary(a, b, y, move |va, vb| {
        let ra = ta.get(va as usize).copied().unwrap_or(0);
        let rb = tb.get(vb as usize).copied().unwrap_or(0);
        let s = sat_i32(ra + rb);
        clamp_code(
            mul_round(s, p.out.mult, p.out.shift).saturating_add(zy),
            lo,
            hi,
        )
    })
}

/// Quantized Mul with broadcasting (squeeze-excitation scales `[1,C,H,W]` by `[1,C,1,1]`):
/// `y = clamp(mul_round((a − z_a)(b − z_b), out) + z_y)`, `out` for `s_a·s_b / s_y`.
pub fn mul(out: Requant, a: &QIn<'_>, b: &QIn<'_>, y: &mut QOut<'_>) -> Result<(), Error> {
    let (za, zb) = (a.zero as i64, b.zero as i64);
    let (zy, lo, hi) = (y.zero as i64, y.lo, y.hi);
    broadcast_binary(a, b, y, move |va, vb| {
        let prod = (va as i64 - za) * (vb as i64 - zb);
        clamp_code(
            mul_round(prod, out.mult, out.shift).saturating_add(zy),
            lo,
            hi,
        )
    })
}

/// Max pool. The output has the input's scale and zero point; the result is clamped to
/// `[y.lo, y.hi]` (a fused ReLU).
///
/// Row by row rather than window by window, so that the loops vectorize: each output row
/// starts at 0 (the identity of `max` on codes) and takes, for every tap `(ky, kx)` whose
/// input row exists, the elementwise maximum with that row read at `ox·sw + kx·dw − pad_left`
/// over the outputs whose column exists — the same taps as the window's.
pub fn max_pool(g: &PoolGeom, x: &QIn<'_>, y: &mut QOut<'_>) -> Result<(), Error> {
    let (lo, hi) = (y.lo, y.hi);
    let (input, out, [h, w, oh, ow]) = pool_slices(g, x, y)?;
    let sw = g.stride_w;
    for (plane, out_plane) in input.chunks_exact(h * w).zip(out.chunks_exact_mut(oh * ow)) {
        for (oy, orow) in out_plane.chunks_exact_mut(ow).enumerate() {
            orow.fill(0);
            for ky in 0..g.kernel_h {
                let Some(iy) = (oy * g.stride_h + ky * g.dilation_h)
                    .checked_sub(g.pad_top)
                    .filter(|&iy| iy < h)
                else {
                    continue;
                };
                let row = plane.get(iy * w..(iy + 1) * w).ok_or(Error::BadArgument)?;
                for kx in 0..g.kernel_w {
                    let dx = kx * g.dilation_w;
                    // Outputs `first..last` read columns inside the row.
                    let first = g.pad_left.saturating_sub(dx).div_ceil(sw);
                    let last = (w + g.pad_left).saturating_sub(dx).div_ceil(sw).min(ow);
                    if first >= last {
                        continue;
                    }
                    let ix0 = first * sw + dx - g.pad_left;
                    let dst = orow.get_mut(first..last).ok_or(Error::BadArgument)?;
                    let src = row.get(ix0..).ok_or(Error::BadArgument)?;
                    for (o, &v) in dst.iter_mut().zip(src.iter().step_by(sw)) {
                        *o = (*o).max(v);
                    }
                }
            }
            for o in orow.iter_mut() {
                *o = clamp_code(*o as i64, lo, hi);
            }
        }
    }
    Ok(())
}

/// Average pool: `y = clamp(round_half_away((Σ (a − z_x)) · mult / (count · 2^(31+shift))) + z_y)`
/// with one rounding (computed in `i128`), `req` standing for `s_x / s_y`. `count` is the
/// number of taps inside the input, or with `count_include_pad` inside the padded input
/// (`[−pad_before, n + pad_after)`; taps beyond that, from ceil mode, never count).
pub fn avg_pool(
    g: &PoolGeom,
    count_include_pad: bool,
    req: Requant,
    x: &QIn<'_>,
    y: &mut QOut<'_>,
) -> Result<(), Error> {
    let z = x.zero as i32;
    let (zy, lo, hi) = (y.zero as i64, y.lo, y.hi);
    let (h, w) = (x.dims[2] as isize, x.dims[3] as isize);
    pool(g, x, y, |codes, y0, x0| {
        let (sum, n_in) = codes.fold((0i64, 0usize), |(s, n), v| {
            (s + (v as i32 - z) as i64, n + 1)
        });
        let count = if count_include_pad {
            let ry = taps_in(
                y0,
                g.kernel_h,
                g.dilation_h,
                -(g.pad_top as isize),
                h + g.pad_bottom as isize,
            );
            let rx = taps_in(
                x0,
                g.kernel_w,
                g.dilation_w,
                -(g.pad_left as isize),
                w + g.pad_right as isize,
            );
            ry * rx
        } else {
            n_in
        };
        clamp_code(div_round(sum, count, req).saturating_add(zy), lo, hi)
    })
}

/// `round_half_away(sum · mult / (count · 2^(31+shift)))` in `i128`; `count == 0` gives 0.
fn div_round(sum: i64, count: usize, req: Requant) -> i64 {
    if count == 0 {
        return 0;
    }
    let n = 31 + req.shift.clamp(numerics::SHIFT_MIN, numerics::SHIFT_MAX);
    let p = sum as i128 * req.mult as i128;
    let (p, d) = if n >= 0 {
        (p, (count as i128) << n)
    } else {
        (p << (-n), count as i128)
    };
    let q = if p >= 0 {
        (2 * p + d) / (2 * d)
    } else {
        -((-2 * p + d) / (2 * d))
    };
    q.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

/// Global average pool `[1, C, H, W] → [1, C, 1, 1]`, the rounding of [`avg_pool`] with
/// `count = H·W`.
pub fn global_avg_pool(req: Requant, x: &QIn<'_>, y: &mut QOut<'_>) -> Result<(), Error> {
    let [n, c, h, w] = x.dims;
    if n != 1 || y.dims != [1, c, 1, 1] || h == 0 || w == 0 {
        return Err(Error::BadArgument);
    }
    let input = input_slice(x)?;
    let out = y.data.get_mut(..c).ok_or(Error::BadArgument)?;
    let z = x.zero as i64;
    for (o, plane) in out.iter_mut().zip(input.chunks_exact(h * w)) {
        let sum = plane.iter().fold(0i64, |s, &v| s + v as i64 - z);
        *o = clamp_code(
            div_round(sum, h * w, req).saturating_add(y.zero as i64),
            y.lo,
            y.hi,
        );
    }
    Ok(())
}

/// Shared window walk of the pools: `f(taps, y0, x0)` reduces the in-bounds codes of one
/// window whose top-left tap is at (`y0`, `x0`).
fn pool(
    g: &PoolGeom,
    x: &QIn<'_>,
    y: &mut QOut<'_>,
    mut f: impl FnMut(&mut dyn Iterator<Item = u8>, isize, isize) -> u8,
) -> Result<(), Error> {
    let (lo, hi) = (y.lo, y.hi);
    let (input, out, [h, w, oh, ow]) = pool_slices(g, x, y)?;
    let mut it = out.iter_mut();
    for plane in input.chunks_exact(h * w) {
        for oy in 0..oh {
            let y0 = (oy * g.stride_h) as isize - g.pad_top as isize;
            for ox in 0..ow {
                let x0 = (ox * g.stride_w) as isize - g.pad_left as isize;
                let mut taps = (0..g.kernel_h)
                    .map(move |ky| y0 + (ky * g.dilation_h) as isize)
                    .filter(move |&iy| iy >= 0 && iy < h as isize)
                    .flat_map(move |iy| {
                        (0..g.kernel_w)
                            .map(move |kx| x0 + (kx * g.dilation_w) as isize)
                            .filter(move |&ix| ix >= 0 && ix < w as isize)
                            .map(move |ix| iy as usize * w + ix as usize)
                    })
                    .filter_map(|i| plane.get(i).copied());
                let v = f(&mut taps, y0, x0);
                if let Some(o) = it.next() {
                    *o = clamp_code(v as i64, lo, hi);
                }
            }
        }
    }
    Ok(())
}

/// A pool's input codes, output slice and `[h, w, oh, ow]`.
type PoolSlices<'a, 'b> = (&'a [u8], &'b mut [u8], [usize; 4]);

/// A pool's input codes and output slice, its shapes checked: with `[h, w, oh, ow]`.
fn pool_slices<'a, 'b>(
    g: &PoolGeom,
    x: &QIn<'a>,
    y: &'b mut QOut<'_>,
) -> Result<PoolSlices<'a, 'b>, Error> {
    if !g.check(x.dims, y.dims) {
        return Err(Error::BadArgument);
    }
    let [_, _, h, w] = x.dims;
    let [_, _, oh, ow] = y.dims;
    let input = input_slice(x)?;
    let n_out = numel(y.dims).ok_or(Error::BadArgument)?;
    let out = y.data.get_mut(..n_out).ok_or(Error::BadArgument)?;
    Ok((input, out, [h, w, oh, ow]))
}

/// Writes one input of a Concat into its place along `axis` (0..4 of the right-aligned dims),
/// starting at index `offset` of that axis, requantized with `req` (`s_x / s_y`):
/// `y = clamp(mul_round(a − z_x, req) + z_y)`. Equal scales use `(2^30, −1)`, an exact copy.
pub fn concat_part(
    axis: usize,
    offset: usize,
    req: Requant,
    x: &QIn<'_>,
    y: &mut QOut<'_>,
) -> Result<(), Error> {
    if axis >= 4 {
        return Err(Error::BadArgument);
    }
    let input = input_slice(x)?;
    for (i, (&dx, &dy)) in x.dims.iter().zip(y.dims.iter()).enumerate() {
        let ok = if i == axis {
            offset.checked_add(dx).is_some_and(|e| e <= dy)
        } else {
            dx == dy
        };
        if !ok {
            return Err(Error::BadArgument);
        }
    }
    let inner: usize = x.dims.iter().skip(axis + 1).product();
    let chunk_in = x.dims.get(axis).copied().unwrap_or(0) * inner;
    let chunk_out = y.dims.get(axis).copied().unwrap_or(0) * inner;
    let n_out = numel(y.dims).ok_or(Error::BadArgument)?;
    let out = y.data.get_mut(..n_out).ok_or(Error::BadArgument)?;
    if chunk_in == 0 || chunk_out == 0 {
        return Ok(());
    }
    let (zx, zy, lo, hi) = (x.zero as i64, y.zero as i64, y.lo, y.hi);
    for (src, dst) in input
        .chunks_exact(chunk_in)
        .zip(out.chunks_exact_mut(chunk_out))
    {
        let dst = dst
            .get_mut(offset * inner..offset * inner + chunk_in)
            .ok_or(Error::BadArgument)?;
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = clamp_code(
                mul_round(s as i64 - zx, req.mult, req.shift).saturating_add(zy),
                lo,
                hi,
            );
        }
    }
    Ok(())
}

/// Table lookup `y[i] = table[x[i]]` (HardSwish, HardSigmoid, Sigmoid, any function of one code).
pub fn lut(table: &[u8], x: &QIn<'_>, y: &mut QOut<'_>) -> Result<(), Error> {
    let input = input_slice(x)?;
    let out = y.data.get_mut(..input.len()).ok_or(Error::BadArgument)?;
    for (o, &v) in out.iter_mut().zip(input) {
        *o = table.get(v as usize).copied().unwrap_or(0);
    }
    Ok(())
}

/// `codes[i] = table[codes[i]]`: a Conv's fused activation table.
pub fn lut_in_place(table: &[u8; 256], codes: &mut [u8]) {
    for v in codes {
        *v = table.get(*v as usize).copied().unwrap_or(0);
    }
}

/// Softmax over the last axis, written as `f32`: `y_i = e^{s(a_i − a_max)} / Σ_j e^{s(a_j −
/// a_max)}`, with [`numerics::exp`] and the sum in `f64` (relative error ≈ 1e-7: the `f32`
/// rounding of the result). `scale` is the input scale `s`.
pub fn softmax(x: &QIn<'_>, scale: f32, out: &mut [f32]) -> Result<(), Error> {
    let input = input_slice(x)?;
    let last = x.dims[3];
    if last == 0 || out.len() != input.len() {
        return Err(Error::BadArgument);
    }
    let s = scale as f64;
    for (row, o) in input.chunks_exact(last).zip(out.chunks_exact_mut(last)) {
        let max = row.iter().copied().max().unwrap_or(0);
        let mut sum = 0.0f64;
        for (&a, dst) in row.iter().zip(o.iter_mut()) {
            let e = numerics::exp(-s * (max - a) as f64);
            sum += e;
            *dst = e as f32; // held, normalized below
        }
        // Recompute in f64 for the division (the f32 held value only carries the order).
        for (&a, dst) in row.iter().zip(o.iter_mut()) {
            let e = numerics::exp(-s * (max - a) as f64);
            *dst = (e / sum) as f32;
        }
    }
    Ok(())
}

/// Quantizes `f32` values into codes ([`numerics::quantize_f32`]).
pub fn quantize(
    input: &[f32],
    scale: f32,
    zero: u8,
    bits: u8,
    out: &mut [u8],
) -> Result<(), Error> {
    if input.len() != out.len() {
        return Err(Error::BadArgument);
    }
    let max = code_max_i32(bits);
    // [`numerics::quantize_f32`] without branches, so that the loop vectorizes: the quotient
    // is first clamped to ±512, which changes no code (codes are clamped to [0, 255] after
    // the zero point is added) and makes the truncating cast exact; NaN becomes 0.
    for (o, &x) in out.iter_mut().zip(input) {
        let v = x / scale;
        let v = if v.is_nan() {
            0.0
        } else {
            v.clamp(-512.0, 512.0)
        };
        // SAFETY: `v` is finite and within ±512, so the truncation fits `i32`; unlike `as`,
        // it needs no saturation, which kept the loop from vectorizing.
        let t = unsafe { v.to_int_unchecked::<i32>() };
        let frac = v - t as f32;
        let r = t + (frac >= 0.5) as i32 - (frac <= -0.5) as i32;
        *o = (r + zero as i32).clamp(0, max) as u8;
    }
    Ok(())
}

fn code_max_i32(bits: u8) -> i32 {
    numerics::code_max(bits) as i32
}

/// Dequantizes codes into `f32` values ([`numerics::dequantize_f32`]).
pub fn dequantize(codes: &[u8], scale: f32, zero: u8, out: &mut [f32]) -> Result<(), Error> {
    if codes.len() != out.len() {
        return Err(Error::BadArgument);
    }
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = numerics::dequantize_f32(c, scale, zero);
    }
    Ok(())
}
