//! Emission: NAME.dfq, NAME.o, NAME.h, libNAME.a, NAME.report.json, NAME.report.svg and, on
//! request, NAME.nnef.tgz (the packed-integer tract graph) into the output directory.
//!
//! Everything is produced in a private temporary directory inside DIR and renamed into place
//! only when all of it succeeded: a failed compile leaves no NAME.* file behind.

pub mod header;
pub mod object;
pub mod plot;
pub mod report;
pub mod runtime_lib;
pub mod summary;

use std::path::{Path, PathBuf};

use diffdfq_targets::Target;

use crate::Error;

/// Everything the emitters need.
pub struct Emission<'a> {
    pub name: &'a str,
    pub target: &'static Target,
    /// `--cpu`: the CPU libNAME.a is built for (else the target's baseline).
    pub cpu: Option<&'a runtime_lib::Cpu>,
    pub blob: &'a [u8],
    pub header: header::HeaderInfo<'a>,
    /// NAME.report.json contents.
    pub report: String,
    /// NAME.report.svg contents.
    pub plot: String,
    /// Build libNAME.a (needs a toolchain for the target).
    pub with_lib: bool,
    /// NAME.nnef.tgz contents (`--emit nnef`).
    pub nnef: Option<Vec<u8>>,
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
    let _guard = crate::interrupt::DirGuard::new(t);
    let name = e.name;
    let mut files = vec![
        (format!("{name}.dfq"), e.blob.to_vec()),
        (
            format!("{name}.o"),
            object::model_object(name, e.blob, e.target)?,
        ),
        (format!("{name}.h"), header::render(&e.header).into_bytes()),
        (format!("{name}.report.json"), e.report.clone().into_bytes()),
        (format!("{name}.report.svg"), e.plot.clone().into_bytes()),
    ];
    if let Some(nnef) = &e.nnef {
        files.push((format!("{name}.nnef.tgz"), nnef.clone()));
    }
    // Errors name the file the user asked for, not its temporary twin.
    for (f, bytes) in &files {
        std::fs::write(t.join(f), bytes).map_err(|err| io(&dir.join(f), err))?;
    }
    if e.with_lib {
        let device = runtime_lib::device_library(e.target, e.cpu)?;
        let lib = format!("lib{name}.a");
        let obj = files[1].1.clone();
        std::fs::write(t.join(&lib), archive(&device, &format!("{name}.o"), obj)?)
            .map_err(|err| io(&dir.join(&lib), err))?;
        files.push((lib, Vec::new()));
    }
    let mut written = Vec::new();
    let _publishing = crate::interrupt::publishing();
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

/// libNAME.a: the runtime library's members followed by NAME.o, with a symbol index over all
/// of them and zeroed timestamps/owners (reproducible). Written here rather than with the
/// system `ar`, whose LTO plugin cannot read the bitcode-carrying objects of Rust's `core`
/// and would drop them from the index.
fn archive(device: &Path, obj_name: &str, obj: Vec<u8>) -> Result<Vec<u8>, Error> {
    use ::object::read::archive::ArchiveFile;
    let data = std::fs::read(device).map_err(|err| io(device, err))?;
    let bad = |err: ::object::read::Error| Error::Internal(format!("{}: {err}", device.display()));
    let ar = ArchiveFile::parse(&*data).map_err(bad)?;
    let mut members = Vec::new();
    for m in ar.members() {
        let m = m.map_err(bad)?;
        let member_name = String::from_utf8_lossy(m.name()).into_owned();
        members.push(ar_archive_writer::NewArchiveMember::new(
            m.data(&*data).map_err(bad)?,
            &ar_archive_writer::DEFAULT_OBJECT_READER,
            member_name,
        ));
    }
    members.push(ar_archive_writer::NewArchiveMember::new(
        obj,
        &ar_archive_writer::DEFAULT_OBJECT_READER,
        obj_name.to_string(),
    ));
    let mut out = std::io::Cursor::new(Vec::new());
    ar_archive_writer::write_archive_to_stream(
        &mut out,
        &members,
        ar_archive_writer::ArchiveKind::Gnu,
        false,
        None,
    )
    .map_err(|err| Error::Internal(format!("writing the static library: {err}")))?;
    Ok(out.into_inner())
}
