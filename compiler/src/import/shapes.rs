//! The model input's shape: the declared one, `--input-shape`, or the batch option, checked.

use tract_onnx::pb;

use super::proto;
use crate::Error;

pub(super) fn input_shape(
    vi: &pb::ValueInfoProto,
    overridden: Option<&[usize]>,
    batch: Option<usize>,
) -> Result<Vec<usize>, Error> {
    use pb::tensor_shape_proto::dimension::Value as D;
    use pb::type_proto::Value as T;
    let Some(T::TensorType(tt)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(Error::Input(format!("input '{}' is not a tensor", vi.name)));
    };
    if tt.elem_type != pb::tensor_proto::DataType::Float as i32 {
        return Err(Error::Input(format!(
            "input '{}' has element type {}, only float32 inputs are supported",
            vi.name,
            proto::type_name(tt.elem_type)
        )));
    }
    if let Some(s) = overridden {
        if s.contains(&0) {
            return Err(Error::Input(format!(
                "--input-shape {s:?} has a zero dimension"
            )));
        }
        // Spatial sizes may be overridden (a fully convolutional model deployed at another
        // resolution); the rank and a fixed channel count may not.
        let dims = tt.shape.as_ref().map(|s| s.dim.as_slice()).unwrap_or(&[]);
        let fixed = |d: &pb::tensor_shape_proto::Dimension| match d.value {
            Some(D::DimValue(v)) if v > 0 => Some(v as usize),
            _ => None,
        };
        let channels = dims.get(1).and_then(fixed);
        if !dims.is_empty() && (dims.len() != s.len() || channels.is_some_and(|c| c != s[1])) {
            return Err(Error::Input(format!(
                "--input-shape {s:?} contradicts input '{}' declared {}",
                vi.name,
                declared_shape(dims)
            )));
        }
        return Ok(s.to_vec());
    }
    let dims = tt.shape.as_ref().map(|s| s.dim.as_slice()).unwrap_or(&[]);
    if dims.is_empty() {
        return Err(Error::Input(format!(
            "input '{}' has no shape; pass --input-shape",
            vi.name
        )));
    }
    // Exporters mark a dynamic batch as -1 (paddle2onnx), 0, a name or nothing: all mean "any",
    // and the compiled artifact runs one sample at a time. Elsewhere the size must be known.
    let declared = declared_shape(dims);
    let mut shape = Vec::new();
    for (axis, d) in dims.iter().enumerate() {
        shape.push(match &d.value {
            Some(D::DimValue(v)) if *v > 0 => {
                if axis == 0 {
                    batch.unwrap_or(*v as usize)
                } else {
                    *v as usize
                }
            }
            _ if axis == 0 => batch.unwrap_or(1),
            _ => {
                let example: Vec<String> = dims
                    .iter()
                    .enumerate()
                    .map(|(a, d)| match &d.value {
                        Some(D::DimValue(v)) if *v > 0 => v.to_string(),
                        _ if a == 0 => "1".into(),
                        _ => "N".into(),
                    })
                    .collect();
                return Err(Error::Input(format!(
                    "input '{}' is declared {declared}: axis {axis} has no fixed size; \
                     pass --input-shape {} with the size the model is deployed at",
                    vi.name,
                    example.join(",")
                )));
            }
        });
    }
    checked_numel(&vi.name, shape)
}

/// A declared input shape as the user sees it: `[-1, 3, ?, ?]`, named dims by name.
fn declared_shape(dims: &[pb::tensor_shape_proto::Dimension]) -> String {
    use pb::tensor_shape_proto::dimension::Value as D;
    let parts: Vec<String> = dims
        .iter()
        .map(|d| match &d.value {
            Some(D::DimValue(v)) => v.to_string(),
            Some(D::DimParam(p)) if !p.is_empty() => p.clone(),
            _ => "?".into(),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

/// Inputs beyond 2^31 elements are refused up front: every later size computation can then
/// multiply dimensions without overflow.
fn checked_numel(name: &str, shape: Vec<usize>) -> Result<Vec<usize>, Error> {
    match shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) {
        Some(n) if n <= 1 << 31 => Ok(shape),
        _ => Err(Error::Input(format!(
            "input '{name}' shape {shape:?} is too large"
        ))),
    }
}
