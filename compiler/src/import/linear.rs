//! Gemm, MatMul with a constant right operand, Softmax.

use super::builder::{axis, bad, Builder};
use super::ops::Site;
use super::window::matmul_shape;
use crate::graph::{Op, Tensor};
use crate::Error;

impl Builder {
    pub(super) fn gemm(&mut self, s: &Site) -> Result<(), Error> {
        let (n, name, x, xs, a) = (s.n, s.name, s.x, s.xs.as_slice(), &s.a);
        if xs.len() != 2 {
            return bad(format!("A must be 2-D, got {xs:?}"));
        }
        let b = self
            .constant(n, 1, "B")?
            .ok_or_else(|| Error::Input("missing B".into()))?;
        if b.shape.len() != 2 {
            return bad(format!("B must be 2-D, got {:?}", b.shape));
        }
        let (alpha, beta) = (a.float("alpha", 1.0), a.float("beta", 1.0));
        let trans_a = a.int("transA", 0) != 0;
        let mut bv: Vec<f32> = b.to_f32().iter().map(|v| v * alpha).collect();
        let (mut k, mut nn) = (b.shape[0], b.shape[1]);
        if a.int("transB", 0) != 0 {
            bv = (0..k * nn).map(|i| bv[(i % k) * nn + i / k]).collect();
            std::mem::swap(&mut k, &mut nn);
        }
        let (m, ka) = if trans_a {
            (xs[1], xs[0])
        } else {
            (xs[0], xs[1])
        };
        if ka != k {
            return bad(format!("A {xs:?} and B {:?} do not multiply", b.shape));
        }
        let bias = match self.constant(n, 2, "C")? {
            None => None,
            Some(c) => {
                if crate::graph::broadcast_shape(&c.shape, &[m, nn]).as_deref()
                    != Some(&[m, nn][..])
                {
                    return bad(format!("C {:?} does not broadcast to ({m}, {nn})", c.shape));
                }
                Some(Tensor::f32(
                    c.shape.clone(),
                    c.to_f32().iter().map(|v| v * beta).collect(),
                ))
            }
        };
        let op = Op::MatMul {
            b: Tensor::f32(vec![k, nn], bv),
            bias,
            trans_a,
        };
        self.emit(n, name, op, vec![x], vec![m, nn])
    }

    pub(super) fn matmul(&mut self, s: &Site) -> Result<(), Error> {
        let (n, name, x, xs) = (s.n, s.name, s.x, &s.xs);
        let b = self
            .constant(n, 1, "B")?
            .ok_or_else(|| Error::Input("missing input 1".into()))?;
        let out = matmul_shape(xs, &b.shape, false)?;
        self.emit(
            n,
            name,
            Op::MatMul {
                b: Tensor::f32(b.shape.clone(), b.to_f32()),
                bias: None,
                trans_a: false,
            },
            vec![x],
            out,
        )
    }

    pub(super) fn softmax(&mut self, s: &Site) -> Result<(), Error> {
        let (n, name, x, xs) = (s.n, s.name, s.x, &s.xs);
        let default = if self.graph.opset < 13 { 1 } else { -1 };
        let ax = axis(s.a.int("axis", default), xs.len())?;
        self.emit(
            n,
            name,
            Op::Softmax {
                axis: ax,
                coerce_2d: self.graph.opset < 13,
            },
            vec![x],
            xs.clone(),
        )
    }
}
