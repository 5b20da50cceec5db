//! 4-bit tensors held two codes per byte: random models mixing 4- and 8-bit tensors over every
//! op that runs in row bands (convolutions with strides, dilations and uneven pads, depthwise,
//! 1×1 (with a fused activation table or without), pools in ceil mode with `count_include_pad`, broadcast Add and Mul, LUT, Concat) and
//! the ones that run whole (global pool, fully connected), run by the executor with the least
//! scratch region (bands of one row where the tensors do not fit), with more, and with room
//! for whole tensors — each compared bit for bit with the same kernels run op by op on
//! unpacked buffers of one code per byte.

use diffdfq_runtime::exec::eval_op;
use diffdfq_runtime::format::bands::{pack4, unpack4};
use diffdfq_runtime::format::{Activation, DType, Layer, ModelBuilder, TensorInfo};
use diffdfq_runtime::geom::window_out_len;
use diffdfq_runtime::kernels::{self, ConvGeom, PoolGeom, QIn};
use diffdfq_runtime::numerics::Fused;
use diffdfq_runtime::{run, Model};
use diffdfq_runtime_testkit::{Arena, Gen};

/// `Gen::range` with an exclusive upper end.
trait Below {
    fn below(&mut self, lo: i64, hi: i64) -> i64;
}

impl Below for Gen {
    fn below(&mut self, lo: i64, hi: i64) -> i64 {
        self.range(lo, hi - 1)
    }
}

/// Runs `blob` op by op through [`eval_op`] on unpacked buffers (one code per byte).
fn reference(blob: &[u8], input: &[f32]) -> Vec<f32> {
    let m = Model::from_bytes(blob).unwrap();
    let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); m.n_tensors() as usize];
    let inp = *m.input();
    let mut x = vec![0u8; inp.numel as usize];
    kernels::quantize(input, inp.scale, inp.zero_point, inp.dtype.bits(), &mut x).unwrap();
    bufs[m.header().input as usize] = x;
    let out = *m.output();
    let mut output = vec![0f32; out.numel as usize];
    let mut scratch = vec![0u8; 1 << 20];
    for rec in m.ops() {
        let rec = rec.unwrap();
        let op = m.decode(&rec).unwrap();
        let y = m.tensor(rec.output).unwrap();
        let x0 = m.tensor(rec.inputs.get(0).unwrap()).unwrap();
        let mut codes = vec![
            0u8;
            if y.dtype.is_code() {
                y.numel as usize
            } else {
                0
            }
        ];
        let input = |i: usize| {
            let id = rec.inputs.get(i).unwrap();
            let t = m.tensor(id).unwrap();
            let q = QIn {
                data: &bufs[id as usize][..],
                dims: t.dims4(),
                zero: t.zero_point,
            };
            Ok((q, t.scale))
        };
        eval_op(
            &op,
            rec.inputs.len(),
            !x0.dtype.is_code(),
            input,
            &y,
            &mut codes,
            &mut scratch,
            &mut output,
        )
        .unwrap();
        bufs[rec.output as usize] = codes;
    }
    if out.dtype.is_code() {
        let y = &bufs[m.header().output as usize];
        kernels::dequantize(y, out.scale, out.zero_point, &mut output).unwrap();
    }
    output
}

fn run_blob(blob: &[u8], input: &[f32]) -> Vec<f32> {
    let m = Model::from_bytes(blob).unwrap();
    let mut arena = Arena::new(m.arena_size());
    let mut out = vec![0f32; m.output().numel as usize];
    run(&m, input, &mut out, arena.bytes()).unwrap();
    out
}

/// `blob` rebuilt with a scratch region of `size` bytes.
fn with_scratch(b: &mut ModelBuilder, blob: &[u8], size: usize) -> Vec<u8> {
    let h = *Model::from_bytes(blob).unwrap().header();
    b.set_arena(
        h.scratch_offset + size as u32,
        h.scratch_offset,
        size as u32,
    );
    b.finish().unwrap()
}

fn layer<'w>(
    rng: &mut Gen,
    bits: u8,
    c_out: usize,
    k: usize,
    store: &'w mut (Vec<u8>, Vec<f32>, Vec<u8>, Vec<f32>),
) -> Layer<'w> {
    store.0 = rng.codes(c_out * k, bits);
    store.1 = (0..c_out).map(|_| rng.f32(0.02, 0.08)).collect();
    store.2 = (0..c_out).map(|_| rng.code(bits)).collect();
    store.3 = (0..c_out).map(|_| rng.f32(-0.2, 0.2)).collect();
    Layer {
        bits,
        codes: &store.0,
        scales: &store.1,
        zero_points: &store.2,
        bias: &store.3,
    }
}

/// A random model over the banded ops; returns its builder and input length.
fn random_model(seed: u64) -> (ModelBuilder, usize) {
    let mut rng = Gen::new(seed);
    let mut b = ModelBuilder::new();
    let dt = |rng: &mut Gen| {
        if rng.below(0, 3) == 0 {
            DType::U8
        } else {
            DType::U4
        }
    };
    let meta = std::cell::RefCell::new(Vec::new());
    let tensor = |b: &mut ModelBuilder, rng: &mut Gen, shape: [usize; 4]| {
        let d = dt(rng);
        let zmax = if d == DType::U4 { 15 } else { 255 };
        let z = rng.below(0, zmax / 3) as u8;
        let scale = rng.f32(0.03, 0.1);
        let s: Vec<u32> = shape.iter().map(|&v| v as u32).collect();
        let id = b.tensor(&s, d, scale, z);
        let mut m = meta.borrow_mut();
        m.resize(id as usize + 1, (DType::U8, 1.0, 0));
        m[id as usize] = (d, scale, z);
        (id, shape)
    };
    let info_of = |id: u16| meta.borrow()[id as usize];
    let (h, w) = (rng.below(5, 21) as usize, rng.below(5, 21) as usize);
    let c0 = rng.below(1, 4) as usize;
    let (x, _) = tensor(&mut b, &mut rng, [1, c0, h, w]);
    b.set_input(x);
    let mut store = Default::default();

    // A general convolution: stride 1 or 2, dilation 1 or 2, uneven pads.
    let (kh, kw) = (rng.below(1, 4) as usize, rng.below(1, 4) as usize);
    let g = ConvGeom {
        kernel_h: kh,
        kernel_w: kw,
        stride_h: rng.below(1, 3) as usize,
        stride_w: rng.below(1, 3) as usize,
        dilation_h: rng.below(1, 3) as usize,
        dilation_w: 1,
        pad_top: rng.below(0, kh as i64) as usize,
        pad_left: rng.below(0, kw as i64) as usize,
        pad_bottom: rng.below(0, kh as i64) as usize,
        pad_right: rng.below(0, kw as i64) as usize,
        groups: 1,
    };
    let oh = window_out_len(h, kh, g.stride_h, g.dilation_h, g.pad_top, g.pad_bottom).unwrap();
    let ow = window_out_len(w, kw, g.stride_w, 1, g.pad_left, g.pad_right).unwrap();
    let c1 = rng.below(2, 9) as usize * 2;
    let (t1, _) = tensor(&mut b, &mut rng, [1, c1, oh, ow]);
    let bits = [2, 3, 4, 8][rng.below(0, 4) as usize];
    let l = layer(&mut rng, bits, c1, c0 * kh * kw, &mut store);
    b.conv(x, t1, &g, &l, Fused::Relu).unwrap();

    // Depthwise 3×3, pad 1.
    let dw = ConvGeom {
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
        groups: c1,
    };
    let (t2, _) = tensor(&mut b, &mut rng, [1, c1, oh, ow]);
    let l = layer(&mut rng, 4, c1, 9, &mut store);
    b.conv(t1, t2, &dw, &l, Fused::Relu6).unwrap();

    // Two 1×1 convolutions added, one of them broadcast along rows when it is one row tall.
    let pw = ConvGeom {
        kernel_h: 1,
        kernel_w: 1,
        pad_top: 0,
        pad_left: 0,
        pad_bottom: 0,
        pad_right: 0,
        groups: 1,
        ..dw
    };
    let c3 = rng.below(1, 6) as usize * 4;
    let (t3, _) = tensor(&mut b, &mut rng, [1, c3, oh, ow]);
    let l = layer(&mut rng, 3, c3, c1, &mut store);
    // Half the models with a fused activation table (its own stream: the rest of the model
    // stays as it was drawn before tables existed).
    let mut fr = Gen::new(seed ^ 0x7AB1E);
    if fr.below(0, 2) == 1 {
        let pre = (fr.f32(0.01, 0.05), fr.below(0, 128) as u8, 8);
        b.conv_act(t2, t3, &pw, &l, Fused::None, pre, Activation::HardSwish)
            .unwrap();
    } else {
        b.conv(t2, t3, &pw, &l, Fused::None).unwrap();
    }
    let (t3b, _) = tensor(&mut b, &mut rng, [1, c3, oh, ow]);
    let l = layer(&mut rng, 8, c3, c1, &mut store);
    b.conv(t2, t3b, &pw, &l, Fused::None).unwrap();
    let (t4, _) = tensor(&mut b, &mut rng, [1, c3, oh, ow]);
    b.add(t3, t3b, t4, Fused::None).unwrap();

    // Squeeze-and-excite: global pool, then a broadcast Mul.
    let (gp, _) = tensor(&mut b, &mut rng, [1, c3, 1, 1]);
    b.global_avg_pool(t4, gp, Fused::None).unwrap();
    let (gs, _) = tensor(&mut b, &mut rng, [1, c3, 1, 1]);
    b.activation(
        gp,
        gs,
        Activation::HardSigmoid {
            alpha: 0.2,
            beta: 0.5,
        },
    )
    .unwrap();
    let (t5, _) = tensor(&mut b, &mut rng, [1, c3, oh, ow]);
    b.mul(t4, gs, t5, Fused::None).unwrap();
    let (t6, _) = tensor(&mut b, &mut rng, [1, c3, oh, ow]);
    b.activation(t5, t6, Activation::HardSwish).unwrap();

    // A pool, in ceil mode where that adds a window.
    let (pk, ps) = (rng.below(1, 4) as usize, rng.below(1, 3) as usize);
    let pg = PoolGeom {
        kernel_h: pk,
        kernel_w: pk,
        stride_h: ps,
        stride_w: ps,
        dilation_h: 1,
        dilation_w: 1,
        pad_top: rng.below(0, pk as i64) as usize,
        pad_left: 0,
        pad_bottom: rng.below(0, pk as i64) as usize,
        pad_right: 0,
    };
    let floor = |n: usize, p0: usize, p1: usize| window_out_len(n, pk, ps, 1, p0, p1).unwrap();
    let mut ph = floor(oh, pg.pad_top, pg.pad_bottom);
    let pw_ = floor(ow, 0, 0);
    let ceil_h = ph + 1;
    let avg = rng.below(0, 2) == 1;
    if rng.below(0, 2) == 1 && pg.check([1, c3, oh, ow], [1, c3, ceil_h, pw_]) {
        ph = ceil_h;
    }
    let (t7, _) = if avg {
        tensor(&mut b, &mut rng, [1, c3, ph, pw_])
    } else {
        // A MaxPool keeps its input's quantization.
        let (d, scale, z) = info_of(t6);
        let id = b.tensor(&[1, c3 as u32, ph as u32, pw_ as u32], d, scale, z);
        (id, [1, c3, ph, pw_])
    };
    if avg {
        b.avg_pool(t6, t7, &pg, true, Fused::None).unwrap();
    } else {
        b.max_pool(t6, t7, &pg, Fused::None).unwrap();
    }

    // Concat along channels with a second view of the pool output.
    let (t7b, _) = tensor(&mut b, &mut rng, [1, c3, ph, pw_]);
    b.activation(t7, t7b, Activation::Relu).unwrap();
    let (t8, _) = tensor(&mut b, &mut rng, [1, 2 * c3, ph, pw_]);
    b.concat(&[t7, t7b], 1, t8).unwrap();

    // Head: global pool, flatten, fully connected to f32 logits.
    let (g8, _) = tensor(&mut b, &mut rng, [1, 2 * c3, 1, 1]);
    b.global_avg_pool(t8, g8, Fused::None).unwrap();
    let (d, scale, z) = info_of(g8);
    let f = b.tensor(&[1, 2 * c3 as u32], d, scale, z);
    b.reshape(g8, f).unwrap();
    let logits = b.tensor(&[1, 10], DType::F32, 1.0, 0);
    let l = layer(&mut rng, 4, 10, 2 * c3, &mut store);
    b.fully_connected(f, logits, &l, Fused::None).unwrap();
    b.set_output(logits);
    (b, c0 * h * w)
}

fn info_dtype(blob: &[u8]) -> (usize, usize) {
    let m = Model::from_bytes(blob).unwrap();
    let mut n4 = 0;
    for id in 0..m.n_tensors() {
        let t: TensorInfo = m.tensor(id).unwrap();
        n4 += (t.dtype == DType::U4) as usize;
    }
    (n4, m.scratch_span().1)
}

#[test]
fn banded_runs_equal_the_unpacked_kernels() {
    let mut banded = 0;
    for seed in 0..60u64 {
        let (mut b, n_in) = random_model(seed);
        let least = b.finish().unwrap();
        let mut rng = Gen::new(seed ^ 0xBA4D);
        let input: Vec<f32> = (0..n_in).map(|_| rng.f32(-2.0, 2.0)).collect();
        let want = reference(&least, &input);
        let (n4, s) = info_dtype(&least);
        assert!(n4 > 0, "seed {seed}: no 4-bit tensor");
        let got = run_blob(&least, &input);
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "seed {seed}: least scratch ({s} bytes)"
        );
        for size in [s + 1 + rng.below(0, 200) as usize, s * 3, 1 << 16] {
            let blob = with_scratch(&mut b, &least, size);
            let got = run_blob(&blob, &input);
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "seed {seed}: scratch {size}"
            );
        }
        // The least region is smaller than whole tensors need: some op ran in bands.
        banded += (s < 1 << 16) as usize;
        // One byte less and some op cannot run: the loader says so.
        let mut short = b.clone();
        let h = *Model::from_bytes(&least).unwrap().header();
        short.set_arena(
            h.scratch_offset + s as u32 - 1,
            h.scratch_offset,
            s as u32 - 1,
        );
        assert!(
            matches!(
                short.finish(),
                Err(diffdfq_runtime::Error::ScratchTooSmall { .. })
            ),
            "seed {seed}"
        );
    }
    assert!(banded > 30);
}

#[test]
fn four_bit_tensors_take_half_the_bytes() {
    let mut b = ModelBuilder::new();
    let x = b.tensor(&[1, 1, 3, 5], DType::U4, 0.1, 0);
    let y = b.tensor(&[1, 1, 3, 5], DType::U4, 0.1, 0);
    b.set_input(x);
    b.set_output(y);
    b.activation(x, y, Activation::Relu).unwrap();
    let m_blob = b.finish().unwrap();
    let m = Model::from_bytes(&m_blob).unwrap();
    assert_eq!(m.tensor(0).unwrap().arena_len(), 8);
    // 15 codes → 8 bytes each, 16-aligned, then the staging of one row in and out.
    assert_eq!(m.scratch_span(), (32, 10));
}

#[test]
fn nibbles_round_trip_at_any_offset() {
    let mut rng = Gen::new(7);
    for _ in 0..500 {
        let len = rng.below(0, 40) as usize;
        let first = rng.below(0, 9) as usize;
        let codes = rng.codes(len, 4);
        let mut bytes = rng.codes(30, 8);
        let before = bytes.clone();
        pack4(&codes, first, &mut bytes).unwrap();
        let mut back = vec![0u8; len];
        unpack4(&bytes, first, &mut back).unwrap();
        assert_eq!(back, codes);
        // Every other nibble is as it was.
        for e in (0..60).filter(|&e| e < first || e >= first + len) {
            let nib = |b: &[u8]| (b[e / 2] >> (4 * (e % 2))) & 15;
            assert_eq!(nib(&bytes), nib(&before), "nibble {e}");
        }
    }
    assert!(pack4(&[1, 2, 3], 59, &mut [0u8; 30]).is_err());
    assert!(unpack4(&[0u8; 30], 58, &mut [0u8; 3]).is_err());
}
