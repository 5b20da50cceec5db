//! The fake-quantization ops of the quantized model ([`super::qmodel`]) on the CPU: one pass
//! each way instead of candle's chain of element-wise ops, bit for bit the same values.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use crate::reference::pointwise::contiguous;

/// Fake quantization with a trainable step `s` (LSQ) and QDrop, one pass each way. Per
/// element `v = x/s`, `q = round(v) + z`, `c = clamp(q, 0, max)`, `x̂ = (c − z)·s`; the output
/// is `x̂` where the element's coin in `keep` is set (all of them when `keep` is `None`) and
/// `x` elsewhere. Backward: rounding passes gradients straight through, so a quantized
/// element passes `g` to `x` inside the range (half on its bounds, as candle's `clamp`) and
/// `g·((c − z) − in·x/s)` to `s`; a dropped element passes `g` to `x` and nothing to `s`.
pub struct LsqQuant {
    pub zero: f32,
    pub max: f32,
    pub keep: Option<Vec<u64>>,
}

impl LsqQuant {
    fn kept(&self, i: usize) -> bool {
        self.keep
            .as_ref()
            .is_none_or(|k| k.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 == 1))
    }

    /// `(code, weight of the in-range gradient)` of `x` at step `s`.
    fn code(&self, x: f32, s: f32) -> (f32, f32) {
        let q = (x / s).round() + self.zero;
        let c = q.clamp(0.0, self.max);
        let inside = if q < 0.0 || q > self.max {
            0.0
        } else if q == 0.0 || q == self.max {
            0.5
        } else {
            1.0
        };
        (c, inside)
    }

    fn step(s: &Tensor) -> candle_core::Result<f32> {
        s.flatten_all()?
            .to_vec1::<f32>()?
            .first()
            .copied()
            .ok_or_else(|| candle_core::Error::Msg("lsq-quant: an empty step".into()))
    }
}

/// Elements per parallel chunk of the LSQ op: fixed, so sums do not depend on the thread count.
const LSQ_CHUNK: usize = 1 << 14;

impl CustomOp2 for LsqQuant {
    fn name(&self) -> &'static str {
        "lsq-quant"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let x = contiguous("lsq-quant", xs, xl)?;
        let s = match contiguous("lsq-quant", ss, sl)?.first() {
            Some(&s) => s,
            None => candle_core::bail!("lsq-quant: an empty step"),
        };
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(LSQ_CHUNK)
            .zip(x.par_chunks(LSQ_CHUNK))
            .enumerate()
            .for_each(|(k, (out, xs))| {
                for (j, (o, &v)) in out.iter_mut().zip(xs).enumerate() {
                    *o = if self.kept(k * LSQ_CHUNK + j) {
                        (self.code(v, s).0 - self.zero) * s
                    } else {
                        v
                    };
                }
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        s: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        use rayon::prelude::*;
        let step = Self::step(s)?;
        let xv = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut gx = vec![0f32; xv.len()];
        let gs: f64 = gx
            .par_chunks_mut(LSQ_CHUNK)
            .zip(xv.par_chunks(LSQ_CHUNK).zip(g.par_chunks(LSQ_CHUNK)))
            .enumerate()
            .map(|(k, (out, (xs, gs)))| {
                let mut acc = 0f64;
                for (j, ((o, &v), &g)) in out.iter_mut().zip(xs).zip(gs).enumerate() {
                    if self.kept(k * LSQ_CHUNK + j) {
                        let (c, inside) = self.code(v, step);
                        *o = g * inside;
                        acc += (g * ((c - self.zero) - inside * v / step)) as f64;
                    } else {
                        *o = g;
                    }
                }
                acc
            })
            .collect::<Vec<f64>>()
            .into_iter()
            .sum();
        Ok((
            Some(Tensor::from_vec(gx, x.dims(), x.device())?),
            Some(Tensor::new(&[gs as f32], s.device())?.reshape(s.dims())?),
        ))
    }
}

/// Fake quantization with a fixed step `s`: candle's
/// `((x·(1/s) + 0).round()·1 + z).clamp(0, max)·1 − z)·s + 0`, one pass instead of six.
/// `round` has no gradient, so neither does this op: apply it to a detached tensor.
pub struct FakeQuant {
    pub step: f32,
    pub zero: f32,
    pub max: f32,
}

impl CustomOp1 for FakeQuant {
    fn name(&self) -> &'static str {
        "fake-quant"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous("fake-quant", s, l)?;
        let inv = (1.0 / self.step as f64) as f32;
        let (z, max, step) = (self.zero, self.max, self.step);
        let y = x
            .iter()
            .map(|&v| {
                let c = (v * inv + 0.0).round() * 1.0 + z;
                let c = if c < 0.0 { 0.0 } else { c };
                let c = if c > max { max } else { c };
                (c * 1.0 + -z) * step + 0.0
            })
            .collect();
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn lsq_quant_matches_candles_chain_with_and_without_qdrop() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // Values inside, on the bounds of and outside the range, and a step gradient.
        let x = Var::from_tensor(&Tensor::randn(0.3f32, 1.5, (2, 3, 70), &dev)?)?;
        let s = Var::from_tensor(&Tensor::new(&[0.05f32], &dev)?)?;
        let r = Tensor::randn(0f32, 1., (2, 3, 70), &dev)?;
        let aq = crate::quant::ActQuant {
            scale: 0.05,
            zero: 20,
            bits: 8,
        };
        let coins: Vec<u64> = vec![
            0x0123_4567_89ab_cdef,
            0xfedc_ba98_7654_3210,
            !0,
            0x5555,
            7,
            9,
            11,
        ];
        for keep in [None, Some(coins)] {
            let run = |fused: bool| -> candle_core::Result<Vec<Vec<f32>>> {
                let (t, st) = (x.as_tensor(), s.as_tensor());
                let y = if fused {
                    t.apply_op2(
                        st,
                        LsqQuant {
                            zero: 20.0,
                            max: 255.0,
                            keep: keep.clone(),
                        },
                    )?
                } else {
                    let yq = super::super::qmodel::fake_quant(t, &aq, Some(st))?;
                    match &keep {
                        Some(c) => {
                            let m = crate::rng::Rng::coin_mask(c, t.elem_count());
                            let m = Tensor::from_vec(m, t.dims(), &dev)?;
                            (t + (yq - t)?.mul(&m)?)?
                        }
                        None => yq,
                    }
                };
                let g = (&y * &r)?.sum_all()?.backward()?;
                let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
                Ok(vec![
                    flat(&y)?,
                    flat(g.get(&x).expect("x grad"))?,
                    flat(g.get(&s).expect("s grad"))?,
                ])
            };
            let (a, b) = (run(true)?, run(false)?);
            for (u, v) in a.iter().flatten().zip(b.iter().flatten()) {
                assert!((u - v).abs() <= 1e-4 * (1.0 + v.abs()), "{u} vs {v}");
            }
        }
        Ok(())
    }

    #[test]
    fn fake_quant_matches_candles_chain_bit_for_bit() {
        let dev = Device::Cpu;
        let dims = [3, 4, 5, 2];
        let x: Vec<f32> = (0..120)
            .map(|i| match i % 7 {
                0 => 0.0,
                1 => 6.0,
                _ => (i as f32 * 1.91).sin() * 9.0,
            })
            .collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let (step, zero, max) = (0.37f32, 3f32, 15f32);
        let xt = Tensor::from_vec(x.clone(), &dims[..], &dev).unwrap();
        let reference = xt
            .affine(1.0 / step as f64, 0.0)
            .and_then(|t| t.round())
            .and_then(|t| t + zero as f64)
            .and_then(|t| t.clamp(0.0, max as f64))
            .and_then(|t| t - zero as f64)
            .and_then(|t| t.affine(step as f64, 0.0))
            .unwrap();
        let ours = xt.apply_op1(FakeQuant { step, zero, max }).unwrap();
        let v = |t: &Tensor| bits(&t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(v(&reference), v(&ours), "fake-quant values");
    }
}
