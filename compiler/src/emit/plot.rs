//! `NAME.report.svg`: per-layer weight bytes and, when measured, the held-out SQNR, one bar per
//! op in the order of the summary table, so the layer that costs the bytes and the layer that
//! carries the error are seen at a glance.

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::evaluate::Evaluation;
use crate::lower::Lowered;
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

/// The SVG document: a weight-bytes panel, and an SQNR panel above it when `eval` is given.
pub fn render(l: &Lowered, eval: Option<&Evaluation>) -> Result<String, Error> {
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
    let panels = if sqnr.is_some() { 2 } else { 1 };
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
        bars(
            &areas[panels as usize - 1],
            &format!("weight bytes per op (total {wb} B, FP32 {fb} B)"),
            "bytes",
            &bytes,
            n,
            RGBColor(0xc0, 0x5a, 0x1c),
        )?;
        root.present().map_err(err)?;
    }
    Ok(s)
}
