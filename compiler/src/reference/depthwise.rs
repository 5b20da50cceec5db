//! Depthwise convolution (one input channel per output channel) as a direct candle op with
//! its own backward for the input and the kernel. As im2col and a matrix product it copies
//! every input pixel kh·kw times and multiplies a 1-row matrix per channel: on MobileNetV2's
//! shapes that ran at about 1 GFLOP/s, forwards and backwards, where the 1×1 layers around it
//! reach 10–50 (`cargo run --release -p diffdfq-compiler --example conv_speed`).
//!
//! Work is split by (sample, channel) planes for the input and output, and by channel for the
//! kernel gradient, so every value is summed by one thread in a fixed order: the results do
//! not depend on the thread count.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy)]
pub struct Depthwise {
    pub strides: [usize; 2],
    pub dil: usize,
    /// top, left, bottom, right
    pub pads: [usize; 4],
}

/// Geometry of one application.
#[derive(Clone, Copy)]
struct Dims {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
}

/// One kernel column's reach along a row: output columns `first..last` (never empty) read
/// input columns `ox·stride + off`.
#[derive(Clone, Copy)]
struct Span {
    kx: usize,
    first: usize,
    last: usize,
    off: isize,
}

impl Span {
    /// The input column output column `first` reads (inside the image by construction).
    fn input_start(&self, stride: usize) -> usize {
        (self.first as isize * stride as isize + self.off) as usize
    }
}

impl Depthwise {
    fn dims(&self, x: &Shape, k: &Shape) -> candle_core::Result<Dims> {
        let (n, c, h, w) = x.dims4()?;
        let (o, i, kh, kw) = k.dims4()?;
        if o != c || i != 1 || kh == 0 || kw == 0 {
            candle_core::bail!("depthwise: kernel {:?} for input {:?}", k.dims(), x.dims())
        }
        let [pt, pl, pb, pr] = self.pads;
        let eh = self.dil * (kh - 1) + 1;
        let ew = self.dil * (kw - 1) + 1;
        if h + pt + pb < eh || w + pl + pr < ew {
            candle_core::bail!(
                "depthwise: kernel larger than the padded input {:?}",
                x.dims()
            )
        }
        let ho = (h + pt + pb - eh) / self.strides[0] + 1;
        let wo = (w + pl + pr - ew) / self.strides[1] + 1;
        Ok(Dims {
            n,
            c,
            h,
            w,
            kh,
            kw,
            ho,
            wo,
        })
    }

    /// The column span of each kernel column that reaches inside the image.
    fn spans(&self, d: &Dims) -> Vec<Span> {
        let sw = self.strides[1] as isize;
        (0..d.kw)
            .filter_map(|kx| {
                let off = (kx * self.dil) as isize - self.pads[1] as isize;
                let first = if off >= 0 {
                    0
                } else {
                    ((-off) as usize).div_ceil(sw as usize).min(d.wo)
                };
                let mut last = d.wo;
                while last > first && (last - 1) as isize * sw + off >= d.w as isize {
                    last -= 1;
                }
                (first < last).then_some(Span {
                    kx,
                    first,
                    last,
                    off,
                })
            })
            .collect()
    }

    /// Calls `f(oy, iy, ky)` for every output row `oy` and kernel row `ky` that reads input
    /// row `iy` inside the image.
    fn rows(&self, d: &Dims, mut f: impl FnMut(usize, usize, usize)) {
        for oy in 0..d.ho {
            for ky in 0..d.kh {
                let iy = (oy * self.strides[0] + ky * self.dil) as isize - self.pads[0] as isize;
                if iy >= 0 && (iy as usize) < d.h {
                    f(oy, iy as usize, ky);
                }
            }
        }
    }
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("depthwise: needs contiguous f32 tensors"),
    }
}

impl CustomOp2 for Depthwise {
    fn name(&self) -> &'static str {
        "depthwise-conv"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.dims(xl.shape(), kl.shape())?;
        let (x, k) = (slice(xs, xl)?, slice(ks, kl)?);
        let spans = self.spans(&d);
        let sw = self.strides[1];
        let mut y = vec![0f32; d.n * d.c * d.ho * d.wo];
        y.par_chunks_mut((d.ho * d.wo).max(1))
            .enumerate()
            .for_each(|(plane, out)| {
                let c = plane % d.c;
                let src = &x[plane * d.h * d.w..(plane + 1) * d.h * d.w];
                let ker = &k[c * d.kh * d.kw..(c + 1) * d.kh * d.kw];
                self.rows(&d, |oy, iy, ky| {
                    let row = &mut out[oy * d.wo..(oy + 1) * d.wo];
                    let inp = &src[iy * d.w..(iy + 1) * d.w];
                    for s in &spans {
                        let wv = ker[ky * d.kw + s.kx];
                        let i0 = s.input_start(sw);
                        let dst = &mut row[s.first..s.last];
                        if sw == 1 {
                            for (o, &v) in dst.iter_mut().zip(&inp[i0..]) {
                                *o += wv * v;
                            }
                        } else {
                            for (j, o) in dst.iter_mut().enumerate() {
                                *o += wv * inp[i0 + j * sw];
                            }
                        }
                    }
                });
            });
        Ok((CpuStorage::F32(y), Shape::from((d.n, d.c, d.ho, d.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        k: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(x.shape(), k.shape())?;
        let xv = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let kv = k.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let spans = self.spans(&d);
        let sw = self.strides[1];
        let (plane_in, plane_out) = (d.h * d.w, d.ho * d.wo);
        // Input gradient: each output gradient scattered back through the kernel.
        let mut gx = vec![0f32; xv.len()];
        gx.par_chunks_mut(plane_in.max(1))
            .enumerate()
            .for_each(|(plane, dst)| {
                let c = plane % d.c;
                let gp = &g[plane * plane_out..(plane + 1) * plane_out];
                let ker = &kv[c * d.kh * d.kw..(c + 1) * d.kh * d.kw];
                self.rows(&d, |oy, iy, ky| {
                    let grow = &gp[oy * d.wo..(oy + 1) * d.wo];
                    let drow = &mut dst[iy * d.w..(iy + 1) * d.w];
                    for s in &spans {
                        let wv = ker[ky * d.kw + s.kx];
                        let i0 = s.input_start(sw);
                        let src = &grow[s.first..s.last];
                        if sw == 1 {
                            for (o, &v) in drow[i0..].iter_mut().zip(src) {
                                *o += wv * v;
                            }
                        } else {
                            for (j, &v) in src.iter().enumerate() {
                                drow[i0 + j * sw] += wv * v;
                            }
                        }
                    }
                });
            });
        // Kernel gradient: per channel, row dot products in f32 summed in f64.
        let taps = d.kh * d.kw;
        let mut gk = vec![0f32; d.c * taps];
        gk.par_chunks_mut(taps).enumerate().for_each(|(c, out)| {
            let mut acc = vec![0f64; taps];
            for n in 0..d.n {
                let plane = n * d.c + c;
                let xp = &xv[plane * plane_in..(plane + 1) * plane_in];
                let gp = &g[plane * plane_out..(plane + 1) * plane_out];
                self.rows(&d, |oy, iy, ky| {
                    let grow = &gp[oy * d.wo..(oy + 1) * d.wo];
                    let xrow = &xp[iy * d.w..(iy + 1) * d.w];
                    for s in &spans {
                        let i0 = s.input_start(sw);
                        let src = &grow[s.first..s.last];
                        let dot: f32 = if sw == 1 {
                            src.iter().zip(&xrow[i0..]).map(|(a, b)| a * b).sum()
                        } else {
                            src.iter()
                                .enumerate()
                                .map(|(j, a)| a * xrow[i0 + j * sw])
                                .sum()
                        };
                        acc[ky * d.kw + s.kx] += dot as f64;
                    }
                });
            }
            for (o, a) in out.iter_mut().zip(acc) {
                *o = a as f32;
            }
        });
        Ok((
            Some(Tensor::from_vec(gx, x.dims(), x.device())?),
            Some(Tensor::from_vec(gk, k.dims(), k.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Output, input gradient and kernel gradient of `sum(conv(x, k) · r)`.
    fn run(
        f: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
        x: &Var,
        k: &Var,
        r: &Tensor,
    ) -> candle_core::Result<[Vec<f32>; 3]> {
        let y = f(x.as_tensor(), k.as_tensor())?;
        let g = (&y * r)?.sum_all()?.backward()?;
        let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        Ok([
            flat(&y)?,
            flat(g.get(x).expect("x grad"))?,
            flat(g.get(k).expect("k grad"))?,
        ])
    }

    #[test]
    fn matches_candles_grouped_conv_forwards_and_backwards() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // (channels, size, kernel, stride, dilation, pads)
        let cases = [
            (3, 7, 3, 1, 1, [1, 1, 1, 1]),
            (4, 8, 3, 2, 1, [1, 1, 1, 1]),
            (2, 9, 5, 1, 1, [2, 2, 2, 2]),
            (2, 10, 5, 2, 1, [2, 2, 2, 2]),
            (3, 6, 3, 1, 2, [2, 2, 2, 2]),
            (2, 5, 3, 1, 1, [0, 0, 0, 0]),
            // Pads wider than the image: some kernel columns never reach inside.
            (2, 2, 3, 2, 1, [4, 4, 4, 4]),
        ];
        for (c, s, kk, st, dil, pads) in cases {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, c, s, s), &dev)?)?;
            let k = Var::from_tensor(&Tensor::randn(0f32, 1., (c, 1, kk, kk), &dev)?)?;
            let ho = (s + 2 * pads[0] - dil * (kk - 1) - 1) / st + 1;
            let r = Tensor::randn(0f32, 1., (2, c, ho, ho), &dev)?;
            let op = Depthwise {
                strides: [st, st],
                dil,
                pads,
            };
            let ours = run(|x, k| x.apply_op2(k, op), &x, &k, &r)?;
            let theirs = run(|x, k| x.conv2d(k, pads[0], st, dil, c), &x, &k, &r)?;
            for (a, b) in ours.iter().zip(&theirs) {
                assert_eq!(a.len(), b.len());
                for (u, v) in a.iter().zip(b) {
                    assert!((u - v).abs() <= 1e-4 * (1.0 + v.abs()), "{u} vs {v}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn asymmetric_pads_and_strides_match_a_padded_input() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (1, 2, 7, 6), &dev)?;
        let k = Tensor::randn(0f32, 1., (2, 1, 3, 3), &dev)?;
        let ours = x.apply_op2(
            &k,
            Depthwise {
                strides: [2, 1],
                dil: 1,
                pads: [0, 1, 1, 0],
            },
        )?;
        let padded = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 1, 0)?;
        let full = padded.conv2d(&k, 0, 1, 1, 2)?;
        let pick = Tensor::new(&[0u32, 2, 4], &dev)?;
        let theirs = full.index_select(&pick, 2)?;
        assert_eq!(ours.dims(), theirs.dims());
        let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }
}
