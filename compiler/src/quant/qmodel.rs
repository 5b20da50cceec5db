//! The QuantGraph on candle: float (the folded network, the reconstruction target) or
//! fake-quantized (what the integer runtime computes, up to requantization rounding), batched
//! and differentiable. Calibration swaps in trainable weights and activation steps per node.

use std::collections::HashMap;
use std::ops::Range;

use candle_core::{Device, Tensor, D};

use super::fakequant::{FakeQuant, LsqQuant};
use diffdfq_runtime::numerics::code_max;

use super::{fused_activation, ActQuant, Fused, QOp, QuantGraph, TensorId};
use crate::graph::{Pool, PoolKind};
use crate::reference::activation;
use crate::reference::pointwise::clamp;
use crate::rng::Rng;
use crate::Error;

/// Float weights of one layer on the device, shaped for its op, and its bias.
struct LayerTensors {
    /// Conv: (C_out, C_in/groups, kh, kw); linear: (C_out, K).
    weight: Tensor,
    /// (1, C_out, 1, 1) or (1, C_out).
    bias: Tensor,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The folded float network: no weight or activation quantization.
    Float,
    /// Dequantized codes and quantized activations.
    Quant,
}

/// Per-run replacements of the graph's own parameters (reconstruction's trainable state).
#[derive(Default)]
pub struct Overrides<'a> {
    /// Node → weight tensor (shaped as the layer's), e.g. AdaRound's soft-rounded weights.
    pub weights: HashMap<usize, Tensor>,
    /// Node → bias (shaped as the layer's), used as is (unrounded) in quantized mode.
    pub bias: HashMap<usize, Tensor>,
    /// Tensor → its activation step as a scalar tensor (LSQ's learned scale).
    pub act_scale: HashMap<TensorId, Tensor>,
    /// QDrop: each quantized activation element falls back to float with probability 0.5.
    pub qdrop: Option<&'a mut Rng>,
}

pub struct QModel {
    pub q: QuantGraph,
    dev: Device,
    float: Vec<Option<LayerTensors>>,
    /// Dequantized weights of the current codes, per node.
    dequant: Vec<Option<Tensor>>,
}

fn weight_shape(op: &QOp) -> Option<Vec<usize>> {
    match op {
        QOp::Conv { geom, layer, .. } => Some(vec![
            layer.c_out,
            layer.k / (geom.kernel_h * geom.kernel_w).max(1),
            geom.kernel_h,
            geom.kernel_w,
        ]),
        QOp::Linear { layer, .. } => Some(vec![layer.c_out, layer.k]),
        _ => None,
    }
}

/// `x` fake-quantized with `aq`; `step` replaces the fixed scale by a (trainable) scalar. The
/// rounding passes gradients straight through, so a trainable step gets LSQ's gradient.
pub fn fake_quant(x: &Tensor, aq: &ActQuant, step: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let max = code_max(aq.bits) as f64;
    let z = aq.zero as f64;
    match step {
        None if x.device().is_cpu() => x.detach().contiguous()?.apply_op1(FakeQuant {
            step: aq.scale,
            zero: aq.zero as f32,
            max: max as f32,
        }),
        None => {
            let s = aq.scale as f64;
            (clamp(&(x.affine(1.0 / s, 0.0)?.round()? + z)?, 0.0, max as f32)? - z)?.affine(s, 0.0)
        }
        Some(s) => {
            let v = x.broadcast_div(s)?;
            let r = (&v + (v.round()? - &v)?.detach())?;
            (clamp(&(r + z)?, 0.0, max as f32)? - z)?.broadcast_mul(s)
        }
    }
}

fn apply_fused(x: Tensor, f: Fused) -> candle_core::Result<Tensor> {
    match fused_activation(f) {
        None => Ok(x),
        Some(a) => activation(&x, a),
    }
}

impl QModel {
    pub fn new(q: QuantGraph, dev: &Device) -> Result<QModel, Error> {
        let mut float = Vec::new();
        for n in &q.nodes {
            float.push(match (&n.op, weight_shape(&n.op)) {
                (QOp::Conv { geom, .. }, _) if geom.dilation_h != geom.dilation_w => {
                    return Err(Error::Input(format!(
                        "node '{}': calibration does not support unequal dilations \
                         ({}×{}); use --method rtn",
                        n.name, geom.dilation_h, geom.dilation_w
                    )))
                }
                (op, Some(shape)) => {
                    let l = op.layer().ok_or_else(|| Error::Internal("layer".into()))?;
                    let bshape: Vec<usize> = if shape.len() == 4 {
                        vec![1, l.c_out, 1, 1]
                    } else {
                        vec![1, l.c_out]
                    };
                    Some(LayerTensors {
                        weight: Tensor::from_vec(l.weight.clone(), shape.as_slice(), dev)?,
                        bias: Tensor::from_vec(l.bias.clone(), bshape.as_slice(), dev)?,
                    })
                }
                _ => None,
            });
        }
        let mut m = QModel {
            dequant: vec![None; q.nodes.len()],
            q,
            dev: dev.clone(),
            float,
        };
        for i in 0..m.q.nodes.len() {
            m.refresh_weights(i)?;
        }
        Ok(m)
    }

    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// Re-reads node `i`'s codes after they changed.
    pub fn refresh_weights(&mut self, i: usize) -> Result<(), Error> {
        let n = &self.q.nodes[i];
        self.dequant[i] = match (n.op.layer(), weight_shape(&n.op)) {
            (Some(l), Some(shape)) if l.is_quantized() => Some(Tensor::from_vec(
                l.dequantized(),
                shape.as_slice(),
                &self.dev,
            )?),
            _ => None,
        };
        Ok(())
    }

    /// The float bias of node `i` (shaped for its op).
    pub fn float_bias(&self, i: usize) -> Option<&Tensor> {
        self.float[i].as_ref().map(|l| &l.bias)
    }

    /// The float weights of node `i` (shaped for its op).
    pub fn float_weight(&self, i: usize) -> Option<&Tensor> {
        self.float[i].as_ref().map(|l| &l.weight)
    }

    /// The graph input, quantized like the runtime's entry when `mode` is [`Mode::Quant`].
    pub fn input(&self, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        match mode {
            Mode::Float => Ok(x.clone()),
            Mode::Quant => fake_quant(x, &self.q.tensors[self.q.input].quant, None),
        }
    }

    /// Whether the runtime re-quantizes the output of node `i` (MaxPool and Reshape pass codes
    /// through; a final Softmax and the f32 logits before it write f32).
    pub fn quantizes_output(&self, i: usize) -> bool {
        let n = &self.q.nodes[i];
        !matches!(n.op, QOp::MaxPool { .. } | QOp::Reshape | QOp::Softmax)
            && !self.q.tensors[n.output].is_f32
    }

    /// Runs the whole graph on a batch.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor, Error> {
        let mut vals = vec![None; self.q.tensors.len()];
        vals[self.q.input] = Some(self.input(x, mode)?);
        self.run(
            0..self.q.nodes.len(),
            &mut vals,
            mode,
            &mut Overrides::default(),
            None,
        )?;
        vals[self.q.output]
            .take()
            .ok_or_else(|| Error::Internal("output not computed".into()))
    }

    /// Runs `nodes` over `vals` (indexed by tensor id; inputs present, outputs filled in).
    /// `taps` collects the pre-activation output of every layer with a folded BN.
    pub fn run(
        &self,
        nodes: Range<usize>,
        vals: &mut [Option<Tensor>],
        mode: Mode,
        ov: &mut Overrides<'_>,
        mut taps: Option<&mut Vec<(usize, Tensor)>>,
    ) -> Result<(), Error> {
        for i in nodes {
            let n = &self.q.nodes[i];
            let get = |k: usize| -> Result<&Tensor, Error> {
                vals[n.inputs[k]].as_ref().ok_or_else(|| {
                    Error::Internal(format!("node '{}': input {k} not computed", n.name))
                })
            };
            let x = get(0)?;
            let batch = x.dim(0)?;
            let weight = |i: usize| -> Result<Tensor, Error> {
                if let Some(w) = ov.weights.get(&i) {
                    return Ok(w.clone());
                }
                let w = match mode {
                    Mode::Float => self.float[i].as_ref().map(|l| &l.weight),
                    Mode::Quant => self.dequant[i].as_ref(),
                };
                w.cloned().ok_or_else(|| {
                    Error::Internal(format!("node '{}': weights not quantized", n.name))
                })
            };
            let bias = || -> Result<Tensor, Error> {
                if let (Mode::Quant, Some(b)) = (mode, ov.bias.get(&i)) {
                    return Ok(b.clone());
                }
                let fl = self.float[i]
                    .as_ref()
                    .ok_or_else(|| Error::Internal("bias".into()))?;
                match (mode, n.op.layer()) {
                    (Mode::Quant, Some(l)) if l.is_quantized() => {
                        // The runtime adds the bias in accumulator units `s_c·s_x`, rounded
                        // half away from zero (the writer's channel record).
                        let s_x = self.q.tensors[n.inputs[0]].quant.scale as f64;
                        let b: Vec<f32> = l
                            .bias
                            .iter()
                            .zip(&l.scales)
                            .map(|(&b, &s)| {
                                let acc = s as f64 * s_x;
                                ((b as f64 / acc).round() * acc) as f32
                            })
                            .collect();
                        Ok(Tensor::from_vec(b, fl.bias.dims(), &self.dev)?)
                    }
                    _ => Ok(fl.bias.clone()),
                }
            };
            let mut y = match &n.op {
                QOp::Conv { geom, fused, .. } => {
                    let pre = crate::reference::conv(
                        x,
                        &weight(i)?,
                        &Some(bias()?),
                        &crate::reference::ConvArgs {
                            pads: [geom.pad_top, geom.pad_left, geom.pad_bottom, geom.pad_right],
                            strides: [geom.stride_h, geom.stride_w],
                            dil: geom.dilation_h,
                            groups: geom.groups,
                        },
                    )?;
                    if let (Some(t), Some(_)) = (taps.as_deref_mut(), &n.bn) {
                        t.push((i, pre.clone()));
                    }
                    apply_fused(pre, *fused)?
                }
                QOp::Linear { fused, .. } => {
                    let x2 = x.flatten_from(1)?;
                    let pre = x2.matmul(&weight(i)?.t()?)?.broadcast_add(&bias()?)?;
                    if let (Some(t), Some(_)) = (taps.as_deref_mut(), &n.bn) {
                        t.push((i, pre.clone()));
                    }
                    apply_fused(pre, *fused)?
                }
                QOp::Add { fused } => apply_fused(x.broadcast_add(get(1)?)?, *fused)?,
                QOp::Mul { fused } => apply_fused(x.broadcast_mul(get(1)?)?, *fused)?,
                QOp::MaxPool { geom } | QOp::AvgPool { geom, .. } => {
                    let (kind, cip) = match &n.op {
                        QOp::AvgPool {
                            count_include_pad, ..
                        } => (PoolKind::Avg, *count_include_pad),
                        _ => (PoolKind::Max, false),
                    };
                    let p = Pool::from_geom(kind, geom, cip);
                    let o = &self.q.tensors[n.output].shape;
                    crate::reference::pool::pool2d(x, &p, [o[2], o[3]])?
                }
                QOp::GlobalAvgPool => {
                    let dims: Vec<usize> = (2..x.rank()).collect();
                    x.mean_keepdim(dims.as_slice())?
                }
                QOp::Concat { axis } => {
                    let parts = (0..n.inputs.len())
                        .map(get)
                        .collect::<Result<Vec<_>, _>>()?;
                    Tensor::cat(&parts, *axis)?
                }
                QOp::Reshape => {
                    let mut shape = self.q.tensors[n.output].shape.clone();
                    shape[0] = batch;
                    x.reshape(shape)?
                }
                QOp::Act(a) => activation(x, *a)?,
                QOp::Softmax => candle_nn::ops::softmax(x, D::Minus1)?,
            };
            if mode == Mode::Quant && self.quantizes_output(i) {
                let aq = &self.q.tensors[n.output].quant;
                let step = ov.act_scale.get(&n.output);
                let keep = ov.qdrop.as_deref_mut().map(|rng| rng.coins(y.elem_count()));
                y = match step {
                    Some(s) if self.dev.is_cpu() => y.contiguous()?.apply_op2(
                        s,
                        LsqQuant {
                            zero: aq.zero as f32,
                            max: code_max(aq.bits) as f32,
                            keep,
                        },
                    )?,
                    _ => {
                        let yq = fake_quant(&y, aq, step)?;
                        match keep {
                            Some(coins) => {
                                let n = y.elem_count();
                                let keep = Tensor::from_vec(
                                    Rng::coin_mask(&coins, n),
                                    y.dims(),
                                    &self.dev,
                                )?;
                                (&y + (yq - &y)?.mul(&keep)?)?
                            }
                            None => yq,
                        }
                    }
                };
            }
            vals[n.output] = Some(y);
        }
        Ok(())
    }
}
