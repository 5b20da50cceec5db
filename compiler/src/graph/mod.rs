//! The network IR: a topologically ordered list of nodes over values with concrete shapes.
//!
//! Everything constant (weights, BN statistics, reshape targets) lives inside the ops; the
//! values are the dynamic tensors (activations). Identity-like ONNX ops (Identity, Dropout in
//! inference) leave no node; Flatten/Reshape/Squeeze/Unsqueeze all become [`Op::Reshape`].

pub mod fold;
pub mod fuse;
mod tensor;

pub use diffdfq_runtime::format::Activation;
pub use tensor::{broadcast_index, broadcast_shape, strides, Data, Tensor};

pub type ValueId = usize;

/// A dynamic tensor: an activation with a concrete shape (batch included).
#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    pub name: String,
    pub shape: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// ONNX node name, or `op#index` when the ONNX node has none.
    pub name: String,
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub output: ValueId,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Graph {
    pub values: Vec<Value>,
    pub nodes: Vec<Node>,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
    /// Default-domain opset the model was exported with.
    pub opset: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinKind {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    Max,
    Avg,
}

/// 2-D convolution, NCHW, weight (O, I/groups, kh, kw).
#[derive(Debug, Clone, PartialEq)]
pub struct Conv {
    pub weight: Tensor,
    pub bias: Option<Vec<f32>>,
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    /// top, left, bottom, right (resolved from auto_pad at import).
    pub pads: [usize; 4],
    pub groups: usize,
}

impl Conv {
    pub fn out_channels(&self) -> usize {
        self.weight.shape[0]
    }
    pub fn kernel(&self) -> [usize; 2] {
        [self.weight.shape[2], self.weight.shape[3]]
    }

    /// The window as the runtime's kernels take it.
    pub fn geom(&self) -> diffdfq_runtime::kernels::ConvGeom {
        let [kh, kw] = self.kernel();
        diffdfq_runtime::kernels::ConvGeom {
            kernel_h: kh,
            kernel_w: kw,
            stride_h: self.strides[0],
            stride_w: self.strides[1],
            dilation_h: self.dilations[0],
            dilation_w: self.dilations[1],
            pad_top: self.pads[0],
            pad_left: self.pads[1],
            pad_bottom: self.pads[2],
            pad_right: self.pads[3],
            groups: self.groups,
        }
    }
}

/// Inference-form BatchNormalization over axis 1; keeps the statistics synthesis matches.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNorm {
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
    pub scale: Vec<f32>,
    pub bias: Vec<f32>,
    pub eps: f32,
}

impl BatchNorm {
    /// Per-channel `√(σ² + ε)`, the one place the BN's deviation is computed.
    fn deviation(&self) -> impl Iterator<Item = f32> + '_ {
        self.var.iter().map(|v| (v + self.eps).sqrt())
    }

    /// Per-channel gain `γ/√(σ² + ε)`: the BN is `y = gain·(x − μ) + β`.
    pub fn gain(&self) -> Vec<f32> {
        self.scale
            .iter()
            .zip(self.deviation())
            .map(|(s, d)| s / d)
            .collect()
    }

    /// The same gain rounded as `γ·(1/√(σ² + ε))`, which BN folding into a layer uses: the
    /// two differ in the last bit, and every artifact so far was folded this way.
    pub fn folded_gain(&self) -> Vec<f32> {
        self.scale
            .iter()
            .zip(self.deviation())
            .map(|(s, d)| s * (1.0 / d))
            .collect()
    }
}

/// MaxPool / AveragePool over the two spatial axes of an NCHW tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub kind: PoolKind,
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    /// top, left, bottom, right; ceil_mode shows up as an output larger than these pads give.
    pub pads: [usize; 4],
    pub count_include_pad: bool,
}

impl Pool {
    /// The window as the runtime's kernels take it.
    pub fn geom(&self) -> diffdfq_runtime::kernels::PoolGeom {
        diffdfq_runtime::kernels::PoolGeom {
            kernel_h: self.kernel[0],
            kernel_w: self.kernel[1],
            stride_h: self.strides[0],
            stride_w: self.strides[1],
            dilation_h: self.dilations[0],
            dilation_w: self.dilations[1],
            pad_top: self.pads[0],
            pad_left: self.pads[1],
            pad_bottom: self.pads[2],
            pad_right: self.pads[3],
        }
    }

    /// The pool of window `g` (the inverse of [`Pool::geom`]).
    pub fn from_geom(
        kind: PoolKind,
        g: &diffdfq_runtime::kernels::PoolGeom,
        count_include_pad: bool,
    ) -> Pool {
        Pool {
            kind,
            kernel: [g.kernel_h, g.kernel_w],
            strides: [g.stride_h, g.stride_w],
            dilations: [g.dilation_h, g.dilation_w],
            pads: [g.pad_top, g.pad_left, g.pad_bottom, g.pad_right],
            count_include_pad,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Conv(Conv),
    BatchNorm(BatchNorm),
    /// An elementwise activation: its definition, name and table live with
    /// [`Activation`] (one place, docs/design.md §7 "Adding an op").
    Act(Activation),
    /// `x` where `x ≥ 0`, else `slope·x`, `slope` broadcast to `x` (one slope imports as
    /// [`Activation::LeakyRelu`]; this is the per-channel or per-element form, float only).
    PRelu {
        slope: Tensor,
    },
    /// Clamp to `[min, max]` (either may be infinite); ReLU and ReLU6 ranges fuse into the
    /// producing layer, other bounds become [`Activation::Clip`].
    Clip {
        min: f32,
        max: f32,
    },
    /// Two dynamic operands, numpy broadcasting.
    Add,
    Mul,
    /// One dynamic operand and a constant; `const_left` puts the constant first (for Sub/Div).
    ConstBinary {
        kind: BinKind,
        value: Tensor,
        const_left: bool,
    },
    Concat {
        axis: usize,
    },
    Pool(Pool),
    GlobalAvgPool,
    /// To the output value's shape; same elements, same order.
    Reshape,
    /// `A·B (+ bias)`; Gemm's alpha and beta are folded into `b` and `bias` at import,
    /// and its transB is applied to `b`. `b` is (K, N) or batched (..., K, N).
    MatMul {
        b: Tensor,
        bias: Option<Tensor>,
        trans_a: bool,
    },
    /// Softmax along `axis`; `coerce_2d` is the opset < 13 semantics (flatten at axis).
    Softmax {
        axis: usize,
        coerce_2d: bool,
    },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Conv(c) if c.groups > 1 && c.groups == c.out_channels() => "DepthwiseConv",
            Op::Conv(_) => "Conv",
            Op::BatchNorm(_) => "BatchNorm",
            Op::Act(a) => a.name(),
            Op::PRelu { .. } => "PRelu",
            Op::Clip { .. } => "Clip",
            Op::Add => "Add",
            Op::Mul => "Mul",
            Op::ConstBinary { kind, .. } => match kind {
                BinKind::Add => "AddConst",
                BinKind::Sub => "SubConst",
                BinKind::Mul => "MulConst",
                BinKind::Div => "DivConst",
            },
            Op::Concat { .. } => "Concat",
            Op::Pool(p) if p.kind == PoolKind::Max => "MaxPool",
            Op::Pool(_) => "AvgPool",
            Op::GlobalAvgPool => "GlobalAvgPool",
            Op::Reshape => "Reshape",
            Op::MatMul { .. } => "MatMul",
            Op::Softmax { .. } => "Softmax",
        }
    }

    /// Number of learned/constant parameters the op carries.
    pub fn params(&self) -> usize {
        match self {
            Op::Conv(c) => c.weight.len() + c.bias.as_ref().map_or(0, Vec::len),
            Op::BatchNorm(b) => 4 * b.mean.len(),
            Op::MatMul { b, bias, .. } => b.len() + bias.as_ref().map_or(0, Tensor::len),
            Op::ConstBinary { value, .. } | Op::PRelu { slope: value } => value.len(),
            _ => 0,
        }
    }
}

impl Graph {
    pub fn shape(&self, v: ValueId) -> &[usize] {
        &self.values[v].shape
    }

    /// Multiply-accumulates of one node for the graph's batch.
    pub fn macs(&self, node: &Node) -> u64 {
        let out: u64 = self.shape(node.output).iter().map(|&d| d as u64).product();
        match &node.op {
            Op::Conv(c) => {
                let per_out = (c.weight.shape[1] * c.weight.shape[2] * c.weight.shape[3]) as u64;
                out * per_out
            }
            Op::MatMul { b, trans_a, .. } => {
                let a = self.shape(node.inputs[0]);
                let k = if *trans_a {
                    a[a.len() - 2]
                } else {
                    a[a.len() - 1]
                };
                let _ = b;
                out * k as u64
            }
            _ => 0,
        }
    }

    /// The nodes that read value `v`.
    pub fn consumers(&self, v: ValueId) -> impl Iterator<Item = usize> + '_ {
        self.nodes
            .iter()
            .enumerate()
            .filter(move |(_, n)| n.inputs.contains(&v))
            .map(|(i, _)| i)
    }

    /// The node writing value `v`.
    pub fn producer(&self, v: ValueId) -> Option<usize> {
        self.nodes.iter().position(|n| n.output == v)
    }

    /// Whether exactly one node reads `v` and it is no graph output.
    pub fn single_use(&self, v: ValueId) -> bool {
        self.consumers(v).count() == 1 && !self.outputs.contains(&v)
    }

    /// BatchNorm nodes in graph order.
    pub fn batchnorms(&self) -> impl Iterator<Item = (usize, &Node, &BatchNorm)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| match &n.op {
                Op::BatchNorm(b) => Some((i, n, b)),
                _ => None,
            })
    }

    /// Drops nodes whose output no graph output depends on, and values nothing refers to.
    pub fn prune(&mut self) {
        let mut live = vec![false; self.values.len()];
        for &o in &self.outputs {
            live[o] = true;
        }
        let mut keep = vec![false; self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate().rev() {
            if live[n.output] {
                keep[i] = true;
                for &x in &n.inputs {
                    live[x] = true;
                }
            }
        }
        for &i in &self.inputs {
            live[i] = true;
        }
        let mut k = keep.into_iter();
        self.nodes.retain(|_| k.next().unwrap_or(false));
        // Renumber values densely, keeping their order.
        let mut map = vec![usize::MAX; self.values.len()];
        let mut values = Vec::new();
        for (i, v) in self.values.drain(..).enumerate() {
            if live[i] {
                map[i] = values.len();
                values.push(v);
            }
        }
        self.values = values;
        for n in &mut self.nodes {
            n.output = map[n.output];
            for x in &mut n.inputs {
                *x = map[*x];
            }
        }
        for x in self.inputs.iter_mut().chain(self.outputs.iter_mut()) {
            *x = map[*x];
        }
    }
}
