//! The importer, rtn and lowering on structure-aware mutations of real ONNX files.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    diffdfq_fuzz::onnx(data);
});

libfuzzer_sys::fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    // One in four mutations is libFuzzer's own byte-level one (it also repairs what the
    // structural mutator cannot decode); the rest edit the decoded model.
    if seed % 4 == 0 {
        return libfuzzer_sys::fuzzer_mutate(data, size, max_size);
    }
    match diffdfq_fuzz::mutate_onnx(&data[..size], seed as u64, max_size) {
        Some(m) => {
            data[..m.len()].copy_from_slice(&m);
            m.len()
        }
        None => libfuzzer_sys::fuzzer_mutate(data, size, max_size),
    }
});
