//! The executor: runs a validated [`Model`] on a caller-provided arena, touching nothing else.

use crate::error::Error;
use crate::format::bands::{self, Band, Io, Mode, RecIo};
use crate::format::{concat_requant, DType, Model, Op, OpRecord, TensorInfo};
use crate::kernels::{self, QIn, QOut};

/// Required alignment of the arena's start (bytes), for both the Rust and the C API.
pub const ARENA_ALIGN: usize = 16;

/// Runs the model: quantizes `input` into the input tensor, executes every op in order inside
/// `arena` (at least [`Model::arena_size`] bytes, [`ARENA_ALIGN`]-aligned), and writes the
/// dequantized output (or the Softmax probabilities) to `output`. Allocates nothing, touches no
/// memory but the four arguments, and never panics.
pub fn run(
    model: &Model<'_>,
    input: &[f32],
    output: &mut [f32],
    arena: &mut [u8],
) -> Result<(), Error> {
    let inp = *model.input();
    let out = *model.output();
    if input.len() != inp.numel as usize {
        return Err(Error::InputSize);
    }
    if output.len() != out.numel as usize {
        return Err(Error::OutputSize);
    }
    if arena.len() < model.arena_size() {
        return Err(Error::ArenaTooSmall);
    }
    if !(arena.as_ptr() as usize).is_multiple_of(ARENA_ALIGN) {
        return Err(Error::ArenaMisaligned);
    }
    let arena = arena
        .get_mut(..model.arena_size())
        .ok_or(Error::ArenaTooSmall)?;
    let x = span_mut(arena, &inp)?;
    if inp.dtype == DType::U4 {
        // Through a small buffer, then two codes per byte.
        let mut codes = [0u8; 64];
        for (i, chunk) in input.chunks(codes.len()).enumerate() {
            let c = codes.get_mut(..chunk.len()).ok_or(Error::BadArgument)?;
            kernels::quantize(chunk, inp.scale, inp.zero_point, 4, c)?;
            bands::pack4(c, i * 64, x)?;
        }
    } else {
        kernels::quantize(input, inp.scale, inp.zero_point, inp.dtype.bits(), x)?;
    }
    for rec in model.ops() {
        exec_op(model, &rec?, arena, output)?;
    }
    if out.dtype.is_code() {
        let y = span_mut(arena, &out)?;
        if out.dtype == DType::U4 {
            let mut codes = [0u8; 64];
            for (i, o) in output.chunks_mut(codes.len()).enumerate() {
                let c = codes.get_mut(..o.len()).ok_or(Error::BadArgument)?;
                bands::unpack4(y, i * 64, c)?;
                kernels::dequantize(c, out.scale, out.zero_point, o)?;
            }
        } else {
            kernels::dequantize(y, out.scale, out.zero_point, output)?;
        }
    }
    Ok(())
}

fn span_mut<'b>(arena: &'b mut [u8], t: &TensorInfo) -> Result<&'b mut [u8], Error> {
    arena
        .get_mut(t.arena_offset as usize..)
        .and_then(|s| s.get_mut(..t.arena_len()))
        .ok_or(Error::BadArgument)
}

/// The arena split around the two regions an op writes (its output and the scratch region):
/// three read-only pieces (start offset, bytes) and the two writable ones.
struct Split<'b> {
    ro: [(usize, &'b [u8]); 3],
    out: &'b mut [u8],
    scratch: &'b mut [u8],
}

fn split(
    arena: &mut [u8],
    out: (usize, usize),
    scratch: (usize, usize),
) -> Result<Split<'_>, Error> {
    // Empty spans sit at offset 0, where they cannot collide.
    let norm = |s: (usize, usize)| if s.1 == 0 { (0, 0) } else { s };
    let (out, scratch) = (norm(out), norm(scratch));
    let out_first = out.0 <= scratch.0;
    let (first, second) = if out_first {
        (out, scratch)
    } else {
        (scratch, out)
    };
    let first_end = first.0.checked_add(first.1).ok_or(Error::BadArgument)?;
    let gap = second.0.checked_sub(first_end).ok_or(Error::BadArgument)?;
    let (a0, rest) = arena
        .split_at_mut_checked(first.0)
        .ok_or(Error::BadArgument)?;
    let (m1, rest) = rest
        .split_at_mut_checked(first.1)
        .ok_or(Error::BadArgument)?;
    let (a1, rest) = rest.split_at_mut_checked(gap).ok_or(Error::BadArgument)?;
    let (m2, a2) = rest
        .split_at_mut_checked(second.1)
        .ok_or(Error::BadArgument)?;
    let ro = [(0, &*a0), (first_end, &*a1), (second.0 + second.1, &*a2)];
    let (out, scratch) = if out_first { (m1, m2) } else { (m2, m1) };
    Ok(Split { ro, out, scratch })
}

fn piece<'b>(ro: &[(usize, &'b [u8]); 3], t: &TensorInfo) -> Result<&'b [u8], Error> {
    let (off, len) = (t.arena_offset as usize, t.arena_len());
    for &(start, bytes) in ro.iter() {
        if off >= start {
            if let Some(s) = bytes.get(off - start..).and_then(|s| s.get(..len)) {
                return Ok(s);
            }
        }
    }
    Err(Error::BadArgument)
}

fn qout<'c>(data: &'c mut [u8], y: &TensorInfo, lo: u8, hi: u8) -> QOut<'c> {
    QOut {
        data,
        dims: y.dims4(),
        zero: y.zero_point,
        lo,
        hi,
    }
}

fn exec_op(
    model: &Model<'_>,
    rec: &OpRecord<'_>,
    arena: &mut [u8],
    output: &mut [f32],
) -> Result<(), Error> {
    let op = model.decode(rec)?;
    let y = model.tensor(rec.output)?;
    let x = model.tensor(rec.inputs.get(0).ok_or(Error::BadArgument)?)?;
    if let Op::Reshape = op {
        if x.arena_offset == y.arena_offset {
            return Ok(()); // an alias: same bytes
        }
    }
    let Split { ro, out, scratch } = split(
        arena,
        (y.arena_offset as usize, y.arena_len()),
        model.scratch_span(),
    )?;
    let io = RecIo { model, rec };
    let mode = bands::choose(&op, &io, &y, scratch.len())?
        .ok_or(Error::ScratchTooSmall { op: rec.index })?;
    if mode != Mode::Direct {
        return exec_staged(&op, mode, &io, &ro, &y, out, scratch, output);
    }
    let input = |i: usize| -> Result<(QIn<'_>, f32), Error> {
        let t = model.tensor(rec.inputs.get(i).ok_or(Error::BadArgument)?)?;
        let q = QIn {
            data: piece(&ro, &t)?,
            dims: t.dims4(),
            zero: t.zero_point,
        };
        Ok((q, t.scale))
    };
    eval_op(
        &op,
        rec.inputs.len(),
        !x.dtype.is_code(),
        input,
        &y,
        out,
        scratch,
        output,
    )
}

/// Runs an op that touches a 4-bit tensor band by band through the front of `scratch` (see
/// [`bands`]): inputs gathered (unpacked) there, the output scattered (packed) from there.
#[allow(clippy::too_many_arguments)]
fn exec_staged(
    op: &Op<'_>,
    mode: Mode,
    io: &RecIo<'_, '_>,
    ro: &[(usize, &[u8]); 3],
    y: &TensorInfo,
    out: &mut [u8],
    scratch: &mut [u8],
    output: &mut [f32],
) -> Result<(), Error> {
    let n = io.n_inputs();
    let x = io.input(0)?;
    let out_h = y.dims4()[2];
    for band in Band::iter(op, &x, y, mode) {
        // Inputs, one after another at the front of the scratch region.
        let mut used = 0usize;
        for i in 0..n {
            let t = io.input(i)?;
            if band.stages_input(&t) {
                let (b, lo, hi) = band.input(&t, out_h);
                let end = used
                    .checked_add(b.numel as usize)
                    .ok_or(Error::BadArgument)?;
                let dst = scratch
                    .get_mut(used..end)
                    .ok_or(Error::ScratchTooSmall { op: io.rec.index })?;
                bands::gather(&t, piece(ro, &t)?, lo, hi, dst)?;
                used = end;
            }
        }
        let (ins, rest) = scratch
            .split_at_mut_checked(used)
            .ok_or(Error::BadArgument)?;
        let ins: &[u8] = ins;
        let band_y = band.output(y);
        let out_len = if band.stages_output(y) {
            band_y.numel as usize
        } else {
            0
        };
        let (staged_out, kernel_scratch) = rest
            .split_at_mut_checked(out_len)
            .ok_or(Error::ScratchTooSmall { op: io.rec.index })?;
        let input = |i: usize| -> Result<(QIn<'_>, f32), Error> {
            let mut at = 0usize;
            for j in 0..n {
                let t = io.input(j)?;
                let staged = band.stages_input(&t);
                let (b, _, _) = band.input(&t, out_h);
                let len = if staged { b.numel as usize } else { 0 };
                if j == i {
                    let data = if staged {
                        ins.get(at..at + len).ok_or(Error::BadArgument)?
                    } else {
                        piece(ro, &t)?
                    };
                    let dims = if staged { b.dims4() } else { t.dims4() };
                    let q = QIn {
                        data,
                        dims,
                        zero: t.zero_point,
                    };
                    return Ok((q, t.scale));
                }
                at += len;
            }
            Err(Error::BadArgument)
        };
        let dst: &mut [u8] = if band.stages_output(y) {
            &mut *staged_out
        } else {
            &mut *out
        };
        let band_op = band.op(op, &x, out_h);
        eval_op(
            &band_op,
            n,
            !x.dtype.is_code(),
            input,
            &band_y,
            dst,
            kernel_scratch,
            output,
        )?;
        if band.stages_output(y) {
            bands::scatter(y, staged_out, band.r0, band.r1, out)?;
        }
    }
    Ok(())
}

/// Runs one decoded op on code buffers, wherever they live: `input(i)` gives input `i` (codes
/// with dims and zero point, and its scale), `y` describes the output whose codes go to `out`
/// (an op with an `f32` output writes to `output` instead; `x_is_f32`: input 0 is such an
/// output, already in `output`), and `scratch` holds at least
/// [`kernels::conv_scratch_len`] bytes for a Conv. The executor calls it on arena pieces; the
/// compiler's tract ops call it on tensors, so both run the same kernels on the same integers.
// The buffers come apart on purpose: the executor passes arena pieces, the tract ops tensors.
#[allow(clippy::too_many_arguments)]
pub fn eval_op<'i>(
    op: &Op<'_>,
    n_inputs: usize,
    x_is_f32: bool,
    input: impl Fn(usize) -> Result<(QIn<'i>, f32), Error>,
    y: &TensorInfo,
    out: &mut [u8],
    scratch: &mut [u8],
    output: &mut [f32],
) -> Result<(), Error> {
    let full = y.dtype.code_max();
    match *op {
        Op::Conv {
            ref geom,
            ref weights,
            lo,
            hi,
            table,
        } => {
            let mut q = qout(out, y, lo, hi);
            if let Some((zero, _)) = table {
                q.zero = zero;
            }
            kernels::conv2d(geom, weights, &input(0)?.0, &mut q, scratch)?;
            if let Some((_, t)) = table {
                // In place: the 8-bit codes become the output's.
                let codes = out.get_mut(..y.numel as usize).ok_or(Error::BadArgument)?;
                kernels::lut_in_place(t, codes);
            }
            Ok(())
        }
        Op::FullyConnected { ref weights, .. } if !y.dtype.is_code() => {
            let (x, s_x) = input(0)?;
            kernels::fully_connected_f32(weights, &x, s_x, output)
        }
        Op::FullyConnected {
            ref weights,
            lo,
            hi,
        } => kernels::fully_connected(weights, &input(0)?.0, &mut qout(out, y, lo, hi)),
        Op::Add { ref params, lo, hi } => kernels::add(
            params,
            &input(0)?.0,
            &input(1)?.0,
            &mut qout(out, y, lo, hi),
        ),
        Op::Mul { req, lo, hi } => {
            kernels::mul(req, &input(0)?.0, &input(1)?.0, &mut qout(out, y, lo, hi))
        }
        Op::MaxPool { ref geom, lo, hi } => {
            kernels::max_pool(geom, &input(0)?.0, &mut qout(out, y, lo, hi))
        }
        Op::AvgPool {
            ref geom,
            count_include_pad,
            req,
            lo,
            hi,
        } => kernels::avg_pool(
            geom,
            count_include_pad,
            req,
            &input(0)?.0,
            &mut qout(out, y, lo, hi),
        ),
        Op::GlobalAvgPool { req, lo, hi } => {
            kernels::global_avg_pool(req, &input(0)?.0, &mut qout(out, y, lo, hi))
        }
        Op::Concat { axis, requants } => {
            let axis4 = (axis as usize + 4)
                .checked_sub(y.rank as usize)
                .ok_or(Error::BadArgument)?;
            let mut offset = 0usize;
            let mut q = qout(out, y, 0, full);
            for i in 0..n_inputs {
                let (x, _) = input(i)?;
                let req = concat_requant(requants, i).ok_or(Error::BadArgument)?;
                kernels::concat_part(axis4, offset, req, &x, &mut q)?;
                offset += x.dims.get(axis4).copied().unwrap_or(0);
            }
            Ok(())
        }
        Op::Reshape => {
            let src = input(0)?.0.data;
            let dst = out.get_mut(..src.len()).ok_or(Error::BadArgument)?;
            dst.copy_from_slice(src);
            Ok(())
        }
        Op::Lut { table, .. } => kernels::lut(table, &input(0)?.0, &mut qout(out, y, 0, full)),
        // The f32 logits of the FullyConnected before are already in `output`.
        Op::Softmax if x_is_f32 => kernels::softmax_f32_in_place(y.dims4()[3], output),
        Op::Softmax => {
            let (x, scale) = input(0)?;
            kernels::softmax(&x, scale, output)
        }
    }
}
