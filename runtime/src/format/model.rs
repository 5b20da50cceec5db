//! [`Model`]: a blob validated once, then read in place.

use super::*;

/// A validated model, borrowing its blob.
#[derive(Clone, Copy, Debug)]
pub struct Model<'a> {
    blob: &'a [u8],
    header: Header,
    tensors: &'a [u8],
    ops: &'a [u8],
    pool: &'a [u8],
    input: TensorInfo,
    output: TensorInfo,
    /// Whether validation re-reads every weight code (`Σq`, zero padding): the full check
    /// does; a blob whose checksum was verified before skips that O(weights) pass, which
    /// guards the numerics, not the bounds of any read.
    read_codes: bool,
}

fn section(blob: &[u8], off: u32, len: usize) -> Result<&[u8], Error> {
    blob.get(off as usize..)
        .and_then(|s| s.get(..len))
        .ok_or(Error::BadHeader)
}

fn spans_overlap(a: (usize, usize), b: (usize, usize)) -> bool {
    a.1 > 0 && b.1 > 0 && a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
}

fn clamp_ok(lo: u8, hi: u8, out: &TensorInfo) -> bool {
    lo <= hi && hi <= out.dtype.code_max()
}

impl<'a> Model<'a> {
    /// Validates a blob (see the module doc) and returns the model reading it in place.
    /// Never panics and never reads outside `bytes`, whatever they hold.
    pub fn from_bytes(bytes: &'a [u8]) -> Result<Model<'a>, Error> {
        Self::parse(bytes, None)
    }

    /// [`Model::from_bytes`] for a blob whose checksum was verified before (the C ABI's
    /// `dfq_prepare`): every structural check still runs, so a run stays inside the blob and
    /// the arena whatever the bytes hold now, but the O(bytes) CRC is replaced by comparing the
    /// header's checksum field with `checksum`, the value the earlier check verified, and the
    /// weight codes are not re-read (their `Σq` guards the numerics, which that check covered;
    /// the i32 bound on every channel's accumulator is still checked).
    pub fn from_verified_bytes(bytes: &'a [u8], checksum: u32) -> Result<Model<'a>, Error> {
        Self::parse(bytes, Some(checksum))
    }

    fn parse(bytes: &'a [u8], verified: Option<u32>) -> Result<Model<'a>, Error> {
        let h = Header::parse(bytes)?;
        if h.magic != MAGIC {
            return Err(Error::BadMagic);
        }
        if h.version != VERSION {
            return Err(Error::UnsupportedVersion);
        }
        let total = h.total_len as usize;
        if bytes.len() < total || (h.total_len as u64) < HEADER_LEN as u64 {
            return Err(Error::Truncated);
        }
        if bytes.len() > total {
            return Err(Error::TrailingBytes);
        }
        let crc = match verified {
            Some(c) => c,
            None => blob_checksum(bytes),
        };
        if crc != h.checksum {
            return Err(Error::ChecksumMismatch);
        }
        Self::check_header(&h)?;
        let tensors = section(
            bytes,
            h.tensors_offset,
            h.n_tensors as usize * TENSOR_RECORD_LEN,
        )?;
        let ops = section(bytes, h.ops_offset, h.ops_size as usize)?;
        let pool = section(bytes, h.pool_offset, h.pool_size as usize)?;
        let mut m = Model {
            blob: bytes,
            header: h,
            tensors,
            ops,
            pool,
            input: PLACEHOLDER,
            output: PLACEHOLDER,
            read_codes: verified.is_none(),
        };
        m.check_tensors()?;
        m.input = m.tensor(h.input)?;
        m.output = m.tensor(h.output)?;
        if !m.input.dtype.is_code() {
            return Err(Error::BadTensor { tensor: h.input });
        }
        m.check_ops()?;
        Ok(m)
    }

    fn check_header(h: &Header) -> Result<(), Error> {
        let bad = Error::BadHeader;
        if h.flags != 0 || h.reserved != [0; 8] || h.n_tensors == 0 {
            return Err(bad);
        }
        if h.input >= h.n_tensors || h.output >= h.n_tensors {
            return Err(bad);
        }
        let a = SECTION_ALIGN as u64;
        let up = |v: u64| v.div_ceil(a) * a;
        let tensors_end = HEADER_LEN as u64 + TENSOR_RECORD_LEN as u64 * h.n_tensors as u64;
        if h.tensors_offset as u64 != HEADER_LEN as u64
            || h.ops_offset as u64 != up(tensors_end)
            || h.pool_offset as u64 != up(h.ops_offset as u64 + h.ops_size as u64)
            || h.total_len as u64 != up(h.pool_offset as u64 + h.pool_size as u64)
        {
            return Err(bad);
        }
        if h.scratch_offset as u64 + h.scratch_size as u64 > h.arena_size as u64 {
            return Err(bad);
        }
        Ok(())
    }

    fn check_tensors(&self) -> Result<(), Error> {
        let scratch = self.scratch_span();
        for id in 0..self.header.n_tensors {
            let t = self.tensor(id)?;
            if t.dtype.is_code() {
                let end = t.arena_offset as u64 + t.arena_len() as u64;
                if end > self.header.arena_size as u64
                    || spans_overlap((t.arena_offset as usize, t.arena_len()), scratch)
                {
                    return Err(Error::ArenaRange { tensor: id });
                }
            }
        }
        Ok(())
    }

    /// Tensor `id` (parsed from its record).
    pub fn tensor(&self, id: u16) -> Result<TensorInfo, Error> {
        let bad = Error::BadTensor { tensor: id };
        let b = self
            .tensors
            .get(id as usize * TENSOR_RECORD_LEN..)
            .ok_or(bad)?;
        let r = TensorRecord::read_from(b, bad)?;
        TensorInfo::from_record(&r, id)
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }
    /// The blob.
    pub fn blob(&self) -> &'a [u8] {
        self.blob
    }
    /// Arena bytes a run needs.
    pub fn arena_size(&self) -> usize {
        self.header.arena_size as usize
    }
    /// The scratch region (offset, length) in the arena.
    pub fn scratch_span(&self) -> (usize, usize) {
        (
            self.header.scratch_offset as usize,
            self.header.scratch_size as usize,
        )
    }
    /// Number of tensors.
    pub fn n_tensors(&self) -> u16 {
        self.header.n_tensors
    }
    /// Number of ops.
    pub fn n_ops(&self) -> u16 {
        self.header.n_ops
    }
    /// Model input tensor.
    pub fn input(&self) -> &TensorInfo {
        &self.input
    }
    /// Model output tensor.
    pub fn output(&self) -> &TensorInfo {
        &self.output
    }
    /// Model input id.
    pub fn input_id(&self) -> u16 {
        self.header.input
    }
    /// Model output id.
    pub fn output_id(&self) -> u16 {
        self.header.output
    }
    /// The op records in execution order.
    pub fn ops(&self) -> OpIter<'a> {
        OpIter {
            rest: self.ops,
            index: 0,
            left: self.header.n_ops,
        }
    }
    /// The weight pool.
    pub fn pool(&self) -> &'a [u8] {
        self.pool
    }

    fn io(&self, rec: &OpRecord<'a>, i: usize) -> Result<TensorInfo, Error> {
        let id = rec.inputs.get(i).ok_or(Error::BadOp { op: rec.index })?;
        self.tensor(id)
            .map_err(|_| Error::BadTensorRef { op: rec.index })
    }

    /// Decodes an op's parameters (shapes come from its tensors).
    pub fn decode(&self, rec: &OpRecord<'a>) -> Result<Op<'a>, Error> {
        let out = self
            .tensor(rec.output)
            .map_err(|_| Error::BadTensorRef { op: rec.index })?;
        let x = self.io(rec, 0)?;
        let ctx = OpContext {
            index: rec.index,
            n_inputs: rec.inputs.len(),
            x: &x,
            out: &out,
        };
        decode_op(rec.kind, rec.params, self.pool, &ctx)
    }

    /// The op that writes tensor `id` (its producer), searching ops before `before`; `None`
    /// for the model input or a tensor not written before.
    fn producer(&self, id: u16, before: u16) -> Result<Option<OpRecord<'a>>, Error> {
        for r in self.ops().take(before as usize) {
            let r = r?;
            if r.output == id {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// Whether op `rec` aliases its input (a Reshape whose output has the input's offset):
    /// it writes nothing.
    fn is_alias(&self, rec: &OpRecord<'a>) -> bool {
        if rec.kind != OpKind::Reshape {
            return false;
        }
        match (
            rec.inputs.get(0).map(|i| self.tensor(i)),
            self.tensor(rec.output),
        ) {
            (Some(Ok(i)), Ok(o)) => i.arena_offset == o.arena_offset,
            _ => false,
        }
    }

    /// Index of the op that actually wrote the bytes of tensor `id` (following Reshape
    /// aliases), `-1` for the model input.
    fn writer_index(&self, mut id: u16, before: u16) -> Result<i32, Error> {
        let mut limit = before;
        loop {
            match self.producer(id, limit)? {
                None => return Ok(-1),
                Some(r) if self.is_alias(&r) => {
                    id = r.inputs.get(0).ok_or(Error::BadOp { op: r.index })?;
                    limit = r.index;
                }
                Some(r) => return Ok(r.index as i32),
            }
        }
    }

    /// Checks that no op in `(writer, reader)` overwrites tensor `t`.
    fn check_live(&self, t: &TensorInfo, writer: i32, reader: u32) -> Result<(), Error> {
        let span = (t.arena_offset as usize, t.arena_len());
        for r in self
            .ops()
            .skip((writer + 1) as usize)
            .take((reader as i64 - writer as i64 - 1).max(0) as usize)
        {
            let r = r?;
            if self.is_alias(&r) {
                continue;
            }
            let o = self.tensor(r.output)?;
            if spans_overlap(span, (o.arena_offset as usize, o.arena_len())) {
                return Err(Error::ArenaOverlap { op: r.index });
            }
        }
        Ok(())
    }

    fn check_ops(&self) -> Result<(), Error> {
        let mut seen = 0u32;
        let mut consumed = 0usize;
        for rec in self.ops() {
            let rec = rec?;
            consumed += op_record_len(rec.kind, rec.inputs.len());
            seen += 1;
            self.check_op(&rec)?;
        }
        if seen != self.header.n_ops as u32 || consumed != self.ops.len() {
            return Err(Error::BadHeader);
        }
        // The model output must have been written (or be the input).
        let out_id = self.header.output;
        if out_id != self.header.input && self.producer(out_id, self.header.n_ops)?.is_none() {
            return Err(Error::BadOrder {
                op: self.header.n_ops,
            });
        }
        if !self.output.dtype.is_code() {
            // Only the last op writes an f32 model output (its kind is checked in check_op).
            let last = self.producer(out_id, self.header.n_ops)?;
            if !matches!(last, Some(r) if r.index + 1 == self.header.n_ops) {
                return Err(Error::BadTensor { tensor: out_id });
            }
        }
        if self.output.dtype.is_code() {
            let w = self.writer_index(out_id, self.header.n_ops)?;
            self.check_live(&self.output, w, self.header.n_ops as u32)?;
        }
        Ok(())
    }

    /// Whether `rec` is the op right before a final Softmax that reads its output alone.
    fn feeds_final_softmax(&self, rec: &OpRecord<'a>) -> Result<bool, Error> {
        self.feeds_final_softmax_id(rec.output, rec.index + 1)
    }

    /// Whether tensor `id` is written by op `at − 1` and read by op `at`, the last op, a
    /// Softmax producing the model output from it alone.
    fn feeds_final_softmax_id(&self, id: u16, at: u16) -> Result<bool, Error> {
        if at == 0 || at + 1 != self.header.n_ops {
            return Ok(false);
        }
        let writer = self.producer(id, self.header.n_ops)?;
        if !matches!(writer, Some(w) if w.index + 1 == at) {
            return Ok(false);
        }
        let Some(last) = self.ops().nth(at as usize) else {
            return Ok(false);
        };
        let last = last?;
        let x = self.tensor(id)?;
        Ok(last.kind == OpKind::Softmax
            && last.inputs.len() == 1
            && last.inputs.get(0) == Some(id)
            && last.output == self.header.output
            && x.numel == self.output.numel)
    }

    fn check_op(&self, rec: &OpRecord<'a>) -> Result<(), Error> {
        let op = rec.index;
        let tref = Error::BadTensorRef { op };
        let order = Error::BadOrder { op };
        let shape = Error::ShapeMismatch { op };
        let quant = Error::BadQuant { op };
        // References and types.
        let y = self.tensor(rec.output).map_err(|_| tref)?;
        let n_ops = self.header.n_ops;
        let is_last = op + 1 == n_ops;
        if !y.dtype.is_code() {
            // See "f32 tensors" in the module doc.
            let ok = match rec.kind {
                OpKind::Softmax => is_last,
                OpKind::FullyConnected => {
                    (is_last && rec.output == self.header.output)
                        || self.feeds_final_softmax(rec)?
                }
                _ => false,
            };
            if !ok {
                return Err(tref);
            }
        }
        for id in rec.inputs.iter() {
            let t = self.tensor(id).map_err(|_| tref)?;
            if !(t.dtype.is_code() || rec.kind == OpKind::Softmax && is_last) {
                return Err(tref);
            }
        }
        // Order: each input is the model input or written earlier; the output is new.
        if rec.output == self.header.input || self.producer(rec.output, op)?.is_some() {
            return Err(order);
        }
        for id in rec.inputs.iter() {
            if id != self.header.input && self.producer(id, op)?.is_none() {
                return Err(order);
            }
        }
        // Arena: the output does not overlap an input (an exact Reshape alias is allowed), and
        // every input is still intact since it was written.
        let alias = self.is_alias(rec);
        for id in rec.inputs.iter() {
            let t = self.tensor(id)?;
            if !alias
                && spans_overlap(
                    (t.arena_offset as usize, t.arena_len()),
                    (y.arena_offset as usize, y.arena_len()),
                )
            {
                return Err(Error::ArenaOverlap { op });
            }
            let w = self.writer_index(id, op)?;
            self.check_live(&t, w, op as u32)?;
        }
        // Parameters and shapes.
        let decoded = self.decode(rec)?;
        let x = self.io(rec, 0)?;
        match decoded {
            Op::Conv {
                weights,
                lo,
                hi,
                table,
                ..
            } => {
                if x.rank != 4 || y.rank != 4 {
                    return Err(shape);
                }
                let ok = match table {
                    // 8-bit codes into the table, every entry a code of the output.
                    Some((_, t)) => {
                        y.dtype.is_code() && lo <= hi && t.iter().all(|&v| v <= y.dtype.code_max())
                    }
                    None => clamp_ok(lo, hi, &y),
                };
                if !ok {
                    return Err(quant);
                }
                self.check_weights(op, &weights, &x)?;
                if kernels::conv_scratch_len(weights.k) > self.header.scratch_size as usize {
                    return Err(Error::ScratchTooSmall { op });
                }
            }
            Op::FullyConnected { weights, lo, hi } => {
                let f32_ok =
                    !y.dtype.is_code() && lo == 0 && hi == 0 && y.numel == weights.c_out as u32;
                if !(clamp_ok(lo, hi, &y) || f32_ok) {
                    return Err(quant);
                }
                self.check_weights(op, &weights, &x)?;
            }
            Op::Add { params, lo, hi } => {
                let b = self.io(rec, 1)?;
                self.check_broadcast(op, &x, &b, &y)?;
                if !params.a.is_valid()
                    || !params.b.is_valid()
                    || !params.out.is_valid()
                    || !clamp_ok(lo, hi, &y)
                {
                    return Err(quant);
                }
            }
            Op::Mul { req, lo, hi } => {
                let b = self.io(rec, 1)?;
                self.check_broadcast(op, &x, &b, &y)?;
                if !req.is_valid() || !clamp_ok(lo, hi, &y) {
                    return Err(quant);
                }
            }
            Op::MaxPool { geom, lo, hi } => {
                if x.rank != 4 || y.rank != 4 || !geom.check(x.dims4(), y.dims4()) {
                    return Err(shape);
                }
                if !x.same_quant(&y) || !clamp_ok(lo, hi, &y) {
                    return Err(quant);
                }
            }
            Op::AvgPool {
                geom, req, lo, hi, ..
            } => {
                if x.rank != 4 || y.rank != 4 || !geom.check(x.dims4(), y.dims4()) {
                    return Err(shape);
                }
                if !req.is_valid() || !clamp_ok(lo, hi, &y) {
                    return Err(quant);
                }
            }
            Op::GlobalAvgPool { req, lo, hi } => {
                let d = x.dims4();
                if x.rank != 4 || y.rank != 4 || y.dims4() != [1, d[1], 1, 1] || d[0] != 1 {
                    return Err(shape);
                }
                if !req.is_valid() || !clamp_ok(lo, hi, &y) {
                    return Err(quant);
                }
            }
            Op::Concat { axis, requants } => {
                if axis >= y.rank {
                    return Err(shape);
                }
                let mut total = 0u64;
                for (i, id) in rec.inputs.iter().enumerate() {
                    let t = self.tensor(id)?;
                    if t.rank != y.rank {
                        return Err(shape);
                    }
                    for (d, (&a, &b)) in t.dims.iter().zip(y.dims.iter()).enumerate() {
                        if d == axis as usize {
                            total += a as u64;
                        } else if a != b {
                            return Err(shape);
                        }
                    }
                    let rq = concat_requant(requants, i).ok_or(Error::WeightSize { op })?;
                    if !rq.is_valid() {
                        return Err(quant);
                    }
                }
                let want = y.dims.get(axis as usize).copied().unwrap_or(0);
                if total != want as u64 {
                    return Err(shape);
                }
            }
            Op::Reshape => {
                if x.numel != y.numel {
                    return Err(shape);
                }
                if !x.same_quant(&y) {
                    return Err(quant);
                }
            }
            Op::Lut { table, .. } => {
                if x.dims4() != y.dims4() {
                    return Err(shape);
                }
                let n = x.dtype.code_max() as usize + 1;
                if table.iter().take(n).any(|&v| v > y.dtype.code_max()) {
                    return Err(quant);
                }
            }
            Op::Softmax => {
                if y.dtype != DType::F32 || x.dims != y.dims || x.rank != y.rank {
                    return Err(shape);
                }
                // An f32 input was written by the op right before, into the same buffer.
                if !x.dtype.is_code()
                    && !self.feeds_final_softmax_id(rec.inputs.get(0).unwrap_or(u16::MAX), op)?
                {
                    return Err(order);
                }
                if rec.output != self.header.output || op + 1 != self.header.n_ops {
                    return Err(order);
                }
            }
        }
        // An op on 4-bit tensors runs through the scratch region (`bands`).
        let io = super::bands::RecIo { model: self, rec };
        if super::bands::choose(&decoded, &io, &y, self.header.scratch_size as usize)?.is_none() {
            return Err(Error::ScratchTooSmall { op });
        }
        Ok(())
    }

    /// Least scratch region with which every op runs: the largest of
    /// [`super::bands::min_scratch`] over the ops (what the writer and the compiler size the
    /// region from, before adding what faster kernels keep there).
    pub fn least_scratch(&self) -> Result<usize, Error> {
        let mut need = 0usize;
        for rec in self.ops() {
            let rec = rec?;
            let op = self.decode(&rec)?;
            let y = self.tensor(rec.output)?;
            let io = super::bands::RecIo {
                model: self,
                rec: &rec,
            };
            need = need.max(super::bands::min_scratch(&op, &io, &y)?);
        }
        Ok(need)
    }

    fn check_broadcast(
        &self,
        op: u16,
        a: &TensorInfo,
        b: &TensorInfo,
        y: &TensorInfo,
    ) -> Result<(), Error> {
        let (da, db, dy) = (a.dims4(), b.dims4(), y.dims4());
        let ok = da
            .iter()
            .zip(db.iter())
            .zip(dy.iter())
            .all(|((&p, &q), &o)| (p == o || p == 1) && (q == o || q == 1) && o == p.max(q));
        if ok {
            Ok(())
        } else {
            Err(Error::ShapeMismatch { op })
        }
    }

    /// Per-channel checks: zero points, scales, multipliers, `Σq` and zero padding of every
    /// row (only when `read_codes`), and that `K·max|q − z_c|·max|a − z| + |bias|` fits `i32`.
    fn check_weights(&self, op: u16, w: &Weights<'a>, x: &TensorInfo) -> Result<(), Error> {
        let quant = Error::BadQuant { op };
        let ws = Error::WeightSize { op };
        let qmax = code_max(w.bits) as i64;
        let amax = x.dtype.code_max() as i64;
        let z = x.zero_point as i64;
        let a_span = z.max(amax - z);
        let mut codes = [0u8; 8];
        for c in 0..w.c_out {
            let ch = w.channel(c).ok_or(ws)?;
            if ch.w_zero as i64 > qmax
                || !ch.w_scale.is_finite()
                || ch.w_scale <= 0.0
                || !numerics::multiplier_is_valid(ch.mult, ch.shift)
                || ch.reserved != [0; 3]
            {
                return Err(quant);
            }
            let row = w.row(c).ok_or(ws)?;
            let mut sum = ch.sum_q as i64;
            if self.read_codes {
                sum = 0;
                for g in 0..w.k.div_ceil(8) {
                    unpack_group(w.bits, row.group(g).ok_or(ws)?, &mut codes);
                    for (i, &q) in codes.iter().enumerate() {
                        if g * 8 + i < w.k {
                            sum += q as i64;
                        } else if q != 0 {
                            return Err(ws);
                        }
                    }
                }
            }
            if sum != ch.sum_q as i64 {
                return Err(ws);
            }
            let zc = ch.w_zero as i64;
            let q_span = zc.max(qmax - zc);
            let bound = (w.k as i64)
                .saturating_mul(q_span)
                .saturating_mul(a_span)
                .saturating_add((ch.bias as i64).abs());
            if bound > i32::MAX as i64 {
                return Err(Error::AccumulatorOverflow { op });
            }
        }
        Ok(())
    }
}

const PLACEHOLDER: TensorInfo = TensorInfo {
    rank: 1,
    dims: [1; 4],
    numel: 1,
    dtype: DType::U8,
    scale: 1.0,
    zero_point: 0,
    arena_offset: 0,
};
