//! Import never panics: random byte mutations of the fixtures either import or fail with an
//! error (no panic, no abort).

use diffdfq_compiler::import::{import_bytes, ImportOptions};

/// xorshift64*: a fixed, dependency-free sequence so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn mutated_models_import_or_fail_cleanly() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut ok, mut err) = (0, 0);
    for name in ["resnet_fmnist.onnx", "mobilenet_fmnist.onnx"] {
        let orig = std::fs::read(dir.join(name)).unwrap();
        for case in 0..300u32 {
            let mut b = orig.clone();
            // Mutations land in the graph structure (the front and the tail hold node and
            // shape records; the middle is mostly weight bytes).
            for _ in 0..1 + rng.next() % 8 {
                let region = if rng.next().is_multiple_of(2) {
                    b.len().min(4096)
                } else {
                    b.len()
                };
                let i = if rng.next().is_multiple_of(3) {
                    b.len() - 1 - (rng.next() as usize % region)
                } else {
                    rng.next() as usize % region
                };
                b[i] = match rng.next() % 4 {
                    0 => b[i] ^ (1 << (rng.next() % 8)),
                    1 => 0xff,
                    2 => 0,
                    _ => rng.next() as u8,
                };
            }
            if case.is_multiple_of(10) {
                b.truncate(rng.next() as usize % b.len());
            }
            match std::panic::catch_unwind(|| import_bytes(&b, &ImportOptions::default())) {
                Ok(Ok(_)) => ok += 1,
                Ok(Err(_)) => err += 1,
                Err(_) => panic!("{name}: mutation case {case} panicked"),
            }
        }
    }
    println!("mutated models: {ok} imported, {err} rejected");
    assert!(err > 0);
}
