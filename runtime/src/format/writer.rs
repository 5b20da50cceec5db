//! The writer (cargo feature `write`, `alloc` only): [`ModelBuilder`] lays a network out as a
//! `.dfq` blob.

extern crate alloc;
use super::*;
use crate::numerics::{clamp_bounds, quantize_multiplier, round_half_away_f64, Fused};
use alloc::vec::Vec;

/// A float activation function turned into a 256-entry code table. The one place an
/// elementwise activation's definition lives (docs/design.md §7, "Adding an op"): the graph,
/// the float reference, the quantizer and the writer all take it from here.
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
    /// `x` for `x ≥ 0`, else `alpha·x` (ONNX LeakyRelu, and PRelu with one slope).
    LeakyRelu {
        alpha: f32,
    },
    /// `min(max(x, min), max)` for bounds other than ReLU's and ReLU6's.
    Clip {
        min: f32,
        max: f32,
    },
    /// `(e^x − e^−x) / (e^x + e^−x)`.
    Tanh,
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
            Activation::LeakyRelu { .. } => 6,
            Activation::Clip { .. } => 7,
            Activation::Tanh => 8,
        }
    }
    /// The op's name in reports and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Activation::Relu => "Relu",
            Activation::Relu6 => "Relu6",
            Activation::HardSigmoid { .. } => "HardSigmoid",
            Activation::HardSwish => "HardSwish",
            Activation::Sigmoid => "Sigmoid",
            Activation::LeakyRelu { .. } => "LeakyRelu",
            Activation::Clip { .. } => "Clip",
            Activation::Tanh => "Tanh",
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
            Activation::LeakyRelu { alpha } => {
                if x >= 0.0 {
                    x
                } else {
                    alpha as f64 * x
                }
            }
            // max then min: NaN-free bounds with min > max give max, as ONNX's reference does.
            Activation::Clip { min, max } => x.max(min as f64).min(max as f64),
            // 1 − 2/(e^2x + 1): no ∞/∞ for large |x| (e^2x → ∞ gives 1, → 0 gives −1).
            Activation::Tanh => 1.0 - 2.0 / (numerics::exp(2.0 * x) + 1.0),
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
    let b =
        round_half_away_f64(bias as f64 / acc_scale).clamp(i32::MIN as i64, i32::MAX as i64) as i32;
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
        (s_x, s_y): (f32, f32),
        tail: &[u8],
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
        pack_weights(bits, k, layer.codes, &mut rows).map_err(|_| ws)?;
        let mut chans = Vec::with_capacity(c_out * CHANNEL_RECORD_LEN);
        for (c, codes) in layer.codes.chunks_exact(k).enumerate() {
            let bias = layer.bias.get(c).copied().unwrap_or(0.0);
            let (s, z) = (
                layer.scales.get(c).copied().unwrap_or(1.0),
                layer.zero_points.get(c).copied().unwrap_or(0),
            );
            chans.extend_from_slice(&channel_record(s, z, bias, codes, s_x, s_y).to_bytes());
        }
        chans.extend_from_slice(tail);
        let w_off = self.push_pool(&rows);
        let c_off = self.push_pool(&chans);
        Ok((w_off, rows.len() as u32, c_off))
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
        self.push_conv(input, output, geom, layer, fused, None)
    }

    /// Adds a Conv fused with the activation `act` (*Conv with an activation table* in the
    /// format doc): the conv's codes have scale, zero point and bits (4 or 8) `pre`, clamped
    /// as `fused` says, and the table maps them to the output's codes.
    #[allow(clippy::too_many_arguments)]
    pub fn conv_act(
        &mut self,
        input: u16,
        output: u16,
        geom: &ConvGeom,
        layer: &Layer<'_>,
        fused: Fused,
        pre: (f32, u8, u8),
        act: Activation,
    ) -> Result<(), Error> {
        self.push_conv(input, output, geom, layer, fused, Some((pre, act)))
    }

    fn push_conv(
        &mut self,
        input: u16,
        output: u16,
        geom: &ConvGeom,
        layer: &Layer<'_>,
        fused: Fused,
        table: Option<((f32, u8, u8), Activation)>,
    ) -> Result<(), Error> {
        let (x, y) = (self.info(input)?, self.info(output)?);
        let op = self.n_ops.min(u16::MAX as usize) as u16;
        let s = geom
            .check(x.dims4(), y.dims4())
            .ok_or(Error::ShapeMismatch { op })?;
        // The codes the conv writes: the output's, or those its table reads.
        let (codes, t) = match table {
            None => (y, None),
            Some(((scale, zero, bits), act)) => {
                let dtype = match bits {
                    8 => DType::U8,
                    4 => DType::U4,
                    _ => return Err(Error::BadArgument),
                };
                let scale_ok = scale.is_finite() && scale > 0.0;
                if !(y.dtype.is_code() && scale_ok) || zero > dtype.code_max() {
                    return Err(Error::BadArgument);
                }
                let codes = TensorInfo {
                    dtype,
                    scale,
                    zero_point: zero,
                    ..y
                };
                (codes, Some(activation_table(act, &codes, &y)))
            }
        };
        let (lo, hi) = clamp_bounds(fused, codes.scale, codes.zero_point, codes.dtype.bits());
        let tail: &[u8] = t.as_ref().map_or(&[], |t| &t[..]);
        let (w_off, w_len, c_off) = self.push_weights(
            layer.bits,
            s.k,
            s.c_out,
            layer,
            (x.scale, codes.scale),
            tail,
        )?;
        let mut r = ConvRecord::from_geom(geom, layer.bits, (lo, hi), (w_off, w_len, c_off))
            .ok_or(Error::BadArgument)?;
        if t.is_some() {
            r.flags = 1;
            r.table_zero = codes.zero_point;
        }
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
            (x.scale, y.scale),
            &[],
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
        PoolRecord::from_geom(geom, flags, (lo, hi), (q.mult, q.shift)).ok_or(Error::BadArgument)
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
    pub fn global_avg_pool(&mut self, input: u16, output: u16, fused: Fused) -> Result<(), Error> {
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
    pub fn activation(&mut self, input: u16, output: u16, act: Activation) -> Result<(), Error> {
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
        match self.arena {
            Some(a) => self.build(Some(a), 0),
            None => {
                let least = self.least_scratch()?;
                self.build(None, self.scratch_needed.max(least) as u64)
            }
        }
    }

    /// Least scratch region the ops added so far run with ([`Model::least_scratch`]: the
    /// largest conv `K`, and the staging of ops on 4-bit tensors), found on a provisional
    /// blob whose scratch region takes the rest of the `u32` arena.
    pub fn least_scratch(&self) -> Result<usize, Error> {
        let blob = self.build(None, u64::MAX)?;
        Model::from_bytes(&blob)?.least_scratch()
    }

    /// [`ModelBuilder::finish`] with the arena `arena`, or else a scratch region of `scratch`
    /// bytes after the tensors (`u64::MAX`: up to the `u32` limit).
    fn build(&self, arena: Option<(u32, u32, u32)>, scratch: u64) -> Result<Vec<u8>, Error> {
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
                end = end.max(off as u64 + arena_bytes(&t.rec));
            }
        }
        for (t, o) in self.tensors.iter().zip(offs.iter_mut()) {
            if o.is_none() && t.alias_of.is_none() {
                let at = end.div_ceil(SECTION_ALIGN as u64) * SECTION_ALIGN as u64;
                *o = Some(at.min(u32::MAX as u64) as u32);
                end = at + arena_bytes(&t.rec);
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
        let (arena, s_off, s_size) = match arena {
            Some(a) => a,
            None => {
                let s_off = end.div_ceil(SECTION_ALIGN as u64) * SECTION_ALIGN as u64;
                let size = scratch.min((u32::MAX as u64).saturating_sub(s_off));
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

/// Arena bytes of a code tensor's record (see [`TensorInfo::arena_len`]).
fn arena_bytes(r: &TensorRecord) -> u64 {
    if r.dtype == DType::U4.bits() {
        (r.numel as u64).div_ceil(2)
    } else {
        r.numel as u64
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
