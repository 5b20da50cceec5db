//! Tensor records decoded and checked.

use super::*;

// ---------------------------------------------------------------------------------------------
// Tensors.

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// 4-bit codes, two per byte (see the module doc, *4-bit tensors*).
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
    /// Bytes it occupies in the arena (`numel` for 8-bit codes, `⌈numel/2⌉` for 4-bit
    /// ones, 0 for `f32`).
    pub fn arena_len(&self) -> usize {
        match self.dtype {
            DType::U8 => self.numel as usize,
            DType::U4 => (self.numel as usize).div_ceil(2),
            DType::F32 => 0,
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

    pub(crate) fn from_record(r: &TensorRecord, id: u16) -> Result<TensorInfo, Error> {
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
