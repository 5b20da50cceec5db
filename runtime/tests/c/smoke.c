/* C smoke test of include/diffdfq.h against the static library: API contract checks, then one
 * run of a model file, printing the output floats' bits (so x86_64 and aarch64 runs can be
 * compared byte for byte). Usage: smoke MODEL.dfq */
#include "diffdfq.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static _Alignas(DFQ_ARENA_ALIGN) uint8_t arena[1 << 16];

int main(int argc, char **argv) {
    float x[128], y[10];
    if (argc != 2) return 2;
    if (strcmp(dfq_status_str(DFQ_OK), "ok") != 0) return 10;
    if (strcmp(dfq_status_str(-7), "unknown status") != 0) return 10;
    if (dfq_arena_size(NULL, 0) != 0) return 11;
    if (dfq_run_f32(NULL, 0, x, 128, y, 10, arena, sizeof arena) != DFQ_ERR_NULL_POINTER) return 12;

    FILE *f = fopen(argv[1], "rb");
    if (!f) return 3;
    static uint8_t model[1 << 16];
    size_t len = fread(model, 1, sizeof model, f);
    fclose(f);

    size_t need = dfq_arena_size(model, len);
    if (need == 0 || need > sizeof arena) return 13;
    for (int i = 0; i < 128; i++) x[i] = (float)((i * 37) % 101) / 25.0f - 2.0f;
    int st = dfq_run_f32(model, len, x, 128, y, 10, arena, need);
    if (st != DFQ_OK) {
        fprintf(stderr, "dfq_run_f32: %s\n", dfq_status_str(st));
        return 14;
    }
    if (dfq_run_f32(model, len, x, 128, y, 10, arena + 1, need) != DFQ_ERR_ARENA_MISALIGNED) return 15;
    if (dfq_run_f32(model, len, x, 127, y, 10, arena, need) != DFQ_ERR_INPUT_SIZE) return 16;
    if (dfq_run_f32(model, len, x, 128, y, 10, arena, need - 1) != DFQ_ERR_ARENA_TOO_SMALL) return 17;
    /* Misuse: every case is a status, never a crash (README "Reliability"). */
    if (dfq_run_f32(model, len - 1, x, 128, y, 10, arena, need) != DFQ_ERR_TRUNCATED) return 30;
    if (dfq_run_f32(model, len, x, 128, y, 9, arena, need) != DFQ_ERR_OUTPUT_SIZE) return 31;
    if (dfq_run_f32(model, len, NULL, 128, y, 10, arena, need) != DFQ_ERR_NULL_POINTER) return 32;
    if (dfq_run_f32(model, len, x, 128, NULL, 10, arena, need) != DFQ_ERR_NULL_POINTER) return 33;
    if (dfq_run_f32(model, len, x, 128, y, 10, NULL, need) != DFQ_ERR_NULL_POINTER) return 34;
    if (dfq_prepare(NULL, model, len) != DFQ_ERR_NULL_POINTER) return 35;
    if (dfq_run_prepared(NULL, x, 128, y, 10, arena, need) != DFQ_ERR_NULL_POINTER) return 36;
    /* Validate once, run many: the same bits as dfq_run_f32. */
    dfq_model prepared;
    float yp[10];
    if (dfq_prepare(&prepared, model, len) != DFQ_OK) return 20;
    for (int k = 0; k < 3; k++) {
        if (dfq_run_prepared(&prepared, x, 128, yp, 10, arena, need) != DFQ_OK) return 21;
        if (memcmp(y, yp, sizeof y) != 0) return 22;
    }
    /* Another model in the prepared buffer (its checksum differs): refused, not run. */
    model[12] ^= 1;
    if (dfq_run_prepared(&prepared, x, 128, yp, 10, arena, need) != DFQ_ERR_CHECKSUM) return 25;
    model[12] ^= 1;
    model[len / 2] ^= 1;
    if (dfq_run_f32(model, len, x, 128, y, 10, arena, need) != DFQ_ERR_CHECKSUM) return 18;
    dfq_model failed;
    if (dfq_prepare(&failed, model, len) != DFQ_ERR_CHECKSUM) return 23;
    if (dfq_run_prepared(&failed, x, 128, yp, 10, arena, need) != DFQ_ERR_BAD_ARGUMENT) return 24;

    float sum = 0;
    for (int i = 0; i < 10; i++) {
        uint32_t b;
        memcpy(&b, &y[i], 4);
        printf("%08x\n", (unsigned)b);
        sum += y[i];
    }
    if (sum < 0.9999f || sum > 1.0001f) return 19;
    return 0;
}
