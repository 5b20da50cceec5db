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

/// Output channels per weight panel (layout: [`crate::format`], "Weight pool and packed
/// weights").
pub const PANEL: usize = 8;

/// Byte offset of group `g` of output channel `c` among `c_out` channels of `rb`-byte rows
/// (the panel layout of [`crate::format`]).
fn group_offset(b: usize, rb: usize, c_out: usize, c: usize, g: usize) -> Option<usize> {
    let first = c - c % PANEL;
    let width = PANEL.min(c_out.checked_sub(first)?);
    let inner = g
        .checked_mul(width)?
        .checked_add(c % PANEL)?
        .checked_mul(b)?;
    first.checked_mul(rb)?.checked_add(inner)
}

/// Packs up to 8 codes into one group of `dst.len()` = `bits` bytes (missing codes are 0).
fn pack_group(bits: u8, codes: &[u8], dst: &mut [u8]) -> Result<(), Error> {
    let max = code_max(bits);
    let mut w = 0u64;
    for (i, &c) in codes.iter().take(8).enumerate() {
        if c > max {
            return Err(Error::BadArgument);
        }
        w |= (c as u64) << (bits as usize * i);
    }
    for (i, d) in dst.iter_mut().enumerate() {
        *d = (w >> (8 * i)) as u8;
    }
    Ok(())
}

/// Packs the `c_out × k` codes of `codes` (row-major, each `< 2^bits`) into `out`
/// (`c_out · row_bytes(bits, k)` bytes) in the panel layout, padding rows with zero codes.
pub fn pack_weights(bits: u8, k: usize, codes: &[u8], out: &mut [u8]) -> Result<(), Error> {
    let rb = row_bytes(bits, k).ok_or(Error::BadArgument)?;
    if !is_weight_bits(bits) || k == 0 || !codes.len().is_multiple_of(k) {
        return Err(Error::BadArgument);
    }
    let c_out = codes.len() / k;
    if rb.checked_mul(c_out) != Some(out.len()) {
        return Err(Error::BadArgument);
    }
    let b = bits as usize;
    for (c, row) in codes.chunks_exact(k).enumerate() {
        for (g, group) in row.chunks(8).enumerate() {
            let at = group_offset(b, rb, c_out, c, g).ok_or(Error::BadArgument)?;
            let dst = out.get_mut(at..at + b).ok_or(Error::BadArgument)?;
            pack_group(bits, group, dst)?;
        }
    }
    Ok(())
}

/// One output channel's packed codes inside its panel ([`crate::format`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Row<'a> {
    /// From the channel's group 0 to the end of all rows (so most 8-byte loads stay inside).
    data: &'a [u8],
    stride: usize,
    bits: u8,
    /// Position in the panel and the panel's width.
    lane: usize,
    width: usize,
    /// Groups in the row, `ceil(K / 8)`.
    groups: usize,
}

impl<'a> Row<'a> {
    /// Bits per code.
    #[inline]
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// Group `g`: `bits` bytes.
    #[inline]
    pub fn group(&self, g: usize) -> Option<&'a [u8]> {
        self.data
            .get(g.checked_mul(self.stride)?..)?
            .get(..self.bits as usize)
    }

    /// Group `g` in the low `8·bits` bits (higher bits 0): one 8-byte load where the rows run
    /// that far, else byte by byte.
    #[inline]
    pub fn group_bits(&self, g: usize) -> Option<u64> {
        let at = g.checked_mul(self.stride)?;
        let b = self.bits as usize;
        let v = match self.data.get(at..at + 8) {
            Some(w) => u64::from_le_bytes(w.try_into().ok()?),
            None => self
                .data
                .get(at..at + b)?
                .iter()
                .enumerate()
                .fold(0u64, |v, (i, &x)| v | (x as u64) << (8 * i)),
        };
        Some(if b >= 8 {
            v
        } else {
            v & ((1u64 << (8 * b)) - 1)
        })
    }

    /// Group `g` of this channel and the `n − 1` after it, adjacent in the panel
    /// (`n · bits` bytes); `None` where they are not all in this channel's panel.
    #[inline]
    pub fn span(&self, g: usize, n: usize) -> Option<&'a [u8]> {
        if self.lane.checked_add(n)? > self.width || g >= self.groups {
            return None;
        }
        let at = g.checked_mul(self.stride)?;
        self.data
            .get(at..at.checked_add(n.checked_mul(self.bits as usize)?)?)
    }

    /// Groups `g0 .. g0 + count` of this channel and the `n − 1` after it, adjacent in the
    /// panel: a slice in which group `g0 + i` of the `n` channels is the `n · bits` bytes at
    /// `i · stride`, and that stride. `None` where the channels are not all in this channel's
    /// panel or the row has fewer groups.
    #[inline]
    pub fn block(&self, g0: usize, count: usize, n: usize) -> Option<(&'a [u8], usize)> {
        if count == 0
            || self.lane.checked_add(n)? > self.width
            || g0.checked_add(count)? > self.groups
        {
            return None;
        }
        let at = g0.checked_mul(self.stride)?;
        let len = (count - 1)
            .checked_mul(self.stride)?
            .checked_add(n.checked_mul(self.bits as usize)?)?;
        Some((self.data.get(at..at.checked_add(len)?)?, self.stride))
    }

    /// Unpacks the first `out.len()` codes (at most the row's `8 · groups`).
    pub fn unpack(&self, out: &mut [u8]) -> Result<(), Error> {
        let mut codes = [0u8; 8];
        for (g, dst) in out.chunks_mut(8).enumerate() {
            if g >= self.groups {
                return Err(Error::BadArgument);
            }
            unpack_group(
                self.bits,
                self.group(g).ok_or(Error::BadArgument)?,
                &mut codes,
            );
            for (d, &c) in dst.iter_mut().zip(codes.iter()) {
                *d = c;
            }
        }
        Ok(())
    }
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

    /// Output channel `c`'s codes.
    #[inline]
    pub fn row(&self, c: usize) -> Option<Row<'a>> {
        if c >= self.c_out {
            return None;
        }
        let b = self.bits as usize;
        let first = c - c % PANEL;
        let width = PANEL.min(self.c_out - first);
        let at = group_offset(b, self.row_bytes, self.c_out, c, 0)?;
        Some(Row {
            data: self.rows.get(at..)?,
            stride: width.checked_mul(b)?,
            bits: self.bits,
            lane: c % PANEL,
            width,
            groups: self.row_bytes / b,
        })
    }

    /// Channel record `c`.
    #[inline]
    pub fn channel(&self, c: usize) -> Option<ChannelRecord> {
        ChannelRecord::parse(self.channels.get(c.checked_mul(CHANNEL_RECORD_LEN)?..)?)
    }

    /// All packed rows (the panel layout).
    pub fn rows(&self) -> &'a [u8] {
        self.rows
    }

    /// All channel records (`c_out` × 24 bytes).
    pub fn channels(&self) -> &'a [u8] {
        self.channels
    }
}
