//! Mixed precision under a flash budget (`--flash`, fractional `--bits`): each conv/linear
//! layer's *sensitivity* — how much the network's output error grows when that layer alone
//! drops from 8 to 4, 3 or 2 weight bits, every other layer kept at 8, on held-out synthetic
//! samples — then the bit widths in {2, 3, 4, 8} that minimize the summed sensitivity while the
//! weight bytes fit the budget.
//!
//! The choice is a multiple-choice knapsack, solved exactly by dynamic programming over the
//! budget in units of at most [`UNITS`] steps (each option's bytes rounded *up* to a unit, so a
//! chosen assignment always fits). Exact DP rather than a Lagrangian relaxation: with a few
//! dozen layers and four options it costs milliseconds, and a Lagrangian can miss the best
//! point between two of its hull vertices by a whole layer's bytes, which on a small model is
//! most of the margin a budget gives.
//!
//! The summed single-layer sensitivities are the knapsack's objective, not the model's error:
//! the choice is then measured whole against the widest uniform model within the budget
//! ([`check_against_uniform`]) and the lower output MSE ships.

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::evaluate::{EvalOptions, HeldOut};
use crate::graph::Graph;
use crate::quant::qmodel::{Mode, QModel};
use crate::quant::{rtn, Bits, QOp, QuantGraph};
use crate::Error;

/// Weight bit widths a layer may take, lowest first.
pub const CHOICES: [u8; 4] = [2, 3, 4, 8];

/// Granularity of the knapsack: the budget is split into at most this many units.
const UNITS: usize = 20_000;

/// One layer's bytes and sensitivity at each of [`CHOICES`].
#[derive(Debug, Clone, Serialize)]
pub struct LayerSensitivity {
    pub name: String,
    /// Weight bytes (packed codes + channel records) at 2, 3, 4, 8 bits.
    pub bytes: [usize; 4],
    /// Increase of the output MSE against FP32 when this layer alone takes 2, 3, 4, 8 bits
    /// (0 at 8 by definition).
    pub sensitivity: [f64; 4],
}

/// One activation tensor's sensitivity to 4-bit codes.
#[derive(Debug, Clone, Serialize)]
pub struct ActSensitivity {
    pub name: String,
    /// Codes per sample (its share of the arena at one code per element).
    pub elements: usize,
    /// Increase of the output MSE against FP32 when this tensor alone (with the pools and
    /// reshapes that share its codes) takes the 4-bit codes `--act-bits 4` would give it,
    /// every other tensor at 8 bits.
    pub sensitivity: f64,
}

/// The per-layer widths `--flash` chose, with what they were chosen from.
#[derive(Debug, Clone)]
pub struct Assignment {
    /// Weight-bytes budget.
    pub budget: usize,
    pub layers: Vec<LayerSensitivity>,
    /// Chosen bits per layer, in graph order.
    pub bits: Vec<u8>,
    /// Per-tensor sensitivity to 4-bit activations (what `--arena` chooses from).
    pub activations: Vec<ActSensitivity>,
    /// The knapsack's choice measured whole against the widest uniform model that fits.
    pub joint: Option<JointCheck>,
}

/// Single-layer sensitivities add up to the knapsack's objective, but layers quantized together
/// interact: the chosen assignment and the widest uniform assignment within the budget are
/// each measured whole (every layer at its width at once, same probe) and the lower output MSE
/// ships. So `--flash` at a uniform model's bytes is never worse than it on the samples the
/// choice is made on.
#[derive(Debug, Clone, Serialize)]
pub struct JointCheck {
    /// Output MSE against FP32 with every layer at the knapsack's widths.
    pub knapsack_mse: f64,
    /// The uniform width (first/last layers at `first_last_bits`) compared, and its MSE.
    pub uniform_bits: u8,
    pub first_last_bits: u8,
    pub uniform_mse: f64,
    /// `"knapsack"` or `"uniform"`: which assignment shipped.
    pub kept: &'static str,
}

fn choice(b: u8) -> usize {
    CHOICES
        .iter()
        .position(|&c| c == b)
        .unwrap_or(CHOICES.len() - 1)
}

impl Assignment {
    /// Layer `j`'s sensitivity at its chosen width.
    pub fn chosen_sensitivity(&self, j: usize) -> Option<f64> {
        let (l, &b) = (self.layers.get(j)?, self.bits.get(j)?);
        Some(l.sensitivity[choice(b)])
    }

    /// Weight bytes of the chosen widths.
    pub fn used_bytes(&self) -> usize {
        self.layers
            .iter()
            .zip(&self.bits)
            .map(|(l, &b)| l.bytes[choice(b)])
            .sum()
    }

    /// `mixed_precision` of `NAME.report.json`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "budget_weight_bytes": self.budget,
            "choices": CHOICES,
            "layers": self.layers.iter().zip(&self.bits).map(|(l, b)| serde_json::json!({
                "name": l.name,
                "bits": b,
                "bytes": l.bytes,
                "sensitivity": l.sensitivity,
            })).collect::<Vec<_>>(),
            "activations_a4": self.activations,
            "joint_check": self.joint,
        })
    }
}

/// The rtn model the probes start from (8-bit weights, `act`-bit activations), the held-out
/// samples as a batch, and the float output on them.
struct Probe {
    m: QModel,
    x: Tensor,
    float: Tensor,
}

impl Probe {
    fn new(g: &Graph, act: u8, opts: &EvalOptions, held: &HeldOut) -> Result<Probe, Error> {
        let q = rtn_model(g, act, opts)?;
        let dev = Device::Cpu;
        let samples = held.samples.clone();
        let mut shape = q.tensors[q.input].shape.clone();
        let per: usize = shape[1..].iter().product();
        shape[0] = samples.len() / per.max(1);
        let x = Tensor::from_vec(samples, shape.as_slice(), &dev)?;
        let m = QModel::new(q, &dev)?;
        let float = m.forward(&x, Mode::Float)?;
        Ok(Probe { m, x, float })
    }

    /// Output MSE of the quantized model against FP32.
    fn mse(&self) -> Result<f64, Error> {
        let y = self.m.forward(&self.x, Mode::Quant)?;
        Ok((&y - &self.float)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64)
    }
}

fn rtn_model(g: &Graph, act: u8, opts: &EvalOptions) -> Result<QuantGraph, Error> {
    rtn::quantize(
        g,
        &rtn::RtnOptions {
            bits: Bits {
                weight: 8,
                act,
                first_last: 8,
            },
            seed: opts.seed,
            input_range: opts.input_range,
            ..Default::default()
        },
    )
}

/// Measures every layer's sensitivity on the held-out samples `held`. `act` is the
/// activation width the probes use.
pub fn sensitivities(
    g: &Graph,
    act: u8,
    opts: &EvalOptions,
    held: &HeldOut,
) -> Result<Vec<LayerSensitivity>, Error> {
    let mut p = Probe::new(g, act, opts, held)?;
    let base = p.mse()?;
    let layers: Vec<usize> = p.m.q.layers().collect();
    let mut out = Vec::with_capacity(layers.len());
    for i in layers {
        let orig = p.m.q.nodes[i]
            .op
            .layer()
            .cloned()
            .ok_or_else(|| Error::Internal("layer".into()))?;
        let mut bytes = [0; 4];
        let mut sens = [0.0; 4];
        for (k, &b) in CHOICES.iter().enumerate() {
            let l = p.m.q.nodes[i]
                .op
                .layer_mut()
                .ok_or_else(|| Error::Internal("layer".into()))?;
            *l = orig.clone();
            l.bits = b;
            // The clip search calibration starts from: the probe sees the error it will fix.
            l.quantize_lp();
            bytes[k] = l.packed_bytes();
            if b < 8 {
                p.m.refresh_weights(i)?;
                sens[k] = (p.mse()? - base).max(0.0);
            }
        }
        if let Some(l) = p.m.q.nodes[i].op.layer_mut() {
            *l = orig;
        }
        p.m.refresh_weights(i)?;
        out.push(LayerSensitivity {
            name: p.m.q.nodes[i].name.clone(),
            bytes,
            sensitivity: sens,
        });
    }
    Ok(out)
}

/// Each activation tensor's sensitivity to 4-bit codes on the held-out samples `held`: the
/// 8-bit rtn model with one tensor (and the pools and reshapes sharing its codes) given the
/// quantization the 4-bit rtn model gives it. The model's input and output stay 8-bit, as
/// `--act-bits 4` keeps them.
pub fn act_sensitivities(
    g: &Graph,
    opts: &EvalOptions,
    held: &HeldOut,
) -> Result<Vec<ActSensitivity>, Error> {
    let mut p = Probe::new(g, 8, opts, held)?;
    let q4 = rtn_model(g, 4, opts)?;
    if q4.tensors.len() != p.m.q.tensors.len() {
        return Err(Error::Internal(
            "act sensitivity: tensor lists differ".into(),
        ));
    }
    let base = p.mse()?;
    let passes = |op: &QOp| matches!(op, QOp::MaxPool { .. } | QOp::Reshape);
    let mut out = Vec::new();
    for t in 0..q4.tensors.len() {
        let carried =
            p.m.q
                .producer(t)
                .is_some_and(|i| passes(&p.m.q.nodes[i].op));
        if q4.tensors[t].quant.bits != 4 || carried {
            continue;
        }
        // `t` and the pass-through outputs that carry its codes on.
        let mut group = vec![t];
        let mut k = 0;
        while k < group.len() {
            let src = group[k];
            for n in &p.m.q.nodes {
                if n.inputs.first() == Some(&src) && passes(&n.op) {
                    group.push(n.output);
                }
            }
            k += 1;
        }
        let saved: Vec<_> = group.iter().map(|&u| p.m.q.tensors[u].quant).collect();
        for &u in &group {
            p.m.q.tensors[u].quant = q4.tensors[u].quant;
        }
        let sensitivity = (p.mse()? - base).max(0.0);
        for (&u, qt) in group.iter().zip(saved) {
            p.m.q.tensors[u].quant = qt;
        }
        let tensor = &p.m.q.tensors[t];
        out.push(ActSensitivity {
            name: tensor.name.clone(),
            elements: tensor.shape.iter().product(),
            sensitivity,
        });
    }
    Ok(out)
}

/// `--arena`: which activation tensors keep 8-bit codes under `--act-bits 4` so that the
/// arena fits the budget.
#[derive(Debug, Clone, Serialize)]
pub struct ArenaChoice {
    /// Arena-bytes budget.
    pub budget_arena_bytes: usize,
    /// The arena with every inner activation at 4 bits, and with the chosen tensors at 8.
    pub all_4bit_arena_bytes: usize,
    pub arena_bytes: usize,
    /// Tensors kept at 8 bits, most sensitive first (MaxPool and Reshape outputs follow
    /// their inputs).
    pub act8: Vec<String>,
}

/// Chooses the tensors of `sens` that keep 8-bit codes: most sensitive first, each kept where
/// the arena of the model `base` describes (rtn, lowered for `isa`, its 4-bit tensors two
/// codes per byte) still fits `budget` with it, or shrinks — so a tensor off the arena's peak
/// stays at 8 bits for free; and from all-8-bit down, least sensitive first, each lowered to
/// 4 bits where that shrinks the arena, until it fits. Of the two, the one that fits and
/// leaves the least summed sensitivity at 4 bits. The arena is not monotone in the bits: an
/// 8-bit tensor needs no staging in the scratch region, and the planner packs other sizes
/// differently, so all-4-bit is not always the least. Greedy rather than exact: the arena is
/// a peak over the program, not a sum, and each step is one lowering. A one-line error when
/// nothing either pass found fits.
pub fn choose_act_bits(
    g: &Graph,
    base: &rtn::RtnOptions,
    isa: diffdfq_runtime::kernels::Isa,
    sens: &[ActSensitivity],
    budget: usize,
) -> Result<ArenaChoice, Error> {
    let arena = |act8: &[String]| -> Result<usize, Error> {
        let mut o = base.clone();
        o.act8 = act8.to_vec();
        let q = rtn::quantize(g, &o)?;
        Ok(crate::lower::lower_for(&q, isa)?.arena_size)
    };
    let all4 = arena(&[])?;
    // Every tensor, those the probe measured no loss on included: one off the peak keeps 8
    // bits for free, and the probe's few samples may miss what real inputs hit.
    let mut order: Vec<&ActSensitivity> = sens.iter().collect();
    order.sort_by(|a, b| {
        b.sensitivity
            .total_cmp(&a.sensitivity)
            .then_with(|| a.name.cmp(&b.name))
    });
    let mut act8: Vec<String> = Vec::new();
    let mut used = all4;
    for s in &order {
        act8.push(s.name.clone());
        let a = arena(&act8)?;
        if a <= budget || a < used {
            used = a;
        } else {
            act8.pop();
        }
    }
    // From the other end: every tensor at 8 bits, the least sensitive lowered to 4 where that
    // shrinks the arena, until it fits. The forward pass cannot leave a peak made of staging
    // (a 4-bit tensor between 8-bit ones still stages, so no single step shrinks it: the
    // text-line model of "Real models" needed more at all-4-bit than at all-8-bit).
    let mut back: Vec<String> = order.iter().map(|s| s.name.clone()).collect();
    let mut back_used = arena(&back)?;
    for s in order.iter().rev() {
        if back_used <= budget {
            break;
        }
        let trial: Vec<String> = back.iter().filter(|n| **n != s.name).cloned().collect();
        let a = arena(&trial)?;
        if a < back_used {
            back = trial;
            back_used = a;
        }
    }
    // Of the two that fit, the one whose 4-bit tensors cost less.
    let cost = |act8: &[String]| -> f64 {
        order
            .iter()
            .filter(|s| !act8.contains(&s.name))
            .map(|s| s.sensitivity.max(0.0))
            .sum()
    };
    let forward_fits = used <= budget;
    if back_used <= budget && (!forward_fits || cost(&back) < cost(&act8)) {
        (act8, used) = (back, back_used);
    }
    if used > budget {
        let least = used.min(back_used);
        return Err(Error::Input(format!(
            "--arena {budget} B: no assignment fits; the least arena found is {least} B (every \
             activation at 4 bits: {all4} B)"
        )));
    }
    Ok(ArenaChoice {
        budget_arena_bytes: budget,
        all_4bit_arena_bytes: all4,
        arena_bytes: used,
        act8,
    })
}

/// The weight bytes of a uniform `bits`-bit model with the first and last layers at
/// `first_last` bits, as [`Bits`] lays it out.
pub fn uniform_bytes(layers: &[LayerSensitivity], bits: u8, first_last: u8) -> usize {
    uniform_widths(layers.len(), bits, first_last)
        .iter()
        .zip(layers)
        .map(|(&b, l)| l.bytes[choice(b)])
        .sum()
}

/// The widths of the uniform `bits`-bit model with the first and last layers at `first_last`.
pub fn uniform_widths(n: usize, bits: u8, first_last: u8) -> Vec<u8> {
    (0..n)
        .map(|i| {
            if i == 0 || i + 1 == n {
                first_last
            } else {
                bits
            }
        })
        .collect()
}

/// Output MSE against FP32 of the rtn model (activations at `act` bits) with layer `j` at
/// `widths[j]` bits (the Lp clip search, as the sensitivities), all at once.
fn joint_mse(p: &mut Probe, widths: &[u8]) -> Result<f64, Error> {
    let layers: Vec<usize> = p.m.q.layers().collect();
    if layers.len() != widths.len() {
        return Err(Error::Internal(format!(
            "joint check: {} widths for {} layers",
            widths.len(),
            layers.len()
        )));
    }
    let saved: Vec<_> = layers
        .iter()
        .map(|&i| p.m.q.nodes[i].op.layer().cloned())
        .collect();
    for (&i, &b) in layers.iter().zip(widths) {
        if let Some(l) = p.m.q.nodes[i].op.layer_mut() {
            l.bits = b;
            l.quantize_lp();
        }
        p.m.refresh_weights(i)?;
    }
    let mse = p.mse();
    for (&i, orig) in layers.iter().zip(saved) {
        if let (Some(l), Some(o)) = (p.m.q.nodes[i].op.layer_mut(), orig) {
            *l = o;
        }
        p.m.refresh_weights(i)?;
    }
    mse
}

/// Measures the knapsack's `chosen` widths whole against the widest uniform model within
/// `budget` (see [`JointCheck`]) and returns the widths to ship with the comparison; `chosen`
/// unchanged (and no check) when no uniform model fits.
#[allow(clippy::too_many_arguments)]
pub fn check_against_uniform(
    g: &Graph,
    act: u8,
    opts: &EvalOptions,
    held: &HeldOut,
    layers: &[LayerSensitivity],
    chosen: Vec<u8>,
    budget: usize,
    first_last: u8,
) -> Result<(Vec<u8>, Option<JointCheck>), Error> {
    let Some(&uniform_bits) = CHOICES
        .iter()
        .rev()
        .find(|&&b| uniform_bytes(layers, b, first_last) <= budget)
    else {
        return Ok((chosen, None));
    };
    let uniform = uniform_widths(layers.len(), uniform_bits, first_last);
    if uniform == chosen {
        return Ok((chosen, None));
    }
    let mut p = Probe::new(g, act, opts, held)?;
    let knapsack_mse = joint_mse(&mut p, &chosen)?;
    let uniform_mse = joint_mse(&mut p, &uniform)?;
    // Ties keep the knapsack's choice: the check only overrules a measured loss.
    let keep_uniform = uniform_mse < knapsack_mse;
    let check = JointCheck {
        knapsack_mse,
        uniform_bits,
        first_last_bits: first_last,
        uniform_mse,
        kept: if keep_uniform { "uniform" } else { "knapsack" },
    };
    Ok((if keep_uniform { uniform } else { chosen }, Some(check)))
}

/// The bit width per layer that minimizes the summed sensitivity with at most `budget` weight
/// bytes; a one-line error when even every layer at 2 bits exceeds it.
pub fn choose(layers: &[LayerSensitivity], budget: usize) -> Result<Vec<u8>, Error> {
    let least: usize = layers.iter().map(|l| l.bytes[0]).sum();
    if least > budget {
        return Err(Error::Input(format!(
            "--flash {budget} B: no assignment fits; every layer at 2 bits takes {least} B"
        )));
    }
    let unit = budget.div_ceil(UNITS).max(1);
    let cap = budget / unit;
    let cost = |b: usize| b.div_ceil(unit);
    // best[j]: least summed sensitivity of the layers so far within j units; pick[l][j] the
    // choice layer l takes there.
    let mut best = vec![0.0f64; cap + 1];
    let mut pick = vec![vec![u8::MAX; cap + 1]; layers.len()];
    for (li, l) in layers.iter().enumerate() {
        let mut next = vec![f64::INFINITY; cap + 1];
        for j in 0..=cap {
            for k in 0..CHOICES.len() {
                let c = cost(l.bytes[k]);
                if c <= j && best[j - c].is_finite() {
                    let v = best[j - c] + l.sensitivity[k];
                    // Ties go to more bits (k grows): same error, fewer surprises.
                    if v <= next[j] {
                        next[j] = v;
                        pick[li][j] = k as u8;
                    }
                }
            }
        }
        best = next;
    }
    // Rounding bytes up to units can make the all-2-bit assignment miss a budget it fits.
    if !best[cap].is_finite() {
        return Ok(vec![2; layers.len()]);
    }
    let mut j = cap;
    let mut bits = vec![0u8; layers.len()];
    for li in (0..layers.len()).rev() {
        let k = pick[li][j] as usize;
        bits[li] = CHOICES[k];
        j -= cost(layers[li].bytes[k]);
    }
    Ok(bits)
}

/// Parses `--flash` or `--arena` (`flag`): bytes with an optional `K`/`M` suffix (powers of
/// 1024).
pub fn parse_bytes(flag: &str, s: &str) -> Result<usize, Error> {
    let t = s.trim();
    let (num, mul) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1024.0),
        Some('M' | 'm') => (&t[..t.len() - 1], 1024.0 * 1024.0),
        _ => (t, 1.0),
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok((v * mul) as usize),
        _ => Err(Error::Input(format!(
            "{flag} takes bytes, e.g. 48000, 48K or 1.5M; got '{s}'"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(bytes: [usize; 4], sensitivity: [f64; 4]) -> LayerSensitivity {
        LayerSensitivity {
            name: String::new(),
            bytes,
            sensitivity,
        }
    }

    /// Exhaustive search over every assignment: the DP must find the same optimum.
    #[test]
    fn the_knapsack_finds_the_exhaustive_optimum() {
        let layers = vec![
            layer([100, 150, 200, 400], [9.0, 3.0, 1.0, 0.0]),
            layer([1000, 1500, 2000, 4000], [0.5, 0.2, 0.1, 0.0]),
            layer([50, 75, 100, 200], [20.0, 4.0, 0.5, 0.0]),
            layer([300, 450, 600, 1200], [2.0, 1.0, 0.3, 0.0]),
        ];
        for budget in [1450, 1700, 2000, 2600, 3300, 6000] {
            let mut best = (f64::INFINITY, usize::MAX);
            for code in 0..256usize {
                let ks: Vec<usize> = (0..4).map(|l| (code >> (2 * l)) & 3).collect();
                let bytes: usize = ks.iter().zip(&layers).map(|(&k, l)| l.bytes[k]).sum();
                let s: f64 = ks.iter().zip(&layers).map(|(&k, l)| l.sensitivity[k]).sum();
                if bytes <= budget && s < best.0 {
                    best = (s, bytes);
                }
            }
            let bits = choose(&layers, budget).unwrap();
            let at = |b: u8| CHOICES.iter().position(|&c| c == b).unwrap();
            let s: f64 = bits
                .iter()
                .zip(&layers)
                .map(|(&b, l)| l.sensitivity[at(b)])
                .sum();
            let bytes: usize = bits.iter().zip(&layers).map(|(&b, l)| l.bytes[at(b)]).sum();
            assert!(bytes <= budget, "{budget}: {bytes} B");
            assert!((s - best.0).abs() < 1e-9, "{budget}: {s} vs {}", best.0);
        }
    }

    #[test]
    fn a_budget_below_every_layer_at_two_bits_is_an_error() {
        let layers = vec![layer([100, 150, 200, 400], [1.0, 0.5, 0.1, 0.0])];
        let e = choose(&layers, 99).unwrap_err().to_string();
        assert_eq!(
            e,
            "--flash 99 B: no assignment fits; every layer at 2 bits takes 100 B"
        );
        assert_eq!(choose(&layers, 100).unwrap(), vec![2]);
    }

    #[test]
    fn flash_sizes_parse() {
        assert_eq!(parse_bytes("--flash", "48000").unwrap(), 48000);
        assert_eq!(parse_bytes("--flash", "48K").unwrap(), 49152);
        assert_eq!(parse_bytes("--flash", "1.5M").unwrap(), 1572864);
        assert!(parse_bytes("--flash", "-3").is_err() && parse_bytes("--flash", "x").is_err());
    }
}
