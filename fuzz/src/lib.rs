//! What the fuzz targets run on one input, and the structure-aware ONNX mutator.
//!
//! The libFuzzer binaries (`fuzz_targets/`, built by `scripts/fuzz` with cargo-fuzz on nightly)
//! and the regression tests (`tests/regressions.rs`, stable, part of the workspace tests) call
//! the same functions, so a minimized crash kept under `fuzz/regressions/TARGET/` replays the
//! exact case that failed. Every function returns normally on any input; a panic, an abort or
//! a sanitizer report is the finding.

use std::alloc::{alloc_zeroed, dealloc, Layout};

use diffdfq_compiler::import::{import_bytes, ImportOptions, OPS};
use diffdfq_compiler::lower::lower;
use diffdfq_compiler::quant::rtn::{self, RtnOptions};
use diffdfq_runtime::capi::dfq_run_f32;
use diffdfq_runtime::format::seal;
use diffdfq_runtime::{run, Model, ARENA_ALIGN};
use prost::Message;
use tract_onnx::pb;

/// Largest arena or tensor (bytes) a case runs with: a blob may declare any size, and a real
/// device would not have it either; the loader's checks are still exercised.
const MAX_RUN_BYTES: usize = 64 << 20;

/// Most work a case takes past the importer, in multiply–accumulates and activation elements.
/// The largest seed (ppocrv5_cls, 80×160) holds 293 M MACs and takes ~7.5 s under
/// AddressSanitizer; a mutated input shape a few times larger is a valid model whose compile is
/// merely slow there, and libFuzzer's 60 s timeout would report it. Such a case is still
/// imported (the importer's own size limits are what it exercises); a compile of it is not a
/// finding.
pub const MAX_CASE_MACS: u64 = 400_000_000;
pub const MAX_CASE_ELEMENTS: u64 = 16_000_000;

/// A `.dfq` blob as given, then with its checksum re-sealed so that mutations reach the
/// structural checks behind the CRC: loaded, and where it loads, run through the Rust API and
/// the C ABI on an arena of exactly the declared size (so AddressSanitizer sees any access
/// past it).
pub fn blob(data: &[u8]) {
    load_and_run(data);
    let mut sealed = data.to_vec();
    seal(&mut sealed);
    load_and_run(&sealed);
}

fn load_and_run(bytes: &[u8]) {
    let Ok(m) = Model::from_bytes(bytes) else {
        return;
    };
    let (n_in, n_out) = (m.input().numel as usize, m.output().numel as usize);
    if m.arena_size() > MAX_RUN_BYTES || n_in > MAX_RUN_BYTES / 4 || n_out > MAX_RUN_BYTES / 4 {
        return;
    }
    let input: Vec<f32> = (0..n_in).map(|i| (i % 13) as f32 * 0.25 - 1.5).collect();
    let mut out = vec![0f32; n_out];
    let mut arena = Arena::new(m.arena_size());
    let _ = run(&m, &input, &mut out, arena.bytes());
    // SAFETY: every pointer covers the length passed with it, and the buffers do not overlap.
    let _ = unsafe {
        dfq_run_f32(
            bytes.as_ptr(),
            bytes.len(),
            input.as_ptr(),
            input.len(),
            out.as_mut_ptr(),
            out.len(),
            arena.ptr,
            arena.len,
        )
    };
}

/// An exactly sized, [`ARENA_ALIGN`]-aligned allocation (a `Vec<u8>` promises no alignment).
struct Arena {
    ptr: *mut u8,
    len: usize,
}

impl Arena {
    fn new(len: usize) -> Arena {
        let ptr = if len == 0 {
            std::ptr::without_provenance_mut(ARENA_ALIGN)
        } else {
            // SAFETY: the layout has a non-zero size.
            unsafe { alloc_zeroed(Self::layout(len)) }
        };
        assert!(!ptr.is_null(), "arena of {len} bytes");
        Arena { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, ARENA_ALIGN).expect("arena layout")
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is valid for `len` bytes (or dangling and aligned when `len` is 0).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated in `new` with this layout.
            unsafe { dealloc(self.ptr, Self::layout(self.len)) }
        }
    }
}

/// The `.npy` reader of `diffdfq-run --input`.
pub fn npy(data: &[u8]) {
    let _ = diffdfq_compiler::npy::parse_f32(data, "fuzz.npy");
}

/// How far an ONNX input got through [`onnx`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reached {
    Rejected,
    /// Imported, and past [`MAX_CASE_MACS`] or [`MAX_CASE_ELEMENTS`]: not compiled.
    Skipped,
    Imported,
    Quantized,
    Lowered,
}

/// An ONNX file through the compiler as `--method rtn` takes it: import, quantize, lower, then
/// the lowered blob through the runtime (a blob the compiler wrote must load).
pub fn onnx(data: &[u8]) -> Reached {
    let Ok(g) = import_bytes(data, &ImportOptions::default()) else {
        return Reached::Rejected;
    };
    let macs: u64 = g.nodes.iter().map(|n| g.macs(n)).sum();
    let elements: u64 = g
        .values
        .iter()
        .map(|v| v.shape.iter().map(|&d| d as u64).product::<u64>())
        .sum();
    if macs > MAX_CASE_MACS || elements > MAX_CASE_ELEMENTS {
        return Reached::Skipped;
    }
    let opts = RtnOptions {
        samples: 2,
        ..RtnOptions::default()
    };
    let Ok(q) = rtn::quantize(&g, &opts) else {
        return Reached::Imported;
    };
    let Ok(low) = lower(&q) else {
        return Reached::Quantized;
    };
    if let Err(e) = Model::from_bytes(&low.blob) {
        panic!("the compiler wrote a blob the runtime rejects: {e:?}");
    }
    load_and_run(&low.blob);
    Reached::Lowered
}

/// splitmix64: the mutator's choices follow from libFuzzer's seed alone.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        v.get(self.below(v.len()))
    }
    fn int(&mut self) -> i64 {
        const EDGES: [i64; 16] = [
            0,
            1,
            -1,
            2,
            3,
            4,
            7,
            8,
            255,
            256,
            65_535,
            1 << 31,
            -(1 << 31),
            1 << 40,
            i64::MAX,
            i64::MIN,
        ];
        EDGES[self.below(EDGES.len())]
    }
    fn float(&mut self) -> f32 {
        const EDGES: [f32; 9] = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            1e-30,
            1e30,
            f32::NAN,
            f32::INFINITY,
            -1e38,
        ];
        EDGES[self.below(EDGES.len())]
    }
}

/// Attribute names the importer reads, for mutations that add one.
const ATTRS: [&str; 16] = [
    "group",
    "pads",
    "strides",
    "dilations",
    "kernel_shape",
    "auto_pad",
    "axis",
    "axes",
    "perm",
    "epsilon",
    "alpha",
    "beta",
    "transA",
    "transB",
    "ceil_mode",
    "keepdims",
];

/// One structural edit of an encoded ONNX model (dims, attributes, arities, dtypes, nodes and
/// initializers dropped, duplicated or rewired, opsets); `None` when `data` does not decode or
/// the result exceeds `max_size`.
pub fn mutate_onnx(data: &[u8], seed: u64, max_size: usize) -> Option<Vec<u8>> {
    let mut m = pb::ModelProto::decode(data).ok()?;
    let mut r = Rng(seed);
    for _ in 0..1 + r.below(3) {
        edit(&mut m, &mut r);
    }
    let out = m.encode_to_vec();
    (out.len() <= max_size).then_some(out)
}

fn edit(m: &mut pb::ModelProto, r: &mut Rng) {
    if r.below(16) == 0 {
        if let Some(o) = m.opset_import.first_mut() {
            o.version = [1, 6, 7, 11, 13, 18, 24, 25, 1000][r.below(9)];
        }
        return;
    }
    let Some(g) = m.graph.as_mut() else {
        return;
    };
    let names: Vec<String> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .chain(g.initializer.iter().map(|t| t.name.clone()))
        .chain(g.input.iter().map(|v| v.name.clone()))
        .chain(["".to_string(), "nowhere".to_string()])
        .collect();
    match r.below(6) {
        0..=2 => edit_node(g, &names, r),
        3 | 4 => {
            let i = r.below(g.initializer.len());
            match r.below(3) {
                0 if !g.initializer.is_empty() => {
                    let t = g.initializer.remove(i);
                    if r.below(2) == 0 {
                        g.initializer
                            .insert(r.below(g.initializer.len() + 1), t.clone());
                        g.initializer.push(t);
                    }
                }
                _ => {
                    if let Some(t) = g.initializer.get_mut(i) {
                        edit_tensor(t, r);
                    }
                }
            }
        }
        _ => {
            let io = if r.below(2) == 0 {
                &mut g.input
            } else {
                &mut g.output
            };
            let i = r.below(io.len());
            match r.below(4) {
                0 if !io.is_empty() => {
                    io.remove(i);
                }
                1 => {
                    if let (Some(v), Some(n)) = (io.get_mut(i), r.pick(&names)) {
                        v.name = n.clone();
                    }
                }
                _ => {
                    if let Some(v) = io.get_mut(i) {
                        edit_value_type(v, r);
                    }
                }
            }
        }
    }
}

fn edit_node(g: &mut pb::GraphProto, names: &[String], r: &mut Rng) {
    if g.node.is_empty() {
        return;
    }
    let i = r.below(g.node.len());
    match r.below(8) {
        0 => {
            g.node.remove(i);
        }
        1 => {
            let n = g.node[i].clone();
            g.node.insert(r.below(g.node.len() + 1), n);
        }
        2 => {
            let n = &mut g.node[i];
            if r.below(2) == 0 {
                n.input.pop();
            } else if let Some(x) = r.pick(names) {
                n.input.push(x.clone());
            }
        }
        3 => {
            // Rewiring to any value, later nodes' outputs included, makes cycles too.
            let n = &mut g.node[i];
            let k = r.below(n.input.len());
            if let (Some(slot), Some(x)) = (n.input.get_mut(k), r.pick(names)) {
                *slot = x.clone();
            }
        }
        4 => {
            let n = &mut g.node[i];
            let k = r.below(n.output.len());
            if let (Some(slot), Some(x)) = (n.output.get_mut(k), r.pick(names)) {
                *slot = x.clone();
            }
        }
        5 => {
            let ops: Vec<&str> = OPS.iter().map(|o| o.name).chain(["Loop", "Foo"]).collect();
            if let Some(op) = r.pick(&ops) {
                g.node[i].op_type = op.to_string();
            }
        }
        6 => {
            let name = ATTRS[r.below(ATTRS.len())].to_string();
            let a = pb::AttributeProto {
                name,
                r#type: if r.below(2) == 0 { 2 } else { 7 },
                i: r.int(),
                ints: (0..r.below(5)).map(|_| r.int()).collect(),
                ..Default::default()
            };
            g.node[i].attribute.push(a);
        }
        _ => {
            let n = &mut g.node[i];
            let k = r.below(n.attribute.len());
            if let Some(a) = n.attribute.get_mut(k) {
                edit_attribute(a, r);
            }
        }
    }
}

fn edit_attribute(a: &mut pb::AttributeProto, r: &mut Rng) {
    match r.below(5) {
        0 => a.i = r.int(),
        1 => a.f = r.float(),
        2 => {
            let k = r.below(a.ints.len() + 1);
            if k == a.ints.len() {
                a.ints.push(r.int());
            } else if r.below(3) == 0 {
                a.ints.remove(k);
            } else {
                a.ints[k] = r.int();
            }
        }
        3 => {
            if let Some(t) = a.t.as_mut() {
                edit_tensor(t, r);
            } else {
                a.r#type = r.below(15) as i32;
            }
        }
        _ => a.r#type = r.below(15) as i32,
    }
}

fn edit_tensor(t: &mut pb::TensorProto, r: &mut Rng) {
    match r.below(6) {
        0 => {
            let k = r.below(t.dims.len() + 1);
            if k == t.dims.len() {
                t.dims.push(r.int());
            } else {
                t.dims[k] = r.int();
            }
        }
        1 => {
            t.dims.pop();
        }
        2 => t.data_type = r.below(17) as i32,
        3 => {
            let keep = r.below(t.raw_data.len() + 1);
            t.raw_data.truncate(keep);
            let keep = r.below(t.float_data.len() + 1);
            t.float_data.truncate(keep);
        }
        4 => {
            let v = r.float().to_le_bytes();
            let k = r.below(t.raw_data.len() / 4) * 4;
            if let Some(s) = t.raw_data.get_mut(k..k + 4) {
                s.copy_from_slice(&v);
            }
            if let Some(x) = t.float_data.first_mut() {
                *x = r.float();
            }
        }
        _ => {
            if let Some(x) = r.pick(&[1i64, 2, 4, 64]) {
                t.dims.insert(0, *x);
            }
        }
    }
}

fn edit_value_type(v: &mut pb::ValueInfoProto, r: &mut Rng) {
    use pb::tensor_shape_proto::dimension::Value;
    let Some(pb::type_proto::Value::TensorType(t)) =
        v.r#type.as_mut().and_then(|t| t.value.as_mut())
    else {
        return;
    };
    match r.below(4) {
        0 => t.elem_type = r.below(17) as i32,
        _ => {
            let Some(s) = t.shape.as_mut() else {
                return;
            };
            let k = r.below(s.dim.len() + 1);
            let d = match r.below(4) {
                0 => Value::DimParam("n".into()),
                _ => Value::DimValue(r.int()),
            };
            if k == s.dim.len() {
                s.dim.push(pb::tensor_shape_proto::Dimension {
                    value: Some(d),
                    ..Default::default()
                });
            } else if r.below(4) == 0 {
                s.dim.remove(k);
            } else {
                s.dim[k].value = Some(d);
            }
        }
    }
}
