//! Constant folding: the ops of exported shape computations, evaluated at import.

use super::builder::{axis, bad};
use super::proto::{self, Attrs};
use crate::graph::{broadcast_index, broadcast_shape, strides, Data, Tensor};
use crate::Error;

/// `Shape` with opset-15 start/end slicing.
pub fn shape_of(shape: &[usize], start: i64, end: Option<i64>) -> Tensor {
    let r = shape.len() as i64;
    let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    let (s, e) = (clamp(start), clamp(end.unwrap_or(r)));
    let dims: Vec<i64> = if s < e {
        shape[s..e].iter().map(|&d| d as i64).collect()
    } else {
        vec![]
    };
    Tensor::i64(vec![dims.len()], dims)
}

/// Output shape of Flatten, Reshape, Squeeze or Unsqueeze applied to `xs`.
pub fn reshape_target(
    op: &str,
    a: &Attrs,
    xs: &[usize],
    second: Option<&Tensor>,
    opset: i64,
) -> Result<Vec<usize>, Error> {
    let total: usize = xs.iter().product();
    match op {
        "Flatten" => {
            let r = xs.len() as i64;
            let ax = a.int("axis", 1);
            let ax = if ax < 0 { ax + r } else { ax };
            if !(0..=r).contains(&ax) {
                return bad(format!("axis {ax} out of range for rank {r}"));
            }
            let outer: usize = xs[..ax as usize].iter().product();
            Ok(vec![outer, total / outer.max(1)])
        }
        "Reshape" => {
            let t = second.ok_or_else(|| Error::Input("shape input missing".into()))?;
            let spec = t.to_i64();
            let allow_zero = a.int("allowzero", 0) != 0;
            let mut out = Vec::with_capacity(spec.len());
            let mut infer = None;
            for (i, &d) in spec.iter().enumerate() {
                match d {
                    -1 if infer.is_none() => {
                        infer = Some(i);
                        out.push(1);
                    }
                    0 if !allow_zero => out.push(*xs.get(i).ok_or_else(|| {
                        Error::Input(format!("shape {spec:?} copies axis {i} the input lacks"))
                    })?),
                    d if d >= 0 => out.push(d as usize),
                    _ => return bad(format!("invalid target shape {spec:?}")),
                }
            }
            let known = numel(&out)?;
            if let Some(i) = infer {
                if known == 0 || !total.is_multiple_of(known) {
                    return bad(format!("cannot infer -1 in {spec:?} for {total} elements"));
                }
                out[i] = total / known;
            }
            if out.iter().product::<usize>() != total {
                return bad(format!("cannot reshape {xs:?} to {spec:?}"));
            }
            Ok(out)
        }
        "Squeeze" | "Unsqueeze" => {
            let axes = if opset >= 13 {
                second.map(Tensor::to_i64)
            } else {
                a.ints("axes")
            };
            if op == "Squeeze" {
                let axes = match axes {
                    None => (0..xs.len()).filter(|&i| xs[i] == 1).collect::<Vec<_>>(),
                    Some(v) => v
                        .iter()
                        .map(|&x| axis(x, xs.len()))
                        .collect::<Result<_, _>>()?,
                };
                if let Some(&i) = axes.iter().find(|&&i| xs[i] != 1) {
                    return bad(format!("cannot squeeze axis {i} of size {}", xs[i]));
                }
                Ok(xs
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !axes.contains(i))
                    .map(|(_, &d)| d)
                    .collect())
            } else {
                let axes = axes.ok_or_else(|| Error::Input("axes missing".into()))?;
                let rank = xs.len() + axes.len();
                let mut ax: Vec<usize> = axes
                    .iter()
                    .map(|&x| axis(x, rank))
                    .collect::<Result<_, _>>()?;
                ax.sort_unstable();
                ax.dedup();
                if ax.len() != axes.len() {
                    return bad(format!("repeated axes {axes:?}"));
                }
                let mut it = xs.iter();
                Ok((0..rank)
                    .map(|i| {
                        if ax.contains(&i) {
                            1
                        } else {
                            *it.next().unwrap_or(&1)
                        }
                    })
                    .collect())
            }
        }
        _ => bad(format!("{op} is not a reshape")),
    }
}

/// Element count of a constant, refusing sizes no CNN's shape computation produces.
fn numel(shape: &[usize]) -> Result<usize, Error> {
    match shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) {
        Some(n) if n <= super::MAX_ELEMENTS => Ok(n),
        _ => bad(format!("constant of shape {shape:?} is too large")),
    }
}

fn map_f(t: &Tensor, f: impl Fn(f32) -> f32) -> Tensor {
    match &t.data {
        Data::F32(v) => Tensor::f32(t.shape.clone(), v.iter().map(|&x| f(x)).collect()),
        Data::I64(v) => Tensor::i64(
            t.shape.clone(),
            v.iter().map(|&x| f(x as f32) as i64).collect(),
        ),
    }
}

fn binary(op: &str, l: &Tensor, r: &Tensor) -> Result<Tensor, Error> {
    let shape = broadcast_shape(&l.shape, &r.shape).ok_or_else(|| {
        Error::Input(format!(
            "shapes {:?} and {:?} do not broadcast",
            l.shape, r.shape
        ))
    })?;
    numel(&shape)?;
    let (li, ri) = (
        broadcast_index(&l.shape, &shape),
        broadcast_index(&r.shape, &shape),
    );
    if l.is_float() || r.is_float() {
        let (lv, rv) = (l.to_f32(), r.to_f32());
        let f = |a: f32, b: f32| match op {
            "Add" => a + b,
            "Sub" => a - b,
            "Mul" => a * b,
            "Div" => a / b,
            _ => (a == b) as i32 as f32,
        };
        let v: Vec<f32> = li.iter().zip(&ri).map(|(&i, &j)| f(lv[i], rv[j])).collect();
        if op == "Equal" {
            return Ok(Tensor::i64(shape, v.iter().map(|&x| x as i64).collect()));
        }
        Ok(Tensor::f32(shape, v))
    } else {
        let (lv, rv) = (l.to_i64(), r.to_i64());
        let mut out = Vec::with_capacity(li.len());
        for (&i, &j) in li.iter().zip(&ri) {
            let (a, b) = (lv[i], rv[j]);
            out.push(match op {
                "Add" => a.wrapping_add(b),
                "Sub" => a.wrapping_sub(b),
                "Mul" => a.wrapping_mul(b),
                "Div" if b == 0 => return bad("integer division by zero"),
                "Div" => a.wrapping_div(b),
                _ => (a == b) as i64,
            });
        }
        Ok(Tensor::i64(shape, out))
    }
}

fn get(inputs: &[Option<Tensor>], i: usize) -> Result<&Tensor, Error> {
    inputs
        .get(i)
        .and_then(Option::as_ref)
        .ok_or_else(|| Error::Input(format!("missing input {i}")))
}

/// Evaluates `op` on constant inputs.
pub fn eval(op: &str, a: &Attrs, inputs: &[Option<Tensor>], opset: i64) -> Result<Tensor, Error> {
    let x = get(inputs, 0);
    match op {
        "Identity" | "Dropout" => x.cloned(),
        "Add" | "Sub" | "Mul" | "Div" | "Equal" => binary(op, x?, get(inputs, 1)?),
        "Neg" => Ok(match x? {
            Tensor {
                shape,
                data: Data::I64(v),
            } => Tensor::i64(shape.clone(), v.iter().map(|&z| z.wrapping_neg()).collect()),
            t => map_f(t, |v| -v),
        }),
        "Floor" => Ok(map_f(x?, f32::floor)),
        "Ceil" => Ok(map_f(x?, f32::ceil)),
        "Sqrt" => Ok(map_f(x?, f32::sqrt)),
        "Relu" => Ok(map_f(x?, |v| v.max(0.0))),
        "Cast" => {
            use tract_onnx::pb::tensor_proto::DataType as D;
            let to = a.int("to", 1) as i32;
            let x = x?;
            match D::try_from(to) {
                Ok(D::Float | D::Double | D::Float16) => {
                    Ok(Tensor::f32(x.shape.clone(), x.to_f32()))
                }
                Ok(D::Bool) => Ok(Tensor::i64(
                    x.shape.clone(),
                    x.to_f32().iter().map(|&v| (v != 0.0) as i64).collect(),
                )),
                Ok(
                    D::Int64
                    | D::Int32
                    | D::Int16
                    | D::Int8
                    | D::Uint8
                    | D::Uint16
                    | D::Uint32
                    | D::Uint64,
                ) => Ok(Tensor::i64(x.shape.clone(), x.to_i64())),
                _ => bad(format!("Cast to {} is not supported", proto::type_name(to))),
            }
        }
        "Flatten" | "Reshape" | "Squeeze" | "Unsqueeze" => {
            let x = x?;
            let shape = reshape_target(
                op,
                a,
                &x.shape,
                inputs.get(1).and_then(Option::as_ref),
                opset,
            )?;
            Ok(x.reshaped(shape))
        }
        "Concat" => {
            let ts: Vec<&Tensor> = inputs.iter().flatten().collect();
            let first = ts.first().ok_or_else(|| Error::Input("no inputs".into()))?;
            let ax = axis(a.int("axis", 0), first.shape.len())?;
            // Every other dim must agree before any input is sliced by them.
            let agree = |t: &&Tensor| {
                t.shape.len() == first.shape.len()
                    && (0..t.shape.len()).all(|i| i == ax || t.shape[i] == first.shape[i])
            };
            if !ts.iter().all(agree) {
                let shapes: Vec<&Vec<usize>> = ts.iter().map(|t| &t.shape).collect();
                return bad(format!(
                    "input shapes {shapes:?} do not concatenate on axis {ax}"
                ));
            }
            let outer: usize = first.shape[..ax].iter().product();
            let mut shape = first.shape.clone();
            shape[ax] = ts
                .iter()
                .map(|t| t.shape.get(ax).copied().unwrap_or(0))
                .sum();
            let float = ts.iter().any(|t| t.is_float());
            let mut fv = Vec::new();
            let mut iv = Vec::new();
            for o in 0..outer {
                for t in &ts {
                    if t.shape.len() != first.shape.len() {
                        return bad("inputs of different ranks");
                    }
                    let inner: usize = t.shape[ax..].iter().product();
                    if float {
                        fv.extend_from_slice(&t.to_f32()[o * inner..(o + 1) * inner]);
                    } else {
                        iv.extend_from_slice(&t.to_i64()[o * inner..(o + 1) * inner]);
                    }
                }
            }
            if shape.iter().product::<usize>() != fv.len().max(iv.len()) {
                return bad("input shapes do not concatenate");
            }
            Ok(if float {
                Tensor::f32(shape, fv)
            } else {
                Tensor::i64(shape, iv)
            })
        }
        "Transpose" => {
            let x = x?;
            let rank = x.shape.len();
            let perm: Vec<usize> = match a.ints("perm") {
                Some(p) => p.iter().map(|&v| axis(v, rank)).collect::<Result<_, _>>()?,
                None => (0..rank).rev().collect(),
            };
            let mut seen = vec![false; rank];
            if perm.len() != rank || perm.iter().any(|&p| std::mem::replace(&mut seen[p], true)) {
                return bad(format!("perm {perm:?} is no permutation of {rank} axes"));
            }
            let shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
            let src = crate::graph::strides(&x.shape);
            let dst = crate::graph::strides(&shape);
            let flat: Vec<usize> = (0..x.len())
                .map(|i| {
                    (0..rank)
                        .map(|d| (i / dst[d]) % shape[d] * src[perm[d]])
                        .sum()
                })
                .collect();
            Ok(x.pick(shape, &flat))
        }
        "Gather" => {
            let (x, idx) = (x?, get(inputs, 1)?);
            let ax = axis(a.int("axis", 0), x.shape.len())?;
            let d = x.shape[ax] as i64;
            let outer: usize = x.shape[..ax].iter().product();
            let inner: usize = x.shape[ax + 1..].iter().product();
            let mut flat = Vec::new();
            for o in 0..outer {
                for &i in &idx.to_i64() {
                    let i = if i < 0 { i + d } else { i };
                    if !(0..d).contains(&i) {
                        return bad(format!("index {i} out of range for axis of size {d}"));
                    }
                    flat.extend((0..inner).map(|k| (o * d as usize + i as usize) * inner + k));
                }
            }
            let mut shape = x.shape[..ax].to_vec();
            shape.extend(&idx.shape);
            shape.extend(&x.shape[ax + 1..]);
            Ok(x.pick(shape, &flat))
        }
        "Slice" => {
            let x = x?;
            let (starts, ends, axes, steps) = if opset < 10 {
                (
                    a.ints("starts").unwrap_or_default(),
                    a.ints("ends").unwrap_or_default(),
                    a.ints("axes"),
                    None,
                )
            } else {
                (
                    get(inputs, 1)?.to_i64(),
                    get(inputs, 2)?.to_i64(),
                    inputs.get(3).and_then(Option::as_ref).map(Tensor::to_i64),
                    inputs.get(4).and_then(Option::as_ref).map(Tensor::to_i64),
                )
            };
            let rank = x.shape.len();
            let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
            let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
            if ends.len() != starts.len()
                || axes.len() != starts.len()
                || steps.len() != starts.len()
            {
                return bad("starts, ends, axes and steps differ in length");
            }
            // Per axis: the source coordinates kept.
            let mut keep: Vec<Vec<usize>> = x.shape.iter().map(|&d| (0..d).collect()).collect();
            for i in 0..starts.len() {
                let ax = axis(axes[i], rank)?;
                let d = x.shape[ax] as i64;
                let step = steps[i];
                if step == 0 {
                    return bad("slice step 0");
                }
                let norm = |v: i64| if v < 0 { v + d } else { v };
                let (s, e) = (norm(starts[i]), norm(ends[i]));
                let coords: Vec<usize> = if step > 0 {
                    let (s, e) = (s.clamp(0, d), e.clamp(0, d));
                    (s..e).step_by(step as usize).map(|c| c as usize).collect()
                } else {
                    let (s, e) = (s.clamp(0, d - 1), e.clamp(-1, d - 1));
                    let mut v = Vec::new();
                    let mut c = s;
                    while c > e {
                        v.push(c as usize);
                        c += step;
                    }
                    v
                };
                keep[ax] = coords;
            }
            let shape: Vec<usize> = keep.iter().map(Vec::len).collect();
            let st = strides(&x.shape);
            let mut flat = vec![0usize];
            for (ax, k) in keep.iter().enumerate() {
                let s = st[ax];
                flat = flat
                    .iter()
                    .flat_map(|&base| k.iter().map(move |&c| base + c * s))
                    .collect();
            }
            Ok(x.pick(shape, &flat))
        }
        "ConstantOfShape" => {
            let shape: Vec<usize> = x?.to_i64().iter().map(|&d| d.max(0) as usize).collect();
            let n = numel(&shape)?;
            let fill = match a.tensor("value") {
                Some(t) => proto::tensor(t).map_err(|e| Error::Input(format!("value: {e}")))?,
                None => Tensor::f32(vec![1], vec![0.0]),
            };
            Ok(match fill.data {
                Data::F32(v) => Tensor::f32(shape, vec![v.first().copied().unwrap_or(0.0); n]),
                Data::I64(v) => Tensor::i64(shape, vec![v.first().copied().unwrap_or(0); n]),
            })
        }
        "Range" => {
            let (s, l, d) = (x?, get(inputs, 1)?, get(inputs, 2)?);
            let scalar = |t: &Tensor| -> Result<(), Error> {
                if t.shape.iter().product::<usize>() == 1 {
                    Ok(())
                } else {
                    bad(format!(
                        "Range takes scalars, got a tensor of shape {:?}",
                        t.shape
                    ))
                }
            };
            scalar(s)?;
            scalar(l)?;
            scalar(d)?;
            if s.is_float() {
                let (s, l, d) = (s.to_f32()[0], l.to_f32()[0], d.to_f32()[0]);
                let n = ((l - s) / d).ceil();
                if d == 0.0 || !n.is_finite() {
                    return bad(format!("Range({s}, {l}, {d}) has no finite length"));
                }
                let n = numel(&[n.max(0.0) as usize])?;
                Ok(Tensor::f32(
                    vec![n],
                    (0..n).map(|i| s + i as f32 * d).collect(),
                ))
            } else {
                let (s, l, d) = (s.to_i64()[0], l.to_i64()[0], d.to_i64()[0]);
                if d == 0 {
                    return bad("Range delta 0");
                }
                // i128: the span of two i64s does not overflow it.
                let span = l as i128 - s as i128;
                let n = (span + d as i128 - d.signum() as i128) / d as i128;
                let n = numel(&[usize::try_from(n.max(0)).unwrap_or(usize::MAX)])?;
                let v: Option<Vec<i64>> = (0..n as i64)
                    .map(|i| i.checked_mul(d).and_then(|o| s.checked_add(o)))
                    .collect();
                let v = v.ok_or_else(|| Error::Input("Range overflows i64".into()))?;
                Ok(Tensor::i64(vec![n], v))
            }
        }
        "Where" => {
            let (c, xa, ya) = (x?, get(inputs, 1)?, get(inputs, 2)?);
            let s1 =
                broadcast_shape(&c.shape, &xa.shape).and_then(|s| broadcast_shape(&s, &ya.shape));
            let shape = s1.ok_or_else(|| Error::Input("Where operands do not broadcast".into()))?;
            numel(&shape)?;
            let (ci, xi, yi) = (
                broadcast_index(&c.shape, &shape),
                broadcast_index(&xa.shape, &shape),
                broadcast_index(&ya.shape, &shape),
            );
            let cv = c.to_i64();
            if xa.is_float() || ya.is_float() {
                let (xv, yv) = (xa.to_f32(), ya.to_f32());
                Ok(Tensor::f32(
                    shape,
                    (0..ci.len())
                        .map(|k| if cv[ci[k]] != 0 { xv[xi[k]] } else { yv[yi[k]] })
                        .collect(),
                ))
            } else {
                let (xv, yv) = (xa.to_i64(), ya.to_i64());
                Ok(Tensor::i64(
                    shape,
                    (0..ci.len())
                        .map(|k| if cv[ci[k]] != 0 { xv[xi[k]] } else { yv[yi[k]] })
                        .collect(),
                ))
            }
        }
        _ => bad("folding this op over constants is not supported"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn i(shape: Vec<usize>, v: Vec<i64>) -> Option<Tensor> {
        Some(Tensor::i64(shape, v))
    }

    #[test]
    fn gather_and_slice_follow_onnx() {
        let x = i(vec![2, 3], vec![0, 1, 2, 3, 4, 5]);
        let g = eval("Gather", &Attrs(&[]), &[x.clone(), i(vec![], vec![-1])], 13).unwrap();
        assert_eq!((g.shape.clone(), g.to_i64()), (vec![3], vec![3, 4, 5]));
        let s = eval(
            "Slice",
            &Attrs(&[]),
            &[
                x,
                i(vec![1], vec![-1]),
                i(vec![1], vec![-100]),
                i(vec![1], vec![1]),
                i(vec![1], vec![-1]),
            ],
            13,
        )
        .unwrap();
        assert_eq!(
            (s.shape.clone(), s.to_i64()),
            (vec![2, 3], vec![2, 1, 0, 5, 4, 3])
        );
    }

    #[test]
    fn reshape_resolves_zero_and_minus_one() {
        let shape = Tensor::i64(vec![2], vec![0, -1]);
        assert_eq!(
            reshape_target("Reshape", &Attrs(&[]), &[4, 3, 2], Some(&shape), 14).unwrap(),
            vec![4, 6]
        );
        assert!(reshape_target(
            "Reshape",
            &Attrs(&[]),
            &[4, 3, 2],
            Some(&Tensor::i64(vec![1], vec![5])),
            14
        )
        .is_err());
    }
}
