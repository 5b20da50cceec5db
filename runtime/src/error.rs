//! The one error type of the runtime; its [`Error::code`] is the C ABI status.

use core::fmt;

/// Why a model was rejected or a run refused. `op`/`tensor` name the offending record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// A NULL pointer was passed to the C ABI.
    NullPointer,
    /// The blob is shorter than its header or than the length the header declares.
    Truncated,
    /// The blob is longer than the length the header declares.
    TrailingBytes,
    /// The blob does not start with `DFQ1`.
    BadMagic,
    /// The format version is not one this runtime reads.
    UnsupportedVersion,
    /// The CRC-32 over the blob does not match the header.
    ChecksumMismatch,
    /// Header fields are inconsistent (flags, reserved bytes, section offsets or sizes).
    BadHeader,
    /// A tensor record is invalid (rank, dims, element count, dtype, scale, zero point).
    BadTensor { tensor: u16 },
    /// A tensor's bytes do not fit the arena or overlap the scratch region.
    ArenaRange { tensor: u16 },
    /// An op record is malformed (kind, arity, record length, reserved bytes, parameters).
    BadOp { op: u16 },
    /// An op names a tensor that does not exist, or one of the wrong type.
    BadTensorRef { op: u16 },
    /// An op reads a tensor not produced before it, or writes one that already exists.
    BadOrder { op: u16 },
    /// Shapes of an op's inputs, output and parameters do not agree.
    ShapeMismatch { op: u16 },
    /// Packed weights or per-channel records do not match the op (length, padding, Σq).
    WeightSize { op: u16 },
    /// A quantization parameter is out of range (multiplier, shift, zero point, clamp, table).
    BadQuant { op: u16 },
    /// The worst-case accumulator of a conv or fully-connected op could overflow `i32`.
    AccumulatorOverflow { op: u16 },
    /// An op's output overlaps a tensor that is still to be read (or its own inputs).
    ArenaOverlap { op: u16 },
    /// The scratch region is smaller than an op needs.
    ScratchTooSmall { op: u16 },
    /// The input buffer length differs from the model input's element count.
    InputSize,
    /// The output buffer length differs from the model output's element count.
    OutputSize,
    /// The arena is smaller than the model's declared arena size.
    ArenaTooSmall,
    /// The arena does not start on a [`crate::ARENA_ALIGN`]-byte boundary.
    ArenaMisaligned,
    /// An `f32` buffer passed to the C ABI is not 4-byte aligned.
    BufferMisaligned,
    /// A kernel was called with slices or shapes that do not fit (kernel API misuse).
    BadArgument,
}

impl Error {
    /// The C ABI status (never 0). Stable: the header `diffdfq.h` lists the same numbers.
    pub const fn code(&self) -> i32 {
        match self {
            Error::NullPointer => 1,
            Error::Truncated => 2,
            Error::TrailingBytes => 3,
            Error::BadMagic => 4,
            Error::UnsupportedVersion => 5,
            Error::ChecksumMismatch => 6,
            Error::BadHeader => 7,
            Error::BadTensor { .. } => 8,
            Error::ArenaRange { .. } => 9,
            Error::BadOp { .. } => 10,
            Error::BadTensorRef { .. } => 11,
            Error::BadOrder { .. } => 12,
            Error::ShapeMismatch { .. } => 13,
            Error::WeightSize { .. } => 14,
            Error::BadQuant { .. } => 15,
            Error::AccumulatorOverflow { .. } => 16,
            Error::ArenaOverlap { .. } => 17,
            Error::ScratchTooSmall { .. } => 18,
            Error::InputSize => 19,
            Error::OutputSize => 20,
            Error::ArenaTooSmall => 21,
            Error::ArenaMisaligned => 22,
            Error::BufferMisaligned => 23,
            Error::BadArgument => 24,
        }
    }

    /// A static description, the text `dfq_status_str` returns.
    pub const fn message(&self) -> &'static str {
        status_message(self.code())
    }
}

/// Largest status code in use.
pub const STATUS_MAX: i32 = 24;

/// The description of a C ABI status; NUL-terminated so the C ABI can return it as is.
pub(crate) const fn status_message_nul(code: i32) -> &'static str {
    match code {
        0 => "ok\0",
        1 => "null pointer\0",
        2 => "model truncated\0",
        3 => "model longer than its header says\0",
        4 => "not a dfq model (bad magic)\0",
        5 => "unsupported dfq format version\0",
        6 => "model checksum mismatch\0",
        7 => "bad model header\0",
        8 => "bad tensor record\0",
        9 => "tensor outside the arena or inside the scratch region\0",
        10 => "bad op record\0",
        11 => "op references a missing or mistyped tensor\0",
        12 => "op order invalid (tensor read before written, or written twice)\0",
        13 => "op shapes do not agree\0",
        14 => "packed weights do not match the op\0",
        15 => "quantization parameter out of range\0",
        16 => "accumulator could overflow i32\0",
        17 => "arena plan overwrites a live tensor\0",
        18 => "scratch region too small\0",
        19 => "input length does not match the model\0",
        20 => "output length does not match the model\0",
        21 => "arena too small\0",
        22 => "arena misaligned\0",
        23 => "float buffer misaligned\0",
        24 => "bad kernel argument\0",
        _ => "unknown status\0",
    }
}

/// The description of a C ABI status, without the trailing NUL.
pub const fn status_message(code: i32) -> &'static str {
    let s = status_message_nul(code).as_bytes();
    // Drop the trailing NUL without slicing (const-friendly, cannot fail).
    match s.split_last() {
        Some((_, head)) => match core::str::from_utf8(head) {
            Ok(t) => t,
            Err(_) => "",
        },
        None => "",
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadTensor { tensor } | Error::ArenaRange { tensor } => {
                write!(f, "tensor {tensor}: {}", self.message())
            }
            Error::BadOp { op }
            | Error::BadTensorRef { op }
            | Error::BadOrder { op }
            | Error::ShapeMismatch { op }
            | Error::WeightSize { op }
            | Error::BadQuant { op }
            | Error::AccumulatorOverflow { op }
            | Error::ArenaOverlap { op }
            | Error::ScratchTooSmall { op } => write!(f, "op {op}: {}", self.message()),
            _ => f.write_str(self.message()),
        }
    }
}

impl core::error::Error for Error {}
