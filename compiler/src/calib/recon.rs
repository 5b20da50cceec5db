//! Stage 3: block reconstruction (Genie/BRECQ) with progressive selection over the diffusion
//! levels (DiffDFQ).
//!
//! Blocks are the spans between points where a single tensor is live: a residual block (or an
//! SE block) is one block, a plain chain gives one block per layer; spans without a weight
//! layer join the next block. Each block in turn minimizes
//! `mean ‖Q_block(x̂) − P_block(x)‖²` (summed over channels) where `P` is the folded float
//! network on the float block input and `x̂` mixes, element-wise with p = 0.5 (QDrop), the
//! float input and the output of the already calibrated quantized prefix. Trained per block:
//! AdaRound's rounding variables (rectified sigmoid, ζ = 1.1, γ = −0.1, regularizer β annealed
//! 20 → 2 after a 20 % warm-up) with Adam lr 1e-3, and every quantized activation's step (LSQ)
//! with Adam lr 4e-5, each activation quantizer dropping to float with p = 0.5 (QDrop).
//! Weight scales come from the Lp(2.4) clipping search and by default stay (learning them as
//! Genie does, and learning the biases, are options: on the MobileNet fixture at W2A8 neither
//! measured better than the spread between runs); activation steps start from the same search
//! on the block's float activations. A layer whose samples give too few output values per
//! weight of a row ([`ReconOptions::min_rows_per_weight`], more at 4 bits and over) keeps
//! round-to-nearest codes: AdaRound there would fit the samples rather than the layer.
//!
//! Progressive selection (`--method diffdfq`): the adaptability `d(L) = Σ ‖P(x_L) − Q(x_L)‖₂`
//! over the logits of an evaluation subset picks the start level `argmin d`; before each later
//! block the current level is compared with the next cleaner one and steps down when that one
//! is better. So that the last block always sees clean samples, the level is also capped by a
//! linear descent from the start level to 0 over the blocks (the published code descends per
//! epoch with no such cap; a block-wise PTQ has few steps to descend in).

use std::collections::BTreeMap;
use std::ops::Range;

use candle_core::{Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

pub use super::blocks::blocks;
use super::blocks::{adaptability, gather, gather_from, logits_tensor, lp_act_quant, Carried};
use super::progress::Progress;
use super::synth::{noised, LEVELS};
use crate::quant::qmodel::{Mode, Overrides, QModel};
use crate::quant::{ActQuant, QOp, TensorId};
use crate::rng::Rng;
use crate::Error;
use diffdfq_runtime::numerics::code_max;

const ZETA: f64 = 1.1;
const GAMMA: f64 = -0.1;

#[derive(Debug, Clone)]
pub struct ReconOptions {
    pub iters: usize,
    pub batch: usize,
    pub round_weight: f64,
    pub lr_round: f64,
    /// Adam lr of the 8-bit activation steps (LSQ); 4-bit ones are not learned.
    pub lr_act: f64,
    /// Adam lr of the per-channel weight steps, learned jointly with the rounding as Genie
    /// does; 0 keeps the Lp-searched steps. Learned as `s₀·exp(u)` with `u` from 0, so one lr
    /// suits every layer's magnitude and no step can cross zero (with Genie's absolute lr,
    /// 1e-3 drove a MobileNet step negative).
    pub lr_weight_scale: f64,
    /// Adam lr of the quantized layers' biases, learned with the rounding to absorb the
    /// systematic output shift of low-bit weights; 0 keeps the folded float biases.
    pub lr_bias: f64,
    pub seed: u64,
    /// Progressive selection over diffusion levels (DiffDFQ); off = clean samples only (Genie).
    pub diffusion: bool,
    /// Samples the adaptability `d(L)` is measured on.
    pub eval_samples: usize,
    /// Where activation steps start, see [`ActInit`].
    pub act_init: ActInit,
    /// A 2- or 3-bit layer's rounding is learned only where the samples give at least this
    /// many output values per weight of a row (samples × output positions ≥ this × fan-in);
    /// elsewhere it keeps the Lp search's round-to-nearest codes. See [`ROWS_PER_WEIGHT`].
    pub rows_per_weight: f64,
    /// The same for layers of 4 bits and more. See [`ROWS_PER_WEIGHT_WIDE`].
    pub rows_per_weight_wide: f64,
}

/// Default [`ReconOptions::rows_per_weight`]. At `--budget 10` MobileNetV2 gets 8 samples, so
/// a 7×7 layer sees 392 output values per row against a fan-in of up to 960, and learning its
/// rounding cost agreement on real photos; 16 also stopped learning the ResNet fixture's 2-bit
/// 7×7 convs (64 samples) and measured worse there. Figures: README "Calibration", step 3.
pub const ROWS_PER_WEIGHT: f64 = 4.0;

/// Default [`ReconOptions::rows_per_weight_wide`]. Round-to-nearest at 4 bits loses little, so
/// learned rounding there has less to win than the samples' misfit costs: on MobileNetV2 W4A8
/// (8 samples) 4, 16 and 64 read 83.5, 84.0 and 86.5 % on real photos (rtn 86.0 %), the
/// softmax's KL to FP32 falling each time. Figures: README "Calibration", step 3.
pub const ROWS_PER_WEIGHT_WIDE: f64 = 64.0;

impl ReconOptions {
    /// Output values per weight of a row below which a layer of `bits` keeps round-to-nearest.
    pub fn min_rows_per_weight(&self, bits: u8) -> f64 {
        if bits >= 4 {
            self.rows_per_weight_wide
        } else {
            self.rows_per_weight
        }
    }
}

impl Default for ReconOptions {
    fn default() -> Self {
        ReconOptions {
            iters: 200,
            batch: 32,
            round_weight: 1.0,
            lr_round: 1e-2,
            lr_act: 4e-5,
            lr_weight_scale: 0.0,
            lr_bias: 0.0,
            seed: 0,
            diffusion: true,
            eval_samples: 256,
            act_init: ActInit::Stats,
            rows_per_weight: ROWS_PER_WEIGHT,
            rows_per_weight_wide: ROWS_PER_WEIGHT_WIDE,
        }
    }
}

/// Where a block's activation steps start before LSQ trains them. [`ActInit::Stats`] is the
/// default: seed 0, 10k test images, it measured better than `Data` in 7 of 10 A8 cells
/// (MobileNet diffdfq W4A8 88.14 % vs 86.77 %) and worse in both MobileNet W2A8 cells
/// (diffdfq 78.62 % vs 80.71 %, genie 75.53 % vs 80.40 %). `Best` picked `Data` nearly
/// everywhere (81.24 % at W2A8, 86.77 % at W4A8): the error on synthetic samples does not
/// predict the error on real ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActInit {
    /// The BN-statistics ranges rtn set (mean ± kσ of each BN output).
    Stats,
    /// The Lp search on the block's float activations of the calibration samples.
    Data,
    /// Whichever of the two gives the block's quantized outputs the lower error against the
    /// float ones, on up to 64 samples.
    Best,
}

/// What calibration did, for the report and the user.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReconReport {
    /// Node names of each block.
    pub blocks: Vec<Vec<String>>,
    /// Diffusion level each block was calibrated on.
    pub levels: Vec<usize>,
    /// `d(L)` for L = 0..20 before calibration (DiffDFQ only).
    pub adaptability: Vec<f32>,
    /// Final reconstruction loss per block.
    pub losses: Vec<f32>,
    /// Per block, whether its activation steps started from the Lp search on data (rather
    /// than the BN-statistics ranges).
    pub act_init_data: Vec<bool>,
    /// Layers whose rounding was not learned (too few rows per weight, see
    /// [`ReconOptions::min_rows_per_weight`]): they keep round-to-nearest.
    pub nearest: Vec<String>,
}

/// AdaRound state of one layer.
struct Rounding {
    node: usize,
    v: Var,
    /// floor(w / s), (c_out, k).
    floor: Tensor,
    /// The Lp-searched steps, (c_out, 1), and the learned log-factor on them.
    scale0: Tensor,
    scale: Var,
    bias: Var,
    zero: Tensor,
    max: f64,
    shape: Vec<usize>,
}

impl Rounding {
    fn h(&self) -> candle_core::Result<Tensor> {
        candle_nn::ops::sigmoid(self.v.as_tensor())?
            .affine(ZETA - GAMMA, GAMMA)?
            .clamp(0f32, 1f32)
    }

    fn soft_weight(&self) -> candle_core::Result<Tensor> {
        let q = (&self.floor + self.h()?)?
            .broadcast_add(&self.zero)?
            .clamp(0.0, self.max)?
            .broadcast_sub(&self.zero)?;
        q.broadcast_mul(&self.step()?)?
            .reshape(self.shape.as_slice())
    }

    fn step(&self) -> candle_core::Result<Tensor> {
        &self.scale0 * self.scale.as_tensor().exp()?
    }
}

/// Calibrates `m` in place on `clean` samples (flattened inputs).
pub fn reconstruct(
    m: &mut QModel,
    clean: &[f32],
    opts: &ReconOptions,
    progress: Progress,
) -> Result<ReconReport, Error> {
    let dev = m.device().clone();
    let per: usize = m.q.tensors[m.q.input].shape[1..].iter().product();
    let n_samples = clean.len() / per.max(1);
    if n_samples == 0 {
        return Err(Error::Input("calibration needs at least one sample".into()));
    }
    let blocks = blocks(m);
    let n_layer_blocks = blocks.len();
    let mut report = ReconReport {
        blocks: blocks
            .iter()
            .map(|b| b.clone().map(|i| m.q.nodes[i].name.clone()).collect())
            .collect(),
        ..Default::default()
    };
    let eval_n = opts.eval_samples.min(n_samples);
    let mut level_cache: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
    let mut at_level = |l: usize| -> Vec<f32> {
        level_cache
            .entry(l)
            .or_insert_with(|| noised(clean, l, opts.seed))
            .clone()
    };
    let mut float_logits: BTreeMap<usize, Tensor> = BTreeMap::new();
    let mut d_of = |m: &QModel, l: usize, at: &mut dyn FnMut(usize) -> Vec<f32>| {
        let x = at(l);
        let x = &x[..eval_n * per];
        let f = match float_logits.get(&l) {
            Some(f) => f.clone(),
            None => {
                let n = m.q.nodes.len();
                let f = gather(m, x, 0..n, Mode::Float, &[logits_tensor(m)])?.remove(0);
                float_logits.insert(l, f.clone());
                f
            }
        };
        adaptability(m, x, &f)
    };
    let (mut level, start_level) = if opts.diffusion {
        let mut ds = Vec::new();
        let mut bar = progress.bar("diffusion", LEVELS as u64);
        for l in 0..LEVELS {
            ds.push(d_of(m, l, &mut at_level)?);
            bar.set(l as u64 + 1, || format!("d({l}) = {:.3}", ds[l]));
        }
        let best = (0..LEVELS)
            .min_by(|&a, &b| ds[a].total_cmp(&ds[b]))
            .unwrap_or(0);
        bar.finish(format!("start level {best}"));
        report.adaptability = ds;
        (best, best)
    } else {
        (0, 0)
    };
    let mut rng = Rng::new(opts.seed, 2);
    // (level, tensors) the next block can start from; see where `fp` and `qin` are gathered.
    let mut float_carry: Option<(usize, Carried)> = None;
    let mut quant_carry: Option<(usize, Range<usize>, Carried)> = None;
    let mut bar = progress.bar("reconstruct", (blocks.len() * opts.iters) as u64);
    for (bi, block) in blocks.iter().enumerate() {
        if opts.diffusion && bi > 0 && level > 0 {
            let (cur, cleaner) = (
                d_of(m, level, &mut at_level)?,
                d_of(m, level - 1, &mut at_level)?,
            );
            if cleaner < cur {
                level -= 1;
            }
            let cap =
                (start_level * (n_layer_blocks - 1 - bi)).div_ceil((n_layer_blocks - 1).max(1));
            level = level.min(cap);
        }
        report.levels.push(level);
        let x = at_level(level);
        let q = &m.q;
        let inside = |t: TensorId| block.clone().any(|i| q.nodes[i].output == t);
        let mut ins: Vec<TensorId> = Vec::new();
        for i in block.clone() {
            for &t in &q.nodes[i].inputs {
                if !inside(t) && !ins.contains(&t) {
                    ins.push(t);
                }
            }
        }
        let mut outs: Vec<TensorId> = Vec::new();
        for i in block.clone() {
            let t = q.nodes[i].output;
            let used_after = (block.end..q.nodes.len()).any(|j| q.nodes[j].inputs.contains(&t));
            if used_after || t == q.output {
                outs.push(t);
            }
        }
        // Quantized activations of the block, initialized from its float activations.
        let quantized: Vec<TensorId> = block
            .clone()
            .filter(|&i| m.quantizes_output(i))
            .map(|i| q.nodes[i].output)
            .collect();
        let mut want_f: Vec<TensorId> = ins.clone();
        want_f.extend(&outs);
        // The float values reaching this block, and the quantized ones, continue from the
        // previous block's where it ran on the same level: each block then runs once per pass
        // instead of the whole prefix again.
        let fp = match &float_carry {
            Some((l, vals))
                if *l == level
                    && ins
                        .iter()
                        .all(|t| *t == m.q.input || vals.iter().any(|v| v.0 == *t)) =>
            {
                gather_from(m, &x, vals, block.clone(), Mode::Float, &want_f)?
            }
            _ => gather(m, &x, 0..block.end, Mode::Float, &want_f)?,
        };
        float_carry = Some((
            level,
            outs.iter()
                .copied()
                .zip(fp[ins.len()..].iter().cloned())
                .collect(),
        ));
        let scales = |m: &QModel| -> Vec<ActQuant> {
            quantized.iter().map(|&t| m.q.tensors[t].quant).collect()
        };
        let set = |m: &mut QModel, qs: &[ActQuant]| {
            for (&t, &a) in quantized.iter().zip(qs) {
                m.q.tensors[t].quant = a;
            }
        };
        let k = n_samples.min(64);
        let stats = scales(m);
        if opts.act_init != ActInit::Stats {
            let init = gather(m, &x[..per * k], 0..block.end, Mode::Float, &quantized)?;
            for (&t, v) in quantized.iter().zip(&init) {
                let v = v.flatten_all()?.to_vec1::<f32>()?;
                let stride = (v.len() / 65536).max(1);
                let sub: Vec<f32> = v.iter().step_by(stride).copied().collect();
                let bits = m.q.tensors[t].quant.bits;
                m.q.tensors[t].quant = lp_act_quant(&sub, bits);
            }
        }
        if opts.act_init == ActInit::Best {
            // Block output error of the quantized prefix, against the float outputs.
            let err = |m: &QModel| -> Result<f64, Error> {
                let ys = gather(m, &x[..per * k], 0..block.end, Mode::Quant, &outs)?;
                let mut e = 0f64;
                for (y, f) in ys.iter().zip(&fp[ins.len()..]) {
                    let d = (y - f.narrow(0, 0, k)?)?.sqr()?.mean_all()?;
                    e += d.to_scalar::<f32>()? as f64;
                }
                Ok(e)
            };
            let (data, with_data) = (scales(m), err(m)?);
            set(m, &stats);
            if with_data < err(m)? {
                set(m, &data);
            }
        }
        report.act_init_data.push(scales(m) != stats);
        let qin = match quant_carry.take() {
            Some((l, prev, vals)) if l == level && prev.end == block.start => {
                let from_prev = ins.iter().all(|t| {
                    *t == m.q.input
                        || vals.iter().any(|v| v.0 == *t)
                        || prev.clone().any(|i| m.q.nodes[i].output == *t)
                });
                if from_prev {
                    gather_from(m, &x, &vals, prev, Mode::Quant, &ins)?
                } else {
                    gather(m, &x, 0..block.start, Mode::Quant, &ins)?
                }
            }
            _ => gather(m, &x, 0..block.start, Mode::Quant, &ins)?,
        };
        let (fp_in, fp_out) = fp.split_at(ins.len());
        // Trainable state.
        let mut rounding = Vec::new();
        for i in block.clone() {
            let Some(l) = m.q.nodes[i].op.layer() else {
                continue;
            };
            // Such a layer keeps its codes and takes part in training as quantized.
            let shape = &m.q.tensors[m.q.nodes[i].output].shape;
            let positions: usize = shape.get(2..).unwrap_or(&[]).iter().product();
            if ((n_samples * positions) as f64) < opts.min_rows_per_weight(l.bits) * l.k as f64 {
                report.nearest.push(m.q.nodes[i].name.clone());
                continue;
            }
            let max = code_max(l.bits) as f64;
            let (mut fl, mut v) = (
                Vec::with_capacity(l.weight.len()),
                Vec::with_capacity(l.weight.len()),
            );
            for (c, row) in l.weight.chunks_exact(l.k).enumerate() {
                for &w in row {
                    let r = w / l.scales[c];
                    let f = r.floor();
                    fl.push(f);
                    // h(v) equals the fractional part: rounding starts at the float weight.
                    let rest = ((r - f) as f64).clamp(1e-4, 1.0 - 1e-4);
                    v.push((-((ZETA - GAMMA) / (rest - GAMMA) - 1.0).ln()) as f32);
                }
            }
            let shape = m
                .float_weight(i)
                .map(|w| w.dims().to_vec())
                .ok_or_else(|| Error::Internal("layer without weights".into()))?;
            rounding.push(Rounding {
                node: i,
                v: Var::from_tensor(&Tensor::from_vec(v, (l.c_out, l.k), &dev)?)?,
                floor: Tensor::from_vec(fl, (l.c_out, l.k), &dev)?,
                scale0: Tensor::from_vec(l.scales.clone(), (l.c_out, 1), &dev)?,
                scale: Var::zeros((l.c_out, 1), candle_core::DType::F32, &dev)?,
                bias: Var::from_tensor(
                    m.float_bias(i)
                        .ok_or_else(|| Error::Internal("layer without bias".into()))?,
                )?,
                zero: Tensor::from_vec(
                    l.zeros.iter().map(|&z| z as f32).collect::<Vec<_>>(),
                    (l.c_out, 1),
                    &dev,
                )?,
                max,
                shape,
            });
        }
        let steps: Vec<(TensorId, Var)> = quantized
            .iter()
            .map(|&t| {
                Ok((
                    t,
                    Var::from_tensor(&Tensor::new(&[m.q.tensors[t].quant.scale], &dev)?)?,
                ))
            })
            .collect::<Result<_, Error>>()?;
        // An lr of 0 leaves that state out of training.
        let adam = |vars: Vec<Var>, lr: f64| {
            AdamW::new(
                if lr > 0.0 { vars } else { Vec::new() },
                ParamsAdamW {
                    lr,
                    weight_decay: 0.0,
                    ..Default::default()
                },
            )
        };
        let mut opts_all = [
            adam(
                rounding.iter().map(|r| r.v.clone()).collect(),
                opts.lr_round,
            )?,
            adam(
                rounding.iter().map(|r| r.scale.clone()).collect(),
                opts.lr_weight_scale,
            )?,
            adam(
                rounding.iter().map(|r| r.bias.clone()).collect(),
                opts.lr_bias,
            )?,
            // 4-bit steps stay where they start: learned on the synthetic samples they lost
            // 0.7–1.2 points on real images (README "Activations", the DiffDFQ table).
            adam(
                steps
                    .iter()
                    .filter(|(t, _)| m.q.tensors[*t].quant.bits >= 8)
                    .map(|(_, v)| v.clone())
                    .collect(),
                opts.lr_act,
            )?,
        ];
        let warm = opts.iters / 5;
        let mut last = f32::NAN;
        let idx_dev = |idx: &[usize]| {
            Tensor::from_vec(
                idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                idx.len(),
                &dev,
            )
        };
        for it in 0..opts.iters {
            let idx: Vec<usize> = (0..opts.batch.min(n_samples))
                .map(|_| rng.below(n_samples))
                .collect();
            let idx = idx_dev(&idx)?;
            let mut vals = vec![None; m.q.tensors.len()];
            for ((&t, f), qv) in ins.iter().zip(fp_in).zip(&qin) {
                let (f, qv) = (f.index_select(&idx, 0)?, qv.index_select(&idx, 0)?);
                let n = f.elem_count();
                let keep = Tensor::from_vec(Rng::coin_mask(&rng.coins(n), n), f.dims(), &dev)?;
                vals[t] = Some((&qv + (f - &qv)?.mul(&keep)?)?);
            }
            let mut ov = Overrides {
                weights: rounding
                    .iter()
                    .map(|r| Ok((r.node, r.soft_weight()?)))
                    .collect::<Result<_, Error>>()?,
                bias: if opts.lr_bias > 0.0 {
                    rounding
                        .iter()
                        .map(|r| (r.node, r.bias.as_tensor().clone()))
                        .collect()
                } else {
                    Default::default()
                },
                act_scale: steps
                    .iter()
                    .map(|(t, v)| (*t, v.as_tensor().clone()))
                    .collect(),
                qdrop: Some(&mut rng),
            };
            m.run(block.clone(), &mut vals, Mode::Quant, &mut ov, None)?;
            let mut rec = Tensor::zeros((), candle_core::DType::F32, &dev)?;
            for (&t, target) in outs.iter().zip(fp_out) {
                let y = vals[t]
                    .as_ref()
                    .ok_or_else(|| Error::Internal("block output not computed".into()))?;
                let d = (y - target.index_select(&idx, 0)?)?.sqr()?;
                let d = if d.rank() > 1 { d.sum(1)? } else { d };
                rec = (rec + d.mean_all()?)?;
            }
            let mut loss = rec.clone();
            if it >= warm && opts.round_weight > 0.0 {
                let frac = (it - warm) as f64 / (opts.iters - warm).max(1) as f64;
                let beta = 20.0 + (2.0 - 20.0) * frac;
                for r in &rounding {
                    let reg = (1.0 - r.h()?.affine(2.0, -1.0)?.abs()?.powf(beta)?)?.sum_all()?;
                    loss = (loss + (reg * opts.round_weight)?)?;
                }
            }
            let grads = loss.backward()?;
            for o in &mut opts_all {
                o.step(&grads)?;
            }
            last = rec.to_scalar::<f32>()?;
            bar.set((bi * opts.iters + it + 1) as u64, || {
                format!(
                    "block {}/{} level {level} loss {last:.5}",
                    bi + 1,
                    blocks.len()
                )
            });
        }
        // Hard decisions: round up where h(v) ≥ 0.5, i.e. v ≥ 0.
        for r in &rounding {
            let l = m.q.nodes[r.node]
                .op
                .layer()
                .ok_or_else(|| Error::Internal("layer".into()))?;
            let up =
                r.v.as_tensor()
                    .ge(0f32)?
                    .to_dtype(candle_core::DType::F32)?;
            let codes = (&r.floor + up)?
                .broadcast_add(&r.zero)?
                .clamp(0.0, r.max)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|&c| c as u8)
                .collect();
            // set_codes rejects non-finite or non-positive steps.
            let scales = r.step()?.flatten_all()?.to_vec1::<f32>()?;
            let zeros = l.zeros.clone();
            let bias = if opts.lr_bias > 0.0 {
                Some(r.bias.as_tensor().flatten_all()?.to_vec1::<f32>()?)
            } else {
                None
            };
            if let Some(l) = m.q.nodes[r.node].op.layer_mut() {
                l.set_codes(scales, zeros, codes)?;
                if let Some(bias) = bias {
                    if bias.iter().any(|b| !b.is_finite()) || bias.len() != l.bias.len() {
                        return Err(Error::Internal(format!(
                            "bias of '{}' diverged",
                            m.q.nodes[r.node].name
                        )));
                    }
                    l.bias = bias;
                }
            }
            // rtn's mean-neutral depthwise rows on top of the learned decisions: the synthetic
            // samples do not pin down the mean shift real inputs see (README "Calibration",
            // step 3: the document model at W3A8, 93.0 → 97.0 %).
            m.q.nodes[r.node].op.round_depthwise_rows_mean_neutral();
            m.refresh_weights(r.node)?;
        }
        for (t, v) in &steps {
            let s = v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let s = s.first().copied().unwrap_or(f32::NAN);
            if !(s.is_finite() && s > 0.0) {
                return Err(Error::Internal(format!(
                    "activation step of '{}' diverged to {s}",
                    m.q.tensors[*t].name
                )));
            }
            m.q.tensors[*t].quant.scale = s;
        }
        quant_carry = Some((level, block.clone(), ins.iter().copied().zip(qin).collect()));
        report.losses.push(last);
    }
    bar.finish(format!(
        "levels {:?}; {} of the layers kept round-to-nearest (too few samples per weight)",
        report.levels,
        report.nearest.len()
    ));
    // Ops that pass codes through share their input's quantization.
    for i in 0..m.q.nodes.len() {
        if matches!(m.q.nodes[i].op, QOp::MaxPool { .. } | QOp::Reshape) {
            let src = m.q.tensors[m.q.nodes[i].inputs[0]].quant;
            let out = m.q.nodes[i].output;
            m.q.tensors[out].quant = src;
        }
    }
    Ok(report)
}
