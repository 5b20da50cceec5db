//! `libdiffdfq_device.a`: the runtime's C ABI (`include/diffdfq.h`) as a std-less static
//! library. The entry points live in `diffdfq_runtime::capi`; this crate only re-exports them
//! and supplies what a `#![no_std]` static library must: a panic handler.
#![no_std]

pub use diffdfq_runtime::capi::{dfq_arena_size, dfq_run_f32, dfq_status_str};

/// Never reached: no panic is reachable from the runtime's API (and panic=abort). Spins rather
/// than returning into undefined state.
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// The precompiled `core` of hosted targets is built for unwinding and its unwind tables refer
/// to this symbol. Nothing unwinds here, so it is never called; it only lets C programs link.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
