//! Window geometry of convolutions and pools, and the shapes they imply: shared by the
//! kernels and the format's validation (docs/design.md §4).

/// Convolution geometry. Pads are asymmetric: top/left before, bottom/right after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    pub kernel_h: usize,
    pub kernel_w: usize,
    pub stride_h: usize,
    pub stride_w: usize,
    pub dilation_h: usize,
    pub dilation_w: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub pad_bottom: usize,
    pub pad_right: usize,
    /// Groups; `groups == C_in == C_out` is depthwise.
    pub groups: usize,
}

/// Largest dim, kernel size, stride, dilation or pad the kernels accept (keeps every index
/// computation far from overflow, also with a 32-bit `usize`).
pub const MAX_EXTENT: usize = 1 << 24;

/// Output size of a sliding window along one axis: `floor((n + pb + pa − d·(k−1) − 1) / s) + 1`,
/// `None` if the padded input is shorter than the dilated kernel or a parameter is out of range.
pub fn window_out_len(
    n: usize,
    k: usize,
    s: usize,
    d: usize,
    pad_before: usize,
    pad_after: usize,
) -> Option<usize> {
    if n == 0 || k == 0 || s == 0 || d == 0 {
        return None;
    }
    if [n, k, s, d, pad_before, pad_after]
        .iter()
        .any(|&v| v > MAX_EXTENT)
    {
        return None;
    }
    // In u64: d·(k − 1) may not fit a 32-bit usize before it is compared.
    let padded = n as u64 + pad_before as u64 + pad_after as u64;
    let eff = d as u64 * (k as u64 - 1) + 1;
    if padded < eff {
        return None;
    }
    Some(((padded - eff) / s as u64 + 1) as usize)
}

/// Shape facts of a checked convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub out_h: usize,
    pub out_w: usize,
    /// Input channels per group.
    pub c_in_g: usize,
    /// Output channels per group.
    pub c_out_g: usize,
    /// Reduction length `K = c_in_g · kernel_h · kernel_w`.
    pub k: usize,
}

impl ConvGeom {
    /// Checks the geometry against `[1, C_in, H, W] → [1, C_out, OH, OW]`.
    pub fn check(&self, in_dims: [usize; 4], out_dims: [usize; 4]) -> Option<ConvShape> {
        let [n, c_in, h, w] = in_dims;
        let [on, c_out, out_h, out_w] = out_dims;
        if n != 1 || on != 1 || self.groups == 0 || c_in == 0 || c_out == 0 {
            return None;
        }
        if c_in % self.groups != 0 || c_out % self.groups != 0 {
            return None;
        }
        let oh = window_out_len(
            h,
            self.kernel_h,
            self.stride_h,
            self.dilation_h,
            self.pad_top,
            self.pad_bottom,
        )?;
        let ow = window_out_len(
            w,
            self.kernel_w,
            self.stride_w,
            self.dilation_w,
            self.pad_left,
            self.pad_right,
        )?;
        if oh != out_h || ow != out_w {
            return None;
        }
        let c_in_g = c_in / self.groups;
        let k = c_in_g
            .checked_mul(self.kernel_h)?
            .checked_mul(self.kernel_w)?;
        if k > MAX_EXTENT || c_in > MAX_EXTENT || c_out > MAX_EXTENT {
            return None;
        }
        Some(ConvShape {
            c_in,
            h,
            w,
            c_out,
            out_h,
            out_w,
            c_in_g,
            c_out_g: c_out / self.groups,
            k,
        })
    }
}

/// Number of elements of right-aligned dims (`None` on overflow).
pub fn numel(dims: [usize; 4]) -> Option<usize> {
    dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// Pooling window geometry (max and average pools).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeom {
    pub kernel_h: usize,
    pub kernel_w: usize,
    pub stride_h: usize,
    pub stride_w: usize,
    pub dilation_h: usize,
    pub dilation_w: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub pad_bottom: usize,
    pub pad_right: usize,
}

/// Taps of one window along one axis: positions `start + j·d`, `j < k`. Returns the count of
/// positions inside `[lo, hi)` (as `isize` bounds).
pub(crate) fn taps_in(start: isize, k: usize, d: usize, lo: isize, hi: isize) -> usize {
    (0..k)
        .filter(|&j| {
            let p = start + (j * d) as isize;
            p >= lo && p < hi
        })
        .count()
}

impl PoolGeom {
    /// Checks `[1, C, H, W] → [1, C, OH, OW]`: explicit output sizes (ceil mode is the
    /// compiler's choice), every window must see at least one input element.
    pub fn check(&self, in_dims: [usize; 4], out_dims: [usize; 4]) -> bool {
        let [n, c, h, w] = in_dims;
        let [on, oc, oh, ow] = out_dims;
        if n != 1 || on != 1 || c != oc || c == 0 || oh == 0 || ow == 0 {
            return false;
        }
        let ext = [
            h,
            w,
            c,
            oh,
            ow,
            self.kernel_h,
            self.kernel_w,
            self.stride_h,
            self.stride_w,
            self.dilation_h,
            self.dilation_w,
            self.pad_top,
            self.pad_left,
            self.pad_bottom,
            self.pad_right,
        ];
        if ext.iter().any(|&v| v > MAX_EXTENT) {
            return false;
        }
        if self.kernel_h == 0 || self.kernel_w == 0 || self.stride_h == 0 || self.stride_w == 0 {
            return false;
        }
        if self.dilation_h == 0 || self.dilation_w == 0 {
            return false;
        }
        // Bound the index arithmetic (in u64, for 32-bit targets): the dilated window fits the
        // padded input and the last window starts inside it. After this every product below
        // is at most about 3·2^24.
        let (pad_h, pad_w) = (
            h as u64 + self.pad_top as u64 + self.pad_bottom as u64,
            w as u64 + self.pad_left as u64 + self.pad_right as u64,
        );
        let eff_h = self.dilation_h as u64 * (self.kernel_h as u64 - 1) + 1;
        let eff_w = self.dilation_w as u64 * (self.kernel_w as u64 - 1) + 1;
        if eff_h > pad_h
            || eff_w > pad_w
            || (oh as u64 - 1) * self.stride_h as u64 > pad_h
            || (ow as u64 - 1) * self.stride_w as u64 > pad_w
        {
            return false;
        }
        let rows_ok = (0..oh).all(|o| {
            let st = (o * self.stride_h) as isize - self.pad_top as isize;
            taps_in(st, self.kernel_h, self.dilation_h, 0, h as isize) > 0
        });
        let cols_ok = (0..ow).all(|o| {
            let st = (o * self.stride_w) as isize - self.pad_left as isize;
            taps_in(st, self.kernel_w, self.dilation_w, 0, w as isize) > 0
        });
        rows_ok && cols_ok
    }
}
