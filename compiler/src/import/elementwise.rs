//! Activation functions and the binary arithmetic ops.

use super::builder::{bad, Builder, Val};
use super::ops::Site;
use crate::graph::{broadcast_shape, Activation, BinKind, Op, Tensor};
use crate::Error;

impl Builder {
    /// An activation function without parameters.
    pub(super) fn unary(&mut self, s: &Site, op: Op) -> Result<(), Error> {
        self.emit(s.n, s.name, op, vec![s.x], s.xs.clone())
    }

    pub(super) fn leaky_relu(&mut self, s: &Site) -> Result<(), Error> {
        let alpha = s.a.float("alpha", 0.01);
        if !alpha.is_finite() {
            return bad(format!("alpha {alpha} is not a finite number"));
        }
        self.unary(s, Op::Act(Activation::LeakyRelu { alpha }))
    }

    /// PRelu with one slope is a LeakyRelu (torch's `nn.PReLU()` default); other slopes
    /// (torch's `nn.PReLU(C)`) import for the float model, and the quantizer refuses them.
    pub(super) fn prelu(&mut self, s: &Site) -> Result<(), Error> {
        let Some(slope) = self.constant(s.n, 1, "slope")? else {
            return bad("PRelu needs its slope input");
        };
        if broadcast_shape(&s.xs, &slope.shape).as_deref() != Some(&s.xs[..]) {
            return bad(format!(
                "slope shape {:?} does not broadcast to the input's {:?}",
                slope.shape, s.xs
            ));
        }
        let v = slope.to_f32();
        if let Some(bad_v) = v.iter().find(|v| !v.is_finite()) {
            return bad(format!("slope {bad_v} is not a finite number"));
        }
        let op = match v.as_slice() {
            [a, rest @ ..] if rest.iter().all(|b| b == a) => {
                Op::Act(Activation::LeakyRelu { alpha: *a })
            }
            _ => Op::PRelu { slope },
        };
        self.unary(s, op)
    }

    pub(super) fn hard_sigmoid(&mut self, s: &Site) -> Result<(), Error> {
        let op = Op::Act(Activation::HardSigmoid {
            alpha: s.a.float("alpha", 0.2),
            beta: s.a.float("beta", 0.5),
        });
        self.unary(s, op)
    }

    pub(super) fn clip(&mut self, s: &Site) -> Result<(), Error> {
        let (n, a) = (s.n, &s.a);
        let (min, max) = if self.graph.opset < 11 {
            (
                a.float("min", f32::NEG_INFINITY),
                a.float("max", f32::INFINITY),
            )
        } else {
            let scalar = |t: Option<Tensor>, d: f32| -> Result<f32, Error> {
                match t {
                    None => Ok(d),
                    Some(t) if t.len() == 1 => Ok(t.to_f32()[0]),
                    Some(t) => bad(format!("min/max must be scalars, got shape {:?}", t.shape)),
                }
            };
            (
                scalar(self.constant(n, 1, "min")?, f32::NEG_INFINITY)?,
                scalar(self.constant(n, 2, "max")?, f32::INFINITY)?,
            )
        };
        self.unary(s, Op::Clip { min, max })
    }

    pub(super) fn binary(&mut self, s: &Site) -> Result<(), Error> {
        let (n, name, op) = (s.n, s.name, s.n.op_type.as_str());
        let kind = match op {
            "Add" => BinKind::Add,
            "Sub" => BinKind::Sub,
            "Mul" => BinKind::Mul,
            _ => BinKind::Div,
        };
        if n.input.len() != 2 {
            return bad(format!(
                "{op} takes 2 inputs, this node has {}",
                n.input.len()
            ));
        }
        let l = self.required(n, 0)?;
        let r = self.required(n, 1)?;
        let shape_of = |b: &Self, v: &Val| match v {
            Val::Const(t) => t.shape.clone(),
            Val::Dyn(id) => b.graph.values[*id].shape.clone(),
        };
        let (ls, rs) = (shape_of(self, &l), shape_of(self, &r));
        let out = crate::graph::broadcast_shape(&ls, &rs)
            .ok_or_else(|| Error::Input(format!("shapes {ls:?} and {rs:?} do not broadcast")))?;
        match (l, r) {
            (Val::Dyn(x), Val::Dyn(y)) => match kind {
                BinKind::Add => self.emit(n, name, Op::Add, vec![x, y], out),
                BinKind::Mul => self.emit(n, name, Op::Mul, vec![x, y], out),
                _ => bad("both operands are activations; Sub and Div are supported with a constant operand"),
            },
            (Val::Dyn(x), Val::Const(c)) | (Val::Const(c), Val::Dyn(x)) => {
                let const_left = matches!(self.required(n, 0)?, Val::Const(_));
                let value = Tensor::f32(c.shape.clone(), c.to_f32());
                self.emit(n, name, Op::ConstBinary { kind, value, const_left }, vec![x], out)
            }
            // Constant operands fold before this; reaching here means they did not.
            (Val::Const(_), Val::Const(_)) => bad("both operands are constants that did not fold"),
        }
    }
}
