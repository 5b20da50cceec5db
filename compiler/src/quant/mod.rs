//! The QuantGraph: the network after BN folding and activation fusion, with the quantization
//! every layer and every stored tensor ships with.
//!
//! Lowering ([`crate::lower`]) consumes it; calibration methods produce it: [`fold`] builds the
//! float structure (folded weights and biases, fused ReLU/ReLU6), then a method fills in the
//! weight codes ([`QLayer::set_weights`] / [`QLayer::quantize_rtn`]) and the activation
//! quantization of every tensor ([`QTensor::quant`]). [`rtn::quantize`] is the data-free
//! round-to-nearest method; DiffDFQ/Genie will overwrite codes, scales and activation steps of
//! the same structure.

mod chain;
mod fakequant;
mod fold;
mod layer;
pub mod qmodel;
pub mod ranges;
pub mod rtn;

use crate::graph::ValueId;
use crate::Error;

pub use diffdfq_runtime::format::Activation;
pub use diffdfq_runtime::kernels::{ConvGeom, PoolGeom};
use diffdfq_runtime::numerics::code_max;

pub use diffdfq_runtime::numerics::Fused;

/// The activation a fused clamp stands for (the runtime applies it as output code bounds).
pub fn fused_activation(f: Fused) -> Option<Activation> {
    match f {
        Fused::None => None,
        Fused::Relu => Some(Activation::Relu),
        Fused::Relu6 => Some(Activation::Relu6),
    }
}
pub use fold::{fold, fold_keeping};
pub use layer::{lp_clip, QLayer};

/// Index into [`QuantGraph::tensors`].
pub type TensorId = usize;

/// Per-tensor asymmetric activation quantization: `x ≈ scale·(a − zero)`, `a ∈ [0, 2^bits − 1]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActQuant {
    /// 8 or 4.
    pub bits: u8,
    pub scale: f32,
    pub zero: u8,
}

impl ActQuant {
    /// Min–max quantization of the float range `[lo, hi]`, widened to contain 0 so that 0 has
    /// an exact code (zero padding, ReLU clamps). A range starting at 0 gives `zero = 0`: the
    /// whole unsigned range after ReLU/ReLU6.
    pub fn from_range(lo: f32, hi: f32, bits: u8) -> ActQuant {
        let max = code_max(bits) as f32;
        let lo = lo.min(0.0);
        let hi = hi.max(0.0).max(lo + 1e-6);
        let scale = (hi - lo) / max;
        let zero = (-lo / scale).round().clamp(0.0, max) as u8;
        ActQuant { bits, scale, zero }
    }

    /// The float interval the codes cover.
    pub fn range(&self) -> (f32, f32) {
        let max = code_max(self.bits) as f32;
        (
            -self.scale * self.zero as f32,
            self.scale * (max - self.zero as f32),
        )
    }
}

/// A tensor the runtime stores (codes in the arena), or the `f32` output of a final Softmax.
#[derive(Debug, Clone, PartialEq)]
pub struct QTensor {
    pub name: String,
    /// NCHW (or (N, F)), batch 1.
    pub shape: Vec<usize>,
    /// The value of the source [`Graph`] this tensor holds (after fused activations).
    pub source: ValueId,
    pub quant: ActQuant,
    /// `f32` (only the output of a final Softmax).
    pub is_f32: bool,
    /// Per-channel statistics of this tensor itself, from a BatchNorm that reads it and was
    /// absorbed by the layer after it (Keras's BN after ReLU): its running mean and standard
    /// deviation. Such a BN also leaves the pools and reshapes between it and that layer
    /// working on the values before it, so their `source` names a value the BN produced.
    pub stats: Option<BnOutStats>,
}

impl QTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Per-channel mean and standard deviation of a layer's pre-activation output implied by its
/// folded BatchNorm (the BN output is `beta + gamma·x̂` with `x̂` standardized by the running
/// statistics).
#[derive(Debug, Clone, PartialEq)]
pub struct BnOutStats {
    /// The folded BatchNorm's index in the source graph's nodes.
    pub node: usize,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Per-channel factor the layer's output carries on top of the BN's ([`fold`]'s
    /// equalization before a depthwise conv): `mean` and `std` include it, the source
    /// graph's BN does not. Empty when every factor is 1.
    pub gain: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum QOp {
    Conv {
        geom: ConvGeom,
        layer: QLayer,
        fused: Fused,
    },
    /// FullyConnected over the flattened input.
    Linear {
        layer: QLayer,
        fused: Fused,
    },
    Add {
        fused: Fused,
    },
    Mul {
        fused: Fused,
    },
    /// Output quantization equals the input's (the runtime compares codes).
    MaxPool {
        geom: PoolGeom,
    },
    AvgPool {
        geom: PoolGeom,
        count_include_pad: bool,
    },
    GlobalAvgPool,
    Concat {
        axis: usize,
    },
    /// Same codes, same quantization; the output may alias the input.
    Reshape,
    /// A 256-entry table on codes.
    Act(Activation),
    /// Final softmax over the last axis; `f32` output.
    Softmax,
}

impl QOp {
    /// Re-rounds a depthwise conv whose every row reads one input channel (`C_in/groups = 1`)
    /// mean-neutral ([`QLayer::preserve_row_sums`]); any other op is left as it is. Returns how
    /// many codes moved.
    pub fn round_depthwise_rows_mean_neutral(&mut self) -> usize {
        match self {
            QOp::Conv { geom, layer, .. }
                if geom.groups > 1 && layer.k == geom.kernel_h * geom.kernel_w =>
            {
                layer.preserve_row_sums()
            }
            _ => 0,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            QOp::Conv { geom, layer, .. } if geom.groups > 1 && geom.groups == layer.c_out => {
                "DepthwiseConv"
            }
            QOp::Conv { .. } => "Conv",
            QOp::Linear { .. } => "FullyConnected",
            QOp::Add { .. } => "Add",
            QOp::Mul { .. } => "Mul",
            QOp::MaxPool { .. } => "MaxPool",
            QOp::AvgPool { .. } => "AvgPool",
            QOp::GlobalAvgPool => "GlobalAvgPool",
            QOp::Concat { .. } => "Concat",
            QOp::Reshape => "Reshape",
            QOp::Act(a) => a.name(),
            QOp::Softmax => "Softmax",
        }
    }

    pub fn layer(&self) -> Option<&QLayer> {
        match self {
            QOp::Conv { layer, .. } | QOp::Linear { layer, .. } => Some(layer),
            _ => None,
        }
    }

    pub fn layer_mut(&mut self) -> Option<&mut QLayer> {
        match self {
            QOp::Conv { layer, .. } | QOp::Linear { layer, .. } => Some(layer),
            _ => None,
        }
    }

    /// The activation fused into the op's output clamp.
    pub fn fused(&self) -> Fused {
        match self {
            QOp::Conv { fused, .. }
            | QOp::Linear { fused, .. }
            | QOp::Add { fused }
            | QOp::Mul { fused } => *fused,
            _ => Fused::None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct QNode {
    /// The source node's name (the conv's, for a conv with folded BN and fused activation).
    pub name: String,
    pub op: QOp,
    pub inputs: Vec<TensorId>,
    pub output: TensorId,
    /// Multiply-accumulates (batch 1).
    pub macs: u64,
    /// Statistics of the pre-activation output implied by the folded BN, if one was folded.
    pub bn: Option<BnOutStats>,
}

/// Bit widths of a quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bits {
    /// Weights of every conv/linear but the first and the last: 2, 3, 4 or 8.
    pub weight: u8,
    /// Activations: 8 or 4. The model input and output tensors stay at 8 (see [`fold`]).
    pub act: u8,
    /// Weights of the first and the last conv/linear (docs/design.md §3; default 8).
    pub first_last: u8,
}

impl Default for Bits {
    fn default() -> Self {
        Bits {
            weight: 4,
            act: 8,
            first_last: 8,
        }
    }
}

impl Bits {
    pub fn check(&self) -> Result<(), Error> {
        let wb = diffdfq_runtime::format::WEIGHT_BITS;
        if !wb.contains(&self.weight) || !wb.contains(&self.first_last) {
            return Err(Error::Input(format!(
                "weight bits {} / first-last bits {}: supported are 2, 3, 4, 8",
                self.weight, self.first_last
            )));
        }
        if self.act != 8 && self.act != 4 {
            return Err(Error::Input(format!(
                "activation bits {}: supported are 8 and 4",
                self.act
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct QuantGraph {
    pub tensors: Vec<QTensor>,
    /// Execution order.
    pub nodes: Vec<QNode>,
    pub input: TensorId,
    pub output: TensorId,
    pub bits: Bits,
    /// The interval real inputs lie in, taken as mean ± 3σ by the data-free statistics
    /// (`rtn`): `±3` for normalized inputs, or what `--input-range` says.
    pub input_range: (f32, f32),
}

impl QuantGraph {
    /// The Conv nodes whose output only the activation table right after them reads: the
    /// runtime runs each such pair as one Conv with a table (the `.dfq` format's *Conv with an
    /// activation table*, `runtime/src/format/mod.rs`), so that pre-activation is never
    /// stored.
    pub fn fused_act_convs(&self) -> Vec<usize> {
        // How many times each tensor is read, counted once for the whole graph.
        let mut readers = vec![0usize; self.tensors.len()];
        for n in &self.nodes {
            for &x in &n.inputs {
                readers[x] += 1;
            }
        }
        (0..self.nodes.len().saturating_sub(1))
            .filter(|&i| {
                let (n, m) = (&self.nodes[i], &self.nodes[i + 1]);
                let t = n.output;
                matches!(n.op, QOp::Conv { .. })
                    && matches!(m.op, QOp::Act(_))
                    && m.inputs == [t]
                    && t != self.output
                    && !self.tensors[t].is_f32
                    && !self.tensors[m.output].is_f32
                    && readers[t] == 1
            })
            .collect()
    }

    /// Keeps every layer's worst-case accumulator inside the runtime's `i32` bound
    /// (`K·max|q − z_c|·max|a − z| + |bias| ≤ 2^31 − 1`, checked at load). A channel whose
    /// folded weights are (nearly) all zero while its bias is not — dead ReLU channels after BN
    /// folding — gets a tiny weight scale, and its bias in accumulator units `b/(s_c·s_x)`
    /// overflows. Its scale is raised until the bias takes at most half the headroom and its
    /// codes re-rounded from the weights they stood for; those weights move by at most half the
    /// new step, a contribution of under `K·a_span/2^30` of the bias. Returns how many channels
    /// moved.
    pub fn fit_accumulators(&mut self) -> usize {
        let mut moved = 0;
        for i in 0..self.nodes.len() {
            let x = self.tensors[self.nodes[i].inputs[0]].quant;
            let Some(l) = self.nodes[i].op.layer_mut() else {
                continue;
            };
            if !l.is_quantized() {
                continue;
            }
            let (amax, qmax) = (code_max(x.bits) as f64, code_max(l.bits) as f64);
            let z = x.zero as f64;
            let a_span = z.max(amax - z);
            for c in 0..l.c_out {
                let zc = l.zeros[c] as f64;
                let worst = l.k as f64 * zc.max(qmax - zc) * a_span;
                let budget = (i32::MAX as f64 - worst) / 2.0;
                let s = l.scales[c] as f64;
                let b = l.bias[c].abs() as f64;
                if budget <= 0.0 || b / (s * x.scale as f64) <= budget {
                    continue;
                }
                let s_new = (b / (x.scale as f64 * budget) * 1.001) as f32;
                for q in &mut l.codes[c * l.k..(c + 1) * l.k] {
                    let w = s * (*q as f64 - zc);
                    *q = ((w / s_new as f64).round() + zc).clamp(0.0, qmax) as u8;
                }
                l.scales[c] = s_new;
                moved += 1;
            }
        }
        moved
    }

    /// Indices of the conv/linear nodes, in order.
    /// Gives the conv/linear layers, in graph order, the weight bits `bits` (one per layer).
    pub fn set_layer_bits(&mut self, bits: &[u8]) -> Result<(), Error> {
        let layers: Vec<usize> = self.layers().collect();
        if layers.len() != bits.len() {
            return Err(Error::Input(format!(
                "--layer-bits: {} widths for {} conv/linear layers",
                bits.len(),
                layers.len()
            )));
        }
        for (i, &b) in layers.into_iter().zip(bits) {
            if !diffdfq_runtime::format::WEIGHT_BITS.contains(&b) {
                return Err(Error::Input(format!(
                    "--layer-bits: {b} bits for '{}'; supported are 2, 3, 4, 8",
                    self.nodes[i].name
                )));
            }
            if let Some(l) = self.nodes[i].op.layer_mut() {
                l.bits = b;
            }
        }
        Ok(())
    }

    pub fn layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.op.layer().is_some())
            .map(|(i, _)| i)
    }

    /// The node writing tensor `t`.
    pub fn producer(&self, t: TensorId) -> Option<usize> {
        self.nodes.iter().position(|n| n.output == t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn act_quant_is_unsigned_after_relu_and_exact_at_zero() {
        let q = ActQuant::from_range(0.0, 6.0, 8);
        assert_eq!(q.zero, 0);
        assert_eq!(q.range(), (0.0, 6.0));
        let q = ActQuant::from_range(-1.0, 3.0, 4);
        assert_eq!((q.bits, q.zero), (4, 4));
        let (lo, hi) = q.range();
        // Same width; the ends move by less than a step so that 0 lands on a code.
        assert!((hi - lo - 4.0).abs() < 1e-5);
        assert!((lo + 1.0).abs() <= q.scale / 2.0 + 1e-6, "{lo}");
    }
}
