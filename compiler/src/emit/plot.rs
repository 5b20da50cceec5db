//! `NAME.report.svg`: per-layer weight bytes and, when measured, the held-out SQNR, one bar per
//! op in the order of the summary table, so the layer that costs the bytes and the layer that
//! carries the error are seen at a glance. With per-layer bits chosen by sensitivity
//! (`--flash`), a third panel plots each layer's sensitivity against its weight bytes at 2, 3,
//! 4 and 8 bits, the chosen width filled: the trade-off the knapsack saw.

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::evaluate::Evaluation;
use crate::lower::Lowered;
use crate::mixed::{Assignment, CHOICES};
use crate::Error;

const W: u32 = 1000;
const PANEL_H: u32 = 320;

fn err<E: std::fmt::Display>(e: E) -> Error {
    Error::Internal(format!("report.svg: {e}"))
}

/// One bar chart of `values` (op index → value) in `area`.
fn bars(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    caption: &str,
    y_desc: &str,
    values: &[(u32, f64)],
    n_ops: u32,
    color: RGBColor,
) -> Result<(), Error> {
    let top = values.iter().map(|v| v.1).fold(0.0, f64::max).max(1.0) * 1.1;
    let mut c = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.5f64..n_ops as f64 - 0.5, 0f64..top)
        .map_err(err)?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&|x| format!("{}", x.round() as i64))
        .x_desc("op (row of the summary table, from 0)")
        .y_desc(y_desc)
        .draw()
        .map_err(err)?;
    // Rectangles in op order (plotters' Histogram groups values in a hash map, whose order,
    // and so the document's bytes, would change from run to run).
    c.draw_series(values.iter().filter(|v| v.1 > 0.0).map(|&(i, v)| {
        Rectangle::new([(i as f64 - 0.4, 0.0), (i as f64 + 0.4, v)], color.filled())
    }))
    .map_err(err)?;
    Ok(())
}

/// Sensitivity against bytes, log–log: one line per layer through its widths, 8 bits (no
/// added error) drawn on the floor of the axis.
fn tradeoff(area: &DrawingArea<SVGBackend<'_>, Shift>, m: &Assignment) -> Result<(), Error> {
    let pos = m
        .layers
        .iter()
        .flat_map(|l| l.sensitivity)
        .filter(|&v| v > 0.0);
    let (lo, hi) = pos.fold((f64::INFINITY, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if hi > 0.0 {
        (lo / 10.0, hi * 2.0)
    } else {
        (1e-9, 1.0)
    };
    let bytes = m.layers.iter().flat_map(|l| l.bytes);
    let (bmin, bmax) = bytes.fold((usize::MAX, 1), |(a, b), v| (a.min(v), b.max(v)));
    let mut c = ChartBuilder::on(area)
        .caption(
            format!(
                "sensitivity vs weight bytes per layer at 2/3/4/8 bits; filled: chosen ({} of {} B)",
                m.used_bytes(),
                m.budget
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(64)
        .build_cartesian_2d(
            ((bmin.max(1) as f64 / 1.5)..(bmax as f64 * 1.5)).log_scale(),
            (lo..hi).log_scale(),
        )
        .map_err(err)?;
    c.configure_mesh()
        .light_line_style(WHITE)
        .x_labels(8)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .x_desc("weight bytes of the layer (log)")
        .y_desc("output MSE increase (log; 8 bits: floor)")
        .y_label_formatter(&|v| format!("{v:.0e}"))
        .draw()
        .map_err(err)?;
    let color = RGBColor(0x55, 0x55, 0x55);
    let accent = RGBColor(0xb0, 0x1c, 0x4a);
    for (l, &b) in m.layers.iter().zip(&m.bits) {
        let pts: Vec<(f64, f64)> = (0..CHOICES.len())
            .map(|k| (l.bytes[k] as f64, l.sensitivity[k].max(lo)))
            .collect();
        c.draw_series(LineSeries::new(pts.iter().copied(), color.mix(0.5)))
            .map_err(err)?;
        c.draw_series(pts.iter().enumerate().map(|(k, &p)| {
            if CHOICES[k] == b {
                Circle::new(p, 5, accent.filled())
            } else {
                Circle::new(p, 3, color.stroke_width(1))
            }
        }))
        .map_err(err)?;
    }
    Ok(())
}

/// The SVG document: a weight-bytes panel, an SQNR panel above it when `eval` is given, and
/// the sensitivity trade-off below when `mixed` is.
pub fn render(
    l: &Lowered,
    eval: Option<&Evaluation>,
    mixed: Option<&Assignment>,
) -> Result<String, Error> {
    let n = l.layers.len() as u32;
    let bytes: Vec<(u32, f64)> = l
        .layers
        .iter()
        .enumerate()
        .map(|(i, x)| (i as u32, x.weight_bytes as f64))
        .collect();
    let sqnr: Option<Vec<(u32, f64)>> = eval.map(|e| {
        e.sqnr_db
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (i as u32, v.max(0.0))))
            .collect()
    });
    let panels = 1 + sqnr.is_some() as u32 + mixed.is_some() as u32;
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (W, PANEL_H * panels)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let areas = root.split_evenly((panels as usize, 1));
        if let Some(q) = &sqnr {
            let e = eval.map(|e| (e.samples, e.source)).unwrap_or_default();
            bars(
                &areas[0],
                &format!(
                    "SQNR of each op's output, fake-quantized vs FP32 ({} held-out {} samples)",
                    e.0, e.1
                ),
                "SQNR (dB)",
                q,
                n,
                RGBColor(0x2b, 0x6c, 0xb0),
            )?;
        }
        let (wb, fb) = l.weight_bytes();
        let bytes_panel = sqnr.is_some() as usize;
        bars(
            &areas[bytes_panel],
            &format!("weight bytes per op (total {wb} B, FP32 {fb} B)"),
            "bytes",
            &bytes,
            n,
            RGBColor(0xc0, 0x5a, 0x1c),
        )?;
        if let Some(m) = mixed {
            tradeoff(&areas[bytes_panel + 1], m)?;
        }
        root.present().map_err(err)?;
    }
    Ok(s)
}
