//! Emission: NAME.dfq, NAME.o, NAME.h, libNAME.a and NAME.report.json into the output directory.
//!
//! Everything is produced in a private temporary directory inside DIR and renamed into place
//! only when all of it succeeded: a failed compile leaves no NAME.* file behind.

pub mod header;
pub mod object;
pub mod runtime_lib;

use std::path::{Path, PathBuf};
use std::process::Command;

use diffdfq_targets::Target;

use crate::Error;

/// Everything the emitters need.
pub struct Emission<'a> {
    pub name: &'a str,
    pub target: &'static Target,
    pub blob: &'a [u8],
    pub header: header::HeaderInfo<'a>,
    /// NAME.report.json contents.
    pub report: String,
    /// Build libNAME.a (needs a toolchain for the target).
    pub with_lib: bool,
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Internal(format!("{}: {e}", path.display()))
}

/// Writes the artifacts; returns their final paths.
pub fn write_outputs(dir: &Path, e: &Emission) -> Result<Vec<PathBuf>, Error> {
    header::check_name(e.name).map_err(Error::Input)?;
    std::fs::create_dir_all(dir).map_err(|err| {
        Error::Input(format!(
            "{}: cannot create output directory: {err}",
            dir.display()
        ))
    })?;
    let tmp = tempfile::Builder::new()
        .prefix(".diffdfq-")
        .tempdir_in(dir)
        .map_err(|err| Error::Input(format!("{}: cannot write: {err}", dir.display())))?;
    let t = tmp.path();
    let name = e.name;
    let mut files = vec![
        (format!("{name}.dfq"), e.blob.to_vec()),
        (
            format!("{name}.o"),
            object::model_object(name, e.blob, e.target)?,
        ),
        (format!("{name}.h"), header::render(&e.header).into_bytes()),
        (format!("{name}.report.json"), e.report.clone().into_bytes()),
    ];
    for (f, bytes) in &files {
        std::fs::write(t.join(f), bytes).map_err(|err| io(&t.join(f), err))?;
    }
    if e.with_lib {
        let device = runtime_lib::device_library(e.target)?;
        let lib = format!("lib{name}.a");
        std::fs::copy(&device, t.join(&lib)).map_err(|err| io(&device, err))?;
        // `D`: zero timestamps, uids and modes, so the archive is reproducible.
        let out = Command::new(e.target.ar)
            .args(["rsD", &lib, &format!("{name}.o")])
            .current_dir(t)
            .output()
            .map_err(|err| {
                Error::Input(format!(
                    "cannot run {} to make {lib} ({err}): install {} or pass --no-lib",
                    e.target.ar, e.target.toolchain_packages
                ))
            })?;
        if !out.status.success() {
            return Err(Error::Internal(format!(
                "{} failed: {}",
                e.target.ar,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        files.push((lib, Vec::new()));
    }
    let mut written = Vec::new();
    for (f, _) in &files {
        let dst = dir.join(f);
        if let Err(err) = std::fs::rename(t.join(f), &dst) {
            for w in &written {
                let _ = std::fs::remove_file(w);
            }
            return Err(io(&dst, err));
        }
        written.push(dst);
    }
    Ok(written)
}
