//! `--budget MINUTES`: calibration settings sized from the model so that a compile fits a
//! time budget on 2 cores. The plan reads only the model's MACs and layer count, the budget
//! and the flags the user fixed — never a clock — so the same model, flags and seed give the
//! same settings and bytes on any machine.
//!
//! The cost model is linear per sample and pass: `a·MACs + b·layers` seconds, with `a` and `b`
//! fitted per stage on this project's 2-core reference machine from MobileNetV2 (300 MMAC,
//! 53 layers) and the MobileNet fixture (2.7 MMAC, 29 layers) with the release binary, then
//! raised 1.3× because a dev-profile compile of the document-orientation model at
//! `--budget 10` (estimated 8.6 min) took 11.2 min (README, Real models).

use serde::Serialize;

use super::synth::LEVELS;

/// Seconds per sample and pass, as `(per MAC, per layer)`.
#[derive(Debug, Clone, Copy)]
struct Rate(f64, f64);

impl Rate {
    fn secs(self, m: &ModelSize) -> f64 {
        self.0 * m.macs as f64 + self.1 * m.layers as f64
    }
}

/// One synthesis iteration of one sample: teacher and quantized student, forward and backward.
const SYNTH: Rate = Rate(1.1e-9, 1.3e-4);
/// One forward pass of one sample (float or fake-quantized).
const FORWARD: Rate = Rate(1.7e-10, 4.0e-5);
/// One reconstruction iteration of one sample through every block, forward and backward.
const RECON: Rate = Rate(1.3e-9, 2.3e-4);

/// What the cost model needs to know about a model.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ModelSize {
    /// Multiply-accumulates of one sample.
    pub macs: u64,
    /// Conv and linear layers (each starts at most one reconstruction block).
    pub layers: usize,
}

/// Calibration settings and what they are expected to cost.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Settings {
    pub samples: usize,
    pub synth_iters: usize,
    pub recon_iters: usize,
    pub recon_batch: usize,
    /// Samples the diffusion level's adaptability is measured on.
    pub eval_samples: usize,
}

/// The settings the budget chose and their estimate.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Plan {
    pub budget_minutes: f64,
    #[serde(flatten)]
    pub settings: Settings,
    /// Expected calibration time on 2 cores, in seconds.
    pub estimate_s: f64,
    /// Of which synthesis (the rest is reconstruction), so a run can be compared per stage.
    pub estimate_synthesis_s: f64,
    /// False when even the leanest settings exceed the budget (they are used anyway).
    pub fits: bool,
}

/// Settings the user fixed with flags; the plan chooses the others.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fixed {
    pub samples: Option<usize>,
    pub synth_iters: Option<usize>,
    pub recon_iters: Option<usize>,
}

/// The recipe's own settings (64 samples × 400 synthesis iterations, 200 reconstruction
/// iterations at batch 32), used whenever they fit.
pub const FULL: Settings = Settings {
    samples: 64,
    synth_iters: 400,
    recon_iters: 200,
    recon_batch: 32,
    eval_samples: 64,
};

/// Expected seconds of calibration with `s` (synthesis, the diffusion scan, the per-block
/// level checks and activation passes, and reconstruction training).
pub fn estimate(m: &ModelSize, s: &Settings, diffusion: bool) -> f64 {
    let (synth, recon) = estimate_stages(m, s, diffusion);
    synth + recon
}

/// [`estimate`] split into synthesis and reconstruction seconds.
pub fn estimate_stages(m: &ModelSize, s: &Settings, diffusion: bool) -> (f64, f64) {
    let (n, e) = (s.samples as f64, s.eval_samples.min(s.samples) as f64);
    let fwd = FORWARD.secs(m);
    let synth = s.synth_iters as f64 * n * SYNTH.secs(m);
    // Each block: float and quantized activations of every sample (about one pass), and
    // with diffusion the quantized logits at two levels.
    let blocks = m.layers as f64;
    let mut fixed = blocks * n * fwd;
    if diffusion {
        fixed += (2 * LEVELS) as f64 * e * fwd + blocks * 2.0 * e * fwd;
    }
    let train = s.recon_iters as f64 * s.recon_batch.min(s.samples) as f64 * RECON.secs(m);
    (synth, fixed + train)
}

/// Expected seconds of synthesizing `samples` inputs over `iters` iterations.
pub fn synthesis_estimate(m: &ModelSize, samples: usize, iters: usize) -> f64 {
    (samples * iters) as f64 * SYNTH.secs(m)
}

/// Synthesis steps from richest to leanest: (samples, iterations). Fewer samples go before
/// fewer iterations: sample quality measured worth more than count (see `SynthOptions`).
const SYNTH_LADDER: [(usize, usize); 11] = [
    (64, 400),
    (32, 400),
    (32, 300),
    (32, 200),
    (24, 200),
    (16, 200),
    (16, 150),
    (16, 100),
    (16, 50),
    (8, 50),
    (8, 25),
];
/// Most samples the adaptability is measured on.
const EVAL_MAX: usize = 256;
/// Reconstruction iterations per block, richest to leanest.
const RECON_LADDER: [usize; 7] = [200, 150, 100, 75, 50, 35, 25];
/// Share of the budget synthesis may take when the full recipe does not fit.
const SYNTH_SHARE: f64 = 0.45;

/// The richest settings whose estimate fits `minutes`: the full recipe if it fits; else the
/// richest synthesis step within [`SYNTH_SHARE`] of the budget, then the most reconstruction
/// iterations within the rest.
pub fn plan(m: &ModelSize, minutes: f64, fixed: Fixed, diffusion: bool) -> Plan {
    let budget = minutes * 60.0;
    let with = |samples: usize, synth_iters: usize, recon_iters: usize| {
        let samples = fixed.samples.unwrap_or(samples);
        Settings {
            samples,
            synth_iters: fixed.synth_iters.unwrap_or(synth_iters),
            recon_iters: fixed.recon_iters.unwrap_or(recon_iters),
            recon_batch: FULL.recon_batch.min(samples),
            eval_samples: EVAL_MAX.min(samples),
        }
    };
    let done = |settings: Settings| {
        let (synth_s, recon_s) = estimate_stages(m, &settings, diffusion);
        let estimate_s = synth_s + recon_s;
        Plan {
            budget_minutes: minutes,
            settings,
            estimate_s,
            estimate_synthesis_s: synth_s,
            fits: estimate_s <= budget,
        }
    };
    let full = with(FULL.samples, FULL.synth_iters, FULL.recon_iters);
    if estimate(m, &full, diffusion) <= budget {
        return done(full);
    }
    let lean = *RECON_LADDER.last().unwrap_or(&25);
    let synth_cap = budget * SYNTH_SHARE;
    let (samples, synth_iters) = SYNTH_LADDER
        .iter()
        .copied()
        .find(|&(n, i)| {
            let s = with(n, i, lean);
            s.synth_iters as f64 * s.samples as f64 * SYNTH.secs(m) <= synth_cap
        })
        .unwrap_or(SYNTH_LADDER[SYNTH_LADDER.len() - 1]);
    let recon_iters = RECON_LADDER
        .iter()
        .copied()
        .find(|&r| estimate(m, &with(samples, synth_iters, r), diffusion) <= budget)
        .unwrap_or(lean);
    // Reconstruction at its full count leaves time: spend it on richer synthesis.
    let (samples, synth_iters) = if recon_iters == RECON_LADDER[0] {
        SYNTH_LADDER
            .iter()
            .copied()
            .find(|&(n, i)| estimate(m, &with(n, i, recon_iters), diffusion) <= budget)
            .unwrap_or((samples, synth_iters))
    } else {
        (samples, synth_iters)
    };
    done(with(samples, synth_iters, recon_iters))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOBILENET_V2: ModelSize = ModelSize {
        macs: 300_774_272,
        layers: 53,
    };

    #[test]
    fn small_models_keep_the_full_recipe() {
        let p = plan(
            &ModelSize {
                macs: 2_670_592,
                layers: 29,
            },
            10.0,
            Fixed::default(),
            true,
        );
        assert_eq!(p.settings, FULL);
        assert!(p.fits);
    }

    #[test]
    fn a_larger_budget_never_buys_less_and_every_plan_fits_when_it_can() {
        let mut last: Option<Settings> = None;
        for minutes in [5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 600.0] {
            let p = plan(&MOBILENET_V2, minutes, Fixed::default(), true);
            if p.fits {
                assert!(p.estimate_s <= minutes * 60.0);
            }
            if let Some(l) = last {
                let s = p.settings;
                assert!(
                    s.samples * s.synth_iters >= l.samples * l.synth_iters,
                    "{minutes}"
                );
                assert!(estimate(&MOBILENET_V2, &s, true) >= estimate(&MOBILENET_V2, &l, true));
            }
            last = Some(p.settings);
        }
        assert_eq!(last, Some(FULL));
    }

    #[test]
    fn fixed_flags_are_kept_and_the_rest_is_planned() {
        let fixed = Fixed {
            samples: Some(24),
            synth_iters: None,
            recon_iters: Some(40),
        };
        let p = plan(&MOBILENET_V2, 30.0, fixed, true);
        assert_eq!(p.settings.samples, 24);
        assert_eq!(p.settings.recon_iters, 40);
        assert_eq!(p.settings.recon_batch, 24);
        assert!(p.settings.synth_iters < FULL.synth_iters);
    }

    #[test]
    fn an_impossible_budget_says_so() {
        let p = plan(&MOBILENET_V2, 0.5, Fixed::default(), true);
        assert!(!p.fits);
        assert_eq!(p.settings.recon_iters, 25);
    }
}
