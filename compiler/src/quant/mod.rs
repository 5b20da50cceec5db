//! The QuantGraph: the network after BN folding and activation fusion, with the quantization
//! every layer and every stored tensor ships with.
//!
//! Lowering ([`crate::lower`]) consumes it; calibration methods produce it: [`fold`] builds the
//! float structure (folded weights and biases, fused ReLU/ReLU6), then a method fills in the
//! weight codes ([`QLayer::set_weights`] / [`QLayer::quantize_rtn`]) and the activation
//! quantization of every tensor ([`QTensor::quant`]). [`rtn::quantize`] is the data-free
//! round-to-nearest method; DiffDFQ/Genie will overwrite codes, scales and activation steps of
//! the same structure.

mod fakequant;
pub mod qmodel;
pub mod ranges;
pub mod rtn;

use crate::graph::{Graph, Op, PoolKind, ValueId};
use crate::Error;

pub use diffdfq_runtime::format::Activation;
pub use diffdfq_runtime::kernels::{ConvGeom, PoolGeom};
use diffdfq_runtime::numerics::code_max;
pub use diffdfq_runtime::numerics::Fused;

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
        let max = ((1u32 << bits) - 1) as f32;
        let lo = lo.min(0.0);
        let hi = hi.max(0.0).max(lo + 1e-6);
        let scale = (hi - lo) / max;
        let zero = (-lo / scale).round().clamp(0.0, max) as u8;
        ActQuant { bits, scale, zero }
    }

    /// The float interval the codes cover.
    pub fn range(&self) -> (f32, f32) {
        let max = ((1u32 << self.bits) - 1) as f32;
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

/// A conv or linear layer: folded float weights and the codes that ship.
#[derive(Debug, Clone, PartialEq)]
pub struct QLayer {
    /// Output channels (rows).
    pub c_out: usize,
    /// Codes per row: `C_in/groups·kh·kw` (conv, order `[c_in][ky][kx]`) or the input features.
    pub k: usize,
    /// Folded float weights, `c_out × k` row-major.
    pub weight: Vec<f32>,
    /// Folded float bias, `c_out` (zeros when the layer had none).
    pub bias: Vec<f32>,
    /// Weight bits: 2, 3, 4 or 8.
    pub bits: u8,
    /// Per-output-channel scale and zero point: `w ≈ s_c·(q − z_c)`; empty until quantized.
    pub scales: Vec<f32>,
    pub zeros: Vec<u8>,
    /// `c_out × k` codes in `[0, 2^bits − 1]`; empty until quantized.
    pub codes: Vec<u8>,
}

impl QLayer {
    fn new(c_out: usize, k: usize, weight: Vec<f32>, bias: Vec<f32>, bits: u8) -> Self {
        QLayer {
            c_out,
            k,
            weight,
            bias,
            bits,
            scales: Vec::new(),
            zeros: Vec::new(),
            codes: Vec::new(),
        }
    }

    /// Whether codes, scales and zero points are all present with the right sizes.
    pub fn is_quantized(&self) -> bool {
        self.codes.len() == self.c_out * self.k
            && self.scales.len() == self.c_out
            && self.zeros.len() == self.c_out
    }

    /// Sets the codes with given per-channel scales and zero points: `q = clamp(round(w/s) + z)`
    /// (ties away from zero, as the runtime rounds). Calibration uses this after moving scales.
    pub fn set_weights(&mut self, scales: Vec<f32>, zeros: Vec<u8>) -> Result<(), Error> {
        if scales.len() != self.c_out || zeros.len() != self.c_out {
            return Err(Error::Internal(format!(
                "layer with {} channels got {} scales and {} zero points",
                self.c_out,
                scales.len(),
                zeros.len()
            )));
        }
        let max = ((1u32 << self.bits) - 1) as f32;
        let mut codes = Vec::with_capacity(self.c_out * self.k);
        for (c, row) in self.weight.chunks_exact(self.k).enumerate() {
            let (s, z) = (scales[c], zeros[c] as f32);
            codes.extend(
                row.iter()
                    .map(|&w| ((w / s).round() + z).clamp(0.0, max) as u8),
            );
        }
        self.scales = scales;
        self.zeros = zeros;
        self.codes = codes;
        Ok(())
    }

    /// Sets codes chosen elsewhere (AdaRound's rounding decisions) with their scales and zero
    /// points; every code must fit the layer's bits.
    pub fn set_codes(
        &mut self,
        scales: Vec<f32>,
        zeros: Vec<u8>,
        codes: Vec<u8>,
    ) -> Result<(), Error> {
        let max = ((1u32 << self.bits) - 1) as u8;
        if scales.len() != self.c_out
            || zeros.len() != self.c_out
            || codes.len() != self.c_out * self.k
            || codes.iter().chain(&zeros).any(|&c| c > max)
            || scales.iter().any(|s| !(s.is_finite() && *s > 0.0))
        {
            return Err(Error::Internal(format!(
                "{}-bit layer {}×{}: inconsistent codes, scales or zero points",
                self.bits, self.c_out, self.k
            )));
        }
        self.scales = scales;
        self.zeros = zeros;
        self.codes = codes;
        Ok(())
    }

    /// Per-channel scales and zero points minimizing the Lp (p = 2.4) rounding error over
    /// clipping ratios 1.00, 0.99, …, 0.01 of the channel's min–max range (Genie's search),
    /// then round-to-nearest codes.
    pub fn quantize_lp(&mut self) {
        self.quantize_clipped(100);
    }

    /// Per-channel min–max round-to-nearest (asymmetric, the range widened to contain 0 so the
    /// zero point is a code).
    pub fn quantize_rtn(&mut self) {
        self.quantize_clipped(1);
    }

    /// Round-to-nearest with, per channel, the best of the clipping ratios 1.00, 0.99, … (`steps`
    /// of them) of the min–max range by the Lp (p = 2.4) error.
    fn quantize_clipped(&mut self, steps: usize) {
        use rayon::prelude::*;
        let max = ((1u32 << self.bits) - 1) as f32;
        // Rows are independent: one thread per row keeps the result thread-count-free.
        let best: Vec<(f32, u8)> = self
            .weight
            .par_chunks_exact(self.k.max(1))
            .map(|row| {
                let lo = row.iter().fold(0f32, |a, &w| a.min(w));
                let hi = row.iter().fold(0f32, |a, &w| a.max(w));
                let mut best = (f64::INFINITY, 1e-8f32, 0u8);
                for step in 0..steps {
                    let r = 1.0 - step as f32 * 0.01;
                    // An all-zero (or vanishing) row still needs a scale whose requantization
                    // multiplier `s·s_x/s_y` stays inside the runtime's shift range.
                    let s = ((hi - lo) * r / max).max(1e-8);
                    let z = (-lo * r / s).round().clamp(0.0, max);
                    let err: f64 = if steps == 1 {
                        0.0
                    } else {
                        row.iter()
                            .map(|&w| {
                                let q = ((w / s).round() + z).clamp(0.0, max);
                                ((w - s * (q - z)).abs() as f64).powf(2.4)
                            })
                            .sum()
                    };
                    if err < best.0 {
                        best = (err, s, z as u8);
                    }
                }
                (best.1, best.2)
            })
            .collect();
        let (scales, zeros) = best.into_iter().unzip();
        // Sizes match by construction.
        let _ = self.set_weights(scales, zeros);
    }

    /// The weights the codes stand for, `c_out × k`.
    pub fn dequantized(&self) -> Vec<f32> {
        self.codes
            .chunks_exact(self.k.max(1))
            .enumerate()
            .flat_map(|(c, row)| {
                let (s, z) = (self.scales[c], self.zeros[c] as f32);
                row.iter().map(move |&q| s * (q as f32 - z))
            })
            .collect()
    }

    /// Bytes the layer ships: packed code rows plus the 24-byte channel records.
    pub fn packed_bytes(&self) -> usize {
        let row = diffdfq_runtime::format::row_bytes(self.bits, self.k).unwrap_or(0);
        self.c_out * (row + diffdfq_runtime::format::CHANNEL_RECORD_LEN)
    }

    /// Bytes of the same parameters in FP32 (folded weights and bias).
    pub fn fp32_bytes(&self) -> usize {
        4 * (self.weight.len() + self.bias.len())
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
            QOp::Act(Activation::Relu) => "Relu",
            QOp::Act(Activation::Relu6) => "Relu6",
            QOp::Act(Activation::HardSigmoid { .. }) => "HardSigmoid",
            QOp::Act(Activation::HardSwish) => "HardSwish",
            QOp::Act(Activation::Sigmoid) => "Sigmoid",
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

/// The layer that can take the BatchNorm `bn` (node `i`) on its input into its weights, if
/// any: the BN's sole consumer, or the first conv/linear behind a chain of sole-consumer
/// MaxPools and Reshapes. An unpadded conv absorbs `x·a_c + t_c` exactly (padded zeros would
/// have to become `−t_c/a_c`); a MaxPool commutes with it when every `a_c > 0` (a per-channel
/// increasing map keeps the maximum's position); a linear layer behind a flattening Reshape
/// absorbs it per feature (Keras: Conv → ReLU → BN → MaxPool → Conv, and BN → Flatten → Dense).
fn input_affine_target(
    g: &Graph,
    i: usize,
    bn: &crate::graph::BatchNorm,
    sole: &dyn Fn(ValueId) -> Option<usize>,
) -> Option<usize> {
    let c = bn.mean.len();
    let increasing = (0..c).all(|k| bn.scale[k] > 0.0 && bn.var[k] + bn.eps > 0.0);
    let mut v = g.nodes[i].output;
    let mut flattened = false;
    loop {
        let j = sole(v)?;
        match &g.nodes[j].op {
            Op::Conv(conv) => {
                let ok = !flattened
                    && conv.pads == [0; 4]
                    && conv.weight.shape.get(1).map(|ci| ci * conv.groups) == Some(c)
                    && conv.weight.as_f32().is_some();
                return ok.then_some(j);
            }
            Op::MatMul { b, trans_a, .. } => {
                let k = b.shape.first().copied()?;
                let ok = !trans_a && b.shape.len() == 2 && c > 0 && k % c == 0;
                // Features in runs of k/c per channel: the input is (1, C, …) flattened.
                let chw = g.shape(g.nodes[i].output);
                let ok = ok && chw.iter().product::<usize>() == k && chw.get(1) == Some(&c);
                return ok.then_some(j);
            }
            Op::Pool(p) if p.kind == PoolKind::Max && increasing && !flattened => {}
            Op::Reshape => flattened = true,
            _ => return None,
        }
        v = g.nodes[j].output;
    }
}

fn unsupported(node: &str, what: &str) -> Error {
    Error::Input(format!(
        "node '{node}': {what} is not supported by the quantizer"
    ))
}

/// Folds every BatchNorm into the conv/linear before it, fuses ReLU/ReLU6 into the op before
/// them (conv, linear, add, mul) and maps the remaining ops. The layers' codes are left empty
/// and every tensor starts with a quantization over [−1, 1]: a method sets both.
///
/// The model input and output tensors keep 8-bit codes whatever `bits.act` is: like the
/// first and last layers' weights, the boundaries are where low precision costs most, and the
/// input is quantized from f32 anyway.
pub fn fold(g: &Graph, bits: Bits) -> Result<QuantGraph, Error> {
    bits.check()?;
    if g.inputs.len() != 1 || g.outputs.len() != 1 {
        return Err(Error::Input(format!(
            "the model has {} inputs and {} outputs; the quantizer takes one of each",
            g.inputs.len(),
            g.outputs.len()
        )));
    }
    let n_consumers =
        |v: ValueId| g.consumers(v).count() + g.outputs.iter().filter(|&&o| o == v).count();
    // The sole consumer of `v`, if it is exactly one node and `v` is no graph output.
    let sole = |v: ValueId| -> Option<usize> {
        if n_consumers(v) == 1 {
            g.consumers(v).next()
        } else {
            None
        }
    };
    let mut tmap: Vec<Option<TensorId>> = vec![None; g.values.len()];
    let mut tensors: Vec<QTensor> = Vec::new();
    let new_tensor = |v: ValueId, tensors: &mut Vec<QTensor>, bits: u8| {
        tensors.push(QTensor {
            name: g.values[v].name.clone(),
            shape: g.values[v].shape.clone(),
            source: v,
            quant: ActQuant::from_range(-1.0, 1.0, bits),
            is_f32: false,
            stats: None,
        });
        tensors.len() - 1
    };
    let input = new_tensor(g.inputs[0], &mut tensors, 8);
    tmap[g.inputs[0]] = Some(input);
    let mut done = vec![false; g.nodes.len()];
    let mut nodes: Vec<QNode> = Vec::new();
    // BatchNorms that precede a conv or linear layer (Keras writes Conv → ReLU → BN → Conv,
    // see [`input_affine_target`]): the layer reads the BN's input (through the pools and
    // reshapes between) and absorbs `x·a_c + t_c` into its weights and bias.
    let mut input_affine: Vec<Option<(Vec<f32>, Vec<f32>)>> = vec![None; g.nodes.len()];
    for (i, n) in g.nodes.iter().enumerate() {
        if done[i] {
            continue;
        }
        if let Op::BatchNorm(bn) = &n.op {
            if let Some(j) = input_affine_target(g, i, bn, &sole) {
                let mut a: Vec<f32> = (0..bn.mean.len())
                    .map(|c| bn.scale[c] / (bn.var[c] + bn.eps).sqrt())
                    .collect();
                let mut t: Vec<f32> = (0..a.len())
                    .map(|c| bn.bias[c] - a[c] * bn.mean[c])
                    .collect();
                let x = tmap[n.inputs[0]];
                // The scale goes back into the layer that produced the BN's input where it
                // can: `a·ReLU(z) + t = ReLU(a·z) + t` for `a > 0`, and a per-output-channel
                // scale is exact under per-channel weight quantization. Absorbed forward
                // instead, `a_c` would scale the next layer's weights per *input* channel, and
                // a row's range is set by its largest `a_c` (up to 190× the median on the Keras
                // CIFAR-10 model). Only the shift `t` then moves forward.
                let producer = x.and_then(|x| nodes.iter().rposition(|q| q.output == x));
                let back = producer.filter(|&p| {
                    n_consumers(n.inputs[0]) == 1
                        && a.iter().all(|&v| v > 0.0 && v.is_finite())
                        && matches!(nodes[p].op.fused(), Fused::None | Fused::Relu)
                        && nodes[p].op.layer().is_some_and(|l| l.c_out == a.len())
                });
                let mut stats = BnOutStats {
                    node: i,
                    mean: bn.mean.clone(),
                    std: bn.var.iter().map(|v| v.max(0.0).sqrt()).collect(),
                };
                if let Some(p) = back {
                    let node = &mut nodes[p];
                    if let Some(l) = node.op.layer_mut() {
                        for (c, &ac) in a.iter().enumerate() {
                            for w in &mut l.weight[c * l.k..(c + 1) * l.k] {
                                *w *= ac;
                            }
                            l.bias[c] *= ac;
                        }
                    }
                    if let Some(own) = &mut node.bn {
                        for (c, &ac) in a.iter().enumerate() {
                            own.mean[c] *= ac;
                            own.std[c] *= ac;
                        }
                    }
                    for (c, &ac) in a.iter().enumerate() {
                        stats.mean[c] *= ac;
                        stats.std[c] *= ac;
                    }
                    a.iter_mut().for_each(|v| *v = 1.0);
                } else {
                    // A dead channel (ReLU output ≈ its running mean, variance ≈ 0) has a huge
                    // `a_c = γ/√(var + ε)`: absorbed as is, it would set its rows' weight
                    // range and starve every other weight of codes. Its BN output is a
                    // constant, so it becomes that constant (`a_c = 0`), which leaves an error
                    // under 0.1 % of the widest channel's output spread `a·σ`, below one 8-bit
                    // step.
                    let spread: Vec<f32> = (0..a.len())
                        .map(|c| (a[c] * bn.var[c].max(0.0).sqrt()).abs())
                        .collect();
                    let widest = spread.iter().copied().fold(0f32, f32::max);
                    for c in 0..a.len() {
                        if spread[c] <= 1e-3 * widest {
                            t[c] += a[c] * bn.mean[c];
                            a[c] = 0.0;
                        }
                    }
                }
                input_affine[j] = Some((a, t));
                if let Some(x) = x {
                    tensors[x].stats = Some(stats);
                }
                done[i] = true;
                tmap[n.output] = tmap[n.inputs[0]];
                continue;
            }
        }
        done[i] = true;
        let mut out_v = n.output;
        let get = |v: ValueId, tmap: &[Option<TensorId>]| {
            tmap[v].ok_or_else(|| {
                Error::Internal(format!("node '{}': input not produced before", n.name))
            })
        };
        let inputs = n
            .inputs
            .iter()
            .map(|&v| get(v, &tmap))
            .collect::<Result<Vec<_>, _>>()?;
        // Fuses a following ReLU / ReLU6 (the op's sole consumer).
        let take_act = |out_v: &mut ValueId, done: &mut [bool]| -> Fused {
            let Some(j) = sole(*out_v) else {
                return Fused::None;
            };
            let f = match g.nodes[j].op {
                Op::Relu => Fused::Relu,
                Op::Clip { min, max } if min == 0.0 && max == 6.0 => Fused::Relu6,
                Op::Clip { min, max } if min == 0.0 && max == f32::INFINITY => Fused::Relu,
                _ => return Fused::None,
            };
            done[j] = true;
            *out_v = g.nodes[j].output;
            f
        };
        // Folds a following BatchNorm over axis 1 into rows of `layer`.
        let take_bn = |out_v: &mut ValueId, layer: &mut QLayer, done: &mut [bool]| {
            let j = sole(*out_v)?;
            let Op::BatchNorm(bn) = &g.nodes[j].op else {
                return None;
            };
            if bn.mean.len() != layer.c_out {
                return None;
            }
            done[j] = true;
            *out_v = g.nodes[j].output;
            let mut stats = BnOutStats {
                node: j,
                mean: Vec::new(),
                std: Vec::new(),
            };
            for c in 0..layer.c_out {
                let inv = 1.0 / (bn.var[c] + bn.eps).sqrt();
                let a = bn.scale[c] * inv;
                for w in &mut layer.weight[c * layer.k..(c + 1) * layer.k] {
                    *w *= a;
                }
                layer.bias[c] = (layer.bias[c] - bn.mean[c]) * a + bn.bias[c];
                stats.mean.push(bn.bias[c]);
                stats.std.push(a.abs() * bn.var[c].max(0.0).sqrt());
            }
            Some(stats)
        };
        let (op, bn) = match &n.op {
            Op::Conv(c) => {
                let w = c
                    .weight
                    .as_f32()
                    .ok_or_else(|| unsupported(&n.name, "an integer weight"))?;
                let c_out = c.out_channels();
                let k = w.len() / c_out.max(1);
                let mut bias = c.bias.clone().unwrap_or_else(|| vec![0.0; c_out]);
                let mut w = w.to_vec();
                if let Some((a, t)) = &input_affine[i] {
                    // Row o reads input channels g·c_in_g + l of its group g, kh·kw taps each.
                    let taps = c.kernel()[0] * c.kernel()[1];
                    let (c_in_g, c_out_g) = (k / taps, c_out / c.groups);
                    for (o, row) in w.chunks_exact_mut(k).enumerate() {
                        for (l, tap) in row.chunks_exact_mut(taps).enumerate() {
                            let ch = o / c_out_g * c_in_g + l;
                            for v in tap {
                                bias[o] += *v * t[ch];
                                *v *= a[ch];
                            }
                        }
                    }
                }
                let mut layer = QLayer::new(c_out, k, w, bias, bits.weight);
                let bn = take_bn(&mut out_v, &mut layer, &mut done);
                let fused = take_act(&mut out_v, &mut done);
                let [kh, kw] = c.kernel();
                let geom = ConvGeom {
                    kernel_h: kh,
                    kernel_w: kw,
                    stride_h: c.strides[0],
                    stride_w: c.strides[1],
                    dilation_h: c.dilations[0],
                    dilation_w: c.dilations[1],
                    pad_top: c.pads[0],
                    pad_left: c.pads[1],
                    pad_bottom: c.pads[2],
                    pad_right: c.pads[3],
                    groups: c.groups,
                };
                (QOp::Conv { geom, layer, fused }, bn)
            }
            Op::MatMul { b, bias, trans_a } => {
                let a_shape = g.shape(n.inputs[0]);
                if *trans_a || b.shape.len() != 2 || a_shape.len() != 2 || a_shape[0] != 1 {
                    return Err(unsupported(
                        &n.name,
                        "a MatMul other than (1, K)·(K, N) (batched or transposed input)",
                    ));
                }
                let (kk, nn) = (b.shape[0], b.shape[1]);
                let bw = b.to_f32();
                // Rows are output features: the transpose of (K, N).
                let mut w = vec![0f32; kk * nn];
                for r in 0..kk {
                    for c in 0..nn {
                        w[c * kk + r] = bw[r * nn + c];
                    }
                }
                let mut bias = match bias {
                    Some(t) if t.len() == nn => t.to_f32(),
                    Some(_) => return Err(unsupported(&n.name, "a bias not of length N")),
                    None => vec![0.0; nn],
                };
                if let Some((a, t)) = &input_affine[i] {
                    // Feature r of the flattened (1, C, …) input belongs to channel r / (K/C).
                    let per = kk / a.len().max(1);
                    for (o, row) in w.chunks_exact_mut(kk).enumerate() {
                        for (r, v) in row.iter_mut().enumerate() {
                            let ch = r / per.max(1);
                            bias[o] += *v * t[ch];
                            *v *= a[ch];
                        }
                    }
                }
                let mut layer = QLayer::new(nn, kk, w, bias, bits.weight);
                let bn = take_bn(&mut out_v, &mut layer, &mut done);
                let fused = take_act(&mut out_v, &mut done);
                (QOp::Linear { layer, fused }, bn)
            }
            Op::BatchNorm(_) => {
                return Err(Error::Input(format!(
                    "node '{}': a BatchNorm that neither follows a conv or linear layer nor precedes an unpadded conv cannot be folded",
                    n.name
                )))
            }
            Op::Add => (
                QOp::Add {
                    fused: take_act(&mut out_v, &mut done),
                },
                None,
            ),
            Op::Mul => (
                QOp::Mul {
                    fused: take_act(&mut out_v, &mut done),
                },
                None,
            ),
            Op::Relu => (QOp::Act(Activation::Relu), None),
            Op::Clip { min, max } if *min == 0.0 && *max == 6.0 => {
                (QOp::Act(Activation::Relu6), None)
            }
            Op::Clip { min, max } if *min == 0.0 && *max == f32::INFINITY => {
                (QOp::Act(Activation::Relu), None)
            }
            Op::HardSigmoid { alpha, beta } => (
                QOp::Act(Activation::HardSigmoid {
                    alpha: *alpha,
                    beta: *beta,
                }),
                None,
            ),
            Op::HardSwish => (QOp::Act(Activation::HardSwish), None),
            Op::Sigmoid => (QOp::Act(Activation::Sigmoid), None),
            Op::Pool(p) => {
                let geom = PoolGeom {
                    kernel_h: p.kernel[0],
                    kernel_w: p.kernel[1],
                    stride_h: p.strides[0],
                    stride_w: p.strides[1],
                    dilation_h: p.dilations[0],
                    dilation_w: p.dilations[1],
                    pad_top: p.pads[0],
                    pad_left: p.pads[1],
                    pad_bottom: p.pads[2],
                    pad_right: p.pads[3],
                };
                match p.kind {
                    PoolKind::Max => (QOp::MaxPool { geom }, None),
                    PoolKind::Avg => (
                        QOp::AvgPool {
                            geom,
                            count_include_pad: p.count_include_pad,
                        },
                        None,
                    ),
                }
            }
            Op::GlobalAvgPool => (QOp::GlobalAvgPool, None),
            Op::Concat { axis } => (QOp::Concat { axis: *axis }, None),
            Op::Reshape => (QOp::Reshape, None),
            Op::Softmax { axis, .. } => {
                let rank = g.shape(n.output).len();
                if !g.outputs.contains(&n.output) || *axis + 1 != rank {
                    return Err(unsupported(
                        &n.name,
                        "a Softmax other than a last one over the last axis",
                    ));
                }
                (QOp::Softmax, None)
            }
            Op::LeakyRelu { .. } => return Err(unsupported(&n.name, "LeakyRelu")),
            Op::Clip { min, max } => {
                return Err(unsupported(
                    &n.name,
                    &format!("Clip({min}, {max}) (only ReLU and ReLU6 ranges)"),
                ))
            }
            Op::ConstBinary { .. } => {
                return Err(unsupported(
                    &n.name,
                    "arithmetic with a constant outside a conv/linear",
                ))
            }
        };
        let macs = g.macs(n);
        let out_bits = if g.outputs.contains(&out_v) {
            8
        } else {
            bits.act
        };
        let output = new_tensor(out_v, &mut tensors, out_bits);
        tmap[out_v] = Some(output);
        if matches!(op, QOp::Softmax) {
            tensors[output].is_f32 = true;
        }
        nodes.push(QNode {
            name: n.name.clone(),
            op,
            inputs,
            output,
            macs,
            bn,
        });
    }
    let output = tmap[g.outputs[0]]
        .ok_or_else(|| Error::Input("the model output is produced by no node".into()))?;
    mark_f32_logits(&mut tensors, &nodes, output);
    // First and last weight layers at `first_last` bits.
    let layer_nodes: Vec<usize> = nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op.layer().is_some())
        .map(|(i, _)| i)
        .collect();
    for &i in layer_nodes.first().iter().chain(layer_nodes.last().iter()) {
        if let Some(l) = nodes[*i].op.layer_mut() {
            l.bits = bits.first_last;
        }
    }
    Ok(QuantGraph {
        tensors,
        nodes,
        input,
        output,
        bits,
        input_range: (-ranges::INPUT_RANGE, ranges::INPUT_RANGE),
    })
}

/// The logits stay `f32`: when the last op is a FullyConnected without a fused activation, or
/// a final Softmax reading one, that layer's accumulators are dequantized straight to `f32`
/// (the format's *f32 tensors*) instead of being requantized to 8-bit codes whose range would
/// have to be guessed without data; a clipped top logit ties with the next and flips top-1.
fn mark_f32_logits(tensors: &mut [QTensor], nodes: &[QNode], output: TensorId) {
    let Some(last) = nodes.last() else { return };
    let logits = match last.op {
        QOp::Softmax if last.output == output => last.inputs[0],
        QOp::Linear { .. } if last.output == output => output,
        _ => return,
    };
    let Some(p) = nodes.iter().position(|n| n.output == logits) else {
        return;
    };
    let only_reader = nodes.iter().filter(|n| n.inputs.contains(&logits)).count()
        == usize::from(logits != output);
    let before_last = p + 1 == nodes.len() || (p + 2 == nodes.len() && logits != output);
    if matches!(
        nodes[p].op,
        QOp::Linear {
            fused: Fused::None,
            ..
        }
    ) && only_reader
        && before_last
    {
        tensors[logits].is_f32 = true;
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

    #[test]
    fn rtn_rounds_each_channel_within_half_a_step() {
        let w = vec![
            0.3, -0.7, 0.1, 0.05, 2.0, 1.0, 0.5, 0.25, 0.0, 0.0, 0.0, 0.0,
        ];
        for bits in [2, 3, 4, 8] {
            let mut l = QLayer::new(3, 4, w.clone(), vec![0.0; 3], bits);
            l.quantize_rtn();
            assert!(l.is_quantized());
            let d = l.dequantized();
            for c in 0..3 {
                for j in 0..4 {
                    let e = (d[c * 4 + j] - w[c * 4 + j]).abs();
                    assert!(e <= 0.5 * l.scales[c] + 1e-6, "bits {bits} c {c}: {e}");
                }
            }
            // The all-zero row dequantizes to exact zeros.
            assert!(d[8..].iter().all(|&v| v == 0.0));
        }
    }
}
