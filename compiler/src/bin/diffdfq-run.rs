//! diffdfq-run: host execution of a model on a batch from a .npy file.

use std::collections::hash_map::{Entry, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::{Device, Tensor};
use clap::{Parser, ValueEnum};
use diffdfq_compiler::import::{import_path, ImportOptions};
use diffdfq_compiler::reference::FloatModel;
use diffdfq_compiler::{host, npy, tract, Error};
use diffdfq_runtime::Model;
use tract_nnef::prelude::{TractResult, TypedFact, TypedModel};

/// How a packed model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Engine {
    /// The integer device runtime, exactly as a device runs it
    Runtime,
    /// The packed-integer tract graph (custom ops calling the runtime's kernels)
    Tract,
}

/// Runs MODEL on the batch in --input (first axis = batch) and writes --output.
///
/// An .onnx model runs the float reference (candle); a .dfq model runs the integer device
/// runtime, one sample at a time, exactly as a device would, or with --engine tract the
/// packed-integer tract graph built from it; a .nnef.tgz archive (diffdfq-compile --emit nnef)
/// runs on tract.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Model file (.onnx, .dfq or .nnef.tgz)
    model: PathBuf,
    /// Engine for a packed model (default: runtime for .dfq, tract for .nnef.tgz)
    #[arg(long, value_enum)]
    engine: Option<Engine>,
    /// float32 .npy input; its first axis is the batch
    #[arg(long)]
    input: PathBuf,
    /// float32 .npy output to write
    #[arg(long)]
    output: PathBuf,
    /// Samples per forward pass (bounds memory on large batches)
    #[arg(long, default_value_t = 256)]
    chunk: usize,
    /// Also print each sample's argmax over the output's last axis (its predicted class)
    #[arg(long)]
    argmax: bool,
}

fn run(a: &Args) -> Result<(), Error> {
    let file = a.model.file_name().and_then(|e| e.to_str()).unwrap_or("");
    let ext = if file.ends_with(".nnef.tgz") || file.ends_with(".nnef.tar") {
        "nnef"
    } else {
        a.model.extension().and_then(|e| e.to_str()).unwrap_or("")
    };
    if !matches!(ext, "onnx" | "dfq" | "nnef") {
        return Err(Error::Input(format!(
            "{}: expected an .onnx, .dfq or .nnef.tgz model",
            a.model.display()
        )));
    }
    let engine = match (ext, a.engine) {
        ("onnx", Some(_)) => {
            return Err(Error::Input(
                "--engine applies to .dfq and .nnef.tgz models; an .onnx model runs the float reference".into(),
            ))
        }
        ("nnef", Some(Engine::Runtime)) => {
            return Err(Error::Input(format!(
                "{}: an NNEF archive runs on --engine tract; the runtime runs .dfq models",
                a.model.display()
            )))
        }
        ("nnef", _) => Engine::Tract,
        (_, e) => e.unwrap_or(Engine::Runtime),
    };
    let (shape, data) = npy::read_f32(&a.input)?;
    if shape.len() < 2 || shape[0] == 0 {
        return Err(Error::Input(format!(
            "{}: shape {shape:?} has no batch of samples",
            a.input.display()
        )));
    }
    if ext == "dfq" || ext == "nnef" {
        let bytes = std::fs::read(&a.model)
            .map_err(|e| Error::Input(format!("{}: {e}", a.model.display())))?;
        let (s, out) = match (ext, engine) {
            ("dfq", Engine::Runtime) => run_dfq(a, &bytes, &shape, &data)?,
            ("dfq", Engine::Tract) => {
                let m = tract::from_dfq(&bytes)
                    .map_err(|e| e.context(&a.model.display().to_string()))?;
                run_tract(a, &m, &shape, &data)?
            }
            _ => {
                let m = tract::nnef::from_bytes(&bytes)
                    .map_err(|e| e.context(&a.model.display().to_string()))?;
                run_tract(a, &m, &shape, &data)?
            }
        };
        return finish(a, s, out);
    }
    // A model that declares its sample shape: samples of another shape are the input file's
    // fault, said as such (imported at their shape, they would fail deep in some node).
    if let Ok(g) = import_path(&a.model, &ImportOptions::default()) {
        if let Some(&inp) = g.inputs.first() {
            check_samples(a, g.shape(inp), &shape)?;
        }
    }
    let batch = shape[0];
    let per: usize = shape[1..].iter().product();
    let chunk = a.chunk.clamp(1, batch);
    let mut models: HashMap<usize, FloatModel> = HashMap::new();
    let dev = Device::Cpu;
    // A graph that hard-codes batch 1 in a reshape imports only at batch 1: fall back to it.
    let mut step = chunk;
    let mut out_shape: Option<Vec<usize>> = None;
    let mut out = Vec::new();
    let mut start = 0;
    while start < batch {
        let n = step.min(batch - start);
        let m = match models.entry(n) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(slot) => {
                let mut s = shape.clone();
                s[0] = n;
                let opts = ImportOptions {
                    input_shape: Some(s),
                    ..Default::default()
                };
                match import_path(&a.model, &opts) {
                    Ok(g) if g.outputs.len() != 1 => {
                        return Err(Error::Input(format!(
                            "{}: has {} outputs, diffdfq-run writes one",
                            a.model.display(),
                            g.outputs.len()
                        )));
                    }
                    Ok(g) => slot.insert(FloatModel::new(&g, &dev)?),
                    Err(e) if n > 1 => {
                        let batch1 = ImportOptions {
                            input_shape: Some([&[1], &shape[1..]].concat()),
                            ..Default::default()
                        };
                        if import_path(&a.model, &batch1).is_ok() {
                            step = 1;
                            continue;
                        }
                        return Err(e);
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let x = Tensor::from_vec(
            data[start * per..(start + n) * per].to_vec(),
            &[&[n], &shape[1..]].concat()[..],
            &dev,
        )?;
        let y = m.forward(&[x])?.remove(0);
        out_shape.get_or_insert_with(|| y.dims().to_vec());
        out.extend(y.flatten_all()?.to_vec1::<f32>()?);
        start += n;
    }
    let mut s = out_shape.unwrap_or_default();
    s[0] = batch;
    finish(a, s, out)
}

/// Checks that the batch in `shape` holds samples of a batch-1 model input `in_dims`.
fn check_samples(a: &Args, in_dims: &[usize], shape: &[usize]) -> Result<(), Error> {
    // The model's batch is 1: a sample is everything after the input's first axis.
    if in_dims.len() != shape.len() || shape[1..] != in_dims[1..] {
        return Err(Error::Input(format!(
            "{}: takes samples of shape {:?}, {} holds {:?}",
            a.model.display(),
            in_dims.get(1..).unwrap_or(&[]),
            a.input.display(),
            &shape[1..]
        )));
    }
    Ok(())
}

/// Runs a packed-integer tract graph (batch 1) sample by sample.
fn run_tract(
    a: &Args,
    model: &TypedModel,
    shape: &[usize],
    data: &[f32],
) -> Result<(Vec<usize>, Vec<f32>), Error> {
    let concrete = |f: TractResult<&TypedFact>| -> Option<Vec<usize>> {
        Some(f.ok()?.shape.as_concrete()?.to_vec())
    };
    let (Some(in_dims), Some(out_dims)) = (
        concrete(model.input_fact(0)),
        concrete(model.output_fact(0)),
    ) else {
        return Err(Error::Input(format!(
            "{}: the graph has no single input and output of fixed shape",
            a.model.display()
        )));
    };
    check_samples(a, &in_dims, shape)?;
    let out = tract::run_samples(model, data)?;
    let mut s = out_dims;
    s[0] = shape[0];
    Ok((s, out))
}

/// Runs a `.dfq` blob on the runtime, sample by sample (the model has batch 1).
fn run_dfq(
    a: &Args,
    blob: &[u8],
    shape: &[usize],
    data: &[f32],
) -> Result<(Vec<usize>, Vec<f32>), Error> {
    let model = Model::from_bytes(blob).map_err(|e| {
        Error::Input(format!(
            "{}: not a valid .dfq model: {e}",
            a.model.display()
        ))
    })?;
    let dims = |t: &diffdfq_runtime::format::TensorInfo| -> Vec<usize> {
        t.shape().iter().map(|&d| d as usize).collect()
    };
    let (in_dims, out_dims) = (dims(model.input()), dims(model.output()));
    check_samples(a, &in_dims, shape)?;
    let out =
        host::run_batch(&model, data).map_err(|e| e.context(&a.model.display().to_string()))?;
    let mut s = out_dims;
    s[0] = shape[0];
    Ok((s, out))
}

fn finish(a: &Args, s: Vec<usize>, out: Vec<f32>) -> Result<(), Error> {
    if a.argmax {
        let last = s.last().copied().unwrap_or(1).max(1);
        let classes: Vec<String> = out
            .chunks(last)
            .map(|row| host::argmax(row).to_string())
            .collect();
        println!("{}", classes.join(" "));
    }
    npy::write_atomic(&a.output, &npy::to_bytes(&s, &out)?)
}

fn main() -> ExitCode {
    let args: Args = match diffdfq_compiler::cli::parse("diffdfq-run") {
        Ok(a) => a,
        Err(code) => return code,
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("diffdfq-run: error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
