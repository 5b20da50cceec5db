//! Folds the constant arithmetic exporters write around conv/linear layers into the layers
//! themselves, so the quantizer sees one layer with its true weights and bias:
//! - `layer(x) ∘ c` with ∘ ∈ {+, −, ·, ÷} and `c` a scalar or one value per output channel
//!   (paddle2onnx writes every conv bias as a bias-less Conv followed by such an Add); a
//!   BatchNorm in the layer's place absorbs it into its affine part, keeping its statistics;
//! - `layer(x · c)` with a scalar `c` reaching the layer through reshapes only (Paddle's
//!   inference-mode dropout scales the classifier's input this way).
//!
//! Both rewrites are exact in real arithmetic (a conv's zero padding stays zero when its input
//! is scaled), so the float model before and after differs only by float rounding.

use super::{BinKind, Graph, Op, Tensor};

/// Runs both folds to a fixed point; the bypassed nodes are removed.
pub fn constants(g: &mut Graph) {
    loop {
        let changed = (0..g.nodes.len()).any(|i| fold_into_producer(g, i))
            || (0..g.nodes.len()).any(|i| fold_into_consumer(g, i));
        if !changed {
            break;
        }
    }
}

/// The per-channel values of `c` broadcast against an output of shape `out` whose channels
/// lie on `axis`: `Some(vec of len C)` when `c` is constant along every other axis.
fn per_channel(c: &Tensor, out: &[usize], axis: usize) -> Option<Vec<f32>> {
    let v = c.as_f32()?;
    if c.shape.len() > out.len() {
        return None;
    }
    let lead = out.len() - c.shape.len();
    let mut ch = 1;
    for (i, &d) in c.shape.iter().enumerate() {
        let ax = lead + i;
        if ax == axis {
            if d != 1 && d != out[axis] {
                return None;
            }
            ch = d;
        } else if d != 1 {
            return None;
        }
    }
    let n = out[axis];
    Some((0..n).map(|k| v[if ch == 1 { 0 } else { k }]).collect())
}

/// The output channels' axis of a layer node, and how many there are.
fn channels(g: &Graph, node: usize) -> Option<(usize, usize)> {
    let out = g.shape(g.nodes[node].output);
    match &g.nodes[node].op {
        Op::Conv(c) if out.len() == 4 => Some((1, c.out_channels())),
        Op::BatchNorm(b) if out.len() >= 2 && out[1] == b.mean.len() => Some((1, b.mean.len())),
        Op::MatMul {
            b, trans_a: false, ..
        } if b.shape.len() == 2 && out.len() == 2 => Some((1, b.shape[1])),
        _ => None,
    }
}

/// Scales output channel `k` of a layer by `m[k]` and sets its bias to `f(k, bias[k])`.
fn rewrite(op: &mut Op, m: &[f32], f: impl Fn(usize, f32) -> f32) {
    match op {
        Op::Conv(c) => {
            let n = c.out_channels();
            let k = c.weight.len() / n;
            let mut w = c.weight.to_f32();
            for (o, row) in w.chunks_mut(k).enumerate() {
                row.iter_mut().for_each(|x| *x *= m[o]);
            }
            c.weight = Tensor::f32(c.weight.shape.clone(), w);
            let bias = c.bias.take().unwrap_or_else(|| vec![0.0; n]);
            c.bias = Some(bias.iter().enumerate().map(|(o, &b)| f(o, b)).collect());
        }
        Op::MatMul { b, bias, .. } => {
            let (kk, n) = (b.shape[0], b.shape[1]);
            let mut w = b.to_f32();
            for r in 0..kk {
                for o in 0..n {
                    w[r * n + o] *= m[o];
                }
            }
            *b = Tensor::f32(vec![kk, n], w);
            let old = bias.take().map_or_else(|| vec![0.0; n], |t| t.to_f32());
            *bias = Some(Tensor::f32(vec![n], (0..n).map(|o| f(o, old[o])).collect()));
        }
        // BN's output `scale·x̂ + bias` absorbs the affine map; its statistics stay.
        Op::BatchNorm(bn) => {
            for (o, (sc, b)) in bn.scale.iter_mut().zip(bn.bias.iter_mut()).enumerate() {
                *sc *= m[o];
                *b = f(o, *b);
            }
        }
        _ => unreachable!("rewrite is called on layers and BatchNorms only"),
    }
}

/// `layer(x) ∘ c` → `layer'(x)`. Returns whether node `i` was folded.
fn fold_into_producer(g: &mut Graph, i: usize) -> bool {
    let Op::ConstBinary {
        kind,
        value,
        const_left,
    } = &g.nodes[i].op
    else {
        return false;
    };
    let (kind, const_left) = (*kind, *const_left);
    let x = g.nodes[i].inputs[0];
    let Some(p) = g.producer(x) else {
        return false;
    };
    let Some((axis, n)) = channels(g, p) else {
        return false;
    };
    if !g.single_use(x) || g.shape(x) != g.shape(g.nodes[i].output) {
        return false;
    }
    let Some(c) = per_channel(value, g.shape(x), axis) else {
        return false;
    };
    debug_assert_eq!(c.len(), n);
    // y = s·layer(x) + t per channel.
    let (s, t): (Vec<f32>, Vec<f32>) = match (kind, const_left) {
        (BinKind::Add, _) => (vec![1.0; n], c),
        (BinKind::Sub, false) => (vec![1.0; n], c.iter().map(|v| -v).collect()),
        (BinKind::Sub, true) => (vec![-1.0; n], c),
        (BinKind::Mul, _) => (c, vec![0.0; n]),
        (BinKind::Div, false) if c.iter().all(|&v| v != 0.0) => {
            (c.iter().map(|v| 1.0 / v).collect(), vec![0.0; n])
        }
        _ => return false,
    };
    if s.iter().chain(&t).any(|v| !v.is_finite()) {
        return false;
    }
    rewrite(&mut g.nodes[p].op, &s, |o, b| s[o] * b + t[o]);
    bypass(g, p, i);
    true
}

/// `layer(reshape*(x · c))` with scalar `c` → `layer'(reshape*(x))`.
fn fold_into_consumer(g: &mut Graph, i: usize) -> bool {
    let Op::ConstBinary {
        kind,
        value,
        const_left,
    } = &g.nodes[i].op
    else {
        return false;
    };
    let c = match (kind, value.as_f32(), const_left) {
        (BinKind::Mul, Some(v), _) if v.len() == 1 => v[0],
        (BinKind::Div, Some(v), false) if v.len() == 1 => 1.0 / v[0],
        _ => return false,
    };
    if !c.is_finite() || g.shape(g.nodes[i].inputs[0]) != g.shape(g.nodes[i].output) {
        return false;
    }
    // Follow single-use reshapes to a layer that reads the value as its only input.
    let mut v = g.nodes[i].output;
    let layer = loop {
        if !g.single_use(v) {
            return false;
        }
        let Some(j) = g.consumers(v).next() else {
            return false;
        };
        match g.nodes[j].op {
            Op::Reshape => v = g.nodes[j].output,
            Op::Conv(_) | Op::MatMul { .. } if channels(g, j).is_some() => break j,
            // A BN reads its input through its statistics: scaling it is not a weight change.
            _ => return false,
        }
    };
    // Scaling the input scales the weights; the bias stays.
    match &mut g.nodes[layer].op {
        Op::Conv(conv) => {
            let w: Vec<f32> = conv.weight.to_f32().iter().map(|w| w * c).collect();
            conv.weight = Tensor::f32(conv.weight.shape.clone(), w);
        }
        Op::MatMul { b, .. } => {
            let w: Vec<f32> = b.to_f32().iter().map(|w| w * c).collect();
            *b = Tensor::f32(b.shape.clone(), w);
        }
        _ => return false,
    }
    // The scale node becomes a pass-through: its readers read its input.
    let (input, output) = (g.nodes[i].inputs[0], g.nodes[i].output);
    for node in &mut g.nodes {
        for x in &mut node.inputs {
            if *x == output {
                *x = input;
            }
        }
    }
    g.nodes.remove(i);
    true
}

/// Node `p` now computes what node `i` (its sole reader) did: `p` takes over `i`'s output.
fn bypass(g: &mut Graph, p: usize, i: usize) {
    let out = g.nodes[i].output;
    g.nodes[p].output = out;
    g.nodes.remove(i);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Activation, Conv, Node, Value, ValueId};

    fn value(g: &mut Graph, shape: &[usize]) -> ValueId {
        g.values.push(Value {
            name: format!("v{}", g.values.len()),
            shape: shape.to_vec(),
        });
        g.values.len() - 1
    }

    fn node(g: &mut Graph, op: Op, inputs: Vec<ValueId>, shape: &[usize]) -> ValueId {
        let output = value(g, shape);
        g.nodes.push(Node {
            name: format!("n{}", g.nodes.len()),
            op,
            inputs,
            output,
        });
        output
    }

    fn graph() -> Graph {
        Graph {
            values: vec![],
            nodes: vec![],
            inputs: vec![],
            outputs: vec![],
            opset: 13,
        }
    }

    /// Conv 2→3 channels, 1×1, weights 1..6, no bias.
    fn conv(g: &mut Graph) -> ValueId {
        let x = value(g, &[1, 2, 4, 4]);
        g.inputs.push(x);
        let c = Conv {
            weight: Tensor::f32(vec![3, 2, 1, 1], (1..=6).map(|v| v as f32).collect()),
            bias: None,
            strides: [1, 1],
            dilations: [1, 1],
            pads: [0; 4],
            groups: 1,
        };
        node(g, Op::Conv(c), vec![x], &[1, 3, 4, 4])
    }

    fn cb(kind: BinKind, shape: Vec<usize>, v: Vec<f32>, const_left: bool) -> Op {
        Op::ConstBinary {
            kind,
            value: Tensor::f32(shape, v),
            const_left,
        }
    }

    fn conv_of(g: &Graph) -> &Conv {
        match &g.nodes[0].op {
            Op::Conv(c) => c,
            op => panic!("{op:?}"),
        }
    }

    #[test]
    fn per_channel_arithmetic_after_a_conv_folds_into_it() {
        // Paddle's bias: Conv → Add([1, C, 1, 1]); then · 2, then 1 − y.
        let mut g = graph();
        let y = conv(&mut g);
        let y = node(
            &mut g,
            cb(BinKind::Add, vec![1, 3, 1, 1], vec![0.5, -1.0, 2.0], false),
            vec![y],
            &[1, 3, 4, 4],
        );
        let y = node(
            &mut g,
            cb(BinKind::Mul, vec![], vec![2.0], false),
            vec![y],
            &[1, 3, 4, 4],
        );
        let y = node(
            &mut g,
            cb(BinKind::Sub, vec![1], vec![1.0], true),
            vec![y],
            &[1, 3, 4, 4],
        );
        g.outputs.push(y);
        constants(&mut g);
        g.prune();
        assert_eq!(g.nodes.len(), 1, "{:?}", g.nodes);
        let c = conv_of(&g);
        // y = 1 − 2·(w·x + b): weights −2w, bias 1 − 2b.
        assert_eq!(
            c.weight.to_f32(),
            vec![-2.0, -4.0, -6.0, -8.0, -10.0, -12.0]
        );
        assert_eq!(c.bias.as_deref(), Some(&[0.0f32, 3.0, -3.0][..]));
        assert_eq!(g.outputs, vec![g.nodes[0].output]);
    }

    #[test]
    fn spatially_varying_or_shared_constants_stay() {
        // A constant that varies over H is no per-channel bias.
        let mut g = graph();
        let y = conv(&mut g);
        let z = node(
            &mut g,
            cb(BinKind::Add, vec![1, 1, 4, 1], vec![1.0; 4], false),
            vec![y],
            &[1, 3, 4, 4],
        );
        g.outputs.push(z);
        constants(&mut g);
        assert_eq!(g.nodes.len(), 2);
        // A conv output read twice keeps its own value.
        let mut g = graph();
        let y = conv(&mut g);
        let z = node(
            &mut g,
            cb(BinKind::Add, vec![1], vec![1.0], false),
            vec![y],
            &[1, 3, 4, 4],
        );
        let w = node(&mut g, Op::Add, vec![y, z], &[1, 3, 4, 4]);
        g.outputs.push(w);
        constants(&mut g);
        assert_eq!(g.nodes.len(), 3);
        // Division by a zero channel is left to the float reference.
        let mut g = graph();
        let y = conv(&mut g);
        let z = node(
            &mut g,
            cb(BinKind::Div, vec![3, 1, 1], vec![1.0, 0.0, 2.0], false),
            vec![y],
            &[1, 3, 4, 4],
        );
        g.outputs.push(z);
        constants(&mut g);
        assert_eq!(g.nodes.len(), 2);
    }

    #[test]
    fn a_scalar_scale_before_a_linear_layer_folds_into_its_weights() {
        // Paddle's inference dropout: HardSwish → · 0.8 → Reshape → MatMul (+ Add bias).
        let mut g = graph();
        let x = value(&mut g, &[1, 4, 1, 1]);
        g.inputs.push(x);
        let h = node(
            &mut g,
            Op::Act(Activation::HardSwish),
            vec![x],
            &[1, 4, 1, 1],
        );
        let s = node(
            &mut g,
            cb(BinKind::Mul, vec![1], vec![0.8], false),
            vec![h],
            &[1, 4, 1, 1],
        );
        let r = node(&mut g, Op::Reshape, vec![s], &[1, 4]);
        let b = Tensor::f32(vec![4, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        let m = node(
            &mut g,
            Op::MatMul {
                b,
                bias: None,
                trans_a: false,
            },
            vec![r],
            &[1, 2],
        );
        let y = node(
            &mut g,
            cb(BinKind::Add, vec![2], vec![0.25, -0.5], false),
            vec![m],
            &[1, 2],
        );
        g.outputs.push(y);
        constants(&mut g);
        g.prune();
        let ops: Vec<&str> = g.nodes.iter().map(|n| n.op.name()).collect();
        assert_eq!(ops, ["HardSwish", "Reshape", "MatMul"]);
        let Op::MatMul { b, bias, .. } = &g.nodes[2].op else {
            unreachable!()
        };
        let want: Vec<f32> = (1..=8).map(|v| v as f32 * 0.8).collect();
        assert_eq!(b.to_f32(), want);
        assert_eq!(bias.as_ref().map(|t| t.to_f32()), Some(vec![0.25, -0.5]));
        assert_eq!(g.nodes[1].inputs, vec![g.nodes[0].output]);
    }
}
