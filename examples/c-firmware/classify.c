/*
 * Classifies images with a diffdfq model linked from libNAME.a: static arena, no allocation,
 * the model's bytes compiled into the program. Built and run by this folder's Makefile.
 *
 *   ./classify images.f32 [labels.txt [outputs.f32]]
 *
 * images.f32 holds N samples of raw little-endian float32 (NAME_UP_INPUT_SIZE values each);
 * labels.txt, when given, holds N integers: the program then counts the correct ones;
 * outputs.f32 receives the raw outputs (NAME_UP_OUTPUT_SIZE floats per sample), bit for bit
 * what the runtime computed.
 * Prints one line per sample: class, confidence (softmax of the outputs) and, with labels,
 * the true class.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include "firmware.h"

/* Index of the largest output and its softmax probability. */
static int top1(const float *y, size_t n, float *confidence) {
    size_t best = 0;
    for (size_t i = 1; i < n; i++) {
        if (y[i] > y[best]) {
            best = i;
        }
    }
    float sum = 0.0f;
    for (size_t i = 0; i < n; i++) {
        sum += expf(y[i] - y[best]);
    }
    *confidence = 1.0f / sum;
    return (int)best;
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 4) {
        fprintf(stderr, "usage: %s images.f32 [labels.txt [outputs.f32]]\n", argv[0]);
        return 2;
    }
    FILE *in = fopen(argv[1], "rb");
    if (!in) {
        fprintf(stderr, "%s: cannot open\n", argv[1]);
        return 2;
    }
    FILE *labels = argc >= 3 ? fopen(argv[2], "r") : NULL;
    if (argc >= 3 && !labels) {
        fprintf(stderr, "%s: cannot open\n", argv[2]);
        return 2;
    }
    FILE *out = argc == 4 ? fopen(argv[3], "wb") : NULL;
    if (argc == 4 && !out) {
        fprintf(stderr, "%s: cannot open\n", argv[3]);
        return 2;
    }
    size_t n = 0, correct = 0;
    while (fread(input, sizeof(float), INPUT_SIZE, in) == INPUT_SIZE) {
        int st = dfq_run_f32(MODEL_BYTES, MODEL_LEN, input, INPUT_SIZE, output, OUTPUT_SIZE, arena,
                             sizeof arena);
        if (st != DFQ_OK) {
            fprintf(stderr, "sample %zu: %s\n", n, dfq_status_str(st));
            return 1;
        }
        if (out && fwrite(output, sizeof(float), OUTPUT_SIZE, out) != OUTPUT_SIZE) {
            fprintf(stderr, "%s: cannot write\n", argv[3]);
            return 1;
        }
        float p;
        int c = top1(output, OUTPUT_SIZE, &p);
        int label;
        if (labels && fscanf(labels, "%d", &label) == 1) {
            correct += label == c;
            printf("sample %zu: class %d, confidence %.1f %%, label %d\n", n, c, 100.0f * p, label);
        } else {
            printf("sample %zu: class %d, confidence %.1f %%\n", n, c, 100.0f * p);
        }
        n++;
    }
    fclose(in);
    if (out && fclose(out) != 0) {
        fprintf(stderr, "%s: cannot write\n", argv[3]);
        return 1;
    }
    if (labels) {
        fclose(labels);
        printf("%zu of %zu correct\n", correct, n);
    }
    return n > 0 ? 0 : 2;
}
