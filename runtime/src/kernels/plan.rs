//! Which kernel runs a convolution at each level, decided from its shape alone and compiled on
//! every host: the compiler sizes a model's scratch region with it ([`conv_scratch_len_for`])
//! for a target it may not run on, and the x86 kernels dispatch by the same rules.

use super::{ConvGeom, ConvShape, Isa, CONV_TILE};

/// Input channels the 1×1 and gathered-column kernels sum per pass (8 groups of 8 codes).
pub(super) const QUAD_KC: usize = 64;

/// Output pixels per tile of the gathered-column convolution (`x86::im2col_conv`).
pub(super) const COL_PX: usize = 64;

/// Output channels whose accumulators the gathered-column convolution keeps per tile
/// (`64 × 64` i32, 16 KiB).
pub(super) const COL_OC: usize = 64;

/// Largest `K` the direct convolution (`x86::direct_conv`) takes (its weights live on the
/// stack).
pub(super) const DIRECT_MAX_K: usize = 64;

/// Bytes of the stack buffer holding the direct convolution's padded input rows.
pub(super) const DIRECT_ROWS: usize = 8192;

/// Codes a padded row holds past its right pad: the loads of a last, partial step of 32
/// pixels at stride 2 read that far.
const ROW_SLACK: usize = 64;

/// Length of one padded input row of the direct convolution.
pub(super) fn padded_row(geom: &ConvGeom, s: &ConvShape) -> usize {
    geom.pad_left + s.w + geom.pad_right + ROW_SLACK
}

/// Padded input rows (per input channel) a band of `rows` output rows reads.
pub(super) fn band_input_rows(geom: &ConvGeom, rows: usize) -> usize {
    (rows - 1) * geom.stride_h + (geom.kernel_h - 1) * geom.dilation_h + 1
}

/// A 1×1 stride-1 unpadded convolution: output pixel `p` reads input pixel `p`.
pub(super) fn is_pointwise(geom: &ConvGeom, s: &ConvShape) -> bool {
    geom.kernel_h * geom.kernel_w == 1
        && geom.stride_h == 1
        && geom.stride_w == 1
        && geom.pad_top == 0
        && geom.pad_left == 0
        && s.h == s.out_h
        && s.w == s.out_w
}

/// Whether the direct convolution runs this convolution (AVX2 and up): one input channel per
/// group or fewer than eight output channels (depthwise; a stem with many output channels is
/// faster as a GEMM over gathered columns, which reads each column for eight channels at
/// once), strides 1 or 2 along rows, `K` ≤ [`DIRECT_MAX_K`], output rows of at most
/// [`CONV_TILE`] pixels, and the padded input rows of one output row within [`DIRECT_ROWS`].
pub(super) fn direct_fits(geom: &ConvGeom, s: &ConvShape) -> bool {
    (geom.stride_w == 1 || geom.stride_w == 2)
        && (s.c_in_g == 1 || s.c_out_g < 8)
        && s.k <= DIRECT_MAX_K
        && s.out_w <= CONV_TILE
        && s.c_in_g
            .checked_mul(band_input_rows(geom, 1))
            .and_then(|r| r.checked_mul(padded_row(geom, s)))
            .is_some_and(|b| b <= DIRECT_ROWS)
}

/// Channels per block of the channels-in-lanes depthwise convolution
/// (`x86::depthwise_lanes`): one 16-byte vector of codes per pixel.
pub(super) const DW_LANES: usize = 16;

/// Most taps (`kernel_h · kernel_w`) the channels-in-lanes depthwise convolution takes (its
/// weight pairs live on the stack).
pub(super) const DW_MAX_TAPS: usize = 32;

/// Whether the channels-in-lanes depthwise convolution runs this convolution (AVX2 and up):
/// depthwise (one input and one output channel per group) over at least [`DW_LANES`] groups,
/// at most [`DW_MAX_TAPS`] taps, and an output plane of at most [`CONV_TILE`] pixels — the
/// 14×14 and 7×7 planes whose rows leave the row kernel's 16- and 32-pixel vectors half empty.
pub(super) fn depthwise_lanes(isa: Isa, geom: &ConvGeom, s: &ConvShape) -> bool {
    matches!(isa, Isa::Avx2 | Isa::Avx512Vnni)
        && s.c_in_g == 1
        && s.c_out_g == 1
        && geom.groups >= DW_LANES
        && geom.kernel_h * geom.kernel_w <= DW_MAX_TAPS
        && s.out_h * s.out_w <= CONV_TILE
}

/// Padded input rows and columns the output plane reads (`(rows, cols)`, from padded
/// coordinate 0): the extent of the channels-in-lanes depthwise convolution's pixel-major copy
/// of the input and of the gathered-column convolution's padded input.
pub(super) fn padded_extent(geom: &ConvGeom, s: &ConvShape) -> (usize, usize) {
    let cols = (s.out_w - 1) * geom.stride_w + (geom.kernel_w - 1) * geom.dilation_w + 1;
    (band_input_rows(geom, s.out_h), cols)
}

/// Bytes of scratch the channels-in-lanes depthwise convolution uses past the unpacked row:
/// [`DW_LANES`] channels' padded input, pixel-major, and their `i32` accumulators (plus 3 bytes
/// to align them); zero where it does not run at `isa`.
pub(super) fn lanes_bytes(isa: Isa, geom: &ConvGeom, s: &ConvShape) -> usize {
    if !depthwise_lanes(isa, geom, s) {
        return 0;
    }
    let (rows, cols) = padded_extent(geom, s);
    rows * cols * DW_LANES + 4 * DW_LANES * s.out_h * s.out_w + 3
}

/// Bytes of scratch the 1×1 convolution uses past the unpacked row where its weights are byte
/// quads and it has several groups of output channels: the input interleaved once per
/// convolution, four input channels per `i32` for every pixel (plus 3 bytes to align it),
/// instead of once per group and tile (`x86::pointwise_quads`); zero elsewhere, and where that
/// copy would exceed [`PRE_MAX`].
pub(super) fn pointwise_pre_bytes(isa: Isa, geom: &ConvGeom, s: &ConvShape, bits: u8) -> usize {
    let bytes = 4 * s.k.div_ceil(4) * (s.h * s.w).next_multiple_of(16);
    if !matches!(isa, Isa::Avx2 | Isa::Avx512Vnni)
        || !is_pointwise(geom, s)
        || !byte_quads(isa, bits)
        || s.h * s.w > CONV_TILE
        || s.c_out_g < 8
        || bytes > PRE_MAX
    {
        return 0;
    }
    bytes + 3
}

/// Most bytes of scratch a 1×1 convolution's interleaved input may take
/// ([`pointwise_pre_bytes`]): the arena grows by at most this much for it.
const PRE_MAX: usize = 256 * 1024;

/// Whether the 1×1 and gathered-column kernels multiply weights as signed bytes, four input
/// channels per product: ≤ 4-bit weights (`q − z_c`) at AVX2 and up, 8-bit ones (`q − 128`)
/// with VNNI; else (8-bit at AVX2) as i16 pairs.
pub(super) fn byte_quads(isa: Isa, bits: u8) -> bool {
    bits <= 4 || (isa == Isa::Avx512Vnni && bits == 8)
}

/// Output channels per pass of the 1×1 and gathered-column kernels: eight with VNNI on byte
/// quads, else four.
pub(super) fn col_width(isa: Isa, bits: u8) -> usize {
    if isa == Isa::Avx512Vnni && byte_quads(isa, bits) {
        8
    } else {
        4
    }
}

/// `i32` elements one output channel's weights take per [`QUAD_KC`] slice in a panel: byte
/// quads four to an element, i16 pairs two.
pub(super) fn panel_slice_elems(isa: Isa, bits: u8) -> usize {
    if byte_quads(isa, bits) {
        QUAD_KC / 4
    } else {
        QUAD_KC / 2
    }
}

/// `i32` elements of the weight panel the gathered-column convolution keeps for a block of
/// up to [`COL_OC`] output channels: every [`QUAD_KC`] slice of the reduction, in the form
/// its multiply–adds read (pairs or quads of `q − z_c`). Zero where that kernel does not run
/// at `isa` or where the output is one tile (the panel would be read once: no gain).
pub(super) fn panel_elems(isa: Isa, geom: &ConvGeom, s: &ConvShape, bits: u8) -> usize {
    let out_plane = s.out_h * s.out_w;
    let oc = s.c_out_g.min(COL_OC) / col_width(isa, bits) * col_width(isa, bits);
    if !matches!(isa, Isa::Avx2 | Isa::Avx512Vnni)
        || is_pointwise(geom, s)
        || direct_fits(geom, s)
        || depthwise_lanes(isa, geom, s)
        || out_plane <= COL_PX
    {
        return 0;
    }
    s.k.div_ceil(QUAD_KC) * panel_slice_elems(isa, bits) * oc
}

/// Bytes of scratch a convolution needs where the kernels of `isa` run it: one weight row
/// unpacked to `K` codes ([`super::conv_scratch_len`], the portable path), and for the
/// gathered-column convolution (x86 AVX2 and up) its weight panel, so that each weight is
/// unpacked once per convolution instead of once per tile of [`COL_PX`] pixels (plus 3 bytes
/// to align it for `i32`), for the channels-in-lanes depthwise convolution its input copy
/// and accumulators ([`lanes_bytes`]), for a one-tile 1×1 convolution its interleaved input
/// ([`pointwise_pre_bytes`]). A smaller scratch region is still correct: the gathered-column
/// kernel then makes the panel per tile, a depthwise convolution runs on the row kernel, the
/// 1×1 kernel interleaves per group, with the same results. `None` if the shapes do not fit
/// the geometry.
pub fn conv_scratch_len_for(
    isa: Isa,
    geom: &ConvGeom,
    in_dims: [usize; 4],
    out_dims: [usize; 4],
    bits: u8,
) -> Option<usize> {
    let s = geom.check(in_dims, out_dims)?;
    // The gathered-column convolution's weight panel, then its padded input.
    let col = panel_bytes(isa, geom, &s, bits) + padded_bytes(isa, geom, &s);
    // The kernels of one convolution use the region one after the other: the largest need.
    let extra = col
        .max(lanes_bytes(isa, geom, &s))
        .max(pointwise_pre_bytes(isa, geom, &s, bits));
    Some(super::conv_scratch_len(s.k) + extra)
}

/// Bytes of [`panel_elems`] in the scratch region (plus 3 to align them for `i32`).
pub(super) fn panel_bytes(isa: Isa, geom: &ConvGeom, s: &ConvShape, bits: u8) -> usize {
    match panel_elems(isa, geom, s, bits) {
        0 => 0,
        n => 4 * n + 3,
    }
}

/// Bytes past a padded input that a gather of one run reads (four 32-byte loads at stride 2).
pub(super) const PAD_SLACK: usize = 128;

/// Most bytes a padded input may take ([`padded_bytes`]).
const PAD_MAX: usize = 512 * 1024;

/// Bytes of scratch the gathered-column convolution takes past its weight panel for its input
/// copied once per call with the pads filled in (each input channel's padded plane, then
/// [`PAD_SLACK`]), so that each run of a tile's column is one copy: strides 1 and 2 along rows,
/// at most [`PAD_MAX`]; zero elsewhere.
pub(super) fn padded_bytes(isa: Isa, geom: &ConvGeom, s: &ConvShape) -> usize {
    let (rows, cols) = padded_extent(geom, s);
    let bytes = s.c_in_g * rows * cols + PAD_SLACK;
    if !matches!(isa, Isa::Avx2 | Isa::Avx512Vnni)
        || is_pointwise(geom, s)
        || direct_fits(geom, s)
        || !(geom.stride_w == 1 || geom.stride_w == 2)
        || bytes > PAD_MAX
    {
        return 0;
    }
    bytes
}
