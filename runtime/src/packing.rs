//! Packed weight rows (layout: [`crate::format`], "Weight pool and packed weights") and the
//! per-channel view the kernels read them through.

use crate::error::Error;
use crate::numerics::code_max;
pub use crate::records::ChannelRecord;
use crate::records::CHANNEL_RECORD_LEN;

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
