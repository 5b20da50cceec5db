//! float32 `.npy` files in and out (C order), with errors that name the file.

use std::io::Write;
use std::path::Path;

use npyz::WriterBuilder;

use crate::Error;

/// Reads a float32 C-order array: (shape, data). float64 is converted.
pub fn read_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>), Error> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::Input(format!("{}: cannot read: {e}", path.display())))?;
    parse_f32(&bytes, &path.display().to_string())
}

/// Most values an array may declare (1 GiB of f32): a header is a few bytes, so a larger
/// declared shape is refused before anything is allocated for it.
pub const MAX_VALUES: usize = 1 << 28;

/// Deepest bracket nesting a header may have.
const MAX_HEADER_DEPTH: usize = 4;

/// The shape a `.npy` header declares, checked before npyz reads it: npyz allocates a buffer of
/// the declared header length before reading it, and multiplies the shape out unchecked (an
/// overflow panic in debug builds) — both found by `scripts/fuzz`.
fn declared_shape(bytes: &[u8], label: &str) -> Result<Vec<usize>, Error> {
    let bad = |m: &str| Error::Input(format!("{label}: not a .npy file: {m}"));
    if bytes.get(..6) != Some(&b"\x93NUMPY"[..]) {
        return Err(bad("no \\x93NUMPY magic"));
    }
    let field = |at: usize, n: usize| bytes.get(at..at + n).ok_or_else(|| bad("truncated header"));
    let (len, start) = match bytes.get(6) {
        Some(1) => {
            let b = field(8, 2)?;
            (u16::from_le_bytes([b[0], b[1]]) as usize, 10)
        }
        Some(2 | 3) => {
            let b = field(8, 4)?;
            (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize, 12)
        }
        _ => return Err(bad("unknown format version")),
    };
    let text = field(start, len)?;
    // A header is a flat dict (a structured dtype nests a list of tuples): deeper nesting is
    // refused before py_literal, whose parser takes exponential time on it (`scripts/fuzz`).
    let mut depth = 0usize;
    for &c in text {
        match c {
            b'{' | b'[' | b'(' => depth += 1,
            b'}' | b']' | b')' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if depth > MAX_HEADER_DEPTH {
            return Err(bad("the header nests too deeply"));
        }
    }
    let dict: py_literal::Value = std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.trim_end().parse().ok())
        .ok_or_else(|| bad("the header is not a Python literal"))?;
    let shape = dict
        .as_dict()
        .and_then(|d| {
            d.iter()
                .find(|(k, _)| k.as_string().is_some_and(|k| k == "shape"))
        })
        .and_then(|(_, v)| v.as_tuple())
        .ok_or_else(|| bad("the header has no shape tuple"))?;
    let shape: Vec<usize> = shape
        .iter()
        .map(|d| {
            d.as_integer()
                .and_then(|i| i.to_string().parse::<usize>().ok())
        })
        .collect::<Option<_>>()
        .ok_or_else(|| bad("a dimension of the shape is not a size"))?;
    match shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) {
        Some(n) if n <= MAX_VALUES => Ok(shape),
        _ => Err(Error::Input(format!(
            "{label}: shape {shape:?} holds more than {MAX_VALUES} values"
        ))),
    }
}

/// Parses the bytes of a `.npy` file; errors name `label`.
pub fn parse_f32(bytes: &[u8], label: &str) -> Result<(Vec<usize>, Vec<f32>), Error> {
    let shape = declared_shape(bytes, label)?;
    let numel = shape.iter().product::<usize>();
    let mut data_bytes = bytes;
    let header = npyz::NpyHeader::from_reader(&mut data_bytes)
        .map_err(|e| Error::Input(format!("{label}: not a .npy file: {e}")))?;
    let npy = npyz::NpyFile::with_header(header, data_bytes);
    if npy.order() != npyz::Order::C {
        return Err(Error::Input(format!(
            "{label}: Fortran-order arrays are not supported"
        )));
    }
    let dtype = npy.dtype();
    let descr = dtype.descr();
    let width = match descr.trim_matches('\'') {
        "<f4" => 4,
        "<f8" => 8,
        d => {
            return Err(Error::Input(format!(
                "{label}: dtype {d} is not supported, use float32"
            )))
        }
    };
    if data_bytes.len() != numel * width {
        return Err(Error::Input(format!(
            "{label}: {} data bytes for shape {shape:?} of {descr}, which needs {}",
            data_bytes.len(),
            numel * width
        )));
    }
    let data = if width == 4 {
        npy.into_vec::<f32>()
    } else {
        npy.into_vec::<f64>()
            .map(|v| v.into_iter().map(|x| x as f32).collect())
    }
    .map_err(|e| Error::Input(format!("{label}: truncated or corrupt data: {e}")))?;
    if data.len() != numel {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn header(descr: &str, shape: &str) -> Vec<u8> {
        let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend((h.len() as u16).to_le_bytes());
        b.extend(h.as_bytes());
        b
    }

    #[test]
    fn hostile_npy_files_are_errors_that_name_the_file() {
        let good = to_bytes(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        assert_eq!(parse_f32(&good, "x.npy").unwrap().0, vec![2, 3]);
        let huge = [header("<f4", "(4294967296, 4294967296, 16)"), vec![0; 8]].concat();
        let nested = header("<f4", &format!("{}(2,){}", "(".repeat(40), ")".repeat(40)));
        let cases: [(&[u8], &str); 6] = [
            (&nested, "nests too deeply"),
            (&good[..good.len() - 3], "data bytes for shape [2, 3]"),
            (&header("<i4", "(2,)"), "dtype <i4 is not supported"),
            (&header("<f4", "(1000000000, 1000)"), "holds more than"),
            (&huge, "holds more than"),
            (
                b"\x93NUMPY\x02\x00\xff\xff\xff\xff{",
                "not a .npy file: truncated header",
            ),
        ];
        for (bytes, needle) in cases {
            let e = parse_f32(bytes, "x.npy").unwrap_err().to_string();
            assert!(e.starts_with("x.npy: ") && e.contains(needle), "{e}");
        }
    }
}
