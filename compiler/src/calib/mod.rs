//! Calibration on candle: the float reference, and the DiffDFQ / Genie methods.
//!
//! [`calibrate`] runs the three stages: synthesis from the BN statistics ([`synth`]), the
//! forward diffusion series ([`synth::noised`]) and block reconstruction with progressive
//! selection ([`recon`]), producing the same [`QuantGraph`] that rtn produces.

mod blocks;
pub mod budget;
pub mod progress;
pub mod recon;
pub mod synth;

use std::time::Instant;

use candle_core::Device;

pub use progress::Progress;

use crate::graph::Graph;
use crate::quant::qmodel::QModel;
use crate::quant::{ranges, rtn, Bits, QuantGraph};
use crate::Error;

/// Makes the allocator keep freed blocks instead of returning them to the system.
/// Calibration allocates and frees tensors of tens of MB every iteration; glibc hands blocks
/// that large back to the kernel on free, and faulting the fresh pages in again costs about a
/// third of synthesis time (measured). Call once at program start.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes glibc's allocator; it is called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Where calibration computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

/// The candle device for `kind`: CUDA needs a build with the `cuda` feature.
pub fn device(kind: DeviceKind) -> Result<Device, Error> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => Device::new_cuda(0).map_err(|e| {
            // candle appends a backtrace to the message when RUST_BACKTRACE is set: one line.
            let e = e.to_string();
            let first = e.lines().next().unwrap_or_default();
            Error::Input(format!("--device cuda: no usable CUDA device: {first}"))
        }),
        #[cfg(not(feature = "cuda"))]
        DeviceKind::Cuda => Err(Error::Input(
            "--device cuda: this build has no CUDA support; rebuild with \
             `cargo build --release --features cuda` on a machine with nvcc (CUDA 11.4+)"
                .into(),
        )),
    }
}

#[derive(Debug, Clone)]
pub struct CalibOptions {
    pub bits: Bits,
    pub seed: u64,
    pub synth: synth::SynthOptions,
    pub recon: recon::ReconOptions,
    /// Weight bits per conv/linear layer (see [`rtn::RtnOptions::layer_bits`]).
    pub layer_bits: Option<Vec<u8>>,
    /// Tensors kept at 8 bits under 4-bit activations (see [`rtn::RtnOptions::act8`]).
    pub act8: Vec<String>,
}

impl CalibOptions {
    /// Defaults of `--method diffdfq` (`diffusion`) or `--method genie`.
    pub fn new(bits: Bits, seed: u64, diffusion: bool) -> CalibOptions {
        CalibOptions {
            bits,
            seed,
            synth: synth::SynthOptions {
                seed,
                ..Default::default()
            },
            recon: recon::ReconOptions {
                seed,
                diffusion,
                ..Default::default()
            },
            layer_bits: None,
            act8: Vec::new(),
        }
    }
}

/// What calibration did and how long each stage took.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CalibReport {
    pub samples: usize,
    pub synthesis_s: f64,
    pub reconstruction_s: f64,
    #[serde(flatten)]
    pub recon: recon::ReconReport,
}

/// Quantizes `g` with DiffDFQ (or Genie, without diffusion) on `dev`.
pub fn calibrate(
    g: &Graph,
    opts: &CalibOptions,
    dev: &Device,
    progress: Progress,
) -> Result<(QuantGraph, CalibReport), Error> {
    calibrate_on(g, opts, dev, progress, None).map(|(q, r, _)| (q, r))
}

/// [`calibrate`] that reuses already synthesized `samples` (flattened inputs) when given, and
/// returns the samples it used: experiments over reconstruction settings skip stage 1.
pub fn calibrate_on(
    g: &Graph,
    opts: &CalibOptions,
    dev: &Device,
    progress: Progress,
    samples: Option<Vec<f32>>,
) -> Result<(QuantGraph, CalibReport, Vec<f32>), Error> {
    // rtn gives every tensor a data-free starting quantization; weights restart from the Lp
    // clipping search.
    let mut q = rtn::quantize(
        g,
        &rtn::RtnOptions {
            bits: opts.bits,
            seed: opts.seed,
            // The input quantizer keeps ±3 where the range lies inside it (narrowing it to the
            // fixtures' range measured worse, see the README) and widens for raw pixels.
            input_range: opts
                .synth
                .input_range
                .map(|(lo, hi)| (lo.min(-ranges::INPUT_RANGE), hi.max(ranges::INPUT_RANGE))),
            bias_correction: false,
            layer_bits: opts.layer_bits.clone(),
            act8: opts.act8.clone(),
            ..Default::default()
        },
    )?;
    for n in &mut q.nodes {
        if let Some(l) = n.op.layer_mut() {
            l.quantize_lp();
        }
    }
    let mut model = QModel::new(q, dev)?;
    let t0 = Instant::now();
    let samples = match samples {
        Some(s) => s,
        None => synth::synthesize(g, Some(&model), &opts.synth, progress)?,
    };
    let synthesis_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let recon = recon::reconstruct(&mut model, &samples, &opts.recon, progress)?;
    // Reconstruction leaves biases at their float values (unless it learned them): move
    // them against the mean shift the final codes cause, as rtn does.
    if corrects_biases(opts) {
        rtn::correct_biases(&mut model.q)?;
    }
    // Learned activation steps change `s_x`: refit the bound on the final scales.
    model.q.fit_accumulators();
    Ok((
        model.q,
        CalibReport {
            samples: opts.synth.samples,
            synthesis_s,
            reconstruction_s: t1.elapsed().as_secs_f64(),
            recon,
        },
        samples,
    ))
}

/// Whether bias correction after reconstruction applies to `opts`: biases not learned. It
/// applies at 4-bit activations too (README "Activations", the rtn arena table).
pub fn corrects_biases(opts: &CalibOptions) -> bool {
    opts.recon.lr_bias == 0.0
}
