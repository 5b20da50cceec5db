//! ONNX → [`Graph`], through tract-onnx's protobuf model.
//!
//! The graph is built from the ONNX proto itself rather than from tract's typed model: tract
//! folds BatchNormalization into Mul/Add (and then into the conv) while typing, and the
//! synthesis stage needs every BN's statistics attached to the tensor it normalizes. tract
//! stays the FP32 ground truth the float reference is tested against.
//!
//! Shapes are concrete: the batch comes from the options (default 1). Everything computable
//! from constants and known shapes (Shape → Gather → Concat → Reshape chains of exported
//! graphs) is folded here, so later stages only see network ops.

mod consts;
mod proto;

use std::collections::HashMap;
use std::path::Path;

use prost::Message;
use tract_onnx::pb;

use crate::graph::{
    fuse, BatchNorm, BinKind, Conv, Graph, Node, Op, Pool, PoolKind, Tensor, Value, ValueId,
};
use crate::Error;
use proto::{Attrs, NodeExt};

/// What import needs to know beyond the file.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Full shape of the (single) input, overriding the model's; `--input-shape`.
    pub input_shape: Option<Vec<usize>>,
    /// Batch size for a symbolic or overridden first axis (default 1).
    pub batch: Option<usize>,
    /// Graph inputs bound to constant values (models that feed weights as inputs).
    pub bind: HashMap<String, Tensor>,
}

/// Default-domain opsets whose semantics of the supported ops are implemented.
pub const OPSETS: std::ops::RangeInclusive<i64> = 7..=24;

/// Ops that may appear on activations.
pub const NETWORK_OPS: &[&str] = &[
    "Conv",
    "BatchNormalization",
    "Relu",
    "LeakyRelu",
    "Clip",
    "HardSwish",
    "HardSigmoid",
    "Sigmoid",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Concat",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Flatten",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Gemm",
    "MatMul",
    "Softmax",
    "Identity",
    "Dropout",
    "Constant",
    "Pad",
];

/// Ops accepted only where they fold to constants (shape computations).
pub const CONST_OPS: &[&str] = &[
    "Shape",
    "Size",
    "Gather",
    "Slice",
    "Cast",
    "ConstantOfShape",
    "Range",
    "Neg",
    "Floor",
    "Ceil",
    "Sqrt",
    "Equal",
    "Where",
    "Transpose",
];

/// Decodes one ONNX TensorProto (weights, test data) into a constant tensor.
pub fn tensor_from_proto(t: &pb::TensorProto) -> Result<Tensor, Error> {
    proto::tensor(t).map_err(|e| Error::Input(format!("tensor '{}': {e}", t.name)))
}

/// Reads and imports an ONNX file. Errors name the file.
pub fn import_path(path: &Path, opts: &ImportOptions) -> Result<Graph, Error> {
    let label = path.display().to_string();
    let bytes =
        std::fs::read(path).map_err(|e| Error::Input(format!("{label}: cannot read: {e}")))?;
    import_bytes(&bytes, opts).map_err(|e| e.context(&label))
}

/// Decodes a model proto, rejecting what is not an ONNX model.
pub fn decode(bytes: &[u8]) -> Result<pb::ModelProto, Error> {
    if bytes.is_empty() {
        return Err(Error::Input("empty file, not an ONNX model".into()));
    }
    let model = pb::ModelProto::decode(bytes)
        .map_err(|e| Error::Input(format!("not an ONNX model (protobuf decode failed: {e})")))?;
    match &model.graph {
        Some(g) if model.ir_version > 0 && !g.node.is_empty() => Ok(model),
        _ => Err(Error::Input(
            "not an ONNX model (no ir_version or no graph nodes)".into(),
        )),
    }
}

pub fn import_bytes(bytes: &[u8], opts: &ImportOptions) -> Result<Graph, Error> {
    import_model(&decode(bytes)?, opts)
}

/// Every node whose op is not supported, as `'name' (Op)`.
pub fn unsupported_ops(model: &pb::ModelProto) -> Vec<String> {
    let Some(g) = &model.graph else { return vec![] };
    g.node
        .iter()
        .enumerate()
        .filter(|(_, n)| {
            let std_domain = n.domain.is_empty() || n.domain == "ai.onnx";
            !std_domain
                || !(NETWORK_OPS.contains(&n.op_type.as_str())
                    || CONST_OPS.contains(&n.op_type.as_str()))
        })
        .map(|(i, n)| {
            let op = if n.domain.is_empty() {
                n.op_type.clone()
            } else {
                format!("{}:{}", n.domain, n.op_type)
            };
            format!("'{}' ({op})", n.display_name(i))
        })
        .collect()
}

pub fn import_model(model: &pb::ModelProto, opts: &ImportOptions) -> Result<Graph, Error> {
    let unsupported = unsupported_ops(model);
    if !unsupported.is_empty() {
        return Err(Error::Input(format!(
            "unsupported ops: {}",
            unsupported.join(", ")
        )));
    }
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(1);
    if !OPSETS.contains(&opset) {
        return Err(Error::Input(format!(
            "opset {opset} is not supported (supported: {}..={})",
            OPSETS.start(),
            OPSETS.end()
        )));
    }
    let g = model
        .graph
        .as_ref()
        .ok_or_else(|| Error::Input("model has no graph".into()))?;
    let mut b = Builder {
        graph: Graph {
            values: vec![],
            nodes: vec![],
            inputs: vec![],
            outputs: vec![],
            opset,
        },
        env: HashMap::new(),
        padded: HashMap::new(),
    };

    for init in &g.initializer {
        let t = proto::tensor(init)
            .map_err(|e| Error::Input(format!("initializer '{}': {e}", init.name)))?;
        check_finite(&init.name, &t)?;
        b.env.insert(init.name.clone(), Val::Const(t));
    }
    for (name, t) in &opts.bind {
        b.env.insert(name.clone(), Val::Const(t.clone()));
    }
    let dyn_inputs: Vec<&pb::ValueInfoProto> = g
        .input
        .iter()
        .filter(|i| !b.env.contains_key(&i.name))
        .collect();
    if opts.input_shape.is_some() && dyn_inputs.len() != 1 {
        return Err(Error::Input(format!(
            "--input-shape needs a single-input model; this one has {}",
            dyn_inputs.len()
        )));
    }
    for (k, vi) in dyn_inputs.into_iter().enumerate() {
        // The batch applies to the first input; others keep their declared shapes.
        let batch = if k == 0 { opts.batch } else { None };
        let shape = input_shape(vi, opts.input_shape.as_deref(), batch)?;
        let id = b.value(&vi.name, shape);
        b.graph.inputs.push(id);
        b.env.insert(vi.name.clone(), Val::Dyn(id));
    }
    for (i, n) in g.node.iter().enumerate() {
        let name = n.display_name(i);
        b.node(n, &name)
            .map_err(|e| e.context(&format!("node '{name}' ({})", n.op_type)))?;
    }
    for o in &g.output {
        match b.env.get(&o.name) {
            Some(Val::Dyn(id)) => b.graph.outputs.push(*id),
            Some(Val::Const(_)) => {
                return Err(Error::Input(format!(
                    "output '{}' is a constant, not computed from the input",
                    o.name
                )))
            }
            None => {
                return Err(Error::Input(format!(
                    "output '{}' is produced by no node",
                    o.name
                )))
            }
        }
    }
    fuse::activations(&mut b.graph);
    b.graph.prune();
    crate::graph::fold::constants(&mut b.graph);
    b.graph.prune();
    Ok(b.graph)
}

fn check_finite(name: &str, t: &Tensor) -> Result<(), Error> {
    match t.first_non_finite() {
        Some(i) => Err(Error::Input(format!(
            "tensor '{name}' holds a non-finite value (NaN or Inf) at index {i}"
        ))),
        None => Ok(()),
    }
}

fn input_shape(
    vi: &pb::ValueInfoProto,
    overridden: Option<&[usize]>,
    batch: Option<usize>,
) -> Result<Vec<usize>, Error> {
    use pb::tensor_shape_proto::dimension::Value as D;
    use pb::type_proto::Value as T;
    let Some(T::TensorType(tt)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(Error::Input(format!("input '{}' is not a tensor", vi.name)));
    };
    if tt.elem_type != pb::tensor_proto::DataType::Float as i32 {
        return Err(Error::Input(format!(
            "input '{}' has element type {}, only float32 inputs are supported",
            vi.name,
            proto::type_name(tt.elem_type)
        )));
    }
    if let Some(s) = overridden {
        if s.contains(&0) {
            return Err(Error::Input(format!(
                "--input-shape {s:?} has a zero dimension"
            )));
        }
        return Ok(s.to_vec());
    }
    let dims = tt.shape.as_ref().map(|s| s.dim.as_slice()).unwrap_or(&[]);
    if dims.is_empty() {
        return Err(Error::Input(format!(
            "input '{}' has no shape; pass --input-shape",
            vi.name
        )));
    }
    // Exporters mark a dynamic batch as -1 (paddle2onnx), 0, a name or nothing: all mean "any",
    // and the compiled artifact runs one sample at a time. Elsewhere the size must be known.
    let declared = declared_shape(dims);
    let mut shape = Vec::new();
    for (axis, d) in dims.iter().enumerate() {
        shape.push(match &d.value {
            Some(D::DimValue(v)) if *v > 0 => {
                if axis == 0 {
                    batch.unwrap_or(*v as usize)
                } else {
                    *v as usize
                }
            }
            _ if axis == 0 => batch.unwrap_or(1),
            _ => {
                let example: Vec<String> = dims
                    .iter()
                    .enumerate()
                    .map(|(a, d)| match &d.value {
                        Some(D::DimValue(v)) if *v > 0 => v.to_string(),
                        _ if a == 0 => "1".into(),
                        _ => "N".into(),
                    })
                    .collect();
                return Err(Error::Input(format!(
                    "input '{}' is declared {declared}: axis {axis} has no fixed size; \
                     pass --input-shape {} with the size the model is deployed at",
                    vi.name,
                    example.join(",")
                )));
            }
        });
    }
    checked_numel(&vi.name, shape)
}

/// A declared input shape as the user sees it: `[-1, 3, ?, ?]`, named dims by name.
fn declared_shape(dims: &[pb::tensor_shape_proto::Dimension]) -> String {
    use pb::tensor_shape_proto::dimension::Value as D;
    let parts: Vec<String> = dims
        .iter()
        .map(|d| match &d.value {
            Some(D::DimValue(v)) => v.to_string(),
            Some(D::DimParam(p)) if !p.is_empty() => p.clone(),
            _ => "?".into(),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

/// Inputs beyond 2^31 elements are refused up front: every later size computation can then
/// multiply dimensions without overflow.
fn checked_numel(name: &str, shape: Vec<usize>) -> Result<Vec<usize>, Error> {
    match shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) {
        Some(n) if n <= 1 << 31 => Ok(shape),
        _ => Err(Error::Input(format!(
            "input '{name}' shape {shape:?} is too large"
        ))),
    }
}

#[derive(Debug, Clone)]
enum Val {
    Const(Tensor),
    Dyn(ValueId),
}

struct Builder {
    graph: Graph,
    env: HashMap<String, Val>,
    /// Outputs of zero Pads (exporters' "same" padding): the unpadded value and the pads
    /// (top, left, bottom, right); only a Conv may read them, as its own padding.
    padded: HashMap<String, (ValueId, [usize; 4])>,
}

/// The most elements an activation or folded constant may hold (2^28: 1 GiB of f32).
pub(crate) const MAX_ELEMENTS: usize = 1 << 28;

fn bad<T>(msg: impl Into<String>) -> Result<T, Error> {
    Err(Error::Input(msg.into()))
}

/// Resolves a possibly negative axis against a rank.
fn axis(a: i64, rank: usize) -> Result<usize, Error> {
    let r = rank as i64;
    let x = if a < 0 { a + r } else { a };
    if (0..r).contains(&x) {
        Ok(x as usize)
    } else {
        bad(format!("axis {a} out of range for rank {rank}"))
    }
}

impl Builder {
    fn value(&mut self, name: &str, shape: Vec<usize>) -> ValueId {
        self.graph.values.push(Value {
            name: name.to_string(),
            shape,
        });
        self.graph.values.len() - 1
    }

    fn input(&self, n: &pb::NodeProto, i: usize) -> Result<Option<Val>, Error> {
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

    fn required(&self, n: &pb::NodeProto, i: usize) -> Result<Val, Error> {
        self.input(n, i)?
            .ok_or_else(|| Error::Input(format!("missing input {i}")))
    }

    fn constant(&self, n: &pb::NodeProto, i: usize, what: &str) -> Result<Option<Tensor>, Error> {
        match self.input(n, i)? {
            None => Ok(None),
            Some(Val::Const(t)) => Ok(Some(t)),
            Some(Val::Dyn(_)) => bad(format!("{what} (input {i}) must be a constant initializer")),
        }
    }

    fn emit(
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
            Some(n) if n <= MAX_ELEMENTS => {}
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

    fn set_output(&mut self, n: &pb::NodeProto, v: Val) -> Result<(), Error> {
        let out = n
            .output
            .first()
            .ok_or_else(|| Error::Input("node has no output".into()))?;
        self.env.insert(out.clone(), v);
        Ok(())
    }

    /// Extra outputs (BN's training outputs, MaxPool's indices, Dropout's mask) are outside
    /// the supported semantics when anything names them.
    fn single_output(&self, n: &pb::NodeProto) -> Result<(), Error> {
        if n.output.iter().skip(1).any(|o| !o.is_empty()) {
            return bad(format!(
                "only the first output is supported, node has {}",
                n.output.len()
            ));
        }
        Ok(())
    }

    fn node(&mut self, n: &pb::NodeProto, name: &str) -> Result<(), Error> {
        let op = n.op_type.as_str();
        let a = Attrs(&n.attribute);
        if op == "Constant" {
            let t = proto::constant_attr(&a)?;
            check_finite(&n.output.first().cloned().unwrap_or_default(), &t)?;
            return self.set_output(n, Val::Const(t));
        }
        if op == "Shape" || op == "Size" {
            let shape = match self.required(n, 0)? {
                Val::Const(t) => t.shape,
                Val::Dyn(v) => self.graph.values[v].shape.clone(),
            };
            let t = if op == "Size" {
                Tensor::i64(vec![], vec![shape.iter().product::<usize>() as i64])
            } else {
                consts::shape_of(&shape, a.int("start", 0), a.opt_int("end"))
            };
            return self.set_output(n, Val::Const(t));
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
        if CONST_OPS.contains(&op) {
            return bad(
                "only supported in constant (shape) computations, here it reads an activation",
            );
        }
        let x = match self.required(n, 0)? {
            Val::Dyn(v) => v,
            Val::Const(_) if matches!(op, "Add" | "Mul" | "Sub" | "Div" | "Concat") => usize::MAX,
            Val::Const(_) => return bad("input 0 must be an activation, found a constant"),
        };
        let xs = if x == usize::MAX {
            vec![]
        } else {
            self.graph.values[x].shape.clone()
        };
        match op {
            "Identity" => self.set_output(n, Val::Dyn(x)),
            "Dropout" => {
                self.single_output(n)?;
                if let Some(t) = self.constant(n, 2, "training_mode")? {
                    if t.to_i64().iter().any(|&v| v != 0) {
                        return bad("training-mode Dropout is not supported");
                    }
                }
                if self.graph.opset < 7 && a.int("is_test", 0) == 0 {
                    return bad("training-mode Dropout is not supported");
                }
                self.set_output(n, Val::Dyn(x))
            }
            "Relu" => self.emit(n, name, Op::Relu, vec![x], xs),
            "Sigmoid" => self.emit(n, name, Op::Sigmoid, vec![x], xs),
            "HardSwish" => self.emit(n, name, Op::HardSwish, vec![x], xs),
            "LeakyRelu" => self.emit(
                n,
                name,
                Op::LeakyRelu {
                    alpha: a.float("alpha", 0.01),
                },
                vec![x],
                xs,
            ),
            "HardSigmoid" => {
                let op = Op::HardSigmoid {
                    alpha: a.float("alpha", 0.2),
                    beta: a.float("beta", 0.5),
                };
                self.emit(n, name, op, vec![x], xs)
            }
            "Clip" => {
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
                            Some(t) => {
                                bad(format!("min/max must be scalars, got shape {:?}", t.shape))
                            }
                        }
                    };
                    (
                        scalar(self.constant(n, 1, "min")?, f32::NEG_INFINITY)?,
                        scalar(self.constant(n, 2, "max")?, f32::INFINITY)?,
                    )
                };
                self.emit(n, name, Op::Clip { min, max }, vec![x], xs)
            }
            "Add" | "Sub" | "Mul" | "Div" => self.binary(n, name, op),
            "Concat" => {
                let mut ids = Vec::new();
                for i in 0..n.input.len() {
                    match self.required(n, i)? {
                        Val::Dyn(v) => ids.push(v),
                        Val::Const(_) => {
                            return bad(
                                "concatenating a constant with activations is not supported",
                            )
                        }
                    }
                }
                let first = self.graph.values[ids[0]].shape.clone();
                let ax = axis(a.int("axis", 0), first.len())?;
                let mut out = first.clone();
                out[ax] = 0;
                for &v in &ids {
                    let s = &self.graph.values[v].shape;
                    if s.len() != first.len()
                        || s.iter().enumerate().any(|(i, &d)| i != ax && d != first[i])
                    {
                        return bad(format!(
                            "input shapes {first:?} and {s:?} do not concatenate on axis {ax}"
                        ));
                    }
                    out[ax] += s[ax];
                }
                self.emit(n, name, Op::Concat { axis: ax }, ids, out)
            }
            "Conv" => self.conv(n, name, x, &xs, &a),
            "Pad" => self.pad(n, x, &xs, &a),
            "BatchNormalization" => self.batchnorm(n, name, x, &xs, &a),
            "MaxPool" | "AveragePool" => self.pool(n, name, x, &xs, &a),
            "GlobalAveragePool" => {
                if xs.len() < 3 {
                    return bad(format!("input must have spatial axes, got shape {xs:?}"));
                }
                let mut out = xs.clone();
                out[2..].iter_mut().for_each(|d| *d = 1);
                self.emit(n, name, Op::GlobalAvgPool, vec![x], out)
            }
            "Flatten" | "Reshape" | "Squeeze" | "Unsqueeze" => {
                let shape_in = self.constant(n, 1, "shape/axes")?;
                let out = consts::reshape_target(op, &a, &xs, shape_in.as_ref(), self.graph.opset)?;
                self.emit(n, name, Op::Reshape, vec![x], out)
            }
            "Gemm" => self.gemm(n, name, x, &xs, &a),
            "MatMul" => {
                let b = self
                    .constant(n, 1, "B")?
                    .ok_or_else(|| Error::Input("missing input 1".into()))?;
                let out = matmul_shape(&xs, &b.shape, false)?;
                self.emit(
                    n,
                    name,
                    Op::MatMul {
                        b: Tensor::f32(b.shape.clone(), b.to_f32()),
                        bias: None,
                        trans_a: false,
                    },
                    vec![x],
                    out,
                )
            }
            "Softmax" => {
                let default = if self.graph.opset < 13 { 1 } else { -1 };
                let ax = axis(a.int("axis", default), xs.len())?;
                self.emit(
                    n,
                    name,
                    Op::Softmax {
                        axis: ax,
                        coerce_2d: self.graph.opset < 13,
                    },
                    vec![x],
                    xs,
                )
            }
            _ => bad("no lowering for this op on activations"),
        }
    }

    fn binary(&mut self, n: &pb::NodeProto, name: &str, op: &str) -> Result<(), Error> {
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

    fn conv(
        &mut self,
        n: &pb::NodeProto,
        name: &str,
        x: ValueId,
        xs: &[usize],
        a: &Attrs,
    ) -> Result<(), Error> {
        if xs.len() != 4 {
            return bad(format!(
                "only 2-D convolution (4-D NCHW input) is supported, input shape is {xs:?}"
            ));
        }
        let w = self
            .constant(n, 1, "weight")?
            .ok_or_else(|| Error::Input("missing weight".into()))?;
        let bias = self.constant(n, 2, "bias")?;
        if w.shape.len() != 4 || w.shape.contains(&0) {
            return bad(format!(
                "weight must be 4-D and non-empty, got {:?}",
                w.shape
            ));
        }
        let groups = a.int("group", 1);
        let (o, ci) = (w.shape[0], w.shape[1]);
        if groups < 1
            || !xs[1].is_multiple_of(groups as usize)
            || !o.is_multiple_of(groups as usize)
            || xs[1] / groups as usize != ci
        {
            return bad(format!(
                "group {groups} does not fit input channels {} and weight {:?}",
                xs[1], w.shape
            ));
        }
        if let Some(ks) = a.ints("kernel_shape") {
            if ks != [w.shape[2] as i64, w.shape[3] as i64] {
                return bad(format!(
                    "kernel_shape {ks:?} does not match weight {:?}",
                    w.shape
                ));
            }
        }
        if let Some(b) = &bias {
            if b.len() != o {
                return bad(format!(
                    "bias has {} values for {o} output channels",
                    b.len()
                ));
            }
        }
        let kernel = [w.shape[2], w.shape[3]];
        // A zero Pad before the conv: the window runs over the padded input.
        let extra = n
            .input
            .first()
            .and_then(|s| self.padded.get(s))
            .map_or([0; 4], |p| p.1);
        let hw = [xs[2] + extra[0] + extra[2], xs[3] + extra[1] + extra[3]];
        let (strides, dilations, mut pads, out_hw) = spatial(a, &hw, kernel, false)?;
        for (p, e) in pads.iter_mut().zip(extra) {
            *p += e;
        }
        let conv = Conv {
            weight: Tensor::f32(w.shape.clone(), w.to_f32()),
            bias: bias.map(|b| b.to_f32()),
            strides,
            dilations,
            pads,
            groups: groups as usize,
        };
        self.emit(
            n,
            name,
            Op::Conv(conv),
            vec![x],
            vec![xs[0], o, out_hw[0], out_hw[1]],
        )
    }

    /// A constant-mode Pad with value 0 over the spatial axes of a 4-D activation: recorded
    /// for the Conv that reads it (see [`Builder::padded`]).
    fn pad(&mut self, n: &pb::NodeProto, x: ValueId, xs: &[usize], a: &Attrs) -> Result<(), Error> {
        let mode = a.string("mode").unwrap_or_else(|| "constant".into());
        if mode != "constant" {
            return bad(format!(
                "Pad mode '{mode}' is not supported (only constant zeros)"
            ));
        }
        let (pads, value) = if self.graph.opset < 11 {
            (a.ints("pads").unwrap_or_default(), a.float("value", 0.0))
        } else {
            if self.input(n, 3)?.is_some() {
                return bad("Pad with an axes input is not supported");
            }
            let pads = self
                .constant(n, 1, "pads")?
                .ok_or_else(|| Error::Input("missing pads".into()))?
                .to_i64();
            let value = match self.constant(n, 2, "constant_value")? {
                Some(t) if t.len() == 1 => t.to_f32()[0],
                Some(t) => return bad(format!("constant_value of shape {:?}", t.shape)),
                None => 0.0,
            };
            (pads, value)
        };
        if xs.len() != 4 || pads.len() != 8 {
            return bad(format!(
                "only a Pad of a 4-D NCHW activation is supported (input {xs:?}, pads {pads:?})"
            ));
        }
        if value != 0.0 || pads.iter().any(|&p| p < 0) || [0, 1, 4, 5].iter().any(|&i| pads[i] != 0)
        {
            return bad(format!(
                "only zero padding of the spatial axes is supported (pads {pads:?}, value {value})"
            ));
        }
        if pads.iter().any(|&p| p > 1 << 15) {
            return bad(format!("pads {pads:?} are too large"));
        }
        self.single_output(n)?;
        let out = n
            .output
            .first()
            .ok_or_else(|| Error::Input("node has no output".into()))?;
        let p = |i: usize| pads[i] as usize;
        self.padded
            .insert(out.clone(), (x, [p(2), p(3), p(6), p(7)]));
        Ok(())
    }

    fn batchnorm(
        &mut self,
        n: &pb::NodeProto,
        name: &str,
        x: ValueId,
        xs: &[usize],
        a: &Attrs,
    ) -> Result<(), Error> {
        self.single_output(n)?;
        if a.int("training_mode", 0) != 0 {
            return bad("training-mode BatchNormalization is not supported");
        }
        if xs.len() < 2 {
            return bad(format!("input must be at least 2-D, got {xs:?}"));
        }
        let c = xs[1];
        let get = |i: usize, what: &str| -> Result<Vec<f32>, Error> {
            let t = self
                .constant(n, i, what)?
                .ok_or_else(|| Error::Input(format!("missing {what}")))?;
            if t.len() != c {
                return bad(format!("{what} has {} values for {c} channels", t.len()));
            }
            Ok(t.to_f32())
        };
        let (scale, bias, mean, var) = (
            get(1, "scale")?,
            get(2, "bias")?,
            get(3, "mean")?,
            get(4, "var")?,
        );
        if let Some(i) = var.iter().position(|&v| v < 0.0) {
            let tname = n.input.get(4).cloned().unwrap_or_default();
            return bad(format!(
                "variance '{tname}' is negative ({}) at channel {i}",
                var[i]
            ));
        }
        let eps = a.float("epsilon", 1e-5);
        if !(eps >= 0.0 && eps.is_finite()) {
            return bad(format!("epsilon {eps} is invalid"));
        }
        let bn = BatchNorm {
            mean,
            var,
            scale,
            bias,
            eps,
        };
        self.emit(n, name, Op::BatchNorm(bn), vec![x], xs.to_vec())
    }

    fn pool(
        &mut self,
        n: &pb::NodeProto,
        name: &str,
        x: ValueId,
        xs: &[usize],
        a: &Attrs,
    ) -> Result<(), Error> {
        self.single_output(n)?;
        if xs.len() != 4 {
            return bad(format!(
                "only 2-D pooling (4-D NCHW input) is supported, input shape is {xs:?}"
            ));
        }
        let k = a
            .ints("kernel_shape")
            .ok_or_else(|| Error::Input("missing kernel_shape".into()))?;
        if k.len() != 2 || k.iter().any(|&v| v < 1) {
            return bad(format!("kernel_shape {k:?} must hold two positive values"));
        }
        let kernel = [k[0] as usize, k[1] as usize];
        if a.int("storage_order", 0) != 0 {
            return bad("storage_order=1 is not supported");
        }
        let ceil = a.int("ceil_mode", 0) != 0;
        let (strides, dilations, pads, out_hw) = spatial(a, &xs[2..], kernel, ceil)?;
        let kind = if n.op_type == "MaxPool" {
            PoolKind::Max
        } else {
            PoolKind::Avg
        };
        let pool = Pool {
            kind,
            kernel,
            strides,
            dilations,
            pads,
            count_include_pad: a.int("count_include_pad", 0) != 0,
        };
        self.emit(
            n,
            name,
            Op::Pool(pool),
            vec![x],
            vec![xs[0], xs[1], out_hw[0], out_hw[1]],
        )
    }

    fn gemm(
        &mut self,
        n: &pb::NodeProto,
        name: &str,
        x: ValueId,
        xs: &[usize],
        a: &Attrs,
    ) -> Result<(), Error> {
        if xs.len() != 2 {
            return bad(format!("A must be 2-D, got {xs:?}"));
        }
        let b = self
            .constant(n, 1, "B")?
            .ok_or_else(|| Error::Input("missing B".into()))?;
        if b.shape.len() != 2 {
            return bad(format!("B must be 2-D, got {:?}", b.shape));
        }
        let (alpha, beta) = (a.float("alpha", 1.0), a.float("beta", 1.0));
        let trans_a = a.int("transA", 0) != 0;
        let mut bv: Vec<f32> = b.to_f32().iter().map(|v| v * alpha).collect();
        let (mut k, mut nn) = (b.shape[0], b.shape[1]);
        if a.int("transB", 0) != 0 {
            bv = (0..k * nn).map(|i| bv[(i % k) * nn + i / k]).collect();
            std::mem::swap(&mut k, &mut nn);
        }
        let (m, ka) = if trans_a {
            (xs[1], xs[0])
        } else {
            (xs[0], xs[1])
        };
        if ka != k {
            return bad(format!("A {xs:?} and B {:?} do not multiply", b.shape));
        }
        let bias = match self.constant(n, 2, "C")? {
            None => None,
            Some(c) => {
                if crate::graph::broadcast_shape(&c.shape, &[m, nn]).as_deref()
                    != Some(&[m, nn][..])
                {
                    return bad(format!("C {:?} does not broadcast to ({m}, {nn})", c.shape));
                }
                Some(Tensor::f32(
                    c.shape.clone(),
                    c.to_f32().iter().map(|v| v * beta).collect(),
                ))
            }
        };
        let op = Op::MatMul {
            b: Tensor::f32(vec![k, nn], bv),
            bias,
            trans_a,
        };
        self.emit(n, name, op, vec![x], vec![m, nn])
    }
}

/// Strides, dilations, resolved pads (top, left, bottom, right) and output size of a conv
/// or pool window.
type Window = ([usize; 2], [usize; 2], [usize; 4], [usize; 2]);

fn spatial(a: &Attrs, hw: &[usize], kernel: [usize; 2], ceil: bool) -> Result<Window, Error> {
    let two = |name: &str| -> Result<[usize; 2], Error> {
        match a.ints(name) {
            None => Ok([1, 1]),
            Some(v) if v.len() == 2 && v.iter().all(|&x| x >= 1) => {
                Ok([v[0] as usize, v[1] as usize])
            }
            Some(v) => bad(format!("{name} {v:?} must hold two positive values")),
        }
    };
    let (strides, dilations) = (two("strides")?, two("dilations")?);
    // The device format holds window geometry in u16 fields; beyond them a model is malformed.
    let limit = u16::MAX as usize;
    if kernel.iter().any(|&k| k == 0 || k > limit)
        || strides.iter().chain(&dilations).any(|&v| v > limit)
    {
        return bad(format!(
            "kernel {kernel:?}, strides {strides:?} and dilations {dilations:?} must lie in 1..={limit}"
        ));
    }
    if let Some(p) = a.ints("pads") {
        if p.iter().any(|&v| v > limit as i64) {
            return bad(format!(
                "pads {p:?} exceed {limit}, the device format's limit"
            ));
        }
    }
    let auto_pad = a.string("auto_pad").unwrap_or_else(|| "NOTSET".into());
    let mut pads = [0usize; 4];
    let mut out = [0usize; 2];
    for i in 0..2 {
        let extent = dilations[i] * (kernel[i] - 1) + 1;
        match auto_pad.as_str() {
            "NOTSET" => {
                if let Some(p) = a.ints("pads") {
                    if p.len() != 4 || p.iter().any(|&v| v < 0) {
                        return bad(format!("pads {p:?} must hold four non-negative values"));
                    }
                    pads[i] = p[i] as usize;
                    pads[i + 2] = p[i + 2] as usize;
                }
                let span = hw[i] + pads[i] + pads[i + 2];
                if span < extent {
                    return bad(format!(
                        "window of extent {extent} does not fit the padded input {span}"
                    ));
                }
                out[i] = if ceil {
                    (span - extent).div_ceil(strides[i]) + 1
                } else {
                    (span - extent) / strides[i] + 1
                };
                // A window that would start inside the right padding is dropped (ceil mode).
                if ceil && (out[i] - 1) * strides[i] >= hw[i] + pads[i] {
                    out[i] -= 1;
                }
            }
            "VALID" => {
                if hw[i] < extent {
                    return bad(format!(
                        "window of extent {extent} does not fit the input {}",
                        hw[i]
                    ));
                }
                out[i] = if ceil {
                    (hw[i] - extent).div_ceil(strides[i]) + 1
                } else {
                    (hw[i] - extent) / strides[i] + 1
                };
            }
            "SAME_UPPER" | "SAME_LOWER" => {
                out[i] = hw[i].div_ceil(strides[i]);
                let total = ((out[i] - 1) * strides[i] + extent).saturating_sub(hw[i]);
                let (small, big) = (total / 2, total - total / 2);
                if auto_pad == "SAME_UPPER" {
                    (pads[i], pads[i + 2]) = (small, big);
                } else {
                    (pads[i], pads[i + 2]) = (big, small);
                }
            }
            other => return bad(format!("auto_pad '{other}' is not valid")),
        }
    }
    Ok((strides, dilations, pads, out))
}

/// Output shape of `A·B` (numpy matmul with batch broadcasting).
fn matmul_shape(a: &[usize], b: &[usize], trans_a: bool) -> Result<Vec<usize>, Error> {
    if a.len() < 2 || b.len() < 2 {
        return bad(format!(
            "MatMul operands must be at least 2-D, got {a:?} and {b:?}"
        ));
    }
    let (m, k) = if trans_a {
        (a[a.len() - 1], a[a.len() - 2])
    } else {
        (a[a.len() - 2], a[a.len() - 1])
    };
    if k != b[b.len() - 2] {
        return bad(format!("shapes {a:?} and {b:?} do not multiply"));
    }
    let mut out = crate::graph::broadcast_shape(&a[..a.len() - 2], &b[..b.len() - 2])
        .ok_or_else(|| Error::Input(format!("batch axes of {a:?} and {b:?} do not broadcast")))?;
    out.extend([m, b[b.len() - 1]]);
    Ok(out)
}
