//! Ops that move or name values: Constant, Shape/Size (folded), Identity, Dropout (inference),
//! Concat, and the reshapes (Flatten, Reshape, Squeeze, Unsqueeze).

use tract_onnx::pb;

use super::builder::{axis, bad, Builder, Val};
use super::consts;
use super::ops::Site;
use super::proto::{self, Attrs};
use crate::graph::{Op, Tensor};
use crate::Error;

impl Builder {
    pub(super) fn constant_node(&mut self, n: &pb::NodeProto, a: &Attrs) -> Result<(), Error> {
        let t = proto::constant_attr(a)?;
        super::check_finite(&n.output.first().cloned().unwrap_or_default(), &t)?;
        self.set_output(n, Val::Const(t))
    }

    /// Shape and Size: constants, whether their input is one or an activation.
    pub(super) fn shape_node(&mut self, n: &pb::NodeProto, a: &Attrs) -> Result<(), Error> {
        let shape = match self.required(n, 0)? {
            Val::Const(t) => t.shape,
            Val::Dyn(v) => self.graph.values[v].shape.clone(),
        };
        let t = if n.op_type == "Size" {
            Tensor::i64(vec![], vec![shape.iter().product::<usize>() as i64])
        } else {
            consts::shape_of(&shape, a.int("start", 0), a.opt_int("end"))
        };
        self.set_output(n, Val::Const(t))
    }

    pub(super) fn identity(&mut self, s: &Site) -> Result<(), Error> {
        self.set_output(s.n, Val::Dyn(s.x))
    }

    pub(super) fn dropout(&mut self, s: &Site) -> Result<(), Error> {
        let n = s.n;
        self.single_output(n)?;
        if let Some(t) = self.constant(n, 2, "training_mode")? {
            if t.to_i64().iter().any(|&v| v != 0) {
                return bad("training-mode Dropout is not supported");
            }
        }
        if self.graph.opset < 7 && s.a.int("is_test", 0) == 0 {
            return bad("training-mode Dropout is not supported");
        }
        self.set_output(n, Val::Dyn(s.x))
    }

    pub(super) fn concat(&mut self, s: &Site) -> Result<(), Error> {
        let n = s.n;
        let mut ids = Vec::new();
        for i in 0..n.input.len() {
            match self.required(n, i)? {
                Val::Dyn(v) => ids.push(v),
                Val::Const(_) => {
                    return bad("concatenating a constant with activations is not supported")
                }
            }
        }
        let first = self.graph.values[ids[0]].shape.clone();
        let ax = axis(s.a.int("axis", 0), first.len())?;
        let mut out = first.clone();
        out[ax] = 0;
        for &v in &ids {
            let sh = &self.graph.values[v].shape;
            if sh.len() != first.len()
                || sh
                    .iter()
                    .enumerate()
                    .any(|(i, &d)| i != ax && d != first[i])
            {
                return bad(format!(
                    "input shapes {first:?} and {sh:?} do not concatenate on axis {ax}"
                ));
            }
            out[ax] += sh[ax];
        }
        self.emit(n, s.name, Op::Concat { axis: ax }, ids, out)
    }

    /// Flatten, Reshape, Squeeze, Unsqueeze: one Reshape to the folded target shape.
    pub(super) fn reshape(&mut self, s: &Site) -> Result<(), Error> {
        let n = s.n;
        let shape_in = self.constant(n, 1, "shape/axes")?;
        let out =
            consts::reshape_target(&n.op_type, &s.a, &s.xs, shape_in.as_ref(), self.graph.opset)?;
        self.emit(n, s.name, Op::Reshape, vec![s.x], out)
    }
}
