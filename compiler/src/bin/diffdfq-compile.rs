//! diffdfq-compile: ONNX CNN → ultra-low-bit integer artifact.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use diffdfq_compiler::import::{import_path, ImportOptions};
use diffdfq_compiler::{inspect, Error};

#[derive(Parser)]
#[command(
    version,
    about = "Data-free ultra-low-bit quantizing compiler for ONNX CNNs"
)]
struct Args {
    /// FP32 ONNX model
    model: PathBuf,
    /// Print the imported graph (ops, shapes, parameters, MACs, BatchNorm layers) and exit
    #[arg(long)]
    inspect: bool,
    /// Input shape overriding the model's, e.g. 1,3,224,224
    #[arg(long, value_delimiter = ',')]
    input_shape: Option<Vec<usize>>,
}

fn run(a: &Args) -> Result<(), Error> {
    let opts = ImportOptions {
        input_shape: a.input_shape.clone(),
        ..Default::default()
    };
    let graph = import_path(&a.model, &opts)?;
    if a.inspect {
        let name = a
            .model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        print!("{}", inspect::render(&name, &graph));
        return Ok(());
    }
    Err(Error::Internal(
        "emitting a quantized artifact is not implemented in this build yet; only --inspect is"
            .into(),
    ))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("diffdfq-compile: error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
