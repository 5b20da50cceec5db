//! The runtime's test helpers, shared by its tests and the `write_small_model` example: a
//! seeded generator, aligned arenas, packing of test weights, an independent reference
//! requantization (exact rational arithmetic in i128) and the small test model. A crate of its
//! own so the runtime stays dependency-free (it is only a dev-dependency).

use diffdfq_runtime::format::{row_bytes, ChannelRecord};
use diffdfq_runtime::numerics::code_max;

/// xorshift64* — deterministic test data.
pub struct Gen(u64);

impl Gen {
    pub fn new(seed: u64) -> Self {
        Gen(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `[lo, hi]`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next_u64() % ((hi - lo + 1) as u64)) as i64
    }
    pub fn code(&mut self, bits: u8) -> u8 {
        self.range(0, code_max(bits) as i64) as u8
    }
    pub fn codes(&mut self, n: usize, bits: u8) -> Vec<u8> {
        (0..n).map(|_| self.code(bits)).collect()
    }
    /// Uniform in `[lo, hi)`.
    pub fn f32(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }
    /// Roughly normal (sum of uniforms).
    pub fn normal(&mut self) -> f32 {
        (0..4).map(|_| self.f32(-1.0, 1.0)).sum::<f32>() * 0.866
    }
}

/// A 16-byte-aligned arena.
pub struct Arena {
    buf: Vec<u8>,
    off: usize,
    len: usize,
}

impl Arena {
    pub fn new(len: usize) -> Self {
        let buf = vec![0xA5u8; len + 16];
        let off = buf.as_ptr().align_offset(16);
        Arena { buf, off, len }
    }
    pub fn bytes(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// Exact reference: `clamp(round_half_away(acc·mult / 2^(31+shift)) + zero, lo, hi)`.
pub fn ref_requant(acc: i64, mult: i32, shift: i32, zero: i64, lo: u8, hi: u8) -> u8 {
    ref_round_div(acc as i128 * mult as i128, 1i128 << (31 + shift))
        .saturating_add(zero as i128)
        .clamp(lo as i128, hi as i128) as u8
}

/// `num / den` rounded half away from zero, `den > 0`.
pub fn ref_round_div(num: i128, den: i128) -> i128 {
    let q = num.abs() / den;
    let r = num.abs() % den;
    let q = if 2 * r >= den { q + 1 } else { q };
    if num < 0 {
        -q
    } else {
        q
    }
}

/// A random valid (mult, shift) making typical accumulators of magnitude `typical` land in
/// about ±`target` codes.
pub fn pick_requant(rng: &mut Gen, typical: f64, target: f64) -> (i32, i32) {
    let real = target / typical.max(1.0) * (0.5 + rng.f32(0.0, 1.0) as f64);
    diffdfq_runtime::quantize_multiplier(real)
}

/// Packs `c_out` rows of `k` codes (the panel layout) and their channel records into
/// blob-style byte arrays.
pub fn pack_weights(
    bits: u8,
    k: usize,
    codes: &[u8],
    chans: &[ChannelRecord],
) -> (Vec<u8>, Vec<u8>) {
    let rb = row_bytes(bits, k).unwrap();
    let mut rows = vec![0u8; rb * chans.len()];
    diffdfq_runtime::format::pack_weights(bits, k, codes, &mut rows).unwrap();
    let mut cb = Vec::new();
    for c in chans {
        cb.extend_from_slice(&c.to_bytes());
    }
    (rows, cb)
}

/// Random channel records for rows of `k` codes.
pub fn random_channels(
    rng: &mut Gen,
    bits: u8,
    k: usize,
    codes: &[u8],
    a_bits: u8,
) -> Vec<ChannelRecord> {
    let typical =
        (k as f64).sqrt() * ((1u32 << bits) as f64 / 3.0) * ((1u32 << a_bits) as f64 / 3.0);
    codes
        .chunks_exact(k)
        .map(|row| {
            let (mult, shift) = pick_requant(rng, typical, 100.0);
            ChannelRecord {
                w_scale: rng.f32(0.01, 0.1),
                bias: rng.range(-(typical as i64) - 1, typical as i64 + 1) as i32,
                sum_q: row.iter().map(|&q| q as i32).sum(),
                mult,
                shift,
                w_zero: rng.code(bits),
                reserved: [0; 3],
            }
        })
        .collect()
}

/// The output codes of `kernels::conv2d` (`[1, c_in, h, w]` → `[1, c_out, oh, ow]`) with
/// the weight `codes` (`c_out` rows of `k`) and `chans` packed as a blob holds them; the
/// scratch region as the compiler sizes it for `scratch_for`'s kernels (`None`: the least,
/// `conv_scratch_len`).
#[allow(clippy::too_many_arguments)]
pub fn run_conv(
    g: &ConvGeom,
    scratch_for: Option<diffdfq_runtime::kernels::Isa>,
    (bits, k): (u8, usize),
    codes: &[u8],
    chans: &[ChannelRecord],
    (x, dims_in, z): (&[u8], [usize; 4], u8),
    dims_out: [usize; 4],
    (zero, lo, hi): (u8, u8, u8),
) -> Vec<u8> {
    use diffdfq_runtime::format::Weights;
    use diffdfq_runtime::kernels::{self, QIn, QOut};
    let (rows, cb) = pack_weights(bits, k, codes, chans);
    let weights = Weights::new(bits, k, chans.len(), &rows, &cb).unwrap();
    let mut y = vec![0xEEu8; dims_out.iter().product()];
    let len = scratch_for.map_or(kernels::conv_scratch_len(k), |isa| {
        kernels::conv_scratch_len_for(isa, g, dims_in, dims_out, bits).unwrap()
    });
    // Odd-sized and odd-aligned, as an arena region may be.
    let mut buf = vec![0xA5u8; len + 1];
    let scratch = &mut buf[1..];
    let x = QIn {
        data: x,
        dims: dims_in,
        zero: z,
    };
    let mut out = QOut {
        data: &mut y,
        dims: dims_out,
        zero,
        lo,
        hi,
    };
    kernels::conv2d(g, &weights, &x, &mut out, scratch).unwrap();
    y
}

/// Rebuilds codes from dequantized outputs (`y = s·(a − z)`).
pub fn codes_of(y: &[f32], scale: f32, zero: u8) -> Vec<i32> {
    y.iter()
        .map(|&v| (v / scale).round() as i32 + zero as i32)
        .collect()
}

/// Inputs that quantize exactly to `codes`.
pub fn floats_of(codes: &[u8], scale: f32, zero: u8) -> Vec<f32> {
    codes
        .iter()
        .map(|&a| scale * (a as f32 - zero as f32))
        .collect()
}

use diffdfq_runtime::format::{DType, Layer, ModelBuilder};
use diffdfq_runtime::kernels::{ConvGeom, PoolGeom};
use diffdfq_runtime::numerics::Fused;

/// A small valid model with random codes: input [1,2,8,8] → conv 3×3 pad 1 (4 ch, ReLU) →
/// maxpool 2×2 → flatten → fully connected 10 → softmax (f32 output).
pub fn small_model(bits: u8, a_bits: u8, seed: u64) -> Vec<u8> {
    let mut rng = Gen::new(seed);
    let act = if a_bits == 8 { DType::U8 } else { DType::U4 };
    let zin = code_max_of(a_bits) / 2;
    let mut b = ModelBuilder::new();
    let x = b.tensor(&[1, 2, 8, 8], act, 0.05, zin);
    let c = b.tensor(&[1, 4, 8, 8], act, 0.04, 0);
    let p = b.tensor(&[1, 4, 4, 4], act, 0.04, 0);
    let f = b.tensor(&[1, 64], act, 0.04, 0);
    let l = b.tensor(&[1, 10], act, 0.1, zin);
    let s = b.tensor(&[1, 10], DType::F32, 1.0, 0);
    b.set_input(x);
    b.set_output(s);
    let g = ConvGeom {
        kernel_h: 3,
        kernel_w: 3,
        stride_h: 1,
        stride_w: 1,
        dilation_h: 1,
        dilation_w: 1,
        pad_top: 1,
        pad_left: 1,
        pad_bottom: 1,
        pad_right: 1,
        groups: 1,
    };
    let codes = rng.codes(4 * 18, bits);
    let scales: Vec<f32> = (0..4).map(|_| rng.f32(0.01, 0.05)).collect();
    let zps: Vec<u8> = (0..4).map(|_| rng.code(bits)).collect();
    let bias: Vec<f32> = (0..4).map(|_| rng.f32(-0.1, 0.1)).collect();
    b.conv(
        x,
        c,
        &g,
        &Layer {
            bits,
            codes: &codes,
            scales: &scales,
            zero_points: &zps,
            bias: &bias,
        },
        Fused::Relu,
    )
    .unwrap();
    let pg = PoolGeom {
        kernel_h: 2,
        kernel_w: 2,
        stride_h: 2,
        stride_w: 2,
        dilation_h: 1,
        dilation_w: 1,
        pad_top: 0,
        pad_left: 0,
        pad_bottom: 0,
        pad_right: 0,
    };
    b.max_pool(c, p, &pg, Fused::None).unwrap();
    b.reshape(p, f).unwrap();
    let codes = rng.codes(10 * 64, bits);
    let scales: Vec<f32> = (0..10).map(|_| rng.f32(0.01, 0.05)).collect();
    let zps: Vec<u8> = (0..10).map(|_| rng.code(bits)).collect();
    b.fully_connected(
        f,
        l,
        &Layer {
            bits,
            codes: &codes,
            scales: &scales,
            zero_points: &zps,
            bias: &[],
        },
        Fused::None,
    )
    .unwrap();
    b.softmax(l, s).unwrap();
    b.finish().unwrap()
}

pub fn code_max_of(bits: u8) -> u8 {
    diffdfq_runtime::numerics::code_max(bits)
}

/// Byte offset of op record `i` in a blob.
pub fn op_offset(blob: &[u8], i: usize) -> usize {
    let rd32 = |o: usize| u32::from_le_bytes(blob[o..o + 4].try_into().unwrap()) as usize;
    let mut at = rd32(40);
    for _ in 0..i {
        at += u16::from_le_bytes([blob[at + 4], blob[at + 5]]) as usize;
    }
    at
}

/// Byte offset of the parameter record of op `i`.
pub fn op_params(blob: &[u8], i: usize) -> usize {
    let at = op_offset(blob, i);
    let n = blob[at + 1] as usize;
    at + 8 + (2 * n).div_ceil(4) * 4
}

/// Byte offset of tensor record `id`.
pub fn tensor_at(id: usize) -> usize {
    64 + 32 * id
}

/// Byte offset of the pool.
pub fn pool_at(blob: &[u8]) -> usize {
    u32::from_le_bytes(blob[48..52].try_into().unwrap()) as usize
}

pub fn put_u32(blob: &mut [u8], at: usize, v: u32) {
    blob[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn put_u16(blob: &mut [u8], at: usize, v: u16) {
    blob[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
