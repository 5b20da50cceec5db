//! A `#![no_std]` static library exporting one function that loads and runs a model through
//! the Rust API with a fixed stack arena (a firmware's shape of use).
#![no_std]

use diffdfq_runtime::{run, Model, ARENA_ALIGN};

#[repr(C, align(16))]
struct Arena([u8; 4096]);

const _: () = assert!(core::mem::align_of::<Arena>() == ARENA_ALIGN);

/// Runs `model` on `input` into `output`; returns 0 or a status code.
///
/// # Safety
/// The pointers must point to buffers of the given lengths.
#[no_mangle]
pub unsafe extern "C" fn nostd_check_run(
    model: *const u8,
    model_len: usize,
    input: *const f32,
    input_len: usize,
    output: *mut f32,
    output_len: usize,
) -> i32 {
    if model.is_null() || input.is_null() || output.is_null() {
        return diffdfq_runtime::Error::NullPointer.code();
    }
    // SAFETY: the caller's contract.
    let (m, x, y) = unsafe {
        (
            core::slice::from_raw_parts(model, model_len),
            core::slice::from_raw_parts(input, input_len),
            core::slice::from_raw_parts_mut(output, output_len),
        )
    };
    let mut arena = Arena([0; 4096]);
    match Model::from_bytes(m).and_then(|m| run(&m, x, y, &mut arena.0)) {
        Ok(()) => 0,
        Err(e) => e.code(),
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {
        core::hint::spin_loop();
    }
}
