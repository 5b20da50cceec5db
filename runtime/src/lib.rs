//! # diffdfq-runtime
//!
//! The device side of diffdfq: reads a packed `.dfq` model in place ([`format`]), validates it
//! once ([`Model::from_bytes`]) and runs it with integer kernels ([`kernels`], numerics in
//! [`numerics`]) inside one caller-provided arena ([`run`]). `#![no_std]`, no dependencies, no
//! allocation, and no panic reachable from the API. C programs use [`capi`]
//! (`include/diffdfq.h`).
//!
//! ```text
//! let model = Model::from_bytes(MODEL)?;          // &'static [u8] from flash
//! run(&model, &input, &mut output, &mut arena)?;  // arena: model.arena_size() bytes, 16-aligned
//! ```
//!
//! Cargo feature `write`: the model builder (needs `alloc`, still no dependencies). The C static
//! library for devices is the `staticlib/` crate beside this one (`libdiffdfq_device.a`).
#![no_std]
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::todo,
        clippy::unimplemented,
        clippy::unreachable
    )
)]

// Host tools and tests only: run-time CPU detection for `kernels::use_kernels`.
#[cfg(feature = "std")]
extern crate std;

pub mod capi;
pub mod error;
pub mod exec;
pub mod format;
pub mod geom;
pub mod kernels;
pub mod numerics;
pub mod packing;
pub mod records;

pub use error::Error;
pub use exec::{run, ARENA_ALIGN};
pub use format::Model;
pub use numerics::{quantize_multiplier, requantize};
