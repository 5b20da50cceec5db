//! The `.dfq` format: pack/unpack round trips, loader rejections (truncated, corrupted,
//! oversized, inconsistent), and fuzzing of `Model::from_bytes` + `run` for panics.

#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

use diffdfq_runtime_testkit as common;

use common::*;
use diffdfq_runtime::format::{
    self, pack_weights, row_bytes, seal, unpack_group, DType, Layer, Model, ModelBuilder, OpKind,
    Weights, HEADER_LEN, PANEL,
};
use diffdfq_runtime::kernels::ConvGeom;
use diffdfq_runtime::numerics::{code_max, Fused};
use diffdfq_runtime::{run, Error};
use proptest::prelude::*;

// ------------------------------------------------------------------------------------ packing

fn codes_strategy() -> impl Strategy<Value = (u8, usize, Vec<u8>)> {
    (
        prop::sample::select(vec![2u8, 3, 4, 8]),
        1usize..60,
        1usize..21,
    )
        .prop_flat_map(|(bits, k, c_out)| {
            let max = code_max(bits);
            (
                Just(bits),
                Just(k),
                prop::collection::vec(0..=max, k * c_out),
            )
        })
}

/// Bits `b·i .. b·i + b` of the little-endian byte stream `group`.
fn code_at(group: &[u8], bits: usize, i: usize) -> u32 {
    (0..bits)
        .map(|j| (((group[(bits * i + j) / 8] >> ((bits * i + j) % 8)) & 1) as u32) << j)
        .sum()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn pack_unpack_round_trip((bits, k, codes) in codes_strategy()) {
        let c_out = codes.len() / k;
        let rb = row_bytes(bits, k).unwrap();
        prop_assert_eq!(rb, bits as usize * k.div_ceil(8));
        let mut rows = vec![0xFFu8; rb * c_out];
        pack_weights(bits, k, &codes, &mut rows).unwrap();
        let chans = vec![0u8; 24 * c_out];
        let w = Weights::new(bits, k, c_out, &rows, &chans).unwrap();
        let b = bits as usize;
        for (c, want) in codes.chunks_exact(k).enumerate() {
            let mut back = vec![0u8; k];
            w.row(c).unwrap().unpack(&mut back).unwrap();
            prop_assert_eq!(&back, want);
            // The documented layout, computed here on its own: panels of PANEL channels
            // starting at row `c − c mod PANEL`, group-major inside, each group a
            // little-endian bit stream with code `i` at bits `b·i .. b·i + b`, zero padded.
            let first = c - c % PANEL;
            let width = PANEL.min(c_out - first);
            for g in 0..k.div_ceil(8) {
                let at = first * rb + (g * width + c % PANEL) * b;
                let group = &rows[at..at + b];
                for i in 0..8 {
                    let v = code_at(group, b, i);
                    prop_assert_eq!(v, want.get(g * 8 + i).map_or(0, |&q| q as u32));
                }
            }
        }
        prop_assert!(w.row(c_out).is_none());
    }

    #[test]
    fn pack_rejects_out_of_range_codes(bits in prop::sample::select(vec![2u8, 3, 4]), n in 1usize..40, at in 0usize..40) {
        let mut codes = vec![0u8; n];
        codes[at % n] = 1u8 << bits;
        let mut row = vec![0u8; row_bytes(bits, n).unwrap()];
        prop_assert_eq!(pack_weights(bits, n, &codes, &mut row), Err(Error::BadArgument));
    }
}

#[test]
fn three_bit_codes_cost_three_bits() {
    assert_eq!(row_bytes(3, 8), Some(3));
    assert_eq!(row_bytes(3, 9), Some(6)); // padded to whole groups
    assert_eq!(row_bytes(3, 3 * 3 * 64), Some(216)); // 576 codes · 3 bits
    assert_eq!(row_bytes(2, 576), Some(144));
    assert_eq!(row_bytes(4, 576), Some(288));
    assert_eq!(row_bytes(8, 576), Some(576));
    // 8 codes 0..7 in 3 bytes: 0b111_110_101_100_011_010_001_000
    let mut row = [0u8; 3];
    pack_weights(3, 8, &[0, 1, 2, 3, 4, 5, 6, 7], &mut row).unwrap();
    assert_eq!(row, [0b1000_1000, 0b1100_0110, 0b1111_1010]);
    let mut out = [0u8; 8];
    unpack_group(3, &row, &mut out);
    assert_eq!(out, [0, 1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(
        pack_weights(5, 8, &[0; 8], &mut [0; 5]),
        Err(Error::BadArgument)
    );
    let chans = [0u8; 24];
    let one = Weights::new(3, 8, 1, &row, &chans).unwrap();
    assert_eq!(
        one.row(0).unwrap().unpack(&mut [0; 9]),
        Err(Error::BadArgument)
    );
}

#[test]
fn checksum_is_crc32_ieee() {
    // The standard check value of CRC-32/ISO-HDLC.
    assert_eq!(!format::crc32_update(!0, b"123456789"), 0xCBF4_3926);
}

// ------------------------------------------------------------------------------- a good blob

#[test]
fn valid_models_load_and_run_at_every_width() {
    for bits in [2u8, 3, 4, 8] {
        for a_bits in [4u8, 8] {
            let blob = small_model(bits, a_bits, 42);
            assert_eq!(blob.len() % 16, 0);
            let m = Model::from_bytes(&blob).unwrap();
            assert_eq!(m.n_ops(), 5);
            assert_eq!(m.input().numel, 128);
            assert_eq!(m.output().dtype, DType::F32);
            let kinds: Vec<OpKind> = m.ops().map(|r| r.unwrap().kind).collect();
            assert_eq!(
                kinds,
                [
                    OpKind::Conv,
                    OpKind::MaxPool,
                    OpKind::Reshape,
                    OpKind::FullyConnected,
                    OpKind::Softmax
                ]
            );
            let mut arena = Arena::new(m.arena_size());
            let input: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut out = vec![0f32; 10];
            run(&m, &input, &mut out, arena.bytes()).unwrap();
            let total: f32 = out.iter().sum();
            assert!((total - 1.0).abs() < 1e-5, "{out:?}");
            // Same bytes in, same bytes out.
            let mut again = vec![0f32; 10];
            run(&m, &input, &mut again, arena.bytes()).unwrap();
            assert_eq!(out, again);
        }
    }
}

#[test]
fn run_checks_its_buffers() {
    let blob = small_model(3, 8, 1);
    let m = Model::from_bytes(&blob).unwrap();
    let input = vec![0.1f32; 128];
    let mut out = vec![0f32; 10];
    let mut arena = Arena::new(m.arena_size() + 1);
    let a = arena.bytes();
    assert_eq!(run(&m, &input[..127], &mut out, a), Err(Error::InputSize));
    assert_eq!(run(&m, &input, &mut out[..9], a), Err(Error::OutputSize));
    let n = m.arena_size();
    assert_eq!(
        run(&m, &input, &mut out, &mut a[..n - 1]),
        Err(Error::ArenaTooSmall)
    );
    assert_eq!(
        run(&m, &input, &mut out, &mut a[1..]),
        Err(Error::ArenaMisaligned)
    );
    assert_eq!(run(&m, &input, &mut out, &mut a[..n]), Ok(()));
}

// ---------------------------------------------------------------------------------- rejection

fn load(b: &[u8]) -> Result<(), Error> {
    Model::from_bytes(b).map(|_| ())
}

/// Applies `edit` to a copy of a valid blob, re-seals it, and returns the load result.
fn edited(edit: impl FnOnce(&mut Vec<u8>)) -> Result<(), Error> {
    let mut b = small_model(4, 8, 3);
    edit(&mut b);
    seal(&mut b);
    load(&b)
}

#[test]
fn rejects_truncated_and_oversized_blobs() {
    let b = small_model(4, 8, 3);
    assert_eq!(load(&[]), Err(Error::Truncated));
    assert_eq!(load(&b[..HEADER_LEN - 1]), Err(Error::Truncated));
    assert_eq!(load(&b[..HEADER_LEN]), Err(Error::Truncated));
    assert_eq!(load(&b[..b.len() - 1]), Err(Error::Truncated));
    let mut longer = b.clone();
    longer.push(0);
    assert_eq!(load(&longer), Err(Error::TrailingBytes));
    // Header claims more than there is / sections larger than the blob.
    assert_eq!(
        edited(|b| {
            let n = b.len() as u32;
            put_u32(b, 8, n + 16)
        }),
        Err(Error::Truncated)
    );
    assert_eq!(edited(|b| put_u32(b, 52, 1 << 30)), Err(Error::BadHeader)); // pool_size
    assert_eq!(edited(|b| put_u32(b, 44, 1 << 30)), Err(Error::BadHeader)); // ops_size
    assert_eq!(edited(|b| put_u16(b, 28, u16::MAX)), Err(Error::BadHeader)); // n_tensors
    assert_eq!(edited(|b| put_u32(b, 8, 8)), Err(Error::Truncated)); // total_len below header
}

#[test]
fn rejects_corruption() {
    let b = small_model(4, 8, 3);
    let mut bad = b.clone();
    bad[0] = b'X';
    assert_eq!(load(&bad), Err(Error::BadMagic));
    // Version 1 (rows one after another, before the panel layout), version 2 (4-bit
    // activations one per byte), version 3 (no conv activation tables) and any later one.
    for v in [1, 2, 3, 5] {
        let mut bad = b.clone();
        bad[4] = v;
        assert_eq!(load(&bad), Err(Error::UnsupportedVersion));
    }
    // A flipped bit anywhere past magic, version and length is caught by the checksum.
    for at in [12, 15, 20, 30, 70, b.len() / 2, b.len() - 1] {
        let mut bad = b.clone();
        bad[at] ^= 0x10;
        assert_eq!(load(&bad), Err(Error::ChecksumMismatch), "byte {at}");
    }
}

#[test]
fn rejects_inconsistent_blobs() {
    // Header.
    assert_eq!(edited(|b| put_u16(b, 6, 1)), Err(Error::BadHeader)); // flags
    assert_eq!(edited(|b| b[60] = 1), Err(Error::BadHeader)); // reserved
    assert_eq!(edited(|b| put_u16(b, 32, 99)), Err(Error::BadHeader)); // input id
    assert_eq!(edited(|b| put_u32(b, 24, u32::MAX)), Err(Error::BadHeader)); // scratch beyond arena
                                                                             // Tensors.
    let arena = |b: &Vec<u8>| u32::from_le_bytes(b[16..20].try_into().unwrap());
    assert_eq!(
        edited(|b| {
            let a = arena(b);
            put_u32(b, tensor_at(1) + 28, a)
        }),
        Err(Error::ArenaRange { tensor: 1 })
    );
    assert_eq!(
        edited(|b| put_u32(b, tensor_at(2) + 28, u32::MAX - 3)),
        Err(Error::ArenaRange { tensor: 2 })
    );
    assert_eq!(
        edited(|b| b[tensor_at(0)] = 5),
        Err(Error::BadTensor { tensor: 0 })
    ); // rank
    assert_eq!(
        edited(|b| b[tensor_at(0) + 1] = 7),
        Err(Error::BadTensor { tensor: 0 })
    ); // dtype
    assert_eq!(
        edited(|b| put_u32(b, tensor_at(3) + 20, 65)),
        Err(Error::BadTensor { tensor: 3 })
    ); // numel
    assert_eq!(
        edited(|b| put_u32(b, tensor_at(3) + 24, f32::NAN.to_bits())),
        Err(Error::BadTensor { tensor: 3 })
    );
    assert_eq!(
        edited(|b| put_u32(b, tensor_at(3) + 24, (-1.0f32).to_bits())),
        Err(Error::BadTensor { tensor: 3 })
    );
    assert_eq!(
        edited(|b| put_u32(b, tensor_at(1) + 4, 0)),
        Err(Error::BadTensor { tensor: 1 })
    ); // zero dim
       // Ops: bad tensor id, bad kind, arity, order.
    assert_eq!(
        edited(|b| {
            let o = op_offset(b, 0);
            put_u16(b, o + 8, 200)
        }),
        Err(Error::BadTensorRef { op: 0 })
    );
    assert_eq!(
        edited(|b| {
            let o = op_offset(b, 1);
            put_u16(b, o + 2, 77)
        }),
        Err(Error::BadTensorRef { op: 1 })
    );
    assert_eq!(
        edited(|b| {
            let o = op_offset(b, 0);
            b[o] = 99
        }),
        Err(Error::BadOp { op: 0 })
    );
    assert_eq!(
        edited(|b| {
            let o = op_offset(b, 0);
            b[o + 1] = 2
        }),
        Err(Error::BadOp { op: 0 })
    );
    // FC (op 3) reads its own output (tensor 4): not written before it.
    assert_eq!(
        edited(|b| {
            let o = op_offset(b, 3);
            put_u16(b, o + 8, 4)
        }),
        Err(Error::BadOrder { op: 3 })
    );
    // Conv writes the model input.
    assert_eq!(
        edited(|b| {
            let o = op_offset(b, 0);
            put_u16(b, o + 2, 0)
        }),
        Err(Error::BadOrder { op: 0 })
    );
    // Weights: wrong length, Σq, padding codes, zero point, multiplier.
    assert_eq!(
        edited(|b| {
            let p = op_params(b, 0);
            let v = u32::from_le_bytes(b[p + 32..p + 36].try_into().unwrap());
            put_u32(b, p + 32, v - 1)
        }),
        Err(Error::WeightSize { op: 0 })
    );
    assert_eq!(
        edited(|b| {
            let p = op_params(b, 0);
            put_u32(b, p + 28, 1 << 20)
        }),
        Err(Error::WeightSize { op: 0 })
    );
    let chan = |b: &Vec<u8>, op: usize| {
        let p = op_params(b, op);
        pool_at(b) + u32::from_le_bytes(b[p + 36..p + 40].try_into().unwrap()) as usize
    };
    assert_eq!(
        edited(|b| {
            let c = chan(b, 0);
            let v = u32::from_le_bytes(b[c + 8..c + 12].try_into().unwrap());
            put_u32(b, c + 8, v + 1)
        }),
        Err(Error::WeightSize { op: 0 })
    );
    assert_eq!(
        edited(|b| {
            let c = chan(b, 0);
            b[c + 20] = 16
        }),
        Err(Error::BadQuant { op: 0 })
    ); // 4-bit zero point 16
    assert_eq!(
        edited(|b| {
            let c = chan(b, 0);
            put_u32(b, c + 12, 5)
        }),
        Err(Error::BadQuant { op: 0 })
    ); // mult < 2^30
    assert_eq!(
        edited(|b| {
            let c = chan(b, 0);
            put_u32(b, c + 16, 40)
        }),
        Err(Error::BadQuant { op: 0 })
    ); // shift > 31
       // K = 18 codes at 4 bits: 3 groups, the last 6 codes are padding and must be zero.
    assert_eq!(
        edited(|b| {
            let p = op_params(b, 0);
            let w = pool_at(b) + u32::from_le_bytes(b[p + 28..p + 32].try_into().unwrap()) as usize;
            b[w + 11] |= 0xF0
        }),
        Err(Error::WeightSize { op: 0 })
    );
    // Geometry: a stride that does not give the output shape.
    assert_eq!(
        edited(|b| {
            let p = op_params(b, 0);
            put_u16(b, p + 4, 2)
        }),
        Err(Error::ShapeMismatch { op: 0 })
    );
    // Clamp beyond the activation range / lo > hi.
    assert_eq!(
        edited(|b| {
            let p = op_params(b, 0);
            b[p + 23] = 200;
            b[p + 24] = 100
        }),
        Err(Error::BadQuant { op: 0 })
    );
    // Scratch region too small for the conv (K = 18).
    assert_eq!(
        edited(|b| put_u32(b, 24, 17)),
        Err(Error::ScratchTooSmall { op: 0 })
    );
    // Maxpool must keep the quantization of its input.
    assert_eq!(
        edited(|b| put_u32(b, tensor_at(2) + 24, 0.5f32.to_bits())),
        Err(Error::BadQuant { op: 1 })
    );
    // Softmax must be last / write the model output.
    assert_eq!(
        edited(|b| put_u16(b, 34, 4)),
        Err(Error::BadOrder { op: 4 })
    );
    // Record length and reserved bytes.
    assert_eq!(
        edited(|b| {
            let o = op_offset(b, 4);
            put_u16(b, o + 4, 12)
        }),
        Err(Error::BadOp { op: 4 })
    );
    assert_eq!(
        edited(|b| {
            let p = op_params(b, 4);
            b[p] = 1
        }),
        Err(Error::BadOp { op: 4 })
    );
}

#[test]
fn rejects_arena_plans_that_clobber_live_tensors() {
    let g = ConvGeom {
        kernel_h: 1,
        kernel_w: 1,
        stride_h: 1,
        stride_w: 1,
        dilation_h: 1,
        dilation_w: 1,
        pad_top: 0,
        pad_left: 0,
        pad_bottom: 0,
        pad_right: 0,
        groups: 1,
    };
    let layer = Layer {
        bits: 8,
        codes: &[1, 2, 3, 4],
        scales: &[0.1, 0.1],
        zero_points: &[0, 0],
        bias: &[],
    };
    let build = |t2_at: u32, t1_at: u32| {
        let mut b = ModelBuilder::new();
        let t0 = b.tensor_at(&[1, 2, 2, 2], DType::U8, 0.1, 0, 0);
        let t1 = b.tensor_at(&[1, 2, 2, 2], DType::U8, 0.1, 0, t1_at);
        let t2 = b.tensor_at(&[1, 2, 2, 2], DType::U8, 0.1, 0, t2_at);
        let t3 = b.tensor_at(&[1, 2, 2, 2], DType::U8, 0.1, 0, 48);
        b.set_input(t0);
        b.set_output(t3);
        b.set_arena(80, 64, 16);
        b.conv(t0, t1, &g, &layer, Fused::None).unwrap();
        b.conv(t1, t2, &g, &layer, Fused::None).unwrap();
        b.add(t0, t2, t3, Fused::None).unwrap(); // residual: t0 must survive until here
        b.finish()
    };
    assert!(build(32, 16).is_ok());
    // t2 written over t0 while t0 is still needed by the add.
    assert_eq!(build(0, 16).err(), Some(Error::ArenaOverlap { op: 1 }));
    // an op writing over its own input.
    assert_eq!(build(20, 16).err(), Some(Error::ArenaOverlap { op: 1 }));
    // t1 may reuse nothing live: t1 over t0 breaks the add too.
    assert_eq!(build(32, 0).err(), Some(Error::ArenaOverlap { op: 0 }));
    // A tensor inside the scratch region.
    assert_eq!(build(64, 16).err(), Some(Error::ArenaRange { tensor: 2 }));
}

#[test]
fn rejects_accumulators_that_could_overflow() {
    let k = 40_000usize; // 40000 · 255 · 255 > 2^31
    let codes = vec![255u8; k];
    let mut b = ModelBuilder::new();
    let x = b.tensor(&[1, k as u32], DType::U8, 0.1, 0);
    let y = b.tensor(&[1, 1], DType::U8, 0.1, 0);
    b.set_input(x);
    b.set_output(y);
    b.fully_connected(
        x,
        y,
        &Layer {
            bits: 8,
            codes: &codes,
            scales: &[0.1],
            zero_points: &[0],
            bias: &[],
        },
        Fused::None,
    )
    .unwrap();
    assert_eq!(b.finish().err(), Some(Error::AccumulatorOverflow { op: 0 }));
    // With 4-bit activations the same layer fits.
    let mut b = ModelBuilder::new();
    let x = b.tensor(&[1, k as u32], DType::U4, 0.1, 0);
    let y = b.tensor(&[1, 1], DType::U8, 0.1, 0);
    b.set_input(x);
    b.set_output(y);
    b.fully_connected(
        x,
        y,
        &Layer {
            bits: 8,
            codes: &codes,
            scales: &[0.1],
            zero_points: &[0],
            bias: &[],
        },
        Fused::None,
    )
    .unwrap();
    assert!(b.finish().is_ok());
}

/// A FullyConnected (K = 3, N = 4) over codes `x` whose output is `out_dtype`, optionally
/// followed by a final Softmax; returns the blob.
fn logits_model(f32_logits: bool, softmax: bool, fused: Fused) -> Result<Vec<u8>, Error> {
    let codes = [0u8, 255, 128, 10, 20, 30, 255, 255, 255, 0, 0, 0];
    let mut b = ModelBuilder::new();
    let x = b.tensor(&[1, 3], DType::U8, 0.05, 128);
    let dt = if f32_logits { DType::F32 } else { DType::U8 };
    let l = b.tensor(&[1, 4], dt, if f32_logits { 1.0 } else { 0.5 }, 0);
    b.set_input(x);
    let layer = Layer {
        bits: 8,
        codes: &codes,
        scales: &[0.01, 0.02, 0.03, 0.04],
        zero_points: &[128, 0, 100, 3],
        bias: &[0.5, -1.0, 2.0, 0.0],
    };
    b.fully_connected(x, l, &layer, fused)?;
    if softmax {
        let y = b.tensor(&[1, 4], DType::F32, 1.0, 0);
        b.softmax(l, y)?;
        b.set_output(y);
    } else {
        b.set_output(l);
    }
    b.finish()
}

#[test]
fn fully_connected_logits_are_dequantized_accumulators() {
    let input = [1.5f32, -2.0, 0.25];
    let blob = logits_model(true, false, Fused::None).unwrap();
    let m = Model::from_bytes(&blob).unwrap();
    let mut arena = Arena::new(m.arena_size());
    let mut y = [0f32; 4];
    run(&m, &input, &mut y, arena.bytes()).unwrap();
    // Reference: the input codes, then Σ (q − z_c)(a − z) + round(b / (s_c·s_x)), times s_c·s_x.
    let a: Vec<i64> = input
        .iter()
        .map(|&v| ((v / 0.05f32).round() as i64 + 128).clamp(0, 255))
        .collect();
    let codes = [0i64, 255, 128, 10, 20, 30, 255, 255, 255, 0, 0, 0];
    let (s, z, bias) = (
        [0.01f32, 0.02, 0.03, 0.04],
        [128i64, 0, 100, 3],
        [0.5f64, -1.0, 2.0, 0.0],
    );
    for n in 0..4 {
        let acc_scale = s[n] * 0.05;
        let b = (bias[n] / (s[n] as f64 * 0.05f32 as f64)).round() as i64;
        let acc: i64 = (0..3)
            .map(|k| (codes[n * 3 + k] - z[n]) * (a[k] - 128))
            .sum::<i64>()
            + b;
        assert_eq!(
            y[n].to_bits(),
            (acc as f32 * acc_scale).to_bits(),
            "logit {n}"
        );
    }
    // Beyond what an 8-bit output over [−64, 63.5] could hold, and negative ones kept.
    assert!(y.iter().any(|&v| v < 0.0));
    // The Softmax reads the logits in place: the same probabilities as softmax(y).
    let blob = logits_model(true, true, Fused::None).unwrap();
    let m = Model::from_bytes(&blob).unwrap();
    let mut p = [0f32; 4];
    run(&m, &input, &mut p, Arena::new(m.arena_size()).bytes()).unwrap();
    let max = y.iter().copied().fold(f32::MIN, f32::max) as f64;
    let sum: f64 = y.iter().map(|&v| (v as f64 - max).exp()).sum();
    for n in 0..4 {
        let want = ((y[n] as f64 - max).exp() / sum) as f32;
        assert!((p[n] - want).abs() <= 1e-6, "p[{n}] = {} vs {want}", p[n]);
    }
    // An activation cannot be fused into f32 logits.
    assert_eq!(
        logits_model(true, false, Fused::Relu).err(),
        Some(Error::BadArgument)
    );
}

#[test]
fn f32_tensors_only_where_the_format_allows_them() {
    // FullyConnected → f32 → Softmax is valid; a code FullyConnected is too.
    assert!(logits_model(true, true, Fused::None).is_ok());
    assert!(logits_model(false, true, Fused::None).is_ok());
    // f32 logits read by anything but the final Softmax are refused.
    let codes = [7u8; 12];
    let layer = Layer {
        bits: 8,
        codes: &codes,
        scales: &[0.01; 4],
        zero_points: &[0; 4],
        bias: &[],
    };
    let mut b = ModelBuilder::new();
    let x = b.tensor(&[1, 3], DType::U8, 0.05, 0);
    let l = b.tensor(&[1, 4], DType::F32, 1.0, 0);
    let y = b.tensor(&[1, 4], DType::U8, 0.1, 0);
    b.set_input(x);
    b.set_output(y);
    b.fully_connected(x, l, &layer, Fused::None).unwrap();
    b.activation(l, y, format::Activation::Sigmoid).ok();
    assert!(b.finish().is_err());
    // f32 logits that are neither the output nor the Softmax's input are refused.
    let mut b = ModelBuilder::new();
    let x = b.tensor(&[1, 3], DType::U8, 0.05, 0);
    let l = b.tensor(&[1, 4], DType::F32, 1.0, 0);
    let y = b.tensor(&[1, 3], DType::U8, 0.1, 0);
    b.set_input(x);
    b.set_output(y);
    b.fully_connected(x, l, &layer, Fused::None).unwrap();
    b.fully_connected(
        x,
        y,
        &Layer {
            codes: &codes[..9],
            scales: &[0.01; 3],
            zero_points: &[0; 3],
            ..layer
        },
        Fused::None,
    )
    .unwrap();
    assert_eq!(b.finish().err(), Some(Error::BadTensorRef { op: 0 }));
}

// ------------------------------------------------------------------------------------ fuzzing

/// Loads, and if it loads, runs: nothing may panic, whatever the bytes.
fn load_and_run(bytes: &[u8]) {
    if let Ok(m) = Model::from_bytes(bytes) {
        let n_in = m.input().numel as usize;
        let n_out = m.output().numel as usize;
        if m.arena_size() > 1 << 22 || n_in > 1 << 20 || n_out > 1 << 20 {
            return;
        }
        let mut arena = Arena::new(m.arena_size());
        let input: Vec<f32> = (0..n_in).map(|i| (i as f32 * 0.618).sin() * 3.0).collect();
        let mut out = vec![0f32; n_out];
        let r = run(&m, &input, &mut out, arena.bytes());
        assert_eq!(r, Ok(()), "a validated model must run");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn fuzz_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400), with_magic in any::<bool>()) {
        let mut b = bytes;
        if with_magic && b.len() >= 16 {
            b[..4].copy_from_slice(b"DFQ1");
            b[4..6].copy_from_slice(&1u16.to_le_bytes());
            let n = b.len() as u32;
            b[8..12].copy_from_slice(&n.to_le_bytes());
            seal(&mut b);
        }
        load_and_run(&b);
    }

    #[test]
    fn fuzz_mutated_models(
        bits in prop::sample::select(vec![2u8, 3, 4, 8]),
        a8 in any::<bool>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in prop::option::of(any::<prop::sample::Index>()),
        reseal in any::<bool>(),
    ) {
        let mut b = small_model(bits, if a8 { 8 } else { 4 }, 7);
        for (at, v) in &edits {
            let i = at.index(b.len());
            b[i] = *v;
        }
        if let Some(c) = cut {
            let n = c.index(b.len());
            b.truncate(n);
            if n >= 16 {
                b[8..12].copy_from_slice(&(n as u32).to_le_bytes());
            }
        }
        if reseal {
            seal(&mut b);
        }
        load_and_run(&b);
    }

    /// Mutations confined to the tensor table and op list, always re-sealed: the deep checks.
    #[test]
    fn fuzz_structure(edits in prop::collection::vec((0usize..400, any::<u8>()), 1..4), seed in 0u64..4) {
        let mut b = small_model(3, 8, seed);
        let end = pool_at(&b) + 64;
        for (at, v) in &edits {
            let i = 64 + at % (end - 64);
            b[i] = *v;
        }
        seal(&mut b);
        load_and_run(&b);
    }
}
