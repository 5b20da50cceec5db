//! The module layers of the compiler and of the runtime (docs/design.md §2): a top-level module
//! imports only modules of lower layers, read from the sources, so no import circle can come
//! back unnoticed.

use std::collections::BTreeMap;
use std::path::Path;

/// Layer of every top-level module of the compiler, as docs/design.md §2 lists them.
const LAYERS: &[(&str, u32)] = &[
    ("graph", 0),
    ("host", 0),
    ("rng", 0),
    ("npy", 0),
    ("interrupt", 0),
    ("cli", 0),
    ("tract", 0),
    ("import", 1),
    ("reference", 1),
    ("inspect", 1),
    ("quant", 2),
    ("calib", 3),
    ("lower", 3),
    ("evaluate", 4),
    ("mixed", 5),
    ("emit", 6),
];

/// The same for the runtime: numbers and geometry, then the byte records, the packed weights
/// read through them, the kernels, the format's validation and decoding (which asks the
/// kernels what scratch they need), the executor and the C ABI.
const RUNTIME_LAYERS: &[(&str, u32)] = &[
    ("error", 0),
    ("numerics", 0),
    ("geom", 0),
    ("records", 1),
    ("packing", 2),
    ("kernels", 3),
    ("format", 4),
    ("exec", 5),
    ("capi", 6),
];

/// The code of a source file without comments and without its `#[cfg(test)]` module.
fn code(text: &str) -> String {
    let body = text.split("#[cfg(test)]").next().unwrap_or_default();
    body.lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// `crate::NAME` references in `code`.
fn crate_refs(code: &str) -> Vec<String> {
    code.match_indices("crate::")
        .map(|(i, m)| {
            code[i + m.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

fn rs_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn modules_import_only_lower_layers() {
    check_layers(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        LAYERS,
        50,
    );
}

#[test]
fn runtime_modules_import_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime/src");
    check_layers(&src, RUNTIME_LAYERS, 15);
}

/// Fails on any `crate::x` reference of a module in `src` to one of its own layer or above;
/// `min_seen` guards against reading an empty tree.
fn check_layers(src: &Path, layers: &[(&str, u32)], min_seen: usize) {
    let layer: BTreeMap<&str, u32> = layers.iter().copied().collect();
    // Every top-level module is in the table.
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    for l in lib.lines() {
        if let Some(m) = l.strip_prefix("pub mod ").and_then(|r| r.strip_suffix(';')) {
            assert!(
                layer.contains_key(m),
                "module {m} is missing from the layer table"
            );
        }
    }
    let mut files = Vec::new();
    rs_files(src, &mut files);
    files.sort();
    let mut checked = 0;
    let mut wrong = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        let Some(&mine) = layer.get(top.as_str()) else {
            continue; // lib.rs, bin/
        };
        let text = std::fs::read_to_string(f).unwrap();
        for r in crate_refs(&code(&text)) {
            match layer.get(r.as_str()) {
                Some(&theirs) if r != top && theirs >= mine => wrong.push(format!(
                    "{} (layer {mine}) imports crate::{r} (layer {theirs})",
                    rel.display()
                )),
                Some(_) => checked += 1,
                None => {}
            }
        }
    }
    assert!(
        checked > min_seen,
        "only {checked} imports seen: is the source tree read?"
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_checker_sees_imports_and_ignores_comments_and_tests() {
    let text = "use crate::quant::X;\n// crate::emit in a comment\nfn f() { crate::graph::g(); }\n\
                #[cfg(test)]\nmod tests { use crate::emit; }";
    assert_eq!(crate_refs(&code(text)), vec!["quant", "graph"]);
}
