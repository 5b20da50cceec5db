//! Blocks of reconstruction, the tensors they read gathered over all samples, and the
//! measures progressive selection steps by.

use std::ops::Range;

use candle_core::Tensor;
use diffdfq_runtime::numerics::code_max;

use crate::quant::qmodel::{Mode, Overrides, QModel};
use crate::quant::{lp_clip, ActQuant, QOp, TensorId};
use crate::Error;

/// Splits the node list into blocks (see the module doc).
pub fn blocks(m: &QModel) -> Vec<Range<usize>> {
    let q = &m.q;
    let n = q.nodes.len();
    let mut last_use = vec![0usize; q.tensors.len()];
    for (i, node) in q.nodes.iter().enumerate() {
        for &t in &node.inputs {
            last_use[t] = last_use[t].max(i);
        }
    }
    last_use[q.output] = n;
    let mut produced_at = vec![usize::MAX; q.tensors.len()];
    produced_at[q.input] = 0;
    for (i, node) in q.nodes.iter().enumerate() {
        produced_at[node.output] = i;
    }
    let mut cuts = Vec::new();
    for i in 0..n {
        let live = (0..q.tensors.len())
            .filter(|&t| {
                produced_at[t] != usize::MAX
                    && (produced_at[t] <= i || t == q.input)
                    && last_use[t] > i
            })
            .count();
        if live <= 1 {
            cuts.push(i + 1);
        }
    }
    if cuts.last() != Some(&n) {
        cuts.push(n);
    }
    let mut out: Vec<Range<usize>> = Vec::new();
    let mut start = 0;
    for c in cuts {
        let r = start..c;
        let has_layer = r.clone().any(|i| q.nodes[i].op.layer().is_some());
        if has_layer || c == n {
            out.push(r);
            start = c;
        }
    }
    // A trailing span without layers joins the last block.
    if out.len() > 1
        && !out[out.len() - 1]
            .clone()
            .any(|i| q.nodes[i].op.layer().is_some())
    {
        if let (Some(last), Some(prev)) = (out.pop(), out.last_mut()) {
            prev.end = last.end;
        }
    }
    out
}

/// Activation quantization minimizing the Lp(2.4) error on `values` over clipping ratios of
/// their min–max range.
pub(super) fn lp_act_quant(values: &[f32], bits: u8) -> ActQuant {
    let lo = values.iter().fold(0f32, |a, &v| a.min(v));
    let hi = values.iter().fold(0f32, |a, &v| a.max(v));
    let max = code_max(bits) as f32;
    lp_clip(values, max, 100, |r| {
        let aq = ActQuant::from_range(lo * r, hi * r, bits);
        (aq.scale, aq.zero as f32, aq)
    })
    .unwrap_or(ActQuant::from_range(lo, hi, bits))
}

/// Tensors computed over all samples, which later nodes can start from.
pub(super) type Carried = Vec<(TensorId, Tensor)>;

/// Runs `nodes` of the model in `mode` on `x` in chunks and gathers the tensors `want`
/// (concatenated over the batch).
pub(super) fn gather(
    m: &QModel,
    x: &[f32],
    nodes: Range<usize>,
    mode: Mode,
    want: &[TensorId],
) -> Result<Vec<Tensor>, Error> {
    gather_from(m, x, &[], nodes, mode, want)
}

/// [`gather`] with the tensors `start` already computed (over all samples): `nodes` may then
/// begin after the nodes that produce them. `None` when a wanted tensor was not computed.
pub(super) fn gather_from(
    m: &QModel,
    x: &[f32],
    start: &[(TensorId, Tensor)],
    nodes: Range<usize>,
    mode: Mode,
    want: &[TensorId],
) -> Result<Vec<Tensor>, Error> {
    let mut in_shape = m.q.tensors[m.q.input].shape.clone();
    let per: usize = in_shape[1..].iter().product();
    let mut parts: Vec<Vec<Tensor>> = vec![Vec::new(); want.len()];
    let chunk = 128;
    for (c, xs) in x.chunks(chunk * per).enumerate() {
        in_shape[0] = xs.len() / per;
        let xt = Tensor::from_vec(xs.to_vec(), in_shape.as_slice(), m.device())?;
        let mut vals = vec![None; m.q.tensors.len()];
        vals[m.q.input] = Some(m.input(&xt, mode)?);
        for (t, v) in start {
            vals[*t] = Some(v.narrow(0, c * chunk, in_shape[0])?);
        }
        m.run(
            nodes.clone(),
            &mut vals,
            mode,
            &mut Overrides::default(),
            None,
        )?;
        for (p, &t) in parts.iter_mut().zip(want) {
            p.push(
                vals[t]
                    .clone()
                    .ok_or_else(|| Error::Internal(format!("tensor {t} not computed")))?,
            );
        }
    }
    parts
        .iter()
        .map(|p| Tensor::cat(p, 0).map_err(Error::from))
        .collect()
}

/// `d(L)`: the summed Frobenius norm of the float–quantized logit difference over chunks,
/// given the float logits (the float model never changes, so callers keep them per level).
pub(super) fn adaptability(m: &QModel, x: &[f32], float_logits: &Tensor) -> Result<f32, Error> {
    let n = m.q.nodes.len();
    let q = gather(m, x, 0..n, Mode::Quant, &[logits_tensor(m)])?;
    Ok((float_logits - &q[0])?
        .sqr()?
        .sum_all()?
        .sqrt()?
        .to_scalar::<f32>()?)
}

/// The logits: the model output, or the input of a final Softmax.
pub(super) fn logits_tensor(m: &QModel) -> TensorId {
    match m.q.producer(m.q.output).map(|i| &m.q.nodes[i]) {
        Some(n) if matches!(n.op, QOp::Softmax) => n.inputs[0],
        _ => m.q.output,
    }
}
