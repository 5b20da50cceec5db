//! The graph builder: ONNX values by name (constants or activations), node outputs, and the
//! dispatch of each node through the op table ([`super::ops`]).

use std::collections::HashMap;

use tract_onnx::pb;

use super::consts;
use super::ops::{Build, Site};
use super::proto::Attrs;
use super::{MAX_ELEMENTS, MAX_TOTAL_ELEMENTS};
use crate::graph::{Graph, Node, Op, Tensor, Value, ValueId};
use crate::Error;

#[derive(Debug, Clone)]
pub(super) enum Val {
    Const(Tensor),
    Dyn(ValueId),
}

pub(super) struct Builder {
    pub(super) graph: Graph,
    pub(super) env: HashMap<String, Val>,
    /// Outputs of zero Pads (exporters' "same" padding): the unpadded value and the pads
    /// (top, left, bottom, right); only a Conv may read them, as its own padding.
    pub(super) padded: HashMap<String, (ValueId, [usize; 4])>,
    /// Elements of the activations and folded constants made so far ([`MAX_TOTAL_ELEMENTS`]).
    pub(super) held: usize,
}

pub(super) fn bad<T>(msg: impl Into<String>) -> Result<T, Error> {
    Err(Error::Input(msg.into()))
}

/// Resolves a possibly negative axis against a rank.
pub(super) fn axis(a: i64, rank: usize) -> Result<usize, Error> {
    let r = rank as i64;
    let x = if a < 0 { a + r } else { a };
    if (0..r).contains(&x) {
        Ok(x as usize)
    } else {
        bad(format!("axis {a} out of range for rank {rank}"))
    }
}

impl Builder {
    pub(super) fn value(&mut self, name: &str, shape: Vec<usize>) -> ValueId {
        self.graph.values.push(Value {
            name: name.to_string(),
            shape,
        });
        self.graph.values.len() - 1
    }

    pub(super) fn input(&self, n: &pb::NodeProto, i: usize) -> Result<Option<Val>, Error> {
        match n.input.get(i) {
            None => Ok(None),
            Some(s) if s.is_empty() => Ok(None),
            Some(s) if self.padded.contains_key(s) => {
                if n.op_type == "Conv" && i == 0 {
                    Ok(Some(Val::Dyn(self.padded[s].0)))
                } else {
                    bad(format!(
                        "input '{s}' comes from a Pad: a zero Pad is supported right before a \
                         Conv only (it becomes the conv's padding)"
                    ))
                }
            }
            Some(s) => match self.env.get(s) {
                Some(v) => Ok(Some(v.clone())),
                None => bad(format!("input '{s}' is not produced before this node")),
            },
        }
    }

    pub(super) fn required(&self, n: &pb::NodeProto, i: usize) -> Result<Val, Error> {
        self.input(n, i)?
            .ok_or_else(|| Error::Input(format!("missing input {i}")))
    }

    pub(super) fn constant(
        &self,
        n: &pb::NodeProto,
        i: usize,
        what: &str,
    ) -> Result<Option<Tensor>, Error> {
        match self.input(n, i)? {
            None => Ok(None),
            Some(Val::Const(t)) => Ok(Some(t)),
            Some(Val::Dyn(_)) => bad(format!("{what} (input {i}) must be a constant initializer")),
        }
    }

    pub(super) fn emit(
        &mut self,
        n: &pb::NodeProto,
        name: &str,
        op: Op,
        inputs: Vec<ValueId>,
        shape: Vec<usize>,
    ) -> Result<(), Error> {
        if shape.contains(&0) {
            return bad(format!("output shape {shape:?} is empty"));
        }
        // Activations live in a device arena: a shape this large is a malformed model (absurd
        // pads, say), refused before anything is allocated for it.
        match shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) {
            Some(n) if n <= MAX_ELEMENTS => self.hold(n)?,
            _ => return bad(format!("output shape {shape:?} is too large")),
        }
        let out_name = n
            .output
            .first()
            .ok_or_else(|| Error::Input("node has no output".into()))?;
        let output = self.value(out_name, shape);
        self.graph.nodes.push(Node {
            name: name.to_string(),
            op,
            inputs,
            output,
        });
        self.env.insert(out_name.clone(), Val::Dyn(output));
        Ok(())
    }

    /// Counts `elements` more against the importer's memory cap.
    fn hold(&mut self, elements: usize) -> Result<(), Error> {
        self.held = self.held.saturating_add(elements);
        if self.held > MAX_TOTAL_ELEMENTS {
            return bad(format!(
                "the model's activations and folded constants exceed {MAX_TOTAL_ELEMENTS} \
                 elements (2 GiB of f32) in all, the importer's memory cap"
            ));
        }
        Ok(())
    }

    pub(super) fn set_output(&mut self, n: &pb::NodeProto, v: Val) -> Result<(), Error> {
        if let Val::Const(t) = &v {
            self.hold(t.len())?;
        }
        let out = n
            .output
            .first()
            .ok_or_else(|| Error::Input("node has no output".into()))?;
        self.env.insert(out.clone(), v);
        Ok(())
    }

    /// Extra outputs (BN's training outputs, MaxPool's indices, Dropout's mask) are outside
    /// the supported semantics when anything names them.
    pub(super) fn single_output(&self, n: &pb::NodeProto) -> Result<(), Error> {
        if n.output.iter().skip(1).any(|o| !o.is_empty()) {
            return bad(format!(
                "only the first output is supported, node has {}",
                n.output.len()
            ));
        }
        Ok(())
    }

    /// Folds a node to a constant when it can, else builds it through its entry in
    /// [`super::OPS`].
    pub(super) fn node(&mut self, n: &pb::NodeProto, name: &str) -> Result<(), Error> {
        let op = n.op_type.as_str();
        let a = Attrs(&n.attribute);
        let spec = super::ops::lookup(op);
        if let Some(Build::Source(h)) = spec.map(|s| &s.build) {
            return h(self, n, &a);
        }
        // Fold anything whose inputs are all constants.
        let mut inputs = Vec::new();
        for i in 0..n.input.len() {
            inputs.push(self.input(n, i)?);
        }
        if inputs.iter().all(|v| !matches!(v, Some(Val::Dyn(_)))) {
            let c: Vec<Option<Tensor>> = inputs
                .into_iter()
                .map(|v| match v {
                    Some(Val::Const(t)) => Some(t),
                    _ => None,
                })
                .collect();
            let t = consts::eval(op, &a, &c, self.graph.opset)?;
            return self.set_output(n, Val::Const(t));
        }
        let Some(spec) = spec else {
            return bad("no lowering for this op on activations");
        };
        let h =
            match &spec.build {
                Build::Network(h) => *h,
                _ => return bad(
                    "only supported in constant (shape) computations, here it reads an activation",
                ),
            };
        let x = match self.required(n, 0)? {
            Val::Dyn(v) => v,
            Val::Const(_) if spec.constant_operands => usize::MAX,
            Val::Const(_) => return bad("input 0 must be an activation, found a constant"),
        };
        let xs = if x == usize::MAX {
            vec![]
        } else {
            self.graph.values[x].shape.clone()
        };
        h(self, &Site { n, name, x, xs, a })
    }
}
