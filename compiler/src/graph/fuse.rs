//! Recognizes activations that exporters write decomposed, so later stages see one op:
//! `Clip(x + 3, 0, 6) / 6` (or `· 1/6`) is HardSigmoid, and `x · HardSigmoid(x)` or
//! `x · Clip(x + 3, 0, 6) / 6` is HardSwish.

use super::{Activation, BinKind, Graph, Op, ValueId};

const TOL: f32 = 1e-6;

/// The constant of a scalar `x ∘ c` node (either side for the commutative Add and Mul).
fn scalar(op: &Op, kind: BinKind) -> Option<f32> {
    match op {
        Op::ConstBinary {
            kind: k,
            value,
            const_left,
        } if *k == kind
            && value.len() == 1
            && (!const_left || matches!(kind, BinKind::Add | BinKind::Mul)) =>
        {
            value.as_f32().map(|v| v[0])
        }
        _ => None,
    }
}

/// `v / 6` or `v · (1/6)`: the node's input.
fn over_six(g: &Graph, node: usize) -> Option<ValueId> {
    let n = &g.nodes[node];
    let div = scalar(&n.op, BinKind::Div).is_some_and(|c| (c - 6.0).abs() < TOL);
    let mul = scalar(&n.op, BinKind::Mul).is_some_and(|c| (c - 1.0 / 6.0).abs() < TOL);
    (div || mul).then(|| n.inputs[0])
}

/// `Clip(x + 3, 0, 6)` producing `v`: returns x.
fn relu6_shift3(g: &Graph, v: ValueId) -> Option<ValueId> {
    let clip = &g.nodes[g.producer(v)?];
    let Op::Clip { min, max } = clip.op else {
        return None;
    };
    if min != 0.0 || max != 6.0 || !g.single_use(clip.inputs[0]) {
        return None;
    }
    let add = &g.nodes[g.producer(clip.inputs[0])?];
    let three = scalar(&add.op, BinKind::Add)?;
    ((three - 3.0).abs() < TOL && g.shape(add.inputs[0]) == g.shape(add.output))
        .then(|| add.inputs[0])
}

/// Rewrites the patterns in place; the bypassed nodes are left for `Graph::prune`.
pub fn activations(g: &mut Graph) {
    // HardSigmoid: (Clip(x + 3, 0, 6)) / 6
    for i in 0..g.nodes.len() {
        let Some(c) = over_six(g, i) else { continue };
        if !g.single_use(c) {
            continue;
        }
        if let Some(x) = relu6_shift3(g, c) {
            g.nodes[i].op = Op::Act(Activation::HardSigmoid {
                alpha: 1.0 / 6.0,
                beta: 0.5,
            });
            g.nodes[i].inputs = vec![x];
            continue;
        }
        // HardSwish written as (x · Clip(x + 3, 0, 6)) / 6
        let Some(m) = g.producer(c) else { continue };
        if g.nodes[m].op == Op::Mul {
            let (a, b) = (g.nodes[m].inputs[0], g.nodes[m].inputs[1]);
            let x = if relu6_shift3(g, b) == Some(a) && g.single_use(b) {
                Some(a)
            } else if relu6_shift3(g, a) == Some(b) && g.single_use(a) {
                Some(b)
            } else {
                None
            };
            if let Some(x) = x.filter(|&x| g.shape(x) == g.shape(g.nodes[i].output)) {
                g.nodes[i].op = Op::Act(Activation::HardSwish);
                g.nodes[i].inputs = vec![x];
            }
        }
    }
    // HardSwish: x · HardSigmoid(x; 1/6, 1/2)
    for i in 0..g.nodes.len() {
        if g.nodes[i].op != Op::Mul {
            continue;
        }
        let (a, b) = (g.nodes[i].inputs[0], g.nodes[i].inputs[1]);
        let is_hs = |v: ValueId, x: ValueId| {
            g.producer(v).is_some_and(|p| {
                let n = &g.nodes[p];
                matches!(n.op, Op::Act(Activation::HardSigmoid { alpha, beta }) if (alpha - 1.0 / 6.0).abs() < TOL && (beta - 0.5).abs() < TOL)
                    && n.inputs[0] == x
                    && g.single_use(v)
            })
        };
        let x = if is_hs(b, a) {
            a
        } else if is_hs(a, b) {
            b
        } else {
            continue;
        };
        if g.shape(x) == g.shape(g.nodes[i].output) {
            g.nodes[i].op = Op::Act(Activation::HardSwish);
            g.nodes[i].inputs = vec![x];
        }
    }
}
