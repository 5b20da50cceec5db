//! The runtime compiled for a target (`libdiffdfq_device.a`), built on demand and cached.
//!
//! The runtime's sources are embedded in the compiler, so the library a firmware links always
//! matches the integers the compiler checked. They are built with a Rust toolchain that has
//! the target's `core`: rustup's (`rustup target add TRIPLE`) or Debian's rustc-web
//! (`/usr/bin/cargo` with `libstd-rust-web-dev:ARCH`). The cache key is the hash of the sources,
//! the target and the CPU, so a cached library is reused byte for byte (deterministic libNAME.a).
//!
//! `--cpu NAME` builds it with `-C target-cpu=NAME`: the runtime picks its SIMD kernels from
//! the target features at compile time (`diffdfq_runtime::kernels::KERNELS`), so the CPU decides
//! which kernels libNAME.a holds. [`Cpu`] checks the name against the toolchain's own list.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use diffdfq_runtime::kernels::Isa;
use diffdfq_targets::Target;

use crate::Error;

/// (path relative to the runtime crate, contents)
const SOURCES: &[(&str, &str)] = &[
    ("Cargo.toml", include_str!("../../../runtime/Cargo.toml")),
    ("src/lib.rs", include_str!("../../../runtime/src/lib.rs")),
    ("src/capi.rs", include_str!("../../../runtime/src/capi.rs")),
    (
        "src/error.rs",
        include_str!("../../../runtime/src/error.rs"),
    ),
    (
        "src/format/bands.rs",
        include_str!("../../../runtime/src/format/bands.rs"),
    ),
    ("src/exec.rs", include_str!("../../../runtime/src/exec.rs")),
    (
        "src/format/mod.rs",
        include_str!("../../../runtime/src/format/mod.rs"),
    ),
    (
        "src/format/model.rs",
        include_str!("../../../runtime/src/format/model.rs"),
    ),
    (
        "src/format/ops.rs",
        include_str!("../../../runtime/src/format/ops.rs"),
    ),
    (
        "src/format/tensors.rs",
        include_str!("../../../runtime/src/format/tensors.rs"),
    ),
    (
        "src/format/writer.rs",
        include_str!("../../../runtime/src/format/writer.rs"),
    ),
    ("src/geom.rs", include_str!("../../../runtime/src/geom.rs")),
    (
        "src/packing.rs",
        include_str!("../../../runtime/src/packing.rs"),
    ),
    (
        "src/records.rs",
        include_str!("../../../runtime/src/records.rs"),
    ),
    (
        "src/kernels/mod.rs",
        include_str!("../../../runtime/src/kernels/mod.rs"),
    ),
    (
        "src/kernels/plan.rs",
        include_str!("../../../runtime/src/kernels/plan.rs"),
    ),
    (
        "src/kernels/neon.rs",
        include_str!("../../../runtime/src/kernels/neon.rs"),
    ),
    (
        "src/kernels/x86.rs",
        include_str!("../../../runtime/src/kernels/x86.rs"),
    ),
    (
        "src/numerics.rs",
        include_str!("../../../runtime/src/numerics.rs"),
    ),
    (
        "include/diffdfq.h",
        include_str!("../../../runtime/include/diffdfq.h"),
    ),
    (
        "staticlib/Cargo.toml",
        include_str!("../../../runtime/staticlib/Cargo.toml"),
    ),
    (
        "staticlib/src/lib.rs",
        include_str!("../../../runtime/staticlib/src/lib.rs"),
    ),
];

/// FNV-1a 64: a stable content hash for the cache key.
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        h = (h ^ 0xff).wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("DIFFDFQ_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("diffdfq");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache/diffdfq"),
        None => std::env::temp_dir().join("diffdfq-cache"),
    }
}

/// A cargo + rustc pair that can build for `triple`.
struct Toolchain {
    cargo: PathBuf,
    rustc: PathBuf,
}

fn sysroot_has(rustc: &Path, triple: &str) -> bool {
    let Ok(out) = Command::new(rustc).arg("--print").arg("sysroot").output() else {
        return false;
    };
    if !out.status.success() {
        return false;
    }
    let root = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let lib = root.join("lib/rustlib").join(triple).join("lib");
    std::fs::read_dir(lib).is_ok_and(|mut d| {
        d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("libcore-")))
    })
}

fn find_toolchain(triple: &str) -> Option<Toolchain> {
    let which = |bin: &str| -> Option<PathBuf> {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(bin))
                .find(|c| c.is_file())
        })
    };
    let mut candidates = Vec::new();
    if let (Some(cargo), Some(rustc)) = (which("cargo"), which("rustc")) {
        candidates.push(Toolchain { cargo, rustc });
    }
    candidates.push(Toolchain {
        cargo: "/usr/bin/cargo".into(),
        rustc: "/usr/bin/rustc".into(),
    });
    candidates
        .into_iter()
        .find(|t| t.cargo.is_file() && sysroot_has(&t.rustc, triple))
}

fn no_toolchain(target: &Target) -> Error {
    Error::Input(format!(
            "no Rust toolchain can build the runtime for {t}: run `rustup target add {t}`, or install Debian's \
             rustc-web cargo-web libstd-rust-web-dev:{arch} (see README); or pass --no-lib",
            t = target.triple,
            arch = match target.arch {
                diffdfq_targets::Arch::X86_64 => "amd64",
                diffdfq_targets::Arch::Aarch64 => "arm64",
            }
        ))
}

/// The CPU libNAME.a is built for (`--cpu`), checked against the toolchain that builds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cpu {
    /// As given, passed to `-C target-cpu`.
    pub name: String,
    /// What `native` stands for on this machine (rustc's own words), else `None`.
    pub resolved: Option<String>,
    /// The target features the CPU enables (`rustc --print cfg`), sorted.
    pub features: Vec<String>,
}

impl Cpu {
    /// Checks `name` against `rustc --print target-cpus --target TRIPLE`; `native` only where
    /// the target is this machine's architecture.
    pub fn resolve(target: &Target, name: &str) -> Result<Cpu, Error> {
        let host = diffdfq_targets::host();
        if name == "native" && host.map(|h| h.arch) != Some(target.arch) {
            return Err(Error::Input(format!(
                "--cpu native means this machine's CPU, which cannot run {}; name the device's CPU (e.g. cortex-a55)",
                target.triple
            )));
        }
        let tc = find_toolchain(target.triple).ok_or_else(|| no_toolchain(target))?;
        let run = |args: &[&str]| -> Result<String, Error> {
            let out = Command::new(&tc.rustc)
                .args(args)
                .output()
                .map_err(|e| Error::Internal(format!("running {}: {e}", tc.rustc.display())))?;
            if !out.status.success() {
                return Err(Error::Internal(format!(
                    "{} {}: {}",
                    tc.rustc.display(),
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                        .lines()
                        .next()
                        .unwrap_or("")
                )));
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let list = run(&["--print", "target-cpus", "--target", target.triple])?;
        // "    name   - description" under a title line.
        let known: Vec<(&str, &str)> = list
            .lines()
            .skip(1)
            .filter_map(|l| {
                let mut it = l.trim().splitn(2, " - ");
                let n = it.next()?.trim();
                (!n.is_empty()).then(|| (n, it.next().unwrap_or("").trim()))
            })
            .collect();
        let Some(&(_, about)) = known.iter().find(|(n, _)| *n == name) else {
            let mut near: Vec<&str> = known
                .iter()
                .map(|(n, _)| *n)
                .filter(|n| n.contains(name) || name.contains(*n))
                .take(6)
                .collect();
            if near.is_empty() {
                near = known.iter().map(|(n, _)| *n).take(4).collect();
            }
            return Err(Error::Input(format!(
                "--cpu {name}: not a CPU {} knows for {} (e.g. {}; `rustc --print target-cpus --target {}` lists all)",
                tc.rustc.display(),
                target.triple,
                near.join(", "),
                target.triple
            )));
        };
        let resolved = (name == "native").then(|| {
            about
                .split("currently ")
                .nth(1)
                .map(|r| r.trim_end_matches(['.', ')']).to_string())
                .unwrap_or_default()
        });
        let cfg = run(&[
            "--print",
            "cfg",
            "--target",
            target.triple,
            "-C",
            &format!("target-cpu={name}"),
        ])?;
        let mut features: Vec<String> = cfg
            .lines()
            .filter_map(|l| l.strip_prefix("target_feature=\""))
            .map(|f| f.trim_end_matches('"').to_string())
            .collect();
        features.sort();
        Ok(Cpu {
            name: name.to_string(),
            resolved,
            features,
        })
    }
}

/// The SIMD kernels a runtime built with these target features holds: the same choice as
/// `diffdfq_runtime::kernels::KERNELS` makes with `cfg(target_feature)` (checked end to end by
/// compiler/tests/compile.rs, which links libNAME.a and asks it).
pub fn kernels(target: &Target, cpu: Option<&Cpu>) -> Isa {
    let has = |f: &str| cpu.is_some_and(|c| c.features.iter().any(|x| x == f));
    match target.arch {
        diffdfq_targets::Arch::X86_64 if has("avx2") && has("avx512vnni") && has("avx512vl") => {
            Isa::Avx512Vnni
        }
        diffdfq_targets::Arch::X86_64 if has("avx2") => Isa::Avx2,
        diffdfq_targets::Arch::X86_64 => Isa::Sse2,
        diffdfq_targets::Arch::Aarch64 if has("dotprod") => Isa::NeonDot,
        diffdfq_targets::Arch::Aarch64 => Isa::Neon,
    }
}

/// Path of `libdiffdfq_device.a` for `target` (and `cpu`, else the target's baseline),
/// building it if the cache lacks it.
pub fn device_library(target: &Target, cpu: Option<&Cpu>) -> Result<PathBuf, Error> {
    let cpu_name = cpu.map_or("", |c| c.name.as_str());
    // `native` is a different CPU on another machine: key it by what it stands for here.
    let cpu_key = cpu.and_then(|c| c.resolved.as_deref()).unwrap_or(cpu_name);
    let parts: Vec<&[u8]> = SOURCES
        .iter()
        .flat_map(|(p, s)| [p.as_bytes(), s.as_bytes()])
        .chain([target.triple.as_bytes(), cpu_key.as_bytes()])
        .collect();
    let key = format!("runtime-{}-{:016x}", env!("CARGO_PKG_VERSION"), fnv(&parts));
    let dir = cache_root().join(&key).join(target.triple);
    let lib = dir.join("libdiffdfq_device.a");
    if lib.is_file() {
        return Ok(lib);
    }
    let tc = find_toolchain(target.triple).ok_or_else(|| no_toolchain(target))?;
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::Internal(format!("{}: {e}", dir.display())))?;
    // Build in a private directory, then publish the library with a rename: concurrent
    // compiles never see a half-written file.
    let work = tempfile::Builder::new()
        .prefix("build-")
        .tempdir_in(&dir)
        .map_err(|e| Error::Internal(format!("{}: {e}", dir.display())))?;
    let _guard = crate::interrupt::DirGuard::new(work.path());
    let src = work.path().join("runtime");
    for (rel, text) in SOURCES {
        let p = src.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::Internal(e.to_string()))?;
        }
        std::fs::write(&p, text).map_err(|e| Error::Internal(format!("{}: {e}", p.display())))?;
    }
    // The dev-dependencies of the runtime (tests only) are not shipped: drop them so the
    // build needs no registry.
    let manifest = src.join("Cargo.toml");
    let toml = SOURCES[0].1;
    let trimmed = toml.split("\n[dev-dependencies]").next().unwrap_or(toml);
    std::fs::write(&manifest, trimmed).map_err(|e| Error::Internal(e.to_string()))?;
    let out = Command::new(&tc.cargo)
        .args([
            "build",
            "--release",
            "--offline",
            "--quiet",
            "--target",
            target.triple,
            "--manifest-path",
        ])
        .arg(src.join("staticlib/Cargo.toml"))
        .env("RUSTC", &tc.rustc)
        .env("CARGO_TARGET_DIR", work.path().join("target"))
        .env(
            "RUSTFLAGS",
            // The whole private build directory maps to one fixed path, so builds in
            // different directories give the same bytes.
            format!(
                "--remap-path-prefix={}=/diffdfq-runtime -C debuginfo=0{}",
                work.path().display(),
                cpu.map(|c| format!(" -C target-cpu={}", c.name))
                    .unwrap_or_default()
            ),
        )
        .env_remove("CARGO_BUILD_TARGET")
        .process_group(0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(crate::interrupt::wait)
        .map_err(|e| Error::Internal(format!("running {}: {e}", tc.cargo.display())))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err
            .lines()
            .find(|l| l.contains("error"))
            .unwrap_or("")
            .trim();
        return Err(Error::Internal(format!(
            "building the runtime for {} with {} failed: {first}",
            target.triple,
            tc.cargo.display()
        )));
    }
    let built = work
        .path()
        .join("target")
        .join(target.triple)
        .join("release/libdiffdfq_device.a");
    // The first build published wins: compiles racing on an empty cache all link the same
    // library, so their artifacts are byte-identical.
    match std::fs::hard_link(&built, &lib) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::Internal(format!("{}: {e}", lib.display()))),
    }
    Ok(lib)
}

#[cfg(test)]
mod tests {
    /// Every source file of the runtime is embedded: a file left out would break only the
    /// `libNAME.a` builds, long after the change that added it.
    #[test]
    fn every_runtime_source_is_embedded() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime");
        let mut stack = vec![root.join("src")];
        let mut missing = Vec::new();
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    let rel = p
                        .strip_prefix(&root)
                        .unwrap()
                        .to_string_lossy()
                        .replace('\\', "/");
                    if !super::SOURCES.iter().any(|(r, _)| *r == rel) {
                        missing.push(rel);
                    }
                }
            }
        }
        assert!(missing.is_empty(), "not in SOURCES: {missing:?}");
    }
}
