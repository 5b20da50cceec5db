//! Data-free activation ranges, per tensor, in graph order, and the per-channel moments that
//! bias correction reads ([`super::rtn::correct_biases`]).
//!
//! - the output of a layer with a folded BN: the BN says its output has per-channel mean `β_c`
//!   and standard deviation `|γ_c|` (on the training distribution). The range is
//!   `[min_c(β_c − kσ_c), max_c(β_c + kσ_c)]`, then through the fused ReLU/ReLU6.
//! - a ReLU output that a BN read (Keras puts BN after the ReLU): the BN's statistics are those
//!   of a rectified variable, whose tail `μ + kσ` badly understates when the channel is sparse
//!   (rarely positive, large when it is). The channel is taken as `ReLU(N(m, s²))` with the
//!   `(m, s)` that reproduce its mean and spread ([`rectified_source`]), and the range ends at
//!   `max_c(m_c + k·s_c)`.
//! - the model input: the input normalization makes it roughly N(0, 1): `±3` (covers the
//!   normalized pixel range of typical datasets, e.g. [−0.81, 2.02] for Fashion-MNIST), or
//!   the interval `--input-range` gives (a model fed raw pixels, e.g. [0, 255]). Either way
//!   the input is taken as mean ± 3σ of its interval for the moments below.
//! - Add: the sum of its inputs' intervals, narrowed to mean ± kσ of the summed moments
//!   (independent inputs); Mul: the product's hull; pools and GAP: the
//!   input's interval (an average stays inside it); MaxPool/Reshape: the input's quantization
//!   exactly (the runtime compares or aliases codes); Concat: the hull; table activations: the
//!   function's image of the input interval.
//! - conv/linear layers without BN (SE branches, classifier logits): per-channel Gaussian
//!   moments are propagated from the BN statistics and the input's N(0, 1) through every op
//!   (activations by quadrature, conv/linear as sums of independent terms, GAP keeping the
//!   per-element spread: an upper bound on the spread of an average), and the pre-activation
//!   range is mean ± kσ as for a BN output (2kσ for the logits, see [`propagate`]); a chain
//!   of such linear layers is followed with joint samples ([`LinearChain`]). Running the float reference on N(0, 1) noise was
//!   tried first and is kept as the fallback where moments cannot follow a shape: noise images
//!   give logits half as large as real ones (measured on the fixtures), which clips the winning
//!   logit.

use candle_core::{Device, Tensor};

use super::chain::LinearChain;
use super::{fused_activation, ActQuant, Activation, ConvGeom, Fused, QOp, QuantGraph};
use crate::graph::Graph;
use crate::reference::FloatModel;
use crate::rng::Rng;
use crate::Error;

/// How many standard deviations of a BN output an activation range keeps. The MSE-optimal
/// clipping of a Gaussian under uniform quantization (Banner et al., ACIQ) is ≈ 2.55σ at 4 bits
/// and ≈ 4σ at 8 bits: with 256 levels resolution is cheap and clipping the tail is not, with
/// 16 levels the balance moves inwards.
pub fn k_sigma(act_bits: u8) -> f32 {
    if act_bits >= 8 {
        4.0
    } else {
        2.55
    }
}

/// Half-width of the model input's range in the normalized input space.
pub const INPUT_RANGE: f32 = 3.0;

pub(super) fn apply_fused(r: (f32, f32), f: Fused) -> (f32, f32) {
    // Both maps are monotone and exact in f32 and f64: the interval's image is its ends'.
    let g = fused_fn(f);
    (g(r.0 as f64) as f32, g(r.1 as f64) as f32)
}

/// The image of `[lo, hi]` under `f`, sampled densely (all supported functions are piecewise
/// smooth with at most one extremum).
pub(super) fn image(act: Activation, (lo, hi): (f32, f32)) -> (f32, f32) {
    let n = 4096;
    let mut r = (f32::INFINITY, f32::NEG_INFINITY);
    for i in 0..=n {
        let x = lo as f64 + (hi as f64 - lo as f64) * i as f64 / n as f64;
        let y = act.apply(x) as f32;
        r = (r.0.min(y), r.1.max(y));
    }
    r
}

/// Seeded standard normal samples ([`Rng::unmixed`]).
pub fn normal_samples(seed: u64, n: usize) -> Vec<f32> {
    Rng::unmixed(seed).normals(n)
}

/// Min–max of the given source-graph values over `samples` float forward passes on Gaussian
/// inputs with the `input` interval as mean ± 3σ.
pub(super) fn noise_ranges(
    g: &Graph,
    values: &[usize],
    seed: u64,
    samples: usize,
    input: (f32, f32),
) -> Result<Vec<(f32, f32)>, Error> {
    let mut tap = g.clone();
    tap.outputs = values.to_vec();
    let dev = Device::Cpu;
    let m = FloatModel::new(&tap, &dev)?;
    let shape = g.shape(g.inputs[0]).to_vec();
    let per: usize = shape.iter().product();
    let (mean, sd) = ((input.0 + input.1) / 2.0, (input.1 - input.0) / 6.0);
    let noise: Vec<f32> = normal_samples(seed, per * samples.max(1))
        .into_iter()
        .map(|z| mean + sd * z)
        .collect();
    let mut r = vec![(f32::INFINITY, f32::NEG_INFINITY); values.len()];
    for x in noise.chunks_exact(per) {
        let x = Tensor::from_vec(x.to_vec(), shape.as_slice(), &dev)?;
        for (ri, y) in r.iter_mut().zip(m.forward(&[x])?) {
            let y = y.flatten_all()?;
            let lo = y.min(0)?.to_scalar::<f32>()?;
            let hi = y.max(0)?.to_scalar::<f32>()?;
            *ri = (ri.0.min(lo), ri.1.max(hi));
        }
    }
    Ok(r)
}

/// Per-channel (axis 1) mean and standard deviation of one element of a tensor.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Moments {
    pub(super) mean: Vec<f64>,
    pub(super) std: Vec<f64>,
}

/// Mean and standard deviation of `f(X)`, `X ~ N(m, s²)` (midpoint quadrature over ±8σ).
pub(super) fn moments_of(f: impl Fn(f64) -> f64, m: f64, s: f64) -> (f64, f64) {
    if s <= 0.0 {
        return (f(m), 0.0);
    }
    let n = 800;
    let (mut w_sum, mut e1, mut e2) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let z = -8.0 + 16.0 * (i as f64 + 0.5) / n as f64;
        let w = (-0.5 * z * z).exp();
        let y = f(m + s * z);
        w_sum += w;
        e1 += w * y;
        e2 += w * y * y;
    }
    let (e1, e2) = (e1 / w_sum, e2 / w_sum);
    (e1, (e2 - e1 * e1).max(0.0).sqrt())
}

/// The Gaussian `N(m, s²)` whose rectification `ReLU(·)` has mean `mean` and standard
/// deviation `std`. The ratio mean/std of `ReLU(N(t, 1))` rises monotonically with `t`, so
/// bisection finds `t = m/s`; a channel that is positive almost always is its own Gaussian.
pub(crate) fn rectified_source(mean: f64, std: f64) -> (f64, f64) {
    let relu = |x: f64| x.max(0.0);
    let ratio = |t: f64| {
        let (e1, sd) = moments_of(relu, t, 1.0);
        e1 / sd.max(f64::MIN_POSITIVE)
    };
    let (t_lo, t_hi) = (-6.0, 4.0);
    if std <= 0.0 || mean <= 0.0 || mean / std >= ratio(t_hi) {
        return (mean, std);
    }
    let r = mean / std;
    let (mut a, mut b) = (t_lo, t_hi);
    if r <= ratio(a) {
        b = a;
    }
    for _ in 0..50 {
        if b - a < 1e-6 {
            break;
        }
        let t = 0.5 * (a + b);
        if ratio(t) < r {
            a = t;
        } else {
            b = t;
        }
    }
    let t = 0.5 * (a + b);
    let s = mean / moments_of(relu, t, 1.0).0;
    (t * s, s)
}

pub(super) fn fused_fn(f: Fused) -> impl Fn(f64) -> f64 {
    move |x: f64| fused_activation(f).map_or(x, |a| a.apply(x))
}

pub(super) fn map_moments(mo: &Moments, f: impl Fn(f64) -> f64) -> Moments {
    let (mean, std) = mo
        .mean
        .iter()
        .zip(&mo.std)
        .map(|(&m, &s)| moments_of(&f, m, s))
        .unzip();
    Moments { mean, std }
}

/// Range `[min_c(μ − kσ), max_c(μ + kσ)]`.
pub(super) fn k_range(mean: &[f64], std: &[f64], k: f32) -> (f32, f32) {
    let k = k as f64;
    let lo = mean
        .iter()
        .zip(std)
        .fold(f64::INFINITY, |a, (m, s)| a.min(m - k * s));
    let hi = mean
        .iter()
        .zip(std)
        .fold(f64::NEG_INFINITY, |a, (m, s)| a.max(m + k * s));
    (lo as f32, hi as f32)
}

/// The input channel that code `j` of row `c` reads, for a layer whose input has `channels`
/// channels (a flattened input: features map to channels in equal runs).
#[allow(clippy::type_complexity)]
pub(super) fn input_channel(
    op: &QOp,
    channels: usize,
    in_shape: &[usize],
) -> Option<Box<dyn Fn(usize, usize) -> usize>> {
    let l = op.layer()?;
    Some(match op {
        QOp::Conv { geom, .. } => {
            let taps = (geom.kernel_h * geom.kernel_w).max(1);
            let cin_g = l.k / taps;
            let cout_g = (l.c_out / geom.groups.max(1)).max(1);
            Box::new(move |c, j| (c / cout_g) * cin_g + j / taps)
        }
        _ => {
            let per = l.k / channels.max(1);
            if in_shape.iter().product::<usize>() != l.k || per == 0 {
                return None;
            }
            Box::new(move |_, j| j / per)
        }
    })
}

/// Pre-activation moments of a conv/linear layer from its input's, treating the `K` terms of
/// a row as independent: `μ = b + Σ w·μ_in`, `σ² = Σ w²·σ_in²`.
pub(super) fn layer_moments(op: &QOp, input: &Moments, in_shape: &[usize]) -> Option<Moments> {
    let l = op.layer()?;
    let chan = input_channel(op, input.mean.len(), in_shape)?;
    let (mut mean, mut std) = (Vec::new(), Vec::new());
    for (c, row) in l.weight.chunks_exact(l.k).enumerate() {
        let (mut m, mut v) = (l.bias[c] as f64, 0.0);
        for (j, &w) in row.iter().enumerate() {
            let ch = chan(c, j);
            let (mi, si) = (*input.mean.get(ch)?, *input.std.get(ch)?);
            m += w as f64 * mi;
            v += (w as f64 * si).powi(2);
        }
        mean.push(m);
        std.push(v.sqrt());
    }
    Some(Moments { mean, std })
}

/// Fraction of a conv's output positions at which each kernel tap reads inside the image
/// (the rest read zero padding), `kh·kw` entries.
pub(super) fn tap_coverage(
    geom: &ConvGeom,
    in_shape: &[usize],
    out_shape: &[usize],
) -> Option<Vec<f64>> {
    let axis = |n: usize, o: usize, k: usize, s: usize, d: usize, pad: usize| -> Vec<f64> {
        (0..k)
            .map(|t| {
                let inside = (0..o)
                    .filter(|&p| {
                        let i = (p * s + t * d) as i64 - pad as i64;
                        i >= 0 && i < n as i64
                    })
                    .count();
                inside as f64 / o.max(1) as f64
            })
            .collect()
    };
    let (h, w) = (*in_shape.get(2)?, *in_shape.get(3)?);
    let (oh, ow) = (*out_shape.get(2)?, *out_shape.get(3)?);
    let fy = axis(
        h,
        oh,
        geom.kernel_h,
        geom.stride_h,
        geom.dilation_h,
        geom.pad_top,
    );
    let fx = axis(
        w,
        ow,
        geom.kernel_w,
        geom.stride_w,
        geom.dilation_w,
        geom.pad_left,
    );
    Some(
        fy.iter()
            .flat_map(|a| fx.iter().map(move |b| a * b))
            .collect(),
    )
}

/// Sets every tensor's activation quantization for `q` (folded from `g`), see the module doc.
/// Returns every tensor's moments, for bias correction.
pub(super) fn set_activation_ranges(
    q: &mut QuantGraph,
    g: &Graph,
    seed: u64,
    samples: usize,
) -> Result<Vec<Option<Moments>>, Error> {
    let mut preset: Vec<Option<(f32, f32)>> = vec![None; q.tensors.len()];
    // Each round calibrates at least one more layer on noise, so this ends.
    loop {
        let (blind, moments) = propagate(q, &preset, seed)?;
        if blind.is_empty() {
            return Ok(moments);
        }
        let outs: Vec<usize> = blind.iter().map(|&i| q.nodes[i].output).collect();
        let sources: Vec<usize> = outs.iter().map(|&t| q.tensors[t].source).collect();
        for (&t, r) in outs
            .iter()
            .zip(noise_ranges(g, &sources, seed, samples, q.input_range)?)
        {
            preset[t] = Some(r);
        }
    }
}

/// One pass of range and moment propagation; returns the conv/linear nodes that neither
/// statistics nor `preset` (post-activation ranges) cover, and every tensor's moments.
#[allow(clippy::type_complexity)]
pub(super) fn propagate(
    q: &mut QuantGraph,
    preset: &[Option<(f32, f32)>],
    seed: u64,
) -> Result<(Vec<usize>, Vec<Option<Moments>>), Error> {
    let mut range: Vec<Option<(f32, f32)>> = vec![None; q.tensors.len()];
    let mut mom: Vec<Option<Moments>> = vec![None; q.tensors.len()];
    // Joint samples of the outputs of BN-less linear layers that feed another one (see
    // [`LinearChain`]).
    let mut chain = LinearChain::new(q, seed);
    let inp = q.input;
    let c_in = q.tensors[inp].shape.get(1).copied().unwrap_or(1);
    // The input's interval is its mean ± 3σ.
    let (lo, hi) = q.input_range;
    mom[inp] = Some(Moments {
        mean: vec![(lo as f64 + hi as f64) / 2.0; c_in],
        std: vec![(hi as f64 - lo as f64) / 6.0; c_in],
    });
    range[inp] = Some((lo, hi));
    q.tensors[inp].quant = ActQuant::from_range(lo, hi, q.tensors[inp].quant.bits);
    // Layers whose moments cannot be followed: calibrated on noise after this pass.
    let mut blind = Vec::new();
    // The logits: the model output, or the input of a final Softmax.
    let logits = match q.producer(q.output).map(|i| &q.nodes[i]) {
        Some(n) if matches!(n.op, QOp::Softmax) => n.inputs[0],
        _ => q.output,
    };
    for i in 0..q.nodes.len() {
        let n = &q.nodes[i];
        let out = n.output;
        let bits = q.tensors[out].quant.bits;
        // A classifier's logits are where the tail is the signal: the winning logit is the
        // one far above the rest (and the features behind it are correlated, which the
        // independence assumption understates), so their range keeps twice the spread;
        // clipping it turns clear decisions into ties.
        let k = if out == logits { 2.0 } else { 1.0 } * k_sigma(bits);
        let x0 = n.inputs[0];
        let r_in = |j: usize| -> Option<(f32, f32)> { range[n.inputs[j]] };
        let m_in = |j: usize| -> Option<&Moments> { mom[n.inputs[j]].as_ref() };
        let (r, m): (Option<(f32, f32)>, Option<Moments>) = match &n.op {
            QOp::Conv { fused, .. } | QOp::Linear { fused, .. }
                if q.tensors[out].stats.is_some() =>
            {
                // A BN read this output: its statistics describe it after the activation.
                let st = q.tensors[out].stats.as_ref().map(|s| Moments {
                    mean: s.mean.iter().map(|&v| v as f64).collect(),
                    std: s.std.iter().map(|&v| v as f64).collect(),
                });
                let r = st.as_ref().map(|st| {
                    let (lo, hi) = if *fused == Fused::None {
                        k_range(&st.mean, &st.std, k)
                    } else {
                        let (m, s): (Vec<f64>, Vec<f64>) = st
                            .mean
                            .iter()
                            .zip(&st.std)
                            .map(|(&m, &s)| rectified_source(m, s))
                            .unzip();
                        k_range(&m, &s, k)
                    };
                    let (f_lo, f_hi) = apply_fused((f32::NEG_INFINITY, f32::INFINITY), *fused);
                    (lo.max(f_lo), hi.min(f_hi))
                });
                (r, st)
            }
            QOp::Conv { fused, .. } | QOp::Linear { fused, .. } => {
                let pre = match &n.bn {
                    Some(bn) => Some(Moments {
                        mean: bn.mean.iter().map(|&v| v as f64).collect(),
                        std: bn.std.iter().map(|&v| v as f64).collect(),
                    }),
                    None => match chain.forward(q, i, m_in(0)) {
                        Some(pre) => Some(pre),
                        None => {
                            m_in(0).and_then(|mi| layer_moments(&n.op, mi, &q.tensors[x0].shape))
                        }
                    },
                };
                match pre {
                    Some(pre) => (
                        Some(apply_fused(k_range(&pre.mean, &pre.std, k), *fused)),
                        Some(map_moments(&pre, fused_fn(*fused))),
                    ),
                    None => {
                        if preset[out].is_none() {
                            blind.push(i);
                        }
                        (preset[out], None)
                    }
                }
            }
            QOp::Add { fused } => {
                let r = r_in(0).zip(r_in(1)).map(|(a, b)| (a.0 + b.0, a.1 + b.1));
                let m = m_in(0).zip(m_in(1)).and_then(|(a, b)| {
                    (a.mean.len() == b.mean.len()).then(|| Moments {
                        mean: a.mean.iter().zip(&b.mean).map(|(x, y)| x + y).collect(),
                        std: a.std.iter().zip(&b.std).map(|(x, y)| x.hypot(*y)).collect(),
                    })
                });
                // The sum's spread: the tighter of the interval sum and mean ± kσ.
                let r = match (&r, &m) {
                    (Some(r), Some(m)) => {
                        let kr = k_range(&m.mean, &m.std, k);
                        Some((r.0.max(kr.0), r.1.min(kr.1)))
                    }
                    _ => r,
                };
                (
                    r.map(|r| apply_fused(r, *fused)),
                    m.map(|m| map_moments(&m, fused_fn(*fused))),
                )
            }
            QOp::Mul { fused } => {
                let r = r_in(0).zip(r_in(1)).map(|(a, b)| {
                    let p = [a.0 * b.0, a.0 * b.1, a.1 * b.0, a.1 * b.1];
                    let lo = p.iter().copied().fold(f32::INFINITY, f32::min);
                    let hi = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    apply_fused((lo, hi), *fused)
                });
                let m = m_in(0).zip(m_in(1)).and_then(|(a, b)| {
                    (a.mean.len() == b.mean.len()).then(|| {
                        let (mut mean, mut std) = (Vec::new(), Vec::new());
                        for c in 0..a.mean.len() {
                            let (ma, sa, mb, sb) = (a.mean[c], a.std[c], b.mean[c], b.std[c]);
                            mean.push(ma * mb);
                            std.push(
                                (sa * sa * sb * sb + sa * sa * mb * mb + sb * sb * ma * ma).sqrt(),
                            );
                        }
                        Moments { mean, std }
                    })
                });
                (r, m)
            }
            QOp::MaxPool { .. } | QOp::Reshape => {
                chain.reshape(x0, out);
                // Same codes: the same quantization, bits included.
                let src = q.tensors[x0].quant;
                let m = m_in(0).and_then(|mi| {
                    reshape_moments(mi, &q.tensors[x0].shape, &q.tensors[out].shape)
                });
                range[out] = Some(src.range());
                mom[out] = m;
                q.tensors[out].quant = src;
                continue;
            }
            QOp::AvgPool { .. } | QOp::GlobalAvgPool => (r_in(0), m_in(0).cloned()),
            QOp::Concat { axis } => {
                let mut r = Some((f32::INFINITY, f32::NEG_INFINITY));
                for j in 0..n.inputs.len() {
                    r = r.zip(r_in(j)).map(|(r, x)| (r.0.min(x.0), r.1.max(x.1)));
                }
                let m = if *axis == 1 {
                    let mut acc = Some(Moments {
                        mean: Vec::new(),
                        std: Vec::new(),
                    });
                    for j in 0..n.inputs.len() {
                        acc = acc.zip(m_in(j)).map(|(mut a, x)| {
                            a.mean.extend(&x.mean);
                            a.std.extend(&x.std);
                            a
                        });
                    }
                    acc
                } else {
                    None
                };
                (r, m)
            }
            QOp::Act(act) => {
                // The codes that reach the table are those of the input's quantized range.
                // A table into fewer bits than its input (an 8-bit input kept by `--arena`)
                // maps only the input's mean ± kσ at the output's width: the image of the
                // input's whole 8-bit range would spend 16 levels on a 4σ tail.
                let src = q.tensors[x0].quant;
                let mut r_src = src.range();
                if bits < src.bits {
                    if let Some(mi) = m_in(0) {
                        let kr = k_range(&mi.mean, &mi.std, k);
                        if kr.0.max(r_src.0) < kr.1.min(r_src.1) {
                            r_src = (kr.0.max(r_src.0), kr.1.min(r_src.1));
                        }
                    }
                }
                let f = |x: f64| act.apply(x);
                (
                    Some(image(*act, r_src)),
                    m_in(0).map(|mi| map_moments(mi, f)),
                )
            }
            QOp::Softmax => (Some((0.0, 1.0)), None),
        };
        if let Some(r) = r {
            q.tensors[out].quant = ActQuant::from_range(r.0, r.1, bits);
        }
        range[out] = r;
        mom[out] = m;
    }
    if blind.is_empty() {
        if let Some(t) = range.iter().position(Option::is_none) {
            return Err(Error::Internal(format!(
                "rtn: no activation range for tensor '{}'",
                q.tensors[t].name
            )));
        }
    }
    Ok((blind, mom))
}

/// Moments through a reshape: unchanged per channel when the channel axis survives, or one
/// entry per flattened feature.
pub(super) fn reshape_moments(m: &Moments, from: &[usize], to: &[usize]) -> Option<Moments> {
    let c = *from.get(1)?;
    if to.get(1) == Some(&c)
        && to.len() >= 2
        && to[2..].iter().product::<usize>() == from[2..].iter().product::<usize>()
    {
        return Some(m.clone());
    }
    if to.len() == 2 && from.len() >= 2 {
        let per: usize = from[2..].iter().product();
        let expand = |v: &[f64]| {
            v.iter()
                .flat_map(|&x| std::iter::repeat_n(x, per))
                .collect()
        };
        return Some(Moments {
            mean: expand(&m.mean),
            std: expand(&m.std),
        });
    }
    None
}
