//! Integer numerics shared by the runtime and the compiler (docs/design.md §4): one definition of every
//! rounding step, so the compiler's reference graph and the device compute the same integers.
//!
//! * weight code `q ∈ [0, 2^b − 1]`, `w ≈ s_c·(q − z_c)` per output channel `c`;
//! * activation code `a ∈ [0, 2^A − 1]` (A = 4 or 8) held in a `u8`, `x ≈ s·(a − z)`;
//! * products accumulate in `i32`; a real rescaling factor `r` is a pair (`mult`, `shift`) with
//!   `r ≈ mult · 2^-(31 + shift)`, `mult ∈ {0} ∪ [2^30, 2^31)` (Q31) and `shift ∈ [−31, 31]`
//!   (a right shift; negative means a left shift), made by [`quantize_multiplier`];
//! * every rounding is half away from zero; every result is clamped, never wrapped.
//!
//! Only `core` floating point is used (no `std` math): `round`, `floor`, `exp` are written here.

/// Smallest allowed shift of a (mult, shift) pair.
pub const SHIFT_MIN: i32 = -31;
/// Largest allowed shift of a (mult, shift) pair.
pub const SHIFT_MAX: i32 = 31;
/// Smallest non-zero Q31 multiplier.
pub const MULT_MIN: i32 = 1 << 30;

/// Left shift applied to both `(a − z)` terms of an Add before they are rescaled to the common
/// intermediate scale (as in TFLite): `(a − z)·2^20 < 2^28` keeps 20 fraction bits.
pub const ADD_LEFT_SHIFT: u32 = 20;

/// Whether (`mult`, `shift`) is a valid rescaling pair: `mult == 0` (the factor zero) or
/// `2^30 ≤ mult < 2^31`, and `−31 ≤ shift ≤ 31`.
pub const fn multiplier_is_valid(mult: i32, shift: i32) -> bool {
    (mult == 0 || mult >= MULT_MIN) && shift >= SHIFT_MIN && shift <= SHIFT_MAX
}

/// Rounds `x · mult / 2^(31 + shift)` half away from zero, computed exactly in `i64`.
///
/// `shift` is clamped to `[−31, 31]` (so the divisor is `2^0 … 2^62`); the product saturates at
/// the `i64` range, which no caller reaches (`|x| ≤ 2^32` everywhere in the runtime).
pub fn mul_round(x: i64, mult: i32, shift: i32) -> i64 {
    let n = 31 + shift.clamp(SHIFT_MIN, SHIFT_MAX);
    let p = x.saturating_mul(mult as i64);
    if n <= 0 {
        return p;
    }
    round_shift(p, n as u32)
}

/// `p / 2^n` rounded half away from zero, `1 ≤ n ≤ 62`.
fn round_shift(p: i64, n: u32) -> i64 {
    let half = 1i64 << (n - 1);
    if p >= 0 {
        p.saturating_add(half) >> n
    } else {
        -(p.saturating_neg().saturating_add(half) >> n)
    }
}

/// Requantizes an `i32` accumulator to an activation code:
///
/// `clamp(round_half_away(acc · mult / 2^(31 + shift)) + zero, lo, hi)`
///
/// computed in `i64` (no intermediate overflow: `|acc · mult| < 2^62`), where `mult` is a Q31
/// multiplier in `[2^30, 2^31)` (or 0) and `shift` a right shift in `[−31, 31]` (negative = left
/// shift), both made by [`quantize_multiplier`] from the real ratio `s_in·s_w / s_out`. `zero` is
/// the output zero point and `[lo, hi]` the clamp: the activation range `[0, 2^A − 1]` narrowed
/// by a fused ReLU (`lo = zero`) or ReLU6 (`hi = zero + round(6 / s_out)`), see
/// [`clamp_bounds`]. If `lo > hi` the result is `hi` (never produced by a valid model).
pub fn requantize(acc: i32, mult: i32, shift: i32, zero: i32, lo: u8, hi: u8) -> u8 {
    clamp_code(
        mul_round(acc as i64, mult, shift).saturating_add(zero as i64),
        lo,
        hi,
    )
}

/// [`requantize`] with one channel's constants hoisted, for the loops over a channel's outputs:
/// the same result for every `i32` accumulator, without branches. (`|acc · mult| < 2^62`, so
/// the saturating steps of [`mul_round`] never saturate and the sign can be folded out.)
#[derive(Clone, Copy, Debug)]
pub struct ChannelRequant {
    mult: i64,
    n: u32,
    half: i64,
    zero: i64,
    lo: i64,
    hi: i64,
}

impl ChannelRequant {
    pub fn new(mult: i32, shift: i32, zero: i32, lo: u8, hi: u8) -> Self {
        let n = (31 + shift.clamp(SHIFT_MIN, SHIFT_MAX)) as u32;
        ChannelRequant {
            mult: mult as i64,
            n,
            half: if n == 0 { 0 } else { 1i64 << (n - 1) },
            zero: zero as i64,
            lo: lo as i64,
            // `hi` wins if `lo > hi`, as in `clamp_code`.
            hi: hi as i64,
        }
    }

    /// `(mult, n, half, zero, lo, hi)`: the constants, for the SIMD forms of [`Self::apply`].
    #[cfg_attr(
        not(any(target_arch = "x86_64", target_arch = "aarch64")),
        allow(dead_code) // no SIMD kernels on other targets
    )]
    #[inline(always)]
    pub(crate) fn constants(&self) -> (i64, u32, i64, i64, i64, i64) {
        (self.mult, self.n, self.half, self.zero, self.lo, self.hi)
    }

    #[inline(always)]
    pub fn apply(&self, acc: i32) -> u8 {
        let p = acc as i64 * self.mult;
        // Half away from zero: round |p|, then give the sign back.
        let neg = p >> 63;
        // |p| + half ≥ 0: a logical shift, which every SIMD ISA has for 64-bit lanes.
        let r = ((((p ^ neg) - neg + self.half) as u64 >> self.n) as i64 ^ neg) - neg;
        let v = (r + self.zero).max(self.lo).min(self.hi);
        v as u8
    }
}

/// Clamps an integer to `[lo, hi]` and narrows it to a code (`hi` wins if `lo > hi`).
#[inline]
pub fn clamp_code(v: i64, lo: u8, hi: u8) -> u8 {
    let v = if v < lo as i64 { lo as i64 } else { v };
    let v = if v > hi as i64 { hi as i64 } else { v };
    v as u8
}

/// The Q31 pair for a real factor: returns (`mult`, `shift`) with
/// `real ≈ mult · 2^-(31 + shift)`, `mult ∈ [2^30, 2^31)`, `shift ∈ [−31, 31]`.
///
/// `real = f · 2^e` with `f ∈ [0.5, 1)` (a hand-written `frexp` on the bits); `mult =
/// round_half_away(f · 2^31)` (if that reaches `2^31`: `mult = 2^30`, `e += 1`); `shift = −e`.
/// Edge cases: `real ≤ 0`, NaN, subnormal or `shift > 31` (real < 2^-32) give `(0, 0)` (the
/// factor zero); `real ≥ 2^31` or +∞ saturate to `(i32::MAX, −31)`.
pub fn quantize_multiplier(real: f64) -> (i32, i32) {
    if real.is_nan() || real <= 0.0 {
        return (0, 0);
    }
    if real == f64::INFINITY {
        return (i32::MAX, SHIFT_MIN);
    }
    let bits = real.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i32;
    if biased == 0 {
        return (0, 0); // subnormal: far below 2^-32
    }
    let mut e = biased - 1022;
    let f = f64::from_bits((bits & !(0x7ffu64 << 52)) | (1022u64 << 52)); // in [0.5, 1)
    let mut m = round_half_away_f64(f * 2147483648.0);
    if m >= 1i64 << 31 {
        m = 1i64 << 30;
        e += 1;
    }
    let shift = -e;
    if shift > SHIFT_MAX {
        return (0, 0);
    }
    if shift < SHIFT_MIN {
        return (i32::MAX, SHIFT_MIN);
    }
    (m as i32, shift)
}

/// The real factor a (`mult`, `shift`) pair stands for: `mult · 2^-(31 + shift)`.
pub fn multiplier_value(mult: i32, shift: i32) -> f64 {
    let mut v = mult as f64;
    let n = 31 + shift.clamp(SHIFT_MIN, SHIFT_MAX);
    let mut i = 0;
    while i < n {
        v *= 0.5;
        i += 1;
    }
    v
}

/// Rounds half away from zero to an `i64`, saturating; NaN gives 0.
pub fn round_half_away_f64(x: f64) -> i64 {
    if x.is_nan() {
        return 0;
    }
    if x >= 9.2e18 {
        return i64::MAX;
    }
    if x <= -9.2e18 {
        return i64::MIN;
    }
    let t = x as i64; // truncation toward zero, exact for |x| < 2^63
    let frac = x - t as f64; // exact
    if frac >= 0.5 {
        t + 1
    } else if frac <= -0.5 {
        t - 1
    } else {
        t
    }
}

/// Rounds half away from zero to an `i32`, saturating; NaN gives 0.
pub fn round_half_away_f32(x: f32) -> i32 {
    if x.is_nan() {
        return 0;
    }
    if x >= 2147483648.0 {
        return i32::MAX;
    }
    if x <= -2147483648.0 {
        return i32::MIN;
    }
    let t = x as i32;
    let frac = x - t as f32; // exact: |x| < 2^31 and t keeps every integer bit of x
    if frac >= 0.5 {
        t + 1
    } else if frac <= -0.5 {
        t - 1
    } else {
        t
    }
}

/// Largest code of a `bits`-bit activation (`2^bits − 1`; 255 for anything ≥ 8).
pub const fn code_max(bits: u8) -> u8 {
    if bits >= 8 {
        255
    } else {
        ((1u16 << bits) - 1) as u8
    }
}

/// Quantizes one real input value: `clamp(round_half_away(x / s) + z, 0, 2^bits − 1)`, the
/// division in `f32`. NaN maps to the zero point (the code of 0.0).
pub fn quantize_f32(x: f32, scale: f32, zero: u8, bits: u8) -> u8 {
    let v = x / scale;
    let r = if v.is_nan() {
        0
    } else {
        round_half_away_f32(v)
    };
    clamp_code(r as i64 + zero as i64, 0, code_max(bits))
}

/// Dequantizes one code: `s · (a − z)` in `f32` (`(a − z)` is exact in `f32`).
#[inline]
pub fn dequantize_f32(code: u8, scale: f32, zero: u8) -> f32 {
    (code as i32 - zero as i32) as f32 * scale
}

/// A fused activation, applied as the clamp of a requantization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fused {
    /// Only the activation range `[0, 2^A − 1]`.
    None,
    /// ReLU: `lo = z` (the code of 0.0).
    Relu,
    /// ReLU6: `lo = z`, `hi = z + round_half_away(6 / s)`.
    Relu6,
}

/// The clamp bounds `(lo, hi)` of an output with scale `scale`, zero point `zero` and `bits`-bit
/// codes, for a fused activation. Codes are clamped into `[0, 2^bits − 1]` first.
pub fn clamp_bounds(fused: Fused, scale: f32, zero: u8, bits: u8) -> (u8, u8) {
    let max = code_max(bits);
    let z = if zero > max { max } else { zero };
    match fused {
        Fused::None => (0, max),
        Fused::Relu => (z, max),
        Fused::Relu6 => {
            let six = round_half_away_f64(6.0 / scale as f64);
            (z, clamp_code((z as i64).saturating_add(six), z, max))
        }
    }
}

/// `e^x` in `f64` without `std`: `x = k·ln2 + r` with `|r| ≤ ln2/2` (Cody–Waite, two-part ln 2),
/// a degree-13 Taylor polynomial for `e^r` (truncation error < 5e-18 relative) and `2^k` built
/// from the exponent bits. Relative error about 1e-15 over the whole range; `x > 709.78` gives
/// +∞, `x < −745.2` gives 0, NaN gives NaN.
pub fn exp(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x > 709.782712893384 {
        return f64::INFINITY;
    }
    if x < -745.2 {
        return 0.0;
    }
    // ln 2 = LN2_HI + LN2_LO, LN2_HI with 32 significant bits so k·LN2_HI is exact (fdlibm).
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
    const LOG2E: f64 = core::f64::consts::LOG2_E;
    let k = round_half_away_f64(x * LOG2E);
    let kf = k as f64;
    let r = (x - kf * LN2_HI) - kf * LN2_LO;
    // Horner form of Σ_{i=0}^{13} r^i / i!
    let mut p = 0.0;
    for c in INV_FACT.iter().rev() {
        p = p * r + c;
    }
    scale_by_pow2(p, k)
}

/// `1 / i!` for `i = 0..=13`.
const INV_FACT: [f64; 14] = [
    1.0,
    1.0,
    1.0 / 2.0,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5040.0,
    1.0 / 40320.0,
    1.0 / 362880.0,
    1.0 / 3628800.0,
    1.0 / 39916800.0,
    1.0 / 479001600.0,
    1.0 / 6227020800.0,
];

/// `v · 2^k` for `v ∈ [0.7, 1.5]`, `k ∈ [−1076, 1024]`, with gradual underflow.
fn scale_by_pow2(mut v: f64, mut k: i64) -> f64 {
    while k > 1000 {
        v *= f64::from_bits(((1000 + 1023) as u64) << 52);
        k -= 1000;
    }
    while k < -1000 {
        v *= f64::from_bits(((-1000i64 + 1023) as u64) << 52);
        k += 1000;
    }
    v * f64::from_bits(((k + 1023) as u64) << 52)
}

/// A requantization factor (`mult`, `shift`), see [`numerics::requantize`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Requant {
    /// Q31 multiplier in `[2^30, 2^31)` or 0.
    pub mult: i32,
    /// Right shift in `[−31, 31]`.
    pub shift: i32,
}

impl Requant {
    /// Whether the pair is valid (see [`multiplier_is_valid`]).
    pub const fn is_valid(&self) -> bool {
        multiplier_is_valid(self.mult, self.shift)
    }
}

/// Parameters of a quantized Add: each input is rescaled to a common intermediate scale
/// (`ra = mul_round((a − z_a)·2^20, mult_a, shift_a)`, saturated to `i32`; same for b), the sum
/// (saturated to `i32`) is rescaled to the output: `y = clamp(mul_round(ra + rb, out) + z_y)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AddParams {
    pub a: Requant,
    pub b: Requant,
    pub out: Requant,
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn channel_requant_equals_requantize() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let edges = [
            0,
            1,
            -1,
            i32::MAX,
            i32::MIN,
            1 << 30,
            -(1 << 30),
            12345,
            -12345,
        ];
        for shift in SHIFT_MIN..=SHIFT_MAX {
            for _ in 0..400 {
                let mult = match next() % 4 {
                    0 => 0,
                    1 => MULT_MIN,
                    2 => i32::MAX,
                    _ => MULT_MIN + (next() % (1 << 30)) as i32,
                };
                let zero = (next() % 256) as i32;
                let (lo, hi) = ((next() % 256) as u8, (next() % 256) as u8);
                let r = ChannelRequant::new(mult, shift, zero, lo, hi);
                for acc in edges.into_iter().chain((0..8).map(|_| next() as i32)) {
                    let want = requantize(acc, mult, shift, zero, lo, hi);
                    assert_eq!(r.apply(acc), want, "{acc} {mult} {shift} {zero} {lo} {hi}");
                }
            }
        }
    }

    #[test]
    fn requantize_rounds_half_away_from_zero() {
        // mult = 2^30, shift = 0: factor 1/2.
        let m = 1 << 30;
        assert_eq!(requantize(3, m, 0, 0, 0, 255), 2); // 1.5 -> 2
        assert_eq!(requantize(5, m, 0, 10, 0, 255), 13); // 2.5 -> 3, +10
        assert_eq!(requantize(-3, m, 0, 10, 0, 255), 8); // -1.5 -> -2, +10
        assert_eq!(requantize(-5, m, 0, 10, 0, 255), 7); // -2.5 -> -3
        assert_eq!(requantize(-1, m, 0, 10, 0, 255), 9); // -0.5 -> -1
        assert_eq!(requantize(1, m, 0, 10, 0, 255), 11); // 0.5 -> 1
        assert_eq!(requantize(1000, m, 0, 0, 3, 200), 200);
        assert_eq!(requantize(-1000, m, 0, 0, 3, 200), 3);
        // negative shift = left shift: factor 2^30 * 2^-(31-2) = 2
        assert_eq!(requantize(7, m, -2, 0, 0, 255), 14);
    }

    #[test]
    fn quantize_multiplier_matches_the_real_value() {
        for &r in &[
            1.0,
            0.5,
            0.75,
            1e-3,
            3.0e-7,
            123.456,
            0.999999999,
            2.0f64.powi(-32),
        ] {
            let (m, s) = quantize_multiplier(r);
            assert!(multiplier_is_valid(m, s), "{r}: {m} {s}");
            assert!(m >= MULT_MIN);
            let back = multiplier_value(m, s);
            assert!(((back - r) / r).abs() < 1e-9, "{r} -> {back}");
        }
        assert_eq!(quantize_multiplier(0.0), (0, 0));
        assert_eq!(quantize_multiplier(-1.0), (0, 0));
        assert_eq!(quantize_multiplier(f64::NAN), (0, 0));
        assert_eq!(quantize_multiplier(1e-20), (0, 0));
        assert_eq!(quantize_multiplier(1e20), (i32::MAX, -31));
        assert_eq!(quantize_multiplier(1.0), (1 << 30, -1));
        // rounding up to 2^31 renormalizes
        let (m, s) = quantize_multiplier(1.0 - 1e-12);
        assert_eq!((m, s), (1 << 30, -1));
    }

    #[test]
    fn exp_matches_std() {
        let mut x = -740.0f64;
        while x < 709.0 {
            let e = exp(x);
            let r = x.exp();
            // Subnormal results carry fewer bits: there, allow a couple of their ulps.
            let ok = ((e - r) / r).abs() < 4e-15 || (r < 2.3e-308 && (e - r).abs() <= 1e-323);
            assert!(ok, "{x}: {e} vs {r}");
            x += 0.37;
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(1000.0), f64::INFINITY);
        assert_eq!(exp(-1000.0), 0.0);
    }

    #[test]
    fn quantize_input_rounds_and_clamps() {
        assert_eq!(quantize_f32(0.25, 0.5, 10, 8), 11); // 0.5 -> 1
        assert_eq!(quantize_f32(-0.25, 0.5, 10, 8), 9); // -0.5 -> -1
        assert_eq!(quantize_f32(0.2499, 0.5, 10, 8), 10);
        assert_eq!(quantize_f32(100.0, 0.5, 10, 4), 15);
        assert_eq!(quantize_f32(-100.0, 0.5, 10, 8), 0);
        assert_eq!(quantize_f32(f32::NAN, 0.5, 10, 8), 10);
        assert_eq!(quantize_f32(f32::INFINITY, 0.5, 10, 8), 255);
        assert_eq!(round_half_away_f32(0.49999997), 0);
        assert_eq!(round_half_away_f64(-0.49999999999999994), 0);
        assert_eq!(round_half_away_f64(2.5), 3);
    }

    #[test]
    fn clamp_bounds_for_fused_activations() {
        assert_eq!(clamp_bounds(Fused::None, 0.1, 20, 8), (0, 255));
        assert_eq!(clamp_bounds(Fused::Relu, 0.1, 20, 8), (20, 255));
        assert_eq!(clamp_bounds(Fused::Relu6, 0.1, 20, 8), (20, 80));
        assert_eq!(clamp_bounds(Fused::Relu6, 0.1, 3, 4), (3, 15));
    }
}
