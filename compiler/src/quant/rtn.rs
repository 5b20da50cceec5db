//! `--method rtn`: per-channel min–max round-to-nearest weights, data-free activation ranges
//! ([`super::ranges`]) and data-free bias correction ([`correct_biases`]); `--method lp` the
//! same with each channel's step from the Lp clipping search ([`WeightSteps::Lp`]).

use super::ranges::*;
use super::{Bits, QOp, QuantGraph};
use crate::graph::Graph;
use crate::Error;

/// Options of the rtn method.
#[derive(Debug, Clone)]
pub struct RtnOptions {
    pub bits: Bits,
    /// Seed of the N(0, 1) samples that calibrate layers without BN.
    pub seed: u64,
    /// How many such samples.
    pub samples: usize,
    /// The interval real inputs lie in; `None`: normalized inputs, `±INPUT_RANGE`.
    pub input_range: Option<(f32, f32)>,
    /// Moves each layer's bias against the mean shift its weight rounding causes (see
    /// [`correct_biases`]). Calibration starts from rtn without it: its reconstruction target
    /// is the float network, biases included.
    pub bias_correction: bool,
    /// Weight bits per conv/linear layer, in graph order (`--flash`), replacing `bits.weight`
    /// and `bits.first_last`.
    pub layer_bits: Option<Vec<u8>>,
    /// How each channel's weight step is chosen.
    pub weight_steps: WeightSteps,
    /// Tensors kept at 8 bits when `bits.act` is 4 (see [`super::fold_keeping`]).
    pub act8: Vec<String>,
}

/// How rtn chooses a channel's weight step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightSteps {
    /// The channel's min–max range ([`super::QLayer::quantize_rtn`]).
    #[default]
    MinMax,
    /// The clipping ratio with the least Lp(2.4) rounding error ([`super::QLayer::quantize_lp`]),
    /// where calibration starts from. Neither wins everywhere (README "Real models").
    Lp,
}

impl Default for RtnOptions {
    fn default() -> Self {
        RtnOptions {
            bits: Bits::default(),
            seed: 0,
            samples: 32,
            input_range: None,
            bias_correction: true,
            layer_bits: None,
            weight_steps: WeightSteps::MinMax,
            act8: Vec::new(),
        }
    }
}

/// Folds and quantizes `g` with round-to-nearest weights and data-free activation ranges.
pub fn quantize(g: &Graph, opts: &RtnOptions) -> Result<QuantGraph, Error> {
    let mut q = super::fold_keeping(g, opts.bits, &opts.act8)?;
    if let Some(b) = &opts.layer_bits {
        q.set_layer_bits(b)?;
    }
    for n in &mut q.nodes {
        if let Some(l) = n.op.layer_mut() {
            match opts.weight_steps {
                WeightSteps::MinMax => l.quantize_rtn(),
                WeightSteps::Lp => l.quantize_lp(),
            }
        }
        n.op.round_depthwise_rows_mean_neutral();
    }
    if let Some(r) = opts.input_range {
        q.input_range = r;
    }
    let moments = set_activation_ranges(&mut q, g, opts.seed, opts.samples)?;
    if opts.bias_correction {
        correct_biases_with(&mut q, &moments);
    }
    q.fit_accumulators();
    Ok(q)
}

/// Data-free bias correction (Nagel et al., "Data-Free Quantization", 2019): rounding moves
/// each row's weights by `Δw`, which shifts the layer's mean output by `Σ Δw·E[x]`; with the
/// input means that the BN statistics imply (the moments [`propagate`] follows) the bias
/// takes that shift back. The taps that read zero padding are weighted by how often they read
/// the image. Run on final codes, after rtn or after calibration (whose reconstruction leaves
/// biases at their float values). Layers whose input means are unknown keep their bias.
/// Returns how many layers moved.
pub fn correct_biases(q: &mut QuantGraph) -> Result<usize, Error> {
    // Moments only: a scratch copy takes the ranges this pass would set; the samples of linear
    // chains are drawn as rtn's default seed draws them.
    let seed = RtnOptions::default().seed;
    let (_, moments) = propagate(&mut q.clone(), &vec![None; q.tensors.len()], seed)?;
    Ok(correct_biases_with(q, &moments))
}

/// [`correct_biases`] with every tensor's moments already propagated.
fn correct_biases_with(q: &mut QuantGraph, input_means: &[Option<Moments>]) -> usize {
    let mut moved = 0;
    for i in 0..q.nodes.len() {
        let x0 = q.nodes[i].inputs[0];
        let Some(mi) = input_means[x0].as_ref() else {
            continue;
        };
        let in_shape = q.tensors[x0].shape.clone();
        let out_shape = q.tensors[q.nodes[i].output].shape.clone();
        let op = &q.nodes[i].op;
        let Some(chan) = input_channel(op, mi.mean.len(), &in_shape) else {
            continue;
        };
        let cover = match op {
            QOp::Conv { geom, .. } => match tap_coverage(geom, &in_shape, &out_shape) {
                Some(c) => c,
                None => continue,
            },
            _ => vec![1.0],
        };
        let Some(l) = q.nodes[i].op.layer_mut() else {
            continue;
        };
        if !l.is_quantized() {
            continue;
        }
        let deq = l.dequantized();
        let mut shift = vec![0f64; l.c_out];
        let mut ok = true;
        for (c, s) in shift.iter_mut().enumerate() {
            for j in 0..l.k {
                let Some(&m) = mi.mean.get(chan(c, j)) else {
                    ok = false;
                    break;
                };
                let dw = deq[c * l.k + j] as f64 - l.weight[c * l.k + j] as f64;
                *s += dw * m * cover[j % cover.len()];
            }
        }
        if !ok {
            continue;
        }
        for (b, s) in l.bias.iter_mut().zip(&shift) {
            *b -= *s as f32;
        }
        moved += 1;
    }
    moved
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Activation, BatchNorm, Conv, Node, Op, Tensor as GTensor, Value};
    use crate::quant::qmodel::{Mode, QModel};
    use crate::quant::{ConvGeom, QLayer};
    use candle_core::{Device, Tensor};

    #[test]
    fn rectified_source_recovers_the_gaussian_behind_a_relu() {
        let relu = |x: f64| x.max(0.0);
        for (m, s) in [
            (-2.3, 1.0),
            (-0.5, 2.0),
            (0.0, 0.3),
            (1.0, 1.0),
            (-2.5, 0.5),
        ] {
            let (mean, std) = moments_of(relu, m, s);
            let (m2, s2) = rectified_source(mean, std);
            assert!(
                (m2 - m).abs() < 1e-3 * s && (s2 - s).abs() < 1e-3 * s,
                "{m} {s}: {m2} {s2}"
            );
        }
        // A sparse channel (positive 1 % of the time): its Gaussian's 4σ point, 1.7, lies
        // far beyond the rectified mean + 4σ.
        let (mean, std) = moments_of(relu, -2.3, 1.0);
        assert!(mean + 4.0 * std < 0.3, "{}", mean + 4.0 * std);
        // Almost always positive: the channel is its own Gaussian.
        assert_eq!(rectified_source(5.0, 1.0), (5.0, 1.0));
    }

    #[test]
    fn tap_coverage_counts_the_positions_that_read_the_image() {
        let geom = ConvGeom {
            kernel_h: 3,
            kernel_w: 3,
            stride_h: 1,
            stride_w: 1,
            dilation_h: 1,
            dilation_w: 1,
            pad_top: 1,
            pad_left: 1,
            pad_bottom: 1,
            pad_right: 1,
            groups: 1,
        };
        let c = tap_coverage(&geom, &[1, 1, 4, 4], &[1, 1, 4, 4]).unwrap();
        // Corner taps miss one row and one column of four, the centre reads every position.
        assert_eq!(c[0], 0.75 * 0.75);
        assert_eq!(c[1], 0.75);
        assert_eq!(c[4], 1.0);
        let unpadded = ConvGeom {
            pad_top: 0,
            pad_left: 0,
            pad_bottom: 0,
            pad_right: 0,
            ..geom
        };
        let c = tap_coverage(&unpadded, &[1, 1, 4, 4], &[1, 1, 2, 2]).unwrap();
        assert!(c.iter().all(|&v| v == 1.0));
    }

    /// x → Conv 1×1 (3→8) → BN → ReLU → Conv 3×3 pad 1 (8→4) → BN, with the running
    /// statistics those of N(0, 1) inputs (as training would leave them).
    fn two_convs() -> Graph {
        let mut vals = normal_samples(7, 3 * 8 + 8 * 4 * 9).into_iter();
        let mut take =
            |n: usize, s: f32| -> Vec<f32> { (0..n).map(|_| vals.next().unwrap() * s).collect() };
        let value = |name: &str, c: usize| Value {
            name: name.into(),
            shape: vec![1, c, 6, 6],
        };
        let conv = |w: Vec<f32>, shape: Vec<usize>, pad: usize| {
            Op::Conv(Conv {
                weight: GTensor::f32(shape, w),
                bias: None,
                strides: [1, 1],
                dilations: [1, 1],
                pads: [pad; 4],
                groups: 1,
            })
        };
        let bn = |c: usize| {
            Op::BatchNorm(BatchNorm {
                mean: vec![0.0; c],
                var: vec![1.0; c],
                scale: vec![1.0; c],
                bias: (0..c).map(|i| 0.2 * i as f32).collect(),
                eps: 1e-5,
            })
        };
        let node = |name: &str, op: Op, i: usize| Node {
            name: name.into(),
            op,
            inputs: vec![i],
            output: i + 1,
        };
        let mut g = Graph {
            values: vec![
                value("x", 3),
                value("a", 8),
                value("b", 8),
                value("c", 8),
                value("d", 4),
                value("y", 4),
            ],
            nodes: vec![
                node("conv1", conv(take(24, 0.5), vec![8, 3, 1, 1], 0), 0),
                node("bn1", bn(8), 1),
                node("relu", Op::Act(Activation::Relu), 2),
                node("conv2", conv(take(288, 0.2), vec![4, 8, 3, 3], 1), 3),
                node("bn2", bn(4), 4),
            ],
            inputs: vec![0],
            outputs: vec![5],
            opset: 13,
        };
        // Running statistics: the batch statistics of N(0, 1) inputs.
        let x = noise(1, 512);
        let f = crate::reference::FloatModel::new(&g, &Device::Cpu)
            .unwrap()
            .forward_with_bn(&[x])
            .unwrap();
        for s in f.bn {
            if let Op::BatchNorm(b) = &mut g.nodes[s.node].op {
                b.mean = s.mean.to_vec1().unwrap();
                b.var = s.var.to_vec1().unwrap();
            }
        }
        g
    }

    fn noise(seed: u64, n: usize) -> candle_core::Tensor {
        Tensor::from_vec(normal_samples(seed, n * 108), (n, 3, 6, 6), &Device::Cpu).unwrap()
    }

    /// The float graph's and the QuantGraph's (candle, `mode`) outputs on `x`.
    fn outputs(g: &Graph, q: &QuantGraph, x: &Tensor, mode: Mode) -> (Tensor, Tensor) {
        let yf = crate::reference::FloatModel::new(g, &Device::Cpu)
            .unwrap()
            .forward(std::slice::from_ref(x))
            .unwrap()
            .remove(0);
        let yq = QModel::new(q.clone(), &Device::Cpu)
            .unwrap()
            .forward(x, mode)
            .unwrap();
        (yf, yq)
    }

    /// Largest absolute difference of the two outputs.
    fn max_gap((a, b): (Tensor, Tensor)) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Per-channel mean of the fake-quantized output's error against the float graph's.
    fn mean_error(g: &Graph, q: &QuantGraph) -> f32 {
        let (yf, yq) = outputs(g, q, &noise(2, 512), Mode::Quant);
        let d = (yq - yf)
            .unwrap()
            .mean_keepdim(0)
            .unwrap()
            .mean_keepdim(2)
            .unwrap();
        let d = d.mean_keepdim(3).unwrap().flatten_all().unwrap();
        d.abs().unwrap().mean_all().unwrap().to_scalar().unwrap()
    }

    #[test]
    fn bias_correction_takes_back_the_mean_shift_of_rounding() {
        let g = two_convs();
        let bits = Bits {
            weight: 2,
            act: 8,
            first_last: 2,
        };
        let q = |bias_correction| {
            quantize(
                &g,
                &RtnOptions {
                    bits,
                    bias_correction,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let (plain, corrected) = (q(false), q(true));
        let (e0, e1) = (mean_error(&g, &plain), mean_error(&g, &corrected));
        // Same codes, only the biases moved.
        for (a, b) in plain.nodes.iter().zip(&corrected.nodes) {
            if let (Some(a), Some(b)) = (a.op.layer(), b.op.layer()) {
                assert_eq!(a.codes, b.codes);
            }
        }
        eprintln!("mean output error {e0} → {e1}");
        assert!(e1 < 0.25 * e0, "mean output error {e0} → {e1}");
    }

    /// `--input-range` (a model fed raw pixels): the input's codes cover the interval, and the
    /// moments that set the first layer's range start from it (mean ± 3σ), not from N(0, 1).
    #[test]
    fn the_input_range_sets_the_input_quantizer_and_the_moments() {
        let g = two_convs();
        let with = |input_range| {
            quantize(
                &g,
                &RtnOptions {
                    input_range,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let (plain, raw) = (with(None), with(Some((0.0, 255.0))));
        let (lo, hi) = raw.tensors[raw.input].quant.range();
        assert!(lo.abs() < 1e-3 && (hi - 255.0).abs() < 1e-3, "[{lo}, {hi}]");
        assert_eq!(plain.tensors[plain.input].quant.range().1.round(), 3.0);
        // conv1's output range comes from its BN, but the bias correction reads the input
        // mean: 127.5 instead of 0 moves conv1's bias.
        let b = |q: &QuantGraph| q.nodes[0].op.layer().unwrap().bias.clone();
        assert_ne!(b(&plain), b(&raw));
    }

    /// Dense → ReLU → Dense → ReLU → Dense on N(0, 1) inputs, the first layer's rows nearly
    /// equal: its outputs move together, and the second layer's range must cover what their
    /// correlated sum reaches: mean + 4σ of the joint samples ends at 0.75 of the largest of
    /// 4096 outputs (the sum is skewed), independent terms would end near a quarter of it.
    #[test]
    fn a_dense_chain_keeps_the_correlation_its_shared_input_gives() {
        let mut vals = normal_samples(11, 16 * 24 + 24 * 3 + 6).into_iter();
        let mut take = |n: usize, base: f32, s: f32| -> Vec<f32> {
            (0..n).map(|_| base + s * vals.next().unwrap()).collect()
        };
        let (wa, wb, wc) = (
            take(16 * 24, 0.3, 0.05),
            take(24 * 3, 0.5, 0.05),
            take(6, 0.0, 1.0),
        );
        let v = |name: &str, c: usize| Value {
            name: name.into(),
            shape: vec![1, c],
        };
        let dense = |w: &[f32], k: usize, n: usize| Op::MatMul {
            b: GTensor::f32(vec![k, n], w.to_vec()),
            bias: None,
            trans_a: false,
        };
        let node = |name: &str, op: Op, i: usize| Node {
            name: name.into(),
            op,
            inputs: vec![i],
            output: i + 1,
        };
        let g = Graph {
            values: vec![
                v("x", 16),
                v("a", 24),
                v("ra", 24),
                v("b", 3),
                v("rb", 3),
                v("y", 2),
            ],
            nodes: vec![
                node("dense_a", dense(&wa, 16, 24), 0),
                node("relu_a", Op::Act(Activation::Relu), 1),
                node("dense_b", dense(&wb, 24, 3), 2),
                node("relu_b", Op::Act(Activation::Relu), 3),
                node("dense_c", dense(&wc, 3, 2), 4),
            ],
            inputs: vec![0],
            outputs: vec![5],
            opset: 13,
        };
        let q = quantize(&g, &RtnOptions::default()).unwrap();
        let b = q.nodes.iter().find(|n| n.name.contains("dense_b")).unwrap();
        let hi = q.tensors[b.output].quant.range().1;
        // The largest output of dense_b on 4096 N(0, 1) inputs.
        let x = normal_samples(5, 4096 * 16);
        let mut reach = 0f32;
        for x in x.chunks_exact(16) {
            let ra: Vec<f32> = (0..24)
                .map(|j| (0..16).map(|i| x[i] * wa[i * 24 + j]).sum::<f32>().max(0.0))
                .collect();
            for j in 0..3 {
                reach = reach.max((0..24).map(|i| ra[i] * wb[i * 3 + j]).sum::<f32>());
            }
        }
        assert!(
            hi > 0.6 * reach && hi < 2.0 * reach,
            "range ends at {hi}, outputs reach {reach}"
        );
    }

    /// Conv → BN → ReLU6 → depthwise (MobileNetV2's expansion): the channels of the tensor
    /// between are scaled towards the widest's range and the depthwise rows back, so the
    /// folded float network still equals the graph; a channel is scaled at most 8×, a dead
    /// one not at all, and behind HardSwish nothing moves.
    #[test]
    fn a_depthwise_input_is_equalized_without_changing_the_float_network() {
        let net = |act: Op| {
            let mut vals = normal_samples(9, 200).into_iter();
            let mut take =
                |n: usize| -> Vec<f32> { (0..n).map(|_| vals.next().unwrap()).collect() };
            let v = |name: &str, c: usize| Value {
                name: name.into(),
                shape: vec![1, c, 6, 6],
            };
            let node = |name: &str, op: Op, i: usize| Node {
                name: name.into(),
                op,
                inputs: vec![i],
                output: i + 1,
            };
            let conv = |w: Vec<f32>, shape: Vec<usize>, pads: [usize; 4], groups: usize| {
                Op::Conv(Conv {
                    weight: GTensor::f32(shape, w),
                    bias: None,
                    strides: [1, 1],
                    dilations: [1, 1],
                    pads,
                    groups,
                })
            };
            // Output spreads 1.5, 0.5, 0.1 (a fifteenth of the widest), 0.01 and 1e-6 (dead).
            let bn = Op::BatchNorm(BatchNorm {
                mean: vec![0.0; 5],
                var: vec![2.0; 5],
                scale: vec![1.5, 0.5, 0.1, 0.01, 1e-6],
                bias: vec![0.5, 0.2, 0.05, 0.0, 0.0],
                eps: 0.0,
            });
            Graph {
                values: vec![v("x", 2), v("c", 5), v("n", 5), v("a", 5), v("y", 5)],
                nodes: vec![
                    node("expand", conv(take(10), vec![5, 2, 1, 1], [0; 4], 1), 0),
                    node("bn", bn, 1),
                    node("act", act, 2),
                    node("dw", conv(take(45), vec![5, 1, 3, 3], [1; 4], 5), 3),
                ],
                inputs: vec![0],
                outputs: vec![4],
                opset: 13,
            }
        };
        let opts = RtnOptions {
            bias_correction: false,
            ..Default::default()
        };
        let g = net(Op::Clip { min: 0.0, max: 6.0 });
        let q = quantize(&g, &opts).unwrap();
        let x = Tensor::from_vec(normal_samples(4, 16 * 72), (16, 2, 6, 6), &Device::Cpu).unwrap();
        let d = max_gap(outputs(&g, &q, &x, Mode::Float));
        assert!(d < 1e-4, "equalized float network differs by {d}");
        let gain = q.nodes[0].bn.as_ref().unwrap().gain.clone();
        assert_eq!(gain.len(), 5);
        // Each channel's 8σ end is taken to the widest's 4σ end, 0.5 + 4·1.5 through ReLU6.
        let top = 6.0;
        let expect = [
            1.0,
            top / (0.2 + 8.0 * 0.5),
            top / (0.05 + 8.0 * 0.1),
            8.0,
            1.0,
        ];
        for (c, (&s, e)) in gain.iter().zip(expect).enumerate() {
            assert!(
                (s - e).abs() < 1e-4 * e,
                "channel {c}: gain {s}, expected {e}"
            );
        }
        // The depthwise rows carry the inverse: their product with the producer's is unchanged.
        let (expand, dw) = (
            q.nodes[0].op.layer().unwrap(),
            q.nodes[1].op.layer().unwrap(),
        );
        let Op::Conv(dw0) = &g.nodes[3].op else {
            unreachable!()
        };
        let dw0 = dw0.weight.as_f32().unwrap();
        for c in 0..5 {
            let r = dw.weight[c * 9] / dw0[c * 9];
            assert!(
                (r * gain[c] - 1.0).abs() < 1e-5,
                "channel {c}: row scaled by {r}"
            );
            assert!(expand.bias[c].is_finite());
        }
        // Each depthwise row's codes sum to its weights' within half a step (its rounding moves
        // the mean by at most half a step of its one input channel); some moved a code to get
        // there. The 1×1 expansion, whose rows read two channels, is plain round-to-nearest.
        let resid = |l: &QLayer, c: usize, j: usize| {
            l.weight[c * l.k + j] / l.scales[c] + l.zeros[c] as f32 - l.codes[c * l.k + j] as f32
        };
        let mut beyond_half = 0;
        for c in 0..5 {
            let sum: f32 = (0..9).map(|j| resid(dw, c, j)).sum();
            assert!(sum.abs() <= 0.5 + 1e-4, "depthwise row {c}: {sum}");
            beyond_half += (0..9)
                .filter(|&j| resid(dw, c, j).abs() > 0.5 + 1e-4)
                .count();
        }
        assert!(beyond_half > 0);
        for c in 0..5 {
            for j in 0..2 {
                assert!(resid(expand, c, j).abs() <= 0.5 + 1e-4);
            }
        }
        // HardSwish is not positively homogeneous: nothing is scaled behind it.
        let g = net(Op::Act(Activation::HardSwish));
        let q = quantize(&g, &opts).unwrap();
        assert!(q
            .nodes
            .iter()
            .all(|n| n.bn.as_ref().is_none_or(|b| b.gain.is_empty())));
    }

    /// Keras: Conv → ReLU → BN → MaxPool → Conv → ReLU → BN → Flatten → Dense. Both BNs move
    /// into the layer after them (the pool commutes with an increasing affine), the folded
    /// float network equals the graph, and the BNs' statistics describe the ReLU outputs.
    #[test]
    fn batchnorms_before_a_pool_or_a_flatten_fold_into_the_layer_after_them() {
        use crate::graph::{Pool, PoolKind};
        let keras = |gamma: f32, act: Op| {
            let mut vals = normal_samples(3, 200).into_iter();
            let mut take =
                |n: usize| -> Vec<f32> { (0..n).map(|_| vals.next().unwrap()).collect() };
            let mut conv1_w = take(72);
            conv1_w[54..].fill(0.0);
            let v = |name: &str, shape: &[usize]| Value {
                name: name.into(),
                shape: shape.to_vec(),
            };
            // Channel 3 of conv1 is dead (zero weights): its BN saw variance ≈ 0.
            let bn = |c: usize, gamma: f32| {
                let dead = |i: usize| c == 4 && i == 3;
                Op::BatchNorm(BatchNorm {
                    mean: (0..c)
                        .map(|i| if dead(i) { 0.0 } else { 0.3 + 0.1 * i as f32 })
                        .collect(),
                    var: (0..c)
                        .map(|i| if dead(i) { 1e-11 } else { 0.5 + 0.2 * i as f32 })
                        .collect(),
                    scale: (0..c).map(|i| if i == 1 { gamma } else { 1.2 }).collect(),
                    bias: (0..c).map(|i| 0.1 * i as f32 - 0.2).collect(),
                    eps: 1e-3,
                })
            };
            let conv = |w: Vec<f32>, shape: Vec<usize>| {
                Op::Conv(Conv {
                    weight: GTensor::f32(shape, w),
                    bias: None,
                    strides: [1, 1],
                    dilations: [1, 1],
                    pads: [0; 4],
                    groups: 1,
                })
            };
            let node = |name: &str, op: Op, i: usize| Node {
                name: name.into(),
                op,
                inputs: vec![i],
                output: i + 1,
            };
            let pool = Op::Pool(Pool {
                kind: PoolKind::Max,
                kernel: [2, 2],
                strides: [2, 2],
                dilations: [1, 1],
                pads: [0; 4],
                count_include_pad: false,
            });
            Graph {
                values: vec![
                    v("x", &[1, 2, 6, 6]),
                    v("c1", &[1, 4, 4, 4]),
                    v("r1", &[1, 4, 4, 4]),
                    v("n1", &[1, 4, 4, 4]),
                    v("p", &[1, 4, 2, 2]),
                    v("c2", &[1, 3, 2, 2]),
                    v("r2", &[1, 3, 2, 2]),
                    v("n2", &[1, 3, 2, 2]),
                    v("f", &[1, 12]),
                    v("y", &[1, 5]),
                ],
                nodes: vec![
                    node("conv1", conv(conv1_w.clone(), vec![4, 2, 3, 3]), 0),
                    node("relu1", act, 1),
                    node("bn1", bn(4, gamma), 2),
                    node("pool", pool, 3),
                    node("conv2", conv(take(12), vec![3, 4, 1, 1]), 4),
                    node("relu2", Op::Act(Activation::Relu), 5),
                    node("bn2", bn(3, 0.9), 6),
                    node("flatten", Op::Reshape, 7),
                    node(
                        "dense",
                        Op::MatMul {
                            b: GTensor::f32(vec![12, 5], take(60)),
                            bias: Some(GTensor::f32(vec![5], take(5))),
                            trans_a: false,
                        },
                        8,
                    ),
                ],
                inputs: vec![0],
                outputs: vec![9],
                opset: 13,
            }
        };
        let g = keras(0.7, Op::Act(Activation::Relu));
        // Without bias correction the layers' biases are the folded float ones.
        let opts = RtnOptions {
            bias_correction: false,
            ..Default::default()
        };
        let q = quantize(&g, &opts).unwrap();
        assert!(!q.nodes.iter().any(|n| n.name.starts_with("bn")));
        let x = Tensor::from_vec(normal_samples(5, 16 * 72), (16, 2, 6, 6), &Device::Cpu).unwrap();
        let d = max_gap(outputs(&g, &q, &x, Mode::Float));
        assert!(d < 1e-4, "folded float network differs by {d}");
        // BN1's scale went back into conv1 (ReLU commutes with a positive scale): conv2's
        // weights keep their scale although the dead channel's γ/√ε ≈ 38.
        let layer = |q: &QuantGraph, name: &str| {
            let n = q.nodes.iter().find(|n| n.name == name).unwrap();
            n.op.layer().unwrap().clone()
        };
        assert!(layer(&q, "conv2").weight.iter().all(|w| w.abs() < 10.0));
        // Behind a ReLU6 the scale cannot go back (it would move the clamp): the dead channel
        // becomes its constant instead of scaling conv2's weights by 38.
        let relu6 = keras(0.7, Op::Clip { min: 0.0, max: 6.0 });
        let q6 = quantize(&relu6, &opts).unwrap();
        let conv2 = layer(&q6, "conv2");
        assert!(conv2.weight.chunks(4).all(|row| row[3] == 0.0));
        assert!(conv2.weight.iter().all(|w| w.abs() < 10.0));
        let d6 = max_gap(outputs(&relu6, &q6, &x, Mode::Float));
        assert!(d6 < 1e-4, "folded ReLU6 network differs by {d6}");
        // A negative scale does not commute with the pool: a named error, not a wrong fold.
        let e = quantize(&keras(-0.7, Op::Act(Activation::Relu)), &opts).unwrap_err();
        assert!(e.to_string().contains("bn1"), "{e}");
    }
}
