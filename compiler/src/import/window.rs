//! Window math of convs and pools (strides, dilations, pads, auto_pad, ceil_mode) and the
//! output shape of a matrix product.

use super::builder::bad;
use super::proto::Attrs;
use crate::Error;

/// Strides, dilations, resolved pads (top, left, bottom, right) and output size of a conv
/// or pool window.
pub(super) type Window = ([usize; 2], [usize; 2], [usize; 4], [usize; 2]);

pub(super) fn spatial(
    a: &Attrs,
    hw: &[usize],
    kernel: [usize; 2],
    ceil: bool,
) -> Result<Window, Error> {
    let two = |name: &str| -> Result<[usize; 2], Error> {
        match a.ints(name) {
            None => Ok([1, 1]),
            Some(v) if v.len() == 2 && v.iter().all(|&x| x >= 1) => {
                Ok([v[0] as usize, v[1] as usize])
            }
            Some(v) => bad(format!("{name} {v:?} must hold two positive values")),
        }
    };
    let (strides, dilations) = (two("strides")?, two("dilations")?);
    // The device format holds window geometry in u16 fields; beyond them a model is malformed.
    let limit = u16::MAX as usize;
    if kernel.iter().any(|&k| k == 0 || k > limit)
        || strides.iter().chain(&dilations).any(|&v| v > limit)
    {
        return bad(format!(
            "kernel {kernel:?}, strides {strides:?} and dilations {dilations:?} must lie in 1..={limit}"
        ));
    }
    if let Some(p) = a.ints("pads") {
        if p.iter().any(|&v| v > limit as i64) {
            return bad(format!(
                "pads {p:?} exceed {limit}, the device format's limit"
            ));
        }
    }
    let auto_pad = a.string("auto_pad").unwrap_or_else(|| "NOTSET".into());
    let mut pads = [0usize; 4];
    let mut out = [0usize; 2];
    for i in 0..2 {
        let extent = dilations[i] * (kernel[i] - 1) + 1;
        match auto_pad.as_str() {
            "NOTSET" => {
                if let Some(p) = a.ints("pads") {
                    if p.len() != 4 || p.iter().any(|&v| v < 0) {
                        return bad(format!("pads {p:?} must hold four non-negative values"));
                    }
                    pads[i] = p[i] as usize;
                    pads[i + 2] = p[i + 2] as usize;
                }
                let span = hw[i] + pads[i] + pads[i + 2];
                if span < extent {
                    return bad(format!(
                        "window of extent {extent} does not fit the padded input {span}"
                    ));
                }
                out[i] = if ceil {
                    (span - extent).div_ceil(strides[i]) + 1
                } else {
                    (span - extent) / strides[i] + 1
                };
                // A window that would start inside the right padding is dropped (ceil mode).
                if ceil && (out[i] - 1) * strides[i] >= hw[i] + pads[i] {
                    out[i] -= 1;
                }
            }
            "VALID" => {
                if hw[i] < extent {
                    return bad(format!(
                        "window of extent {extent} does not fit the input {}",
                        hw[i]
                    ));
                }
                out[i] = if ceil {
                    (hw[i] - extent).div_ceil(strides[i]) + 1
                } else {
                    (hw[i] - extent) / strides[i] + 1
                };
            }
            "SAME_UPPER" | "SAME_LOWER" => {
                out[i] = hw[i].div_ceil(strides[i]);
                let total = ((out[i] - 1) * strides[i] + extent).saturating_sub(hw[i]);
                let (small, big) = (total / 2, total - total / 2);
                if auto_pad == "SAME_UPPER" {
                    (pads[i], pads[i + 2]) = (small, big);
                } else {
                    (pads[i], pads[i + 2]) = (big, small);
                }
            }
            other => return bad(format!("auto_pad '{other}' is not valid")),
        }
    }
    Ok((strides, dilations, pads, out))
}

/// Output shape of `A·B` (numpy matmul with batch broadcasting).
pub(super) fn matmul_shape(a: &[usize], b: &[usize], trans_a: bool) -> Result<Vec<usize>, Error> {
    if a.len() < 2 || b.len() < 2 {
        return bad(format!(
            "MatMul operands must be at least 2-D, got {a:?} and {b:?}"
        ));
    }
    let (m, k) = if trans_a {
        (a[a.len() - 1], a[a.len() - 2])
    } else {
        (a[a.len() - 2], a[a.len() - 1])
    };
    if k != b[b.len() - 2] {
        return bad(format!("shapes {a:?} and {b:?} do not multiply"));
    }
    let mut out = crate::graph::broadcast_shape(&a[..a.len() - 2], &b[..b.len() - 2])
        .ok_or_else(|| Error::Input(format!("batch axes of {a:?} and {b:?} do not broadcast")))?;
    out.extend([m, b[b.len() - 1]]);
    Ok(out)
}
