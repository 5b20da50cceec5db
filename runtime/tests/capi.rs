//! The C ABI, called from Rust: NULL pointers, bad sizes, misalignment, overlap, bad models,
//! and agreement of `include/diffdfq.h` with the Rust status codes.

#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

use diffdfq_runtime_testkit as common;

use common::*;
use diffdfq_runtime::capi::{
    dfq_arena_size, dfq_prepare, dfq_run_f32, dfq_run_prepared, dfq_status_str, DfqModel,
};
use diffdfq_runtime::error::STATUS_MAX;
use diffdfq_runtime::{run, Error, Model};
use std::ffi::CStr;
use std::ptr;

const HEADER: &str = include_str!("../include/diffdfq.h");

fn status_text(code: i32) -> String {
    unsafe { CStr::from_ptr(dfq_status_str(code)) }
        .to_str()
        .unwrap()
        .to_owned()
}

#[test]
fn status_strings_are_static_and_distinct() {
    assert_eq!(status_text(0), "ok");
    let mut seen = std::collections::HashSet::new();
    for code in 0..=STATUS_MAX {
        let t = status_text(code);
        assert!(!t.is_empty() && t != "unknown status", "{code}");
        assert!(seen.insert(t), "duplicate text for {code}");
    }
    assert_eq!(status_text(-1), "unknown status");
    assert_eq!(status_text(STATUS_MAX + 1), "unknown status");
    assert_eq!(
        Error::ChecksumMismatch.message(),
        status_text(Error::ChecksumMismatch.code())
    );
}

#[test]
fn header_matches_the_rust_side() {
    // Exactly the six entry points.
    for proto in [
        "int dfq_prepare(dfq_model *out, const uint8_t *model, size_t model_len);",
        "int dfq_run_prepared(const dfq_model *m, const float *input, size_t input_len, float *output,\n                     size_t output_len, uint8_t *arena, size_t arena_len);",
        "int dfq_run_f32(const uint8_t *model, size_t model_len, const float *input, size_t input_len,\n                float *output, size_t output_len, uint8_t *arena, size_t arena_len);",
        "const char *dfq_status_str(int status);",
        "size_t dfq_arena_size(const uint8_t *model, size_t model_len);",
        "const char *dfq_kernels(void);",
    ] {
        assert!(HEADER.contains(proto), "missing {proto}");
    }
    assert_eq!(HEADER.matches(");\n").count(), 6);
    // dfq_kernels names the kernels this build holds.
    let k = unsafe { CStr::from_ptr(diffdfq_runtime::capi::dfq_kernels()) };
    assert_eq!(k.to_str().unwrap(), diffdfq_runtime::kernels::KERNELS);
    assert!(
        ["avx512vnni", "avx2", "sse2", "neondot", "neon", "portable"]
            .contains(&diffdfq_runtime::kernels::KERNELS)
    );
    // The caller allocates dfq_model: its C layout is the Rust one.
    assert!(HEADER.contains(
        "typedef struct {\n    const uint8_t *model;\n    size_t model_len;\n    uint32_t checksum;\n    uint32_t tag;\n} dfq_model;"
    ));
    assert_eq!(
        std::mem::size_of::<DfqModel>(),
        2 * std::mem::size_of::<usize>() + 8
    );
    // Every status 0..=STATUS_MAX is defined once, with the Rust numbering.
    let mut codes: Vec<i32> = HEADER
        .lines()
        .filter_map(|l| l.strip_prefix("#define DFQ_"))
        .filter(|l| l.starts_with("OK") || l.starts_with("ERR_"))
        .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
        .collect();
    codes.sort();
    assert_eq!(codes, (0..=STATUS_MAX).collect::<Vec<_>>());
    for (name, e) in [
        ("DFQ_ERR_NULL_POINTER", Error::NullPointer),
        ("DFQ_ERR_CHECKSUM", Error::ChecksumMismatch),
        ("DFQ_ERR_INPUT_SIZE", Error::InputSize),
        ("DFQ_ERR_OUTPUT_SIZE", Error::OutputSize),
        ("DFQ_ERR_ARENA_TOO_SMALL", Error::ArenaTooSmall),
        ("DFQ_ERR_ARENA_MISALIGNED", Error::ArenaMisaligned),
        ("DFQ_ERR_BUFFER_MISALIGNED", Error::BufferMisaligned),
        ("DFQ_ERR_BAD_ARGUMENT", Error::BadArgument),
    ] {
        assert!(
            HEADER.contains(&format!("#define {name} {}\n", e.code())),
            "{name}"
        );
    }
    assert!(HEADER.contains(&format!(
        "#define DFQ_ARENA_ALIGN {}\n",
        diffdfq_runtime::ARENA_ALIGN
    )));
}

#[test]
fn arena_size_of_good_bad_and_null_models() {
    let blob = small_model(3, 8, 5);
    let m = Model::from_bytes(&blob).unwrap();
    unsafe {
        assert_eq!(dfq_arena_size(blob.as_ptr(), blob.len()), m.arena_size());
        assert_eq!(dfq_arena_size(ptr::null(), blob.len()), 0);
        assert_eq!(dfq_arena_size(blob.as_ptr(), blob.len() - 1), 0);
        assert_eq!(dfq_arena_size(blob.as_ptr(), 0), 0);
    }
}

#[test]
fn run_f32_statuses() {
    let blob = small_model(2, 4, 5);
    let m = Model::from_bytes(&blob).unwrap();
    let n = m.arena_size();
    let input: Vec<f32> = (0..128).map(|i| (i as f32).cos()).collect();
    let mut out = vec![0f32; 10];
    let mut arena = Arena::new(n + 64);
    let a = arena.bytes().as_mut_ptr();
    let call = |model: *const u8,
                ml: usize,
                x: *const f32,
                xl: usize,
                y: *mut f32,
                yl: usize,
                ar: *mut u8,
                al: usize| unsafe { dfq_run_f32(model, ml, x, xl, y, yl, ar, al) };
    let (mp, ml) = (blob.as_ptr(), blob.len());
    let (xp, yp) = (input.as_ptr(), out.as_mut_ptr());
    // NULL pointers.
    assert_eq!(
        call(ptr::null(), ml, xp, 128, yp, 10, a, n),
        Error::NullPointer.code()
    );
    assert_eq!(
        call(mp, ml, ptr::null(), 128, yp, 10, a, n),
        Error::NullPointer.code()
    );
    assert_eq!(
        call(mp, ml, xp, 128, ptr::null_mut(), 10, a, n),
        Error::NullPointer.code()
    );
    assert_eq!(
        call(mp, ml, xp, 128, yp, 10, ptr::null_mut(), n),
        Error::NullPointer.code()
    );
    // Sizes.
    assert_eq!(call(mp, ml, xp, 127, yp, 10, a, n), Error::InputSize.code());
    assert_eq!(call(mp, ml, xp, 128, yp, 9, a, n), Error::OutputSize.code());
    assert_eq!(
        call(mp, ml, xp, 128, yp, 10, a, n - 1),
        Error::ArenaTooSmall.code()
    );
    assert_eq!(
        call(mp, ml - 1, xp, 128, yp, 10, a, n),
        Error::Truncated.code()
    );
    assert_eq!(call(mp, 0, xp, 128, yp, 10, a, n), Error::Truncated.code());
    assert_eq!(
        call(mp, ml, xp, usize::MAX / 2, yp, 10, a, n),
        Error::BadArgument.code()
    );
    // Alignment.
    assert_eq!(
        call(mp, ml, xp, 128, yp, 10, unsafe { a.add(1) }, n),
        Error::ArenaMisaligned.code()
    );
    let mut raw = vec![0u8; 64];
    let odd = unsafe { raw.as_mut_ptr().add(1 + raw.as_ptr().align_offset(4)) } as *mut f32;
    assert_eq!(
        call(mp, ml, xp, 128, odd, 10, a, n),
        Error::BufferMisaligned.code()
    );
    // Output overlapping the arena.
    assert_eq!(
        call(mp, ml, xp, 128, a as *mut f32, 10, a, n),
        Error::BadArgument.code()
    );
    // Corrupt model.
    let mut bad = blob.clone();
    bad[100] ^= 1;
    assert_eq!(
        call(bad.as_ptr(), bad.len(), xp, 128, yp, 10, a, n),
        Error::ChecksumMismatch.code()
    );
    // Success equals the Rust API.
    assert_eq!(call(mp, ml, xp, 128, yp, 10, a, n), 0);
    let mut want = vec![0f32; 10];
    run(&m, &input, &mut want, arena.bytes()).unwrap();
    assert_eq!(out, want);
}

/// Validate once, run many: the same outputs as `dfq_run_f32`; a failed prepare is refused at
/// run time; a blob changed after prepare fails with a status or runs inside its buffers.
#[test]
fn prepared_runs_equal_validated_runs() {
    let blob = small_model(3, 4, 5);
    let m = Model::from_bytes(&blob).unwrap();
    let n = m.arena_size();
    let input: Vec<f32> = (0..128).map(|i| (i as f32 * 0.3).sin()).collect();
    let mut arena = Arena::new(n);
    let a = arena.bytes().as_mut_ptr();
    let mut want = vec![0f32; 10];
    assert_eq!(
        unsafe {
            dfq_run_f32(
                blob.as_ptr(),
                blob.len(),
                input.as_ptr(),
                128,
                want.as_mut_ptr(),
                10,
                a,
                n,
            )
        },
        0
    );
    let mut p = std::mem::MaybeUninit::<DfqModel>::uninit();
    assert_eq!(
        unsafe { dfq_prepare(p.as_mut_ptr(), blob.as_ptr(), blob.len()) },
        0
    );
    let run_p = |p: &DfqModel, y: &mut [f32]| unsafe {
        dfq_run_prepared(p, input.as_ptr(), 128, y.as_mut_ptr(), 10, a, n)
    };
    let p = unsafe { p.assume_init() };
    for _ in 0..3 {
        let mut got = vec![0f32; 10];
        assert_eq!(run_p(&p, &mut got), 0);
        assert_eq!(got, want);
    }
    // NULLs and sizes are still checked.
    let mut y = vec![0f32; 10];
    assert_eq!(
        unsafe { dfq_run_prepared(ptr::null(), input.as_ptr(), 128, y.as_mut_ptr(), 10, a, n) },
        Error::NullPointer.code()
    );
    assert_eq!(
        unsafe { dfq_run_prepared(&p, input.as_ptr(), 127, y.as_mut_ptr(), 10, a, n) },
        Error::InputSize.code()
    );
    assert_eq!(
        unsafe { dfq_prepare(ptr::null_mut(), blob.as_ptr(), blob.len()) },
        Error::NullPointer.code()
    );
    // A corrupt blob fails to prepare, and the result cannot run.
    let mut bad = blob.clone();
    bad[100] ^= 1;
    let mut q = std::mem::MaybeUninit::<DfqModel>::uninit();
    assert_eq!(
        unsafe { dfq_prepare(q.as_mut_ptr(), bad.as_ptr(), bad.len()) },
        Error::ChecksumMismatch.code()
    );
    let q = unsafe { q.assume_init() };
    assert_eq!(run_p(&q, &mut y), Error::BadArgument.code());
    // Every single byte of the blob flipped after a successful prepare: the structural checks
    // still stand between the bytes and the buffers (a status, or a run, never a crash).
    for i in 0..blob.len() {
        let mut b = blob.clone();
        let mut r = std::mem::MaybeUninit::<DfqModel>::uninit();
        assert_eq!(
            unsafe { dfq_prepare(r.as_mut_ptr(), b.as_ptr(), b.len()) },
            0
        );
        let r = unsafe { r.assume_init() };
        // In place: the prepared model keeps pointing at `b`'s buffer.
        b[i] ^= 0x5a;
        let _ = run_p(&r, &mut y);
        drop(b);
    }
}
