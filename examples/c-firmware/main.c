/*
 * A minimal firmware-style host program for a diffdfq model: static arena, no allocation.
 *
 * Build against libNAME.a only (the model and the runtime are both in it):
 *   cc -std=c11 -O2 -I OUT -DMODEL=NAME -DMODEL_UP=NAME_UP '-DMODEL_HEADER="NAME.h"' \
 *      main.c -L OUT -lNAME -o app
 * Run:
 *   ./app input.f32 output.f32
 * input.f32 holds N samples of raw little-endian float32 (NAME_UP_INPUT_SIZE values each);
 * output.f32 receives N outputs (NAME_UP_OUTPUT_SIZE values each), bit for bit what the
 * runtime computed.
 */
#include <stdio.h>
#include <stdlib.h>
#include "firmware.h"

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s input.f32 output.f32\n", argv[0]);
        return 2;
    }
    if (dfq_arena_size(MODEL_BYTES, MODEL_LEN) > sizeof arena) {
        fprintf(stderr, "model needs a larger arena than %s.h says\n", "MODEL");
        return 1;
    }
    FILE *in = fopen(argv[1], "rb");
    FILE *out = fopen(argv[2], "wb");
    if (!in || !out) {
        fprintf(stderr, "cannot open %s or %s\n", argv[1], argv[2]);
        return 2;
    }
    size_t n = 0;
    while (fread(input, sizeof(float), INPUT_SIZE, in) == INPUT_SIZE) {
        int st = dfq_run_f32(MODEL_BYTES, MODEL_LEN, input, INPUT_SIZE, output, OUTPUT_SIZE, arena,
                             sizeof arena);
        if (st != DFQ_OK) {
            fprintf(stderr, "sample %zu: %s\n", n, dfq_status_str(st));
            return 1;
        }
        if (fwrite(output, sizeof(float), OUTPUT_SIZE, out) != OUTPUT_SIZE) {
            fprintf(stderr, "cannot write %s\n", argv[2]);
            return 1;
        }
        n++;
    }
    fclose(in);
    if (fclose(out) != 0) {
        return 1;
    }
    printf("%zu samples\n", n);
    return n > 0 ? 0 : 2;
}
