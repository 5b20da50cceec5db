//! The summary printed after a compile: one row per op of the lowered model, then totals and
//! the held-out quality figures, so a firmware engineer sees which layer costs the bytes and
//! which one carries the error.

use std::fmt::Write;

use crate::evaluate::Evaluation;
use crate::lower::Lowered;
use crate::mixed::Assignment;

/// Widest layer name shown; longer names keep their tail (exporters put the distinguishing
/// part last, e.g. `/features/features.3/conv/conv.1/Conv`).
const NAME_W: usize = 30;

fn tail(s: &str, w: usize) -> String {
    let n = s.chars().count();
    if n <= w {
        s.to_string()
    } else {
        let t: String = s.chars().skip(n - (w - 1)).collect();
        format!("…{t}")
    }
}

fn shape(s: &[usize]) -> String {
    s.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("x")
}

/// `1234567` → `1.23 M`.
fn si(v: f64) -> String {
    match v {
        v if v >= 1e9 => format!("{:.2} G", v / 1e9),
        v if v >= 1e6 => format!("{:.2} M", v / 1e6),
        v if v >= 1e3 => format!("{:.1} k", v / 1e3),
        v => format!("{v:.0} "),
    }
}

/// The table and totals. `stages` are (stage, seconds) pairs for the timing line; none omits it.
/// With `mixed` (per-layer bits chosen by sensitivity) a column shows each weighted op's
/// sensitivity at its chosen width.
pub fn render(
    l: &Lowered,
    eval: Option<&Evaluation>,
    mixed: Option<&Assignment>,
    stages: &[(&str, f64)],
) -> String {
    let mut s = String::new();
    let sqnr = |i: usize| eval.and_then(|e| e.sqnr_db.get(i).copied().flatten());
    let _ = write!(
        s,
        "{:<NAME_W$}  {:<16} {:<14} {:>2} {:>2} {:>9} {:>9} {:>7}",
        "layer", "op", "output", "W", "A", "weight B", "MACs", "SQNR dB"
    );
    s.push_str(if mixed.is_some() {
        "  sensitivity\n"
    } else {
        "\n"
    });
    let mut weighted = 0;
    for (i, x) in l.layers.iter().enumerate() {
        let w = x.weight_bits.map_or("-".to_string(), |b| b.to_string());
        let a = if x.act_bits == 32 {
            "f".to_string()
        } else if !x.stored {
            format!("{}*", x.act_bits)
        } else {
            x.act_bits.to_string()
        };
        let q = sqnr(i).map_or("-".to_string(), |v| format!("{v:.1}"));
        let _ = write!(
            s,
            "{:<NAME_W$}  {:<16} {:<14} {:>2} {:>2} {:>9} {:>9} {:>7}",
            tail(&x.name, NAME_W),
            x.op,
            shape(&x.out_shape),
            w,
            a,
            x.weight_bytes,
            si(x.macs as f64).trim_end(),
            q
        );
        match mixed {
            Some(m) if x.weight_bits.is_some() => {
                let v = m.chosen_sensitivity(weighted);
                weighted += 1;
                let v = match v {
                    Some(v) if v > 0.0 => format!("{v:.2e}"),
                    Some(_) => "0".into(),
                    None => "-".into(),
                };
                let _ = writeln!(s, "  {v:>11}");
            }
            _ => s.push('\n'),
        }
    }
    if l.layers.iter().any(|x| !x.stored) {
        let _ = writeln!(
            s,
            "* runs fused with the activation table after it: its codes are never stored"
        );
    }
    let (wb, fb) = l.weight_bytes();
    let _ = writeln!(
        s,
        "flash: weights {wb} B ({:.1}x smaller than FP32 {fb} B), model {} B; arena {} B (lower \
         bound {} B); {}MAC per inference",
        fb as f64 / wb.max(1) as f64,
        l.blob.len(),
        l.arena_size,
        l.arena_lower_bound,
        si(l.macs() as f64)
    );
    if let Some(e) = eval {
        let out = e.sqnr_db.last().copied().flatten();
        let _ = write!(
            s,
            "held-out: {} {} samples{}",
            e.samples,
            e.source,
            if e.synth_iters > 0 {
                format!(" ({} synthesis iterations)", e.synth_iters)
            } else {
                String::new()
            }
        );
        if let Some(a) = e.top1_agreement {
            let _ = write!(
                s,
                ": top-1 of the integer runtime agrees with FP32 on {:.1} %",
                a * 100.0
            );
        }
        if let Some(o) = out {
            let _ = write!(s, "; output SQNR {o:.1} dB");
        }
        s.push('\n');
    }
    if !stages.is_empty() {
        let t: Vec<String> = stages
            .iter()
            .map(|(n, secs)| format!("{n} {secs:.1} s"))
            .collect();
        let _ = writeln!(s, "time: {}", t.join(", "));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_keep_their_tail() {
        assert_eq!(tail("conv1", 30), "conv1");
        let t = tail("/features/features.13/conv/conv.0/conv.0.0/Conv", 20);
        assert_eq!(t.chars().count(), 20);
        assert!(t.ends_with("conv.0.0/Conv") && t.starts_with('…'));
    }

    #[test]
    fn si_units() {
        assert_eq!(si(999.0).trim_end(), "999");
        assert_eq!(si(2_700_000.0), "2.70 M");
        assert_eq!(si(300_000_000_000.0), "300.00 G");
    }
}
