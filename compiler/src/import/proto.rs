//! Reading ONNX protobuf pieces: tensors, attributes, node names.
//!
//! Tensors are decoded here rather than with tract's loader so that every malformed or
//! unusual tensor (wrong byte count, complex or string types, external data) becomes an error
//! instead of a panic.

use tract_onnx::pb;

use crate::graph::Tensor;
use crate::Error;

pub fn type_name(t: i32) -> String {
    pb::tensor_proto::DataType::try_from(t)
        .map(|d| format!("{d:?}").to_lowercase())
        .unwrap_or_else(|_| format!("unknown ({t})"))
}

/// Decodes a TensorProto into f32 (float types) or i64 (integer and boolean types).
pub fn tensor(t: &pb::TensorProto) -> Result<Tensor, String> {
    use pb::tensor_proto::DataType as D;
    if t.data_location == Some(pb::tensor_proto::DataLocation::External as i32) {
        return Err(
            "external tensor data is not supported; re-export with the weights inside the model"
                .into(),
        );
    }
    let mut shape = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        if d < 0 {
            return Err(format!("negative dimension {d}"));
        }
        shape.push(d as usize);
    }
    let n = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or("dimensions overflow")?;
    let dt = D::try_from(t.data_type).map_err(|_| format!("unknown data type {}", t.data_type))?;
    let raw = &t.raw_data;
    let count = |got: usize| -> Result<(), String> {
        if got == n {
            Ok(())
        } else {
            Err(format!("holds {got} values, its shape {shape:?} needs {n}"))
        }
    };
    let chunks = |w: usize| -> Result<std::slice::ChunksExact<'_, u8>, String> {
        let need = n.checked_mul(w).ok_or("dimensions overflow")?;
        if raw.len() != need {
            return Err(format!(
                "raw data has {} bytes, shape {shape:?} of {} needs {need}",
                raw.len(),
                type_name(t.data_type),
            ));
        }
        Ok(raw.chunks_exact(w))
    };
    let has_raw = !raw.is_empty();
    let f = |v: Vec<f32>| -> Result<Tensor, String> {
        count(v.len())?;
        Ok(Tensor::f32(shape.clone(), v))
    };
    let i = |v: Vec<i64>| -> Result<Tensor, String> {
        count(v.len())?;
        Ok(Tensor::i64(shape.clone(), v))
    };
    match dt {
        D::Float if has_raw => f(chunks(4)?
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        D::Float => f(t.float_data.clone()),
        D::Double if has_raw => f(chunks(8)?
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
            .collect()),
        D::Double => f(t.double_data.iter().map(|&v| v as f32).collect()),
        D::Float16 if has_raw => f(chunks(2)?
            .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect()),
        D::Float16 => f(t.int32_data.iter().map(|&v| f16_to_f32(v as u16)).collect()),
        D::Int64 if has_raw => i(chunks(8)?
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect()),
        D::Int64 => i(t.int64_data.clone()),
        D::Int32 if has_raw => i(chunks(4)?
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
            .collect()),
        D::Int16 if has_raw => i(chunks(2)?
            .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
            .collect()),
        D::Int8 if has_raw => i(chunks(1)?.map(|c| c[0] as i8 as i64).collect()),
        D::Uint8 | D::Bool if has_raw => i(chunks(1)?.map(|c| c[0] as i64).collect()),
        D::Uint16 if has_raw => i(chunks(2)?
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as i64)
            .collect()),
        D::Uint32 if has_raw => i(chunks(4)?
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
            .collect()),
        D::Int32 | D::Int16 | D::Int8 | D::Uint8 | D::Uint16 | D::Bool => {
            i(t.int32_data.iter().map(|&v| v as i64).collect())
        }
        D::Uint32 => i(t.uint64_data.iter().map(|&v| v as i64).collect()),
        other => Err(format!(
            "data type {} is not supported",
            format!("{other:?}").to_lowercase()
        )),
    }
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: normalize.
            let shift = m.leading_zeros() - 21;
            sign | ((113 - shift) << 23) | (((m << shift) & 0x3ff) << 13)
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

pub struct Attrs<'a>(pub &'a [pb::AttributeProto]);

impl Attrs<'_> {
    fn get(&self, name: &str) -> Option<&pb::AttributeProto> {
        self.0.iter().find(|a| a.name == name)
    }
    pub fn int(&self, name: &str, default: i64) -> i64 {
        self.get(name).map_or(default, |a| a.i)
    }
    pub fn opt_int(&self, name: &str) -> Option<i64> {
        self.get(name).map(|a| a.i)
    }
    pub fn float(&self, name: &str, default: f32) -> f32 {
        self.get(name).map_or(default, |a| a.f)
    }
    pub fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.get(name).map(|a| a.ints.clone())
    }
    pub fn string(&self, name: &str) -> Option<String> {
        self.get(name)
            .map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }
    pub fn tensor(&self, name: &str) -> Option<&pb::TensorProto> {
        self.get(name).and_then(|a| a.t.as_ref())
    }
}

/// The value of a Constant node.
pub fn constant_attr(a: &Attrs) -> Result<Tensor, Error> {
    if let Some(t) = a.tensor("value") {
        return tensor(t).map_err(|e| Error::Input(format!("value: {e}")));
    }
    if let Some(at) = a.get("value_float") {
        return Ok(Tensor::f32(vec![], vec![at.f]));
    }
    if let Some(at) = a.get("value_floats") {
        return Ok(Tensor::f32(vec![at.floats.len()], at.floats.clone()));
    }
    if let Some(at) = a.get("value_int") {
        return Ok(Tensor::i64(vec![], vec![at.i]));
    }
    if let Some(at) = a.get("value_ints") {
        return Ok(Tensor::i64(vec![at.ints.len()], at.ints.clone()));
    }
    Err(Error::Input(
        "Constant without a supported value attribute (value, value_float(s), value_int(s))".into(),
    ))
}

pub trait NodeExt {
    /// The node's name, else its first output's, else `op#index`.
    fn display_name(&self, index: usize) -> String;
}

impl NodeExt for pb::NodeProto {
    fn display_name(&self, index: usize) -> String {
        if !self.name.is_empty() {
            self.name.clone()
        } else if let Some(o) = self.output.first().filter(|o| !o.is_empty()) {
            o.clone()
        } else {
            format!("{}#{index}", self.op_type)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_matches_known_values() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
    }

    #[test]
    fn raw_data_with_the_wrong_length_is_an_error() {
        let t = pb::TensorProto {
            dims: vec![2],
            data_type: 1,
            raw_data: vec![0; 7],
            ..Default::default()
        };
        assert!(tensor(&t).unwrap_err().contains("needs 8"));
    }
}
