//! Chains of linear layers without BatchNorm followed with joint samples (see
//! [`super::ranges`]): their outputs share an input, so moments summed as independent terms
//! understate the spread after the first.

use super::ranges::{fused_fn, Moments};
use super::{QOp, QuantGraph};

/// Moments of BN-less linear layers that read another one's output. Summing independent terms
/// (as [`layer_moments`] does) misses the correlation a shared input gives the first layer's
/// outputs, and the second layer sums those correlated outputs: on the Keras CIFAR-10 model's
/// three Dense layers that made the last two ranges 4–7× narrower than real inputs reach.
/// So the chain is followed with joint samples instead: the first layer's input is drawn
/// feature by feature from its moments (its own moments stay the exact analytic ones), every
/// later layer's moments are those of its samples.
pub(super) struct LinearChain {
    /// Samples of a tensor, `SAMPLES × numel` row-major, where a chain runs through it.
    samples: Vec<Option<Vec<f32>>>,
    /// Whether a tensor is read by a BN-less linear layer (directly or through reshapes).
    feeds: Vec<bool>,
    rng: crate::rng::Rng,
}

impl LinearChain {
    const SAMPLES: usize = 512;

    pub(super) fn new(q: &QuantGraph, seed: u64) -> Self {
        let mut feeds = vec![false; q.tensors.len()];
        for n in q.nodes.iter().rev() {
            let reads = match n.op {
                QOp::Linear { .. } => n.bn.is_none() && q.tensors[n.output].stats.is_none(),
                QOp::Reshape => feeds[n.output],
                _ => false,
            };
            if reads {
                feeds[n.inputs[0]] = true;
            }
        }
        LinearChain {
            samples: vec![None; q.tensors.len()],
            feeds,
            rng: crate::rng::Rng::new(seed, 0x11C4),
        }
    }

    pub(super) fn reshape(&mut self, x: usize, y: usize) {
        self.samples[y] = self.samples[x].clone();
    }

    /// Node `i` (BN-less): its pre-activation moments from its input's samples when it has
    /// them (else `None`: the analytic moments stand), and its output's samples when a linear
    /// layer reads them.
    pub(super) fn forward(
        &mut self,
        q: &QuantGraph,
        i: usize,
        input: Option<&Moments>,
    ) -> Option<Moments> {
        let n = &q.nodes[i];
        let (QOp::Linear { fused, layer }, x) = (&n.op, n.inputs[0]) else {
            return None;
        };
        let sampled = self.samples[x].is_some();
        if !sampled && !self.feeds[n.output] {
            return None;
        }
        let k = layer.k;
        let drawn;
        let xs: &[f32] = match self.samples[x].as_deref() {
            Some(xs) => xs,
            None => {
                let m = input?;
                let per = k / m.mean.len().max(1);
                if per == 0 || m.mean.len() * per != k {
                    return None;
                }
                let mut xs = Vec::with_capacity(Self::SAMPLES * k);
                for _ in 0..Self::SAMPLES {
                    for j in 0..k {
                        let c = j / per;
                        xs.push((m.mean[c] + m.std[c] * self.rng.normal() as f64) as f32);
                    }
                }
                drawn = xs;
                &drawn
            }
        };
        if xs.len() != Self::SAMPLES * k {
            return None;
        }
        let c_out = layer.c_out;
        let mut zs = vec![0f32; Self::SAMPLES * c_out];
        for (z, x) in zs.chunks_exact_mut(c_out).zip(xs.chunks_exact(k)) {
            for (c, (zc, row)) in z.iter_mut().zip(layer.weight.chunks_exact(k)).enumerate() {
                *zc = layer.bias[c] + row.iter().zip(x).map(|(w, v)| w * v).sum::<f32>();
            }
        }
        let mut mean = vec![0f64; c_out];
        let mut var = vec![0f64; c_out];
        for z in zs.chunks_exact(c_out) {
            for (m, &v) in mean.iter_mut().zip(z) {
                *m += v as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= Self::SAMPLES as f64);
        for z in zs.chunks_exact(c_out) {
            for ((s, &v), m) in var.iter_mut().zip(z).zip(&mean) {
                *s += (v as f64 - m).powi(2);
            }
        }
        let std = var
            .iter()
            .map(|v| (v / Self::SAMPLES as f64).sqrt())
            .collect();
        if self.feeds[n.output] {
            let f = fused_fn(*fused);
            self.samples[n.output] = Some(zs.into_iter().map(|z| f(z as f64) as f32).collect());
        }
        sampled.then_some(Moments { mean, std })
    }
}
