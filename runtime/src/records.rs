//! The `.dfq` format's fixed-size records, read and written field by field, and its checksum.
//! The byte layout of each is in the one doc comment of [`crate::format`].

use crate::error::Error;
use crate::geom::{ConvGeom, PoolGeom};
use core::mem::{offset_of, size_of};

/// `b"DFQ1"`.
pub const MAGIC: [u8; 4] = *b"DFQ1";
/// The format version this runtime reads and writes.
pub const VERSION: u16 = 4;
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
    /// Bit 0: an activation table follows the channel records (see the format doc).
    pub flags: u8,
    /// Zero point of the 8-bit codes the table reads (0 without a table).
    pub table_zero: u8,
    pub reserved: u8,
    pub weights_offset: u32,
    pub weights_len: u32,
    pub channels_offset: u32,
}
const _: () = assert!(size_of::<ConvRecord>() == 40);
const _: () = assert!(offset_of!(ConvRecord, weights_offset) == 28);

/// A record whose first ten fields are a window's (kernel, stride, dilation, pads), taken
/// from the geometry `g`, the rest as given; returns `None` from the enclosing function where
/// a window field does not fit its `u16`.
macro_rules! window_record {
    ($ty:ident, $g:expr, { $($field:ident: $value:expr),* $(,)? }) => {{
        let g = $g;
        let mut w = [0u16; 10];
        let from = [
            g.kernel_h, g.kernel_w, g.stride_h, g.stride_w, g.dilation_h, g.dilation_w,
            g.pad_top, g.pad_left, g.pad_bottom, g.pad_right,
        ];
        for (o, v) in w.iter_mut().zip(from) {
            *o = u16::try_from(v).ok()?;
        }
        let [kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left, pad_bottom, pad_right] = w;
        $ty {
            kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w,
            pad_top, pad_left, pad_bottom, pad_right,
            $($field: $value),*
        }
    }};
}

impl ConvRecord {
    /// The record of a convolution with geometry `geom`, `w_bits`-bit weights, the clamp
    /// `(lo, hi)` and its pool references `(weights_offset, weights_len, channels_offset)`;
    /// `None` where a field does not fit the record. The writer and the compiler's tract ops
    /// both make their records here.
    pub fn from_geom(
        geom: &ConvGeom,
        w_bits: u8,
        (clamp_lo, clamp_hi): (u8, u8),
        (weights_offset, weights_len, channels_offset): (u32, u32, u32),
    ) -> Option<Self> {
        Some(window_record!(ConvRecord, geom, {
            groups: u16::try_from(geom.groups).ok()?,
            w_bits: w_bits,
            clamp_lo: clamp_lo,
            clamp_hi: clamp_hi,
            flags: 0,
            table_zero: 0,
            reserved: 0,
            weights_offset: weights_offset,
            weights_len: weights_len,
            channels_offset: channels_offset,
        }))
    }
}

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

impl PoolRecord {
    /// The record of a pool with geometry `geom`, `flags`, the clamp `(lo, hi)` and the
    /// requantization `(mult, shift)`; `None` where a field does not fit the record.
    pub fn from_geom(
        geom: &PoolGeom,
        flags: u8,
        (clamp_lo, clamp_hi): (u8, u8),
        (mult, shift): (i32, i32),
    ) -> Option<Self> {
        Some(window_record!(PoolRecord, geom, {
            flags: flags,
            clamp_lo: clamp_lo,
            clamp_hi: clamp_hi,
            reserved: 0,
            mult: mult,
            shift: shift,
        }))
    }
}

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

/// Lut parameters (kind 10). `func` names the function for tools (0 custom, else the writer's
/// `Activation::func_id`, the one list); the runtime only applies the table.
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
pub(crate) struct Rd<'a> {
    b: &'a [u8],
    err: Error,
}

impl<'a> Rd<'a> {
    pub(crate) fn new(b: &'a [u8], err: Error) -> Self {
        Rd { b, err }
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let (h, t) = self.b.split_first_chunk::<N>().ok_or(self.err)?;
        self.b = t;
        Ok(*h)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.arr::<1>()?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    pub(crate) fn i32(&mut self) -> Result<i32, Error> {
        Ok(i32::from_le_bytes(self.arr()?))
    }
    pub(crate) fn f32(&mut self) -> Result<f32, Error> {
        Ok(f32::from_le_bytes(self.arr()?))
    }
}

/// A little-endian writer into a fixed byte array (no allocation).
pub(crate) struct Wr<'a> {
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
            pub(crate) fn read_from(b: &[u8], err: Error) -> Result<Self, Error> {
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
    pad_right: u16, groups: u16, w_bits: u8, clamp_lo: u8, clamp_hi: u8, flags: u8,
    table_zero: u8, reserved: u8, weights_offset: u32, weights_len: u32, channels_offset: u32);
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
