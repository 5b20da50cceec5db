//! im2col as a candle op with a col2im backward, so that a convolution is one matrix product
//! forwards and backwards. candle's own CPU conv backward is about 20× slower than its
//! forward, and synthesis and reconstruction are mostly backward passes.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

#[derive(Debug, Clone, Copy)]
pub struct Im2Col {
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    pub dil: usize,
    /// top, left, bottom, right
    pub pads: [usize; 4],
    pub groups: usize,
    /// Columns as (N, C·kh·kw, Ho·Wo), for an ungrouped conv whose kernel multiplies every
    /// sample's block in one broadcast product and lands in (N, C_out, Ho·Wo) without a
    /// transpose; otherwise (G, Cg·kh·kw, N·Ho·Wo).
    pub batch_major: bool,
}

/// Geometry of one application.
struct Dims {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
}

impl Im2Col {
    pub fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        let [pt, pl, pb, pr] = self.pads;
        let eh = self.dil * (self.kernel[0] - 1) + 1;
        let ew = self.dil * (self.kernel[1] - 1) + 1;
        (
            (h + pt + pb).saturating_sub(eh) / self.strides[0] + 1,
            (w + pl + pr).saturating_sub(ew) / self.strides[1] + 1,
        )
    }

    /// Calls `f(col_start, input_start, len)` for every run of column entries that read input
    /// pixels `input_start, input_start + stride_w, …` (entries in the padding read nothing and
    /// stay zero), in the layout `batch_major` chooses.
    fn for_each_run(&self, d: &Dims, mut f: impl FnMut(usize, usize, usize)) {
        let [kh, kw] = self.kernel;
        let [sh, sw] = self.strides;
        let cg = d.c / self.groups;
        let p = d.n * d.ho * d.wo;
        for kx in 0..kw {
            // Output columns whose input column `ox·sw + kx·dil − pad_left` is inside.
            let off = (kx * self.dil) as isize - self.pads[1] as isize;
            let first = if off >= 0 {
                0
            } else {
                ((-off) as usize).div_ceil(sw)
            };
            let mut last = d.wo;
            while last > first && (last - 1) as isize * sw as isize + off >= d.w as isize {
                last -= 1;
            }
            if first >= last {
                continue;
            }
            let ix0 = (first as isize * sw as isize + off) as usize;
            for c in 0..d.c {
                let (g, ci) = (c / cg, c % cg);
                for ky in 0..kh {
                    let row = ((g * cg + ci) * kh + ky) * kw + kx;
                    for n in 0..d.n {
                        for oy in 0..d.ho {
                            let iy = (oy * sh + ky * self.dil) as isize - self.pads[0] as isize;
                            if iy < 0 || iy >= d.h as isize {
                                continue;
                            }
                            let col = if self.batch_major {
                                (n * d.c * kh * kw + row) * d.ho * d.wo + oy * d.wo + first
                            } else {
                                row * p + (n * d.ho + oy) * d.wo + first
                            };
                            let inp = ((n * d.c + c) * d.h + iy as usize) * d.w + ix0;
                            f(col, inp, last - first);
                        }
                    }
                }
            }
        }
    }

    fn dims(&self, shape: &Shape) -> candle_core::Result<Dims> {
        let (n, c, h, w) = shape.dims4()?;
        if self.groups == 0 || c % self.groups != 0 {
            candle_core::bail!("im2col: {c} channels in {} groups", self.groups)
        }
        let (ho, wo) = self.out_hw(h, w);
        Ok(Dims { n, c, h, w, ho, wo })
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.dims(l.shape())?;
        let x = match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("im2col: needs a contiguous f32 input"),
        };
        let rows = d.c / self.groups * self.kernel[0] * self.kernel[1];
        let p = d.n * d.ho * d.wo;
        let mut out = vec![0f32; self.groups * rows * p];
        let sw = self.strides[1];
        self.for_each_run(&d, |o, i, len| {
            if sw == 1 {
                out[o..o + len].copy_from_slice(&x[i..i + len]);
            } else {
                for (k, v) in out[o..o + len].iter_mut().enumerate() {
                    *v = x[i + k * sw];
                }
            }
        });
        let shape = if self.batch_major {
            Shape::from((d.n, d.c * self.kernel[0] * self.kernel[1], d.ho * d.wo))
        } else {
            Shape::from((self.groups, rows, p))
        };
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let d = self.dims(arg.shape())?;
        let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut gx = vec![0f32; d.n * d.c * d.h * d.w];
        let sw = self.strides[1];
        self.for_each_run(&d, |o, i, len| {
            for (k, v) in g[o..o + len].iter().enumerate() {
                gx[i + k * sw] += v;
            }
        });
        Ok(Some(Tensor::from_vec(gx, arg.dims(), arg.device())?))
    }
}
