//! BatchNorm folding and activation fusion: the float structure of a [`QuantGraph`].

use super::*;
use crate::graph::{Graph, Op, PoolKind, ValueId};

/// The layer that can take the BatchNorm `bn` (node `i`) on its input into its weights, if
/// any: the BN's sole consumer, or the first conv/linear behind a chain of sole-consumer
/// MaxPools and Reshapes. An unpadded conv absorbs `x·a_c + t_c` exactly (padded zeros would
/// have to become `−t_c/a_c`); a MaxPool commutes with it when every `a_c > 0` (a per-channel
/// increasing map keeps the maximum's position); a linear layer behind a flattening Reshape
/// absorbs it per feature (Keras: Conv → ReLU → BN → MaxPool → Conv, and BN → Flatten → Dense).
fn input_affine_target(
    g: &Graph,
    i: usize,
    bn: &crate::graph::BatchNorm,
    sole: &dyn Fn(ValueId) -> Option<usize>,
) -> Option<usize> {
    let c = bn.mean.len();
    let increasing = (0..c).all(|k| bn.scale[k] > 0.0 && bn.var[k] + bn.eps > 0.0);
    let mut v = g.nodes[i].output;
    let mut flattened = false;
    loop {
        let j = sole(v)?;
        match &g.nodes[j].op {
            Op::Conv(conv) => {
                let ok = !flattened
                    && conv.pads == [0; 4]
                    && conv.weight.shape.get(1).map(|ci| ci * conv.groups) == Some(c)
                    && conv.weight.as_f32().is_some();
                return ok.then_some(j);
            }
            Op::MatMul { b, trans_a, .. } => {
                let k = b.shape.first().copied()?;
                let ok = !trans_a && b.shape.len() == 2 && c > 0 && k % c == 0;
                // Features in runs of k/c per channel: the input is (1, C, …) flattened.
                let chw = g.shape(g.nodes[i].output);
                let ok = ok && chw.iter().product::<usize>() == k && chw.get(1) == Some(&c);
                return ok.then_some(j);
            }
            Op::Pool(p) if p.kind == PoolKind::Max && increasing && !flattened => {}
            Op::Reshape => flattened = true,
            _ => return None,
        }
        v = g.nodes[j].output;
    }
}

/// A Clip that does not fuse into its producer: ReLU's and ReLU6's bounds keep their own
/// tables, any other bounds a [`Activation::Clip`] table.
fn clip_activation(min: f32, max: f32) -> Activation {
    match (min, max) {
        (0.0, 6.0) => Activation::Relu6,
        (0.0, f32::INFINITY) => Activation::Relu,
        _ => Activation::Clip { min, max },
    }
}

/// The fused form of `a`: ReLU and ReLU6 become output clamps of the op before them.
fn fusable(a: Activation) -> Fused {
    match a {
        Activation::Relu => Fused::Relu,
        Activation::Relu6 => Fused::Relu6,
        _ => Fused::None,
    }
}

fn unsupported(node: &str, what: &str) -> Error {
    Error::Input(format!(
        "node '{node}': {what} is not supported by the quantizer"
    ))
}

/// Folds every BatchNorm into the conv/linear before it, fuses ReLU/ReLU6 into the op before
/// them (conv, linear, add, mul) and maps the remaining ops. The layers' codes are left empty
/// and every tensor starts with a quantization over [−1, 1]: a method sets both.
///
/// The model input and output tensors keep 8-bit codes whatever `bits.act` is: like the
/// first and last layers' weights, the boundaries are where low precision costs most, and the
/// input is quantized from f32 anyway.
pub fn fold(g: &Graph, bits: Bits) -> Result<QuantGraph, Error> {
    fold_keeping(g, bits, &[])
}

/// [`fold`] with the tensors named in `act8` at 8 bits whatever `bits.act` is (`--arena`'s
/// A4/A8 mix; a MaxPool or Reshape output follows its input).
pub fn fold_keeping(g: &Graph, bits: Bits, act8: &[String]) -> Result<QuantGraph, Error> {
    bits.check()?;
    if g.inputs.len() != 1 || g.outputs.len() != 1 {
        return Err(Error::Input(format!(
            "the model has {} inputs and {} outputs; the quantizer takes one of each",
            g.inputs.len(),
            g.outputs.len()
        )));
    }
    let n_consumers =
        |v: ValueId| g.consumers(v).count() + g.outputs.iter().filter(|&&o| o == v).count();
    // The sole consumer of `v`, if it is exactly one node and `v` is no graph output.
    let sole = |v: ValueId| -> Option<usize> {
        if n_consumers(v) == 1 {
            g.consumers(v).next()
        } else {
            None
        }
    };
    let mut tmap: Vec<Option<TensorId>> = vec![None; g.values.len()];
    let mut tensors: Vec<QTensor> = Vec::new();
    let new_tensor = |v: ValueId, tensors: &mut Vec<QTensor>, bits: u8| {
        tensors.push(QTensor {
            name: g.values[v].name.clone(),
            shape: g.values[v].shape.clone(),
            source: v,
            quant: ActQuant::from_range(-1.0, 1.0, bits),
            is_f32: false,
            stats: None,
        });
        tensors.len() - 1
    };
    let input = new_tensor(g.inputs[0], &mut tensors, 8);
    tmap[g.inputs[0]] = Some(input);
    let mut done = vec![false; g.nodes.len()];
    let mut nodes: Vec<QNode> = Vec::new();
    // BatchNorms that precede a conv or linear layer (Keras writes Conv → ReLU → BN → Conv,
    // see [`input_affine_target`]): the layer reads the BN's input (through the pools and
    // reshapes between) and absorbs `x·a_c + t_c` into its weights and bias.
    let mut input_affine: Vec<Option<(Vec<f32>, Vec<f32>)>> = vec![None; g.nodes.len()];
    for (i, n) in g.nodes.iter().enumerate() {
        if done[i] {
            continue;
        }
        if let Op::BatchNorm(bn) = &n.op {
            if let Some(j) = input_affine_target(g, i, bn, &sole) {
                let mut a = bn.gain();
                let mut t: Vec<f32> = (0..a.len())
                    .map(|c| bn.bias[c] - a[c] * bn.mean[c])
                    .collect();
                let x = tmap[n.inputs[0]];
                // The scale goes back into the layer that produced the BN's input where it
                // can: `a·ReLU(z) + t = ReLU(a·z) + t` for `a > 0`, and a per-output-channel
                // scale is exact under per-channel weight quantization. Absorbed forward
                // instead, `a_c` would scale the next layer's weights per *input* channel, and
                // a row's range is set by its largest `a_c` (up to 190× the median on the Keras
                // CIFAR-10 model). Only the shift `t` then moves forward.
                let producer = x.and_then(|x| nodes.iter().rposition(|q| q.output == x));
                let back = producer.filter(|&p| {
                    n_consumers(n.inputs[0]) == 1
                        && a.iter().all(|&v| v > 0.0 && v.is_finite())
                        && matches!(nodes[p].op.fused(), Fused::None | Fused::Relu)
                        && nodes[p].op.layer().is_some_and(|l| l.c_out == a.len())
                });
                let mut stats = BnOutStats {
                    node: i,
                    mean: bn.mean.clone(),
                    std: bn.var.iter().map(|v| v.max(0.0).sqrt()).collect(),
                    gain: Vec::new(),
                };
                if let Some(p) = back {
                    let node = &mut nodes[p];
                    if let Some(l) = node.op.layer_mut() {
                        for (c, &ac) in a.iter().enumerate() {
                            for w in &mut l.weight[c * l.k..(c + 1) * l.k] {
                                *w *= ac;
                            }
                            l.bias[c] *= ac;
                        }
                    }
                    if let Some(own) = &mut node.bn {
                        for (c, &ac) in a.iter().enumerate() {
                            own.mean[c] *= ac;
                            own.std[c] *= ac;
                        }
                    }
                    for (c, &ac) in a.iter().enumerate() {
                        stats.mean[c] *= ac;
                        stats.std[c] *= ac;
                    }
                    a.iter_mut().for_each(|v| *v = 1.0);
                } else {
                    // A dead channel (ReLU output ≈ its running mean, variance ≈ 0) has a huge
                    // `a_c = γ/√(var + ε)`: absorbed as is, it would set its rows' weight
                    // range and starve every other weight of codes. Its BN output is a
                    // constant, so it becomes that constant (`a_c = 0`), which leaves an error
                    // under 0.1 % of the widest channel's output spread `a·σ`, below one 8-bit
                    // step.
                    let spread: Vec<f32> = (0..a.len())
                        .map(|c| (a[c] * bn.var[c].max(0.0).sqrt()).abs())
                        .collect();
                    let widest = spread.iter().copied().fold(0f32, f32::max);
                    for c in 0..a.len() {
                        if spread[c] <= 1e-3 * widest {
                            t[c] += a[c] * bn.mean[c];
                            a[c] = 0.0;
                        }
                    }
                }
                input_affine[j] = Some((a, t));
                if let Some(x) = x {
                    tensors[x].stats = Some(stats);
                }
                done[i] = true;
                tmap[n.output] = tmap[n.inputs[0]];
                continue;
            }
        }
        done[i] = true;
        let mut out_v = n.output;
        let get = |v: ValueId, tmap: &[Option<TensorId>]| {
            tmap[v].ok_or_else(|| {
                Error::Internal(format!("node '{}': input not produced before", n.name))
            })
        };
        let inputs = n
            .inputs
            .iter()
            .map(|&v| get(v, &tmap))
            .collect::<Result<Vec<_>, _>>()?;
        // Fuses a following ReLU / ReLU6 (the op's sole consumer).
        let take_act = |out_v: &mut ValueId, done: &mut [bool]| -> Fused {
            let Some(j) = sole(*out_v) else {
                return Fused::None;
            };
            let f = match g.nodes[j].op {
                Op::Act(a) => fusable(a),
                Op::Clip { min, max } => fusable(clip_activation(min, max)),
                _ => Fused::None,
            };
            if f == Fused::None {
                return f;
            }
            done[j] = true;
            *out_v = g.nodes[j].output;
            f
        };
        // Folds a following BatchNorm over axis 1 into rows of `layer`.
        let take_bn = |out_v: &mut ValueId, layer: &mut QLayer, done: &mut [bool]| {
            let j = sole(*out_v)?;
            let Op::BatchNorm(bn) = &g.nodes[j].op else {
                return None;
            };
            if bn.mean.len() != layer.c_out {
                return None;
            }
            done[j] = true;
            *out_v = g.nodes[j].output;
            let mut stats = BnOutStats {
                node: j,
                mean: Vec::new(),
                std: Vec::new(),
                gain: Vec::new(),
            };
            for (c, a) in bn.folded_gain().into_iter().enumerate() {
                for w in &mut layer.weight[c * layer.k..(c + 1) * layer.k] {
                    *w *= a;
                }
                layer.bias[c] = (layer.bias[c] - bn.mean[c]) * a + bn.bias[c];
                stats.mean.push(bn.bias[c]);
                stats.std.push(a.abs() * bn.var[c].max(0.0).sqrt());
            }
            Some(stats)
        };
        let (op, bn) = match &n.op {
            Op::Conv(c) => {
                let w = c
                    .weight
                    .as_f32()
                    .ok_or_else(|| unsupported(&n.name, "an integer weight"))?;
                let c_out = c.out_channels();
                let k = w.len() / c_out.max(1);
                let mut bias = c.bias.clone().unwrap_or_else(|| vec![0.0; c_out]);
                let mut w = w.to_vec();
                if let Some((a, t)) = &input_affine[i] {
                    // Row o reads input channels g·c_in_g + l of its group g, kh·kw taps each.
                    let taps = c.kernel()[0] * c.kernel()[1];
                    let (c_in_g, c_out_g) = (k / taps, c_out / c.groups);
                    for (o, row) in w.chunks_exact_mut(k).enumerate() {
                        for (l, tap) in row.chunks_exact_mut(taps).enumerate() {
                            let ch = o / c_out_g * c_in_g + l;
                            for v in tap {
                                bias[o] += *v * t[ch];
                                *v *= a[ch];
                            }
                        }
                    }
                }
                let mut layer = QLayer::new(c_out, k, w, bias, bits.weight);
                let bn = take_bn(&mut out_v, &mut layer, &mut done);
                let fused = take_act(&mut out_v, &mut done);
                let geom = c.geom();
                (QOp::Conv { geom, layer, fused }, bn)
            }
            Op::MatMul { b, bias, trans_a } => {
                let a_shape = g.shape(n.inputs[0]);
                if *trans_a || b.shape.len() != 2 || a_shape.len() != 2 || a_shape[0] != 1 {
                    return Err(unsupported(
                        &n.name,
                        "a MatMul other than (1, K)·(K, N) (batched or transposed input)",
                    ));
                }
                let (kk, nn) = (b.shape[0], b.shape[1]);
                let bw = b.to_f32();
                // Rows are output features: the transpose of (K, N).
                let mut w = vec![0f32; kk * nn];
                for r in 0..kk {
                    for c in 0..nn {
                        w[c * kk + r] = bw[r * nn + c];
                    }
                }
                let mut bias = match bias {
                    Some(t) if t.len() == nn => t.to_f32(),
                    Some(_) => return Err(unsupported(&n.name, "a bias not of length N")),
                    None => vec![0.0; nn],
                };
                if let Some((a, t)) = &input_affine[i] {
                    // Feature r of the flattened (1, C, …) input belongs to channel r / (K/C).
                    let per = kk / a.len().max(1);
                    for (o, row) in w.chunks_exact_mut(kk).enumerate() {
                        for (r, v) in row.iter_mut().enumerate() {
                            let ch = r / per.max(1);
                            bias[o] += *v * t[ch];
                            *v *= a[ch];
                        }
                    }
                }
                let mut layer = QLayer::new(nn, kk, w, bias, bits.weight);
                let bn = take_bn(&mut out_v, &mut layer, &mut done);
                let fused = take_act(&mut out_v, &mut done);
                (QOp::Linear { layer, fused }, bn)
            }
            Op::BatchNorm(_) => {
                return Err(Error::Input(format!(
                    "node '{}': a BatchNorm that neither follows a conv or linear layer nor precedes an unpadded conv cannot be folded",
                    n.name
                )))
            }
            Op::Add => (
                QOp::Add {
                    fused: take_act(&mut out_v, &mut done),
                },
                None,
            ),
            Op::Mul => (
                QOp::Mul {
                    fused: take_act(&mut out_v, &mut done),
                },
                None,
            ),
            Op::Act(a) => (QOp::Act(*a), None),
            Op::Clip { min, max } => (QOp::Act(clip_activation(*min, *max)), None),
            Op::Pool(p) => {
                let geom = p.geom();
                match p.kind {
                    PoolKind::Max => (QOp::MaxPool { geom }, None),
                    PoolKind::Avg => (
                        QOp::AvgPool {
                            geom,
                            count_include_pad: p.count_include_pad,
                        },
                        None,
                    ),
                }
            }
            Op::GlobalAvgPool => (QOp::GlobalAvgPool, None),
            Op::Concat { axis } => (QOp::Concat { axis: *axis }, None),
            Op::Reshape => (QOp::Reshape, None),
            Op::Softmax { axis, .. } => {
                let rank = g.shape(n.output).len();
                if !g.outputs.contains(&n.output) || *axis + 1 != rank {
                    return Err(unsupported(
                        &n.name,
                        "a Softmax other than a last one over the last axis",
                    ));
                }
                (QOp::Softmax, None)
            }
            Op::PRelu { slope } => {
                return Err(unsupported(
                    &n.name,
                    &format!(
                        "PRelu whose slope varies (shape {:?}; one slope is supported)",
                        slope.shape
                    ),
                ))
            }
            Op::ConstBinary { .. } => {
                return Err(unsupported(
                    &n.name,
                    "arithmetic with a constant outside a conv/linear",
                ))
            }
        };
        let macs = g.macs(n);
        let out_bits = if g.outputs.contains(&out_v) || act8.contains(&g.values[out_v].name) {
            8
        } else {
            bits.act
        };
        let output = new_tensor(out_v, &mut tensors, out_bits);
        tmap[out_v] = Some(output);
        if matches!(op, QOp::Softmax) {
            tensors[output].is_f32 = true;
        }
        nodes.push(QNode {
            name: n.name.clone(),
            op,
            inputs,
            output,
            macs,
            bn,
        });
    }
    let output = tmap[g.outputs[0]]
        .ok_or_else(|| Error::Input("the model output is produced by no node".into()))?;
    mark_f32_logits(&mut tensors, &nodes, output);
    // First and last weight layers at `first_last` bits.
    let layer_nodes: Vec<usize> = nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op.layer().is_some())
        .map(|(i, _)| i)
        .collect();
    for &i in layer_nodes.first().iter().chain(layer_nodes.last().iter()) {
        if let Some(l) = nodes[*i].op.layer_mut() {
            l.bits = bits.first_last;
        }
    }
    let mut q = QuantGraph {
        tensors,
        nodes,
        input,
        output,
        bits,
        input_range: (-ranges::INPUT_RANGE, ranges::INPUT_RANGE),
    };
    equalize_depthwise_inputs(&mut q);
    // A pre-activation the runtime never stores keeps 8-bit codes at no arena cost.
    for i in q.fused_act_convs() {
        let t = q.nodes[i].output;
        q.tensors[t].quant.bits = 8;
    }
    Ok(q)
}

/// Evens out the channels of every tensor that a conv with a folded BN and a fused ReLU or
/// ReLU6 writes and only a depthwise conv reads (MobileNetV2's and EfficientNet-Lite's
/// expansion outputs, the stem before the first depthwise). One per-tensor step serves all
/// channels, so a channel whose BN-implied range is a tenth of the widest gets a tenth of the
/// codes. Channel `c` of the producer is scaled by `s_c ≥ 1` (weights, bias, BN moments) and
/// the depthwise row `c` by `1/s_c`; `s_c` takes twice the channel's `k_sigma` range to the
/// tensor's range (the widest channel's), at most [`EQUALIZE_MAX`]. Both layers' weights are
/// quantized per output channel, so their codes move only by the rounding of the scaled
/// floats. ReLU commutes with `s_c > 0`; ReLU6's clamp at 6 becomes `6/s_c` in the old units,
/// beyond the channel's doubled range and never below where the tensor's step already clips.
/// What changes is where a scaled channel is clipped: at its own doubled range instead of the
/// widest channel's.
fn equalize_depthwise_inputs(q: &mut QuantGraph) {
    let mut readers = vec![0usize; q.tensors.len()];
    for n in &q.nodes {
        for &x in &n.inputs {
            readers[x] += 1;
        }
    }
    for a in 0..q.nodes.len() {
        let t = q.nodes[a].output;
        if t == q.output || q.tensors[t].is_f32 || readers[t] != 1 {
            continue;
        }
        let QOp::Conv { layer, fused, .. } = &q.nodes[a].op else {
            continue;
        };
        if !matches!(fused, Fused::Relu | Fused::Relu6) {
            continue;
        }
        let Some(stats) = &q.nodes[a].bn else {
            continue;
        };
        let c = layer.c_out;
        let Some(b) = q.nodes.iter().position(|n| n.inputs == [t]) else {
            continue;
        };
        let depthwise = matches!(&q.nodes[b].op, QOp::Conv { geom, layer: lb, .. }
            if geom.groups == c && lb.c_out == c && lb.k == geom.kernel_h * geom.kernel_w);
        if !depthwise || stats.mean.len() != c || stats.std.len() != c {
            continue;
        }
        let k = ranges::k_sigma(q.tensors[t].quant.bits) as f64;
        let g = ranges::fused_fn(*fused);
        let hi: Vec<f64> = (0..c)
            .map(|ch| g(stats.mean[ch] as f64 + k * stats.std[ch] as f64))
            .collect();
        let widest = hi.iter().copied().fold(0f64, f64::max);
        // Twice the channel's own `k·σ`: clipped at `k·σ` the scaled channels cost more than
        // their codes gain (README "Real models").
        let hi: Vec<f64> = (0..c)
            .map(|ch| g(stats.mean[ch] as f64 + 2.0 * k * stats.std[ch] as f64))
            .collect();
        if !(widest.is_finite() && widest > 0.0) {
            continue;
        }
        // A (nearly) dead channel stays as it is: scaling its noise up buys nothing.
        let s: Vec<f32> = hi
            .iter()
            .map(|&h| {
                if h > widest / EQUALIZE_MAX as f64 * 1e-3 {
                    (widest / h).clamp(1.0, EQUALIZE_MAX as f64) as f32
                } else {
                    1.0
                }
            })
            .collect();
        if s.iter().all(|&v| v == 1.0) {
            continue;
        }
        let node = &mut q.nodes[a];
        if let Some(l) = node.op.layer_mut() {
            for (ch, &f) in s.iter().enumerate() {
                l.weight[ch * l.k..(ch + 1) * l.k]
                    .iter_mut()
                    .for_each(|w| *w *= f);
                l.bias[ch] *= f;
            }
        }
        if let Some(st) = &mut node.bn {
            for (ch, &f) in s.iter().enumerate() {
                st.mean[ch] *= f;
                st.std[ch] *= f;
            }
            st.gain = s.clone();
        }
        if let Some(l) = q.nodes[b].op.layer_mut() {
            for (ch, &f) in s.iter().enumerate() {
                l.weight[ch * l.k..(ch + 1) * l.k]
                    .iter_mut()
                    .for_each(|w| *w /= f);
            }
        }
    }
}

/// The largest factor [`equalize_depthwise_inputs`] scales a channel by.
const EQUALIZE_MAX: f32 = 8.0;

/// The logits stay `f32`: when the last op is a FullyConnected without a fused activation, or
/// a final Softmax reading one, that layer's accumulators are dequantized straight to `f32`
/// (the format's *f32 tensors*) instead of being requantized to 8-bit codes whose range would
/// have to be guessed without data; a clipped top logit ties with the next and flips top-1.
fn mark_f32_logits(tensors: &mut [QTensor], nodes: &[QNode], output: TensorId) {
    let Some(last) = nodes.last() else { return };
    let logits = match last.op {
        QOp::Softmax if last.output == output => last.inputs[0],
        QOp::Linear { .. } if last.output == output => output,
        _ => return,
    };
    let Some(p) = nodes.iter().position(|n| n.output == logits) else {
        return;
    };
    let only_reader = nodes.iter().filter(|n| n.inputs.contains(&logits)).count()
        == usize::from(logits != output);
    let before_last = p + 1 == nodes.len() || (p + 2 == nodes.len() && logits != output);
    if matches!(
        nodes[p].op,
        QOp::Linear {
            fused: Fused::None,
            ..
        }
    ) && only_reader
        && before_last
    {
        tensors[logits].is_f32 = true;
    }
}
