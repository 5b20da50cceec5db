//! Running a `.dfq` model on the host: a batch of samples split over the cores, each thread
//! with its own aligned arena; and the top-1 class of an output row. `diffdfq-run`, the
//! evaluation, the tests and the examples all run models through here.

use diffdfq_runtime::{Model, ARENA_ALIGN};

use crate::Error;

/// An arena aligned to [`ARENA_ALIGN`] inside an owned byte buffer (no unsafe).
pub struct Arena {
    buf: Vec<u8>,
    at: usize,
    len: usize,
}

impl Arena {
    pub fn for_model(m: &Model) -> Arena {
        let len = m.arena_size();
        let buf = vec![0u8; len + ARENA_ALIGN];
        let at = buf.as_ptr().align_offset(ARENA_ALIGN);
        Arena { buf, at, len }
    }

    pub fn bytes(&mut self) -> &mut [u8] {
        &mut self.buf[self.at..self.at + self.len]
    }
}

/// Runs `m` on every sample of `x` (samples of the model's input size, back to back) and
/// returns the outputs back to back. Samples are independent: they are split over the cores;
/// the first error of any worker is returned.
pub fn run_batch(m: &Model, x: &[f32]) -> Result<Vec<f32>, Error> {
    let per_in = m.input().numel as usize;
    let per_out = m.output().numel as usize;
    if per_in == 0 || !x.len().is_multiple_of(per_in) {
        return Err(Error::Internal(format!(
            "{} values are not whole samples of {per_in}",
            x.len()
        )));
    }
    let n = x.len() / per_in;
    let mut out = vec![0f32; n * per_out];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let rows = n.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let jobs: Vec<_> = x
            .chunks(rows * per_in)
            .zip(out.chunks_mut(rows * per_out))
            .map(|(xs, ys)| {
                s.spawn(move || -> Result<(), Error> {
                    let mut arena = Arena::for_model(m);
                    for (xi, yi) in xs.chunks_exact(per_in).zip(ys.chunks_exact_mut(per_out)) {
                        diffdfq_runtime::run(m, xi, yi, arena.bytes())
                            .map_err(|e| Error::Internal(format!("runtime: {e}")))?;
                    }
                    Ok(())
                })
            })
            .collect();
        jobs.into_iter().try_for_each(|j| {
            j.join()
                .unwrap_or_else(|_| Err(Error::Internal("a runtime thread panicked".into())))
        })
    })?;
    Ok(out)
}

/// Index of the largest value (the first of equals; 0 when none compares larger than −∞).
pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_largest() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 2.0]), 1);
        assert_eq!(argmax(&[]), 0);
    }
}
