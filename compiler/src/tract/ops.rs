//! The custom tract ops of the packed-integer graph. A [`PackedOp`] is one `.dfq` op record made
//! self-contained: its parameter record (pool offsets rebased onto its own pool), its weights and
//! tables, and the records of the tensors it reads and writes. Its `eval` decodes the record
//! with the runtime's decoder and runs the runtime's dispatcher ([`rt::exec::eval_op`]), so the
//! graph and the device compute the same integers by construction.

use std::sync::Arc;

use diffdfq_runtime as rt;
use rt::format::{
    decode_op, BinaryRecord, ConcatRecord, ConvRecord, FcRecord, GapRecord, LutRecord, OpContext,
    OpKind, PoolRecord, TensorInfo, TENSOR_RECORD_LEN,
};
use rt::kernels::{self, QIn};
use tract_nnef::internal::*;

/// A tensor record (`.dfq` layout, arena offset 0): shape, code width, scale, zero point.
pub type TensorBytes = [u8; TENSOR_RECORD_LEN];

/// The record of a tensor, placed nowhere.
pub fn tensor_bytes(t: &TensorInfo) -> TensorBytes {
    t.to_record(0).to_bytes()
}

/// Parses a tensor record.
pub fn tensor_info(b: &TensorBytes) -> TractResult<TensorInfo> {
    TensorInfo::from_bytes(b, 0).map_err(|e| format_err!("tensor record: {e}"))
}

fn rt_err(e: rt::Error) -> TractError {
    format_err!("diffdfq-runtime: {e}")
}

fn shape_of(t: &TensorInfo) -> Vec<usize> {
    t.shape().iter().map(|&d| d as usize).collect()
}

/// The short name of an op kind (node names, NNEF primitive names).
pub fn kind_name(kind: OpKind) -> &'static str {
    match kind {
        OpKind::Conv => "conv",
        OpKind::FullyConnected => "fully_connected",
        OpKind::Add => "add",
        OpKind::Mul => "mul",
        OpKind::MaxPool => "max_pool",
        OpKind::AvgPool => "avg_pool",
        OpKind::GlobalAvgPool => "global_avg_pool",
        OpKind::Concat => "concat",
        OpKind::Reshape => "reshape",
        OpKind::Lut => "lut",
        OpKind::Softmax => "softmax",
    }
}

/// All op kinds.
pub const KINDS: [OpKind; 11] = [
    OpKind::Conv,
    OpKind::FullyConnected,
    OpKind::Add,
    OpKind::Mul,
    OpKind::MaxPool,
    OpKind::AvgPool,
    OpKind::GlobalAvgPool,
    OpKind::Concat,
    OpKind::Reshape,
    OpKind::Lut,
    OpKind::Softmax,
];

/// One packed-integer layer: u8 code tensors in, a u8 code tensor (or the `f32` probabilities
/// of a final Softmax) out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedOp {
    /// The op kind.
    pub kind: OpKind,
    /// The kind's parameter record, `.dfq` layout, offsets relative to `pool`.
    pub record: Vec<u8>,
    /// Packed weight rows and channel records, Concat requantizations or a Lut table.
    pub pool: Arc<[u8]>,
    /// Records of the inputs, then of the output.
    pub tensors: Vec<TensorBytes>,
}

impl PackedOp {
    /// Checks that the parts decode (as the runtime's loader would) and builds the op.
    pub fn new(
        kind: OpKind,
        record: Vec<u8>,
        pool: Arc<[u8]>,
        tensors: Vec<TensorBytes>,
    ) -> TractResult<PackedOp> {
        ensure!(
            kind.arity_ok(tensors.len().saturating_sub(1)),
            "{}: wrong number of tensors ({})",
            kind_name(kind),
            tensors.len()
        );
        let op = PackedOp {
            kind,
            record,
            pool,
            tensors,
        };
        let (xs, y) = op.infos()?;
        // f32 logits flow only from a FullyConnected into a final Softmax (the format's rule).
        ensure!(
            xs.iter().all(|x| x.dtype.is_code()) || kind == OpKind::Softmax,
            "{}: inputs must be codes",
            kind_name(kind)
        );
        ensure!(
            y.dtype.is_code() || matches!(kind, OpKind::Softmax | OpKind::FullyConnected),
            "{}: only a Softmax or a FullyConnected writes f32",
            kind_name(kind)
        );
        op.decode(&xs, &y)?;
        Ok(op)
    }

    fn infos(&self) -> TractResult<(Vec<TensorInfo>, TensorInfo)> {
        let mut all = self
            .tensors
            .iter()
            .map(tensor_info)
            .collect::<TractResult<Vec<_>>>()?;
        let y = all.pop().context("no output tensor")?;
        Ok((all, y))
    }

    fn decode<'s>(&'s self, xs: &[TensorInfo], y: &TensorInfo) -> TractResult<rt::format::Op<'s>> {
        let x = xs.first().context("no input tensor")?;
        let ctx = OpContext {
            index: 0,
            n_inputs: xs.len(),
            x,
            out: y,
        };
        decode_op(self.kind, &self.record, &self.pool, &ctx).map_err(rt_err)
    }
}

impl Op for PackedOp {
    fn name(&self) -> StaticName {
        format!("Diffdfq{}", kind_name(self.kind)).into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} parameter bytes, {} pool bytes",
            self.record.len(),
            self.pool.len()
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for PackedOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (xs, y) = self.infos()?;
        ensure!(inputs.len() == xs.len(), "expected {} inputs", xs.len());
        let mut codes = Vec::with_capacity(xs.len());
        // An f32 input (logits into a final Softmax) is handed over in the output buffer.
        let mut logits: Option<&[f32]> = None;
        for (t, x) in inputs.iter().zip(&xs) {
            if !x.dtype.is_code() {
                let s = t.try_as_plain_ram()?.as_slice::<f32>()?;
                ensure!(s.len() == x.numel as usize, "input of {} values", s.len());
                logits = Some(s);
                codes.push(&[][..]);
                continue;
            }
            let s = t.try_as_plain_ram()?.as_slice::<u8>()?;
            ensure!(s.len() == x.numel as usize, "input of {} codes", s.len());
            codes.push(s);
        }
        let op = self.decode(&xs, &y)?;
        let mut scratch = match &op {
            rt::format::Op::Conv { weights, .. } => vec![0u8; kernels::conv_scratch_len(weights.k)],
            _ => Vec::new(),
        };
        let input = |i: usize| -> Result<(QIn<'_>, f32), rt::Error> {
            let (data, x) = codes.get(i).zip(xs.get(i)).ok_or(rt::Error::BadArgument)?;
            Ok((
                QIn {
                    data,
                    dims: x.dims4(),
                    zero: x.zero_point,
                },
                x.scale,
            ))
        };
        let n = y.numel as usize;
        let shape = shape_of(&y);
        let out = if y.dtype.is_code() {
            let mut out = vec![0u8; n];
            rt::exec::eval_op(
                &op,
                xs.len(),
                false,
                input,
                &y,
                &mut out,
                &mut scratch,
                &mut [],
            )
            .map_err(rt_err)?;
            Tensor::from_shape(&shape, &out)?
        } else {
            let mut out = vec![0f32; n];
            if let Some(l) = logits {
                ensure!(
                    l.len() == n,
                    "f32 input of {} values for {n} outputs",
                    l.len()
                );
                out.copy_from_slice(l);
            }
            let x_f32 = logits.is_some();
            rt::exec::eval_op(
                &op,
                xs.len(),
                x_f32,
                input,
                &y,
                &mut [],
                &mut scratch,
                &mut out,
            )
            .map_err(rt_err)?;
            Tensor::from_shape(&shape, &out)?
        };
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for PackedOp {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let (xs, y) = self.infos()?;
        ensure!(inputs.len() == xs.len(), "expected {} inputs", xs.len());
        for (f, x) in inputs.iter().zip(&xs) {
            let dt = if x.dtype.is_code() {
                u8::datum_type()
            } else {
                f32::datum_type()
            };
            ensure!(
                f.datum_type == dt && f.shape.as_concrete() == Some(&*shape_of(x)),
                "input {f:?} is not {dt:?} of shape {:?}",
                x.shape()
            );
        }
        let shape = shape_of(&y);
        Ok(tvec!(if y.dtype.is_code() {
            u8::fact(&shape)
        } else {
            f32::fact(&shape)
        }))
    }
}

/// `f32` → codes at the graph input (the runtime's `quantize`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantizeOp {
    /// The record of the code tensor it writes.
    pub tensor: TensorBytes,
}

/// Codes → `f32` at the graph output (the runtime's `dequantize`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DequantizeOp {
    /// The record of the code tensor it reads.
    pub tensor: TensorBytes,
}

/// Checks the boundary tensor: codes, and the fact's shape.
fn boundary_fact(
    tensor: &TensorBytes,
    inputs: &[&TypedFact],
    dt: DatumType,
) -> TractResult<Vec<usize>> {
    let t = tensor_info(tensor)?;
    ensure!(t.dtype.is_code(), "a boundary tensor holds codes");
    let shape = shape_of(&t);
    let f = inputs.first().context("no input")?;
    ensure!(
        inputs.len() == 1 && f.datum_type == dt && f.shape.as_concrete() == Some(&*shape),
        "input {f:?} is not {dt:?} of shape {shape:?}"
    );
    Ok(shape)
}

impl Op for QuantizeOp {
    fn name(&self) -> StaticName {
        "DiffdfqQuantize".into()
    }
    op_as_typed_op!();
}

impl EvalOp for QuantizeOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let t = tensor_info(&self.tensor)?;
        let x = inputs.first().context("no input")?;
        let x = x.try_as_plain_ram()?.as_slice::<f32>()?;
        let mut out = vec![0u8; x.len()];
        kernels::quantize(x, t.scale, t.zero_point, t.dtype.bits(), &mut out).map_err(rt_err)?;
        Ok(tvec!(Tensor::from_shape(&shape_of(&t), &out)?.into_tvalue()))
    }
}

impl TypedOp for QuantizeOp {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = boundary_fact(&self.tensor, inputs, f32::datum_type())?;
        Ok(tvec!(u8::fact(&shape)))
    }
}

impl Op for DequantizeOp {
    fn name(&self) -> StaticName {
        "DiffdfqDequantize".into()
    }
    op_as_typed_op!();
}

impl EvalOp for DequantizeOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let t = tensor_info(&self.tensor)?;
        let x = inputs.first().context("no input")?;
        let x = x.try_as_plain_ram()?.as_slice::<u8>()?;
        let mut out = vec![0f32; x.len()];
        kernels::dequantize(x, t.scale, t.zero_point, &mut out).map_err(rt_err)?;
        Ok(tvec!(Tensor::from_shape(&shape_of(&t), &out)?.into_tvalue()))
    }
}

impl TypedOp for DequantizeOp {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = boundary_fact(&self.tensor, inputs, u8::datum_type())?;
        Ok(tvec!(f32::fact(&shape)))
    }
}

fn u32_of(v: usize) -> TractResult<u32> {
    u32::try_from(v).map_err(|_| format_err!("{v} does not fit a u32 record field"))
}

/// The parameter record and own pool of a decoded op: the same fields as in the `.dfq`, with
/// its weights (rows, then channel records), requantizations or table at the start of the pool.
pub fn self_contained(op: &rt::format::Op<'_>) -> TractResult<(Vec<u8>, Vec<u8>)> {
    use rt::format::Op as O;
    Ok(match *op {
        O::Conv {
            ref geom,
            ref weights,
            lo,
            hi,
            table,
        } => {
            let rows = weights.rows();
            let len = u32_of(rows.len())?;
            let mut r = ConvRecord::from_geom(geom, weights.bits, (lo, hi), (0, len, len))
                .ok_or_else(|| format_err!("a window field does not fit the conv record"))?;
            // A fused table follows the channel records, as in the `.dfq`.
            let t: &[u8] = match table {
                Some((zero, t)) => {
                    r.flags = 1;
                    r.table_zero = zero;
                    t
                }
                None => &[],
            };
            (
                r.to_bytes().to_vec(),
                [rows, weights.channels(), t].concat(),
            )
        }
        O::FullyConnected {
            ref weights,
            lo,
            hi,
        } => {
            let rows = weights.rows();
            let r = FcRecord {
                w_bits: weights.bits,
                clamp_lo: lo,
                clamp_hi: hi,
                reserved: 0,
                weights_offset: 0,
                weights_len: u32_of(rows.len())?,
                channels_offset: u32_of(rows.len())?,
            };
            (r.to_bytes().to_vec(), [rows, weights.channels()].concat())
        }
        O::Add { ref params, lo, hi } => {
            let r = BinaryRecord {
                mult_a: params.a.mult,
                shift_a: params.a.shift,
                mult_b: params.b.mult,
                shift_b: params.b.shift,
                mult_out: params.out.mult,
                shift_out: params.out.shift,
                clamp_lo: lo,
                clamp_hi: hi,
                reserved: [0; 2],
            };
            (r.to_bytes().to_vec(), Vec::new())
        }
        O::Mul { req, lo, hi } => {
            let r = BinaryRecord {
                mult_out: req.mult,
                shift_out: req.shift,
                clamp_lo: lo,
                clamp_hi: hi,
                ..Default::default()
            };
            (r.to_bytes().to_vec(), Vec::new())
        }
        O::MaxPool { ref geom, lo, hi } => (pool_record(geom, 0, lo, hi, 0, 0)?, Vec::new()),
        O::AvgPool {
            ref geom,
            count_include_pad,
            req,
            lo,
            hi,
        } => {
            let flags = u8::from(count_include_pad);
            let r = pool_record(geom, flags, lo, hi, req.mult, req.shift)?;
            (r, Vec::new())
        }
        O::GlobalAvgPool { req, lo, hi } => {
            let r = GapRecord {
                clamp_lo: lo,
                clamp_hi: hi,
                reserved: [0; 2],
                mult: req.mult,
                shift: req.shift,
            };
            (r.to_bytes().to_vec(), Vec::new())
        }
        O::Concat { axis, requants } => {
            let r = ConcatRecord {
                axis,
                reserved: [0; 3],
                requant_offset: 0,
            };
            (r.to_bytes().to_vec(), requants.to_vec())
        }
        O::Reshape => (Vec::new(), Vec::new()),
        O::Lut { func, table } => {
            let r = LutRecord {
                func,
                reserved: [0; 3],
                table_offset: 0,
            };
            (r.to_bytes().to_vec(), table.to_vec())
        }
        O::Softmax => (vec![0; 4], Vec::new()),
    })
}

fn pool_record(
    g: &kernels::PoolGeom,
    flags: u8,
    lo: u8,
    hi: u8,
    mult: i32,
    shift: i32,
) -> TractResult<Vec<u8>> {
    let r = PoolRecord::from_geom(g, flags, (lo, hi), (mult, shift))
        .ok_or_else(|| format_err!("a window field does not fit the pool record"))?;
    Ok(r.to_bytes().to_vec())
}
