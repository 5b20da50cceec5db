//! diffdfq: a data-free, ultra-low-bit quantizing compiler for CNNs.
//!
//! Pipeline (data flows left to right): [`import`] reads ONNX into a [`graph::Graph`];
//! [`quant`] folds it into a [`quant::QuantGraph`] and quantizes it data-free (rtn); [`calib`]
//! calibrates it with DiffDFQ or Genie; [`lower`] writes the `.dfq` blob; [`emit`] the
//! outputs. [`reference`] is the float model on candle they all measure against. The module
//! layers and what each may import: docs/design.md §2.

pub mod calib;
pub mod cli;
pub mod emit;
pub mod evaluate;
pub mod graph;
pub mod host;
pub mod import;
pub mod inspect;
pub mod interrupt;
pub mod lower;
pub mod mixed;
pub mod npy;
pub mod quant;
pub mod reference;
pub mod rng;
pub mod tract;

/// Failures, split by whose fault they are: bad input exits 2, everything else 1.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model, a flag or an input file is unusable.
    #[error("{0}")]
    Input(String),
    /// Something failed that should not have.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// Prefixes the message with where it happened.
    pub fn context(self, what: &str) -> Self {
        match self {
            Error::Input(m) => Error::Input(format!("{what}: {m}")),
            Error::Internal(m) => Error::Internal(format!("{what}: {m}")),
        }
    }

    /// Process exit code of the CLI for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Input(_) => 2,
            Error::Internal(_) => 1,
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Internal(format!("candle: {e}"))
    }
}
