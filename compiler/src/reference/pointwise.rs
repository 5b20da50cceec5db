//! Element-wise ops of the float model with a backward pass for their input only.
//!
//! candle's backward computes a gradient for every operand of a binary op, constants
//! included: a BatchNorm's `x·mul + add` spends two full-size products, two zero tensors and
//! four additions on the gradients of its own parameters, and a `clamp` spends about fourteen
//! passes on two broadcast scalars. These ops compute what candle computes for the input,
//! bit for bit (the same f32 operations in the same order, ties in `clamp` halved as candle's
//! `maximum`/`minimum` do), and nothing else. CPU only; other devices keep candle's ops.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

pub(crate) fn contiguous<'a>(
    name: &str,
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{name}: needs a contiguous f32 input"),
    }
}

/// Per-element map of the input and the output gradient to the input gradient.
fn backward(
    arg: &Tensor,
    grad: &Tensor,
    f: impl Fn(usize, f32, f32) -> f32,
) -> candle_core::Result<Option<Tensor>> {
    let x = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let gx = x
        .iter()
        .zip(&g)
        .enumerate()
        .map(|(i, (&x, &g))| f(i, x, g))
        .collect();
    Ok(Some(Tensor::from_vec(gx, arg.dims(), arg.device())?))
}

/// `y = x·mul[c] + add[c]` over axis 1 of an (N, C, …) tensor (`mul` absent: `x + add[c]`).
pub struct ChannelAffine {
    pub mul: Option<Vec<f32>>,
    pub add: Vec<f32>,
}

impl ChannelAffine {
    /// `f(channel, value)` over an (N, C, …) tensor, one channel's contiguous run at a time.
    fn per_channel(
        &self,
        dims: &[usize],
        x: &[f32],
        f: impl Fn(usize, f32) -> f32,
    ) -> candle_core::Result<Vec<f32>> {
        let c = self.add.len();
        if dims.len() < 2 || dims[1] != c || self.mul.as_ref().is_some_and(|m| m.len() != c) {
            candle_core::bail!("channel-affine: {c} channels for shape {dims:?}")
        }
        let inner = dims[2..].iter().product::<usize>().max(1);
        let mut out = Vec::with_capacity(x.len());
        for (k, run) in x.chunks(inner).enumerate() {
            out.extend(run.iter().map(|&v| f(k % c, v)));
        }
        Ok(out)
    }
}

impl CustomOp1 for ChannelAffine {
    fn name(&self) -> &'static str {
        "channel-affine"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous("channel-affine", s, l)?;
        let y = self.per_channel(l.dims(), x, |c, v| match &self.mul {
            Some(m) => v * m[c] + self.add[c],
            None => v + self.add[c],
        })?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let Some(m) = &self.mul else {
            return Ok(Some(grad.clone()));
        };
        let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        // candle: the add passes `0 + g` on, the product multiplies it by `mul`.
        let gx = self.per_channel(arg.dims(), &g, |c, g| (0.0 + g) * m[c])?;
        Ok(Some(Tensor::from_vec(gx, arg.dims(), arg.device())?))
    }
}

/// Per-channel mean and biased variance over every axis but 1 of an (N, C, …) tensor, as a
/// (2, C) tensor, in one op: candle's `sum`/`broadcast_sub`/`sqr` chain spends about ten
/// full-size passes (forward and backward) per BatchNorm tap, and synthesis taps every one.
/// Sums run in f64, one channel per thread in a fixed order.
pub struct ChannelStats;

impl ChannelStats {
    fn dims(dims: &[usize]) -> candle_core::Result<(usize, usize, usize)> {
        if dims.len() < 2 {
            candle_core::bail!("channel-stats: shape {dims:?} has no channel axis")
        }
        Ok((dims[0], dims[1], dims[2..].iter().product::<usize>()))
    }
}

impl CustomOp1 for ChannelStats {
    fn name(&self) -> &'static str {
        "channel-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let x = contiguous("channel-stats", s, l)?;
        let (n, c, inner) = Self::dims(l.dims())?;
        let count = (n * inner).max(1) as f64;
        let stats: Vec<(f32, f32)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let runs = || (0..n).map(|k| &x[(k * c + ch) * inner..(k * c + ch + 1) * inner]);
                let mean = runs()
                    .map(|r| r.iter().map(|&v| v as f64).sum::<f64>())
                    .sum::<f64>()
                    / count;
                let var = runs()
                    .map(|r| r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>())
                    .sum::<f64>()
                    / count;
                (mean as f32, var as f32)
            })
            .collect();
        let (mean, var): (Vec<f32>, Vec<f32>) = stats.into_iter().unzip();
        Ok((CpuStorage::F32([mean, var].concat()), Shape::from((2, c))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        use rayon::prelude::*;
        let (n, c, inner) = Self::dims(arg.dims())?;
        let count = (n * inner).max(1) as f32;
        let x = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let st = res.flatten_all()?.to_vec1::<f32>()?;
        let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut gx = vec![0f32; x.len()];
        // d mean / dx = 1/count; d var / dx = 2 (x − mean) / count.
        gx.par_chunks_mut(inner.max(1))
            .zip(x.par_chunks(inner.max(1)))
            .enumerate()
            .for_each(|(plane, (out, xs))| {
                let ch = plane % c;
                let (mean, gm, gv) = (st[ch], g[ch] / count, 2.0 * g[c + ch] / count);
                for (o, &v) in out.iter_mut().zip(xs) {
                    *o = gm + gv * (v - mean);
                }
            });
        Ok(Some(Tensor::from_vec(gx, arg.dims(), arg.device())?))
    }
}

/// `clamp(x, lo, hi)` as candle's `x.maximum(lo).minimum(hi)`; either bound may be absent.
pub struct Clamp {
    pub lo: Option<f32>,
    pub hi: Option<f32>,
}

impl Clamp {
    fn max(x: f32, lo: Option<f32>) -> f32 {
        match lo {
            Some(lo) if x < lo => lo,
            _ => x,
        }
    }

    /// candle's gradient through `maximum`/`minimum` with a scalar: `g` where the output is
    /// the input, halved where it is also the bound.
    fn through(out: f32, input: f32, bound: f32, g: f32) -> f32 {
        let keep = if out == input { 1f32 } else { 0f32 };
        let tie = if out == bound { 1f32 } else { 0f32 };
        keep * g / (tie + 1.0)
    }
}

impl CustomOp1 for Clamp {
    fn name(&self) -> &'static str {
        "clamp"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous("clamp", s, l)?;
        let y = x
            .iter()
            .map(|&v| {
                let v = Self::max(v, self.lo);
                match self.hi {
                    Some(hi) if v > hi => hi,
                    _ => v,
                }
            })
            .collect();
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        backward(arg, grad, |_, x, g| {
            let y1 = Self::max(x, self.lo);
            let g1 = match self.hi {
                Some(hi) => 0.0 + Self::through(if y1 > hi { hi } else { y1 }, y1, hi, g),
                None => g,
            };
            match self.lo {
                Some(lo) => Self::through(y1, x, lo, g1),
                None => g1,
            }
        })
    }
}

/// `max(x, 0)` as candle's `relu`, whose gradient passes where `x ≥ 0`.
pub struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous("relu", s, l)?;
        let y = x.iter().map(|&v| v.max(0f32)).collect();
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        backward(arg, grad, |_, x, g| g * if x >= 0.0 { 1f32 } else { 0f32 })
    }
}

/// `x.clamp(lo, hi)`, through [`Clamp`] on the CPU.
pub fn clamp(x: &Tensor, lo: f32, hi: f32) -> candle_core::Result<Tensor> {
    clip(x, Some(lo), Some(hi))
}

/// `x` clamped to whichever bounds are given, through [`Clamp`] on the CPU.
pub fn clip(x: &Tensor, lo: Option<f32>, hi: Option<f32>) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() {
        return x.contiguous()?.apply_op1(Clamp { lo, hi });
    }
    let mut y = x.clone();
    if let Some(lo) = lo {
        y = y.maximum(lo)?;
    }
    if let Some(hi) = hi {
        y = y.minimum(hi)?;
    }
    Ok(y)
}

/// `x.relu()`, through [`Relu`] on the CPU.
pub fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(Relu)
    } else {
        x.relu()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Value and input gradient of `f(x)·w` summed, for a fixed weighting `w`.
    fn value_and_grad(
        f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
        x: &[f32],
        dims: &[usize],
    ) -> (Vec<f32>, Vec<f32>) {
        let dev = Device::Cpu;
        let v = Var::from_tensor(&Tensor::from_vec(x.to_vec(), dims, &dev).unwrap()).unwrap();
        let w: Vec<f32> = (0..x.len()).map(|i| (i as f32 * 0.37).sin()).collect();
        let w = Tensor::from_vec(w, dims, &dev).unwrap();
        let y = f(v.as_tensor()).unwrap();
        let loss = (&y * &w).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        (
            y.flatten_all().unwrap().to_vec1().unwrap(),
            g.get(&v).unwrap().flatten_all().unwrap().to_vec1().unwrap(),
        )
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Inputs that hit the bounds exactly, where candle's tie rule matters.
    fn inputs(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| match i % 7 {
                0 => 0.0,
                1 => 6.0,
                _ => (i as f32 * 1.91).sin() * 9.0,
            })
            .collect()
    }

    #[test]
    fn channel_stats_match_candles_reductions_and_their_gradient() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0.5f32, 2.0, (3, 4, 5, 6), &dev)?)?;
        let (wm, wv) = (
            Tensor::new(&[1f32, -2., 0.5, 3.], &dev)?,
            Tensor::new(&[0.25f32, 1., -1., 2.], &dev)?,
        );
        let run = |fused: bool| -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
            let t = x.as_tensor();
            let (m, v) = if fused {
                let s = t.apply_op1(ChannelStats)?;
                (s.get(0)?, s.get(1)?)
            } else {
                let x3 = t.reshape((3, 4, 30))?;
                let m = (x3.sum(2)?.sum(0)? / 90.0)?;
                let c = x3.broadcast_sub(&m.reshape((1, 4, 1))?)?;
                (m, (c.sqr()?.sum(2)?.sum(0)? / 90.0)?)
            };
            let loss = ((&m * &wm)?.sum_all()? + (&v * &wv)?.sum_all()?)?;
            let g = loss.backward()?;
            let gx = g
                .get(&x)
                .expect("gradient")
                .flatten_all()?
                .to_vec1::<f32>()?;
            Ok(([m.to_vec1::<f32>()?, v.to_vec1::<f32>()?].concat(), gx))
        };
        let (a, b) = (run(true)?, run(false)?);
        for (u, v) in a.0.iter().zip(&b.0).chain(a.1.iter().zip(&b.1)) {
            assert!((u - v).abs() <= 1e-5 * (1.0 + v.abs()), "{u} vs {v}");
        }
        Ok(())
    }

    #[test]
    fn ops_match_candle_bit_for_bit() {
        let dims = [3, 4, 5, 2];
        let x = inputs(120);
        let dev = Device::Cpu;
        let (mul, add) = (vec![0.5f32, -1.25, 3.0, 0.1], vec![0.3f32, 0.0, -2.0, 7.5]);
        let (mt, at) = (
            Tensor::from_vec(mul.clone(), (1, 4, 1, 1), &dev).unwrap(),
            Tensor::from_vec(add.clone(), (1, 4, 1, 1), &dev).unwrap(),
        );
        type F<'a> = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + 'a>;
        let pairs: Vec<(F, F)> = vec![
            (
                Box::new(|t| t.broadcast_mul(&mt)?.broadcast_add(&at)),
                Box::new(|t| {
                    t.apply_op1(ChannelAffine {
                        mul: Some(mul.clone()),
                        add: add.clone(),
                    })
                }),
            ),
            (
                Box::new(|t| t.broadcast_add(&at)),
                Box::new(|t| {
                    t.apply_op1(ChannelAffine {
                        mul: None,
                        add: add.clone(),
                    })
                }),
            ),
            (
                Box::new(|t| t.maximum(0f32)?.minimum(6f32)),
                Box::new(|t| {
                    t.apply_op1(Clamp {
                        lo: Some(0.0),
                        hi: Some(6.0),
                    })
                }),
            ),
            (
                Box::new(|t| t.maximum(0f32)),
                Box::new(|t| {
                    t.apply_op1(Clamp {
                        lo: Some(0.0),
                        hi: None,
                    })
                }),
            ),
            (
                Box::new(|t| t.minimum(6f32)),
                Box::new(|t| {
                    t.apply_op1(Clamp {
                        lo: None,
                        hi: Some(6.0),
                    })
                }),
            ),
            (Box::new(|t| t.relu()), Box::new(|t| t.apply_op1(Relu))),
        ];
        for (k, (reference, ours)) in pairs.iter().enumerate() {
            let (ya, ga) = value_and_grad(reference, &x, &dims);
            let (yb, gb) = value_and_grad(ours, &x, &dims);
            assert_eq!(bits(&ya), bits(&yb), "op {k}: values");
            assert_eq!(bits(&ga), bits(&gb), "op {k}: gradients");
        }
    }
}
