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

mod builder;
mod consts;
mod conv;
mod elementwise;
mod linear;
mod ops;
mod pool;
mod proto;
mod shapes;
mod structure;
mod window;

pub use ops::{const_ops, network_ops, OpSpec, OPS};

use std::collections::HashMap;
use std::path::Path;

use prost::Message;
use tract_onnx::pb;

use crate::graph::{fuse, Graph, Tensor};
use crate::Error;
use builder::{Builder, Val};
use proto::NodeExt;
use shapes::input_shape;

/// The most elements an activation or folded constant may hold (2^28: 1 GiB of f32).
pub(crate) const MAX_ELEMENTS: usize = 1 << 28;
/// The importer's memory cap: the most elements a model's activations (batch 1) and folded
/// constants may hold together (2^29: 2 GiB of f32). Checked as each is made, so a small file
/// asking for more is refused before it is allocated.
pub const MAX_TOTAL_ELEMENTS: usize = 1 << 29;

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
            !std_domain || ops::lookup(&n.op_type).is_none()
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
        held: 0,
    };

    for init in &g.initializer {
        let t = proto::tensor(init)
            .map_err(|e| Error::Input(format!("initializer '{}': {e}", init.name)))?;
        check_finite(&init.name, &t)?;
        if b.env.insert(init.name.clone(), Val::Const(t)).is_some() {
            return Err(Error::Input(format!(
                "initializer '{}' is defined more than once",
                init.name
            )));
        }
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
        let at = |e: Error| e.context(&format!("node '{name}' ({})", n.op_type));
        // Values are single-assignment: a second producer would silently replace the first.
        if let Some(o) = n
            .output
            .iter()
            .find(|o| !o.is_empty() && b.env.contains_key(*o))
        {
            return Err(at(Error::Input(format!(
                "value '{o}' is produced more than once"
            ))));
        }
        b.node(n, &name).map_err(at)?;
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

pub(super) fn check_finite(name: &str, t: &Tensor) -> Result<(), Error> {
    match t.first_non_finite() {
        Some(i) => Err(Error::Input(format!(
            "tensor '{name}' holds a non-finite value (NaN or Inf) at index {i}"
        ))),
        None => Ok(()),
    }
}
