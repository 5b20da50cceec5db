//! Lowering: QuantGraph → `.dfq` blob through the runtime's own writer
//! ([`diffdfq_runtime::format::ModelBuilder`]), with arena offsets from [`plan`].
//!
//! The blob's tensor ids are the QuantGraph's tensor indices, and ops keep the QuantGraph's
//! order, so the same QuantGraph always gives the same bytes.

pub mod plan;

use diffdfq_runtime::format::{DType, Layer, ModelBuilder};
use diffdfq_runtime::kernels::{conv_scratch_len_for, Isa};

use crate::quant::{ActQuant, QOp, QuantGraph};
use crate::Error;

/// One op of the lowered model, for reports.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerInfo {
    pub name: String,
    /// Op kind (`Conv`, `DepthwiseConv`, `FullyConnected`, `Add`, …).
    pub op: String,
    pub out_shape: Vec<usize>,
    /// Weight bits of a conv/linear.
    pub weight_bits: Option<u8>,
    /// Bits of the output codes (32 for an `f32` Softmax output).
    pub act_bits: u8,
    /// False for a Conv that runs fused with the table after it: its codes never reach the
    /// arena.
    pub stored: bool,
    /// Bytes of weights shipped: packed code rows + 24-byte channel records (0 without weights).
    pub weight_bytes: usize,
    /// Bytes of the same (folded) weights and biases in FP32.
    pub fp32_bytes: usize,
    pub macs: u64,
}

/// A lowered model: the `.dfq` blob and what emitters and reports need to know about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Lowered {
    pub blob: Vec<u8>,
    /// Arena bytes the model needs (tensors + scratch).
    pub arena_size: usize,
    /// Largest sum of simultaneously live tensor bytes, plus the scratch region.
    pub arena_lower_bound: usize,
    /// Sum of all stored tensors' bytes plus scratch: the arena without reuse.
    pub arena_no_reuse: usize,
    pub scratch_size: usize,
    /// Batch 1.
    pub input_shape: Vec<usize>,
    pub output_shape: Vec<usize>,
    /// Quantization of the input codes.
    pub input_quant: ActQuant,
    /// Quantization of the output codes; `None` when the output is the `f32` of a Softmax.
    pub output_quant: Option<ActQuant>,
    pub layers: Vec<LayerInfo>,
}

impl Lowered {
    /// Total shipped weight bytes and their FP32 size.
    pub fn weight_bytes(&self) -> (usize, usize) {
        self.layers
            .iter()
            .fold((0, 0), |(a, b), l| (a + l.weight_bytes, b + l.fp32_bytes))
    }

    pub fn macs(&self) -> u64 {
        self.layers.iter().map(|l| l.macs).sum()
    }
}

fn wl(l: &crate::quant::QLayer) -> Layer<'_> {
    Layer {
        bits: l.bits,
        codes: &l.codes,
        scales: &l.scales,
        zero_points: &l.zeros,
        bias: &l.bias,
    }
}

fn rt(node: &str, e: diffdfq_runtime::Error) -> Error {
    Error::Internal(format!(
        "lowering '{node}': the runtime writer refused it: {e}"
    ))
}

/// The planner's view of `q`'s tensors. The pre-activation of a fused Conv + table
/// ([`QuantGraph::fused_act_convs`]) takes no bytes, and the table's output lives from the
/// Conv on, since the Conv writes it.
pub fn plan_tensors(q: &QuantGraph) -> Vec<plan::PlanTensor> {
    let n_ops = q.nodes.len();
    let mut ts: Vec<plan::PlanTensor> = q
        .tensors
        .iter()
        .map(|t| plan::PlanTensor {
            // 4-bit codes two per byte (the runtime's `TensorInfo::arena_len`).
            size: match (t.is_f32, t.quant.bits) {
                (true, _) => 0,
                (false, 4) => t.numel().div_ceil(2),
                _ => t.numel(),
            },
            first: 0,
            last: 0,
            alias_of: None,
        })
        .collect();
    for (i, n) in q.nodes.iter().enumerate() {
        ts[n.output].first = i;
        ts[n.output].last = ts[n.output].last.max(i);
        for &x in &n.inputs {
            ts[x].last = ts[x].last.max(i);
        }
        if matches!(n.op, QOp::Reshape) {
            ts[n.output].alias_of = Some(n.inputs[0]);
        }
    }
    ts[q.input].first = 0;
    // The output is read back after the last op.
    ts[q.output].last = n_ops;
    for i in q.fused_act_convs() {
        ts[q.nodes[i].output].size = 0;
        ts[q.nodes[i + 1].output].first = i;
    }
    ts
}

/// Lowers a quantized graph to a `.dfq` blob (validated by the runtime's loader), with the
/// least scratch region: what every runtime build needs.
pub fn lower(q: &QuantGraph) -> Result<Lowered, Error> {
    lower_for(q, Isa::Portable)
}

/// [`lower`] for a library whose kernels are `isa`'s: the scratch region also holds what
/// those kernels keep there (x86 AVX2 and up: the weight panel of a convolution over gathered
/// columns, `kernels::conv_scratch_len_for`), so the arena may grow with the CPU chosen.
pub fn lower_for(q: &QuantGraph, isa: Isa) -> Result<Lowered, Error> {
    for n in &q.nodes {
        if let Some(l) = n.op.layer() {
            if !l.is_quantized() {
                return Err(Error::Internal(format!(
                    "lowering '{}': the layer's weights were never quantized",
                    n.name
                )));
            }
        }
    }
    for t in &q.tensors {
        if t.shape.is_empty() || t.shape.len() > 4 || t.shape[0] != 1 {
            return Err(Error::Input(format!(
                "tensor '{}' has shape {:?}: the runtime takes rank 1..4 with batch 1",
                t.name, t.shape
            )));
        }
    }
    let pts = plan_tensors(q);
    let p = plan::plan(&pts)?;
    plan::check(&pts, &p).map_err(|e| Error::Internal(format!("memory plan: {e}")))?;
    let mut scratch = 0;
    for n in &q.nodes {
        if let QOp::Conv { geom, layer, .. } = &n.op {
            let dims = |v: usize| {
                let s = &q.tensors[v].shape;
                let mut d = [1usize; 4];
                d[4 - s.len()..].copy_from_slice(s);
                d
            };
            let len =
                conv_scratch_len_for(isa, geom, dims(n.inputs[0]), dims(n.output), layer.bits)
                    .ok_or_else(|| {
                        Error::Internal(format!(
                            "lowering '{}': shapes do not fit the conv",
                            n.name
                        ))
                    })?;
            scratch = scratch.max(len);
        }
    }
    let u32_of = |v: usize, what: &str| {
        u32::try_from(v).map_err(|_| Error::Input(format!("{what} {v} exceeds the format's u32")))
    };

    // Fused pre-activations are not in the blob: tensor ids skip them.
    let fused = q.fused_act_convs();
    let stored: Vec<bool> = {
        let mut s = vec![true; q.tensors.len()];
        for &i in &fused {
            s[q.nodes[i].output] = false;
        }
        s
    };
    let mut id = vec![0u16; q.tensors.len()];
    let mut next = 0usize;
    for (t, s) in id.iter_mut().zip(&stored) {
        *t = next.min(u16::MAX as usize) as u16;
        next += *s as usize;
    }
    if next > u16::MAX as usize {
        return Err(Error::Input("more tensors than the format holds".into()));
    }
    let mut b = ModelBuilder::new();
    for ((t, &off), _) in q
        .tensors
        .iter()
        .zip(&p.offsets)
        .zip(&stored)
        .filter(|(_, &s)| s)
    {
        let shape = t
            .shape
            .iter()
            .map(|&d| u32_of(d, "dim"))
            .collect::<Result<Vec<_>, _>>()?;
        if t.is_f32 {
            b.tensor(&shape, DType::F32, 1.0, 0);
        } else {
            let dt = if t.quant.bits == 4 {
                DType::U4
            } else {
                DType::U8
            };
            b.tensor_at(
                &shape,
                dt,
                t.quant.scale,
                t.quant.zero,
                u32_of(off, "offset")?,
            );
        }
    }
    b.set_input(id[q.input]);
    b.set_output(id[q.output]);
    let mut layers = Vec::with_capacity(q.nodes.len());
    for (i, n) in q.nodes.iter().enumerate() {
        let (x, y) = (id[n.inputs[0]], id[n.output]);
        let name = n.name.as_str();
        let e = |err| rt(name, err);
        let after_fused = i > 0 && fused.contains(&(i - 1));
        match &n.op {
            // Emitted with the Conv before it.
            QOp::Act(_) if after_fused => {}
            QOp::Conv {
                geom, layer, fused, ..
            } if !stored[n.output] => {
                let QOp::Act(act) = &q.nodes[i + 1].op else {
                    return Err(Error::Internal(format!(
                        "lowering '{name}': no table to fuse"
                    )));
                };
                let pre = q.tensors[n.output].quant;
                let y = id[q.nodes[i + 1].output];
                b.conv_act(
                    x,
                    y,
                    geom,
                    &wl(layer),
                    *fused,
                    (pre.scale, pre.zero, pre.bits),
                    *act,
                )
                .map_err(e)?
            }
            QOp::Conv {
                geom, layer, fused, ..
            } => b.conv(x, y, geom, &wl(layer), *fused).map_err(e)?,
            QOp::Linear { layer, fused } => {
                b.fully_connected(x, y, &wl(layer), *fused).map_err(e)?
            }
            QOp::Add { fused } => b.add(x, id[n.inputs[1]], y, *fused).map_err(e)?,
            QOp::Mul { fused } => b.mul(x, id[n.inputs[1]], y, *fused).map_err(e)?,
            QOp::MaxPool { geom } => {
                if q.tensors[n.inputs[0]].quant != q.tensors[n.output].quant {
                    return Err(Error::Internal(format!(
                        "lowering '{name}': a MaxPool must keep its input's quantization"
                    )));
                }
                b.max_pool(x, y, geom, crate::quant::Fused::None)
                    .map_err(e)?
            }
            QOp::AvgPool {
                geom,
                count_include_pad,
            } => b
                .avg_pool(x, y, geom, *count_include_pad, crate::quant::Fused::None)
                .map_err(e)?,
            QOp::GlobalAvgPool => b
                .global_avg_pool(x, y, crate::quant::Fused::None)
                .map_err(e)?,
            QOp::Concat { axis } => {
                let ins: Vec<u16> = n.inputs.iter().map(|&i| id[i]).collect();
                let axis = u8::try_from(*axis)
                    .map_err(|_| Error::Input(format!("'{name}': concat axis {axis}")))?;
                b.concat(&ins, axis, y).map_err(e)?
            }
            QOp::Reshape => b.reshape(x, y).map_err(e)?,
            QOp::Act(act) => b.activation(x, y, *act).map_err(e)?,
            QOp::Softmax => b.softmax(x, y).map_err(e)?,
        }
        let t = &q.tensors[n.output];
        let l = n.op.layer();
        layers.push(LayerInfo {
            name: n.name.clone(),
            op: n.op.name().to_string(),
            out_shape: t.shape.clone(),
            weight_bits: l.map(|l| l.bits),
            act_bits: if t.is_f32 { 32 } else { t.quant.bits },
            stored: stored[n.output],
            weight_bytes: l.map_or(0, |l| l.packed_bytes()),
            fp32_bytes: l.map_or(0, |l| l.fp32_bytes()),
            macs: n.macs,
        });
    }
    // Ops on 4-bit tensors stage their bands in the scratch region too (the runtime's
    // `bands` module): the region is the larger of the two needs.
    let scratch = scratch.max(b.least_scratch().map_err(|err| {
        Error::Internal(format!("lowering: the runtime rejects the blob: {err}"))
    })?);
    let arena = p.end + scratch;
    b.set_arena(
        u32_of(arena, "arena size")?,
        u32_of(p.end, "scratch offset")?,
        u32_of(scratch, "scratch size")?,
    );
    let blob = b
        .finish()
        .map_err(|err| Error::Internal(format!("lowering: the runtime rejects the blob: {err}")))?;
    let out = &q.tensors[q.output];
    Ok(Lowered {
        blob,
        arena_size: arena,
        arena_lower_bound: p.lower_bound + scratch,
        arena_no_reuse: p.total + scratch,
        scratch_size: scratch,
        input_shape: q.tensors[q.input].shape.clone(),
        output_shape: out.shape.clone(),
        input_quant: q.tensors[q.input].quant,
        output_quant: (!out.is_f32).then_some(out.quant),
        layers,
    })
}
