/*
 * diffdfq.h — C API of the diffdfq device runtime (crate diffdfq-runtime).
 *
 * A model is a packed .dfq blob (e.g. NAME_model / NAME_model_len from NAME.o). It is read in
 * place; dfq_run_f32 validates it on every call, dfq_prepare once for dfq_run_prepared. All
 * memory a run touches is the caller's: the input, the output and one arena of at least
 * dfq_arena_size() bytes whose start is DFQ_ARENA_ALIGN-byte aligned. No function allocates,
 * blocks, or unwinds; all are reentrant for distinct arenas.
 */
#ifndef DIFFDFQ_H
#define DIFFDFQ_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Required alignment of the arena's first byte. */
#define DFQ_ARENA_ALIGN 16

/* Status codes returned by dfq_run_f32 (dfq_status_str describes each). */
#define DFQ_OK 0
#define DFQ_ERR_NULL_POINTER 1
#define DFQ_ERR_TRUNCATED 2
#define DFQ_ERR_TRAILING_BYTES 3
#define DFQ_ERR_BAD_MAGIC 4
#define DFQ_ERR_UNSUPPORTED_VERSION 5
#define DFQ_ERR_CHECKSUM 6
#define DFQ_ERR_BAD_HEADER 7
#define DFQ_ERR_BAD_TENSOR 8
#define DFQ_ERR_ARENA_RANGE 9
#define DFQ_ERR_BAD_OP 10
#define DFQ_ERR_BAD_TENSOR_REF 11
#define DFQ_ERR_BAD_ORDER 12
#define DFQ_ERR_SHAPE_MISMATCH 13
#define DFQ_ERR_WEIGHT_SIZE 14
#define DFQ_ERR_BAD_QUANT 15
#define DFQ_ERR_ACCUMULATOR_OVERFLOW 16
#define DFQ_ERR_ARENA_OVERLAP 17
#define DFQ_ERR_SCRATCH_TOO_SMALL 18
#define DFQ_ERR_INPUT_SIZE 19
#define DFQ_ERR_OUTPUT_SIZE 20
#define DFQ_ERR_ARENA_TOO_SMALL 21
#define DFQ_ERR_ARENA_MISALIGNED 22
#define DFQ_ERR_BUFFER_MISALIGNED 23
#define DFQ_ERR_BAD_ARGUMENT 24

/*
 * Runs the model on one input (batch 1): input_len floats in the model's input layout (NCHW),
 * output_len floats out (dequantized output, or Softmax probabilities). Returns DFQ_OK, or a
 * non-zero status: bad model, sizes that do not match, arena too small or misaligned, NULL
 * pointers, misaligned float buffers, or writable buffers that overlap another buffer.
 */
int dfq_run_f32(const uint8_t *model, size_t model_len, const float *input, size_t input_len,
                float *output, size_t output_len, uint8_t *arena, size_t arena_len);

/*
 * A model validated once, run many times: dfq_prepare checks the whole blob, checksum included,
 * into a dfq_model the caller owns (its fields are the runtime's; the blob must stay in place).
 * dfq_run_prepared then skips the O(model bytes) checksum but repeats the O(ops) structural
 * checks, so a blob changed after dfq_prepare can still only fail with a status, never make
 * a run read outside it or the arena. A failed dfq_prepare leaves a dfq_model that
 * dfq_run_prepared refuses with DFQ_ERR_BAD_ARGUMENT.
 */
typedef struct {
    const uint8_t *model;
    size_t model_len;
    uint32_t checksum;
    uint32_t tag;
} dfq_model;

int dfq_prepare(dfq_model *out, const uint8_t *model, size_t model_len);

int dfq_run_prepared(const dfq_model *m, const float *input, size_t input_len, float *output,
                     size_t output_len, uint8_t *arena, size_t arena_len);

/* A static NUL-terminated description of a status ("unknown status" for unknown codes). */
const char *dfq_status_str(int status);

/* The SIMD kernels this build of the runtime holds ("avx512vnni", "avx2", "sse2",
 * "neondot", "neon" or "portable"): chosen at compile time from the CPU it was built for
 * (diffdfq-compile --cpu). */
const char *dfq_kernels(void);

/* Bytes of arena the model needs; 0 if the model is NULL or invalid. */
size_t dfq_arena_size(const uint8_t *model, size_t model_len);

#ifdef __cplusplus
}
#endif

#endif /* DIFFDFQ_H */
