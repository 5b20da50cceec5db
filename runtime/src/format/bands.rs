//! Row bands: how the executor runs an op that reads or writes 4-bit activation codes.
//!
//! The arena holds 4-bit codes two per byte ([`crate::format`], *4-bit tensors*); the kernels
//! read and write one code per byte. An op that touches a 4-bit tensor therefore runs through
//! the *staging* area, the front of the scratch region: its inputs are unpacked there and its
//! output is written there and packed into place. Where the whole tensors do not fit, the op
//! runs on bands of output rows — a convolution or pool reads the input rows its windows
//! cover (the halo included), an elementwise op or a Concat the same rows — so a tensor is
//! never held unpacked whole. A band's top and bottom pads are the tensor's own at its
//! borders and none inside, so every output code is the one a whole-tensor call computes.
//! The kernels get the scratch region past the staging area.
//!
//! Band heights follow from the scratch size alone ([`choose`]): whole tensors if they fit,
//! else the tallest of `OH, ⌈OH/2⌉, ⌈OH/4⌉, …, 1` rows that fits, so the compiler that sizes
//! the region ([`min_scratch`]) and the device agree without a field in the format.

use super::{DType, Model, Op, OpRecord, TensorInfo};
use crate::error::Error;
use crate::kernels::conv_scratch_len;

/// How an op runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No 4-bit tensor: the kernels read and write the arena directly.
    Direct,
    /// Whole tensors: 4-bit inputs unpacked into the staging area, a 4-bit output packed from it.
    Whole,
    /// Bands of this many output rows (the last may be shorter); every input and the output
    /// pass through the staging area.
    Bands(usize),
}

/// How an op's output rows map to its inputs' rows.
#[derive(Clone, Copy, Debug)]
enum Rows {
    /// Output row `r` reads input rows `[r·stride − pad_top, … + eff)`.
    Window {
        stride: usize,
        eff: usize,
        pad_top: usize,
        pad_bottom: usize,
    },
    /// Output row `r` reads row `r` of each input as tall as the output (shorter, broadcast
    /// inputs whole).
    Same,
    /// Whole tensors only.
    Whole,
}

/// The window rows of a convolution or pool whose input is `h` rows tall and output `out_h`.
#[allow(clippy::too_many_arguments)]
fn window(
    stride: usize,
    k: usize,
    dil: usize,
    top: usize,
    bottom: usize,
    pool: bool,
    h: usize,
    out_h: usize,
) -> Rows {
    let eff = dil.saturating_mul(k.saturating_sub(1)).saturating_add(1);
    let last_end = out_h
        .saturating_sub(1)
        .saturating_mul(stride)
        .saturating_add(eff);
    // Whole tensors where a band could have no input rows or too few for its window: a
    // convolution whose windows may read pads only, a ceil-mode pool whose last window
    // reaches past the bottom pad (pools are checked at load so that every window reads an
    // input row).
    if !pool && (top >= eff || bottom >= eff)
        || last_end > h.saturating_add(top).saturating_add(bottom)
        || stride == 0
    {
        return Rows::Whole;
    }
    Rows::Window {
        stride,
        eff,
        pad_top: top,
        pad_bottom: bottom,
    }
}

fn rows_of(op: &Op<'_>, x: &TensorInfo, y: &TensorInfo) -> Rows {
    let (h, out_h) = (x.dims4()[2], y.dims4()[2]);
    if y.rank != 4 || out_h <= 1 {
        return Rows::Whole;
    }
    match *op {
        Op::Conv { ref geom, .. } => window(
            geom.stride_h,
            geom.kernel_h,
            geom.dilation_h,
            geom.pad_top,
            geom.pad_bottom,
            false,
            h,
            out_h,
        ),
        Op::MaxPool { ref geom, .. } | Op::AvgPool { ref geom, .. } => window(
            geom.stride_h,
            geom.kernel_h,
            geom.dilation_h,
            geom.pad_top,
            geom.pad_bottom,
            true,
            h,
            out_h,
        ),
        Op::Add { .. } | Op::Mul { .. } | Op::Lut { .. } => Rows::Same,
        Op::Concat { axis, .. } if axis != 2 => Rows::Same,
        _ => Rows::Whole,
    }
}

/// Input rows `[lo, hi)` that output rows `[r0, r1)` read from an input `h` rows tall, and
/// the band's (top, bottom) pads.
fn input_rows(rows: Rows, h: usize, out_h: usize, r0: usize, r1: usize) -> [usize; 4] {
    match rows {
        Rows::Window {
            stride,
            eff,
            pad_top,
            pad_bottom,
        } => {
            // Signed, in i64: the first window may start inside the top pad.
            let start = (r0 as i64).saturating_mul(stride as i64) - pad_top as i64;
            let end = (r1.saturating_sub(1) as i64).saturating_mul(stride as i64) - pad_top as i64
                + eff as i64;
            let lo = start.max(0);
            let hi = end.min(h as i64).max(lo);
            let top = (lo - start) as usize;
            // The bottom band keeps the tensor's pad (a pool's last window may end inside it
            // or, in ceil mode, short of it), so `count_include_pad` counts what it counts
            // whole; inside the tensor the band reads real rows instead.
            let bottom = if r1 == out_h {
                pad_bottom
            } else {
                (end - hi).max(0) as usize
            };
            [lo as usize, hi as usize, top, bottom]
        }
        Rows::Same if h == out_h => [r0, r1, 0, 0],
        _ => [0, h, 0, 0],
    }
}

/// Most input rows a band of `r` output rows reads from an input `h` rows tall.
fn input_rows_max(rows: Rows, h: usize, out_h: usize, r: usize) -> usize {
    match rows {
        Rows::Window { stride, eff, .. } => r
            .saturating_sub(1)
            .saturating_mul(stride)
            .saturating_add(eff)
            .min(h),
        Rows::Same if h == out_h => r,
        _ => h,
    }
}

/// Planes (`N·C`), rows and columns of a tensor's right-aligned dims.
fn planes(t: &TensorInfo) -> (usize, usize, usize) {
    let [n, c, h, w] = t.dims4();
    (n.saturating_mul(c), h, w)
}

/// The op's inputs (their records) and output, as [`choose`] and the executor see them.
pub trait Io {
    /// Number of inputs.
    fn n_inputs(&self) -> usize;
    /// Input `i`.
    fn input(&self, i: usize) -> Result<TensorInfo, Error>;
}

fn is4(t: &TensorInfo) -> bool {
    t.dtype == DType::U4
}

/// Whether the op reads or writes a 4-bit tensor (a Reshape copies packed bytes as they are).
fn touches_4bit(op: &Op<'_>, io: &impl Io, y: &TensorInfo) -> Result<bool, Error> {
    if matches!(op, Op::Reshape) {
        return Ok(false);
    }
    let mut any = is4(y);
    for i in 0..io.n_inputs() {
        any |= is4(&io.input(i)?);
    }
    Ok(any)
}

/// Staging bytes in [`Mode::Whole`]: the 4-bit inputs and output, unpacked.
fn whole_need(io: &impl Io, y: &TensorInfo) -> Result<usize, Error> {
    let mut n = if is4(y) { y.numel as usize } else { 0 };
    for i in 0..io.n_inputs() {
        let t = io.input(i)?;
        if is4(&t) {
            n = n.saturating_add(t.numel as usize);
        }
    }
    Ok(n)
}

/// Staging bytes of bands of `r` output rows: every input's band and the output's.
fn band_need(rows: Rows, io: &impl Io, y: &TensorInfo, r: usize) -> Result<usize, Error> {
    let (yp, oh, ow) = planes(y);
    let mut n = yp.saturating_mul(r).saturating_mul(ow);
    for i in 0..io.n_inputs() {
        let (p, h, w) = planes(&io.input(i)?);
        let rows = input_rows_max(rows, h, oh, r);
        n = n.saturating_add(p.saturating_mul(rows).saturating_mul(w));
    }
    Ok(n)
}

/// Scratch bytes the kernel needs besides the staging area.
fn kernel_need(op: &Op<'_>) -> usize {
    match op {
        Op::Conv { weights, .. } => conv_scratch_len(weights.k),
        _ => 0,
    }
}

/// Next band height after `r` in the sequence `OH, ⌈OH/2⌉, …, 1`.
fn halve(r: usize) -> usize {
    r.div_ceil(2)
}

/// How the op runs with a scratch region of `scratch` bytes; `None` if it cannot.
pub fn choose(
    op: &Op<'_>,
    io: &impl Io,
    y: &TensorInfo,
    scratch: usize,
) -> Result<Option<Mode>, Error> {
    if !touches_4bit(op, io, y)? {
        return Ok(Some(Mode::Direct));
    }
    let k = kernel_need(op);
    if whole_need(io, y)?.saturating_add(k) <= scratch {
        return Ok(Some(Mode::Whole));
    }
    let rows = rows_of(op, &io.input(0)?, y);
    if matches!(rows, Rows::Whole) {
        return Ok(None);
    }
    let oh = y.dims4()[2];
    let mut r = oh;
    loop {
        if band_need(rows, io, y, r)?.saturating_add(k) <= scratch {
            return Ok(Some(Mode::Bands(r)));
        }
        if r == 1 {
            return Ok(None);
        }
        r = halve(r);
    }
}

/// Least scratch bytes with which the op runs (staging and the kernel's minimum; 0 for an op
/// that needs none).
pub fn min_scratch(op: &Op<'_>, io: &impl Io, y: &TensorInfo) -> Result<usize, Error> {
    let k = kernel_need(op);
    if !touches_4bit(op, io, y)? {
        return Ok(k);
    }
    let whole = whole_need(io, y)?;
    let rows = rows_of(op, &io.input(0)?, y);
    let least = if matches!(rows, Rows::Whole) {
        whole
    } else {
        whole.min(band_need(rows, io, y, 1)?)
    };
    Ok(least.saturating_add(k))
}

/// One band: output rows `[r0, r1)`; in [`Mode::Whole`] all of them.
#[derive(Clone, Copy, Debug)]
pub struct Band {
    pub r0: usize,
    pub r1: usize,
    mode: Mode,
    rows: Rows,
}

impl Band {
    /// The bands of `mode` over the op's output, in order.
    pub fn iter(
        op: &Op<'_>,
        x: &TensorInfo,
        y: &TensorInfo,
        mode: Mode,
    ) -> impl Iterator<Item = Band> {
        let oh = y.dims4()[2];
        let rows = rows_of(op, x, y);
        let step = match mode {
            Mode::Bands(r) => r.max(1),
            _ => oh.max(1),
        };
        (0..oh.div_ceil(step)).map(move |b| Band {
            r0: b * step,
            r1: (b * step + step).min(oh),
            mode,
            rows,
        })
    }

    /// Whether input `t` passes through the staging area.
    pub fn stages_input(&self, t: &TensorInfo) -> bool {
        matches!(self.mode, Mode::Bands(_)) || is4(t)
    }

    /// Whether the output passes through the staging area.
    pub fn stages_output(&self, y: &TensorInfo) -> bool {
        matches!(self.mode, Mode::Bands(_)) || is4(y)
    }

    /// Input rows `[lo, hi)` of input `t` this band reads, and the band's pads.
    fn rows_in(&self, t: &TensorInfo, out_h: usize) -> [usize; 4] {
        match self.mode {
            Mode::Bands(_) => input_rows(self.rows, t.dims4()[2], out_h, self.r0, self.r1),
            _ => [0, t.dims4()[2], 0, 0],
        }
    }

    /// Input `t` as the band's kernel sees it (dims with the band's rows) and its rows.
    pub fn input(&self, t: &TensorInfo, out_h: usize) -> (TensorInfo, usize, usize) {
        let [lo, hi, _, _] = self.rows_in(t, out_h);
        (with_rows(t, hi - lo), lo, hi)
    }

    /// The output as the band's kernel sees it.
    pub fn output(&self, y: &TensorInfo) -> TensorInfo {
        match self.mode {
            Mode::Bands(_) => with_rows(y, self.r1 - self.r0),
            _ => *y,
        }
    }

    /// The op with the band's pads (`x`: input 0).
    pub fn op<'a>(&self, op: &Op<'a>, x: &TensorInfo, out_h: usize) -> Op<'a> {
        let [_, _, top, bottom] = self.rows_in(x, out_h);
        let mut op = *op;
        if let Mode::Bands(_) = self.mode {
            match op {
                Op::Conv { ref mut geom, .. } => {
                    geom.pad_top = top;
                    geom.pad_bottom = bottom;
                }
                Op::MaxPool { ref mut geom, .. } | Op::AvgPool { ref mut geom, .. } => {
                    geom.pad_top = top;
                    geom.pad_bottom = bottom;
                }
                _ => {}
            }
        }
        op
    }
}

/// `t` with `rows` rows (rank-4 tensors; others as they are).
fn with_rows(t: &TensorInfo, rows: usize) -> TensorInfo {
    let mut b = *t;
    if t.rank == 4 {
        let [n, c, _, w] = t.dims;
        b.dims = [n, c, rows as u32, w];
        b.numel = n
            .saturating_mul(c)
            .saturating_mul(rows as u32)
            .saturating_mul(w);
    }
    b
}

/// Copies rows `[lo, hi)` of every plane of tensor `t` (its arena bytes `src`: codes, or
/// 4-bit codes two per byte) to `dst`, one code per byte, plane after plane.
pub fn gather(
    t: &TensorInfo,
    src: &[u8],
    lo: usize,
    hi: usize,
    dst: &mut [u8],
) -> Result<(), Error> {
    let (p, h, w) = planes(t);
    let run = (hi - lo) * w;
    for (plane, out) in (0..p).zip(dst.chunks_exact_mut(run.max(1))) {
        let first = (plane * h + lo) * w;
        if is4(t) {
            unpack4(src, first, out)?;
        } else {
            let s = src.get(first..first + run).ok_or(Error::BadArgument)?;
            out.copy_from_slice(s);
        }
    }
    Ok(())
}

/// The inverse of [`gather`] for the output: rows `[r0, r1)` of every plane from `src`.
pub fn scatter(
    y: &TensorInfo,
    src: &[u8],
    r0: usize,
    r1: usize,
    dst: &mut [u8],
) -> Result<(), Error> {
    let (p, h, w) = planes(y);
    let run = (r1 - r0) * w;
    for (plane, codes) in (0..p).zip(src.chunks_exact(run.max(1))) {
        let first = (plane * h + r0) * w;
        if is4(y) {
            pack4(codes, first, dst)?;
        } else {
            let d = dst.get_mut(first..first + run).ok_or(Error::BadArgument)?;
            d.copy_from_slice(codes);
        }
    }
    Ok(())
}

/// Codes `first .. first + out.len()` of a 4-bit tensor's bytes: code `e` is the low nibble
/// of byte `e/2` when `e` is even, the high nibble when odd.
pub fn unpack4(src: &[u8], first: usize, out: &mut [u8]) -> Result<(), Error> {
    let end = first.checked_add(out.len()).ok_or(Error::BadArgument)?;
    let bytes = src
        .get(first / 2..end.div_ceil(2))
        .ok_or(Error::BadArgument)?;
    let (head, rest) = if first % 2 == 1 {
        let (h, r) = out.split_at_mut(1.min(out.len()));
        if let (Some(o), Some(&b)) = (h.first_mut(), bytes.first()) {
            *o = b >> 4;
        }
        (1, r)
    } else {
        (0, out)
    };
    let bytes = bytes.get(head..).unwrap_or(&[]);
    for (pair, &b) in rest.chunks_mut(2).zip(bytes) {
        for (i, o) in pair.iter_mut().enumerate() {
            *o = (b >> (4 * i)) & 15;
        }
    }
    Ok(())
}

/// Stores `codes` (each < 16) as codes `first ..` of a 4-bit tensor's bytes (see
/// [`unpack4`]), leaving the other nibbles of the first and last byte as they are.
pub fn pack4(codes: &[u8], first: usize, dst: &mut [u8]) -> Result<(), Error> {
    let end = first.checked_add(codes.len()).ok_or(Error::BadArgument)?;
    let bytes = dst
        .get_mut(first / 2..end.div_ceil(2))
        .ok_or(Error::BadArgument)?;
    let (head, rest) = if first % 2 == 1 {
        let (h, r) = codes.split_at(1.min(codes.len()));
        if let (Some(&c), Some(b)) = (h.first(), bytes.first_mut()) {
            *b = (*b & 0x0F) | (c << 4);
        }
        (1, r)
    } else {
        (0, codes)
    };
    let bytes = bytes.get_mut(head..).unwrap_or(&mut []);
    for (pair, b) in rest.chunks(2).zip(bytes) {
        *b = match *pair {
            [lo, hi] => (lo & 15) | (hi << 4),
            [lo] => (*b & 0xF0) | (lo & 15),
            _ => *b,
        };
    }
    Ok(())
}

/// An op record's inputs, as [`choose`] and the executor read them.
pub struct RecIo<'m, 'a> {
    pub model: &'m Model<'a>,
    pub rec: &'m OpRecord<'a>,
}

impl Io for RecIo<'_, '_> {
    fn n_inputs(&self) -> usize {
        self.rec.inputs.len()
    }
    fn input(&self, i: usize) -> Result<TensorInfo, Error> {
        self.model
            .tensor(self.rec.inputs.get(i).ok_or(Error::BadArgument)?)
    }
}
