//! End to end: diffdfq-compile → NAME.{dfq,o,h,report.json} + libNAME.a → a C firmware built
//! with gcc and aarch64-linux-gnu-gcc against libNAME.a only → run natively and under
//! qemu-aarch64; outputs byte-identical to each other and to `diffdfq-run NAME.dfq`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture(name: &str) -> PathBuf {
    root().join("examples/models").join(name)
}

/// Runs a tool, failing the test with its stderr when it fails.
fn ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (scripts/setup installs the toolchains)")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
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
        .env(
            "DIFFDFQ_CACHE_DIR",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("diffdfq-cache"),
        )
        .output()
        .unwrap()
}

fn compile_ok(model: &str, bits: u8, target: &str, dir: &Path) {
    let m = fixture(model);
    let out = compile(&[
        m.to_str().unwrap(),
        "--bits",
        &bits.to_string(),
        "--target",
        target,
        "-o",
        dir.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds examples/c-firmware/main.c against libNAME.a only.
fn firmware(dir: &Path, name: &str, cc: &str) -> PathBuf {
    let app = dir.join("app");
    ok(Command::new(cc)
        .args([
            "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-static", "-I",
        ])
        .arg(dir)
        .arg(format!("-DMODEL={name}"))
        .arg(format!("-DMODEL_UP={}", name.to_uppercase()))
        .arg(format!("-DMODEL_HEADER=\"{name}.h\""))
        .arg(root().join("examples/c-firmware/main.c"))
        .arg("-L")
        .arg(dir)
        .arg(format!("-l{name}"))
        .arg("-o")
        .arg(&app));
    app
}

/// The float32 values of a .npy written by diffdfq-run, as the raw little-endian bytes the
/// firmware writes.
fn npy_payload(p: &Path) -> Vec<u8> {
    let (_, v) = diffdfq_compiler::npy::read_f32(p).unwrap();
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Asserts the header names the SIMD kernels libNAME.a holds.
fn assert_kernels(dir: &Path, name: &str, kernels: &str) {
    let header = std::fs::read_to_string(dir.join(format!("{name}.h"))).unwrap();
    assert!(
        header.contains(&format!("Runtime kernels in lib{name}.a: {kernels} (")),
        "{header}"
    );
}

/// Runs a firmware built by [`firmware`] on raw inputs (aarch64 under qemu-aarch64, `max`: every
/// extension qemu emulates, dotprod included) and returns the raw outputs it wrote.
fn run_firmware(app: &Path, target: &str, raw: &Path) -> Vec<u8> {
    let y = app.with_file_name("y.f32");
    let mut cmd = if target == "aarch64" {
        let mut c = Command::new("qemu-aarch64");
        c.env("QEMU_CPU", "max").arg(app);
        c
    } else {
        Command::new(app)
    };
    ok(cmd.arg(raw).arg(&y));
    std::fs::read(&y).unwrap()
}

/// diffdfq-run on a blob, through the host runtime: the outputs as the firmware writes them.
fn diffdfq_run(dfq: &Path, npy: &Path) -> Vec<u8> {
    let yn = dfq.with_file_name("y.npy");
    ok(Command::new(env!("CARGO_BIN_EXE_diffdfq-run"))
        .arg(dfq)
        .arg("--input")
        .arg(npy)
        .arg("--output")
        .arg(&yn));
    npy_payload(&yn)
}

/// Writes `x` (shape `shape`) as `x.npy` and as the raw `x.f32` the firmware reads.
fn write_inputs(dir: &Path, shape: &[usize], x: &[f32]) -> (PathBuf, PathBuf) {
    let npy = dir.join("x.npy");
    std::fs::write(&npy, diffdfq_compiler::npy::to_bytes(shape, x).unwrap()).unwrap();
    let raw = dir.join("x.f32");
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&raw, bytes).unwrap();
    (npy, raw)
}

#[test]
fn firmware_outputs_are_identical_on_x86_64_aarch64_and_diffdfq_run() {
    let tmp = tempfile::tempdir().unwrap();
    // Four resnet inputs: the fixture's test image and scaled variants.
    let (_, x) = diffdfq_compiler::npy::read_f32(&fixture("resnet_fmnist.sample.npy")).unwrap();
    let batch: Vec<f32> = (0..4)
        .flat_map(|k| x.iter().map(move |v| v * (1.0 - 0.2 * k as f32)))
        .collect();
    let (npy, raw) = write_inputs(tmp.path(), &[4, 1, 28, 28], &batch);
    for bits in [2u8, 3, 4, 8] {
        let mut outputs = Vec::new();
        for (target, cc) in [("x86_64", "gcc"), ("aarch64", "aarch64-linux-gnu-gcc")] {
            let dir = tmp.path().join(format!("{target}-w{bits}"));
            compile_ok("resnet_fmnist.onnx", bits, target, &dir);
            for f in [
                "resnet_fmnist.dfq",
                "resnet_fmnist.o",
                "resnet_fmnist.h",
                "resnet_fmnist.report.json",
                "resnet_fmnist.report.svg",
                "libresnet_fmnist.a",
            ] {
                assert!(dir.join(f).is_file(), "{f} missing");
            }
            // Each target's baseline SIMD kernels run here: the aarch64 firmware runs NEON's.
            let kernels = if target == "aarch64" { "neon" } else { "sse2" };
            assert_kernels(&dir, "resnet_fmnist", kernels);
            let app = firmware(&dir, "resnet_fmnist", cc);
            outputs.push((target, run_firmware(&app, target, &raw)));
            // diffdfq-run on the same blob, through the host runtime.
            outputs.push((
                "diffdfq-run",
                diffdfq_run(&dir.join("resnet_fmnist.dfq"), &npy),
            ));
        }
        assert_eq!(outputs[0].1.len(), 4 * 10 * 4);
        for (who, bytes) in &outputs[1..] {
            assert!(
                bytes == &outputs[0].1,
                "W{bits}: {who} differs from the x86_64 firmware"
            );
        }
    }
}

/// A real model from another exporter (paddle2onnx's PP-LCNet text-line classifier, fetched
/// by scripts/fetch-real-models: 1×1 convolutions of 32 to 1280 output channels, depthwise
/// 3×3 and 5×5, SE blocks, HardSwish tables) as firmware on both targets: the aarch64
/// libraries run the NEON kernels (four output channels per pass in the 1×1 layers; with
/// `--cpu cortex-a55`, whose dotprod extension qemu's `max` CPU has, on `udot`), which must
/// give what x86_64's firmware and diffdfq-run give, byte for byte.
#[test]
fn a_real_model_runs_byte_identically_on_aarch64_neon() {
    let model = root().join("target/real-models/ppocrv5_cls.onnx");
    assert!(
        model.exists(),
        "{} is missing: run scripts/fetch-real-models",
        model.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    // Three seeded images in [−2, 2) (xorshift64): the kernels see every code.
    let mut s = 0x2545_f491_4f6c_dd1d_u64;
    let x: Vec<f32> = (0..3 * 3 * 80 * 160)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect();
    let (npy, raw) = write_inputs(tmp.path(), &[3, 3, 80, 160], &x);
    let mut outputs = Vec::new();
    for (target, cpu, cc, kernels) in [
        ("x86_64", None, "gcc", "sse2"),
        ("aarch64", None, "aarch64-linux-gnu-gcc", "neon"),
        (
            "aarch64",
            Some("cortex-a55"),
            "aarch64-linux-gnu-gcc",
            "neondot",
        ),
    ] {
        let dir = tmp.path().join(kernels);
        let mut args = vec![model.to_str().unwrap(), "--bits", "4", "--target", target];
        args.extend(["-o", dir.to_str().unwrap(), "--quiet"]);
        if let Some(c) = cpu {
            args.extend(["--cpu", c]);
        }
        let out = compile(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_kernels(&dir, "ppocrv5_cls", kernels);
        let app = firmware(&dir, "ppocrv5_cls", cc);
        outputs.push((kernels, run_firmware(&app, target, &raw)));
    }
    let dfq = tmp.path().join("sse2/ppocrv5_cls.dfq");
    outputs.push(("diffdfq-run", diffdfq_run(&dfq, &npy)));
    assert_eq!(outputs[0].1.len(), 3 * 2 * 4);
    for (who, bytes) in &outputs[1..] {
        assert!(
            bytes == &outputs[0].1,
            "{who} differs from the x86_64 firmware"
        );
    }
}

#[test]
fn same_input_flags_and_seed_give_byte_identical_artifacts() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    compile_ok("mobilenet_fmnist.onnx", 3, "aarch64", &a);
    compile_ok("mobilenet_fmnist.onnx", 3, "aarch64", &b);
    let mut names: Vec<_> = std::fs::read_dir(&a)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names.len(), 6, "{names:?}");
    for n in names {
        assert!(
            std::fs::read(a.join(&n)).unwrap() == std::fs::read(b.join(&n)).unwrap(),
            "{n:?} differs between runs"
        );
    }
}

/// Calibration splits work over rayon's threads: one thread and two give the same bytes, for
/// both calibrating methods (short settings; what matters is that every reduction is ordered).
#[test]
fn calibration_is_byte_identical_across_thread_counts() {
    let tmp = tempfile::tempdir().unwrap();
    for method in ["diffdfq", "genie"] {
        let dirs: Vec<PathBuf> = ["1", "2"]
            .iter()
            .map(|threads| {
                let dir = tmp.path().join(format!("{method}-{threads}"));
                ok(Command::new(env!("CARGO_BIN_EXE_diffdfq-compile"))
                    .env("RAYON_NUM_THREADS", threads)
                    .arg(fixture("mobilenet_fmnist.onnx"))
                    .args(["--method", method, "--bits", "3", "--samples", "8"])
                    // The held-out evaluation's figures are in the report: same bytes too.
                    .args(["--eval-samples", "8"])
                    .args([
                        "--synth-iters",
                        "5",
                        "--recon-iters",
                        "5",
                        "--no-lib",
                        "--quiet",
                    ])
                    .arg("-o")
                    .arg(&dir));
                dir
            })
            .collect();
        for name in [
            "mobilenet_fmnist.dfq",
            "mobilenet_fmnist.report.json",
            "mobilenet_fmnist.report.svg",
        ] {
            let a = std::fs::read(dirs[0].join(name)).unwrap();
            assert!(
                a == std::fs::read(dirs[1].join(name)).unwrap(),
                "{method}: {name} differs"
            );
        }
    }
}

#[test]
fn header_is_stable_and_the_object_exports_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    compile_ok("resnet_fmnist.onnx", 4, "x86_64", tmp.path());
    insta::assert_snapshot!(
        "resnet_fmnist_h",
        std::fs::read_to_string(tmp.path().join("resnet_fmnist.h")).unwrap()
    );
    let nm = ok(Command::new("nm").arg(tmp.path().join("resnet_fmnist.o")));
    let syms = String::from_utf8(nm.stdout).unwrap();
    assert!(syms.contains(" R resnet_fmnist_model\n"), "{syms}");
    assert!(syms.contains(" R resnet_fmnist_model_len\n"), "{syms}");
    let sections = ok(Command::new("readelf")
        .arg("-S")
        .arg(tmp.path().join("resnet_fmnist.o")));
    assert!(String::from_utf8_lossy(&sections.stdout).contains(".note.GNU-stack"));
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(tmp.path().join("resnet_fmnist.report.json")).unwrap(),
    )
    .unwrap();
    let t = &report["totals"];
    assert!(t["arena_bytes"].as_u64().unwrap() >= t["arena_lower_bound"].as_u64().unwrap());
    assert!(t["weight_bytes"].as_u64().unwrap() * 4 < t["fp32_weight_bytes"].as_u64().unwrap());
}

#[test]
fn a_failed_compile_leaves_no_file_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    let m = fixture("resnet_fmnist.onnx");
    for bad in [
        vec!["--bits", "5"],
        vec!["--target", "riscv64"],
        vec!["--name", "9lives"],
        vec!["--act-bits", "6"],
        vec!["--input-range", "2,-1"],
        vec!["--input-range", "1"],
    ] {
        let mut args = vec![m.to_str().unwrap(), "-o", dir.to_str().unwrap()];
        args.extend(bad.iter().copied());
        let out = compile(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{bad:?} left {left:?}");
    }
    let out = compile(&[
        m.to_str().unwrap(),
        "--target",
        "riscv64",
        "-o",
        dir.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("x86_64-unknown-linux-gnu") && err.contains("aarch64-unknown-linux-gnu"),
        "{err}"
    );
}

#[test]
fn input_range_is_named_in_the_header_and_the_report() {
    let tmp = tempfile::tempdir().unwrap();
    let m = fixture("resnet_fmnist.onnx");
    let dir = tmp.path().join("out");
    #[rustfmt::skip]
    ok(Command::new(env!("CARGO_BIN_EXE_diffdfq-compile")).args([
        m.to_str().unwrap(), "--no-lib", "--quiet", "-o", dir.to_str().unwrap(),
        "--method", "genie", "--samples", "4", "--synth-iters", "2", "--recon-iters", "2",
        "--input-range", "-0.8102,2.0227", "--eval-samples", "0",
    ]));
    let h = std::fs::read_to_string(dir.join("resnet_fmnist.h")).unwrap();
    assert!(h.contains("seed 0, input range [-0.8102, 2.0227]."), "{h}");
    let rep = std::fs::read_to_string(dir.join("resnet_fmnist.report.json")).unwrap();
    let rep: serde_json::Value = serde_json::from_str(&rep).unwrap();
    let r: Vec<f32> = rep["input_range"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(r, [-0.8102, 2.0227]);
}

/// After a compile, stderr holds one row per op (bits, bytes, MACs, SQNR on held-out synthetic
/// samples) and the totals; the timing line is left out of the snapshot.
#[test]
fn the_summary_is_a_per_layer_table_with_held_out_figures() {
    let tmp = tempfile::tempdir().unwrap();
    let m = fixture("resnet_fmnist.onnx");
    let out = compile(&[
        m.to_str().unwrap(),
        "--bits",
        "3",
        "--no-lib",
        "--eval-samples",
        "8",
        "-o",
        tmp.path().to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.lines().any(|l| l.starts_with("time: quantize ")),
        "{err}"
    );
    let table: String = err
        .lines()
        .filter(|l| !l.starts_with("time: "))
        .map(|l| format!("{l}\n"))
        .collect();
    insta::assert_snapshot!("resnet_fmnist_rtn_w3_summary", table);
}

fn json_compile(bits: &str, dir: &Path) -> serde_json::Value {
    let m = fixture("resnet_fmnist.onnx");
    let out = compile(&[
        m.to_str().unwrap(),
        "--bits",
        bits,
        "--no-lib",
        "--json",
        "--eval-samples",
        "16",
        "-o",
        dir.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    assert!(out.stderr.is_empty(), "--json prints nothing else");
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON document")
}

/// `--json`: the report's data, the files and the stage times on stdout; the held-out SQNR
/// tracks the bit width; errors are JSON on stderr with the exit code.
#[test]
fn json_summary_for_pipelines_and_json_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let w8 = json_compile("8", &tmp.path().join("w8"));
    let w2 = json_compile("2", &tmp.path().join("w2"));
    assert_eq!(w8["files"].as_array().unwrap().len(), 5, "{w8}");
    assert!(w8["seconds"]["evaluation"].as_f64().is_some(), "{w8}");
    let ev = |v: &serde_json::Value, k: &str| v["evaluation"][k].as_f64().unwrap();
    assert_eq!(w8["evaluation"]["source"], "synthesized");
    assert_eq!(ev(&w8, "samples"), 16.0);
    // 2-bit inner weights lose far more signal than 8-bit ones, and keep fewer decisions.
    assert!(
        ev(&w8, "output_sqnr_db") > ev(&w2, "output_sqnr_db") + 6.0,
        "{} vs {}",
        ev(&w8, "output_sqnr_db"),
        ev(&w2, "output_sqnr_db")
    );
    assert!(ev(&w8, "top1_agreement") >= ev(&w2, "top1_agreement"));
    assert!(ev(&w8, "top1_agreement") >= 0.75, "{w8}");
    let layers = w8["layers"].as_array().unwrap();
    assert!(
        layers.iter().all(|l| l["sqnr_db"].as_f64().is_some()),
        "{w8}"
    );
    // The plot: one SQNR bar and one weight-bytes bar per op that has them.
    let svg = std::fs::read_to_string(tmp.path().join("w8/resnet_fmnist.report.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("SQNR of each op"));
    let with_weights = layers.iter().filter(|l| l["weight_bytes"] != 0).count();
    let bars = svg.matches("<rect").count() - 1; // less the background
    assert_eq!(bars, layers.len() + with_weights, "{bars} bars");
    // The report on disk carries the same figures.
    let rep: serde_json::Value = serde_json::from_slice(
        &std::fs::read(tmp.path().join("w8/resnet_fmnist.report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(rep["evaluation"], w8["evaluation"]);

    let missing = tmp.path().join("missing.onnx");
    let out = compile(&[missing.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let e: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(e["exit_code"], 2);
    assert!(e["error"].as_str().unwrap().contains("missing.onnx"), "{e}");
}

/// Every entry under `dir`, recursively.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}

/// SIGINT and SIGTERM while the compile writes its outputs (its runtime library building in a
/// cold cache, so the window lasts seconds): exit 130 / 143, one line, no file in the output
/// directory, no build directory left in the cache.
#[test]
fn a_signal_while_writing_removes_the_temporary_files() {
    for (sig, code, name) in [
        (libc::SIGINT, 130, "SIGINT"),
        (libc::SIGTERM, 143, "SIGTERM"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let (out, cache) = (tmp.path().join("out"), tmp.path().join("cache"));
        let child = Command::new(env!("CARGO_BIN_EXE_diffdfq-compile"))
            .arg(fixture("resnet_fmnist.onnx"))
            .args([
                "--method",
                "rtn",
                "--eval-samples",
                "0",
                "--target",
                "x86_64",
                "-o",
            ])
            .arg(&out)
            .env("DIFFDFQ_CACHE_DIR", &cache)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let building = || {
            walk(&cache).iter().any(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("build-"))
            })
        };
        let t0 = std::time::Instant::now();
        while !building() {
            assert!(
                t0.elapsed().as_secs() < 120,
                "the library build never started"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // The runtime's sources being written: give cargo a moment to start compiling.
        std::thread::sleep(std::time::Duration::from_millis(500));
        unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(code), "{name}");
        assert_eq!(
            String::from_utf8_lossy(&o.stderr),
            format!("diffdfq-compile: interrupted by {name}; no output was written\n")
        );
        assert_eq!(walk(&out), Vec::<PathBuf>::new(), "{name}: files left");
        assert!(!building(), "{name}: the cache keeps a build directory");
    }
}

/// SIGINT during calibration: nothing had been written yet, and nothing is.
#[test]
fn a_signal_during_calibration_exits_130_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let child = Command::new(env!("CARGO_BIN_EXE_diffdfq-compile"))
        .arg(fixture("mobilenet_fmnist.onnx"))
        .args(["--bits", "3", "--no-lib", "-o"])
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.ends_with("diffdfq-compile: interrupted by SIGINT; no output was written\n"),
        "{err}"
    );
    assert!(!out.exists() || walk(&out).is_empty());
}

/// A write that fails midway (a file-size limit stands in for a full disk: the small files are
/// written, `libNAME.a` is not): one line naming the file, non-zero exit, and the previous
/// compile's outputs in the directory untouched, with no temporary directory left.
#[test]
fn a_write_failing_midway_keeps_the_previous_outputs() {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let cache = tmp.path().join("cache");
    let m = fixture("resnet_fmnist.onnx");
    let cmd = |bits: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_diffdfq-compile"));
        c.arg(&m)
            .args([
                "--method",
                "rtn",
                "--eval-samples",
                "0",
                "--quiet",
                "--bits",
                bits,
            ])
            .args(["--target", "x86_64", "-o"])
            .arg(&out)
            .env("DIFFDFQ_CACHE_DIR", &cache);
        c
    };
    // The first compile also fills the runtime cache, so that the limited one builds nothing.
    ok(&mut cmd("4"));
    let before: Vec<(PathBuf, Vec<u8>)> = walk(&out)
        .into_iter()
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    assert_eq!(before.len(), 6);
    let mut limited = cmd("3");
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        limited.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 1 << 20,
                rlim_max: 1 << 20,
            };
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let o = limited.output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("libresnet_fmnist.a") && err.contains("too large"),
        "{err}"
    );
    let after: Vec<(PathBuf, Vec<u8>)> = walk(&out)
        .into_iter()
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    assert!(after == before, "the previous outputs changed");
}

fn weight_bytes(dir: &Path, name: &str) -> (u64, serde_json::Value) {
    let rep: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.report.json"))).unwrap())
            .unwrap();
    (rep["totals"]["weight_bytes"].as_u64().unwrap(), rep)
}

/// `diffdfq-compile` of the MobileNet fixture into `d` (no library, quiet) with `flags`.
fn compile_mobilenet(d: &Path, flags: &[&str]) -> Output {
    let m = fixture("mobilenet_fmnist.onnx");
    let mut args = vec![
        m.to_str().unwrap(),
        "--no-lib",
        "--quiet",
        "-o",
        d.to_str().unwrap(),
    ];
    args.extend(flags);
    compile(&args)
}

/// 4-bit activations take half the arena (two codes per byte), and `--arena` keeps the
/// activation tensors whose 4-bit codes cost most at 8 bits while the arena fits the budget,
/// recorded in the report; a budget below the all-4-bit arena and `--arena` without
/// `--act-bits 4` are one-line errors.
#[test]
fn arena_budgets_keep_the_costliest_tensors_at_8_bits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |t: &str| tmp.path().join(t);
    let run = |t: &str, flags: &[&str]| compile_mobilenet(&dir(t), flags);
    let arena = |t: &str| {
        weight_bytes(&dir(t), "mobilenet_fmnist").1["totals"]["arena_bytes"]
            .as_u64()
            .unwrap()
    };
    assert!(run("a8", &[]).status.success());
    assert!(run("a4", &["--act-bits", "4"]).status.success());
    let (a8, a4) = (arena("a8"), arena("a4"));
    assert!(a4 * 4 < a8 * 3, "A4 arena {a4} B against A8 {a8} B");
    let budget = (a4 + a8) / 2;
    let o = run(
        "mix",
        &[
            "--act-bits",
            "4",
            "--arena",
            &budget.to_string(),
            "--eval-samples",
            "8",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_, rep) = weight_bytes(&dir("mix"), "mobilenet_fmnist");
    let got = rep["totals"]["arena_bytes"].as_u64().unwrap();
    assert!(got <= budget, "{got} B for a budget of {budget}");
    let c = &rep["mixed_precision"]["arena"];
    assert_eq!(c["arena_bytes"].as_u64(), Some(got));
    assert_eq!(c["all_4bit_arena_bytes"].as_u64(), Some(a4));
    // Kept most sensitive first, each one a measured tensor.
    let sens: std::collections::HashMap<&str, f64> = rep["mixed_precision"]["activations_a4"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap(),
                t["sensitivity"].as_f64().unwrap(),
            )
        })
        .collect();
    let kept: Vec<f64> = c["act8"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| sens[n.as_str().unwrap()])
        .collect();
    assert!(!kept.is_empty() && kept.len() < sens.len(), "{c}");
    assert!(kept.windows(2).all(|w| w[0] >= w[1]), "{kept:?}");
    // The compiled tensors are the mix: inner layers at both widths.
    let acts: Vec<u64> = rep["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["act_bits"].as_u64().unwrap())
        .collect();
    assert!(acts.contains(&4) && acts.contains(&8), "{acts:?}");
    // A Conv that runs fused with the table after it is marked as such, and the table follows.
    let layers = rep["layers"].as_array().unwrap();
    let fused: Vec<usize> = (0..layers.len())
        .filter(|&i| layers[i]["fused_table"] == true)
        .collect();
    assert!(!fused.is_empty());
    for i in fused {
        assert!(layers[i]["op"].as_str().unwrap().ends_with("Conv"));
        assert!(layers[i + 1]["op"].as_str().unwrap().starts_with("Hard"));
    }
    let o = run(
        "tight",
        &["--act-bits", "4", "--arena", &(a4 / 2).to_string()],
    );
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "--arena {} B: no assignment fits; the least",
            a4 / 2
        )) && err.contains(&format!("(every activation at 4 bits: {a4} B)"))
            && err.lines().count() == 1,
        "{err}"
    );
    let o = run("a8arena", &["--arena", "40K"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("add --act-bits 4"));
    assert!(!dir("tight").exists() && !dir("a8arena").exists());
}

/// `--flash`, fractional `--bits` and `--layer-bits`: per-layer widths that fit the budget,
/// recorded in the report; budgets nothing fits and wrong lists are one-line errors.
#[test]
fn flash_budgets_choose_per_layer_bits_that_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |t: &str| tmp.path().join(t);
    let run = |t: &str, flags: &[&str]| compile_mobilenet(&dir(t), flags);
    for (t, b) in [("w2", "2"), ("w3", "3")] {
        assert!(run(t, &["--bits", b]).status.success());
    }
    let (b2, _) = weight_bytes(&dir("w2"), "mobilenet_fmnist");
    let (b3, _) = weight_bytes(&dir("w3"), "mobilenet_fmnist");
    let budget = (b2 * 11 / 10).to_string();
    let o = run("flash", &["--flash", &budget, "--eval-samples", "8"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (bf, rep) = weight_bytes(&dir("flash"), "mobilenet_fmnist");
    assert!(bf <= b2 * 11 / 10, "{bf} B for a budget of {budget}");
    let chosen: Vec<u64> = rep["mixed_precision"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["bits"].as_u64().unwrap())
        .collect();
    let shipped: Vec<u64> = rep["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["weight_bits"].as_u64())
        .collect();
    assert_eq!(chosen, shipped, "the report's choice is what was compiled");
    // The choice was measured whole against uniform W2 (the widest uniform model within
    // 1.1 × its bytes), and the lower output MSE shipped.
    let j = &rep["mixed_precision"]["joint_check"];
    let (k, u) = (
        j["knapsack_mse"].as_f64().unwrap(),
        j["uniform_mse"].as_f64().unwrap(),
    );
    assert_eq!(j["uniform_bits"].as_u64(), Some(2), "{j}");
    let n = chosen.len();
    let uniform: Vec<u64> = (0..n)
        .map(|i| if i == 0 || i + 1 == n { 8 } else { 2 })
        .collect();
    match j["kept"].as_str().unwrap() {
        // The knapsack spends the margin over W2 (on this fixture its MSE is a fifth of W2's).
        "knapsack" => assert!(
            k <= u && chosen != uniform && bf > b2,
            "{j} {chosen:?} {bf}"
        ),
        "uniform" => assert!(
            u < k && chosen == uniform && bf == b2,
            "{j} {chosen:?} {bf}"
        ),
        other => panic!("kept {other}"),
    }
    // Each tensor `--act-bits 4` would lower, once (pools and reshapes ride with their
    // source), with its sensitivity to 4-bit codes.
    let acts = rep["mixed_precision"]["activations_a4"].as_array().unwrap();
    let names: std::collections::BTreeSet<&str> =
        acts.iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert!(acts.len() > 20 && names.len() == acts.len(), "{acts:?}");
    assert!(acts.iter().all(|a| a["elements"].as_u64().unwrap() > 0
        && a["sensitivity"].as_f64().is_some_and(|v| v >= 0.0)));
    assert!(acts
        .iter()
        .any(|a| a["sensitivity"].as_f64().unwrap() > 0.0));
    assert!(
        chosen.iter().any(|&b| b > 2) && chosen.contains(&2),
        "{chosen:?}"
    );
    // The report's plot shows the trade-off the choice saw.
    let svg = std::fs::read_to_string(dir("flash").join("mobilenet_fmnist.report.svg")).unwrap();
    assert!(svg.contains("sensitivity vs weight bytes per layer"));
    // --bits 2.5: between the uniform 2- and 3-bit models' bytes; the summary (not --quiet
    // here) gives each weighted row its sensitivity at the chosen width.
    let d = dir("half");
    let m = fixture("mobilenet_fmnist.onnx");
    let o = compile(&[
        m.to_str().unwrap(),
        "--no-lib",
        "-o",
        d.to_str().unwrap(),
        "--bits",
        "2.5",
        "--eval-samples",
        "8",
    ]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let mut rows = err.lines().skip_while(|l| !l.starts_with("layer "));
    assert!(rows.next().unwrap().ends_with("  sensitivity"), "{err}");
    let weighted: Vec<&str> = rows
        .take_while(|l| !l.starts_with("flash:"))
        .filter(|l| l.contains("Conv ") || l.contains("FullyConnected"))
        .collect();
    assert_eq!(weighted.len(), 21, "{err}");
    for l in weighted {
        let v = l.split_whitespace().last().unwrap();
        assert!(v == "0" || v.parse::<f64>().is_ok_and(|v| v > 0.0), "{l}");
    }
    let (bh, _) = weight_bytes(&dir("half"), "mobilenet_fmnist");
    assert!(bh > b2 && bh <= (b2 + b3) / 2, "{bh} vs {b2}..{b3}");
    // Nothing fits, a wrong list: one line, exit 2, nothing written.
    let o = run("none", &["--flash", "1000", "--eval-samples", "8"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("diffdfq-compile: error: --flash 1000 B: no assignment fits; every layer at 2 bits takes ")
            && err.lines().count() == 1,
        "{err}"
    );
    let o = run("list", &["--layer-bits", "8,2"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("--layer-bits: 2 widths for 21 conv/linear layers"));
    assert!(!dir("none").exists() && !dir("list").exists());
}

/// With held-out samples a calibrated compile ships whichever candidate has the least output
/// MSE on them — the calibrated model, always bias-corrected (at either activation width), or
/// rtn's — records the comparison, and names the choice in the header; without them
/// (`--eval-samples 0`) nothing is compared and the calibrated model ships.
#[test]
fn calibrated_compiles_ship_the_candidate_the_held_out_samples_prefer() {
    let tmp = tempfile::tempdir().unwrap();
    let m = fixture("resnet_fmnist.onnx");
    let quick = [
        "--method",
        "diffdfq",
        "--samples",
        "2",
        "--synth-iters",
        "1",
        "--recon-iters",
        "1",
        "--no-lib",
        "--quiet",
    ];
    let names = ["calibrated+bias-correction", "rtn"];
    for act in ["8", "4"] {
        let d = tmp.path().join(format!("a{act}"));
        let mut args = vec![m.to_str().unwrap(), "--bits", "4", "--act-bits", act];
        args.extend(quick);
        args.extend(["--eval-samples", "8", "-o", d.to_str().unwrap()]);
        let o = compile(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (_, rep) = weight_bytes(&d, "resnet_fmnist");
        let sel = &rep["calibration"]["selection"];
        let cands = sel["candidates"].as_array().unwrap();
        let got: Vec<&str> = cands.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(got, names);
        let mse: Vec<f64> = cands
            .iter()
            .map(|c| c["output_mse"].as_f64().unwrap())
            .collect();
        assert!(mse.iter().all(|v| v.is_finite() && *v > 0.0), "{mse:?}");
        let best = (0..mse.len()).fold(0, |b, i| if mse[i] < mse[b] { i } else { b });
        let kept = sel["kept"].as_str().unwrap();
        assert_eq!(kept, names[best], "{sel}");
        let h = std::fs::read_to_string(d.join("resnet_fmnist.h")).unwrap();
        assert!(h.contains(&format!("(kept: {kept})")), "{h}");
    }
    let d = tmp.path().join("none");
    let mut args = vec![m.to_str().unwrap(), "--bits", "4"];
    args.extend(quick);
    args.extend(["--eval-samples", "0", "-o", d.to_str().unwrap()]);
    assert!(compile(&args).status.success());
    let (_, rep) = weight_bytes(&d, "resnet_fmnist");
    assert!(rep["calibration"].get("selection").is_none());
    // The candidate kept at A8 is the very model a compile without the selection ships (the
    // calibrated one, bias-corrected there too) or rtn's.
    let kept_a8 = {
        let (_, rep) = weight_bytes(&tmp.path().join("a8"), "resnet_fmnist");
        rep["calibration"]["selection"]["kept"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let other = if kept_a8 == "rtn" {
        let r = tmp.path().join("rtn");
        let o = compile(&[
            m.to_str().unwrap(),
            "--method",
            "rtn",
            "--bits",
            "4",
            "--no-lib",
            "--quiet",
            "-o",
            r.to_str().unwrap(),
        ]);
        assert!(o.status.success());
        r
    } else {
        d
    };
    let blob = |dir: &std::path::Path| std::fs::read(dir.join("resnet_fmnist.dfq")).unwrap();
    assert!(
        blob(&tmp.path().join("a8")) == blob(&other),
        "kept {kept_a8}"
    );
}

/// At W8A8 a calibrated method ships rtn's model without calibrating: the same bytes as
/// `--method rtn`, and the report, the header and stderr say so. Below 8 bits it calibrates.
#[test]
fn calibrated_methods_ship_rtn_at_w8a8_without_calibrating() {
    let tmp = tempfile::tempdir().unwrap();
    let m = fixture("resnet_fmnist.onnx");
    let dir = |n: &str| tmp.path().join(n);
    // Compiles into `dir(name)`, exiting 0; returns stderr and the report.
    let run = |name: &str, flags: &[&str]| {
        let d = dir(name);
        let mut args = vec![m.to_str().unwrap(), "--bits", "8", "--no-lib"];
        args.extend(flags);
        args.extend(["-o", d.to_str().unwrap()]);
        let o = compile(&args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{err}");
        (err, weight_bytes(&d, "resnet_fmnist").1)
    };
    let blob = |n: &str| std::fs::read(dir(n).join("resnet_fmnist.dfq")).unwrap();
    run("rtn", &["--method", "rtn"]);
    for method in ["diffdfq", "genie"] {
        let (err, rep) = run(method, &["--method", method]);
        assert!(
            err.contains("W8A8: shipping rtn's model, not calibrated"),
            "{err}"
        );
        assert!(!err.contains("synthesis"), "{err}");
        assert_eq!(
            rep["calibration"]["calibrated"], false,
            "{}",
            rep["calibration"]
        );
        assert_eq!(rep["method"], method);
        let h = std::fs::read_to_string(dir(method).join("resnet_fmnist.h")).unwrap();
        assert!(h.contains("(kept: rtn, not calibrated at W8A8)"), "{h}");
        assert!(blob(method) == blob("rtn"), "{method}");
    }
    // 8-bit weights with 4-bit first and last layers are not W8A8: calibration runs.
    let quick = ["--samples", "2", "--synth-iters", "1", "--recon-iters", "1"];
    let (_, rep) = run(
        "fl4",
        &[
            &["--method", "diffdfq", "--first-last-bits", "4"],
            &quick[..],
        ]
        .concat(),
    );
    assert!(
        rep["calibration"]["budget"].is_object(),
        "{}",
        rep["calibration"]
    );
}

/// `--cpu x86-64-v3` builds libNAME.a with the AVX2 kernels, `--cpu cascadelake` with the
/// AVX-512 VNNI ones: the header, the report and the library itself (`dfq_kernels()`) say
/// so, and the firmware's outputs are byte-identical to the baseline library's and to
/// `diffdfq-run`'s, on the depthwise fixture and the ResNet (W3: the 4-bit 1×1 kernels; the
/// 3×3 convolutions over gathered columns, with their weight panels in the larger scratch
/// region the compiler gives those CPUs).
#[test]
fn a_library_built_for_a_cpu_holds_its_kernels_and_gives_the_same_outputs() {
    if !std::arch::is_x86_feature_detected!("avx2") {
        println!("this CPU has no AVX2: the x86-64-v3 library cannot run here, not checked");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for model in ["mobilenet_fmnist", "resnet_fmnist"] {
        let npy = fixture(&format!("{model}.sample.npy"));
        let (_, x) = diffdfq_compiler::npy::read_f32(&npy).unwrap();
        let raw = tmp.path().join(format!("{model}.f32"));
        std::fs::write(
            &raw,
            x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
        )
        .unwrap();
        let mut outputs = Vec::new();
        // Cascade Lake: AVX-512 with VNNI, where this CPU has it.
        let vnni = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512cd")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni");
        let mut baseline_scratch = 0;
        let mut cpus = vec![None, Some("x86-64-v3")];
        if vnni {
            cpus.push(Some("cascadelake"));
        } else {
            println!("this CPU has no AVX-512 VNNI: the cascadelake library not checked");
        }
        for cpu in cpus {
            let dir = tmp
                .path()
                .join(format!("{model}-{}", cpu.unwrap_or("baseline")));
            let m = fixture(&format!("{model}.onnx"));
            let mut args = vec![m.to_str().unwrap(), "--bits", "3", "--target", "x86_64"];
            args.extend(["-o", dir.to_str().unwrap(), "--quiet"]);
            if let Some(c) = cpu {
                args.extend(["--cpu", c]);
            }
            let out = compile(&args);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let kernels = match cpu {
                None => "sse2",
                Some("x86-64-v3") => "avx2",
                Some(_) => "avx512vnni",
            };
            let header = std::fs::read_to_string(dir.join(format!("{model}.h"))).unwrap();
            assert!(
                header.contains(&format!("Runtime kernels in lib{model}.a: {kernels} (")),
                "{header}"
            );
            let report: serde_json::Value = serde_json::from_slice(
                &std::fs::read(dir.join(format!("{model}.report.json"))).unwrap(),
            )
            .unwrap();
            assert_eq!(report["kernels"], kernels);
            assert_eq!(report["cpu"].as_str(), cpu);
            // The AVX2 levels keep the weight panels of the 3×3 convolutions in scratch.
            let scratch = report["totals"]["scratch_bytes"].as_u64().unwrap();
            match cpu {
                None => baseline_scratch = scratch,
                Some(_) if model == "resnet_fmnist" => assert!(
                    scratch > baseline_scratch,
                    "{model}: scratch {scratch} B for {cpu:?}, {baseline_scratch} B at the baseline"
                ),
                Some(_) => {}
            }
            // The library's own answer.
            let probe = dir.join("probe.c");
            std::fs::write(
                &probe,
                format!(
                    "#include <stdio.h>\n#include \"{model}.h\"\nint main(void) {{ puts(dfq_kernels()); return 0; }}\n"
                ),
            )
            .unwrap();
            let exe = dir.join("probe");
            ok(Command::new("gcc")
                .arg("-I")
                .arg(&dir)
                .arg(&probe)
                .arg(dir.join(format!("lib{model}.a")))
                .arg("-o")
                .arg(&exe));
            let said = ok(&mut Command::new(&exe)).stdout;
            assert_eq!(String::from_utf8_lossy(&said).trim(), kernels);
            let app = firmware(&dir, model, "gcc");
            let y = dir.join("y.f32");
            ok(Command::new(&app).arg(&raw).arg(&y));
            outputs.push(std::fs::read(&y).unwrap());
            let yn = dir.join("y.npy");
            ok(Command::new(env!("CARGO_BIN_EXE_diffdfq-run"))
                .arg(dir.join(format!("{model}.dfq")))
                .arg("--input")
                .arg(&npy)
                .arg("--output")
                .arg(&yn));
            outputs.push(npy_payload(&yn));
        }
        assert!(!outputs[0].is_empty());
        for o in &outputs[1..] {
            assert!(o == &outputs[0], "{model}: outputs differ");
        }
    }
}
