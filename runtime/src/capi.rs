//! The C ABI (`include/diffdfq.h`). Every entry point validates its pointers and lengths,
//! returns a status instead of panicking, and never unwinds.

use crate::error::{status_message_nul, Error};
use crate::exec::run;
use crate::format::Model;
use core::ffi::{c_char, c_int};
use core::mem::{align_of, size_of};

/// Borrows `len` elements at `p`, refusing NULL, misalignment and lengths beyond `isize::MAX`
/// bytes.
///
/// # Safety
/// If `p` is non-NULL it must point to `len` readable elements that stay valid and unmodified
/// for `'a`.
unsafe fn slice_in<'a, T>(p: *const T, len: usize) -> Result<&'a [T], Error> {
    if p.is_null() {
        return Err(Error::NullPointer);
    }
    if !(p as usize).is_multiple_of(align_of::<T>()) {
        return Err(Error::BufferMisaligned);
    }
    if len
        .checked_mul(size_of::<T>())
        .is_none_or(|b| b > isize::MAX as usize)
    {
        return Err(Error::BadArgument);
    }
    // SAFETY: non-NULL, aligned, length bounded; validity is the caller's contract.
    Ok(unsafe { core::slice::from_raw_parts(p, len) })
}

/// The byte range `[start, end)` of a buffer.
fn range<T>(p: *const T, len: usize) -> (usize, usize) {
    let start = p as usize;
    (
        start,
        start.saturating_add(len.saturating_mul(size_of::<T>())),
    )
}

fn overlap(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 < a.1 && b.0 < b.1 && a.0 < b.1 && b.0 < a.1
}

/// A model validated once by `dfq_prepare` (`dfq_model` in `diffdfq.h`): the caller owns it;
/// its fields are the runtime's.
#[repr(C)]
pub struct DfqModel {
    model: *const u8,
    model_len: usize,
    /// The blob's checksum, verified by `dfq_prepare`.
    checksum: u32,
    /// [`PREPARED`] once `dfq_prepare` succeeded, 0 after a failure.
    tag: u32,
}

/// Marks a [`DfqModel`] that `dfq_prepare` filled in.
const PREPARED: u32 = 0x4446_5150; // "DFQP"

/// Validates a model once (CRC included) into `out`: see `dfq_prepare` in `diffdfq.h`.
///
/// # Safety
/// `out` must be NULL or point to a writable `DfqModel`; a non-NULL `model` must point to
/// `model_len` readable bytes that stay valid while `out` is used.
#[no_mangle]
pub unsafe extern "C" fn dfq_prepare(
    out: *mut DfqModel,
    model: *const u8,
    model_len: usize,
) -> c_int {
    if out.is_null() || !(out as usize).is_multiple_of(align_of::<DfqModel>()) {
        return Error::NullPointer.code();
    }
    // SAFETY: the caller's contract.
    let r = unsafe { slice_in(model, model_len) }
        .and_then(|m| Model::from_bytes(m).map(|v| v.header().checksum));
    let (checksum, tag, status) = match r {
        Ok(c) => (c, PREPARED, 0),
        Err(e) => (0, 0, e.code()),
    };
    // SAFETY: non-NULL and aligned (checked); writable by the caller's contract.
    unsafe {
        out.write(DfqModel {
            model,
            model_len,
            checksum,
            tag,
        })
    };
    status
}

/// Runs a model `dfq_prepare` validated: see `dfq_run_prepared` in `diffdfq.h`.
///
/// # Safety
/// `m` must be NULL or point to a `DfqModel` filled by `dfq_prepare`, whose blob is still
/// valid; the buffers as for [`dfq_run_f32`].
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn dfq_run_prepared(
    m: *const DfqModel,
    input: *const f32,
    input_len: usize,
    output: *mut f32,
    output_len: usize,
    arena: *mut u8,
    arena_len: usize,
) -> c_int {
    if m.is_null() || !(m as usize).is_multiple_of(align_of::<DfqModel>()) {
        return Error::NullPointer.code();
    }
    // SAFETY: non-NULL and aligned (checked); readable by the caller's contract.
    let p = unsafe { m.read() };
    if p.tag != PREPARED {
        return Error::BadArgument.code();
    }
    // SAFETY: the caller's contract.
    unsafe {
        run_checked(
            p.model,
            p.model_len,
            Some(p.checksum),
            (input, input_len),
            (output, output_len),
            (arena, arena_len),
        )
    }
}

/// Runs a `.dfq` model: see `dfq_run_f32` in `diffdfq.h`. Returns 0 or an [`Error::code`].
///
/// # Safety
/// Non-NULL pointers must point to buffers of the given element counts; `output` and `arena`
/// must be writable. Overlapping writable buffers are refused with a status.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn dfq_run_f32(
    model: *const u8,
    model_len: usize,
    input: *const f32,
    input_len: usize,
    output: *mut f32,
    output_len: usize,
    arena: *mut u8,
    arena_len: usize,
) -> c_int {
    // SAFETY: the caller's contract.
    unsafe {
        run_checked(
            model,
            model_len,
            None,
            (input, input_len),
            (output, output_len),
            (arena, arena_len),
        )
    }
}

/// The body of both run entry points: `verified` is the checksum `dfq_prepare` verified, or
/// `None` to verify it now.
///
/// # Safety
/// As for [`dfq_run_f32`].
unsafe fn run_checked(
    model: *const u8,
    model_len: usize,
    verified: Option<u32>,
    (input, input_len): (*const f32, usize),
    (output, output_len): (*mut f32, usize),
    (arena, arena_len): (*mut u8, usize),
) -> c_int {
    let r = (|| -> Result<(), Error> {
        if model.is_null() || input.is_null() || output.is_null() || arena.is_null() {
            return Err(Error::NullPointer);
        }
        let ro = [range(model, model_len), range(input, input_len)];
        let (wo, wa) = (range(output, output_len), range(arena, arena_len));
        if overlap(wo, wa) || ro.iter().any(|&r| overlap(r, wo) || overlap(r, wa)) {
            return Err(Error::BadArgument);
        }
        // SAFETY: the caller's contract; the writable buffers overlap nothing else.
        let (m, x) = unsafe { (slice_in(model, model_len)?, slice_in(input, input_len)?) };
        let y = unsafe { slice_in(output, output_len)? };
        let a = unsafe { slice_in(arena, arena_len)? };
        let _ = (y, a);
        // SAFETY: as above, and unaliased (checked), so unique borrows are sound.
        let y = unsafe { core::slice::from_raw_parts_mut(output, output_len) };
        let a = unsafe { core::slice::from_raw_parts_mut(arena, arena_len) };
        let model = match verified {
            Some(c) => Model::from_verified_bytes(m, c)?,
            None => Model::from_bytes(m)?,
        };
        run(&model, x, y, a)
    })();
    match r {
        Ok(()) => 0,
        Err(e) => e.code(),
    }
}

/// A static NUL-terminated description of a status (`"unknown status"` for unknown codes).
#[no_mangle]
pub extern "C" fn dfq_status_str(status: c_int) -> *const c_char {
    status_message_nul(status).as_ptr() as *const c_char
}

/// The SIMD kernels this build holds ([`crate::kernels::KERNELS`]), NUL-terminated.
#[no_mangle]
pub extern "C" fn dfq_kernels() -> *const c_char {
    crate::kernels::KERNELS_NUL.as_ptr() as *const c_char
}

/// The arena size a model needs, or 0 if the model is NULL or invalid.
///
/// # Safety
/// A non-NULL `model` must point to `model_len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn dfq_arena_size(model: *const u8, model_len: usize) -> usize {
    // SAFETY: the caller's contract.
    match unsafe { slice_in(model, model_len) }.and_then(Model::from_bytes) {
        Ok(m) => m.arena_size(),
        Err(_) => 0,
    }
}
