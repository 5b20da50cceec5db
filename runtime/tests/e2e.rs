//! Whole models built with the writer from float weights, run by the integer runtime, compared
//! with an f64 reference: exactly-simulated fake quantization (tight) and plain float (error
//! budget per bit width).

#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

use diffdfq_runtime_testkit as common;

use common::*;
use diffdfq_runtime::format::{Activation, DType, Layer, ModelBuilder};
use diffdfq_runtime::kernels::{ConvGeom, PoolGeom};
use diffdfq_runtime::numerics::{code_max, Fused};
use diffdfq_runtime::{run, Model};

// ------------------------------------------------------------------- a tiny f64 tensor library

#[derive(Clone, Debug)]
struct T {
    d: [usize; 4],
    v: Vec<f64>,
}

impl T {
    fn new(d: [usize; 4]) -> T {
        T {
            d,
            v: vec![0.0; d.iter().product()],
        }
    }
    fn at(&self, n: [usize; 4]) -> f64 {
        // broadcast read
        let mut i = 0;
        for k in 0..4 {
            i = i * self.d[k] + if self.d[k] == 1 { 0 } else { n[k] };
        }
        self.v[i]
    }
    fn map(&self, f: impl Fn(f64) -> f64) -> T {
        T {
            d: self.d,
            v: self.v.iter().map(|&x| f(x)).collect(),
        }
    }
    fn min_max(&self) -> (f64, f64) {
        self.v
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)))
    }
}

fn conv(x: &T, w: &[f64], b: &[f64], g: &ConvGeom, c_out: usize) -> T {
    let [_, c_in, h, wd] = x.d;
    let oh = (h + g.pad_top + g.pad_bottom - g.dilation_h * (g.kernel_h - 1) - 1) / g.stride_h + 1;
    let ow = (wd + g.pad_left + g.pad_right - g.dilation_w * (g.kernel_w - 1) - 1) / g.stride_w + 1;
    let (cin_g, cout_g) = (c_in / g.groups, c_out / g.groups);
    let mut y = T::new([1, c_out, oh, ow]);
    for co in 0..c_out {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut acc = b.get(co).copied().unwrap_or(0.0);
                for ci in 0..cin_g {
                    for ky in 0..g.kernel_h {
                        for kx in 0..g.kernel_w {
                            let iy =
                                (oy * g.stride_h + ky * g.dilation_h) as i64 - g.pad_top as i64;
                            let ix =
                                (ox * g.stride_w + kx * g.dilation_w) as i64 - g.pad_left as i64;
                            if iy < 0 || ix < 0 || iy >= h as i64 || ix >= wd as i64 {
                                continue;
                            }
                            let cin = (co / cout_g) * cin_g + ci;
                            acc += w[((co * cin_g + ci) * g.kernel_h + ky) * g.kernel_w + kx]
                                * x.v[(cin * h + iy as usize) * wd + ix as usize];
                        }
                    }
                }
                y.v[(co * oh + oy) * ow + ox] = acc;
            }
        }
    }
    y
}

fn fc(x: &T, w: &[f64], b: &[f64], n: usize, d: [usize; 4]) -> T {
    let k = x.v.len();
    let mut y = T::new(d);
    for o in 0..n {
        y.v[o] =
            b.get(o).copied().unwrap_or(0.0) + (0..k).map(|i| w[o * k + i] * x.v[i]).sum::<f64>();
    }
    y
}

fn binary(a: &T, b: &T, f: impl Fn(f64, f64) -> f64) -> T {
    let d: [usize; 4] = std::array::from_fn(|i| a.d[i].max(b.d[i]));
    let mut y = T::new(d);
    let mut i = 0;
    for n0 in 0..d[0] {
        for n1 in 0..d[1] {
            for n2 in 0..d[2] {
                for n3 in 0..d[3] {
                    y.v[i] = f(a.at([n0, n1, n2, n3]), b.at([n0, n1, n2, n3]));
                    i += 1;
                }
            }
        }
    }
    y
}

fn pool(x: &T, k: usize, s: usize, max: bool) -> T {
    let [_, c, h, w] = x.d;
    let (oh, ow) = ((h - k) / s + 1, (w - k) / s + 1);
    let mut y = T::new([1, c, oh, ow]);
    for ci in 0..c {
        for oy in 0..oh {
            for ox in 0..ow {
                let vals: Vec<f64> = (0..k * k)
                    .map(|t| x.v[(ci * h + oy * s + t / k) * w + ox * s + t % k])
                    .collect();
                y.v[(ci * oh + oy) * ow + ox] = if max {
                    vals.iter().cloned().fold(f64::MIN, f64::max)
                } else {
                    vals.iter().sum::<f64>() / vals.len() as f64
                };
            }
        }
    }
    y
}

fn gap(x: &T) -> T {
    let [_, c, h, w] = x.d;
    let mut y = T::new([1, c, 1, 1]);
    for ci in 0..c {
        y.v[ci] = x.v[ci * h * w..(ci + 1) * h * w].iter().sum::<f64>() / (h * w) as f64;
    }
    y
}

fn concat1(a: &T, b: &T) -> T {
    let mut y = T::new([1, a.d[1] + b.d[1], a.d[2], a.d[3]]);
    y.v = a.v.iter().chain(b.v.iter()).copied().collect();
    y
}

fn softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().cloned().fold(f64::MIN, f64::max);
    let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

// ------------------------------------------------------------------------------ quantization

/// Asymmetric (scale, zero point) covering [min, max] ∪ {0}.
fn qparams(min: f64, max: f64, bits: u8) -> (f32, u8) {
    let (lo, hi) = (min.min(0.0), max.max(0.0));
    let levels = code_max(bits) as f64;
    let s = ((hi - lo) / levels).max(1e-6);
    let z = (-lo / s).round().clamp(0.0, levels);
    (s as f32, z as u8)
}

struct QLayer {
    codes: Vec<u8>,
    scales: Vec<f32>,
    zps: Vec<u8>,
    bias: Vec<f32>,
}

/// Per-output-channel min/max round-to-nearest at `bits`.
fn quantize_layer(w: &[f64], b: &[f64], c_out: usize, bits: u8) -> QLayer {
    let k = w.len() / c_out;
    let mut q = QLayer {
        codes: vec![],
        scales: vec![],
        zps: vec![],
        bias: b.iter().map(|&v| v as f32).collect(),
    };
    let levels = code_max(bits) as f64;
    for row in w.chunks_exact(k) {
        let (mn, mx) = row
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, c), &x| (a.min(x), c.max(x)));
        let (s, z) = qparams(mn, mx, bits);
        q.codes.extend(
            row.iter()
                .map(|&x| ((x / s as f64).round() + z as f64).clamp(0.0, levels) as u8),
        );
        q.scales.push(s);
        q.zps.push(z);
    }
    q
}

impl QLayer {
    fn layer(&self, bits: u8) -> Layer<'_> {
        Layer {
            bits,
            codes: &self.codes,
            scales: &self.scales,
            zero_points: &self.zps,
            bias: &self.bias,
        }
    }
    /// The bias the integer model really adds: rounded to accumulator units `s_c·s_x`.
    fn bias_q(&self, s_x: f32) -> Vec<f64> {
        self.bias
            .iter()
            .zip(&self.scales)
            .map(|(&b, &s)| {
                let unit = s as f64 * s_x as f64;
                (b as f64 / unit).round() * unit
            })
            .collect()
    }
    /// The dequantized weights the integer model really uses.
    fn dequant(&self) -> Vec<f64> {
        let k = self.codes.len() / self.scales.len();
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &q)| self.scales[i / k] as f64 * (q as f64 - self.zps[i / k] as f64))
            .collect()
    }
}

fn act(bits: u8) -> DType {
    if bits == 8 {
        DType::U8
    } else {
        DType::U4
    }
}

fn quant_codes(x: &T, s: f32, z: u8, bits: u8, lo: u8) -> T {
    let hi = code_max(bits) as f64;
    x.map(|v| (((v as f32 / s) as f64).round() + z as f64).clamp(lo as f64, hi))
}

fn dequant(x: &T, s: f32, z: u8) -> T {
    x.map(|c| s as f64 * (c - z as f64))
}

// ------------------------------------------------------------- model 1: conv→relu→pool→fc→softmax

const G3: ConvGeom = ConvGeom {
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

const P2: PoolGeom = PoolGeom {
    kernel_h: 2,
    kernel_w: 2,
    stride_h: 2,
    stride_w: 2,
    dilation_h: 1,
    dilation_w: 1,
    pad_top: 0,
    pad_left: 0,
    pad_bottom: 0,
    pad_right: 0,
};

struct Net1 {
    cw: Vec<f64>,
    cb: Vec<f64>,
    fw: Vec<f64>,
    fb: Vec<f64>,
}

fn net1(seed: u64) -> Net1 {
    let mut r = Gen::new(seed);
    Net1 {
        cw: (0..8 * 27).map(|_| r.normal() as f64 * 0.3).collect(),
        cb: (0..8).map(|_| r.normal() as f64 * 0.1).collect(),
        fw: (0..10 * 288).map(|_| r.normal() as f64 * 0.08).collect(),
        fb: (0..10).map(|_| r.normal() as f64 * 0.1).collect(),
    }
}

fn input(seed: u64) -> T {
    let mut r = Gen::new(seed);
    T {
        d: [1, 3, 12, 12],
        v: (0..432).map(|_| r.f32(-1.0, 1.0) as f64).collect(),
    }
}

fn forward1(n: &Net1, cw: &[f64], fw: &[f64], x: &T) -> (T, T) {
    let c = conv(x, cw, &n.cb, &G3, 8).map(|v| v.max(0.0));
    let p = pool(&c, 2, 2, true);
    let l = fc(&p, fw, &n.fb, 10, [1, 1, 1, 10]);
    (c, l)
}

struct Q1 {
    blob_logits: Vec<u8>,
    blob_probs: Vec<u8>,
    s: [(f32, u8); 3], // input, conv/pool, logits
    conv: QLayer,
    fc: QLayer,
    weight_bytes: usize,
}

fn build1(n: &Net1, bits: u8, a_bits: u8) -> Q1 {
    // Calibrate activation ranges on a few inputs with the float net.
    let (mut cmax, mut lmin, mut lmax) = (0f64, 0f64, 0f64);
    for s in 0..8 {
        let (c, l) = forward1(n, &n.cw, &n.fw, &input(100 + s));
        cmax = cmax.max(c.min_max().1);
        let (a, b) = l.min_max();
        lmin = lmin.min(a);
        lmax = lmax.max(b);
    }
    let sx = qparams(-1.0, 1.0, a_bits);
    let sc = qparams(0.0, cmax, a_bits);
    let sl = qparams(lmin * 1.2, lmax * 1.2, a_bits);
    let conv_q = quantize_layer(&n.cw, &n.cb, 8, bits);
    let fc_q = quantize_layer(&n.fw, &n.fb, 10, bits);
    let build = |softmax: bool| {
        let mut b = ModelBuilder::new();
        let x = b.tensor(&[1, 3, 12, 12], act(a_bits), sx.0, sx.1);
        let c = b.tensor(&[1, 8, 12, 12], act(a_bits), sc.0, sc.1);
        let p = b.tensor(&[1, 8, 6, 6], act(a_bits), sc.0, sc.1);
        let f = b.tensor(&[1, 288], act(a_bits), sc.0, sc.1);
        let l = b.tensor(&[1, 10], act(a_bits), sl.0, sl.1);
        b.set_input(x);
        b.conv(x, c, &G3, &conv_q.layer(bits), Fused::Relu).unwrap();
        b.max_pool(c, p, &P2, Fused::None).unwrap();
        b.reshape(p, f).unwrap();
        b.fully_connected(f, l, &fc_q.layer(bits), Fused::None)
            .unwrap();
        if softmax {
            let s = b.tensor(&[1, 10], DType::F32, 1.0, 0);
            b.softmax(l, s).unwrap();
            b.set_output(s);
        } else {
            b.set_output(l);
        }
        b.finish().unwrap()
    };
    let weight_bytes = diffdfq_runtime::format::row_bytes(bits, 27).unwrap() * 8
        + diffdfq_runtime::format::row_bytes(bits, 288).unwrap() * 10;
    Q1 {
        blob_logits: build(false),
        blob_probs: build(true),
        s: [sx, sc, sl],
        conv: conv_q,
        fc: fc_q,
        weight_bytes,
    }
}

/// Fake quantization in f64 with the integer model's exact weights and rounding points.
fn fake_quant1(q: &Q1, a_bits: u8, x: &T) -> T {
    let [sx, sc, sl] = q.s;
    let xq = dequant(&quant_codes(x, sx.0, sx.1, a_bits, 0), sx.0, sx.1);
    let c = conv(&xq, &q.conv.dequant(), &q.conv.bias_q(sx.0), &G3, 8);
    let cq = quant_codes(&c.map(|v| v), sc.0, sc.1, a_bits, sc.1); // ReLU = clamp at z
    let p = pool(&dequant(&cq, sc.0, sc.1), 2, 2, true);
    let l = fc(&p, &q.fc.dequant(), &q.fc.bias_q(sc.0), 10, [1, 1, 1, 10]);
    quant_codes(&l, sl.0, sl.1, a_bits, 0)
}

fn run_model(blob: &[u8], x: &T) -> Vec<f32> {
    let m = Model::from_bytes(blob).unwrap();
    let mut arena = Arena::new(m.arena_size());
    let xin: Vec<f32> = x.v.iter().map(|&v| v as f32).collect();
    let mut out = vec![0f32; m.output().numel as usize];
    run(&m, &xin, &mut out, arena.bytes()).unwrap();
    out
}

#[test]
fn conv_relu_pool_fc_softmax_matches_fake_quant_and_float() {
    let n = net1(1);
    // (weight bits, act bits, budget on max |p − p_float|)
    let budgets = [
        (8u8, 8u8, 0.04),
        (4, 8, 0.12),
        (3, 8, 0.25),
        (2, 8, 0.5),
        (8, 4, 0.3),
        (4, 4, 0.35),
    ];
    println!("weights: fp32 {} bytes", (n.cw.len() + n.fw.len()) * 4);
    for (bits, a_bits, budget) in budgets {
        let q = build1(&n, bits, a_bits);
        let sl = q.s[2];
        let (mut exact, mut total, mut worst, mut top1) = (0, 0, 0f64, 0);
        for s in 0..12 {
            let x = input(1000 + s);
            // 1. integer logits vs exactly simulated fake quantization: equal up to the rare
            //    rounding tie moved by bias / multiplier rounding.
            let logits = run_model(&q.blob_logits, &x);
            let want = fake_quant1(&q, a_bits, &x);
            for (g, w) in codes_of(&logits, sl.0, sl.1).iter().zip(&want.v) {
                assert!(
                    (*g as f64 - w).abs() <= 1.0,
                    "bits {bits}/{a_bits}: code {g} vs {w}"
                );
                exact += (*g as f64 == *w) as usize;
                total += 1;
            }
            // 2. softmax output = softmax of the dequantized logits, to f32 resolution.
            let probs = run_model(&q.blob_probs, &x);
            let p_int = softmax(&logits.iter().map(|&v| v as f64).collect::<Vec<_>>());
            for (a, b) in probs.iter().zip(&p_int) {
                assert!((*a as f64 - b).abs() <= 1e-6 * b + 1e-9);
            }
            // 3. against the float network.
            let (_, lf) = forward1(&n, &n.cw, &n.fw, &x);
            let pf = softmax(&lf.v);
            for (a, b) in probs.iter().zip(&pf) {
                worst = worst.max((*a as f64 - b).abs());
            }
            let am = |v: &[f64]| {
                v.iter()
                    .enumerate()
                    .fold(0, |m, (i, &x)| if x > v[m] { i } else { m })
            };
            top1 += (am(&p_int) == am(&pf)) as usize;
            // A clear float winner (margin over the runner-up beyond twice the budget) must win.
            let mut sorted = pf.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if sorted[0] - sorted[1] > 2.0 * budget {
                assert_eq!(am(&p_int), am(&pf), "w{bits}/a{a_bits}: clear winner lost");
            }
        }
        println!(
            "w{bits}/a{a_bits}: weight bytes {} ({:.1}x smaller), logits exact {exact}/{total}, max |dp| {worst:.4}, top-1 {top1}/12",
            q.weight_bytes,
            ((n.cw.len() + n.fw.len()) * 4) as f64 / q.weight_bytes as f64
        );
        assert!(
            exact * 50 >= total * 49,
            "too many off-by-one codes: {exact}/{total}"
        );
        assert!(worst <= budget, "w{bits}/a{a_bits}: {worst} > {budget}");
        if a_bits == 8 && bits == 8 {
            assert_eq!(top1, 12, "top-1 agreement {top1}/12");
        }
    }
}

// ---------------------------------- model 2: depthwise, residual, squeeze-excitation, concat ...

struct Net2 {
    dw: Vec<f64>,
    db: Vec<f64>,
    pw: Vec<f64>,
    pb: Vec<f64>,
    sw: Vec<f64>,
    sb: Vec<f64>,
    fw: Vec<f64>,
    fb: Vec<f64>,
}

const DW: ConvGeom = ConvGeom { groups: 4, ..G3 };
const PW: ConvGeom = ConvGeom {
    kernel_h: 1,
    kernel_w: 1,
    pad_top: 0,
    pad_left: 0,
    pad_bottom: 0,
    pad_right: 0,
    ..G3
};

fn hsig(x: f64) -> f64 {
    (x / 6.0 + 0.5).clamp(0.0, 1.0)
}

fn hswish(x: f64) -> f64 {
    x * (x + 3.0).clamp(0.0, 6.0) / 6.0
}

/// All intermediate tensors of the float net, in build order.
fn forward2(n: &Net2, w: [&[f64]; 4], x: &T) -> Vec<T> {
    let t1 = conv(x, w[0], &n.db, &DW, 4).map(|v| v.clamp(0.0, 6.0)); // depthwise + ReLU6
    let t2 = conv(&t1, w[1], &n.pb, &PW, 4); // pointwise
    let t3 = binary(x, &t2, |a, b| (a + b).max(0.0)); // residual + ReLU
    let g = gap(&t3);
    let e = fc(&g, w[2], &n.sb, 4, [1, 4, 1, 1]);
    let s = e.map(hsig);
    let t4 = binary(&t3, &s, |a, b| a * b); // squeeze-excitation
    let t5 = t4.map(hswish);
    let t6 = concat1(&t5, &t3);
    let t7 = pool(&t6, 2, 2, false);
    let g2 = gap(&t7);
    let l = fc(&g2, w[3], &n.fb, 5, [1, 1, 1, 5]);
    vec![x.clone(), t1, t2, t3, g, e, s, t4, t5, t6, t7, g2, l]
}

#[test]
fn mixed_ops_model_tracks_the_float_network() {
    let mut r = Gen::new(77);
    let mut v =
        |n: usize, s: f32| -> Vec<f64> { (0..n).map(|_| (r.normal() * s) as f64).collect() };
    let n = Net2 {
        dw: v(36, 0.5),
        db: v(4, 0.1),
        pw: v(16, 0.5),
        pb: v(4, 0.1),
        sw: v(16, 0.8),
        sb: v(4, 0.3),
        fw: v(40, 0.6),
        fb: v(5, 0.1),
    };
    let xin = |s: u64| {
        let mut r = Gen::new(s);
        T {
            d: [1, 4, 8, 8],
            v: (0..256).map(|_| r.f32(-2.0, 2.0) as f64).collect(),
        }
    };
    for (bits, a_bits, budget) in [(8u8, 8u8, 0.03), (4, 8, 0.15), (8, 4, 0.25)] {
        // Calibrate each tensor's range on the float net.
        let mut ranges = vec![(0f64, 0f64); 13];
        for s in 0..8 {
            for (rg, t) in
                ranges
                    .iter_mut()
                    .zip(forward2(&n, [&n.dw, &n.pw, &n.sw, &n.fw], &xin(200 + s)))
            {
                let (a, b) = t.min_max();
                *rg = (rg.0.min(a), rg.1.max(b));
            }
        }
        let qp: Vec<(f32, u8)> = ranges
            .iter()
            .map(|&(a, b)| qparams(a * 1.1, b * 1.1, a_bits))
            .collect();
        let layers = [
            quantize_layer(&n.dw, &n.db, 4, bits),
            quantize_layer(&n.pw, &n.pb, 4, bits),
            quantize_layer(&n.sw, &n.sb, 4, bits),
            quantize_layer(&n.fw, &n.fb, 5, bits),
        ];
        let mut b = ModelBuilder::new();
        let shapes: [&[u32]; 13] = [
            &[1, 4, 8, 8],
            &[1, 4, 8, 8],
            &[1, 4, 8, 8],
            &[1, 4, 8, 8],
            &[1, 4, 1, 1],
            &[1, 4, 1, 1],
            &[1, 4, 1, 1],
            &[1, 4, 8, 8],
            &[1, 4, 8, 8],
            &[1, 8, 8, 8],
            &[1, 8, 4, 4],
            &[1, 8, 1, 1],
            &[1, 5],
        ];
        let t: Vec<u16> = shapes
            .iter()
            .zip(&qp)
            .map(|(s, q)| b.tensor(s, act(a_bits), q.0, q.1))
            .collect();
        let g2 = b.tensor(&[1, 8], act(a_bits), qp[11].0, qp[11].1);
        b.set_input(t[0]);
        b.set_output(t[12]);
        b.conv(t[0], t[1], &DW, &layers[0].layer(bits), Fused::Relu6)
            .unwrap();
        b.conv(t[1], t[2], &PW, &layers[1].layer(bits), Fused::None)
            .unwrap();
        b.add(t[0], t[2], t[3], Fused::Relu).unwrap();
        b.global_avg_pool(t[3], t[4], Fused::None).unwrap();
        b.fully_connected(t[4], t[5], &layers[2].layer(bits), Fused::None)
            .unwrap();
        b.activation(
            t[5],
            t[6],
            Activation::HardSigmoid {
                alpha: 1.0 / 6.0,
                beta: 0.5,
            },
        )
        .unwrap();
        b.mul(t[3], t[6], t[7], Fused::None).unwrap();
        b.activation(t[7], t[8], Activation::HardSwish).unwrap();
        b.concat(&[t[8], t[3]], 1, t[9]).unwrap();
        b.avg_pool(t[9], t[10], &P2, false, Fused::None).unwrap();
        b.global_avg_pool(t[10], t[11], Fused::None).unwrap();
        b.reshape(t[11], g2).unwrap();
        b.fully_connected(g2, t[12], &layers[3].layer(bits), Fused::None)
            .unwrap();
        let blob = b.finish().unwrap();
        let (lmin, lmax) = ranges[12];
        let mut worst = 0f64;
        for s in 0..10 {
            let x = xin(3000 + s);
            let got = run_model(&blob, &x);
            let want = forward2(&n, [&n.dw, &n.pw, &n.sw, &n.fw], &x)
                .pop()
                .unwrap();
            for (g, w) in got.iter().zip(&want.v) {
                worst = worst.max((*g as f64 - w).abs() / (lmax - lmin));
            }
        }
        println!(
            "mixed w{bits}/a{a_bits}: max logit error {:.4} of the logit range",
            worst
        );
        assert!(worst <= budget, "w{bits}/a{a_bits}: {worst} > {budget}");
    }
}

/// The same bytes on every target (docs/design.md §6): a digest of the outputs of models at every
/// width, pinned here, so the aarch64 run under qemu must reproduce the x86_64 bits.
#[test]
fn outputs_are_bit_identical_across_targets() {
    let mut crc = !0u32;
    for bits in [2u8, 3, 4, 8] {
        for a_bits in [4u8, 8] {
            let blob = small_model(bits, a_bits, 42);
            for s in 0..3 {
                let mut r = Gen::new(s);
                let x = T {
                    d: [1, 2, 8, 8],
                    v: (0..128).map(|_| r.f32(-4.0, 4.0) as f64).collect(),
                };
                for v in run_model(&blob, &x) {
                    crc = diffdfq_runtime::format::crc32_update(crc, &v.to_bits().to_le_bytes());
                }
            }
        }
    }
    let n = net1(1);
    for bits in [2u8, 3, 4, 8] {
        let q = build1(&n, bits, 8);
        for v in run_model(&q.blob_probs, &input(5)) {
            crc = diffdfq_runtime::format::crc32_update(crc, &v.to_bits().to_le_bytes());
        }
    }
    assert_eq!(!crc, GOLDEN, "outputs changed: {:#010x}", !crc);
}

const GOLDEN: u32 = 0x172c_d416;
