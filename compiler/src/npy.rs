//! float32 `.npy` files in and out (C order), with errors that name the file.

use std::io::Write;
use std::path::Path;

use npyz::WriterBuilder;

use crate::Error;

/// Reads a float32 C-order array: (shape, data). float64 is converted.
pub fn read_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>), Error> {
    let label = path.display();
    let bytes =
        std::fs::read(path).map_err(|e| Error::Input(format!("{label}: cannot read: {e}")))?;
    let npy = npyz::NpyFile::new(&bytes[..])
        .map_err(|e| Error::Input(format!("{label}: not a .npy file: {e}")))?;
    if npy.order() != npyz::Order::C {
        return Err(Error::Input(format!(
            "{label}: Fortran-order arrays are not supported"
        )));
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let dtype = npy.dtype();
    let descr = dtype.descr();
    let data = match descr.trim_matches('\'') {
        "<f4" => npy.into_vec::<f32>(),
        "<f8" => npy
            .into_vec::<f64>()
            .map(|v| v.into_iter().map(|x| x as f32).collect()),
        d => {
            return Err(Error::Input(format!(
                "{label}: dtype {d} is not supported, use float32"
            )))
        }
    }
    .map_err(|e| Error::Input(format!("{label}: truncated or corrupt data: {e}")))?;
    if data.len() != shape.iter().product::<usize>() {
        return Err(Error::Input(format!(
            "{label}: holds {} values for shape {shape:?}",
            data.len()
        )));
    }
    Ok((shape, data))
}

/// Serializes a float32 C-order array.
pub fn to_bytes(shape: &[usize], data: &[f32]) -> Result<Vec<u8>, Error> {
    let mut buf = Vec::new();
    let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&dims)
        .writer(&mut buf)
        .begin_nd()
        .map_err(|e| Error::Internal(format!("npy: {e}")))?;
    w.extend(data.iter().copied())
        .map_err(|e| Error::Internal(format!("npy: {e}")))?;
    w.finish()
        .map_err(|e| Error::Internal(format!("npy: {e}")))?;
    Ok(buf)
}

/// Writes a file atomically: a temporary name in the same directory, then a rename, so a
/// failure never leaves a partial file under the final name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let label = path.display();
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::Input(format!("{label}: not a file path")))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    res.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::Input(format!("{label}: cannot write: {e}"))
    })
}
