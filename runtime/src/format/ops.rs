//! Op records: iterating the op list and decoding each kind's parameters.

use super::*;

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
    pub(crate) params: &'a [u8],
}

/// A decoded op with its parameters.
#[derive(Clone, Copy, Debug)]
pub enum Op<'a> {
    Conv {
        geom: ConvGeom,
        weights: Weights<'a>,
        lo: u8,
        hi: u8,
        /// A fused activation table: the conv writes 8-bit codes with this zero point (the
        /// channels' requantization is to their scale), then `y = table[code]`.
        table: Option<(u8, &'a [u8; 256])>,
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
    pub(crate) rest: &'a [u8],
    pub(crate) index: u16,
    pub(crate) left: u16,
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
            if r.reserved != 0 || r.flags > 1 || (r.flags == 0 && r.table_zero != 0) {
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
            // The table sits right after the channel records.
            let table = if r.flags == 1 {
                let ws = Error::WeightSize { op: ctx.index };
                let at = CHANNEL_RECORD_LEN
                    .checked_mul(s.c_out)
                    .and_then(|n| u32::try_from(n).ok())
                    .and_then(|n| r.channels_offset.checked_add(n))
                    .ok_or(ws)?;
                let t = pool_slice(pool, at, 256, ws)?;
                Some((r.table_zero, t.first_chunk::<256>().ok_or(ws)?))
            } else {
                None
            };
            Op::Conv {
                geom,
                weights,
                lo: r.clamp_lo,
                hi: r.clamp_hi,
                table,
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
