//! The memory planner: one arena offset per stored tensor, from liveness.
//!
//! Steps are op indices. A tensor lives from the op that writes it (the model input: from op
//! 0) to the last op that reads it (the model output: to the end). Two tensors may share bytes
//! only when their live intervals are disjoint; intervals are closed, so an op's output never
//! overlaps its own inputs (the runtime's rule) and nothing is overwritten while still to be
//! read. A Reshape output aliases its input: both are one buffer living over the union.
//!
//! Placement: buffers by decreasing size (then by first step, then id: deterministic), each at
//! the best-fitting 16-aligned gap among the already placed buffers that overlap it in time
//! (the smallest gap that fits, else on top of them). The lower bound any placement must meet
//! is the largest sum of simultaneously live buffer bytes.

use crate::Error;

/// One stored tensor, as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanTensor {
    /// Bytes in the arena (0: not in the arena, e.g. an `f32` output).
    pub size: usize,
    /// First and last step it is live, inclusive.
    pub first: usize,
    pub last: usize,
    /// Tensor whose bytes this one shares exactly (a Reshape output), placed with it.
    pub alias_of: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Arena offset of every tensor (0 for size 0).
    pub offsets: Vec<usize>,
    /// End of the tensor region (16-aligned).
    pub end: usize,
    /// Largest sum of simultaneously live buffer bytes.
    pub lower_bound: usize,
    /// Sum of all buffer bytes (what a plan without reuse needs, before alignment).
    pub total: usize,
}

const ALIGN: usize = 16;

fn align(v: usize) -> usize {
    v.div_ceil(ALIGN) * ALIGN
}

/// Plans offsets for `tensors` (see the module doc).
pub fn plan(tensors: &[PlanTensor]) -> Result<Plan, Error> {
    let n = tensors.len();
    // Resolve alias chains to a root buffer.
    let root = |mut i: usize| -> Result<usize, Error> {
        for _ in 0..=n {
            match tensors[i].alias_of {
                Some(j) if j < n => i = j,
                Some(_) => return Err(Error::Internal("plan: alias out of range".into())),
                None => return Ok(i),
            }
        }
        Err(Error::Internal("plan: alias cycle".into()))
    };
    let mut roots = vec![0; n];
    // Buffer per root: (size, first, last).
    let mut buf: Vec<Option<(usize, usize, usize)>> = vec![None; n];
    for i in 0..n {
        let r = root(i)?;
        roots[i] = r;
        let t = &tensors[i];
        if t.first > t.last {
            return Err(Error::Internal(format!(
                "plan: tensor {i} dies before it is born"
            )));
        }
        if tensors[r].size != t.size {
            return Err(Error::Internal(format!(
                "plan: tensor {i} aliases a tensor of another size"
            )));
        }
        let b = buf[r].get_or_insert((t.size, t.first, t.last));
        b.1 = b.1.min(t.first);
        b.2 = b.2.max(t.last);
    }
    let mut order: Vec<usize> = (0..n)
        .filter(|&i| matches!(buf[i], Some((s, _, _)) if s > 0))
        .collect();
    order.sort_by_key(|&i| {
        let (s, f, _) = buf[i].unwrap_or_default();
        (std::cmp::Reverse(s), f, i)
    });
    let mut off = vec![0usize; n];
    let mut placed: Vec<usize> = Vec::new();
    let mut end = 0;
    for &i in &order {
        let (size, first, last) = buf[i].unwrap_or_default();
        // Placed buffers live at the same time, by offset.
        let mut busy: Vec<(usize, usize)> = placed
            .iter()
            .filter_map(|&j| {
                let (s, f, l) = buf[j].unwrap_or_default();
                (f <= last && first <= l).then_some((off[j], off[j] + s))
            })
            .collect();
        busy.sort_unstable();
        let mut best: Option<(usize, usize)> = None; // (gap size, offset)
        let mut cursor = 0;
        for &(s, e) in &busy {
            if s >= cursor + size {
                let gap = s - cursor;
                if best.is_none_or(|(g, _)| gap < g) {
                    best = Some((gap, cursor));
                }
            }
            cursor = cursor.max(align(e));
        }
        let at = best.map_or(cursor, |(_, o)| o);
        off[i] = at;
        end = end.max(align(at + size));
        placed.push(i);
    }
    let offsets = (0..n)
        .map(|i| {
            if tensors[i].size == 0 {
                0
            } else {
                off[roots[i]]
            }
        })
        .collect();
    let steps = (0..n)
        .filter_map(|i| buf[i])
        .map(|b| b.2)
        .max()
        .unwrap_or(0);
    let lower_bound = (0..=steps)
        .map(|s| {
            (0..n)
                .filter_map(|i| buf[i])
                .filter(|&(_, f, l)| f <= s && s <= l)
                .map(|b| b.0)
                .sum::<usize>()
        })
        .max()
        .unwrap_or(0);
    let total = (0..n).filter_map(|i| buf[i]).map(|b| b.0).sum();
    Ok(Plan {
        offsets,
        end,
        lower_bound,
        total,
    })
}

/// Checks a plan: no two tensors whose live intervals meet share a byte, unless one aliases
/// the other exactly.
pub fn check(tensors: &[PlanTensor], p: &Plan) -> Result<(), String> {
    for i in 0..tensors.len() {
        for j in i + 1..tensors.len() {
            let (a, b) = (&tensors[i], &tensors[j]);
            if a.size == 0 || b.size == 0 || a.last < b.first || b.last < a.first {
                continue;
            }
            let (oa, ob) = (p.offsets[i], p.offsets[j]);
            let same = oa == ob && a.size == b.size;
            let aliased = a.alias_of.is_some() || b.alias_of.is_some();
            if same && aliased {
                continue;
            }
            if oa < ob + b.size && ob < oa + a.size {
                return Err(format!(
                    "tensors {i} [{oa}, {}) and {j} [{ob}, {}) overlap while both live",
                    oa + a.size,
                    ob + b.size
                ));
            }
        }
        if !p.offsets[i].is_multiple_of(ALIGN) {
            return Err(format!("tensor {i} at unaligned offset {}", p.offsets[i]));
        }
        if p.offsets[i] + tensors[i].size > p.end {
            return Err(format!("tensor {i} ends past the plan's end"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(size: usize, first: usize, last: usize) -> PlanTensor {
        PlanTensor {
            size,
            first,
            last,
            alias_of: None,
        }
    }

    #[test]
    fn chain_reuses_two_buffers() {
        // a → b → c → d: each op reads the previous tensor only.
        let ts = vec![t(100, 0, 0), t(100, 0, 1), t(100, 1, 2), t(100, 2, 3)];
        let p = plan(&ts).unwrap();
        check(&ts, &p).unwrap();
        assert_eq!(p.lower_bound, 200);
        assert_eq!(p.end, 224); // two 16-aligned 100-byte slots
        assert_eq!(p.total, 400);
    }

    #[test]
    fn skip_connection_stays_live() {
        // x (0..2) is read again by op 2; y (0..1), z (1..2), w (2..3).
        let ts = vec![t(64, 0, 2), t(32, 0, 1), t(32, 1, 2), t(64, 2, 3)];
        let p = plan(&ts).unwrap();
        check(&ts, &p).unwrap();
        assert!(p.end >= p.lower_bound);
        assert_ne!(p.offsets[0], p.offsets[3]);
    }

    #[test]
    fn alias_shares_the_buffer() {
        let mut ts = vec![t(48, 0, 0), t(48, 0, 1), t(48, 1, 2), t(16, 2, 3)];
        ts[2].alias_of = Some(1);
        let p = plan(&ts).unwrap();
        check(&ts, &p).unwrap();
        assert_eq!(p.offsets[1], p.offsets[2]);
        assert_ne!(p.offsets[0], p.offsets[1]);
    }

    #[test]
    fn check_finds_overlap() {
        let ts = vec![t(32, 0, 1), t(32, 1, 2)];
        let bad = Plan {
            offsets: vec![0, 16],
            end: 48,
            lower_bound: 64,
            total: 64,
        };
        assert!(check(&ts, &bad).is_err());
    }
}
