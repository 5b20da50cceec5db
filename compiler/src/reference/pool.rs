//! Differentiable 2-D max/avg pooling for any kernel, stride, dilation, padding and ceil mode.
//!
//! candle's own pools only backpropagate when kernel == stride without padding. Here each
//! kernel offset gathers its rows and columns with `index_select` (which has a gradient) from
//! an explicitly padded input, and the offsets are combined with `maximum` or a sum.

use candle_core::{DType, Result, Tensor};

use crate::graph::{Pool, PoolKind};

fn pad(x: &Tensor, dim: usize, before: usize, after: usize, fill: f32) -> Result<Tensor> {
    if before == 0 && after == 0 {
        return Ok(x.clone());
    }
    if fill == 0.0 {
        return x.pad_with_zeros(dim, before, after);
    }
    let mut parts = Vec::new();
    let mut shape = x.dims().to_vec();
    if before > 0 {
        shape[dim] = before;
        parts.push(Tensor::full(fill, shape.as_slice(), x.device())?);
    }
    parts.push(x.clone());
    if after > 0 {
        shape[dim] = after;
        parts.push(Tensor::full(fill, shape.as_slice(), x.device())?);
    }
    Tensor::cat(&parts, dim)
}

/// Pools `x` (N, C, H, W) to `out` spatial size.
pub fn pool2d(x: &Tensor, p: &Pool, out: [usize; 2]) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let hw = [h, w];
    let fill = if p.kind == PoolKind::Max {
        f32::NEG_INFINITY
    } else {
        0.0
    };
    // Padded extent each axis needs: explicit pads, plus ceil-mode overhang.
    let mut xp = x.clone();
    for i in 0..2 {
        let need = (out[i] - 1) * p.strides[i] + p.dilations[i] * (p.kernel[i] - 1) + 1;
        let after = need.saturating_sub(hw[i] + p.pads[i]);
        xp = pad(&xp, 2 + i, p.pads[i], after, fill)?;
    }
    let dev = x.device();
    let index = |axis: usize, k: usize| -> Result<Tensor> {
        let v: Vec<u32> = (0..out[axis])
            .map(|o| (o * p.strides[axis] + k * p.dilations[axis]) as u32)
            .collect();
        Tensor::from_vec(v, out[axis], dev)
    };
    let mut acc: Option<Tensor> = None;
    for ki in 0..p.kernel[0] {
        let rows = xp.index_select(&index(0, ki)?, 2)?;
        for kj in 0..p.kernel[1] {
            let s = rows.index_select(&index(1, kj)?, 3)?;
            acc = Some(match acc {
                None => s,
                Some(a) if p.kind == PoolKind::Max => a.maximum(&s)?,
                Some(a) => (a + s)?,
            });
        }
    }
    let acc = acc.ok_or_else(|| candle_core::Error::Msg("empty pooling window".into()))?;
    if p.kind == PoolKind::Max {
        return Ok(acc);
    }
    // Divisor per output position: window cells inside the input (or the padded input).
    let (lo, hi) = if p.count_include_pad {
        (
            [0, 0],
            [hw[0] + p.pads[0] + p.pads[2], hw[1] + p.pads[1] + p.pads[3]],
        )
    } else {
        (
            [p.pads[0], p.pads[1]],
            [p.pads[0] + hw[0], p.pads[1] + hw[1]],
        )
    };
    let inside = |axis: usize, o: usize| {
        (0..p.kernel[axis])
            .map(|k| o * p.strides[axis] + k * p.dilations[axis])
            .filter(|&c| c >= lo[axis] && c < hi[axis])
            .count()
    };
    let mut inv = Vec::with_capacity(out[0] * out[1]);
    for oh in 0..out[0] {
        for ow in 0..out[1] {
            inv.push(1.0 / (inside(0, oh) * inside(1, ow)).max(1) as f32);
        }
    }
    let inv = Tensor::from_vec(inv, (1, 1, out[0], out[1]), dev)?.to_dtype(DType::F32)?;
    acc.broadcast_mul(&inv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Gradient of sum(pool(x) · r) against central differences, for overlapping, padded,
    /// dilated and ceil-mode windows (the cases candle's own pools cannot backpropagate).
    #[test]
    fn backward_matches_finite_differences() {
        let dev = Device::Cpu;
        let cases = [
            (
                PoolKind::Max,
                [3, 3],
                [2, 2],
                [1, 1],
                [1, 1, 1, 1],
                false,
                [3, 3],
            ),
            (
                PoolKind::Avg,
                [3, 3],
                [2, 2],
                [1, 1],
                [1, 1, 1, 1],
                false,
                [3, 3],
            ),
            (
                PoolKind::Avg,
                [3, 3],
                [2, 2],
                [1, 1],
                [1, 1, 1, 1],
                true,
                [3, 3],
            ),
            (
                PoolKind::Max,
                [2, 3],
                [1, 2],
                [2, 1],
                [0, 1, 1, 0],
                false,
                [4, 3],
            ),
            // ceil mode: one more output row and column than the pads alone give
            (
                PoolKind::Avg,
                [2, 2],
                [2, 2],
                [1, 1],
                [0, 0, 0, 0],
                false,
                [3, 3],
            ),
        ];
        for (kind, kernel, strides, dilations, pads, cip, out) in cases {
            let p = Pool {
                kind,
                kernel,
                strides,
                dilations,
                pads,
                count_include_pad: cip,
            };
            let x0: Vec<f32> = (0..2 * 25)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
                .collect();
            let r = Tensor::from_vec(
                (0..2 * out[0] * out[1])
                    .map(|i| 1.0 + i as f32 * 0.1)
                    .collect::<Vec<_>>(),
                (1, 2, out[0], out[1]),
                &dev,
            )
            .unwrap();
            let f = |x: &Tensor| {
                pool2d(x, &p, out)
                    .unwrap()
                    .mul(&r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            let x = Var::from_vec(x0.clone(), (1, 2, 5, 5), &dev).unwrap();
            let g = f(x.as_tensor()).backward().unwrap();
            let g: Vec<f32> = g
                .get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for i in 0..x0.len() {
                let eval = |d: f32| {
                    let mut v = x0.clone();
                    v[i] += d;
                    f(&Tensor::from_vec(v, (1, 2, 5, 5), &dev).unwrap())
                        .to_scalar::<f32>()
                        .unwrap()
                };
                let num = (eval(1e-2) - eval(-1e-2)) / 2e-2;
                assert!(
                    (num - g[i]).abs() < 2e-2,
                    "{kind:?} {kernel:?} pixel {i}: numeric {num}, autograd {}",
                    g[i]
                );
            }
        }
    }
}
