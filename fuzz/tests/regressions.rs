//! Every minimized input the fuzzers found (`fuzz/regressions/TARGET/`) replays through the
//! same function its target runs, and the structural mutator's edits of the fixtures go
//! through the compiler: none may panic.

use std::path::Path;

fn cases(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("regressions")
        .join(target);
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().is_some_and(|n| n != ".gitkeep"))
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

fn replay(target: &str, f: fn(&[u8])) -> usize {
    let all = cases(target);
    for (name, bytes) in &all {
        if std::panic::catch_unwind(|| f(bytes)).is_err() {
            panic!("{name} panics again");
        }
    }
    all.len()
}

#[test]
fn found_crashes_stay_fixed() {
    let n = replay("runtime_blob", diffdfq_fuzz::blob)
        + replay("npy", diffdfq_fuzz::npy)
        + replay("import_onnx", |b| {
            diffdfq_fuzz::onnx(b);
        });
    println!("{n} regression inputs replayed");
}

#[test]
fn structural_mutants_of_the_fixtures_compile_or_fail_cleanly() {
    use diffdfq_fuzz::Reached;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models");
    let orig = std::fs::read(dir.join("resnet_fmnist.onnx")).unwrap();
    let mut reached = std::collections::BTreeMap::new();
    let mut changed = 0;
    for seed in 0..60u64 {
        let m = diffdfq_fuzz::mutate_onnx(&orig, seed, 1 << 24).expect("the fixture decodes");
        changed += usize::from(m != orig);
        match std::panic::catch_unwind(|| diffdfq_fuzz::onnx(&m)) {
            Ok(r) => *reached.entry(r).or_insert(0) += 1,
            Err(_) => panic!("mutant of seed {seed} panics"),
        }
    }
    println!("60 structural mutants: {reached:?}");
    assert!(
        changed >= 45,
        "only {changed} of 60 mutants differ from the fixture"
    );
    // The edits must leave many models valid enough to reach the later stages.
    assert!(reached.get(&Reached::Rejected).copied().unwrap_or(0) >= 5);
    assert!(reached.get(&Reached::Lowered).copied().unwrap_or(0) >= 5);
}

/// The seeds `scripts/fuzz` gives the ONNX target go all the way through (none is past the
/// size cap that skips compiling): the fixtures always, the real models where fetched.
#[test]
fn the_seed_models_compile_within_the_case_cap() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut seeds = vec![
        root.join("examples/models/mobilenet_fmnist.onnx"),
        root.join("examples/models/resnet_fmnist.onnx"),
    ];
    for m in ["cifar10_keras", "ppocrv5_cls"] {
        let p = root.join(format!("target/real-models/{m}.onnx"));
        if p.exists() {
            seeds.push(p);
        }
    }
    for p in seeds {
        let r = diffdfq_fuzz::onnx(&std::fs::read(&p).unwrap());
        assert_eq!(r, diffdfq_fuzz::Reached::Lowered, "{}", p.display());
    }
}
