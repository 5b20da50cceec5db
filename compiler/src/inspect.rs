//! `--inspect`: a table of the imported graph.

use std::fmt::Write;

use crate::graph::{Graph, Op};

/// `[1, 3, 28, 28]`: how reports and headers print a shape.
pub fn shape(s: &[usize]) -> String {
    format!(
        "[{}]",
        s.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Thousands separators, for MACs and parameter counts.
fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Renders the inspect report of `g`, imported from the file named `model`.
pub fn render(model: &str, g: &Graph) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "model: {model} (opset {})", g.opset);
    for &i in &g.inputs {
        let _ = writeln!(o, "input:  {} {}", g.values[i].name, shape(g.shape(i)));
    }
    for &i in &g.outputs {
        let _ = writeln!(o, "output: {} {}", g.values[i].name, shape(g.shape(i)));
    }
    let name_w = g
        .nodes
        .iter()
        .map(|n| n.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<name_w$}  {:<14}  {:<18}  {:>9}  {:>12}",
        "node", "op", "output shape", "params", "MACs"
    );
    let (mut params, mut macs) = (0u64, 0u64);
    for n in &g.nodes {
        let (p, m) = (n.op.params() as u64, g.macs(n));
        params += p;
        macs += m;
        let _ = writeln!(
            o,
            "{:<name_w$}  {:<14}  {:<18}  {:>9}  {:>12}",
            n.name,
            n.op.name(),
            shape(g.shape(n.output)),
            group(p),
            group(m)
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "total: {} nodes, {} parameters, {} MACs",
        g.nodes.len(),
        group(params),
        group(macs)
    );
    let bns: Vec<_> = g.batchnorms().collect();
    let _ = writeln!(o);
    let _ = writeln!(o, "BatchNorm layers ({}):", bns.len());
    for (_, n, bn) in bns {
        let _ = writeln!(
            o,
            "  {}: {} channels, eps {:e}, normalizes {}",
            n.name,
            bn.mean.len(),
            bn.eps,
            g.values[n.inputs[0]].name
        );
    }
    if !g.nodes.iter().any(|n| matches!(n.op, Op::BatchNorm(_))) {
        let _ = writeln!(
            o,
            "  (none: synthesis needs BatchNorm statistics; export with BN kept)"
        );
    }
    o
}
