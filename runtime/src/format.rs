//! # The `.dfq` packed model format, version 1
//!
//! One blob holds a whole quantized network; the runtime reads it in place (`&'static [u8]`
//! from flash, zero copy) after [`Model::from_bytes`] has validated it once. Everything is
//! little-endian; records are read field by field (never transmuted), so the blob needs no
//! alignment in memory. Offsets are from the start of the blob unless said otherwise.
//!
//! ```text
//! ┌──────────────┬─────────────────────┬──────────────────┬───────────────┐
//! │ header (64)  │ tensor table        │ op list          │ weight pool   │
//! │ at 0         │ at 64, 32 B/tensor  │ 16-aligned       │ 16-aligned    │
//! └──────────────┴─────────────────────┴──────────────────┴───────────────┘
//! ```
//!
//! The layout is canonical: `tensors_offset = 64`, `ops_offset = align16(64 + 32·n_tensors)`,
//! `pool_offset = align16(ops_offset + ops_size)`, `total_len = align16(pool_offset +
//! pool_size)`; padding bytes between sections are zero (the writer) and covered by the checksum.
//!
//! ## Header ([`Header`], 64 bytes)
//!
//! | off | size | field | meaning |
//! |----:|----:|---|---|
//! | 0 | 4 | `magic` | `b"DFQ1"` |
//! | 4 | 2 | `version` | 1 |
//! | 6 | 2 | `flags` | 0 (reserved) |
//! | 8 | 4 | `total_len` | blob length in bytes, a multiple of 16; the blob must be exactly this long |
//! | 12 | 4 | `checksum` | CRC-32 (IEEE 802.3, reflected, poly `0xEDB88320`, init and xorout `0xFFFFFFFF`) of bytes `0..total_len` with these 4 bytes read as zero |
//! | 16 | 4 | `arena_size` | bytes of the caller's arena the model uses |
//! | 20 | 4 | `scratch_offset` | start of the kernels' scratch region in the arena |
//! | 24 | 4 | `scratch_size` | its size (≥ the largest conv `K`, see [`crate::kernels::conv_scratch_len`]) |
//! | 28 | 2 | `n_tensors` | ≥ 1 |
//! | 30 | 2 | `n_ops` | number of op records |
//! | 32 | 2 | `input` | model input tensor id (codes) |
//! | 34 | 2 | `output` | model output tensor id (codes, or `f32`) |
//! | 36 | 4 | `tensors_offset` | 64 |
//! | 40 | 4 | `ops_offset` | |
//! | 44 | 4 | `ops_size` | bytes of op records |
//! | 48 | 4 | `pool_offset` | |
//! | 52 | 4 | `pool_size` | bytes of the weight pool |
//! | 56 | 8 | `reserved` | zero |
//!
//! ## Tensor record ([`TensorRecord`], 32 bytes; tensor id = index in the table)
//!
//! | off | size | field | meaning |
//! |----:|----:|---|---|
//! | 0 | 1 | `rank` | 1..=4 |
//! | 1 | 1 | `dtype` | 8 = u8 codes, 4 = 4-bit codes held one per byte, 32 = `f32` (no arena bytes: it lives in the caller's output buffer; see *f32 tensors* below) |
//! | 2 | 1 | `zero_point` | `z ≤ 2^A − 1` (0 for `f32`) |
//! | 3 | 1 | reserved | 0 |
//! | 4 | 16 | `dims` | 4 × u32, the first `rank` used (NCHW, batch 1), each in `1..=2^24`; the rest 1 |
//! | 20 | 4 | `numel` | product of the dims |
//! | 24 | 4 | `scale` | `f32`, finite, > 0: `x ≈ scale·(a − z)` |
//! | 28 | 4 | `arena_offset` | code tensors occupy `[arena_offset, arena_offset + numel)` of the arena, which must lie inside `arena_size` and outside the scratch region; 0 for `f32` |
//!
//! ## Op list
//!
//! `n_ops` variable-length records, back to back, filling `ops_size` exactly, in execution
//! order. Each record: an 8-byte [`OpHeader`] (`kind` u8, `n_inputs` u8, `output` u16,
//! `record_len` u16, reserved u16 = 0), then `n_inputs` tensor ids (u16) zero-padded to a
//! multiple of 4 bytes, then the kind's parameter record; `record_len` is the total.
//!
//! | kind | op | inputs | params (bytes) |
//! |---:|---|---:|---|
//! | 1 | Conv | 1 | [`ConvRecord`] (40) |
//! | 2 | FullyConnected | 1 | [`FcRecord`] (16) |
//! | 3 | Add | 2 | [`BinaryRecord`] (28) |
//! | 4 | Mul | 2 | [`BinaryRecord`] (28; `a`, `b` multipliers zero) |
//! | 5 | MaxPool | 1 | [`PoolRecord`] (32; multiplier zero, flags 0) |
//! | 6 | AvgPool | 1 | [`PoolRecord`] (32; flags bit 0 = count_include_pad) |
//! | 7 | GlobalAvgPool | 1 | [`GapRecord`] (12) |
//! | 8 | Concat | ≥ 1 | [`ConcatRecord`] (8): axis, pool offset of `n_inputs` × (mult i32, shift i32) |
//! | 9 | Reshape / Flatten | 1 | none (same codes; the output may share the input's arena offset) |
//! | 10 | Lut | 1 | [`LutRecord`] (8): pool offset of a 256-byte table `y = table[x]` |
//! | 11 | Softmax | 1 | 4 reserved zero bytes; last op, output `f32` = model output |
//!
//! **f32 tensors.** At most two, both in the caller's output buffer: the model output, written
//! by the last op, which is either a Softmax or a FullyConnected whose `i32` accumulators are
//! dequantized straight to `f32` (`y_n = f32(acc_n) · (s_n · s_x)`, `s_n` the channel's weight
//! scale, no clamp: the logits keep their full range); or, when the last op is a Softmax, its
//! input may be such a FullyConnected output (the op before it), and the Softmax then runs in
//! place on the output buffer. The FullyConnected's `lo`/`hi` are 0 then.
//!
//! Rules checked at load: an op reads only the model input or tensors written by earlier ops,
//! every tensor is written at most once, an op's output never overlaps its inputs (a Reshape
//! may alias its input exactly), and no op overwrites a tensor that a later op (or the model
//! output) still reads. Scale ratios are (`mult`, `shift`) pairs ([`crate::numerics`]).
//!
//! ## Weight pool and packed weights
//!
//! Raw bytes referenced by (offset, length) from op parameters, relative to `pool_offset`.
//! Conv and FullyConnected reference `C_out` packed rows and `C_out` [`ChannelRecord`]s
//! (24 bytes: weight scale `f32`, bias `i32` in units of `s_w·s_x`, `Σq` of the row `i32`,
//! requantization `mult` `i32`, `shift` `i32`, weight zero point `u8`, 3 reserved).
//!
//! A row holds the `K = C_in/groups · kh · kw` weight codes of one output channel (conv order
//! `[c_in][ky][kx]`; fully connected: the flattened input order) at `b ∈ {2, 3, 4, 8}` bits:
//! **a little-endian bit stream, code `i` in bits `b·i .. b·i + b`**, padded with zero codes
//! to a multiple of 8 codes. So every group of 8 codes is exactly `b` bytes, a row is
//! `b · ceil(K/8)` bytes ([`row_bytes`]) and starts byte-aligned at `c · row_bytes`; a 3-bit
//! code costs exactly 3 bits. Why this layout: one group is one ≤ 64-bit little-endian load
//! followed by 8 shift-and-mask steps with constant shifts (`(w >> b·i) & (2^b − 1)`,
//! [`unpack_group`]). For b = 2, 4, 8 codes never straddle a byte, so a SIMD kernel unpacks 16
//! or 32 bytes at once with `psrlw`/`ushr` + `pand`/`and` and interleaves; for b = 3 it
//! broadcasts each 3-byte group to 8 lanes (`pshufb`/`tbl`) and applies a per-lane variable
//! shift (`vpsrlvd`, `ushl` by −[0, 3, …, 21]) and a mask — no bit-plane recombination and no
//! data-dependent control flow. Rows start byte-aligned so kernels index rows directly.
//!
//! With the writer (cargo feature `write`, `alloc` only) the same module builds blobs:
//! `ModelBuilder`.

use crate::error::Error;
use crate::kernels::{self, AddParams, ConvGeom, PoolGeom, Requant};
use crate::numerics::{self, code_max};
use core::mem::{offset_of, size_of};

/// `b"DFQ1"`.
pub const MAGIC: [u8; 4] = *b"DFQ1";
/// The format version this runtime reads and writes.
pub const VERSION: u16 = 1;
/// Alignment of every section and of `total_len`.
pub const SECTION_ALIGN: usize = 16;
/// Byte length of [`Header`].
pub const HEADER_LEN: usize = 64;
/// Byte offset of the checksum field in the header.
pub const CHECKSUM_AT: usize = 12;
/// Byte length of [`TensorRecord`].
pub const TENSOR_RECORD_LEN: usize = 32;
/// Byte length of [`OpHeader`].
pub const OP_HEADER_LEN: usize = 8;
/// Byte length of [`ChannelRecord`].
pub const CHANNEL_RECORD_LEN: usize = 24;
/// Largest tensor dim.
pub const MAX_DIM: u32 = 1 << 24;
/// Weight bit widths the format packs.
pub const WEIGHT_BITS: [u8; 4] = [2, 3, 4, 8];

/// The blob header (field order and sizes = byte layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Header {
    pub magic: [u8; 4],
    pub version: u16,
    pub flags: u16,
    pub total_len: u32,
    pub checksum: u32,
    pub arena_size: u32,
    pub scratch_offset: u32,
    pub scratch_size: u32,
    pub n_tensors: u16,
    pub n_ops: u16,
    pub input: u16,
    pub output: u16,
    pub tensors_offset: u32,
    pub ops_offset: u32,
    pub ops_size: u32,
    pub pool_offset: u32,
    pub pool_size: u32,
    pub reserved: [u8; 8],
}
const _: () = assert!(size_of::<Header>() == HEADER_LEN);
const _: () = assert!(offset_of!(Header, checksum) == CHECKSUM_AT);
const _: () = assert!(offset_of!(Header, tensors_offset) == 36);
const _: () = assert!(offset_of!(Header, reserved) == 56);

/// A tensor record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct TensorRecord {
    pub rank: u8,
    pub dtype: u8,
    pub zero_point: u8,
    pub reserved: u8,
    pub dims: [u32; 4],
    pub numel: u32,
    pub scale: f32,
    pub arena_offset: u32,
}
const _: () = assert!(size_of::<TensorRecord>() == TENSOR_RECORD_LEN);
const _: () = assert!(offset_of!(TensorRecord, scale) == 24);

/// The fixed head of an op record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OpHeader {
    pub kind: u8,
    pub n_inputs: u8,
    pub output: u16,
    pub record_len: u16,
    pub reserved: u16,
}
const _: () = assert!(size_of::<OpHeader>() == OP_HEADER_LEN);

/// Conv parameters (kind 1).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConvRecord {
    pub kernel_h: u16,
    pub kernel_w: u16,
    pub stride_h: u16,
    pub stride_w: u16,
    pub dilation_h: u16,
    pub dilation_w: u16,
    pub pad_top: u16,
    pub pad_left: u16,
    pub pad_bottom: u16,
    pub pad_right: u16,
    pub groups: u16,
    pub w_bits: u8,
    pub clamp_lo: u8,
    pub clamp_hi: u8,
    pub reserved: [u8; 3],
    pub weights_offset: u32,
    pub weights_len: u32,
    pub channels_offset: u32,
}
const _: () = assert!(size_of::<ConvRecord>() == 40);
const _: () = assert!(offset_of!(ConvRecord, weights_offset) == 28);

/// Fully-connected parameters (kind 2).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FcRecord {
    pub w_bits: u8,
    pub clamp_lo: u8,
    pub clamp_hi: u8,
    pub reserved: u8,
    pub weights_offset: u32,
    pub weights_len: u32,
    pub channels_offset: u32,
}
const _: () = assert!(size_of::<FcRecord>() == 16);

/// Add / Mul parameters (kinds 3, 4).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BinaryRecord {
    pub mult_a: i32,
    pub shift_a: i32,
    pub mult_b: i32,
    pub shift_b: i32,
    pub mult_out: i32,
    pub shift_out: i32,
    pub clamp_lo: u8,
    pub clamp_hi: u8,
    pub reserved: [u8; 2],
}
const _: () = assert!(size_of::<BinaryRecord>() == 28);

/// MaxPool / AvgPool parameters (kinds 5, 6).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PoolRecord {
    pub kernel_h: u16,
    pub kernel_w: u16,
    pub stride_h: u16,
    pub stride_w: u16,
    pub dilation_h: u16,
    pub dilation_w: u16,
    pub pad_top: u16,
    pub pad_left: u16,
    pub pad_bottom: u16,
    pub pad_right: u16,
    pub flags: u8,
    pub clamp_lo: u8,
    pub clamp_hi: u8,
    pub reserved: u8,
    pub mult: i32,
    pub shift: i32,
}
const _: () = assert!(size_of::<PoolRecord>() == 32);

/// GlobalAvgPool parameters (kind 7).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GapRecord {
    pub clamp_lo: u8,
    pub clamp_hi: u8,
    pub reserved: [u8; 2],
    pub mult: i32,
    pub shift: i32,
}
const _: () = assert!(size_of::<GapRecord>() == 12);

/// Concat parameters (kind 8).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConcatRecord {
    pub axis: u8,
    pub reserved: [u8; 3],
    pub requant_offset: u32,
}
const _: () = assert!(size_of::<ConcatRecord>() == 8);

/// Lut parameters (kind 10). `func` names the function for tools (0 custom, 1 ReLU, 2 ReLU6,
/// 3 HardSigmoid, 4 HardSwish, 5 Sigmoid); the runtime only applies the table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LutRecord {
    pub func: u8,
    pub reserved: [u8; 3],
    pub table_offset: u32,
}
const _: () = assert!(size_of::<LutRecord>() == 8);

/// Per-output-channel record of a Conv / FullyConnected.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct ChannelRecord {
    /// Weight scale `s_c` (for tools; the integer path uses `mult`/`shift`).
    pub w_scale: f32,
    /// Bias in accumulator units `s_c·s_x`.
    pub bias: i32,
    /// `Σ q` over the row's `K` codes.
    pub sum_q: i32,
    /// Q31 multiplier of `s_c·s_x / s_y`.
    pub mult: i32,
    /// Its shift.
    pub shift: i32,
    /// Weight zero point `z_c`.
    pub w_zero: u8,
    pub reserved: [u8; 3],
}
const _: () = assert!(size_of::<ChannelRecord>() == CHANNEL_RECORD_LEN);

/// Op kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum OpKind {
    Conv = 1,
    FullyConnected = 2,
    Add = 3,
    Mul = 4,
    MaxPool = 5,
    AvgPool = 6,
    GlobalAvgPool = 7,
    Concat = 8,
    Reshape = 9,
    Lut = 10,
    Softmax = 11,
}

impl OpKind {
    /// The kind of a byte.
    pub const fn from_u8(v: u8) -> Option<OpKind> {
        Some(match v {
            1 => OpKind::Conv,
            2 => OpKind::FullyConnected,
            3 => OpKind::Add,
            4 => OpKind::Mul,
            5 => OpKind::MaxPool,
            6 => OpKind::AvgPool,
            7 => OpKind::GlobalAvgPool,
            8 => OpKind::Concat,
            9 => OpKind::Reshape,
            10 => OpKind::Lut,
            11 => OpKind::Softmax,
            _ => return None,
        })
    }

    /// Byte length of the kind's parameter record.
    pub const fn params_len(self) -> usize {
        match self {
            OpKind::Conv => size_of::<ConvRecord>(),
            OpKind::FullyConnected => size_of::<FcRecord>(),
            OpKind::Add | OpKind::Mul => size_of::<BinaryRecord>(),
            OpKind::MaxPool | OpKind::AvgPool => size_of::<PoolRecord>(),
            OpKind::GlobalAvgPool => size_of::<GapRecord>(),
            OpKind::Concat => size_of::<ConcatRecord>(),
            OpKind::Reshape => 0,
            OpKind::Lut => size_of::<LutRecord>(),
            OpKind::Softmax => 4,
        }
    }

    /// Whether `n` inputs is a valid arity.
    pub const fn arity_ok(self, n: usize) -> bool {
        match self {
            OpKind::Add | OpKind::Mul => n == 2,
            OpKind::Concat => n >= 1,
            _ => n == 1,
        }
    }
}

/// Record length of an op with `n_inputs` inputs.
pub const fn op_record_len(kind: OpKind, n_inputs: usize) -> usize {
    OP_HEADER_LEN + align_up(2 * n_inputs, 4) + kind.params_len()
}

/// `v` rounded up to a multiple of `a` (a power of two).
pub const fn align_up(v: usize, a: usize) -> usize {
    (v + (a - 1)) & !(a - 1)
}

// ---------------------------------------------------------------------------------------------
// Field-by-field little-endian reading and writing.

/// A little-endian reader over a byte slice; every read is bounds-checked.
struct Rd<'a> {
    b: &'a [u8],
    err: Error,
}

impl<'a> Rd<'a> {
    fn new(b: &'a [u8], err: Error) -> Self {
        Rd { b, err }
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let (h, t) = self.b.split_first_chunk::<N>().ok_or(self.err)?;
        self.b = t;
        Ok(*h)
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.arr::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn i32(&mut self) -> Result<i32, Error> {
        Ok(i32::from_le_bytes(self.arr()?))
    }
    fn f32(&mut self) -> Result<f32, Error> {
        Ok(f32::from_le_bytes(self.arr()?))
    }
}

/// A little-endian writer into a fixed byte array (no allocation).
struct Wr<'a> {
    b: &'a mut [u8],
    pos: usize,
}

impl Wr<'_> {
    fn put(&mut self, v: &[u8]) {
        if let Some(dst) = self.b.get_mut(self.pos..self.pos + v.len()) {
            dst.copy_from_slice(v);
        }
        self.pos += v.len();
    }
}

macro_rules! record_io {
    ($t:ident, $len:expr, $($f:ident : $k:ident),* $(,)?) => {
        impl $t {
            /// Byte length of the record.
            pub const LEN: usize = $len;
            /// Reads the record from the start of `b` (`err` if `b` is short).
            fn read_from(b: &[u8], err: Error) -> Result<Self, Error> {
                let mut r = Rd::new(b, err);
                Ok($t { $($f: record_io!(@read r, $k)),* })
            }
            /// The record's bytes.
            pub fn to_bytes(&self) -> [u8; $len] {
                let mut out = [0u8; $len];
                let mut w = Wr { b: &mut out, pos: 0 };
                $(record_io!(@write w, self.$f, $k);)*
                out
            }
        }
    };
    (@read $r:ident, u8) => { $r.u8()? };
    (@read $r:ident, u16) => { $r.u16()? };
    (@read $r:ident, u32) => { $r.u32()? };
    (@read $r:ident, i32) => { $r.i32()? };
    (@read $r:ident, f32) => { $r.f32()? };
    (@read $r:ident, a2) => { $r.arr::<2>()? };
    (@read $r:ident, a3) => { $r.arr::<3>()? };
    (@read $r:ident, a4) => { $r.arr::<4>()? };
    (@read $r:ident, a8) => { $r.arr::<8>()? };
    (@read $r:ident, d4) => { [$r.u32()?, $r.u32()?, $r.u32()?, $r.u32()?] };
    (@write $w:ident, $v:expr, d4) => { for d in $v.iter() { $w.put(&d.to_le_bytes()); } };
    (@write $w:ident, $v:expr, a2) => { $w.put(&$v) };
    (@write $w:ident, $v:expr, a3) => { $w.put(&$v) };
    (@write $w:ident, $v:expr, a4) => { $w.put(&$v) };
    (@write $w:ident, $v:expr, a8) => { $w.put(&$v) };
    (@write $w:ident, $v:expr, $k:ident) => { $w.put(&$v.to_le_bytes()) };
}

record_io!(Header, 64, magic: a4, version: u16, flags: u16, total_len: u32, checksum: u32,
    arena_size: u32, scratch_offset: u32, scratch_size: u32, n_tensors: u16, n_ops: u16,
    input: u16, output: u16, tensors_offset: u32, ops_offset: u32, ops_size: u32,
    pool_offset: u32, pool_size: u32, reserved: a8);
record_io!(TensorRecord, 32, rank: u8, dtype: u8, zero_point: u8, reserved: u8, dims: d4,
    numel: u32, scale: f32, arena_offset: u32);
record_io!(OpHeader, 8, kind: u8, n_inputs: u8, output: u16, record_len: u16, reserved: u16);
record_io!(ConvRecord, 40, kernel_h: u16, kernel_w: u16, stride_h: u16, stride_w: u16,
    dilation_h: u16, dilation_w: u16, pad_top: u16, pad_left: u16, pad_bottom: u16,
    pad_right: u16, groups: u16, w_bits: u8, clamp_lo: u8, clamp_hi: u8, reserved: a3,
    weights_offset: u32, weights_len: u32, channels_offset: u32);
record_io!(FcRecord, 16, w_bits: u8, clamp_lo: u8, clamp_hi: u8, reserved: u8,
    weights_offset: u32, weights_len: u32, channels_offset: u32);
record_io!(BinaryRecord, 28, mult_a: i32, shift_a: i32, mult_b: i32, shift_b: i32,
    mult_out: i32, shift_out: i32, clamp_lo: u8, clamp_hi: u8, reserved: a2);
record_io!(PoolRecord, 32, kernel_h: u16, kernel_w: u16, stride_h: u16, stride_w: u16,
    dilation_h: u16, dilation_w: u16, pad_top: u16, pad_left: u16, pad_bottom: u16,
    pad_right: u16, flags: u8, clamp_lo: u8, clamp_hi: u8, reserved: u8, mult: i32, shift: i32);
record_io!(GapRecord, 12, clamp_lo: u8, clamp_hi: u8, reserved: a2, mult: i32, shift: i32);
record_io!(ConcatRecord, 8, axis: u8, reserved: a3, requant_offset: u32);
record_io!(LutRecord, 8, func: u8, reserved: a3, table_offset: u32);
record_io!(ChannelRecord, 24, w_scale: f32, bias: i32, sum_q: i32, mult: i32, shift: i32,
    w_zero: u8, reserved: a3);

const _: () = assert!(Header::LEN == size_of::<Header>());
const _: () = assert!(TensorRecord::LEN == size_of::<TensorRecord>());
const _: () = assert!(ConvRecord::LEN == size_of::<ConvRecord>());
const _: () = assert!(PoolRecord::LEN == size_of::<PoolRecord>());
const _: () = assert!(ChannelRecord::LEN == size_of::<ChannelRecord>());

impl Header {
    /// Parses the header at the start of a blob.
    pub fn parse(b: &[u8]) -> Result<Header, Error> {
        Header::read_from(b, Error::Truncated)
    }
}

impl ChannelRecord {
    /// Parses a channel record.
    pub fn parse(b: &[u8]) -> Option<ChannelRecord> {
        ChannelRecord::read_from(b, Error::BadArgument).ok()
    }
}

// ---------------------------------------------------------------------------------------------
// Checksum.

#[allow(clippy::indexing_slicing)] // const evaluation; i < 256
const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC_TABLE: [u32; 256] = crc_table();

/// Continues a CRC-32 (IEEE) over `bytes`; start with `!0`, finish with `!crc`.
pub fn crc32_update(mut crc: u32, bytes: &[u8]) -> u32 {
    for &b in bytes {
        let t = CRC_TABLE
            .get(((crc ^ b as u32) & 0xff) as usize)
            .copied()
            .unwrap_or(0);
        crc = t ^ (crc >> 8);
    }
    crc
}

/// The checksum of a blob: CRC-32 of `blob` with bytes 12..16 taken as zero.
pub fn blob_checksum(blob: &[u8]) -> u32 {
    let head = blob.get(..CHECKSUM_AT).unwrap_or(blob);
    let tail = blob.get(CHECKSUM_AT + 4..).unwrap_or(&[]);
    let mut c = crc32_update(!0, head);
    c = crc32_update(c, &[0; 4]);
    !crc32_update(c, tail)
}

// ---------------------------------------------------------------------------------------------
// Weight packing.

/// Whether `bits` is a packed weight width (2, 3, 4, 8).
pub const fn is_weight_bits(bits: u8) -> bool {
    matches!(bits, 2 | 3 | 4 | 8)
}

/// Bytes of one packed row of `k` codes: `bits · ceil(k / 8)`.
pub fn row_bytes(bits: u8, k: usize) -> Option<usize> {
    k.checked_add(7).map(|v| v / 8)?.checked_mul(bits as usize)
}

/// Unpacks one group (`bits` bytes, little-endian bit stream) into 8 codes. Missing bytes read
/// as zero; `bits` outside 1..=8 gives zeros.
#[inline]
pub fn unpack_group(bits: u8, group: &[u8], out: &mut [u8; 8]) {
    if bits == 0 || bits > 8 {
        *out = [0; 8];
        return;
    }
    let mut w = 0u64;
    for (i, &b) in group.iter().take(8).enumerate() {
        w |= (b as u64) << (8 * i);
    }
    let mask = (1u64 << bits) - 1;
    for (i, o) in out.iter_mut().enumerate() {
        *o = ((w >> (bits as usize * i)) & mask) as u8;
    }
}

/// Packs `codes` (each `< 2^bits`) into `out` (`row_bytes(bits, codes.len())` bytes), padding
/// with zero codes.
pub fn pack_row(bits: u8, codes: &[u8], out: &mut [u8]) -> Result<(), Error> {
    if !is_weight_bits(bits) || row_bytes(bits, codes.len()) != Some(out.len()) {
        return Err(Error::BadArgument);
    }
    let max = code_max(bits);
    let b = bits as usize;
    for (group, dst) in codes.chunks(8).zip(out.chunks_exact_mut(b)) {
        let mut w = 0u64;
        for (i, &c) in group.iter().enumerate() {
            if c > max {
                return Err(Error::BadArgument);
            }
            w |= (c as u64) << (b * i);
        }
        for (i, d) in dst.iter_mut().enumerate() {
            *d = (w >> (8 * i)) as u8;
        }
    }
    Ok(())
}

/// Unpacks a row into `out.len()` codes; `row` must be `row_bytes(bits, out.len())` bytes.
pub fn unpack_row(bits: u8, row: &[u8], out: &mut [u8]) -> Result<(), Error> {
    if !is_weight_bits(bits) || row_bytes(bits, out.len()) != Some(row.len()) {
        return Err(Error::BadArgument);
    }
    let mut codes = [0u8; 8];
    for (group, dst) in row.chunks_exact(bits as usize).zip(out.chunks_mut(8)) {
        unpack_group(bits, group, &mut codes);
        for (d, &c) in dst.iter_mut().zip(codes.iter()) {
            *d = c;
        }
    }
    Ok(())
}

/// The packed weights of one Conv / FullyConnected op: `c_out` rows of `k` codes plus `c_out`
/// channel records, both borrowed from the blob (or any buffer, for the compiler).
#[derive(Clone, Copy, Debug)]
pub struct Weights<'a> {
    /// Bits per code (2, 3, 4, 8).
    pub bits: u8,
    /// Codes per row.
    pub k: usize,
    /// Rows (output channels).
    pub c_out: usize,
    /// Bytes per row, `row_bytes(bits, k)`.
    pub row_bytes: usize,
    rows: &'a [u8],
    channels: &'a [u8],
}

impl<'a> Weights<'a> {
    /// Checks lengths: `rows` is `c_out · row_bytes(bits, k)` bytes and `channels` `c_out · 24`.
    pub fn new(
        bits: u8,
        k: usize,
        c_out: usize,
        rows: &'a [u8],
        channels: &'a [u8],
    ) -> Result<Self, Error> {
        let rb = row_bytes(bits, k).ok_or(Error::BadArgument)?;
        if !is_weight_bits(bits)
            || k == 0
            || c_out == 0
            || rb.checked_mul(c_out) != Some(rows.len())
            || CHANNEL_RECORD_LEN.checked_mul(c_out) != Some(channels.len())
        {
            return Err(Error::BadArgument);
        }
        Ok(Weights {
            bits,
            k,
            c_out,
            row_bytes: rb,
            rows,
            channels,
        })
    }

    /// Packed row `c`.
    #[inline]
    pub fn row(&self, c: usize) -> Option<&'a [u8]> {
        self.rows
            .get(c.checked_mul(self.row_bytes)?..)?
            .get(..self.row_bytes)
    }

    /// Channel record `c`.
    #[inline]
    pub fn channel(&self, c: usize) -> Option<ChannelRecord> {
        ChannelRecord::parse(self.channels.get(c.checked_mul(CHANNEL_RECORD_LEN)?..)?)
    }

    /// All packed rows.
    pub fn rows(&self) -> &'a [u8] {
        self.rows
    }

    /// All channel records (`c_out` × 24 bytes).
    pub fn channels(&self) -> &'a [u8] {
        self.channels
    }
}

// ---------------------------------------------------------------------------------------------
// Tensors.

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// 4-bit codes, one per byte.
    U4,
    /// 8-bit codes.
    U8,
    /// `f32` (only the output of a final Softmax).
    F32,
}

impl DType {
    /// From the record byte.
    pub const fn from_u8(v: u8) -> Option<DType> {
        match v {
            4 => Some(DType::U4),
            8 => Some(DType::U8),
            32 => Some(DType::F32),
            _ => None,
        }
    }
    /// The record byte (= bits).
    pub const fn bits(self) -> u8 {
        match self {
            DType::U4 => 4,
            DType::U8 => 8,
            DType::F32 => 32,
        }
    }
    /// Largest code (`2^bits − 1`), 0 for `f32`.
    pub const fn code_max(self) -> u8 {
        match self {
            DType::U4 => 15,
            DType::U8 => 255,
            DType::F32 => 0,
        }
    }
    /// Whether it holds activation codes in the arena.
    pub const fn is_code(self) -> bool {
        !matches!(self, DType::F32)
    }
}

/// A validated tensor record.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TensorInfo {
    pub rank: u8,
    /// Dims; the first `rank` are the shape, the rest 1.
    pub dims: [u32; 4],
    pub numel: u32,
    pub dtype: DType,
    pub scale: f32,
    pub zero_point: u8,
    pub arena_offset: u32,
}

impl TensorInfo {
    /// The shape (`rank` dims).
    pub fn shape(&self) -> &[u32] {
        self.dims.get(..self.rank as usize).unwrap_or(&self.dims)
    }
    /// The shape right-aligned into 4 dims (`[N, C, H, W]`, leading 1s).
    pub fn dims4(&self) -> [usize; 4] {
        let mut d = [1usize; 4];
        let shape = self.shape();
        let skip = 4usize.saturating_sub(shape.len());
        for (dst, &s) in d.iter_mut().skip(skip).zip(shape) {
            *dst = s as usize;
        }
        d
    }
    /// Bytes it occupies in the arena (`numel` for codes, 0 for `f32`).
    pub fn arena_len(&self) -> usize {
        if self.dtype.is_code() {
            self.numel as usize
        } else {
            0
        }
    }
    /// Whether two tensors have the same quantization (dtype, zero point, scale bits).
    pub fn same_quant(&self, o: &TensorInfo) -> bool {
        self.dtype == o.dtype
            && self.zero_point == o.zero_point
            && self.scale.to_bits() == o.scale.to_bits()
    }

    /// Parses and validates a 32-byte tensor record (`id` names it in errors).
    pub fn from_bytes(b: &[u8], id: u16) -> Result<TensorInfo, Error> {
        TensorInfo::from_record(
            &TensorRecord::read_from(b, Error::BadTensor { tensor: id })?,
            id,
        )
    }

    /// Its record, at arena offset `arena_offset`.
    pub fn to_record(&self, arena_offset: u32) -> TensorRecord {
        TensorRecord {
            rank: self.rank,
            dtype: self.dtype.bits(),
            zero_point: self.zero_point,
            reserved: 0,
            dims: self.dims,
            numel: self.numel,
            scale: self.scale,
            arena_offset,
        }
    }

    fn from_record(r: &TensorRecord, id: u16) -> Result<TensorInfo, Error> {
        let bad = Error::BadTensor { tensor: id };
        let dtype = DType::from_u8(r.dtype).ok_or(bad)?;
        if r.rank == 0 || r.rank > 4 || r.reserved != 0 {
            return Err(bad);
        }
        let mut n = 1u64;
        for (i, &d) in r.dims.iter().enumerate() {
            if i < r.rank as usize {
                if d == 0 || d > MAX_DIM {
                    return Err(bad);
                }
            } else if d != 1 {
                return Err(bad);
            }
            n = n.saturating_mul(d as u64);
        }
        if n != r.numel as u64 || n > i32::MAX as u64 {
            return Err(bad);
        }
        if !r.scale.is_finite() || r.scale <= 0.0 {
            return Err(bad);
        }
        if r.zero_point > dtype.code_max() {
            return Err(bad);
        }
        if !dtype.is_code() && r.arena_offset != 0 {
            return Err(bad);
        }
        Ok(TensorInfo {
            rank: r.rank,
            dims: r.dims,
            numel: r.numel,
            dtype,
            scale: r.scale,
            zero_point: r.zero_point,
            arena_offset: r.arena_offset,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Ops.

/// The tensor ids of an op's inputs (u16 little-endian, borrowed from the blob).
#[derive(Clone, Copy, Debug)]
pub struct TensorList<'a>(&'a [u8]);

impl<'a> TensorList<'a> {
    /// Number of ids.
    pub fn len(&self) -> usize {
        self.0.len() / 2
    }
    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Id `i`.
    pub fn get(&self, i: usize) -> Option<u16> {
        let at = i.checked_mul(2)?;
        let b = self.0.get(at..at.checked_add(2)?)?;
        Some(u16::from_le_bytes([*b.first()?, *b.get(1)?]))
    }
    /// All ids.
    pub fn iter(&self) -> impl Iterator<Item = u16> + 'a {
        self.0.chunks_exact(2).map(|c| {
            u16::from_le_bytes([
                c.first().copied().unwrap_or(0),
                c.get(1).copied().unwrap_or(0),
            ])
        })
    }
}

/// One op record of the op list, not yet decoded.
#[derive(Clone, Copy, Debug)]
pub struct OpRecord<'a> {
    /// Position in the op list.
    pub index: u16,
    pub kind: OpKind,
    pub output: u16,
    pub inputs: TensorList<'a>,
    params: &'a [u8],
}

/// A decoded op with its parameters.
#[derive(Clone, Copy, Debug)]
pub enum Op<'a> {
    Conv {
        geom: ConvGeom,
        weights: Weights<'a>,
        lo: u8,
        hi: u8,
    },
    FullyConnected {
        weights: Weights<'a>,
        lo: u8,
        hi: u8,
    },
    Add {
        params: AddParams,
        lo: u8,
        hi: u8,
    },
    Mul {
        req: Requant,
        lo: u8,
        hi: u8,
    },
    MaxPool {
        geom: PoolGeom,
        lo: u8,
        hi: u8,
    },
    AvgPool {
        geom: PoolGeom,
        count_include_pad: bool,
        req: Requant,
        lo: u8,
        hi: u8,
    },
    GlobalAvgPool {
        req: Requant,
        lo: u8,
        hi: u8,
    },
    /// `requants` holds one (mult i32, shift i32) per input, see [`concat_requant`].
    Concat {
        axis: u8,
        requants: &'a [u8],
    },
    Reshape,
    Lut {
        func: u8,
        table: &'a [u8; 256],
    },
    Softmax,
}

/// The requantization of Concat input `i` from its `requants` bytes.
pub fn concat_requant(requants: &[u8], i: usize) -> Option<Requant> {
    let b = requants.get(i.checked_mul(8)?..)?;
    let mut r = Rd::new(b, Error::BadArgument);
    Some(Requant {
        mult: r.i32().ok()?,
        shift: r.i32().ok()?,
    })
}

/// Iterator over the op records of a model.
#[derive(Clone, Debug)]
pub struct OpIter<'a> {
    rest: &'a [u8],
    index: u16,
    left: u16,
}

impl<'a> Iterator for OpIter<'a> {
    type Item = Result<OpRecord<'a>, Error>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        let index = self.index;
        let r = parse_op_record(self.rest, index);
        match r {
            Ok((rec, len)) => {
                self.rest = self.rest.get(len..).unwrap_or(&[]);
                self.index = self.index.wrapping_add(1);
                self.left -= 1;
                Some(Ok(rec))
            }
            Err(e) => {
                self.left = 0;
                Some(Err(e))
            }
        }
    }
}

fn parse_op_record(b: &[u8], index: u16) -> Result<(OpRecord<'_>, usize), Error> {
    let bad = Error::BadOp { op: index };
    let h = OpHeader::read_from(b, bad)?;
    let kind = OpKind::from_u8(h.kind).ok_or(bad)?;
    let n = h.n_inputs as usize;
    if !kind.arity_ok(n) || h.reserved != 0 || h.record_len as usize != op_record_len(kind, n) {
        return Err(bad);
    }
    let rec = b.get(..h.record_len as usize).ok_or(bad)?;
    let ins_end = OP_HEADER_LEN + 2 * n;
    let inputs = rec.get(OP_HEADER_LEN..ins_end).ok_or(bad)?;
    let pad = rec
        .get(ins_end..OP_HEADER_LEN + align_up(2 * n, 4))
        .ok_or(bad)?;
    if pad.iter().any(|&v| v != 0) {
        return Err(bad);
    }
    let params = rec.get(OP_HEADER_LEN + align_up(2 * n, 4)..).ok_or(bad)?;
    Ok((
        OpRecord {
            index,
            kind,
            output: h.output,
            inputs: TensorList(inputs),
            params,
        },
        rec.len(),
    ))
}

// ---------------------------------------------------------------------------------------------
// The model.

/// What [`decode_op`] needs to know about an op besides its parameter bytes.
#[derive(Clone, Copy, Debug)]
pub struct OpContext<'t> {
    /// Position in the op list (for errors).
    pub index: u16,
    /// Number of inputs.
    pub n_inputs: usize,
    /// The first input (Conv and FullyConnected take `K` from it).
    pub x: &'t TensorInfo,
    /// The output.
    pub out: &'t TensorInfo,
}

fn pool_slice(pool: &[u8], off: u32, len: usize, err: Error) -> Result<&[u8], Error> {
    pool.get(off as usize..)
        .and_then(|s| s.get(..len))
        .ok_or(err)
}

/// `at` = (weights offset, weights length, channels offset) in the pool.
fn weights(
    pool: &[u8],
    index: u16,
    bits: u8,
    k: usize,
    c_out: usize,
    at: (u32, u32, u32),
) -> Result<Weights<'_>, Error> {
    let (off, len, ch_off) = at;
    let ws = Error::WeightSize { op: index };
    if !is_weight_bits(bits) {
        return Err(Error::BadOp { op: index });
    }
    let rb = row_bytes(bits, k).ok_or(ws)?;
    if rb.checked_mul(c_out) != Some(len as usize) {
        return Err(ws);
    }
    let rows = pool_slice(pool, off, len as usize, ws)?;
    let ch_len = CHANNEL_RECORD_LEN.checked_mul(c_out).ok_or(ws)?;
    let channels = pool_slice(pool, ch_off, ch_len, ws)?;
    Weights::new(bits, k, c_out, rows, channels).map_err(|_| ws)
}

/// Decodes the parameter record `params` of an op of `kind`, its weights and tables read from
/// `pool` (offsets in `params` are relative to it). [`Model::decode`] is this on the model's
/// own pool; the compiler's tract ops call it on the pool bytes they own, so both decode alike.
pub fn decode_op<'p>(
    kind: OpKind,
    params: &'p [u8],
    pool: &'p [u8],
    ctx: &OpContext<'_>,
) -> Result<Op<'p>, Error> {
    let bad = Error::BadOp { op: ctx.index };
    let out = ctx.out;
    let p = params;
    Ok(match kind {
        OpKind::Conv => {
            let r = ConvRecord::read_from(p, bad)?;
            if r.reserved != [0; 3] {
                return Err(bad);
            }
            let geom = ConvGeom {
                kernel_h: r.kernel_h as usize,
                kernel_w: r.kernel_w as usize,
                stride_h: r.stride_h as usize,
                stride_w: r.stride_w as usize,
                dilation_h: r.dilation_h as usize,
                dilation_w: r.dilation_w as usize,
                pad_top: r.pad_top as usize,
                pad_left: r.pad_left as usize,
                pad_bottom: r.pad_bottom as usize,
                pad_right: r.pad_right as usize,
                groups: r.groups as usize,
            };
            let x = *ctx.x;
            let s = geom
                .check(x.dims4(), out.dims4())
                .ok_or(Error::ShapeMismatch { op: ctx.index })?;
            let weights = weights(
                pool,
                ctx.index,
                r.w_bits,
                s.k,
                s.c_out,
                (r.weights_offset, r.weights_len, r.channels_offset),
            )?;
            Op::Conv {
                geom,
                weights,
                lo: r.clamp_lo,
                hi: r.clamp_hi,
            }
        }
        OpKind::FullyConnected => {
            let r = FcRecord::read_from(p, bad)?;
            if r.reserved != 0 {
                return Err(bad);
            }
            let x = *ctx.x;
            let weights = weights(
                pool,
                ctx.index,
                r.w_bits,
                x.numel as usize,
                ctx.out.numel as usize,
                (r.weights_offset, r.weights_len, r.channels_offset),
            )?;
            Op::FullyConnected {
                weights,
                lo: r.clamp_lo,
                hi: r.clamp_hi,
            }
        }
        OpKind::Add | OpKind::Mul => {
            let r = BinaryRecord::read_from(p, bad)?;
            if r.reserved != [0; 2] {
                return Err(bad);
            }
            let rq = |mult, shift| Requant { mult, shift };
            if kind == OpKind::Add {
                let params = AddParams {
                    a: rq(r.mult_a, r.shift_a),
                    b: rq(r.mult_b, r.shift_b),
                    out: rq(r.mult_out, r.shift_out),
                };
                Op::Add {
                    params,
                    lo: r.clamp_lo,
                    hi: r.clamp_hi,
                }
            } else {
                if r.mult_a != 0 || r.shift_a != 0 || r.mult_b != 0 || r.shift_b != 0 {
                    return Err(bad);
                }
                Op::Mul {
                    req: rq(r.mult_out, r.shift_out),
                    lo: r.clamp_lo,
                    hi: r.clamp_hi,
                }
            }
        }
        OpKind::MaxPool | OpKind::AvgPool => {
            let r = PoolRecord::read_from(p, bad)?;
            if r.reserved != 0 {
                return Err(bad);
            }
            let geom = PoolGeom {
                kernel_h: r.kernel_h as usize,
                kernel_w: r.kernel_w as usize,
                stride_h: r.stride_h as usize,
                stride_w: r.stride_w as usize,
                dilation_h: r.dilation_h as usize,
                dilation_w: r.dilation_w as usize,
                pad_top: r.pad_top as usize,
                pad_left: r.pad_left as usize,
                pad_bottom: r.pad_bottom as usize,
                pad_right: r.pad_right as usize,
            };
            let req = Requant {
                mult: r.mult,
                shift: r.shift,
            };
            if kind == OpKind::MaxPool {
                if r.flags != 0 || r.mult != 0 || r.shift != 0 {
                    return Err(bad);
                }
                Op::MaxPool {
                    geom,
                    lo: r.clamp_lo,
                    hi: r.clamp_hi,
                }
            } else {
                if r.flags > 1 {
                    return Err(bad);
                }
                Op::AvgPool {
                    geom,
                    count_include_pad: r.flags == 1,
                    req,
                    lo: r.clamp_lo,
                    hi: r.clamp_hi,
                }
            }
        }
        OpKind::GlobalAvgPool => {
            let r = GapRecord::read_from(p, bad)?;
            if r.reserved != [0; 2] {
                return Err(bad);
            }
            Op::GlobalAvgPool {
                req: Requant {
                    mult: r.mult,
                    shift: r.shift,
                },
                lo: r.clamp_lo,
                hi: r.clamp_hi,
            }
        }
        OpKind::Concat => {
            let r = ConcatRecord::read_from(p, bad)?;
            if r.reserved != [0; 3] {
                return Err(bad);
            }
            let requants = pool_slice(
                pool,
                r.requant_offset,
                8 * ctx.n_inputs,
                Error::WeightSize { op: ctx.index },
            )?;
            Op::Concat {
                axis: r.axis,
                requants,
            }
        }
        OpKind::Reshape => Op::Reshape,
        OpKind::Lut => {
            let r = LutRecord::read_from(p, bad)?;
            if r.reserved != [0; 3] {
                return Err(bad);
            }
            let t = pool_slice(
                pool,
                r.table_offset,
                256,
                Error::WeightSize { op: ctx.index },
            )?;
            let table = t
                .first_chunk::<256>()
                .ok_or(Error::WeightSize { op: ctx.index })?;
            Op::Lut {
                func: r.func,
                table,
            }
        }
        OpKind::Softmax => {
            if p != [0u8; 4] {
                return Err(bad);
            }
            Op::Softmax
        }
    })
}

/// A validated model, borrowing its blob.
#[derive(Clone, Copy, Debug)]
pub struct Model<'a> {
    blob: &'a [u8],
    header: Header,
    tensors: &'a [u8],
    ops: &'a [u8],
    pool: &'a [u8],
    input: TensorInfo,
    output: TensorInfo,
    /// Whether validation re-reads every weight code (`Σq`, zero padding): the full check
    /// does; a blob whose checksum was verified before skips that O(weights) pass, which
    /// guards the numerics, not the bounds of any read.
    read_codes: bool,
}

fn section(blob: &[u8], off: u32, len: usize) -> Result<&[u8], Error> {
    blob.get(off as usize..)
        .and_then(|s| s.get(..len))
        .ok_or(Error::BadHeader)
}

fn spans_overlap(a: (usize, usize), b: (usize, usize)) -> bool {
    a.1 > 0 && b.1 > 0 && a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
}

fn clamp_ok(lo: u8, hi: u8, out: &TensorInfo) -> bool {
    lo <= hi && hi <= out.dtype.code_max()
}

impl<'a> Model<'a> {
    /// Validates a blob (see the module doc) and returns the model reading it in place.
    /// Never panics and never reads outside `bytes`, whatever they hold.
    pub fn from_bytes(bytes: &'a [u8]) -> Result<Model<'a>, Error> {
        Self::parse(bytes, None)
    }

    /// [`Model::from_bytes`] for a blob whose checksum was verified before (the C ABI's
    /// `dfq_prepare`): every structural check still runs, so a run stays inside the blob and
    /// the arena whatever the bytes hold now, but the O(bytes) CRC is replaced by comparing the
    /// header's checksum field with `checksum`, the value the earlier check verified, and the
    /// weight codes are not re-read (their `Σq` guards the numerics, which that check covered;
    /// the i32 bound on every channel's accumulator is still checked).
    pub fn from_verified_bytes(bytes: &'a [u8], checksum: u32) -> Result<Model<'a>, Error> {
        Self::parse(bytes, Some(checksum))
    }

    fn parse(bytes: &'a [u8], verified: Option<u32>) -> Result<Model<'a>, Error> {
        let h = Header::parse(bytes)?;
        if h.magic != MAGIC {
            return Err(Error::BadMagic);
        }
        if h.version != VERSION {
            return Err(Error::UnsupportedVersion);
        }
        let total = h.total_len as usize;
        if bytes.len() < total || (h.total_len as u64) < HEADER_LEN as u64 {
            return Err(Error::Truncated);
        }
        if bytes.len() > total {
            return Err(Error::TrailingBytes);
        }
        let crc = match verified {
            Some(c) => c,
            None => blob_checksum(bytes),
        };
        if crc != h.checksum {
            return Err(Error::ChecksumMismatch);
        }
        Self::check_header(&h)?;
        let tensors = section(
            bytes,
            h.tensors_offset,
            h.n_tensors as usize * TENSOR_RECORD_LEN,
        )?;
        let ops = section(bytes, h.ops_offset, h.ops_size as usize)?;
        let pool = section(bytes, h.pool_offset, h.pool_size as usize)?;
        let mut m = Model {
            blob: bytes,
            header: h,
            tensors,
            ops,
            pool,
            input: PLACEHOLDER,
            output: PLACEHOLDER,
            read_codes: verified.is_none(),
        };
        m.check_tensors()?;
        m.input = m.tensor(h.input)?;
        m.output = m.tensor(h.output)?;
        if !m.input.dtype.is_code() {
            return Err(Error::BadTensor { tensor: h.input });
        }
        m.check_ops()?;
        Ok(m)
    }

    fn check_header(h: &Header) -> Result<(), Error> {
        let bad = Error::BadHeader;
        if h.flags != 0 || h.reserved != [0; 8] || h.n_tensors == 0 {
            return Err(bad);
        }
        if h.input >= h.n_tensors || h.output >= h.n_tensors {
            return Err(bad);
        }
        let a = SECTION_ALIGN as u64;
        let up = |v: u64| v.div_ceil(a) * a;
        let tensors_end = HEADER_LEN as u64 + TENSOR_RECORD_LEN as u64 * h.n_tensors as u64;
        if h.tensors_offset as u64 != HEADER_LEN as u64
            || h.ops_offset as u64 != up(tensors_end)
            || h.pool_offset as u64 != up(h.ops_offset as u64 + h.ops_size as u64)
            || h.total_len as u64 != up(h.pool_offset as u64 + h.pool_size as u64)
        {
            return Err(bad);
        }
        if h.scratch_offset as u64 + h.scratch_size as u64 > h.arena_size as u64 {
            return Err(bad);
        }
        Ok(())
    }

    fn check_tensors(&self) -> Result<(), Error> {
        let scratch = self.scratch_span();
        for id in 0..self.header.n_tensors {
            let t = self.tensor(id)?;
            if t.dtype.is_code() {
                let end = t.arena_offset as u64 + t.numel as u64;
                if end > self.header.arena_size as u64
                    || spans_overlap((t.arena_offset as usize, t.arena_len()), scratch)
                {
                    return Err(Error::ArenaRange { tensor: id });
                }
            }
        }
        Ok(())
    }

    /// Tensor `id` (parsed from its record).
    pub fn tensor(&self, id: u16) -> Result<TensorInfo, Error> {
        let bad = Error::BadTensor { tensor: id };
        let b = self
            .tensors
            .get(id as usize * TENSOR_RECORD_LEN..)
            .ok_or(bad)?;
        let r = TensorRecord::read_from(b, bad)?;
        TensorInfo::from_record(&r, id)
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }
    /// The blob.
    pub fn blob(&self) -> &'a [u8] {
        self.blob
    }
    /// Arena bytes a run needs.
    pub fn arena_size(&self) -> usize {
        self.header.arena_size as usize
    }
    /// The scratch region (offset, length) in the arena.
    pub fn scratch_span(&self) -> (usize, usize) {
        (
            self.header.scratch_offset as usize,
            self.header.scratch_size as usize,
        )
    }
    /// Number of tensors.
    pub fn n_tensors(&self) -> u16 {
        self.header.n_tensors
    }
    /// Number of ops.
    pub fn n_ops(&self) -> u16 {
        self.header.n_ops
    }
    /// Model input tensor.
    pub fn input(&self) -> &TensorInfo {
        &self.input
    }
    /// Model output tensor.
    pub fn output(&self) -> &TensorInfo {
        &self.output
    }
    /// Model input id.
    pub fn input_id(&self) -> u16 {
        self.header.input
    }
    /// Model output id.
    pub fn output_id(&self) -> u16 {
        self.header.output
    }
    /// The op records in execution order.
    pub fn ops(&self) -> OpIter<'a> {
        OpIter {
            rest: self.ops,
            index: 0,
            left: self.header.n_ops,
        }
    }
    /// The weight pool.
    pub fn pool(&self) -> &'a [u8] {
        self.pool
    }

    fn io(&self, rec: &OpRecord<'a>, i: usize) -> Result<TensorInfo, Error> {
        let id = rec.inputs.get(i).ok_or(Error::BadOp { op: rec.index })?;
        self.tensor(id)
            .map_err(|_| Error::BadTensorRef { op: rec.index })
    }

    /// Decodes an op's parameters (shapes come from its tensors).
    pub fn decode(&self, rec: &OpRecord<'a>) -> Result<Op<'a>, Error> {
        let out = self
            .tensor(rec.output)
            .map_err(|_| Error::BadTensorRef { op: rec.index })?;
        let x = self.io(rec, 0)?;
        let ctx = OpContext {
            index: rec.index,
            n_inputs: rec.inputs.len(),
            x: &x,
            out: &out,
        };
        decode_op(rec.kind, rec.params, self.pool, &ctx)
    }

    /// The op that writes tensor `id` (its producer), searching ops before `before`; `None`
    /// for the model input or a tensor not written before.
    fn producer(&self, id: u16, before: u16) -> Result<Option<OpRecord<'a>>, Error> {
        for r in self.ops().take(before as usize) {
            let r = r?;
            if r.output == id {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// Whether op `rec` aliases its input (a Reshape whose output has the input's offset):
    /// it writes nothing.
    fn is_alias(&self, rec: &OpRecord<'a>) -> bool {
        if rec.kind != OpKind::Reshape {
            return false;
        }
        match (
            rec.inputs.get(0).map(|i| self.tensor(i)),
            self.tensor(rec.output),
        ) {
            (Some(Ok(i)), Ok(o)) => i.arena_offset == o.arena_offset,
            _ => false,
        }
    }

    /// Index of the op that actually wrote the bytes of tensor `id` (following Reshape
    /// aliases), `-1` for the model input.
    fn writer_index(&self, mut id: u16, before: u16) -> Result<i32, Error> {
        let mut limit = before;
        loop {
            match self.producer(id, limit)? {
                None => return Ok(-1),
                Some(r) if self.is_alias(&r) => {
                    id = r.inputs.get(0).ok_or(Error::BadOp { op: r.index })?;
                    limit = r.index;
                }
                Some(r) => return Ok(r.index as i32),
            }
        }
    }

    /// Checks that no op in `(writer, reader)` overwrites tensor `t`.
    fn check_live(&self, t: &TensorInfo, writer: i32, reader: u32) -> Result<(), Error> {
        let span = (t.arena_offset as usize, t.arena_len());
        for r in self
            .ops()
            .skip((writer + 1) as usize)
            .take((reader as i64 - writer as i64 - 1).max(0) as usize)
        {
            let r = r?;
            if self.is_alias(&r) {
                continue;
            }
            let o = self.tensor(r.output)?;
            if spans_overlap(span, (o.arena_offset as usize, o.arena_len())) {
                return Err(Error::ArenaOverlap { op: r.index });
            }
        }
        Ok(())
    }

    fn check_ops(&self) -> Result<(), Error> {
        let mut seen = 0u32;
        let mut consumed = 0usize;
        for rec in self.ops() {
            let rec = rec?;
            consumed += op_record_len(rec.kind, rec.inputs.len());
            seen += 1;
            self.check_op(&rec)?;
        }
        if seen != self.header.n_ops as u32 || consumed != self.ops.len() {
            return Err(Error::BadHeader);
        }
        // The model output must have been written (or be the input).
        let out_id = self.header.output;
        if out_id != self.header.input && self.producer(out_id, self.header.n_ops)?.is_none() {
            return Err(Error::BadOrder {
                op: self.header.n_ops,
            });
        }
        if !self.output.dtype.is_code() {
            // Only the last op writes an f32 model output (its kind is checked in check_op).
            let last = self.producer(out_id, self.header.n_ops)?;
            if !matches!(last, Some(r) if r.index + 1 == self.header.n_ops) {
                return Err(Error::BadTensor { tensor: out_id });
            }
        }
        if self.output.dtype.is_code() {
            let w = self.writer_index(out_id, self.header.n_ops)?;
            self.check_live(&self.output, w, self.header.n_ops as u32)?;
        }
        Ok(())
    }

    /// Whether `rec` is the op right before a final Softmax that reads its output alone.
    fn feeds_final_softmax(&self, rec: &OpRecord<'a>) -> Result<bool, Error> {
        self.feeds_final_softmax_id(rec.output, rec.index + 1)
    }

    /// Whether tensor `id` is written by op `at − 1` and read by op `at`, the last op, a
    /// Softmax producing the model output from it alone.
    fn feeds_final_softmax_id(&self, id: u16, at: u16) -> Result<bool, Error> {
        if at == 0 || at + 1 != self.header.n_ops {
            return Ok(false);
        }
        let writer = self.producer(id, self.header.n_ops)?;
        if !matches!(writer, Some(w) if w.index + 1 == at) {
            return Ok(false);
        }
        let Some(last) = self.ops().nth(at as usize) else {
            return Ok(false);
        };
        let last = last?;
        let x = self.tensor(id)?;
        Ok(last.kind == OpKind::Softmax
            && last.inputs.len() == 1
            && last.inputs.get(0) == Some(id)
            && last.output == self.header.output
            && x.numel == self.output.numel)
    }

    fn check_op(&self, rec: &OpRecord<'a>) -> Result<(), Error> {
        let op = rec.index;
        let tref = Error::BadTensorRef { op };
        let order = Error::BadOrder { op };
        let shape = Error::ShapeMismatch { op };
        let quant = Error::BadQuant { op };
        // References and types.
        let y = self.tensor(rec.output).map_err(|_| tref)?;
        let n_ops = self.header.n_ops;
        let is_last = op + 1 == n_ops;
        if !y.dtype.is_code() {
            // See "f32 tensors" in the module doc.
            let ok = match rec.kind {
                OpKind::Softmax => is_last,
                OpKind::FullyConnected => {
                    (is_last && rec.output == self.header.output)
                        || self.feeds_final_softmax(rec)?
                }
                _ => false,
            };
            if !ok {
                return Err(tref);
            }
        }
        for id in rec.inputs.iter() {
            let t = self.tensor(id).map_err(|_| tref)?;
            if !(t.dtype.is_code() || rec.kind == OpKind::Softmax && is_last) {
                return Err(tref);
            }
        }
        // Order: each input is the model input or written earlier; the output is new.
        if rec.output == self.header.input || self.producer(rec.output, op)?.is_some() {
            return Err(order);
        }
        for id in rec.inputs.iter() {
            if id != self.header.input && self.producer(id, op)?.is_none() {
                return Err(order);
            }
        }
        // Arena: the output does not overlap an input (an exact Reshape alias is allowed), and
        // every input is still intact since it was written.
        let alias = self.is_alias(rec);
        for id in rec.inputs.iter() {
            let t = self.tensor(id)?;
            if !alias
                && spans_overlap(
                    (t.arena_offset as usize, t.arena_len()),
                    (y.arena_offset as usize, y.arena_len()),
                )
            {
                return Err(Error::ArenaOverlap { op });
            }
            let w = self.writer_index(id, op)?;
            self.check_live(&t, w, op as u32)?;
        }
        // Parameters and shapes.
        let decoded = self.decode(rec)?;
        let x = self.io(rec, 0)?;
        match decoded {
            Op::Conv {
                weights, lo, hi, ..
            } => {
                if x.rank != 4 || y.rank != 4 {
                    return Err(shape);
                }
                if !clamp_ok(lo, hi, &y) {
                    return Err(quant);
                }
                self.check_weights(op, &weights, &x)?;
                if kernels::conv_scratch_len(weights.k) > self.header.scratch_size as usize {
                    return Err(Error::ScratchTooSmall { op });
                }
            }
            Op::FullyConnected { weights, lo, hi } => {
                let f32_ok =
                    !y.dtype.is_code() && lo == 0 && hi == 0 && y.numel == weights.c_out as u32;
                if !(clamp_ok(lo, hi, &y) || f32_ok) {
                    return Err(quant);
                }
                self.check_weights(op, &weights, &x)?;
            }
            Op::Add { params, lo, hi } => {
                let b = self.io(rec, 1)?;
                self.check_broadcast(op, &x, &b, &y)?;
                if !params.a.is_valid()
                    || !params.b.is_valid()
                    || !params.out.is_valid()
                    || !clamp_ok(lo, hi, &y)
                {
                    return Err(quant);
                }
            }
            Op::Mul { req, lo, hi } => {
                let b = self.io(rec, 1)?;
                self.check_broadcast(op, &x, &b, &y)?;
                if !req.is_valid() || !clamp_ok(lo, hi, &y) {
                    return Err(quant);
                }
            }
            Op::MaxPool { geom, lo, hi } => {
                if x.rank != 4 || y.rank != 4 || !geom.check(x.dims4(), y.dims4()) {
                    return Err(shape);
                }
                if !x.same_quant(&y) || !clamp_ok(lo, hi, &y) {
                    return Err(quant);
                }
            }
            Op::AvgPool {
                geom, req, lo, hi, ..
            } => {
                if x.rank != 4 || y.rank != 4 || !geom.check(x.dims4(), y.dims4()) {
                    return Err(shape);
                }
                if !req.is_valid() || !clamp_ok(lo, hi, &y) {
                    return Err(quant);
                }
            }
            Op::GlobalAvgPool { req, lo, hi } => {
                let d = x.dims4();
                if x.rank != 4 || y.rank != 4 || y.dims4() != [1, d[1], 1, 1] || d[0] != 1 {
                    return Err(shape);
                }
                if !req.is_valid() || !clamp_ok(lo, hi, &y) {
                    return Err(quant);
                }
            }
            Op::Concat { axis, requants } => {
                if axis >= y.rank {
                    return Err(shape);
                }
                let mut total = 0u64;
                for (i, id) in rec.inputs.iter().enumerate() {
                    let t = self.tensor(id)?;
                    if t.rank != y.rank {
                        return Err(shape);
                    }
                    for (d, (&a, &b)) in t.dims.iter().zip(y.dims.iter()).enumerate() {
                        if d == axis as usize {
                            total += a as u64;
                        } else if a != b {
                            return Err(shape);
                        }
                    }
                    let rq = concat_requant(requants, i).ok_or(Error::WeightSize { op })?;
                    if !rq.is_valid() {
                        return Err(quant);
                    }
                }
                let want = y.dims.get(axis as usize).copied().unwrap_or(0);
                if total != want as u64 {
                    return Err(shape);
                }
            }
            Op::Reshape => {
                if x.numel != y.numel {
                    return Err(shape);
                }
                if !x.same_quant(&y) {
                    return Err(quant);
                }
            }
            Op::Lut { table, .. } => {
                if x.dims4() != y.dims4() {
                    return Err(shape);
                }
                let n = x.dtype.code_max() as usize + 1;
                if table.iter().take(n).any(|&v| v > y.dtype.code_max()) {
                    return Err(quant);
                }
            }
            Op::Softmax => {
                if y.dtype != DType::F32 || x.dims != y.dims || x.rank != y.rank {
                    return Err(shape);
                }
                // An f32 input was written by the op right before, into the same buffer.
                if !x.dtype.is_code()
                    && !self.feeds_final_softmax_id(rec.inputs.get(0).unwrap_or(u16::MAX), op)?
                {
                    return Err(order);
                }
                if rec.output != self.header.output || op + 1 != self.header.n_ops {
                    return Err(order);
                }
            }
        }
        Ok(())
    }

    fn check_broadcast(
        &self,
        op: u16,
        a: &TensorInfo,
        b: &TensorInfo,
        y: &TensorInfo,
    ) -> Result<(), Error> {
        let (da, db, dy) = (a.dims4(), b.dims4(), y.dims4());
        let ok = da
            .iter()
            .zip(db.iter())
            .zip(dy.iter())
            .all(|((&p, &q), &o)| (p == o || p == 1) && (q == o || q == 1) && o == p.max(q));
        if ok {
            Ok(())
        } else {
            Err(Error::ShapeMismatch { op })
        }
    }

    /// Per-channel checks: zero points, scales, multipliers, `Σq` and zero padding of every
    /// row (only when `read_codes`), and that `K·max|q − z_c|·max|a − z| + |bias|` fits `i32`.
    fn check_weights(&self, op: u16, w: &Weights<'a>, x: &TensorInfo) -> Result<(), Error> {
        let quant = Error::BadQuant { op };
        let ws = Error::WeightSize { op };
        let qmax = code_max(w.bits) as i64;
        let amax = x.dtype.code_max() as i64;
        let z = x.zero_point as i64;
        let a_span = z.max(amax - z);
        let mut codes = [0u8; 8];
        for c in 0..w.c_out {
            let ch = w.channel(c).ok_or(ws)?;
            if ch.w_zero as i64 > qmax
                || !ch.w_scale.is_finite()
                || ch.w_scale <= 0.0
                || !numerics::multiplier_is_valid(ch.mult, ch.shift)
                || ch.reserved != [0; 3]
            {
                return Err(quant);
            }
            let row = w.row(c).ok_or(ws)?;
            let mut sum = ch.sum_q as i64;
            if self.read_codes {
                sum = 0;
                for (g, group) in row.chunks_exact(w.bits as usize).enumerate() {
                    unpack_group(w.bits, group, &mut codes);
                    for (i, &q) in codes.iter().enumerate() {
                        if g * 8 + i < w.k {
                            sum += q as i64;
                        } else if q != 0 {
                            return Err(ws);
                        }
                    }
                }
            }
            if sum != ch.sum_q as i64 {
                return Err(ws);
            }
            let zc = ch.w_zero as i64;
            let q_span = zc.max(qmax - zc);
            let bound = (w.k as i64)
                .saturating_mul(q_span)
                .saturating_mul(a_span)
                .saturating_add((ch.bias as i64).abs());
            if bound > i32::MAX as i64 {
                return Err(Error::AccumulatorOverflow { op });
            }
        }
        Ok(())
    }
}

const PLACEHOLDER: TensorInfo = TensorInfo {
    rank: 1,
    dims: [1; 4],
    numel: 1,
    dtype: DType::U8,
    scale: 1.0,
    zero_point: 0,
    arena_offset: 0,
};

// ---------------------------------------------------------------------------------------------
// The writer.

#[cfg(feature = "write")]
pub use writer::*;

#[cfg(feature = "write")]
mod writer {
    extern crate alloc;
    use super::*;
    use crate::numerics::{clamp_bounds, quantize_multiplier, round_half_away_f64, Fused};
    use alloc::vec::Vec;

    /// A float activation function turned into a 256-entry code table.
    #[derive(Clone, Copy, Debug, PartialEq)]
    pub enum Activation {
        Relu,
        Relu6,
        /// `max(0, min(1, alpha·x + beta))` (ONNX defaults 0.2, 0.5; PyTorch 1/6, 0.5).
        HardSigmoid {
            alpha: f32,
            beta: f32,
        },
        /// `x · relu6(x + 3) / 6`.
        HardSwish,
        /// `1 / (1 + e^−x)`.
        Sigmoid,
    }

    impl Activation {
        /// The `func` byte of its [`LutRecord`].
        pub fn func_id(&self) -> u8 {
            match self {
                Activation::Relu => 1,
                Activation::Relu6 => 2,
                Activation::HardSigmoid { .. } => 3,
                Activation::HardSwish => 4,
                Activation::Sigmoid => 5,
            }
        }
        /// The function, in `f64`.
        pub fn apply(&self, x: f64) -> f64 {
            let relu6 = |v: f64| v.clamp(0.0, 6.0);
            match *self {
                Activation::Relu => x.max(0.0),
                Activation::Relu6 => relu6(x),
                Activation::HardSigmoid { alpha, beta } => {
                    (alpha as f64 * x + beta as f64).clamp(0.0, 1.0)
                }
                Activation::HardSwish => x * relu6(x + 3.0) / 6.0,
                Activation::Sigmoid => 1.0 / (1.0 + numerics::exp(-x)),
            }
        }
    }

    /// The table of `act` from input codes (`scale_in`, `zero_in`, `bits_in`) to output codes:
    /// `t[a] = clamp(round_half_away(f(s_in·(a − z_in)) / s_out) + z_out, 0, 2^A_out − 1)` for
    /// `a < 2^A_in`, 0 beyond.
    pub fn activation_table(act: Activation, input: &TensorInfo, output: &TensorInfo) -> [u8; 256] {
        let mut t = [0u8; 256];
        let n = input.dtype.code_max() as usize + 1;
        for (a, slot) in t.iter_mut().enumerate().take(n) {
            let x = input.scale as f64 * (a as f64 - input.zero_point as f64);
            let q = round_half_away_f64(act.apply(x) / output.scale as f64);
            *slot = numerics::clamp_code(
                q.saturating_add(output.zero_point as i64),
                0,
                output.dtype.code_max(),
            );
        }
        t
    }

    /// Float weights of a Conv / FullyConnected, already quantized to codes.
    #[derive(Clone, Copy, Debug)]
    pub struct Layer<'w> {
        /// Bits per code (2, 3, 4, 8).
        pub bits: u8,
        /// `c_out × K` codes, row-major (conv: `[c_out][c_in/g][kh][kw]`).
        pub codes: &'w [u8],
        /// Per-channel weight scales `s_c`.
        pub scales: &'w [f32],
        /// Per-channel weight zero points `z_c`.
        pub zero_points: &'w [u8],
        /// Float bias per channel, or empty.
        pub bias: &'w [f32],
    }

    /// The channel record of one output channel: `mult/shift` of `s_c·s_x / s_y`, bias
    /// `round_half_away(b / (s_c·s_x))` (saturated to `i32`), `Σq` of the codes.
    pub fn channel_record(
        w_scale: f32,
        w_zero: u8,
        bias: f32,
        codes: &[u8],
        s_x: f32,
        s_y: f32,
    ) -> ChannelRecord {
        let acc_scale = w_scale as f64 * s_x as f64;
        let (mult, shift) = quantize_multiplier(acc_scale / s_y as f64);
        let b = round_half_away_f64(bias as f64 / acc_scale).clamp(i32::MIN as i64, i32::MAX as i64)
            as i32;
        ChannelRecord {
            w_scale,
            bias: b,
            sum_q: codes
                .iter()
                .fold(0i64, |s, &c| s + c as i64)
                .min(i32::MAX as i64) as i32,
            mult,
            shift,
            w_zero,
            reserved: [0; 3],
        }
    }

    /// Multipliers of a quantized Add (TFLite style, see [`AddParams`]): with
    /// `m = 2·max(s_a, s_b)`, `a: s_a/m`, `b: s_b/m`, `out: m / (2^20·s_y)`.
    pub fn add_params(s_a: f32, s_b: f32, s_y: f32) -> AddParams {
        let m = 2.0 * (s_a as f64).max(s_b as f64);
        let q = |r: f64| {
            let (mult, shift) = quantize_multiplier(r);
            Requant { mult, shift }
        };
        AddParams {
            a: q(s_a as f64 / m),
            b: q(s_b as f64 / m),
            out: q(m / ((1u64 << numerics::ADD_LEFT_SHIFT) as f64 * s_y as f64)),
        }
    }

    /// The requantization for a real ratio.
    pub fn requant(real: f64) -> Requant {
        let (mult, shift) = quantize_multiplier(real);
        Requant { mult, shift }
    }

    #[derive(Clone, Debug)]
    struct TensorDef {
        rec: TensorRecord,
        offset: Option<u32>,
        alias_of: Option<u16>,
    }

    /// Builds `.dfq` blobs. Tensors first (they carry the quantization), then ops in execution
    /// order, then [`ModelBuilder::finish`], which also validates the result with
    /// [`Model::from_bytes`]. Tensors added without an arena offset are placed one after the
    /// other (16-aligned, no reuse: the compiler's planner does better); a Reshape output
    /// without an offset shares its input's bytes. Without [`ModelBuilder::set_arena`] the
    /// scratch region follows the tensors and is as large as the largest conv needs.
    #[derive(Clone, Debug, Default)]
    pub struct ModelBuilder {
        tensors: Vec<TensorDef>,
        ops: Vec<u8>,
        n_ops: usize,
        pool: Vec<u8>,
        input: u16,
        output: u16,
        arena: Option<(u32, u32, u32)>,
        scratch_needed: usize,
    }

    fn id_err(op: usize) -> Error {
        Error::BadTensorRef {
            op: op.min(u16::MAX as usize) as u16,
        }
    }

    impl ModelBuilder {
        /// An empty builder.
        pub fn new() -> Self {
            Self::default()
        }

        fn push_tensor(
            &mut self,
            shape: &[u32],
            dtype: DType,
            scale: f32,
            zero_point: u8,
            offset: Option<u32>,
        ) -> u16 {
            let mut dims = [1u32; 4];
            for (d, &s) in dims.iter_mut().zip(shape) {
                *d = s;
            }
            let numel = shape.iter().fold(1u32, |a, &d| a.saturating_mul(d));
            let rec = TensorRecord {
                rank: shape.len().min(255) as u8,
                dtype: dtype.bits(),
                zero_point,
                reserved: 0,
                dims,
                numel,
                scale,
                arena_offset: 0,
            };
            self.tensors.push(TensorDef {
                rec,
                offset,
                alias_of: None,
            });
            (self.tensors.len() - 1).min(u16::MAX as usize) as u16
        }

        /// Adds a tensor placed automatically; returns its id.
        pub fn tensor(&mut self, shape: &[u32], dtype: DType, scale: f32, zero_point: u8) -> u16 {
            self.push_tensor(shape, dtype, scale, zero_point, None)
        }

        /// Adds a tensor at an explicit arena offset (from the compiler's planner).
        pub fn tensor_at(
            &mut self,
            shape: &[u32],
            dtype: DType,
            scale: f32,
            zero_point: u8,
            arena_offset: u32,
        ) -> u16 {
            self.push_tensor(shape, dtype, scale, zero_point, Some(arena_offset))
        }

        /// Sets the model input.
        pub fn set_input(&mut self, id: u16) {
            self.input = id;
        }
        /// Sets the model output.
        pub fn set_output(&mut self, id: u16) {
            self.output = id;
        }
        /// Sets the arena size and scratch region explicitly.
        pub fn set_arena(&mut self, arena_size: u32, scratch_offset: u32, scratch_size: u32) {
            self.arena = Some((arena_size, scratch_offset, scratch_size));
        }
        /// Scratch bytes the ops added so far need.
        pub fn scratch_needed(&self) -> usize {
            self.scratch_needed
        }

        fn info(&self, id: u16) -> Result<TensorInfo, Error> {
            let d = self.tensors.get(id as usize).ok_or(id_err(self.n_ops))?;
            TensorInfo::from_record(&d.rec, id)
        }

        /// Appends `bytes` to the pool at a 16-aligned offset; returns the offset.
        pub fn push_pool(&mut self, bytes: &[u8]) -> u32 {
            while !self.pool.len().is_multiple_of(SECTION_ALIGN) {
                self.pool.push(0);
            }
            let off = self.pool.len();
            self.pool.extend_from_slice(bytes);
            off.min(u32::MAX as usize) as u32
        }

        /// Appends a raw op record.
        pub fn push_op(
            &mut self,
            kind: OpKind,
            inputs: &[u16],
            output: u16,
            params: &[u8],
        ) -> Result<(), Error> {
            let idx = self.n_ops;
            let bad = Error::BadOp {
                op: idx.min(u16::MAX as usize) as u16,
            };
            let len = op_record_len(kind, inputs.len());
            if inputs.len() > 255
                || len > u16::MAX as usize
                || params.len() != kind.params_len()
                || idx >= u16::MAX as usize
            {
                return Err(bad);
            }
            let h = OpHeader {
                kind: kind as u8,
                n_inputs: inputs.len() as u8,
                output,
                record_len: len as u16,
                reserved: 0,
            };
            self.ops.extend_from_slice(&h.to_bytes());
            for i in inputs {
                self.ops.extend_from_slice(&i.to_le_bytes());
            }
            if inputs.len() % 2 == 1 {
                self.ops.extend_from_slice(&[0, 0]);
            }
            self.ops.extend_from_slice(params);
            self.n_ops += 1;
            Ok(())
        }

        fn push_weights(
            &mut self,
            bits: u8,
            k: usize,
            c_out: usize,
            layer: &Layer<'_>,
            s_x: f32,
            s_y: f32,
        ) -> Result<(u32, u32, u32), Error> {
            let ws = Error::WeightSize {
                op: self.n_ops.min(u16::MAX as usize) as u16,
            };
            if Some(layer.codes.len()) != k.checked_mul(c_out)
                || layer.scales.len() != c_out
                || layer.zero_points.len() != c_out
                || !(layer.bias.is_empty() || layer.bias.len() == c_out)
            {
                return Err(ws);
            }
            let rb = row_bytes(bits, k).ok_or(ws)?;
            let mut rows = alloc::vec![0u8; rb * c_out];
            let mut chans = Vec::with_capacity(c_out * CHANNEL_RECORD_LEN);
            for (c, (codes, dst)) in layer
                .codes
                .chunks_exact(k)
                .zip(rows.chunks_exact_mut(rb))
                .enumerate()
            {
                pack_row(bits, codes, dst).map_err(|_| ws)?;
                let bias = layer.bias.get(c).copied().unwrap_or(0.0);
                let (s, z) = (
                    layer.scales.get(c).copied().unwrap_or(1.0),
                    layer.zero_points.get(c).copied().unwrap_or(0),
                );
                chans.extend_from_slice(&channel_record(s, z, bias, codes, s_x, s_y).to_bytes());
            }
            let w_off = self.push_pool(&rows);
            let c_off = self.push_pool(&chans);
            Ok((w_off, rows.len() as u32, c_off))
        }

        /// A window field for a record's u16: refused beyond it, never clamped.
        fn u16_field(v: usize) -> Result<u16, Error> {
            u16::try_from(v).map_err(|_| Error::BadArgument)
        }

        /// Adds a Conv (its `K` and `C_out` come from the tensors and `geom`).
        pub fn conv(
            &mut self,
            input: u16,
            output: u16,
            geom: &ConvGeom,
            layer: &Layer<'_>,
            fused: Fused,
        ) -> Result<(), Error> {
            let (x, y) = (self.info(input)?, self.info(output)?);
            let op = self.n_ops.min(u16::MAX as usize) as u16;
            let s = geom
                .check(x.dims4(), y.dims4())
                .ok_or(Error::ShapeMismatch { op })?;
            let (lo, hi) = clamp_bounds(fused, y.scale, y.zero_point, y.dtype.bits());
            let (w_off, w_len, c_off) =
                self.push_weights(layer.bits, s.k, s.c_out, layer, x.scale, y.scale)?;
            let u = Self::u16_field;
            let r = ConvRecord {
                kernel_h: u(geom.kernel_h)?,
                kernel_w: u(geom.kernel_w)?,
                stride_h: u(geom.stride_h)?,
                stride_w: u(geom.stride_w)?,
                dilation_h: u(geom.dilation_h)?,
                dilation_w: u(geom.dilation_w)?,
                pad_top: u(geom.pad_top)?,
                pad_left: u(geom.pad_left)?,
                pad_bottom: u(geom.pad_bottom)?,
                pad_right: u(geom.pad_right)?,
                groups: u(geom.groups)?,
                w_bits: layer.bits,
                clamp_lo: lo,
                clamp_hi: hi,
                reserved: [0; 3],
                weights_offset: w_off,
                weights_len: w_len,
                channels_offset: c_off,
            };
            self.scratch_needed = self.scratch_needed.max(kernels::conv_scratch_len(s.k));
            self.push_op(OpKind::Conv, &[input], output, &r.to_bytes())
        }

        /// Adds a FullyConnected over the flattened input; with an `f32` output tensor it
        /// dequantizes its accumulators (see *f32 tensors* in the module doc).
        pub fn fully_connected(
            &mut self,
            input: u16,
            output: u16,
            layer: &Layer<'_>,
            fused: Fused,
        ) -> Result<(), Error> {
            let (x, y) = (self.info(input)?, self.info(output)?);
            // An f32 output is the raw dequantized accumulator: no clamp, so no activation.
            let (lo, hi) = if y.dtype.is_code() {
                clamp_bounds(fused, y.scale, y.zero_point, y.dtype.bits())
            } else if fused == Fused::None {
                (0, 0)
            } else {
                return Err(Error::BadArgument);
            };
            let (w_off, w_len, c_off) = self.push_weights(
                layer.bits,
                x.numel as usize,
                y.numel as usize,
                layer,
                x.scale,
                y.scale,
            )?;
            let r = FcRecord {
                w_bits: layer.bits,
                clamp_lo: lo,
                clamp_hi: hi,
                reserved: 0,
                weights_offset: w_off,
                weights_len: w_len,
                channels_offset: c_off,
            };
            self.push_op(OpKind::FullyConnected, &[input], output, &r.to_bytes())
        }

        /// Adds an Add (with broadcasting) and its multipliers from the tensors' scales.
        pub fn add(&mut self, a: u16, b: u16, output: u16, fused: Fused) -> Result<(), Error> {
            let (ta, tb, y) = (self.info(a)?, self.info(b)?, self.info(output)?);
            let p = add_params(ta.scale, tb.scale, y.scale);
            let (lo, hi) = clamp_bounds(fused, y.scale, y.zero_point, y.dtype.bits());
            let r = BinaryRecord {
                mult_a: p.a.mult,
                shift_a: p.a.shift,
                mult_b: p.b.mult,
                shift_b: p.b.shift,
                mult_out: p.out.mult,
                shift_out: p.out.shift,
                clamp_lo: lo,
                clamp_hi: hi,
                reserved: [0; 2],
            };
            self.push_op(OpKind::Add, &[a, b], output, &r.to_bytes())
        }

        /// Adds a Mul (with broadcasting), multiplier `s_a·s_b / s_y`.
        pub fn mul(&mut self, a: u16, b: u16, output: u16, fused: Fused) -> Result<(), Error> {
            let (ta, tb, y) = (self.info(a)?, self.info(b)?, self.info(output)?);
            let q = requant(ta.scale as f64 * tb.scale as f64 / y.scale as f64);
            let (lo, hi) = clamp_bounds(fused, y.scale, y.zero_point, y.dtype.bits());
            let r = BinaryRecord {
                mult_out: q.mult,
                shift_out: q.shift,
                clamp_lo: lo,
                clamp_hi: hi,
                ..BinaryRecord::default()
            };
            self.push_op(OpKind::Mul, &[a, b], output, &r.to_bytes())
        }

        fn pool_record(
            geom: &PoolGeom,
            flags: u8,
            lo: u8,
            hi: u8,
            q: Requant,
        ) -> Result<PoolRecord, Error> {
            let u = Self::u16_field;
            Ok(PoolRecord {
                kernel_h: u(geom.kernel_h)?,
                kernel_w: u(geom.kernel_w)?,
                stride_h: u(geom.stride_h)?,
                stride_w: u(geom.stride_w)?,
                dilation_h: u(geom.dilation_h)?,
                dilation_w: u(geom.dilation_w)?,
                pad_top: u(geom.pad_top)?,
                pad_left: u(geom.pad_left)?,
                pad_bottom: u(geom.pad_bottom)?,
                pad_right: u(geom.pad_right)?,
                flags,
                clamp_lo: lo,
                clamp_hi: hi,
                reserved: 0,
                mult: q.mult,
                shift: q.shift,
            })
        }

        /// Adds a MaxPool; the output must have the input's quantization.
        pub fn max_pool(
            &mut self,
            input: u16,
            output: u16,
            geom: &PoolGeom,
            fused: Fused,
        ) -> Result<(), Error> {
            let y = self.info(output)?;
            let (lo, hi) = clamp_bounds(fused, y.scale, y.zero_point, y.dtype.bits());
            let r = Self::pool_record(geom, 0, lo, hi, Requant::default())?;
            self.push_op(OpKind::MaxPool, &[input], output, &r.to_bytes())
        }

        /// Adds an AvgPool, multiplier `s_x / s_y`.
        pub fn avg_pool(
            &mut self,
            input: u16,
            output: u16,
            geom: &PoolGeom,
            count_include_pad: bool,
            fused: Fused,
        ) -> Result<(), Error> {
            let (x, y) = (self.info(input)?, self.info(output)?);
            let (lo, hi) = clamp_bounds(fused, y.scale, y.zero_point, y.dtype.bits());
            let r = Self::pool_record(
                geom,
                count_include_pad as u8,
                lo,
                hi,
                requant(x.scale as f64 / y.scale as f64),
            )?;
            self.push_op(OpKind::AvgPool, &[input], output, &r.to_bytes())
        }

        /// Adds a GlobalAvgPool, multiplier `s_x / s_y`.
        pub fn global_avg_pool(
            &mut self,
            input: u16,
            output: u16,
            fused: Fused,
        ) -> Result<(), Error> {
            let (x, y) = (self.info(input)?, self.info(output)?);
            let (lo, hi) = clamp_bounds(fused, y.scale, y.zero_point, y.dtype.bits());
            let q = requant(x.scale as f64 / y.scale as f64);
            let r = GapRecord {
                clamp_lo: lo,
                clamp_hi: hi,
                reserved: [0; 2],
                mult: q.mult,
                shift: q.shift,
            };
            self.push_op(OpKind::GlobalAvgPool, &[input], output, &r.to_bytes())
        }

        /// Adds a Concat along `axis` (of the output's rank), each input rescaled `s_i / s_y`.
        pub fn concat(&mut self, inputs: &[u16], axis: u8, output: u16) -> Result<(), Error> {
            let y = self.info(output)?;
            let mut table = Vec::with_capacity(8 * inputs.len());
            for &i in inputs {
                let x = self.info(i)?;
                let q = requant(x.scale as f64 / y.scale as f64);
                table.extend_from_slice(&q.mult.to_le_bytes());
                table.extend_from_slice(&q.shift.to_le_bytes());
            }
            let off = self.push_pool(&table);
            let r = ConcatRecord {
                axis,
                reserved: [0; 3],
                requant_offset: off,
            };
            self.push_op(OpKind::Concat, inputs, output, &r.to_bytes())
        }

        /// Adds a Reshape / Flatten. An output without an explicit offset aliases the input.
        pub fn reshape(&mut self, input: u16, output: u16) -> Result<(), Error> {
            let op = self.n_ops;
            let d = self.tensors.get_mut(output as usize).ok_or(id_err(op))?;
            if d.offset.is_none() {
                d.alias_of = Some(input);
            }
            self.push_op(OpKind::Reshape, &[input], output, &[])
        }

        /// Adds a table lookup.
        pub fn lut(
            &mut self,
            input: u16,
            output: u16,
            func: u8,
            table: &[u8; 256],
        ) -> Result<(), Error> {
            let off = self.push_pool(table);
            let r = LutRecord {
                func,
                reserved: [0; 3],
                table_offset: off,
            };
            self.push_op(OpKind::Lut, &[input], output, &r.to_bytes())
        }

        /// Adds an activation as a table lookup built from the tensors' quantization.
        pub fn activation(
            &mut self,
            input: u16,
            output: u16,
            act: Activation,
        ) -> Result<(), Error> {
            let (x, y) = (self.info(input)?, self.info(output)?);
            let t = activation_table(act, &x, &y);
            self.lut(input, output, act.func_id(), &t)
        }

        /// Adds the final Softmax (its output is an `f32` tensor, the model output).
        pub fn softmax(&mut self, input: u16, output: u16) -> Result<(), Error> {
            self.push_op(OpKind::Softmax, &[input], output, &[0; 4])
        }

        /// Serializes the blob (placing unplaced tensors, computing the checksum) and
        /// validates it.
        pub fn finish(&self) -> Result<Vec<u8>, Error> {
            let n_tensors = self.tensors.len();
            if n_tensors == 0 || n_tensors > u16::MAX as usize || self.n_ops > u16::MAX as usize {
                return Err(Error::BadHeader);
            }
            // Place tensors.
            let mut offs: Vec<Option<u32>> = self.tensors.iter().map(|t| t.offset).collect();
            let mut end = 0u64;
            for (t, o) in self.tensors.iter().zip(offs.iter_mut()) {
                if t.rec.dtype == DType::F32.bits() {
                    *o = Some(0);
                } else if let Some(off) = *o {
                    end = end.max(off as u64 + t.rec.numel as u64);
                }
            }
            for (t, o) in self.tensors.iter().zip(offs.iter_mut()) {
                if o.is_none() && t.alias_of.is_none() {
                    let at = end.div_ceil(SECTION_ALIGN as u64) * SECTION_ALIGN as u64;
                    *o = Some(at.min(u32::MAX as u64) as u32);
                    end = at + t.rec.numel as u64;
                }
            }
            // Resolve aliases (chains of Reshapes), at most n passes.
            for _ in 0..n_tensors {
                for i in 0..n_tensors {
                    let src = self.tensors.get(i).and_then(|t| t.alias_of);
                    if let (Some(src), Some(None)) = (src, offs.get(i).copied()) {
                        let v = offs.get(src as usize).copied().flatten();
                        if let Some(slot) = offs.get_mut(i) {
                            *slot = v;
                        }
                    }
                }
            }
            let (arena, s_off, s_size) = match self.arena {
                Some(a) => a,
                None => {
                    let s_off = end.div_ceil(SECTION_ALIGN as u64) * SECTION_ALIGN as u64;
                    let size = self.scratch_needed as u64;
                    let total = s_off + size;
                    if total > u32::MAX as u64 {
                        return Err(Error::BadHeader);
                    }
                    (total as u32, s_off as u32, size as u32)
                }
            };
            let tensors_end = HEADER_LEN + TENSOR_RECORD_LEN * n_tensors;
            let ops_offset = align_up(tensors_end, SECTION_ALIGN);
            let pool_offset = align_up(ops_offset + self.ops.len(), SECTION_ALIGN);
            let total = align_up(pool_offset + self.pool.len(), SECTION_ALIGN);
            if total > u32::MAX as usize {
                return Err(Error::BadHeader);
            }
            let h = Header {
                magic: MAGIC,
                version: VERSION,
                flags: 0,
                total_len: total as u32,
                checksum: 0,
                arena_size: arena,
                scratch_offset: s_off,
                scratch_size: s_size,
                n_tensors: n_tensors as u16,
                n_ops: self.n_ops as u16,
                input: self.input,
                output: self.output,
                tensors_offset: HEADER_LEN as u32,
                ops_offset: ops_offset as u32,
                ops_size: self.ops.len() as u32,
                pool_offset: pool_offset as u32,
                pool_size: self.pool.len() as u32,
                reserved: [0; 8],
            };
            let mut out = Vec::with_capacity(total);
            out.extend_from_slice(&h.to_bytes());
            for (t, o) in self.tensors.iter().zip(offs.iter()) {
                let mut r = t.rec;
                r.arena_offset = o.unwrap_or(0);
                out.extend_from_slice(&r.to_bytes());
            }
            out.resize(ops_offset, 0);
            out.extend_from_slice(&self.ops);
            out.resize(pool_offset, 0);
            out.extend_from_slice(&self.pool);
            out.resize(total, 0);
            seal(&mut out);
            Model::from_bytes(&out)?;
            Ok(out)
        }
    }

    /// Recomputes and stores the checksum of a blob in place (for tools and tests that edit a
    /// blob on purpose).
    pub fn seal(blob: &mut [u8]) {
        let c = blob_checksum(blob);
        if let Some(dst) = blob.get_mut(CHECKSUM_AT..CHECKSUM_AT + 4) {
            dst.copy_from_slice(&c.to_le_bytes());
        }
    }
}
