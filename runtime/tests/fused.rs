//! A Conv with an activation table (the format's *Conv with an activation table*) against the
//! same Conv writing a stored tensor and a Lut reading it: random geometries, pre-activation
//! quantizations of 8 and 4 bits, 8- and 4-bit outputs (the latter run in row bands), fused
//! clamps; the outputs must be equal bit for bit, and the fused blob's arena smaller. Then the
//! loader's checks on the table.

use diffdfq_runtime::format::{seal, Activation, DType, Layer, ModelBuilder};
use diffdfq_runtime::geom::window_out_len;
use diffdfq_runtime::kernels::ConvGeom;
use diffdfq_runtime::numerics::Fused;
use diffdfq_runtime::{run, Error, Model};
use diffdfq_runtime_testkit::{op_params, pool_at, Arena, Gen};

struct Case {
    c0: usize,
    h: usize,
    w: usize,
    geom: ConvGeom,
    oh: usize,
    ow: usize,
    c1: usize,
    bits: u8,
    codes: Vec<u8>,
    scales: Vec<f32>,
    zeros: Vec<u8>,
    bias: Vec<f32>,
    pre: (f32, u8, u8),
    out: (DType, f32, u8),
    fused: Fused,
    act: Activation,
}

fn case(seed: u64) -> Case {
    let mut r = Gen::new(seed);
    let (h, w) = (r.range(3, 14) as usize, r.range(3, 14) as usize);
    let c0 = r.range(1, 4) as usize;
    let k = r.range(1, 3) as usize;
    let depthwise = r.range(0, 2) == 1;
    let c1 = if depthwise {
        c0
    } else {
        r.range(1, 10) as usize
    };
    let geom = ConvGeom {
        kernel_h: k,
        kernel_w: k,
        stride_h: r.range(1, 2) as usize,
        stride_w: 1,
        dilation_h: 1,
        dilation_w: 1,
        pad_top: r.range(0, k as i64 - 1) as usize,
        pad_left: 0,
        pad_bottom: r.range(0, k as i64 - 1) as usize,
        pad_right: 0,
        groups: if depthwise { c0 } else { 1 },
    };
    let oh = window_out_len(h, k, geom.stride_h, 1, geom.pad_top, geom.pad_bottom).unwrap();
    let ow = window_out_len(w, k, 1, 1, 0, 0).unwrap();
    let bits = [2, 3, 4, 8][r.range(0, 3) as usize];
    let kk = c0 / geom.groups * k * k;
    let pre_bits = if r.range(0, 3) == 0 { 4 } else { 8 };
    let pre_max = if pre_bits == 4 { 15 } else { 255 };
    let out_dt = if r.range(0, 1) == 1 {
        DType::U4
    } else {
        DType::U8
    };
    let out_max = if out_dt == DType::U4 { 15 } else { 255 };
    let act = match r.range(0, 2) {
        0 => Activation::HardSwish,
        1 => Activation::Sigmoid,
        _ => Activation::HardSigmoid {
            alpha: 0.2,
            beta: 0.5,
        },
    };
    let fused = [Fused::None, Fused::Relu, Fused::Relu6][r.range(0, 2) as usize];
    Case {
        c0,
        h,
        w,
        geom,
        oh,
        ow,
        c1,
        bits,
        codes: r.codes(c1 * kk, bits),
        scales: (0..c1).map(|_| r.f32(0.02, 0.08)).collect(),
        zeros: (0..c1).map(|_| r.code(bits)).collect(),
        bias: (0..c1).map(|_| r.f32(-0.3, 0.3)).collect(),
        pre: (
            r.f32(0.01, 0.05) * 255.0 / pre_max as f32,
            r.range(0, pre_max / 2) as u8,
            pre_bits,
        ),
        out: (
            out_dt,
            r.f32(0.005, 0.02) * 255.0 / out_max as f32,
            r.range(0, out_max / 4) as u8,
        ),
        fused,
        act,
    }
}

fn layer(c: &Case) -> Layer<'_> {
    Layer {
        bits: c.bits,
        codes: &c.codes,
        scales: &c.scales,
        zero_points: &c.zeros,
        bias: &c.bias,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum How {
    /// The Conv with the table.
    Fused,
    /// The Conv's codes stored, a Lut after it.
    Apart,
    /// The Conv alone, into 8-bit codes.
    Lone,
}

/// The case as one blob.
fn blob(c: &Case, how: How) -> Vec<u8> {
    let mut b = ModelBuilder::new();
    let x = b.tensor(
        &[1, c.c0 as u32, c.h as u32, c.w as u32],
        DType::U8,
        0.04,
        128,
    );
    let shape = [1, c.c1 as u32, c.oh as u32, c.ow as u32];
    let layer = layer(c);
    let y = match how {
        How::Fused => {
            let y = b.tensor(&shape, c.out.0, c.out.1, c.out.2);
            b.conv_act(x, y, &c.geom, &layer, c.fused, c.pre, c.act)
                .unwrap();
            y
        }
        How::Apart => {
            let dt = if c.pre.2 == 4 { DType::U4 } else { DType::U8 };
            let p = b.tensor(&shape, dt, c.pre.0, c.pre.1);
            b.conv(x, p, &c.geom, &layer, c.fused).unwrap();
            let y = b.tensor(&shape, c.out.0, c.out.1, c.out.2);
            b.activation(p, y, c.act).unwrap();
            y
        }
        How::Lone => {
            let y = b.tensor(&shape, DType::U8, 0.02, 0);
            b.conv(x, y, &c.geom, &layer, Fused::None).unwrap();
            y
        }
    };
    b.set_input(x);
    b.set_output(y);
    b.finish().unwrap()
}

fn outputs(blob: &[u8], input: &[f32]) -> (Vec<f32>, usize) {
    let m = Model::from_bytes(blob).unwrap();
    let mut arena = Arena::new(m.arena_size());
    let mut out = vec![0f32; m.output().numel as usize];
    run(&m, input, &mut out, arena.bytes()).unwrap();
    (out, m.arena_size())
}

#[test]
fn a_fused_table_equals_the_conv_then_its_table() {
    let mut distinct = 0;
    for seed in 0..60 {
        let c = case(seed);
        let mut r = Gen::new(1000 + seed);
        let input: Vec<f32> = (0..c.c0 * c.h * c.w).map(|_| r.normal() * 2.0).collect();
        let (fused, fused_arena) = outputs(&blob(&c, How::Fused), &input);
        let (apart, apart_arena) = outputs(&blob(&c, How::Apart), &input);
        assert_eq!(fused, apart, "seed {seed}");
        assert!(fused_arena < apart_arena, "seed {seed}");
        let mut v = fused.clone();
        v.sort_by(f32::total_cmp);
        v.dedup();
        distinct += (v.len() > 2) as usize;
    }
    // The outputs are not all clamped to one or two codes.
    assert!(distinct >= 50, "{distinct}");
}

#[test]
fn the_loader_checks_the_table() {
    let c = Case {
        out: (DType::U4, 0.02, 0),
        ..case(3)
    };
    let good = blob(&c, How::Fused);
    Model::from_bytes(&good).unwrap();
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        seal(&mut b);
        Model::from_bytes(&b).map(|_| ())
    };
    let p = op_params(&good, 0);
    // Unknown flags, a zero point without a table, the reserved byte.
    assert_eq!(edit(&|b| b[p + 25] = 2), Err(Error::BadOp { op: 0 }));
    assert_eq!(
        edit(&|b| {
            b[p + 25] = 0;
            b[p + 26] = 1
        }),
        Err(Error::BadOp { op: 0 })
    );
    assert_eq!(edit(&|b| b[p + 27] = 1), Err(Error::BadOp { op: 0 }));
    // A table entry beyond the 4-bit output's codes.
    let chans = u32::from_le_bytes(good[p + 36..p + 40].try_into().unwrap()) as usize;
    let table = pool_at(&good) + chans + 24 * c.c1;
    assert_eq!(edit(&|b| b[table + 7] = 16), Err(Error::BadQuant { op: 0 }));
    // The table must lie inside the pool: a lone Conv's channel records end it, so setting
    // the flag on it points the table past the end.
    let mut lone = blob(&c, How::Lone);
    Model::from_bytes(&lone).unwrap();
    let at = op_params(&lone, 0) + 25;
    lone[at] = 1;
    seal(&mut lone);
    assert_eq!(
        Model::from_bytes(&lone).map(|_| ()),
        Err(Error::WeightSize { op: 0 })
    );
}
