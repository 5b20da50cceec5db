//! The target table: what `--target` accepts and what each target means for emission.
//!
//! Only targets whose object files, runtime build and execution are verified end to end are
//! listed; an unknown name is an error that lists the known ones.

/// Object file container a target links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectFormat {
    Elf,
}

/// Instruction set of a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Aarch64,
}

/// One entry of the target table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Short name accepted by `--target`.
    pub name: &'static str,
    /// Rust/LLVM triple, also accepted by `--target`.
    pub triple: &'static str,
    pub arch: Arch,
    pub format: ObjectFormat,
    pub little_endian: bool,
    /// Whether the target has an OS and libc (Linux) or is bare metal.
    pub hosted: bool,
    /// C compiler a firmware build uses for this target.
    pub c_compiler: &'static str,
    /// Archiver that indexes this target's objects (libNAME.a).
    pub ar: &'static str,
    /// Debian packages that provide the C toolchain and archiver.
    pub toolchain_packages: &'static str,
    /// Width of `size_t` in bytes.
    pub pointer_width: u8,
    /// SIMD extensions the runtime may use without run-time detection.
    pub baseline_simd: &'static [&'static str],
}

/// Every verified target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "x86_64",
        triple: "x86_64-unknown-linux-gnu",
        arch: Arch::X86_64,
        format: ObjectFormat::Elf,
        little_endian: true,
        hosted: true,
        c_compiler: "gcc",
        ar: "ar",
        toolchain_packages: "gcc binutils",
        pointer_width: 8,
        baseline_simd: &["sse2"],
    },
    Target {
        name: "aarch64",
        triple: "aarch64-unknown-linux-gnu",
        arch: Arch::Aarch64,
        format: ObjectFormat::Elf,
        little_endian: true,
        hosted: true,
        c_compiler: "aarch64-linux-gnu-gcc",
        ar: "aarch64-linux-gnu-ar",
        toolchain_packages: "gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu",
        pointer_width: 8,
        baseline_simd: &["neon"],
    },
];

/// Error for a `--target` value that is not in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownTarget(pub String);

impl std::fmt::Display for UnknownTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "unknown target '{}'; known targets: {}",
            self.0,
            known_names()
        )
    }
}

impl std::error::Error for UnknownTarget {}

/// The known targets as `name (triple)`, comma separated.
pub fn known_names() -> String {
    TARGETS
        .iter()
        .map(|t| format!("{} ({})", t.name, t.triple))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Looks a target up by short name or full triple.
pub fn lookup(name: &str) -> Result<&'static Target, UnknownTarget> {
    TARGETS
        .iter()
        .find(|t| t.name == name || t.triple == name)
        .ok_or_else(|| UnknownTarget(name.to_string()))
}

/// The target this program runs on, if it is in the table.
pub fn host() -> Option<&'static Target> {
    let arch = if cfg!(target_arch = "x86_64") {
        Arch::X86_64
    } else if cfg!(target_arch = "aarch64") {
        Arch::Aarch64
    } else {
        return None;
    };
    TARGETS.iter().find(|t| t.arch == arch && t.hosted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_and_triples_resolve_to_the_same_entry() {
        for t in TARGETS {
            assert_eq!(lookup(t.name).unwrap(), t);
            assert_eq!(lookup(t.triple).unwrap(), t);
        }
    }

    #[test]
    fn unknown_target_lists_the_known_ones() {
        let err = lookup("riscv64").unwrap_err().to_string();
        assert!(err.contains("'riscv64'"), "{err}");
        for t in TARGETS {
            assert!(err.contains(t.triple), "{err}");
        }
    }
}
