//! Writes the small test model (conv → relu → maxpool → fc → softmax, input 1×2×8×8, output 10)
//! at the given weight/activation widths, for the C smoke test in `scripts/ci-runtime.sh`.
//!
//! `cargo run --example write_small_model -- OUT.dfq [WEIGHT_BITS] [ACT_BITS]`

use diffdfq_runtime_testkit as common;

fn main() {
    let mut args = std::env::args().skip(1);
    let out = args
        .next()
        .expect("usage: write_small_model OUT.dfq [WEIGHT_BITS] [ACT_BITS]");
    let bits: u8 = args.next().map_or(3, |v| v.parse().expect("weight bits"));
    let a_bits: u8 = args
        .next()
        .map_or(8, |v| v.parse().expect("activation bits"));
    let blob = common::small_model(bits, a_bits, 42);
    std::fs::write(&out, &blob).expect("write model");
    println!("{out}: {} bytes, w{bits}/a{a_bits}", blob.len());
}
