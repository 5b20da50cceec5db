//! NNEF for the packed-integer graph: the `diffdfq` tract-nnef registry and `.nnef.tgz` archives.
//!
//! Each [`PackedOp`] becomes `diffdfq_<kind>(inputs, record, tensors, pool)`: `inputs` the code
//! tensors it reads, `record` its `.dfq` parameter record and `tensors` the 32-byte records of
//! its inputs and output, both as byte arrays (exact: a scale travels as its bits), and `pool`
//! a `u8` variable with its packed weights, requantizations or table (absent when empty). The
//! boundaries are `diffdfq_quantize(input, tensor)` and `diffdfq_dequantize(input, tensor)`.
//! Loading rebuilds the ops through [`PackedOp::new`], which validates them as the runtime's
//! loader would.

use std::sync::Arc;

use diffdfq_runtime::format::{OpKind, TENSOR_RECORD_LEN};
use tract_nnef::internal::*;
use tract_nnef::ser::array;

use super::ops::{kind_name, DequantizeOp, PackedOp, QuantizeOp, TensorBytes, KINDS};
use crate::Error;

/// The registry's name (the archive's `extension tract_registry diffdfq;`).
pub const REGISTRY: &str = "diffdfq";

fn primitive(kind: OpKind) -> String {
    format!("diffdfq_{}", kind_name(kind))
}

/// The `diffdfq` registry: serializers and loaders for the packed-integer ops.
pub fn registry() -> Registry {
    let mut r = Registry::new(REGISTRY)
        .with_doc("diffdfq packed-integer ops: .dfq op records run by diffdfq-runtime's kernels");
    for kind in KINDS {
        r.register_primitive(
            primitive(kind),
            &[
                TypeName::Scalar.tensor().array().named("inputs"),
                TypeName::Integer.array().named("record"),
                TypeName::Integer.array().named("tensors"),
                TypeName::Scalar.tensor().named("pool").default(false),
            ],
            &[("output", TypeName::Scalar.tensor())],
            load_packed,
        );
    }
    r.register_dumper(dump_packed);
    for (name, load) in [
        ("diffdfq_quantize", load_quantize as ToTract),
        ("diffdfq_dequantize", load_dequantize),
    ] {
        r.register_primitive(
            name,
            &[
                TypeName::Scalar.tensor().named("input"),
                TypeName::Integer.array().named("tensor"),
            ],
            &[("output", TypeName::Scalar.tensor())],
            load,
        );
    }
    r.register_dumper(dump_quantize);
    r.register_dumper(dump_dequantize);
    r
}

/// The NNEF framework with our registry.
pub fn framework() -> tract_nnef::framework::Nnef {
    tract_nnef::nnef().with_registry(registry())
}

fn bytes_value(b: &[u8]) -> RValue {
    array(b.iter().map(|&v| numeric(v)).collect::<Vec<_>>())
}

fn bytes_arg(
    builder: &mut ModelBuilder,
    inv: &ResolvedInvocation,
    name: &str,
) -> TractResult<Vec<u8>> {
    let v: TVec<i64> = inv.named_arg_as(builder, name)?;
    v.iter()
        .map(|&b| u8::try_from(b).map_err(|_| format_err!("`{name}': {b} is not a byte")))
        .collect()
}

fn tensor_records(b: &[u8]) -> TractResult<Vec<TensorBytes>> {
    ensure!(
        b.len().is_multiple_of(TENSOR_RECORD_LEN),
        "tensor records of {} bytes",
        b.len()
    );
    b.chunks_exact(TENSOR_RECORD_LEN)
        .map(|c| TensorBytes::try_from(c).map_err(|_| format_err!("tensor record")))
        .collect()
}

fn input_of(ast: &IntoAst, node: &TypedNode, i: usize) -> TractResult<Arc<RValue>> {
    let o = node.inputs.get(i).context("missing input")?;
    ast.mapping
        .get(o)
        .cloned()
        .context("input not serialized yet")
}

fn dump_packed(
    ast: &mut IntoAst,
    node: &TypedNode,
    op: &PackedOp,
) -> TractResult<Option<Arc<RValue>>> {
    let inputs = (0..node.inputs.len())
        .map(|i| input_of(ast, node, i).map(|v| (*v).clone()))
        .collect::<TractResult<Vec<_>>>()?;
    let tensors: Vec<u8> = op.tensors.concat();
    let mut attrs = vec![
        ("inputs", array(inputs)),
        ("record", bytes_value(&op.record)),
        ("tensors", bytes_value(&tensors)),
    ];
    if !op.pool.is_empty() {
        let pool = Tensor::from_shape(&[op.pool.len()], &op.pool)?.into_arc_tensor();
        let v = ast.konst_variable(format!("{}_pool", node.name), &pool)?;
        attrs.push(("pool", (*v).clone()));
    }
    Ok(Some(invocation(primitive(op.kind), &[], &attrs)))
}

fn load_packed(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let id = &inv.invocation.id.0;
    let kind = KINDS
        .into_iter()
        .find(|&k| primitive(k) == *id)
        .with_context(|| format!("unknown op {id}"))?;
    let inputs: TVec<OutletId> = inv.named_arg_as(builder, "inputs")?;
    let record = bytes_arg(builder, inv, "record")?;
    let tensors = tensor_records(&bytes_arg(builder, inv, "tensors")?)?;
    let pool: Vec<u8> = match inv.optional_named_arg_as::<Arc<Tensor>>(builder, "pool")? {
        Some(t) => t.try_as_plain_ram()?.as_slice::<u8>()?.to_vec(),
        None => Vec::new(),
    };
    let op = PackedOp::new(kind, record, Arc::from(pool), tensors)?;
    builder.wire(op, &inputs)
}

fn boundary_tensor(
    builder: &mut ModelBuilder,
    inv: &ResolvedInvocation,
) -> TractResult<TensorBytes> {
    let t = tensor_records(&bytes_arg(builder, inv, "tensor")?)?;
    ensure!(t.len() == 1, "one tensor record expected");
    t.into_iter().next().context("no tensor record")
}

fn dump_boundary(
    ast: &mut IntoAst,
    node: &TypedNode,
    name: &str,
    tensor: &TensorBytes,
) -> TractResult<Option<Arc<RValue>>> {
    let input = input_of(ast, node, 0)?;
    Ok(Some(invocation(
        name,
        &[input],
        &[("tensor", bytes_value(tensor))],
    )))
}

fn dump_quantize(
    ast: &mut IntoAst,
    node: &TypedNode,
    op: &QuantizeOp,
) -> TractResult<Option<Arc<RValue>>> {
    dump_boundary(ast, node, "diffdfq_quantize", &op.tensor)
}

fn dump_dequantize(
    ast: &mut IntoAst,
    node: &TypedNode,
    op: &DequantizeOp,
) -> TractResult<Option<Arc<RValue>>> {
    dump_boundary(ast, node, "diffdfq_dequantize", &op.tensor)
}

fn load_quantize(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let input: OutletId = inv.named_arg_as(builder, "input")?;
    let tensor = boundary_tensor(builder, inv)?;
    builder.wire(QuantizeOp { tensor }, &[input])
}

fn load_dequantize(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let input: OutletId = inv.named_arg_as(builder, "input")?;
    let tensor = boundary_tensor(builder, inv)?;
    builder.wire(DequantizeOp { tensor }, &[input])
}

/// The graph as a gzipped NNEF archive, byte-identical from run to run (fixed timestamps).
pub fn to_tgz(model: &TypedModel) -> Result<Vec<u8>, Error> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let gz = framework()
        .write_to_tar_with_config(model, gz, false, true)
        .map_err(|e| Error::Internal(format!("writing NNEF: {e:#}")))?;
    gz.finish()
        .map_err(|e| Error::Internal(format!("writing NNEF: {e}")))
}

/// Loads an NNEF archive (tar or tgz) written by [`to_tgz`]; anything else is bad input.
pub fn from_bytes(bytes: &[u8]) -> Result<TypedModel, Error> {
    use std::io::Read;
    use tract_nnef::prelude::Framework;
    // Inflate the whole stream first: gzip's CRC-32 and length trailer are checked only at
    // its end, which the tar reader may never reach.
    let mut inflated = Vec::new();
    let tar = if bytes.starts_with(&[0x1f, 0x8b]) {
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut inflated)
            .map_err(|e| Error::Input(format!("not a diffdfq NNEF archive: {e}")))?;
        &inflated[..]
    } else {
        bytes
    };
    framework().model_for_read(&mut &*tar).map_err(|e| {
        let why = format!("{e:#}").replace('\n', " ");
        Error::Input(format!("not a diffdfq NNEF archive: {why}"))
    })
}
