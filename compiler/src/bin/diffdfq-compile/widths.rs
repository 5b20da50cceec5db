//! The target, the CPU and the widths a compile uses, checked before any work, and per-layer
//! widths from a flash budget.

use diffdfq_compiler::emit;
use diffdfq_compiler::quant::Bits;
use diffdfq_compiler::{evaluate, mixed, Error};

use super::Args;

/// The target, the CPU `--cpu` names and the kernels they give, with the header's line for
/// them; checked before calibration, so that a wrong name costs no minutes.
#[allow(clippy::type_complexity)]
pub(crate) fn resolve_target(
    a: &Args,
) -> Result<
    (
        &'static diffdfq_targets::Target,
        Option<emit::runtime_lib::Cpu>,
        diffdfq_runtime::kernels::Isa,
        String,
    ),
    Error,
> {
    let target = match &a.target {
        Some(t) => diffdfq_targets::lookup(t).map_err(|e| Error::Input(e.to_string()))?,
        None => diffdfq_targets::host().ok_or_else(|| {
            Error::Input(format!(
                "this machine is no known target; pass --target ({})",
                diffdfq_targets::known_names()
            ))
        })?,
    };
    let cpu = match (&a.cpu, a.no_lib) {
        (Some(_), true) => {
            return Err(Error::Input(
                "--cpu chooses the kernels of libNAME.a, which --no-lib skips".into(),
            ))
        }
        (Some(c), false) => Some(emit::runtime_lib::Cpu::resolve(target, c)?),
        (None, _) => None,
    };
    let isa = emit::runtime_lib::kernels(target, cpu.as_ref());
    let kernels = isa.name();
    let kernels_line = match &cpu {
        Some(c) => format!(
            "{kernels} (--cpu {}{})",
            c.name,
            c.resolved
                .as_deref()
                .map(|r| format!(" = {r}"))
                .unwrap_or_default()
        ),
        None => format!("{kernels} (the target's baseline; --cpu chooses others)"),
    };
    Ok((target, cpu, isa, kernels_line))
}

/// `--bits` as a whole width (None for a fraction), the widths, and `--input-range`, each
/// checked.
#[allow(clippy::type_complexity)]
pub(crate) fn check_widths(a: &Args) -> Result<(Option<u8>, Bits, Option<(f32, f32)>), Error> {
    let whole = (a.bits.fract() == 0.0 && (2.0..=8.0).contains(&a.bits)).then_some(a.bits as u8);
    let bits = Bits {
        weight: whole.unwrap_or(2),
        act: a.act_bits,
        first_last: a.first_last_bits,
    };
    let wb = diffdfq_runtime::format::WEIGHT_BITS;
    if a.act_bits != 8 && a.act_bits != 4 {
        return Err(Error::Input(format!(
            "--act-bits {}: takes 8 or 4",
            a.act_bits
        )));
    }
    if let Some(s) = &a.arena {
        mixed::parse_bytes("--arena", s)?;
        if a.act_bits != 4 {
            return Err(Error::Input(
                "--arena chooses which tensors keep 8-bit codes under 4-bit activations; \
                 add --act-bits 4"
                    .into(),
            ));
        }
    }
    if !wb.contains(&a.first_last_bits) {
        return Err(Error::Input(format!(
            "--first-last-bits {}: takes 2, 3, 4 or 8",
            a.first_last_bits
        )));
    }
    if let Some(b) = a.layer_bits.iter().flatten().find(|b| !wb.contains(b)) {
        return Err(Error::Input(format!(
            "--layer-bits: {b} is not a weight width (takes 2, 3, 4 or 8)"
        )));
    }
    // --flash conflicts with --bits, which then keeps its valid default.
    let whole_ok = whole.is_some_and(|b| wb.contains(&b));
    let fraction_ok = whole.is_none() && a.bits > 2.0 && a.bits < 8.0;
    if !whole_ok && !fraction_ok {
        return Err(Error::Input(format!(
            "--bits {}: takes 2, 3, 4 or 8, or a fraction between 2 and 8 for mixed precision",
            a.bits
        )));
    }
    let input_range = match a.input_range.as_deref() {
        None => None,
        Some(&[lo, hi]) if lo.is_finite() && hi.is_finite() && lo < hi => Some((lo, hi)),
        Some(v) => {
            return Err(Error::Input(format!(
                "--input-range takes LO,HI with LO < HI (finite), got {v:?}"
            )))
        }
    };
    Ok((whole, bits, input_range))
}

/// Per-layer weight widths from `--flash` or a fractional `--bits` (sensitivities on the
/// held-out samples, which it synthesizes into `held_out`); None for uniform widths or
/// `--layer-bits`. Sets `bits.weight` to the narrowest width chosen.
#[allow(clippy::too_many_arguments)]
pub(crate) fn choose_widths(
    a: &Args,
    graph: &diffdfq_compiler::graph::Graph,
    whole: Option<u8>,
    bits: &mut Bits,
    eval_opts: &evaluate::EvalOptions,
    held_out: &mut Option<evaluate::HeldOut>,
    stages: &mut Vec<(&'static str, f64)>,
) -> Result<Option<mixed::Assignment>, Error> {
    let quiet = a.quiet();
    Ok(
        if a.layer_bits.is_none() && (a.flash.is_some() || whole.is_none()) {
            let t0 = std::time::Instant::now();
            let held = held_out.insert(
                evaluate::held_out_samples(graph, eval_opts)
                    .map_err(|e| e.context(&a.model.display().to_string()))?,
            );
            let sens = mixed::sensitivities(graph, bits.act, eval_opts, held)
                .map_err(|e| e.context(&a.model.display().to_string()))?;
            let budget = match &a.flash {
                Some(f) => mixed::parse_bytes("--flash", f)?,
                None => {
                    // Between the uniform models of the neighbouring widths, by the fraction.
                    let lo = mixed::CHOICES.iter().rev().find(|&&c| (c as f32) < a.bits);
                    let hi = mixed::CHOICES.iter().find(|&&c| (c as f32) > a.bits);
                    let (Some(&lo), Some(&hi)) = (lo, hi) else {
                        return Err(Error::Internal("--bits interpolation".into()));
                    };
                    let (blo, bhi) = (
                        mixed::uniform_bytes(&sens, lo, bits.first_last) as f64,
                        mixed::uniform_bytes(&sens, hi, bits.first_last) as f64,
                    );
                    (blo + (bhi - blo) * (a.bits - lo as f32) as f64 / (hi - lo) as f64) as usize
                }
            };
            let chosen = mixed::choose(&sens, budget)?;
            let (chosen, joint) = mixed::check_against_uniform(
                graph,
                bits.act,
                eval_opts,
                held,
                &sens,
                chosen,
                budget,
                bits.first_last,
            )
            .map_err(|e| e.context(&a.model.display().to_string()))?;
            bits.weight = chosen.iter().copied().min().unwrap_or(2);
            let secs = t0.elapsed().as_secs_f64();
            stages.push(("sensitivity", secs));
            let t1 = std::time::Instant::now();
            let activations = mixed::act_sensitivities(graph, eval_opts, held)
                .map_err(|e| e.context(&a.model.display().to_string()))?;
            stages.push(("activation sensitivity", t1.elapsed().as_secs_f64()));
            let m = mixed::Assignment {
                budget,
                layers: sens,
                bits: chosen,
                activations,
                joint,
            };
            if !quiet {
                eprintln!(
                    "mixed precision: {} layers at {:?} bits, {} of {budget} weight bytes \
                 (sensitivity of {} layers on {} held-out samples, {secs:.1} s)",
                    m.bits.len(),
                    m.bits,
                    m.used_bytes(),
                    m.layers.len(),
                    eval_opts.samples
                );
                if let Some(j) = &m.joint {
                    eprintln!(
                        "mixed precision: whole-model check, output MSE {:.4} with these widths, \
                         {:.4} uniform W{} (first/last {}): kept the {}",
                        j.knapsack_mse, j.uniform_mse, j.uniform_bits, j.first_last_bits, j.kept
                    );
                }
            }
            Some(m)
        } else {
            None
        },
    )
}
