//! MaxPool, AveragePool, GlobalAveragePool.

use super::builder::{bad, Builder};
use super::ops::Site;
use super::window::spatial;
use crate::graph::{Op, Pool, PoolKind};
use crate::Error;

impl Builder {
    pub(super) fn pool(&mut self, s: &Site) -> Result<(), Error> {
        let (n, name, x, xs, a) = (s.n, s.name, s.x, s.xs.as_slice(), &s.a);
        self.single_output(n)?;
        if xs.len() != 4 {
            return bad(format!(
                "only 2-D pooling (4-D NCHW input) is supported, input shape is {xs:?}"
            ));
        }
        let k = a
            .ints("kernel_shape")
            .ok_or_else(|| Error::Input("missing kernel_shape".into()))?;
        if k.len() != 2 || k.iter().any(|&v| v < 1) {
            return bad(format!("kernel_shape {k:?} must hold two positive values"));
        }
        let kernel = [k[0] as usize, k[1] as usize];
        if a.int("storage_order", 0) != 0 {
            return bad("storage_order=1 is not supported");
        }
        let ceil = a.int("ceil_mode", 0) != 0;
        let (strides, dilations, pads, out_hw) = spatial(a, &xs[2..], kernel, ceil)?;
        let kind = if n.op_type == "MaxPool" {
            PoolKind::Max
        } else {
            PoolKind::Avg
        };
        let pool = Pool {
            kind,
            kernel,
            strides,
            dilations,
            pads,
            count_include_pad: a.int("count_include_pad", 0) != 0,
        };
        self.emit(
            n,
            name,
            Op::Pool(pool),
            vec![x],
            vec![xs[0], xs[1], out_hw[0], out_hw[1]],
        )
    }

    pub(super) fn global_avg_pool(&mut self, s: &Site) -> Result<(), Error> {
        let (n, name, x, xs) = (s.n, s.name, s.x, &s.xs);
        if xs.len() < 3 {
            return bad(format!("input must have spatial axes, got shape {xs:?}"));
        }
        let mut out = xs.clone();
        out[2..].iter_mut().for_each(|d| *d = 1);
        self.emit(n, name, Op::GlobalAvgPool, vec![x], out)
    }
}
