//! The packed-integer tract graph: a `.dfq` model as a tract `TypedModel` (`f32` in, `f32` out)
//! whose layers are [`ops::PackedOp`]s holding their packed weights, between a
//! [`ops::QuantizeOp`] at the input and a [`ops::DequantizeOp`] at the output (none after a
//! final Softmax).
//!
//! Why built from the `.dfq` and not beside it from the `QuantGraph`: the blob is what ships, so
//! the graph is built from exactly those records (decoded by the runtime's loader) and each op
//! evaluates through the runtime's own dispatcher. Graph, `.dfq` and device then cannot
//! disagree, which the tests check byte for byte on both fixtures at every bit width.
//! [`nnef`] saves the graph as an NNEF archive with a `diffdfq` registry and loads it back.

pub mod nnef;
pub mod ops;

use std::collections::HashMap;
use std::sync::Arc;

use diffdfq_runtime::format::Model;
use tract_nnef::internal::*;

use crate::Error;
use ops::{kind_name, self_contained, tensor_bytes, DequantizeOp, PackedOp, QuantizeOp};

/// The tract graph of a `.dfq` blob; a blob the runtime rejects is bad input.
pub fn from_dfq(blob: &[u8]) -> Result<TypedModel, Error> {
    let model = Model::from_bytes(blob)
        .map_err(|e| Error::Input(format!("not a valid .dfq model: {e}")))?;
    build(&model).map_err(|e| Error::Internal(format!("building the tract graph: {e:#}")))
}

fn build(m: &Model<'_>) -> TractResult<TypedModel> {
    let rt = |e: diffdfq_runtime::Error| format_err!("{e}");
    let mut g = TypedModel::default();
    let input = m.input();
    let shape: Vec<usize> = input.shape().iter().map(|&d| d as usize).collect();
    let src = g.add_source("input", f32::fact(&shape))?;
    let q = QuantizeOp {
        tensor: tensor_bytes(input),
    };
    let mut wires: HashMap<u16, OutletId> = HashMap::new();
    wires.insert(m.input_id(), g.wire_node("quantize", q, &[src])?[0]);
    for rec in m.ops() {
        let rec = rec.map_err(rt)?;
        let (record, pool) = self_contained(&m.decode(&rec).map_err(rt)?)?;
        let mut tensors = Vec::with_capacity(rec.inputs.len() + 1);
        let mut inputs = Vec::with_capacity(rec.inputs.len());
        for id in rec.inputs.iter() {
            tensors.push(tensor_bytes(&m.tensor(id).map_err(rt)?));
            inputs.push(*wires.get(&id).context("an op reads an unwritten tensor")?);
        }
        tensors.push(tensor_bytes(&m.tensor(rec.output).map_err(rt)?));
        let op = PackedOp::new(rec.kind, record, Arc::from(pool), tensors)?;
        let name = format!("op{}_{}", rec.index, kind_name(rec.kind));
        wires.insert(rec.output, g.wire_node(name, op, &inputs)?[0]);
    }
    let out = m.output();
    let mut y = *wires
        .get(&m.output_id())
        .context("the output is never written")?;
    if out.dtype.is_code() {
        let dq = DequantizeOp {
            tensor: tensor_bytes(out),
        };
        y = g.wire_node("dequantize", dq, &[y])?[0];
    }
    g.select_output_outlets(&[y])?;
    Ok(g)
}

/// Runs a graph (one input, one output, batch 1) on each sample of `data`, `per_in` values a
/// sample; returns the outputs back to back.
pub fn run_samples(model: &TypedModel, data: &[f32]) -> Result<Vec<f32>, Error> {
    let run = || -> TractResult<Vec<f32>> {
        let fact = model.input_fact(0)?;
        let shape: Vec<usize> = fact
            .shape
            .as_concrete()
            .context("the graph input has no concrete shape")?
            .to_vec();
        let per_in: usize = shape.iter().product();
        ensure!(
            per_in > 0 && data.len().is_multiple_of(per_in),
            "{} values are not whole samples of shape {shape:?}",
            data.len()
        );
        let plan = model.clone().into_runnable()?;
        let mut out = Vec::new();
        for x in data.chunks_exact(per_in) {
            let y = plan.run(tvec!(Tensor::from_shape(&shape, x)?.into_tvalue()))?;
            let y = y.first().context("the graph has no output")?;
            out.extend_from_slice(y.try_as_plain_ram()?.as_slice::<f32>()?);
        }
        Ok(out)
    };
    run().map_err(|e| Error::Internal(format!("tract: {e:#}")))
}
