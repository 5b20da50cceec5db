//! Conv, a zero Pad read by a Conv (it becomes the conv's padding), BatchNormalization.

use super::builder::{bad, Builder};
use super::ops::Site;
use super::window::spatial;
use crate::graph::{BatchNorm, Conv, Op, Tensor};
use crate::Error;

impl Builder {
    pub(super) fn conv(&mut self, s: &Site) -> Result<(), Error> {
        let (n, name, x, xs, a) = (s.n, s.name, s.x, s.xs.as_slice(), &s.a);
        if xs.len() != 4 {
            return bad(format!(
                "only 2-D convolution (4-D NCHW input) is supported, input shape is {xs:?}"
            ));
        }
        let w = self
            .constant(n, 1, "weight")?
            .ok_or_else(|| Error::Input("missing weight".into()))?;
        let bias = self.constant(n, 2, "bias")?;
        if w.shape.len() != 4 || w.shape.contains(&0) {
            return bad(format!(
                "weight must be 4-D and non-empty, got {:?}",
                w.shape
            ));
        }
        let groups = a.int("group", 1);
        let (o, ci) = (w.shape[0], w.shape[1]);
        if groups < 1
            || !xs[1].is_multiple_of(groups as usize)
            || !o.is_multiple_of(groups as usize)
            || xs[1] / groups as usize != ci
        {
            return bad(format!(
                "group {groups} does not fit input channels {} and weight {:?}",
                xs[1], w.shape
            ));
        }
        if let Some(ks) = a.ints("kernel_shape") {
            if ks != [w.shape[2] as i64, w.shape[3] as i64] {
                return bad(format!(
                    "kernel_shape {ks:?} does not match weight {:?}",
                    w.shape
                ));
            }
        }
        if let Some(b) = &bias {
            if b.len() != o {
                return bad(format!(
                    "bias has {} values for {o} output channels",
                    b.len()
                ));
            }
        }
        let kernel = [w.shape[2], w.shape[3]];
        // A zero Pad before the conv: the window runs over the padded input.
        let extra = n
            .input
            .first()
            .and_then(|s| self.padded.get(s))
            .map_or([0; 4], |p| p.1);
        let hw = [xs[2] + extra[0] + extra[2], xs[3] + extra[1] + extra[3]];
        let (strides, dilations, mut pads, out_hw) = spatial(a, &hw, kernel, false)?;
        for (p, e) in pads.iter_mut().zip(extra) {
            *p += e;
        }
        let conv = Conv {
            weight: Tensor::f32(w.shape.clone(), w.to_f32()),
            bias: bias.map(|b| b.to_f32()),
            strides,
            dilations,
            pads,
            groups: groups as usize,
        };
        self.emit(
            n,
            name,
            Op::Conv(conv),
            vec![x],
            vec![xs[0], o, out_hw[0], out_hw[1]],
        )
    }

    /// A constant-mode Pad with value 0 over the spatial axes of a 4-D activation: recorded
    /// for the Conv that reads it (see [`Builder::padded`]).
    pub(super) fn pad(&mut self, s: &Site) -> Result<(), Error> {
        let (n, x, xs, a) = (s.n, s.x, s.xs.as_slice(), &s.a);
        let mode = a.string("mode").unwrap_or_else(|| "constant".into());
        if mode != "constant" {
            return bad(format!(
                "Pad mode '{mode}' is not supported (only constant zeros)"
            ));
        }
        let (pads, value) = if self.graph.opset < 11 {
            (a.ints("pads").unwrap_or_default(), a.float("value", 0.0))
        } else {
            if self.input(n, 3)?.is_some() {
                return bad("Pad with an axes input is not supported");
            }
            let pads = self
                .constant(n, 1, "pads")?
                .ok_or_else(|| Error::Input("missing pads".into()))?
                .to_i64();
            let value = match self.constant(n, 2, "constant_value")? {
                Some(t) if t.len() == 1 => t.to_f32()[0],
                Some(t) => return bad(format!("constant_value of shape {:?}", t.shape)),
                None => 0.0,
            };
            (pads, value)
        };
        if xs.len() != 4 || pads.len() != 8 {
            return bad(format!(
                "only a Pad of a 4-D NCHW activation is supported (input {xs:?}, pads {pads:?})"
            ));
        }
        if value != 0.0 || pads.iter().any(|&p| p < 0) || [0, 1, 4, 5].iter().any(|&i| pads[i] != 0)
        {
            return bad(format!(
                "only zero padding of the spatial axes is supported (pads {pads:?}, value {value})"
            ));
        }
        if pads.iter().any(|&p| p > 1 << 15) {
            return bad(format!("pads {pads:?} are too large"));
        }
        self.single_output(n)?;
        let out = n
            .output
            .first()
            .ok_or_else(|| Error::Input("node has no output".into()))?;
        let p = |i: usize| pads[i] as usize;
        self.padded
            .insert(out.clone(), (x, [p(2), p(3), p(6), p(7)]));
        Ok(())
    }

    pub(super) fn batchnorm(&mut self, s: &Site) -> Result<(), Error> {
        let (n, name, x, xs, a) = (s.n, s.name, s.x, s.xs.as_slice(), &s.a);
        self.single_output(n)?;
        if a.int("training_mode", 0) != 0 {
            return bad("training-mode BatchNormalization is not supported");
        }
        if xs.len() < 2 {
            return bad(format!("input must be at least 2-D, got {xs:?}"));
        }
        let c = xs[1];
        let get = |i: usize, what: &str| -> Result<Vec<f32>, Error> {
            let t = self
                .constant(n, i, what)?
                .ok_or_else(|| Error::Input(format!("missing {what}")))?;
            if t.len() != c {
                return bad(format!("{what} has {} values for {c} channels", t.len()));
            }
            Ok(t.to_f32())
        };
        let (scale, bias, mean, var) = (
            get(1, "scale")?,
            get(2, "bias")?,
            get(3, "mean")?,
            get(4, "var")?,
        );
        if let Some(i) = var.iter().position(|&v| v < 0.0) {
            let tname = n.input.get(4).cloned().unwrap_or_default();
            return bad(format!(
                "variance '{tname}' is negative ({}) at channel {i}",
                var[i]
            ));
        }
        let eps = a.float("epsilon", 1e-5);
        if !(eps >= 0.0 && eps.is_finite()) {
            return bad(format!("epsilon {eps} is invalid"));
        }
        let bn = BatchNorm {
            mean,
            var,
            scale,
            bias,
            eps,
        };
        self.emit(n, name, Op::BatchNorm(bn), vec![x], xs.to_vec())
    }
}
