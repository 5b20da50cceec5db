//! # The `.dfq` packed model format, version 4
//!
//! One blob holds a whole quantized network; the runtime reads it in place (`&'static [u8]`
//! from flash, zero copy) after [`Model::from_bytes`] has validated it once. Everything is
//! little-endian; records are read field by field (never transmuted), so the blob needs no
//! alignment in memory. Offsets are from the start of the blob unless said otherwise.
//!
//! ```text
//! ┌──────────────┬─────────────────────┬──────────────────┬───────────────┐
//! │ header (64)  │ tensor table        │ op list          │ weight pool   │
//! │ at 0         │ at 64, 32 B/tensor  │ 16-aligned       │ 16-aligned    │
//! └──────────────┴─────────────────────┴──────────────────┴───────────────┘
//! ```
//!
//! The layout is canonical: `tensors_offset = 64`, `ops_offset = align16(64 + 32·n_tensors)`,
//! `pool_offset = align16(ops_offset + ops_size)`, `total_len = align16(pool_offset +
//! pool_size)`; padding bytes between sections are zero (the writer) and covered by the checksum.
//!
//! ## Header ([`Header`], 64 bytes)
//!
//! | off | size | field | meaning |
//! |----:|----:|---|---|
//! | 0 | 4 | `magic` | `b"DFQ1"` |
//! | 4 | 2 | `version` | 4 |
//! | 6 | 2 | `flags` | 0 (reserved) |
//! | 8 | 4 | `total_len` | blob length in bytes, a multiple of 16; the blob must be exactly this long |
//! | 12 | 4 | `checksum` | CRC-32 (IEEE 802.3, reflected, poly `0xEDB88320`, init and xorout `0xFFFFFFFF`) of bytes `0..total_len` with these 4 bytes read as zero |
//! | 16 | 4 | `arena_size` | bytes of the caller's arena the model uses |
//! | 20 | 4 | `scratch_offset` | start of the kernels' scratch region in the arena |
//! | 24 | 4 | `scratch_size` | its size: ≥ what every op needs ([`Model::least_scratch`]: the largest conv `K`, [`crate::kernels::conv_scratch_len`], and the staging of ops on 4-bit tensors, [`bands`]); more where the compiler sized it for a CPU's kernels, which then keep weight panels there ([`crate::kernels::conv_scratch_len_for`]) |
//! | 28 | 2 | `n_tensors` | ≥ 1 |
//! | 30 | 2 | `n_ops` | number of op records |
//! | 32 | 2 | `input` | model input tensor id (codes) |
//! | 34 | 2 | `output` | model output tensor id (codes, or `f32`) |
//! | 36 | 4 | `tensors_offset` | 64 |
//! | 40 | 4 | `ops_offset` | |
//! | 44 | 4 | `ops_size` | bytes of op records |
//! | 48 | 4 | `pool_offset` | |
//! | 52 | 4 | `pool_size` | bytes of the weight pool |
//! | 56 | 8 | `reserved` | zero |
//!
//! ## Tensor record ([`TensorRecord`], 32 bytes; tensor id = index in the table)
//!
//! | off | size | field | meaning |
//! |----:|----:|---|---|
//! | 0 | 1 | `rank` | 1..=4 |
//! | 1 | 1 | `dtype` | 8 = u8 codes, 4 = 4-bit codes two per byte (see *4-bit tensors* below), 32 = `f32` (no arena bytes: it lives in the caller's output buffer; see *f32 tensors* below) |
//! | 2 | 1 | `zero_point` | `z ≤ 2^A − 1` (0 for `f32`) |
//! | 3 | 1 | reserved | 0 |
//! | 4 | 16 | `dims` | 4 × u32, the first `rank` used (NCHW, batch 1), each in `1..=2^24`; the rest 1 |
//! | 20 | 4 | `numel` | product of the dims |
//! | 24 | 4 | `scale` | `f32`, finite, > 0: `x ≈ scale·(a − z)` |
//! | 28 | 4 | `arena_offset` | code tensors occupy `[arena_offset, arena_offset + bytes)` of the arena (`bytes` = `numel` for dtype 8, `⌈numel/2⌉` for dtype 4), which must lie inside `arena_size` and outside the scratch region; 0 for `f32` |
//!
//! ## Op list
//!
//! `n_ops` variable-length records, back to back, filling `ops_size` exactly, in execution
//! order. Each record: an 8-byte [`OpHeader`] (`kind` u8, `n_inputs` u8, `output` u16,
//! `record_len` u16, reserved u16 = 0), then `n_inputs` tensor ids (u16) zero-padded to a
//! multiple of 4 bytes, then the kind's parameter record; `record_len` is the total.
//!
//! | kind | op | inputs | params (bytes) |
//! |---:|---|---:|---|
//! | 1 | Conv | 1 | [`ConvRecord`] (40) |
//! | 2 | FullyConnected | 1 | [`FcRecord`] (16) |
//! | 3 | Add | 2 | [`BinaryRecord`] (28) |
//! | 4 | Mul | 2 | [`BinaryRecord`] (28; `a`, `b` multipliers zero) |
//! | 5 | MaxPool | 1 | [`PoolRecord`] (32; multiplier zero, flags 0) |
//! | 6 | AvgPool | 1 | [`PoolRecord`] (32; flags bit 0 = count_include_pad) |
//! | 7 | GlobalAvgPool | 1 | [`GapRecord`] (12) |
//! | 8 | Concat | ≥ 1 | [`ConcatRecord`] (8): axis, pool offset of `n_inputs` × (mult i32, shift i32) |
//! | 9 | Reshape / Flatten | 1 | none (same codes; the output may share the input's arena offset) |
//! | 10 | Lut | 1 | [`LutRecord`] (8): pool offset of a 256-byte table `y = table[x]` |
//! | 11 | Softmax | 1 | 4 reserved zero bytes; last op, output `f32` = model output |
//!
//! **Conv with an activation table.** [`ConvRecord`] `flags` bit 0 set: a 256-byte table
//! follows the op's `C_out` channel records in the pool (at `channels_offset + 24·C_out`). The
//! conv then requantizes to 8-bit codes with zero point `table_zero` (the channels' `mult`,
//! `shift` and the clamp are for those codes, `0 ≤ lo ≤ hi ≤ 255`) and writes `table[code]`,
//! a code of the output tensor. It is a Conv followed by a Lut whose 8-bit input tensor is
//! never stored: the compiler fuses them so that a 4-bit arena does not hold the
//! pre-activation, and the pre-activation keeps 8 bits for free. Without the bit,
//! `table_zero` is 0 and the output's own zero point applies. Version 3 had no table.
//!
//! **4-bit tensors.** Element `e` of a dtype-4 tensor (row-major NCHW order, as for every
//! tensor) is the low nibble of byte `e/2` when `e` is even, the high nibble when odd; the
//! high nibble of the last byte of an odd-sized tensor is unused. A Reshape copies (or
//! aliases) the bytes as they are. Every other op that reads or writes a 4-bit tensor runs
//! through the front of the scratch region, in bands of output rows where whole tensors do
//! not fit ([`bands`]); the loader rejects a blob whose scratch region is too small
//! for that. Version 2 held 4-bit codes one per byte, so a 4-bit tensor took as much arena
//! as an 8-bit one.
//!
//! **f32 tensors.** At most two, both in the caller's output buffer: the model output, written
//! by the last op, which is either a Softmax or a FullyConnected whose `i32` accumulators are
//! dequantized straight to `f32` (`y_n = f32(acc_n) · (s_n · s_x)`, `s_n` the channel's weight
//! scale, no clamp: the logits keep their full range); or, when the last op is a Softmax, its
//! input may be such a FullyConnected output (the op before it), and the Softmax then runs in
//! place on the output buffer. The FullyConnected's `lo`/`hi` are 0 then.
//!
//! Rules checked at load: an op reads only the model input or tensors written by earlier ops,
//! every tensor is written at most once, an op's output never overlaps its inputs (a Reshape
//! may alias its input exactly), and no op overwrites a tensor that a later op (or the model
//! output) still reads. Scale ratios are (`mult`, `shift`) pairs ([`crate::numerics`]).
//!
//! ## Weight pool and packed weights
//!
//! Raw bytes referenced by (offset, length) from op parameters, relative to `pool_offset`.
//! Conv and FullyConnected reference `C_out` packed rows and `C_out` [`ChannelRecord`]s
//! (24 bytes: weight scale `f32`, bias `i32` in units of `s_w·s_x`, `Σq` of the row `i32`,
//! requantization `mult` `i32`, `shift` `i32`, weight zero point `u8`, 3 reserved).
//!
//! A row holds the `K = C_in/groups · kh · kw` weight codes of one output channel (conv order
//! `[c_in][ky][kx]`; fully connected: the flattened input order) at `b ∈ {2, 3, 4, 8}` bits,
//! in groups of 8 codes: **a group is a little-endian bit stream of exactly `b` bytes, code
//! `i` in bits `b·i .. b·i + b`**, and a row is padded with zero codes to `G = ceil(K/8)`
//! whole groups, `b·G` bytes ([`row_bytes`]); a 3-bit code costs exactly 3 bits.
//!
//! Rows are stored in **panels of [`PANEL`] = 8 output channels, group-major inside**: panel
//! `p` (channels `8p .. 8p + w`, `w = min(8, C_out − 8p)`) starts at byte `8p · b·G` of the
//! weights and holds group `g` of channel `8p + j` at `(g·w + j) · b` from there. So the whole
//! matrix is `C_out · b·G` bytes as before (nothing is padded for the panels), and a kernel
//! that computes 4 or 8 adjacent output channels (a multiple of 4 from a panel's start) finds
//! their group `g` in one run of `4b` or `8b` bytes, and a block of groups in one run.
//!
//! Why this layout: one group is one ≤ 64-bit little-endian load followed by 8 shift-and-mask
//! steps with constant shifts (`(w >> b·i) & (2^b − 1)`, [`unpack_group`]), or with SIMD four
//! groups at once (AVX2: one 16-byte load, `pshufb` each group into its 64-bit lane, three
//! halvings to one code per byte) — no bit-plane recombination and no data-dependent control
//! flow. Version 1 stored each row whole, one after another; the panel order lets the kernels
//! read the weights of a block of output channels as one stream instead of 4–8 scattered rows.
//!
//! With the writer (cargo feature `write`, `alloc` only) the same module builds blobs:
//! `ModelBuilder`.

pub mod bands;
mod model;
mod ops;
mod tensors;
#[cfg(feature = "write")]
mod writer;

pub use crate::packing::*;
pub use crate::records::*;
pub use model::*;
pub use ops::*;
pub use tensors::*;
#[cfg(feature = "write")]
pub use writer::*;

use crate::error::Error;
use crate::geom::{ConvGeom, PoolGeom};
use crate::kernels;
use crate::numerics::{self, code_max, AddParams, Requant};
