//! The `.npy` reader on arbitrary bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| diffdfq_fuzz::npy(data));
