//! The float reference: the Graph run forward on candle, batched and differentiable with
//! respect to its input (synthesis optimizes pixels through it).
//!
//! It also taps every BatchNorm: the batch mean and biased variance of the BN's input over
//! all axes but the channel axis, the statistics synthesis matches to the running ones.

use candle_core::{DType, Device, Tensor};

mod depthwise;
mod im2col;
pub(crate) mod pointwise;
pub(crate) mod pool;

use crate::graph::{self, BinKind, Graph, Op};
use crate::Error;
use pointwise::{clamp, clip, relu, ChannelAffine};

/// Batch statistics at the input of one BatchNorm, each of shape (C).
#[derive(Debug, Clone)]
pub struct BnStats {
    /// Index of the BN node in `Graph::nodes`.
    pub node: usize,
    pub mean: Tensor,
    pub var: Tensor,
}

/// Result of one forward pass.
pub struct Forward {
    pub outputs: Vec<Tensor>,
    /// One entry per BatchNorm in graph order, when asked for.
    pub bn: Vec<BnStats>,
}

/// Per-node device tensors, prepared once.
enum Params {
    None,
    Conv {
        w: Tensor,
        b: Option<Tensor>,
        /// The bias again, for [`pointwise::ChannelAffine`] on the CPU.
        b_host: Option<Vec<f32>>,
    },
    /// y = x·mul + add, both shaped (1, C, 1, …) to the input's rank (and kept on the host
    /// for [`pointwise::ChannelAffine`]).
    Affine {
        mul: Tensor,
        add: Tensor,
        host: (Vec<f32>, Vec<f32>),
    },
    Const(Tensor),
    MatMul {
        b: Tensor,
        bias: Option<Tensor>,
    },
}

pub struct FloatModel {
    graph: Graph,
    params: Vec<Params>,
    device: Device,
}

fn t(v: &graph::Tensor, dev: &Device) -> candle_core::Result<Tensor> {
    Tensor::from_vec(v.to_f32(), v.shape.as_slice(), dev)
}

impl FloatModel {
    pub fn new(graph: &Graph, device: &Device) -> Result<Self, Error> {
        let mut params = Vec::with_capacity(graph.nodes.len());
        for n in &graph.nodes {
            params.push(match &n.op {
                Op::Conv(c) => {
                    let mut w = t(&c.weight, device)?;
                    if c.dilations[0] != c.dilations[1] {
                        w = dilate_kernel(&w, c.dilations)?;
                    }
                    let b = c
                        .bias
                        .as_ref()
                        .map(|b| Tensor::from_vec(b.clone(), (1, b.len(), 1, 1), device))
                        .transpose()?;
                    Params::Conv {
                        w,
                        b,
                        b_host: c.bias.clone(),
                    }
                }
                Op::BatchNorm(bn) => {
                    let rank = graph.shape(n.inputs[0]).len();
                    let mut shape = vec![1; rank];
                    shape[1] = bn.mean.len();
                    let mul = bn.gain();
                    let add: Vec<f32> = bn
                        .bias
                        .iter()
                        .zip(&bn.mean)
                        .zip(&mul)
                        .map(|((b, m), k)| b - m * k)
                        .collect();
                    Params::Affine {
                        mul: Tensor::from_vec(mul.clone(), shape.as_slice(), device)?,
                        add: Tensor::from_vec(add.clone(), shape.as_slice(), device)?,
                        host: (mul, add),
                    }
                }
                Op::ConstBinary { value, .. } | Op::PRelu { slope: value } => {
                    Params::Const(t(value, device)?)
                }
                Op::MatMul { b, bias, .. } => Params::MatMul {
                    b: t(b, device)?,
                    bias: bias.as_ref().map(|x| t(x, device)).transpose()?,
                },
                _ => Params::None,
            });
        }
        Ok(FloatModel {
            graph: graph.clone(),
            params,
            device: device.clone(),
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs the graph; inputs in `Graph::inputs` order with the graph's shapes.
    pub fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, Error> {
        Ok(self.run(inputs, false)?.outputs)
    }

    /// Runs the graph and returns the BN input statistics too.
    pub fn forward_with_bn(&self, inputs: &[Tensor]) -> Result<Forward, Error> {
        self.run(inputs, true)
    }

    fn run(&self, inputs: &[Tensor], taps: bool) -> Result<Forward, Error> {
        let g = &self.graph;
        if inputs.len() != g.inputs.len() {
            return Err(Error::Input(format!(
                "the model takes {} inputs, got {}",
                g.inputs.len(),
                inputs.len()
            )));
        }
        let mut vals: Vec<Option<Tensor>> = vec![None; g.values.len()];
        // A graph imported with batch 1 runs any batch: then every shape's leading 1 stands
        // for it (only then: a leading 1 can be a real axis, e.g. Flatten(axis = 0)).
        let batch = inputs
            .first()
            .and_then(|x| x.dims().first().copied())
            .unwrap_or(1);
        let graph_batch = g.inputs.first().and_then(|&i| g.shape(i).first().copied());
        let rebatch = graph_batch == Some(1) && batch != 1;
        let batched = |shape: &[usize]| -> Vec<usize> {
            let mut s = shape.to_vec();
            if rebatch && s.first() == Some(&1) {
                s[0] = batch;
            }
            s
        };
        for (&id, x) in g.inputs.iter().zip(inputs) {
            if x.dims() != g.shape(id) && x.dims() != batched(g.shape(id)) {
                return Err(Error::Input(format!(
                    "input '{}' has shape {:?}, the model expects {:?}",
                    g.values[id].name,
                    x.dims(),
                    g.shape(id)
                )));
            }
            vals[id] = Some(x.to_dtype(DType::F32)?);
        }
        let mut bn = Vec::new();
        let cpu = self.device.is_cpu();
        for (i, n) in g.nodes.iter().enumerate() {
            let get = |k: usize| -> Result<&Tensor, Error> {
                vals[n.inputs[k]].as_ref().ok_or_else(|| {
                    Error::Internal(format!("node '{}': input {k} not computed", n.name))
                })
            };
            let x = get(0)?;
            let y = match (&n.op, &self.params[i]) {
                (Op::Conv(c), Params::Conv { w, b, b_host }) => {
                    // A non-square dilation is already spread into the kernel.
                    let dil = if c.dilations[0] == c.dilations[1] {
                        c.dilations[0]
                    } else {
                        1
                    };
                    let args = ConvArgs {
                        pads: c.pads,
                        strides: c.strides,
                        dil,
                        groups: c.groups,
                    };
                    match b_host {
                        Some(add) if cpu => conv(x, w, &None, &args)?.apply_op1(ChannelAffine {
                            mul: None,
                            add: add.clone(),
                        })?,
                        _ => conv(x, w, b, &args)?,
                    }
                }
                (Op::BatchNorm(_), Params::Affine { mul, add, host }) => {
                    if taps {
                        let (mean, var) = channel_stats(x)?;
                        bn.push(BnStats { node: i, mean, var });
                    }
                    if cpu {
                        x.contiguous()?.apply_op1(ChannelAffine {
                            mul: Some(host.0.clone()),
                            add: host.1.clone(),
                        })?
                    } else {
                        x.broadcast_mul(mul)?.broadcast_add(add)?
                    }
                }
                (Op::Act(a), _) => activation(x, *a)?,
                (Op::PRelu { .. }, Params::Const(s)) => {
                    (x.relu()? - s.broadcast_mul(&x.neg()?.relu()?)?)?
                }
                (Op::Clip { min, max }, _) => activation(
                    x,
                    graph::Activation::Clip {
                        min: *min,
                        max: *max,
                    },
                )?,
                (Op::Add, _) => x.broadcast_add(get(1)?)?,
                (Op::Mul, _) => x.broadcast_mul(get(1)?)?,
                (
                    Op::ConstBinary {
                        kind, const_left, ..
                    },
                    Params::Const(c),
                ) => {
                    let (l, r) = if *const_left { (c, x) } else { (x, c) };
                    match kind {
                        BinKind::Add => l.broadcast_add(r)?,
                        BinKind::Sub => l.broadcast_sub(r)?,
                        BinKind::Mul => l.broadcast_mul(r)?,
                        BinKind::Div => l.broadcast_div(r)?,
                    }
                }
                (Op::Concat { axis }, _) => {
                    let parts = (0..n.inputs.len())
                        .map(get)
                        .collect::<Result<Vec<_>, _>>()?;
                    Tensor::cat(&parts, *axis)?
                }
                (Op::Pool(p), _) => {
                    let o = g.shape(n.output);
                    pool::pool2d(x, p, [o[2], o[3]])?
                }
                (Op::GlobalAvgPool, _) => {
                    let dims: Vec<usize> = (2..x.rank()).collect();
                    x.mean_keepdim(dims.as_slice())?
                }
                (Op::Reshape, _) => x.reshape(batched(g.shape(n.output)))?,
                (Op::MatMul { trans_a, .. }, Params::MatMul { b, bias }) => {
                    let a = if *trans_a {
                        x.t()?.contiguous()?
                    } else {
                        x.clone()
                    };
                    let y = if a.rank() == 2 && b.rank() == 2 {
                        a.matmul(b)?
                    } else {
                        a.broadcast_matmul(b)?
                    };
                    match bias {
                        Some(c) => y.broadcast_add(c)?,
                        None => y,
                    }
                }
                (Op::Softmax { axis, coerce_2d }, _) => {
                    if *coerce_2d {
                        let outer: usize = x.dims()[..*axis].iter().product();
                        let flat = x.reshape((outer, x.elem_count() / outer.max(1)))?;
                        candle_nn::ops::softmax(&flat, 1)?.reshape(x.dims())?
                    } else {
                        candle_nn::ops::softmax(x, *axis)?
                    }
                }
                (op, _) => {
                    return Err(Error::Internal(format!(
                        "node '{}': no parameters prepared for {}",
                        n.name,
                        op.name()
                    )))
                }
            };
            if y.dims() != g.shape(n.output) && y.dims() != batched(g.shape(n.output)) {
                return Err(Error::Internal(format!(
                    "node '{}' ({}) produced shape {:?}, import inferred {:?}",
                    n.name,
                    n.op.name(),
                    y.dims(),
                    g.shape(n.output)
                )));
            }
            vals[n.output] = Some(y);
        }
        let outputs = g
            .outputs
            .iter()
            .map(|&o| {
                vals[o]
                    .clone()
                    .ok_or_else(|| Error::Internal("output not computed".into()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Forward { outputs, bn })
    }
}

/// Spreads a kernel (O, I, kh, kw) over its dilation with zeros, for dilations candle's
/// single-valued `conv2d` cannot express.
fn dilate_kernel(w: &Tensor, d: [usize; 2]) -> candle_core::Result<Tensor> {
    let (o, i, kh, kw) = w.dims4()?;
    let (eh, ew) = (d[0] * (kh - 1) + 1, d[1] * (kw - 1) + 1);
    let src = w.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; o * i * eh * ew];
    for oi in 0..o * i {
        for y in 0..kh {
            for x in 0..kw {
                out[(oi * eh + y * d[0]) * ew + x * d[1]] = src[(oi * kh + y) * kw + x];
            }
        }
    }
    Tensor::from_vec(out, (o, i, eh, ew), w.device())
}

/// Geometry of a 2-D convolution (a non-square dilation is spread into the kernel beforehand).
#[derive(Debug, Clone, Copy)]
pub struct ConvArgs {
    /// top, left, bottom, right
    pub pads: [usize; 4],
    pub strides: [usize; 2],
    pub dil: usize,
    pub groups: usize,
}

/// 2-D convolution with asymmetric pads and non-square strides (which candle's `conv2d` lacks).
fn conv_candle(
    x: &Tensor,
    w: &Tensor,
    b: &Option<Tensor>,
    a: &ConvArgs,
) -> candle_core::Result<Tensor> {
    let ConvArgs {
        pads,
        strides,
        dil,
        groups,
    } = *a;
    let [pt, pl, pb, pr] = pads;
    let symmetric = pt == pb && pl == pr && pt == pl;
    let (xp, pad) = if symmetric {
        (x.clone(), pt)
    } else {
        (x.pad_with_zeros(2, pt, pb)?.pad_with_zeros(3, pl, pr)?, 0)
    };
    let square = strides[0] == strides[1];
    let stride = if square { strides[0] } else { 1 };
    let mut y = xp.conv2d(w, pad, stride, dil, groups)?;
    if !square {
        let (_, _, h, wd) = y.dims4()?;
        let pick = |n: usize, s: usize| {
            Tensor::from_vec(
                (0..n).step_by(s).map(|v| v as u32).collect::<Vec<_>>(),
                n.div_ceil(s),
                x.device(),
            )
        };
        y = y
            .index_select(&pick(h, strides[0])?, 2)?
            .index_select(&pick(wd, strides[1])?, 3)?;
    }
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `a` on `x`, differentiable (synthesis and reconstruction take gradients through it); the
/// float reference and the fake-quantized model both use it. [`Activation::apply`] is the same
/// function in `f64` for the runtime's tables.
pub fn activation(x: &Tensor, a: graph::Activation) -> candle_core::Result<Tensor> {
    use graph::Activation as A;
    match a {
        A::Relu => relu(x),
        A::Relu6 => clamp(x, 0.0, 6.0),
        A::HardSigmoid { alpha, beta } => hard_sigmoid(x, alpha, beta),
        A::HardSwish => hard_swish(x),
        A::Sigmoid => sigmoid(x),
        A::Tanh => x.tanh(),
        A::LeakyRelu { alpha } => x.relu()? - (x.neg()?.relu()? * alpha as f64)?,
        A::Clip { min, max } => clip(
            x,
            Some(min).filter(|v| v.is_finite()),
            Some(max).filter(|v| v.is_finite()),
        ),
    }
}

/// `clamp(αx + β, 0, 1)`.
pub fn hard_sigmoid(x: &Tensor, alpha: f32, beta: f32) -> candle_core::Result<Tensor> {
    clamp(&x.affine(alpha as f64, beta as f64)?, 0.0, 1.0)
}

/// `x·clamp(x/6 + 1/2, 0, 1)`.
pub fn hard_swish(x: &Tensor) -> candle_core::Result<Tensor> {
    x * hard_sigmoid(x, 1.0 / 6.0, 0.5)?
}

/// The logistic function, candle's op (which has a backward pass for synthesis).
pub fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::sigmoid(x)
}

/// 2-D convolution on the CPU: depthwise as a direct op ([`depthwise`]); ungrouped as
/// one product of the kernel with every sample's im2col block (none for an unpadded 1×1),
/// landing in (N, C_out, Ho·Wo); other grouped convs as im2col and one product per group (see
/// [`im2col`]). Other devices use candle's `conv2d`.
pub fn conv(
    x: &Tensor,
    w: &Tensor,
    b: &Option<Tensor>,
    a: &ConvArgs,
) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        return conv_candle(x, w, b, a);
    }
    let ConvArgs {
        pads,
        strides,
        dil,
        groups,
    } = *a;
    let (n, c, h, wd) = x.dims4()?;
    let (o, cg, kh, kw) = w.dims4()?;
    let y = if groups == c && o == c && cg == 1 && groups > 1 {
        x.contiguous()?.apply_op2(
            &w.contiguous()?,
            depthwise::Depthwise { strides, dil, pads },
        )?
    } else {
        let op = im2col::Im2Col {
            kernel: [kh, kw],
            strides,
            dil,
            pads,
            groups,
            batch_major: groups == 1,
        };
        let (ho, wo) = op.out_hw(h, wd);
        if groups == 1 {
            let cols = if kh == 1 && kw == 1 && strides == [1, 1] && pads == [0; 4] {
                x.reshape((n, c, h * wd))?
            } else {
                // (N, C·kh·kw, Ho·Wo)
                x.contiguous()?.apply_op1(op)?
            };
            w.reshape((o, cg * kh * kw))?
                .broadcast_matmul(&cols)?
                .reshape((n, o, ho, wo))?
        } else {
            // (G, Cg·kh·kw, N·Ho·Wo)
            let cols = x.contiguous()?.apply_op1(op)?;
            let og = o / groups;
            let y = w.reshape((groups, og, cg * kh * kw))?.matmul(&cols)?;
            y.reshape((o, n, ho, wo))?.transpose(0, 1)?.contiguous()?
        }
    };
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Per-channel (axis 1) mean and biased variance over every other axis, each of shape (C):
/// one fused op on the CPU ([`pointwise::ChannelStats`]). Elsewhere reduced along the
/// contiguous last axis first: candle's reductions over strided axes (0, 2, 3) are many times
/// slower, forwards and backwards.
pub fn channel_stats(x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    if x.device().is_cpu() {
        let s = x.contiguous()?.apply_op1(pointwise::ChannelStats)?;
        return Ok((s.get(0)?, s.get(1)?));
    }
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    let inner = x.elem_count() / (n * c).max(1);
    let x3 = x.reshape((n, c, inner))?;
    let count = (n * inner) as f64;
    let mean = (x3.sum(2)?.sum(0)? / count)?;
    let centered = x3.broadcast_sub(&mean.reshape((1, c, 1))?)?;
    let var = (centered.sqr()?.sum(2)?.sum(0)? / count)?;
    Ok((mean, var))
}

#[cfg(test)]
mod tests {
    use super::*;
    use graph::Activation as A;

    /// The differentiable form and the `f64` form the runtime's tables come from are one
    /// function: every variant, over a sweep, the extremes, and odd parameters.
    #[test]
    fn activation_forms_agree() {
        let mut xs: Vec<f32> = (0..=800).map(|i| -20.0 + i as f32 * 0.05).collect();
        xs.extend([-400.0, 400.0, 0.0, -0.0, 1e-30, -1e-30]);
        let inf = f32::INFINITY;
        let all = [
            A::Relu,
            A::Relu6,
            A::HardSigmoid {
                alpha: 0.2,
                beta: 0.5,
            },
            A::HardSwish,
            A::Sigmoid,
            A::LeakyRelu { alpha: 0.1 },
            A::LeakyRelu { alpha: -0.5 },
            A::Clip {
                min: -1.0,
                max: 2.0,
            },
            A::Clip { min: 3.0, max: 1.0 },
            A::Clip {
                min: -inf,
                max: 0.5,
            },
            A::Clip {
                min: -inf,
                max: inf,
            },
            A::Tanh,
        ];
        let x = Tensor::from_vec(xs.clone(), xs.len(), &Device::Cpu).unwrap();
        for a in all {
            let y = activation(&x, a).unwrap().to_vec1::<f32>().unwrap();
            for (&xi, &yi) in xs.iter().zip(&y) {
                let want = a.apply(xi as f64) as f32;
                assert!(
                    (yi - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{a:?} at {xi}: candle {yi}, apply {want}"
                );
            }
        }
    }
}
