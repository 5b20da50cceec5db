//! Conformance against the ONNX backend node tests (a suite we did not write).
//!
//! Every node test whose model uses one of our network ops is considered. It either runs
//! (import + candle forward, compared with the expected outputs) or is excluded with a
//! stated reason; nothing is skipped silently. `scripts/fetch-onnx-node-tests` puts the
//! suite in `target/onnx-node` (or set DIFFDFQ_ONNX_NODE_DIR).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use diffdfq_compiler::graph;
use diffdfq_compiler::import::{
    const_ops, decode, import_model, network_ops, tensor_from_proto, ImportOptions, OPS,
};
use diffdfq_compiler::reference::FloatModel;
use prost::Message;
use tract_onnx::pb;

fn suite_dir() -> PathBuf {
    if let Ok(d) = std::env::var("DIFFDFQ_ONNX_NODE_DIR") {
        return PathBuf::from(d);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/onnx-node/onnx/backend/test/data/node")
}

/// Tests outside the semantics we implement, by name prefix, with the reason.
const EXCLUDED: &[(&str, &str)] = &[
    (
        "test_constant",
        "a graph with no activation input: nothing to compile",
    ),
    ("test_identity_opt", "optional-type inputs are not tensors"),
    (
        "test_identity_sequence",
        "sequence-type inputs are not tensors",
    ),
    (
        "test_batchnorm_epsilon_training_mode",
        "training-mode BatchNormalization (batch statistics, extra outputs)",
    ),
    (
        "test_batchnorm_example_training_mode",
        "training-mode BatchNormalization (batch statistics, extra outputs)",
    ),
    ("test_dropout_default_mask", "Dropout's mask output"),
    ("test_dropout_default_mask_ratio", "Dropout's mask output"),
    ("test_training_dropout", "training-mode Dropout (random)"),
    (
        "test_reshape_allowzero_reordered",
        "zero-size tensors (a 0 dimension)",
    ),
    (
        "test_constant_pad",
        "a Pad whose output no Conv reads (a zero Pad is supported as a conv's padding; tested in compiler/tests/cli.rs)",
    ),
    ("test_edge_pad", "a non-zero Pad mode (edge)"),
    ("test_reflect_pad", "a non-zero Pad mode (reflect)"),
    ("test_wrap_pad", "a non-zero Pad mode (wrap)"),
    ("test_maxpool_with_argmax", "MaxPool's Indices output"),
    ("test_maxpool_1d", "1-D pooling (only 2-D NCHW)"),
    ("test_maxpool_3d", "3-D pooling (only 2-D NCHW)"),
    ("test_averagepool_1d", "1-D pooling (only 2-D NCHW)"),
    ("test_averagepool_3d", "3-D pooling (only 2-D NCHW)"),
];

/// Why a test that our ops appear in is not run, if it is not.
fn exclusion(name: &str, model: &pb::ModelProto) -> Option<String> {
    let g = model.graph.as_ref()?;
    let others: Vec<&str> = g
        .node
        .iter()
        .map(|n| n.op_type.as_str())
        .filter(|op| !OPS.iter().any(|s| s.name == *op))
        .collect();
    if !others.is_empty() {
        let mut o = others.clone();
        o.sort();
        o.dedup();
        return Some(format!(
            "uses ops outside the supported set: {}",
            o.join(", ")
        ));
    }
    for (prefix, why) in EXCLUDED {
        if name.starts_with(prefix) {
            return Some(why.to_string());
        }
    }
    let bound = weight_inputs(model);
    let non_float = |vi: &pb::ValueInfoProto| {
        use pb::type_proto::Value;
        !matches!(vi.r#type.as_ref().and_then(|t| t.value.as_ref()), Some(Value::TensorType(t)) if t.elem_type == 1)
    };
    if g.input
        .iter()
        .filter(|i| !bound.contains(&i.name))
        .chain(&g.output)
        .any(non_float)
    {
        return Some("non-float32 (or non-tensor) activations".into());
    }
    None
}

/// How node-test directory names spell an op.
fn token(op: &str) -> &'static str {
    match op {
        "BatchNormalization" => "batchnorm",
        other => Box::leak(other.to_lowercase().into_boxed_str()),
    }
}

fn load_pb(p: &Path) -> graph::Tensor {
    let bytes = std::fs::read(p).unwrap();
    let t = pb::TensorProto::decode(&bytes[..]).unwrap();
    tensor_from_proto(&t).unwrap()
}

/// Graph inputs that act as weights: read at input index ≥ 1 by an op that needs constants.
fn weight_inputs(model: &pb::ModelProto) -> Vec<String> {
    let g = model.graph.as_ref().unwrap();
    let mut names = Vec::new();
    for n in &g.node {
        if matches!(n.op_type.as_str(), "Add" | "Mul" | "Concat") {
            continue;
        }
        for inp in n.input.iter().skip(1) {
            if g.input.iter().any(|i| &i.name == inp) {
                names.push(inp.clone());
            }
        }
    }
    names
}

fn run_case(dir: &Path, model: &pb::ModelProto) -> Result<usize, String> {
    let g = model.graph.as_ref().unwrap();
    let bound = weight_inputs(model);
    let mut sets: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("test_data_set")
        })
        .collect();
    sets.sort();
    let mut compared = 0;
    for set in &sets {
        let inputs: Vec<graph::Tensor> = (0..g.input.len())
            .map(|i| load_pb(&set.join(format!("input_{i}.pb"))))
            .collect();
        let mut bind = HashMap::new();
        let mut dynamic = Vec::new();
        for (vi, t) in g.input.iter().zip(inputs) {
            if bound.contains(&vi.name) {
                bind.insert(vi.name.clone(), t);
            } else {
                dynamic.push(t);
            }
        }
        let opts = ImportOptions {
            bind,
            ..Default::default()
        };
        let graph = import_model(model, &opts).map_err(|e| format!("import: {e}"))?;
        let m = FloatModel::new(&graph, &Device::Cpu).map_err(|e| e.to_string())?;
        let xs: Vec<Tensor> = dynamic
            .iter()
            .map(|t| Tensor::from_vec(t.to_f32(), t.shape.as_slice(), &Device::Cpu).unwrap())
            .collect();
        let ys = m.forward(&xs).map_err(|e| format!("forward: {e}"))?;
        for (k, y) in ys.iter().enumerate() {
            let want = load_pb(&set.join(format!("output_{k}.pb")));
            if y.dims() != want.shape.as_slice() && y.elem_count() != want.len() {
                return Err(format!(
                    "output {k}: shape {:?}, expected {:?}",
                    y.dims(),
                    want.shape
                ));
            }
            let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (i, (a, b)) in got.iter().zip(want.to_f32()).enumerate() {
                let ok =
                    (a - b).abs() <= 1e-5 + 1e-3 * b.abs() || (a.is_nan() && b.is_nan()) || *a == b;
                if !ok {
                    return Err(format!("output {k}[{i}] = {a}, expected {b}"));
                }
            }
            compared += 1;
        }
    }
    Ok(compared)
}

#[test]
fn onnx_backend_node_tests() {
    let root = suite_dir();
    assert!(
        root.is_dir(),
        "ONNX node tests not found at {}: run scripts/fetch-onnx-node-tests (or set DIFFDFQ_ONNX_NODE_DIR)",
        root.display()
    );
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    let (mut ran, mut passed) = (0, 0);
    let mut excluded: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut failed = Vec::new();
    let mut per_op: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let Ok(bytes) = std::fs::read(dir.join("model.onnx")) else {
            continue;
        };
        let model = decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        // A test is ours when its name mentions one of our ops (test_add_bcast,
        // test_basic_conv_with_padding, test_hardswish_expanded, ...).
        let tokens: Vec<&str> = name.split('_').collect();
        let ops: Vec<&'static str> = network_ops()
            .into_iter()
            .filter(|op| tokens.contains(&token(op)))
            .collect();
        if ops.is_empty() {
            continue;
        }
        if let Some(why) = exclusion(&name, &model) {
            excluded.entry(why).or_default().push(name);
            for op in &ops {
                per_op.entry(op).or_default().1 += 1;
            }
            continue;
        }
        ran += 1;
        for op in &ops {
            per_op.entry(op).or_default().0 += 1;
        }
        match run_case(&dir, &model) {
            Ok(n) if n > 0 => passed += 1,
            Ok(_) => failed.push(format!("{name}: no outputs compared")),
            Err(e) => failed.push(format!("{name}: {e}")),
        }
    }
    let n_excluded: usize = excluded.values().map(Vec::len).sum();
    println!(
        "ONNX node tests: {ran} ran, {passed} passed, {} failed, {n_excluded} excluded",
        failed.len()
    );
    println!("per op (ran / excluded):");
    for (op, (r, x)) in &per_op {
        println!("  {op:<20} {r:>3} / {x}");
    }
    println!("excluded, by reason:");
    for (why, names) in &excluded {
        println!("  {why} ({}): {}", names.len(), names.join(" "));
    }
    for f in &failed {
        println!("FAILED {f}");
    }
    assert!(
        failed.is_empty(),
        "{} node tests failed (see above)",
        failed.len()
    );
    for op in &network_ops() {
        if *op == "Constant" {
            continue;
        }
        assert!(
            per_op.get(op).is_some_and(|&(r, _)| r > 0),
            "no node test ran for supported op {op}"
        );
    }
}

/// The README's op list is the op table's: every network op is named in "Supported ONNX",
/// and every op named there as an ONNX op is in the table.
#[test]
fn the_readme_lists_the_op_table() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("## Supported ONNX")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README has a Supported ONNX section");
    let words: Vec<&str> = section
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    for op in network_ops() {
        assert!(
            words.contains(&op),
            "README's Supported ONNX does not name {op}"
        );
    }
    // Capitalized words of the section that look like ONNX op names must be supported ops
    // (the section's two prose words are listed).
    let prose = ["Opsets", "Network"];
    for w in &words {
        let op_like = w.chars().next().is_some_and(|c| c.is_ascii_uppercase())
            && w.chars().skip(1).any(|c| c.is_ascii_lowercase());
        if op_like && !prose.contains(w) {
            assert!(
                OPS.iter().any(|s| s.name == *w),
                "README names {w} among supported ops, the op table does not have it"
            );
        }
    }
    assert!(const_ops().contains(&"Gather"));
}
