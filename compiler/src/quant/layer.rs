//! A conv/linear layer's folded weights and their codes, and the one clipping search (Lp, p =
//! 2.4, over clipping ratios of the min–max range) that weights and activations share.

use super::code_max;
use crate::Error;

/// A conv or linear layer: folded float weights and the codes that ship.
#[derive(Debug, Clone, PartialEq)]
pub struct QLayer {
    /// Output channels (rows).
    pub c_out: usize,
    /// Codes per row: `C_in/groups·kh·kw` (conv, order `[c_in][ky][kx]`) or the input features.
    pub k: usize,
    /// Folded float weights, `c_out × k` row-major.
    pub weight: Vec<f32>,
    /// Folded float bias, `c_out` (zeros when the layer had none).
    pub bias: Vec<f32>,
    /// Weight bits: 2, 3, 4 or 8.
    pub bits: u8,
    /// Per-output-channel scale and zero point: `w ≈ s_c·(q − z_c)`; empty until quantized.
    pub scales: Vec<f32>,
    pub zeros: Vec<u8>,
    /// `c_out × k` codes in `[0, 2^bits − 1]`; empty until quantized.
    pub codes: Vec<u8>,
}

impl QLayer {
    pub(super) fn new(c_out: usize, k: usize, weight: Vec<f32>, bias: Vec<f32>, bits: u8) -> Self {
        QLayer {
            c_out,
            k,
            weight,
            bias,
            bits,
            scales: Vec::new(),
            zeros: Vec::new(),
            codes: Vec::new(),
        }
    }

    /// Whether codes, scales and zero points are all present with the right sizes.
    pub fn is_quantized(&self) -> bool {
        self.codes.len() == self.c_out * self.k
            && self.scales.len() == self.c_out
            && self.zeros.len() == self.c_out
    }

    /// Sets the codes with given per-channel scales and zero points: `q = clamp(round(w/s) + z)`
    /// (ties away from zero, as the runtime rounds). Calibration uses this after moving scales.
    pub fn set_weights(&mut self, scales: Vec<f32>, zeros: Vec<u8>) -> Result<(), Error> {
        if scales.len() != self.c_out || zeros.len() != self.c_out {
            return Err(Error::Internal(format!(
                "layer with {} channels got {} scales and {} zero points",
                self.c_out,
                scales.len(),
                zeros.len()
            )));
        }
        let max = code_max(self.bits) as f32;
        let mut codes = Vec::with_capacity(self.c_out * self.k);
        for (c, row) in self.weight.chunks_exact(self.k).enumerate() {
            let (s, z) = (scales[c], zeros[c] as f32);
            codes.extend(
                row.iter()
                    .map(|&w| ((w / s).round() + z).clamp(0.0, max) as u8),
            );
        }
        self.scales = scales;
        self.zeros = zeros;
        self.codes = codes;
        Ok(())
    }

    /// Sets codes chosen elsewhere (AdaRound's rounding decisions) with their scales and zero
    /// points; every code must fit the layer's bits.
    pub fn set_codes(
        &mut self,
        scales: Vec<f32>,
        zeros: Vec<u8>,
        codes: Vec<u8>,
    ) -> Result<(), Error> {
        let max = code_max(self.bits);
        if scales.len() != self.c_out
            || zeros.len() != self.c_out
            || codes.len() != self.c_out * self.k
            || codes.iter().chain(&zeros).any(|&c| c > max)
            || scales.iter().any(|s| !(s.is_finite() && *s > 0.0))
        {
            return Err(Error::Internal(format!(
                "{}-bit layer {}×{}: inconsistent codes, scales or zero points",
                self.bits, self.c_out, self.k
            )));
        }
        self.scales = scales;
        self.zeros = zeros;
        self.codes = codes;
        Ok(())
    }

    /// Per-channel scales and zero points minimizing the Lp (p = 2.4) rounding error over
    /// clipping ratios 1.00, 0.99, …, 0.01 of the channel's min–max range (Genie's search),
    /// then round-to-nearest codes.
    pub fn quantize_lp(&mut self) {
        self.quantize_clipped(100);
    }

    /// Per-channel min–max round-to-nearest (asymmetric, the range widened to contain 0 so the
    /// zero point is a code).
    pub fn quantize_rtn(&mut self) {
        self.quantize_clipped(1);
    }

    /// Round-to-nearest with, per channel, the best of the clipping ratios 1.00, 0.99, … (`steps`
    /// of them) of the min–max range by the Lp (p = 2.4) error.
    fn quantize_clipped(&mut self, steps: usize) {
        use rayon::prelude::*;
        let max = code_max(self.bits) as f32;
        // Rows are independent: one thread per row keeps the result thread-count-free.
        let best: Vec<(f32, u8)> = self
            .weight
            .par_chunks_exact(self.k.max(1))
            .map(|row| {
                let lo = row.iter().fold(0f32, |a, &w| a.min(w));
                let hi = row.iter().fold(0f32, |a, &w| a.max(w));
                let candidate = |r: f32| {
                    // An all-zero (or vanishing) row still needs a scale whose requantization
                    // multiplier `s·s_x/s_y` stays inside the runtime's shift range.
                    let s = ((hi - lo) * r / max).max(1e-8);
                    let z = (-lo * r / s).round().clamp(0.0, max);
                    (s, z, (s, z as u8))
                };
                if steps == 1 {
                    candidate(1.0).2
                } else {
                    lp_clip(row, max, steps, candidate).unwrap_or((1e-8, 0))
                }
            })
            .collect();
        let (scales, zeros) = best.into_iter().unzip();
        // Sizes match by construction.
        let _ = self.set_weights(scales, zeros);
    }

    /// Re-rounds the fewest taps of each row so that the row's codes sum to its float weights'
    /// sum within half a step (`|Σ_j (q_j − z − w_j/s)| ≤ ½`, clamps permitting). For a row
    /// whose taps all read one input channel (a depthwise conv), rounding moves the output mean
    /// by `E[x_c]·s·Σ_j (q_j − z − w_j/s)`; bias correction takes that back only as well as the
    /// BN statistics give `E[x_c]`, and after this the shift is at most `½·s·E[x_c]` whatever
    /// the estimate. The taps moved are those nearest a tie (largest rounding residual the other
    /// way), so no code ends more than one step from its weight. Returns how many codes moved.
    pub fn preserve_row_sums(&mut self) -> usize {
        if !self.is_quantized() || self.k == 0 {
            return 0;
        }
        let max = code_max(self.bits);
        let mut moved = 0;
        for (c, (row, codes)) in self
            .weight
            .chunks_exact(self.k)
            .zip(self.codes.chunks_exact_mut(self.k))
            .enumerate()
        {
            let (s, z) = (self.scales[c] as f64, self.zeros[c] as f64);
            // Residual of each tap in codes: positive where it was rounded down.
            let res: Vec<f64> = row
                .iter()
                .zip(codes.iter())
                .map(|(&w, &q)| w as f64 / s + z - q as f64)
                .collect();
            let need = res.iter().sum::<f64>().round() as i64;
            let up = need > 0;
            // Most residual first; ties by tap index, so the result is deterministic.
            let mut order: Vec<usize> = (0..self.k)
                .filter(|&j| {
                    if up {
                        res[j] > 0.0 && codes[j] < max
                    } else {
                        res[j] < 0.0 && codes[j] > 0
                    }
                })
                .collect();
            order.sort_by(|&a, &b| res[b].abs().total_cmp(&res[a].abs()).then(a.cmp(&b)));
            for &j in order.iter().take(need.unsigned_abs() as usize) {
                if up {
                    codes[j] += 1;
                } else {
                    codes[j] -= 1;
                }
                moved += 1;
            }
        }
        moved
    }

    /// The weights the codes stand for, `c_out × k`.
    pub fn dequantized(&self) -> Vec<f32> {
        self.codes
            .chunks_exact(self.k.max(1))
            .enumerate()
            .flat_map(|(c, row)| {
                let (s, z) = (self.scales[c], self.zeros[c] as f32);
                row.iter().map(move |&q| s * (q as f32 - z))
            })
            .collect()
    }

    /// Bytes the layer ships: packed code rows plus the 24-byte channel records.
    pub fn packed_bytes(&self) -> usize {
        let row = diffdfq_runtime::format::row_bytes(self.bits, self.k).unwrap_or(0);
        self.c_out * (row + diffdfq_runtime::format::CHANNEL_RECORD_LEN)
    }

    /// Bytes of the same parameters in FP32 (folded weights and bias).
    pub fn fp32_bytes(&self) -> usize {
        4 * (self.weight.len() + self.bias.len())
    }
}

/// The clipping search: among `steps` ratios `r = 1.00, 0.99, …` of a min–max range, the
/// candidate whose round-to-nearest codes give the least `Σ|v − v̂|^2.4` over `values`.
/// `candidate(r)` gives the step `s`, the zero point `z` (codes in `[0, max]`) and what the
/// caller keeps; `None` when no candidate has a finite error.
pub fn lp_clip<T>(
    values: &[f32],
    max: f32,
    steps: usize,
    candidate: impl Fn(f32) -> (f32, f32, T),
) -> Option<T> {
    let mut best: (f64, Option<T>) = (f64::INFINITY, None);
    for step in 0..steps {
        let r = 1.0 - step as f32 * 0.01;
        let (s, z, t) = candidate(r);
        let err: f64 = values
            .iter()
            .map(|&v| {
                let q = ((v / s).round() + z).clamp(0.0, max);
                ((v - s * (q - z)).abs() as f64).powf(2.4)
            })
            .sum();
        if err < best.0 {
            best = (err, Some(t));
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtn_rounds_each_channel_within_half_a_step() {
        let w = vec![
            0.3, -0.7, 0.1, 0.05, 2.0, 1.0, 0.5, 0.25, 0.0, 0.0, 0.0, 0.0,
        ];
        for bits in [2, 3, 4, 8] {
            let mut l = QLayer::new(3, 4, w.clone(), vec![0.0; 3], bits);
            l.quantize_rtn();
            assert!(l.is_quantized());
            let d = l.dequantized();
            for c in 0..3 {
                for j in 0..4 {
                    let e = (d[c * 4 + j] - w[c * 4 + j]).abs();
                    assert!(e <= 0.5 * l.scales[c] + 1e-6, "bits {bits} c {c}: {e}");
                }
            }
            // The all-zero row dequantizes to exact zeros.
            assert!(d[8..].iter().all(|&v| v == 0.0));
        }
    }

    #[test]
    fn row_sums_are_kept_within_half_a_step_by_moving_the_taps_nearest_a_tie() {
        let mut rng = crate::rng::Rng::new(7, 0);
        let (rows, k) = (64, 9);
        let w: Vec<f32> = (0..rows * k).map(|_| rng.normal()).collect();
        for bits in [2, 3, 4, 8] {
            let mut l = QLayer::new(rows, k, w.clone(), vec![0.0; rows], bits);
            l.quantize_rtn();
            let before = l.codes.clone();
            let residual = |l: &QLayer, c: usize, j: usize| {
                w[c * k + j] as f64 / l.scales[c] as f64 + l.zeros[c] as f64
                    - l.codes[c * k + j] as f64
            };
            let sum_before: Vec<f64> = (0..rows)
                .map(|c| (0..k).map(|j| residual(&l, c, j)).sum())
                .collect();
            let moved = l.preserve_row_sums();
            let changed = before.iter().zip(&l.codes).filter(|(a, b)| a != b).count();
            assert_eq!(moved, changed);
            // Most rows of 9 random taps round to a sum off by at least one code.
            assert!(moved > rows / 4, "bits {bits}: only {moved} moved");
            for c in 0..rows {
                let sum: f64 = (0..k).map(|j| residual(&l, c, j)).sum();
                assert!(sum.abs() <= 0.5 + 1e-6, "bits {bits} row {c}: {sum}");
                // A row moves exactly as many codes as its sum was off, each by one step.
                let row_moved: usize = (0..k)
                    .map(|j| before[c * k + j].abs_diff(l.codes[c * k + j]) as usize)
                    .sum();
                assert_eq!(row_moved, sum_before[c].round().abs() as usize);
                for j in 0..k {
                    assert!(
                        residual(&l, c, j).abs() < 1.0,
                        "bits {bits} row {c} tap {j}"
                    );
                }
            }
        }
    }
}
