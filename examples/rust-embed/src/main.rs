//! Host harness for the `#![no_std]` library: reads raw float32 images (and optional labels),
//! classifies each with the embedded model and prints class and top score.
//!
//!     classify images.f32 [labels.txt]

use diffdfq_rust_embed::{classify, model, ARENA_ALIGN};

/// An arena aligned as the runtime requires, carved out of a byte vector.
fn aligned(len: usize) -> (Vec<u8>, usize) {
    let buf = vec![0u8; len + ARENA_ALIGN];
    let at = buf.as_ptr().align_offset(ARENA_ALIGN);
    (buf, at)
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if !(2..=3).contains(&args.len()) {
        eprintln!("usage: classify images.f32 [labels.txt]");
        return std::process::ExitCode::from(2);
    }
    let m = match model() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("classify: the embedded model is invalid: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let (input_len, output_len) = (m.input().numel as usize, m.output().numel as usize);
    let raw = match std::fs::read(&args[1]) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("classify: {}: {e}", args[1]);
            return std::process::ExitCode::from(2);
        }
    };
    let images: Vec<f32> = raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let labels: Vec<usize> = match args.get(2).map(std::fs::read_to_string) {
        Some(Ok(t)) => t
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect(),
        Some(Err(e)) => {
            eprintln!("classify: {}: {e}", args[2]);
            return std::process::ExitCode::from(2);
        }
        None => Vec::new(),
    };
    let (mut buf, at) = aligned(m.arena_size());
    let arena = &mut buf[at..at + m.arena_size()];
    let mut scores = vec![0f32; output_len];
    let (mut n, mut correct) = (0, 0);
    for (i, x) in images.chunks_exact(input_len).enumerate() {
        let c = match classify(&m, x, &mut scores, arena) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("classify: sample {i}: {e}");
                return std::process::ExitCode::from(1);
            }
        };
        match labels.get(i) {
            Some(&l) => {
                correct += usize::from(l == c);
                println!("sample {i}: class {c}, score {:.3}, label {l}", scores[c]);
            }
            None => println!("sample {i}: class {c}, score {:.3}", scores[c]),
        }
        n += 1;
    }
    if !labels.is_empty() {
        println!("{correct} of {n} correct");
    }
    if n == 0 {
        return std::process::ExitCode::from(2);
    }
    std::process::ExitCode::SUCCESS
}
