//! The command-line contract: --inspect, diffdfq-run, and bad input (exit 2, one line, no panic).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use prost::Message;
use tract_onnx::pb;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/models")
        .join(name)
}

/// Runs the compiler; rtn unless the test picks a method (calibration has its own tests).
fn compile(args: &[&str]) -> Output {
    let mut args = args.to_vec();
    if !args.contains(&"--method") {
        args.extend(["--method", "rtn"]);
    }
    // The held-out evaluation has its own tests; here it would only cost time.
    if !args.contains(&"--eval-samples") {
        args.extend(["--eval-samples", "0"]);
    }
    Command::new(env!("CARGO_BIN_EXE_diffdfq-compile"))
        .args(args)
        .output()
        .unwrap()
}

/// [`compile`] that must succeed.
fn compile_ok(args: &[&str]) -> Output {
    let out = compile(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diffdfq-run"))
        .args(args)
        .output()
        .unwrap()
}

/// Asserts a bad-input failure: exit 2, one line on stderr holding every `needle`, no panic.
fn assert_bad_input(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "{err:?} lacks {n:?}");
    }
    // The README's hostile-input table quotes these lines (`--nocapture`).
    print!("hostile: {err}");
}

fn tensor(name: &str, dims: &[i64], v: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 1,
        float_data: v.to_vec(),
        ..Default::default()
    }
}

fn value(name: &str, dims: &[i64]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value as D, Dimension};
    let shape = pb::TensorShapeProto {
        dim: dims
            .iter()
            .map(|&d| Dimension {
                value: Some(D::DimValue(d)),
                ..Default::default()
            })
            .collect(),
    };
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: 1,
                shape: Some(shape),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(name: &str, op: &str, inputs: &[&str], output: &str) -> pb::NodeProto {
    pb::NodeProto {
        name: name.into(),
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    }
}

/// x (1,2,4,4) → Conv(w) → BN → `extra` nodes → y.
fn model(w: &[f32], var: &[f32], extra: Vec<pb::NodeProto>, out: &str) -> Vec<u8> {
    let mut nodes = vec![
        node("conv", "Conv", &["x", "w"], "c"),
        node("bn", "BatchNormalization", &["c", "s", "b", "m", "v"], "h"),
    ];
    nodes.extend(extra);
    let graph = pb::GraphProto {
        node: nodes,
        initializer: vec![
            tensor("w", &[2, 2, 1, 1], w),
            tensor("s", &[2], &[1.0, 1.0]),
            tensor("b", &[2], &[0.0, 0.0]),
            tensor("m", &[2], &[0.0, 0.0]),
            tensor("v", &[2], var),
        ],
        input: vec![value("x", &[1, 2, 4, 4])],
        output: vec![value(out, &[])],
        ..Default::default()
    };
    encode(graph)
}

/// The model bytes of `graph` at opset 13.
fn encode(graph: pb::GraphProto) -> Vec<u8> {
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

#[test]
fn inspect_prints_the_fixture_table() {
    for name in ["resnet_fmnist", "mobilenet_fmnist"] {
        let out = compile(&[
            "--inspect",
            fixture(&format!("{name}.onnx")).to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        insta::assert_snapshot!(
            format!("inspect_{name}"),
            String::from_utf8(out.stdout).unwrap()
        );
    }
}

#[test]
fn a_small_valid_model_imports() {
    let dir = tempfile::tempdir().unwrap();
    let ok = write(
        dir.path(),
        "ok.onnx",
        &model(
            &[1.0, 0.0, 0.0, 1.0],
            &[1.0, 1.0],
            vec![node("r", "Relu", &["h"], "y")],
            "y",
        ),
    );
    let out = compile(&["--inspect", &ok]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_unsupported_op_is_listed_with_file_node_and_op() {
    let dir = tempfile::tempdir().unwrap();
    let extra = vec![
        node("up1", "Resize", &["h"], "r"),
        node("k", "TopK", &["r"], "y"),
    ];
    let p = write(
        dir.path(),
        "unsup.onnx",
        &model(&[1.0; 4], &[1.0, 1.0], extra, "y"),
    );
    for out in [compile(&["--inspect", &p]), compile(&[&p])] {
        assert_bad_input(&out, &["unsup.onnx", "'up1' (Resize)", "'k' (TopK)"]);
    }
}

#[test]
fn non_finite_weights_and_negative_variance_are_rejected_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let relu = || vec![node("r", "Relu", &["h"], "y")];
    let nan = write(
        dir.path(),
        "nan.onnx",
        &model(&[1.0, f32::NAN, 0.0, 1.0], &[1.0, 1.0], relu(), "y"),
    );
    assert_bad_input(&compile(&["--inspect", &nan]), &["nan.onnx", "'w'", "NaN"]);
    let inf = write(
        dir.path(),
        "inf.onnx",
        &model(&[1.0; 4], &[1.0, f32::INFINITY], relu(), "y"),
    );
    assert_bad_input(&compile(&["--inspect", &inf]), &["inf.onnx", "'v'"]);
    let neg = write(
        dir.path(),
        "neg.onnx",
        &model(&[1.0; 4], &[1.0, -0.5], relu(), "y"),
    );
    assert_bad_input(
        &compile(&["--inspect", &neg]),
        &["neg.onnx", "'bn'", "'v'", "negative"],
    );
}

#[test]
fn truncated_empty_and_foreign_files_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let full = std::fs::read(fixture("resnet_fmnist.onnx")).unwrap();
    for (name, bytes) in [
        ("half.onnx", &full[..full.len() / 2]),
        ("tiny.onnx", &full[..17]),
        ("empty.onnx", &[][..]),
        ("text.onnx", &b"this is not a model\n"[..]),
        ("zeros.onnx", &[0u8; 64][..]),
    ] {
        let p = write(dir.path(), name, bytes);
        assert_bad_input(&compile(&["--inspect", &p]), &[name]);
        let x = write(
            dir.path(),
            "x.npy",
            &diffdfq_compiler::npy::to_bytes(&[1, 1, 28, 28], &[0.0; 784]).unwrap(),
        );
        assert_bad_input(
            &run(&[
                &p,
                "--input",
                &x,
                "--output",
                dir.path().join("y.npy").to_str().unwrap(),
            ]),
            &[name],
        );
    }
    assert_bad_input(
        &compile(&[
            "--inspect",
            dir.path().join("missing.onnx").to_str().unwrap(),
        ]),
        &["missing.onnx"],
    );
}

#[test]
fn run_matches_onnxruntime_on_the_fixture_batches() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["resnet_fmnist", "mobilenet_fmnist"] {
        let y = dir.path().join(format!("{name}.y.npy"));
        let out = run(&[
            fixture(&format!("{name}.onnx")).to_str().unwrap(),
            "--input",
            fixture(&format!("{name}.sample.npy")).to_str().unwrap(),
            "--output",
            y.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (s1, a) = diffdfq_compiler::npy::read_f32(&y).unwrap();
        let (s2, b) =
            diffdfq_compiler::npy::read_f32(&fixture(&format!("{name}.ort.npy"))).unwrap();
        assert_eq!(s1, s2);
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale;
        assert!(err <= 1e-4, "{name}: {err}");
    }
}

#[test]
fn run_takes_batches_larger_than_the_exported_one() {
    // resnet_fmnist was exported with a fixed batch of 1.
    let dir = tempfile::tempdir().unwrap();
    let (_, x1) = diffdfq_compiler::npy::read_f32(&fixture("resnet_fmnist.sample.npy")).unwrap();
    let x5: Vec<f32> = (0..5)
        .flat_map(|i| x1.iter().map(move |v| v * (1.0 - 0.1 * i as f32)))
        .collect();
    let xp = write(
        dir.path(),
        "x5.npy",
        &diffdfq_compiler::npy::to_bytes(&[5, 1, 28, 28], &x5).unwrap(),
    );
    let y = dir.path().join("y5.npy");
    let model = fixture("resnet_fmnist.onnx");
    let out = run(&[
        model.to_str().unwrap(),
        "--input",
        &xp,
        "--output",
        y.to_str().unwrap(),
        "--chunk",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (shape, ys) = diffdfq_compiler::npy::read_f32(&y).unwrap();
    assert_eq!(shape, vec![5, 10]);
    // Row 0 equals the single-sample output.
    let (_, ort) = diffdfq_compiler::npy::read_f32(&fixture("resnet_fmnist.ort.npy")).unwrap();
    for (a, b) in ys[..10].iter().zip(&ort) {
        assert!((a - b).abs() < 1e-3, "{a} vs {b}");
    }
}

#[test]
fn run_rejects_a_mismatched_input_and_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let x = write(
        dir.path(),
        "x.npy",
        &diffdfq_compiler::npy::to_bytes(&[2, 3, 28, 28], &vec![0.0; 2 * 3 * 784]).unwrap(),
    );
    let y = dir.path().join("y.npy");
    let out = run(&[
        fixture("mobilenet_fmnist.onnx").to_str().unwrap(),
        "--input",
        &x,
        "--output",
        y.to_str().unwrap(),
    ]);
    // The message blames the input file's shape, not a node deep in the graph.
    assert_bad_input(
        &out,
        &[
            "mobilenet_fmnist.onnx",
            "takes samples of shape [1, 28, 28]",
            "x.npy holds [3, 28, 28]",
        ],
    );
    assert!(!y.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "stray files left behind"
    );
}

fn constant(out: &str, v: f32) -> pb::NodeProto {
    let mut n = node(out, "Constant", &[], out);
    n.attribute.push(pb::AttributeProto {
        name: "value_float".into(),
        f: v,
        r#type: 1,
        ..Default::default()
    });
    n
}

#[test]
fn decomposed_hardsigmoid_and_hardswish_become_one_op() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = vec![
        constant("three", 3.0),
        constant("zero", 0.0),
        constant("six", 6.0),
        // HardSigmoid(h) = Clip(h + 3, 0, 6) / 6
        node("a1", "Add", &["h", "three"], "a1"),
        node("c1", "Clip", &["a1", "zero", "six"], "c1"),
        node("hsig", "Div", &["c1", "six"], "hs"),
        // HardSwish(hs) = hs · Clip(hs + 3, 0, 6) / 6
        node("a2", "Add", &["hs", "three"], "a2"),
        node("c2", "Clip", &["a2", "zero", "six"], "c2"),
        node("m2", "Mul", &["hs", "c2"], "m2"),
        node("hswish", "Div", &["m2", "six"], "y"),
    ];
    let p = write(
        dir.path(),
        "decomposed.onnx",
        &model(&[1.0; 4], &[1.0, 1.0], nodes, "y"),
    );
    let out = compile(&["--inspect", &p]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ops: Vec<&str> = table
        .lines()
        .skip_while(|l| !l.starts_with("node"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .map(|l| l.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(
        ops,
        ["Conv", "BatchNorm", "HardSigmoid", "HardSwish"],
        "{table}"
    );
}

fn tensor_constant(out: &str, dims: &[i64], v: &[f32]) -> pb::NodeProto {
    let mut n = node(out, "Constant", &[], out);
    n.attribute.push(pb::AttributeProto {
        name: "value".into(),
        t: Some(tensor(out, dims, v)),
        r#type: 4,
        ..Default::default()
    });
    n
}

/// Runs `diffdfq-run` on `model` with the input `x` (1, 2, 4, 4) and returns the output.
fn run_one(dir: &Path, model: &str, x: &[f32]) -> Vec<f32> {
    let xin = dir.join("x.npy");
    let bytes = diffdfq_compiler::npy::to_bytes(&[1, 2, 4, 4], x).unwrap();
    diffdfq_compiler::npy::write_atomic(&xin, &bytes).unwrap();
    let yout = dir.join("y.npy");
    let out = run(&[
        model,
        "--input",
        xin.to_str().unwrap(),
        "--output",
        yout.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    diffdfq_compiler::npy::read_f32(&yout).unwrap().1
}

#[test]
fn a_per_channel_constant_after_conv_and_bn_folds_and_a_dead_channel_compiles() {
    // Conv → BN → Add([1, 2, 1, 1]) as paddle2onnx writes biases; channel 1's weights are all
    // zero, so after folding it is a dead channel with bias 3 (its tiny weight scale once made
    // the bias in accumulator units overflow the runtime's i32 bound).
    let dir = tempfile::tempdir().unwrap();
    let nodes = vec![
        tensor_constant("k", &[1, 2, 1, 1], &[0.5, 3.0]),
        node("bias", "Add", &["h", "k"], "y"),
    ];
    let p = write(
        dir.path(),
        "paddle_bias.onnx",
        &model(&[1.0, -0.5, 0.0, 0.0], &[1.0, 1.0], nodes, "y"),
    );
    let out = compile(&["--inspect", &p]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(!table.contains("AddConst"), "{table}");
    let x: Vec<f32> = (0..32).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
    let float = run_one(dir.path(), &p, &x);
    for bits in ["8", "4"] {
        let o = dir.path().join(format!("w{bits}"));
        compile_ok(&[
            &p,
            "--method",
            "rtn",
            "--bits",
            bits,
            "--first-last-bits",
            bits,
            "--no-lib",
            "--quiet",
            "-o",
            o.to_str().unwrap(),
        ]);
        let q = run_one(dir.path(), o.join("paddle_bias.dfq").to_str().unwrap(), &x);
        // Channel 1 is the bias alone; channel 0 within a few output steps.
        for i in 0..16 {
            assert!((float[16 + i] - 3.0).abs() < 1e-6, "{}", float[16 + i]);
            assert!(
                (q[16 + i] - 3.0).abs() < 0.05,
                "W{bits}: {} vs 3",
                q[16 + i]
            );
            assert!(
                (q[i] - float[i]).abs() < 0.25,
                "W{bits}: {} vs {}",
                q[i],
                float[i]
            );
        }
    }
}

/// A one-conv model whose input is declared with `dims` (symbolic names as strings).
fn model_with_input(dims: &[&str]) -> Vec<u8> {
    use pb::tensor_shape_proto::{dimension::Value as D, Dimension};
    let mut m = pb::ModelProto::decode(&*model(&[1.0; 4], &[1.0, 1.0], vec![], "h")).unwrap();
    let g = m.graph.as_mut().unwrap();
    let vi = &mut g.input[0];
    let Some(pb::type_proto::Value::TensorType(t)) = vi.r#type.as_mut().unwrap().value.as_mut()
    else {
        unreachable!()
    };
    t.shape.as_mut().unwrap().dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d.parse::<i64>() {
                Ok(v) => D::DimValue(v),
                Err(_) => D::DimParam(d.to_string()),
            }),
            ..Default::default()
        })
        .collect();
    m.encode_to_vec()
}

#[test]
fn dynamic_batch_becomes_one_and_unknown_spatial_dims_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    for (i, batch) in ["-1", "0", "batch", "DynamicDimension.0"]
        .iter()
        .enumerate()
    {
        let p = write(
            dir.path(),
            &format!("b{i}.onnx"),
            &model_with_input(&[batch, "2", "4", "4"]),
        );
        let out = compile(&["--inspect", &p]);
        assert!(
            out.status.success(),
            "batch {batch}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let table = String::from_utf8(out.stdout).unwrap();
        assert!(table.contains("[1, 2, 4, 4]"), "batch {batch}: {table}");
    }
    let p = write(
        dir.path(),
        "hw.onnx",
        &model_with_input(&["-1", "2", "?h", "-1"]),
    );
    let out = compile(&["--inspect", &p]);
    assert_bad_input(
        &out,
        &[
            "hw.onnx",
            "input 'x' is declared [-1, 2, ?h, -1]",
            "axis 2",
            "--input-shape 1,2,N,N",
        ],
    );
    let out = compile(&["--inspect", &p, "--input-shape", "1,2,4,4"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_zero_pad_before_a_conv_becomes_its_padding() {
    // EfficientNet's TF-"same" padding: x → Pad(0, 0, 1, 2, 0, 0, 2, 1) → Conv(pads 0), the pads
    // computed through Shape/Slice/Transpose as exporters write them; the same as a Conv with
    // pads (1, 2, 2, 1).
    let dir = tempfile::tempdir().unwrap();
    let pads = |raw: &[f32]| {
        vec![
            tensor_constant("praw", &[4, 2], raw),
            {
                let mut c = node("flat_c", "Constant", &[], "flat");
                c.attribute.push(pb::AttributeProto {
                    name: "value".into(),
                    t: Some(pb::TensorProto {
                        name: "flat".into(),
                        dims: vec![1],
                        data_type: 7,
                        int64_data: vec![8],
                        ..Default::default()
                    }),
                    r#type: 4,
                    ..Default::default()
                });
                c
            },
            node("t", "Transpose", &["praw"], "pt"),
            node("r", "Reshape", &["pt", "flat"], "pf"),
            {
                let mut c = node("cast", "Cast", &["pf"], "pads");
                c.attribute.push(pb::AttributeProto {
                    name: "to".into(),
                    i: 7,
                    r#type: 2,
                    ..Default::default()
                });
                c
            },
        ]
    };
    // Transposed (4, 2) → (2, 4) → flat: begins (0, 0, 1, 2), ends (0, 0, 2, 1).
    let raw = [0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 2.0, 1.0];
    let with_pad = |tail: Vec<pb::NodeProto>| {
        let mut m =
            pb::ModelProto::decode(&*model(&[1.0, 0.5, -0.25, 2.0], &[1.0, 1.0], vec![], "h"))
                .unwrap();
        let g = m.graph.as_mut().unwrap();
        g.node.retain(|n| n.name != "conv");
        let mut nodes = pads(&raw);
        nodes.push(node("pad", "Pad", &["x", "pads"], "xp"));
        nodes.push(node("conv", "Conv", &["xp", "w"], "c"));
        nodes.append(&mut g.node);
        nodes.extend(tail);
        g.node = nodes;
        m.encode_to_vec()
    };
    let p = write(dir.path(), "pad.onnx", &with_pad(vec![]));
    let out = compile(&["--inspect", &p]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("[1, 2, 7, 7]"), "{table}");
    // The reference: the same conv with the pads as its own.
    let mut m =
        pb::ModelProto::decode(&*model(&[1.0, 0.5, -0.25, 2.0], &[1.0, 1.0], vec![], "h")).unwrap();
    let conv = &mut m.graph.as_mut().unwrap().node[0];
    conv.attribute.push(pb::AttributeProto {
        name: "pads".into(),
        ints: vec![1, 2, 2, 1],
        r#type: 7,
        ..Default::default()
    });
    let r = write(dir.path(), "ref.onnx", &m.encode_to_vec());
    let x: Vec<f32> = (0..32).map(|i| ((i * 5 % 13) as f32 - 6.0) / 3.0).collect();
    let y = run_one(dir.path(), &p, &x);
    assert_eq!(y, run_one(dir.path(), &r, &x));
    assert_eq!(y.len(), 2 * 7 * 7);
    // A Pad that feeds anything but a conv is refused by name.
    let bad = write(dir.path(), "pad_relu.onnx", &{
        let mut m = pb::ModelProto::decode(&*with_pad(vec![])).unwrap();
        let g = m.graph.as_mut().unwrap();
        g.node.push(node("relu", "Relu", &["xp"], "y2"));
        g.output[0].name = "y2".into();
        g.node.retain(|n| n.name != "conv" && n.name != "bn");
        m.encode_to_vec()
    });
    assert_bad_input(
        &compile(&["--inspect", &bad]),
        &["pad_relu.onnx", "'relu'", "comes from a Pad"],
    );
}

#[test]
fn a_batchnorm_after_relu_folds_into_the_unpadded_conv_after_it() {
    // Keras: Conv → ReLU → BN → Conv (valid padding). The second BN has no conv before it.
    let dir = tempfile::tempdir().unwrap();
    let tail = |pads: bool| {
        let mut conv = node("conv2", "Conv", &["n", "w2"], "y");
        if pads {
            conv.attribute.push(pb::AttributeProto {
                name: "pads".into(),
                ints: vec![1, 1, 1, 1],
                r#type: 7,
                ..Default::default()
            });
        }
        vec![
            node("relu", "Relu", &["h"], "r"),
            tensor_constant("s2", &[2], &[1.5, 0.5]),
            tensor_constant("b2", &[2], &[0.25, -1.0]),
            tensor_constant("m2", &[2], &[0.5, 0.1]),
            tensor_constant("v2", &[2], &[0.8, 2.0]),
            node(
                "bn2",
                "BatchNormalization",
                &["r", "s2", "b2", "m2", "v2"],
                "n",
            ),
            tensor_constant(
                "w2",
                &[3, 2, 3, 3],
                &(0..54)
                    .map(|i| ((i * 7 % 11) as f32 - 5.0) / 8.0)
                    .collect::<Vec<_>>(),
            ),
            conv,
        ]
    };
    let p = write(
        dir.path(),
        "keras.onnx",
        &model(&[1.0, -0.5, 0.25, 1.0], &[1.0, 1.0], tail(false), "y"),
    );
    let x: Vec<f32> = (0..32).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
    let float = run_one(dir.path(), &p, &x);
    assert_eq!(float.len(), 3 * 2 * 2);
    let o = dir.path().join("out");
    let out = compile(&[
        &p,
        "--method",
        "rtn",
        "--bits",
        "8",
        "--no-lib",
        "--quiet",
        "-o",
        o.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let q = run_one(dir.path(), o.join("keras.dfq").to_str().unwrap(), &x);
    let scale = float.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (a, b) in q.iter().zip(&float) {
        assert!((a - b).abs() <= 0.03 * scale, "{q:?} vs {float:?}");
    }
    // With padding the fold would change the border: refused by name.
    let p = write(
        dir.path(),
        "padded.onnx",
        &model(&[1.0, -0.5, 0.25, 1.0], &[1.0, 1.0], tail(true), "y"),
    );
    let out = compile(&[
        &p,
        "--method",
        "rtn",
        "--no-lib",
        "--quiet",
        "-o",
        o.to_str().unwrap(),
    ]);
    assert_bad_input(&out, &["padded.onnx", "'bn2'", "cannot be folded"]);
}

/// x (1,2,4,4) → `nodes` (which read "x" and the `inits`) → y, opset 13.
fn graph_model(nodes: Vec<pb::NodeProto>, inits: Vec<pb::TensorProto>) -> Vec<u8> {
    let graph = pb::GraphProto {
        node: nodes,
        initializer: inits,
        input: vec![value("x", &[1, 2, 4, 4])],
        output: vec![value("y", &[])],
        ..Default::default()
    };
    encode(graph)
}

fn with_ints(mut n: pb::NodeProto, name: &str, v: &[i64]) -> pb::NodeProto {
    n.attribute.push(pb::AttributeProto {
        name: name.into(),
        ints: v.to_vec(),
        r#type: 7,
        ..Default::default()
    });
    n
}

/// Hand-made hostile models that once panicked, aborted or gave an error naming neither node
/// nor file: each is now exit 2, one line naming the file and the node, nothing written.
#[test]
fn hostile_models_are_one_line_errors_naming_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let w = tensor("w", &[2, 2, 1, 1], &[1.0, 0.5, -0.5, 1.0]);
    let conv = || node("conv", "Conv", &["x", "w"], "c");
    let k = |name: &str, dims: &[i64]| {
        let n = dims.iter().product::<i64>() as usize;
        tensor(name, dims, &vec![0.5; n])
    };
    type Case<'a> = (
        &'a str,
        Vec<pb::NodeProto>,
        Vec<pb::TensorProto>,
        &'a [&'a str],
    );
    let cases: Vec<Case> = vec![
        (
            "add3",
            vec![conv(), node("add3", "Add", &["c", "k1", "k2"], "y")],
            vec![w.clone(), k("k1", &[1]), k("k2", &[1])],
            &["node 'add3'", "takes 2 inputs"],
        ),
        (
            "empty_weight",
            vec![node("conv0", "Conv", &["x", "w0"], "y")],
            vec![tensor("w0", &[0, 2, 1, 1], &[])],
            &["node 'conv0'", "non-empty"],
        ),
        (
            "range_of_empty",
            vec![
                conv(),
                node("range", "Range", &["s", "l", "d"], "r"),
                node("add", "Add", &["c", "r"], "y"),
            ],
            vec![w.clone(), k("s", &[0]), k("l", &[]), k("d", &[])],
            &["node 'range'", "Range takes scalars"],
        ),
        (
            "huge_broadcast",
            vec![
                conv(),
                node("outer", "Add", &["k1", "k2"], "big"),
                node("add", "Add", &["c", "big"], "y"),
            ],
            vec![w.clone(), k("k1", &[100_000, 1]), k("k2", &[1, 100_000])],
            &["node 'outer'", "too large"],
        ),
        (
            "absurd_pads",
            vec![with_ints(conv(), "pads", &[1 << 40, 0, 0, 0])],
            vec![w.clone()],
            &["node 'conv'", "pads", "limit"],
        ),
        (
            "concat_mismatch",
            vec![
                conv(),
                with_ints(node("cat", "Concat", &["k1", "k2"], "k"), "axis", &[1]),
                node("add", "Add", &["c", "k"], "y"),
            ],
            vec![w.clone(), k("k1", &[2, 3]), k("k2", &[3, 3])],
            &["node 'cat'", "do not concatenate"],
        ),
    ];
    for (name, nodes, inits, needles) in cases {
        // Concat's attribute is an int, not ints.
        let nodes = nodes
            .into_iter()
            .map(|mut n| {
                for a in &mut n.attribute {
                    if a.name == "axis" {
                        a.r#type = 2;
                        a.i = a.ints[0];
                        a.ints.clear();
                    }
                }
                n
            })
            .collect();
        let path = write(
            dir.path(),
            &format!("{name}.onnx"),
            &graph_model(nodes, inits),
        );
        let out_dir = dir.path().join(format!("{name}-out"));
        let out = compile(&[
            &path,
            "--bits",
            "4",
            "--no-lib",
            "-o",
            out_dir.to_str().unwrap(),
        ]);
        let mut all = needles.to_vec();
        all.push(&path);
        assert_bad_input(&out, &all);
        assert!(!out_dir.exists(), "{name}: output written");
    }
}

/// The rest of the hostile-input table (README "Reliability"): declared shapes, graph
/// structure, flags and outputs; exit 2, one line naming the culprit, nothing written.
#[test]
fn hostile_structure_flags_and_outputs_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let w = tensor("w", &[2, 2, 1, 1], &[1.0, 0.5, -0.5, 1.0]);
    let cycle = graph_model(
        vec![
            node("a", "Relu", &["b_out"], "a_out"),
            node("b", "Relu", &["a_out"], "b_out"),
            node("conv", "Conv", &["x", "w"], "y"),
        ],
        vec![w.clone()],
    );
    let dangling = {
        let mut m = pb::ModelProto::decode(&*graph_model(
            vec![node("conv", "Conv", &["x", "w"], "c")],
            vec![w.clone()],
        ))
        .unwrap();
        m.graph.as_mut().unwrap().output[0].name = "nowhere".into();
        m.encode_to_vec()
    };
    let twice = graph_model(
        vec![
            node("conv", "Conv", &["x", "w"], "c"),
            node("again", "Relu", &["x"], "c"),
            node("relu", "Relu", &["c"], "y"),
        ],
        vec![w.clone()],
    );
    // Nine activations of 2^26 elements: each under the per-tensor limit, together over the
    // importer's memory cap (2^29); refused while importing, before anything is allocated.
    let big = {
        let mut nodes = vec![node("conv", "Conv", &["x", "w"], "r0")];
        for i in 1..=8 {
            let (a, b) = (format!("r{}", i - 1), format!("r{i}"));
            nodes.push(node(&format!("relu{i}"), "Relu", &[&a], &b));
        }
        nodes.push(node("last", "Relu", &["r8"], "y"));
        let mut m = pb::ModelProto::decode(&*graph_model(nodes, vec![w.clone()])).unwrap();
        m.graph.as_mut().unwrap().input[0] = value("x", &[1, 2, 4096, 8192]);
        m.encode_to_vec()
    };
    let two_ws = graph_model(
        vec![node("conv", "Conv", &["x", "w"], "y")],
        vec![w.clone(), w.clone()],
    );
    let fixture_path = fixture("resnet_fmnist.onnx").display().to_string();
    let files = [
        ("zero_dim", model_with_input(&["1", "0", "4", "4"])),
        (
            "absurd_dim",
            model_with_input(&["1", "2", "1099511627776", "4"]),
        ),
        ("cycle", cycle),
        ("dangling_output", dangling),
        ("duplicate_name", twice),
        ("over_memory_cap", big),
        ("duplicate_initializer", two_ws),
    ];
    let mut cases: Vec<(Vec<String>, Vec<String>)> = files
        .iter()
        .map(|(name, bytes)| {
            let p = write(dir.path(), &format!("{name}.onnx"), bytes);
            (vec![p.clone()], vec![p])
        })
        .collect();
    let needles = [
        vec!["axis 1 has no fixed size"],
        vec!["too large"],
        vec!["cycle"],
        vec!["'nowhere'"],
        vec!["'c'", "more than once"],
        vec!["node 'relu8'", "the importer's memory cap"],
        vec!["initializer 'w' is defined more than once"],
    ];
    for ((_, n), extra) in cases.iter_mut().zip(needles) {
        n.extend(extra.into_iter().map(String::from));
    }
    let file = write(dir.path(), "a_file", b"x");
    let flag_cases: [(&[&str], &[&str]); 13] = [
        // clap's own errors too: one line, no usage block.
        (
            &["--speed", "max"],
            &["unexpected argument '--speed' found", "(see --help)"],
        ),
        // A CPU the target's rustc does not know, `native` for another architecture, and a
        // CPU for a library that is not built: refused before any work.
        (
            &["--cpu", "pentium9"],
            &["--cpu pentium9", "rustc --print target-cpus"],
        ),
        (
            &["--cpu", "native", "--target", "aarch64"],
            &["--cpu native", "aarch64-unknown-linux-gnu"],
        ),
        (&["--cpu", "x86-64-v3", "--no-lib"], &["--cpu", "--no-lib"]),
        (&["--bits", "x"], &["invalid value 'x' for '--bits <BITS>'"]),
        (
            &["--input-shape", "1,3,28,28"],
            &["--input-shape", "[1, 3, 28, 28]"],
        ),
        (&["--bits", "9"], &["--bits 9"]),
        (&["--bits", "1"], &["--bits 1"]),
        (&["--act-bits", "5"], &["--act-bits 5"]),
        (&["--layer-bits", "5"], &["--layer-bits", "5"]),
        (&["--target", "mips-nowhere"], &["mips-nowhere"]),
        (&["-o", "a_file/sub"], &["a_file"]),
        // rtn's N(0, 1) samples set the ranges of BN-less layers: none is refused, not taken
        // as one (a silently wrong model).
        (
            &["--method", "rtn", "--samples", "0"],
            &["--samples", "at least 1"],
        ),
    ];
    for (flags, needles) in flag_cases {
        let mut args = vec![fixture_path.clone()];
        for f in flags {
            args.push(f.replace("a_file", &file));
        }
        let mut n: Vec<String> = needles.iter().map(|s| s.to_string()).collect();
        if flags[0] == "-o" {
            n[0] = file.clone();
        }
        cases.push((args, n));
    }
    for (args, needles) in cases {
        let out_dir = dir.path().join("out");
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        if !a.contains(&"-o") {
            a.extend(["-o", out_dir.to_str().unwrap()]);
        }
        // `--cpu` cases check the flag itself, which needs the library built.
        if !a.contains(&"--cpu") {
            a.push("--no-lib");
        }
        if !a.contains(&"--bits") && !a.contains(&"--layer-bits") {
            a.extend(["--bits", "4"]);
        }
        let out = compile(&a);
        let n: Vec<&str> = needles.iter().map(String::as_str).collect();
        assert_bad_input(&out, &n);
        assert!(!out_dir.exists(), "{args:?}: output written");
    }
}

/// `diffdfq-run` on a corrupted `.dfq` and on `.npy` inputs of the wrong dtype or truncated.
#[test]
fn run_rejects_corrupted_models_and_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let o = dir.path().join("m");
    compile_ok(&[
        fixture("resnet_fmnist.onnx").to_str().unwrap(),
        "--bits",
        "4",
        "--no-lib",
        "--quiet",
        "-o",
        o.to_str().unwrap(),
    ]);
    let mut blob = std::fs::read(o.join("resnet_fmnist.dfq")).unwrap();
    let mid = blob.len() / 2;
    blob[mid] ^= 0x40;
    let bad = write(dir.path(), "bad.dfq", &blob);
    let good = o.join("resnet_fmnist.dfq").display().to_string();
    let x = diffdfq_compiler::npy::to_bytes(&[1, 1, 28, 28], &[0.0; 784]).unwrap();
    let xs = write(dir.path(), "x.npy", &x);
    let mut int_bytes = x.clone();
    let at = int_bytes.iter().position(|&b| b == b'<').unwrap();
    int_bytes[at + 1..at + 3].copy_from_slice(b"i4");
    let wrong_dtype = write(dir.path(), "int.npy", &int_bytes);
    let truncated = write(dir.path(), "short.npy", &x[..x.len() - 10]);
    let y = dir.path().join("y.npy");
    for (model, input, needles) in [
        (&bad, &xs, &["bad.dfq", "checksum"][..]),
        (&good, &wrong_dtype, &["int.npy", "dtype <i4"][..]),
        (&good, &truncated, &["short.npy", "data bytes"][..]),
    ] {
        let out = run(&[model, "--input", input, "--output", y.to_str().unwrap()]);
        assert_bad_input(&out, needles);
        assert!(!y.exists());
    }
}

/// The README's CLI reference is what the binaries print for `-h`, block for block.
#[test]
fn the_readme_cli_reference_is_the_help() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let section = readme
        .split("## CLI reference")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README has a CLI reference");
    let blocks: Vec<&str> = section.split("```").skip(1).step_by(2).collect();
    assert_eq!(blocks.len(), 2, "two help blocks");
    for (block, out) in blocks.iter().zip([compile(&["-h"]), run(&["-h"])]) {
        assert!(out.status.success());
        let help = String::from_utf8(out.stdout).unwrap();
        assert_eq!(block.trim(), help.trim(), "README block differs from -h");
    }
}

#[test]
fn leaky_relu_prelu_any_clip_and_tanh_run_as_tables() {
    // Conv → BN → LeakyRelu(0.5) → PRelu(one slope, 0.5) → Clip(−0.3, 1.5) → Tanh: four
    // code tables in the runtime, within a few output steps of the float model.
    let dir = tempfile::tempdir().unwrap();
    let mut leaky = node("leaky", "LeakyRelu", &["h"], "la");
    leaky.attribute.push(pb::AttributeProto {
        name: "alpha".into(),
        f: 0.5,
        r#type: 1,
        ..Default::default()
    });
    let tail = |slope: (&[i64], &[f32])| {
        vec![
            leaky.clone(),
            tensor_constant("slope", slope.0, slope.1),
            node("prelu", "PRelu", &["la", "slope"], "pr"),
            tensor_constant("lo", &[], &[-0.3]),
            tensor_constant("hi", &[], &[1.5]),
            node("clip", "Clip", &["pr", "lo", "hi"], "cl"),
            node("tanh", "Tanh", &["cl"], "y"),
        ]
    };
    let p = write(
        dir.path(),
        "tables.onnx",
        &model(
            &[1.0, -0.5, -2.0, 0.25],
            &[1.0, 1.0],
            tail((&[1], &[0.5])),
            "y",
        ),
    );
    let table = String::from_utf8(compile_ok(&["--inspect", &p]).stdout).unwrap();
    for op in ["LeakyRelu", "Clip", "Tanh"] {
        assert!(table.contains(op), "{table}");
    }
    let x: Vec<f32> = (0..32).map(|i| ((i * 7 % 11) as f32 - 5.0) / 2.0).collect();
    let float = run_one(dir.path(), &p, &x);
    // The float model itself, with PRelu's slope `s`.
    let clipped = |v: f32, s: f32| {
        let a = if v >= 0.0 { v } else { 0.5 * v };
        let b = if a >= 0.0 { a } else { s * a };
        b.clamp(-0.3, 1.5)
    };
    let conv: Vec<f32> = (0..32)
        .map(|i| {
            let (c, p) = (i / 16, i % 16);
            let w = [[1.0, -0.5], [-2.0, 0.25]][c];
            w[0] * x[p] + w[1] * x[16 + p]
        })
        .collect();
    for i in 0..32 {
        assert!(
            (float[i] - clipped(conv[i], 0.5).tanh()).abs() < 1e-5,
            "{i}"
        );
    }
    // Both negative slopes and both clip bounds are reached.
    let pre: Vec<f32> = conv.iter().map(|&v| clipped(v, 0.5)).collect();
    assert!(pre.contains(&-0.3) && pre.contains(&1.5));
    assert!(pre.iter().any(|&v| v < 0.0 && v > -0.3));
    let o = dir.path().join("q").display().to_string();
    compile_ok(&[&p, "--bits", "8", "--no-lib", "--quiet", "-o", &o]);
    let q = run_one(dir.path(), &format!("{o}/tables.dfq"), &x);
    for i in 0..32 {
        assert!(
            (q[i] - float[i]).abs() < 0.05,
            "{i}: {} vs {}",
            q[i],
            float[i]
        );
    }
    // A slope per channel runs in float (torch's `nn.PReLU(C)`); it would need a table per
    // channel, so the quantizer refuses it by name.
    let p = write(
        dir.path(),
        "prelu_c.onnx",
        &model(
            &[1.0, -0.5, -2.0, 0.25],
            &[1.0, 1.0],
            tail((&[2, 1, 1], &[0.5, 0.25])),
            "y",
        ),
    );
    let float = run_one(dir.path(), &p, &x);
    for i in 0..32 {
        let want = clipped(conv[i], [0.5, 0.25][i / 16]).tanh();
        assert!((float[i] - want).abs() < 1e-5, "{i}");
    }
    let o = dir.path().join("qc");
    assert_bad_input(
        &compile(&[&p, "--no-lib", "-o", o.to_str().unwrap()]),
        &[
            "prelu_c.onnx",
            "'prelu'",
            "PRelu whose slope varies (shape [2, 1, 1]",
        ],
    );
    assert!(!o.exists());
}

/// `--method lp`: rtn with each channel's step from the Lp clipping search. It names itself in
/// the report and the header, ships other codes than rtn at 3 bits (the search clips some
/// channels) in the same bytes, is deterministic, and its weights are those the library's
/// `WeightSteps::Lp` gives: every channel's step at most min–max's.
#[test]
fn lp_method_takes_clipped_weight_steps() {
    use diffdfq_compiler::import::{import_path, ImportOptions};
    use diffdfq_compiler::quant::rtn::{self, RtnOptions, WeightSteps};
    use diffdfq_compiler::quant::Bits;
    let dir = tempfile::tempdir().unwrap();
    let m = fixture("resnet_fmnist.onnx");
    let out = |name: &str| dir.path().join(name);
    for (d, method) in [("lp", "lp"), ("lp2", "lp"), ("rtn", "rtn")] {
        compile_ok(&[
            m.to_str().unwrap(),
            "--method",
            method,
            "--bits",
            "3",
            "--no-lib",
            "--quiet",
            "-o",
            out(d).to_str().unwrap(),
        ]);
    }
    let read = |d: &str, f: &str| std::fs::read(out(d).join(f)).unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&read("lp", "resnet_fmnist.report.json")).unwrap();
    assert_eq!(report["method"], "lp");
    let header = String::from_utf8(read("lp", "resnet_fmnist.h")).unwrap();
    assert!(header.contains("Method lp,"), "{header}");
    assert_eq!(
        read("lp", "resnet_fmnist.dfq"),
        read("lp2", "resnet_fmnist.dfq")
    );
    let (lp_blob, rtn_blob) = (
        read("lp", "resnet_fmnist.dfq"),
        read("rtn", "resnet_fmnist.dfq"),
    );
    assert_eq!(lp_blob.len(), rtn_blob.len());
    assert_ne!(lp_blob, rtn_blob);

    let g = import_path(&m, &ImportOptions::default()).unwrap();
    let q = |weight_steps| {
        let opts = RtnOptions {
            bits: Bits {
                weight: 3,
                act: 8,
                first_last: 8,
            },
            weight_steps,
            ..Default::default()
        };
        rtn::quantize(&g, &opts).unwrap()
    };
    let (lp, mm) = (q(WeightSteps::Lp), q(WeightSteps::MinMax));
    let mut clipped = 0;
    for (a, b) in lp.nodes.iter().zip(&mm.nodes) {
        let (Some(a), Some(b)) = (a.op.layer(), b.op.layer()) else {
            continue;
        };
        for (sa, sb) in a.scales.iter().zip(&b.scales) {
            assert!(sa <= sb, "{sa} > {sb}");
            clipped += usize::from(sa < sb);
        }
    }
    assert!(clipped > 0);
}
