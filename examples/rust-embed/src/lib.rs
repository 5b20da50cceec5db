//! A compiled model embedded in a `#![no_std]` crate: the `.dfq` bytes are part of the
//! program (`include_bytes!`, flash on a device), validated once, then run on a caller's
//! arena. Nothing here allocates; the same code builds for bare-metal targets
//! (`cargo build --lib --target thumbv7em-none-eabihf`).
//!
//!     DIFFDFQ_MODEL=$PWD/out/resnet_fmnist.dfq cargo run --release -- images.f32 labels.txt
//!
//! On a device, size a static arena from the compile's `NAME.h` (`NAME_ARENA_SIZE`) or
//! `NAME.report.json` (`totals.arena_bytes`), aligned to [`ARENA_ALIGN`].
#![no_std]

pub use diffdfq_runtime::{Error, Model, ARENA_ALIGN};

/// The model, compiled into the program. The path must be absolute (cargo builds from
/// elsewhere), and a changed file or variable rebuilds the crate.
pub static MODEL_BYTES: &[u8] = include_bytes!(env!("DIFFDFQ_MODEL"));

/// The embedded model, validated (once per call of this function: keep the result).
pub fn model() -> Result<Model<'static>, Error> {
    Model::from_bytes(MODEL_BYTES)
}

/// Runs `model` on one input; writes its outputs to `scores` and returns the top class.
pub fn classify(
    model: &Model<'_>,
    input: &[f32],
    scores: &mut [f32],
    arena: &mut [u8],
) -> Result<usize, Error> {
    diffdfq_runtime::run(model, input, scores, arena)?;
    Ok(scores
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &s)| {
            if s > best.1 {
                (i, s)
            } else {
                best
            }
        })
        .0)
}
