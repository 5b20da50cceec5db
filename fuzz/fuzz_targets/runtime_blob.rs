//! The runtime's loader and executor on arbitrary bytes and mutated valid blobs.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| diffdfq_fuzz::blob(data));
