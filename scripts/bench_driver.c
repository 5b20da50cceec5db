/* The C side of scripts/bench: the runtime as firmware links it (libNAME.a), timed.
 *
 *     bench_driver MODEL.dfq INPUTS.f32 N_INPUTS OUTPUT_LEN
 *
 * INPUTS.f32 holds N_INPUTS samples of raw little-endian f32, back to back; OUTPUT_LEN is the
 * number of floats the model writes (the report's output shape). The model is
 * prepared once (dfq_prepare), then each sample runs once through dfq_run_prepared after one
 * warm-up run; prints the median milliseconds per run. Exit 1 with a one-line message on any
 * failure. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "diffdfq.h"

static void *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "bench_driver: %s: cannot open\n", path);
        exit(1);
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *buf = malloc(n > 0 ? (size_t)n : 1);
    if (!buf || n < 0 || fread(buf, 1, (size_t)n, f) != (size_t)n) {
        fprintf(stderr, "bench_driver: %s: cannot read\n", path);
        exit(1);
    }
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: bench_driver MODEL.dfq INPUTS.f32 N_INPUTS OUTPUT_LEN\n");
        return 2;
    }
    size_t model_len, in_bytes;
    const uint8_t *model = slurp(argv[1], &model_len);
    const float *inputs = slurp(argv[2], &in_bytes);
    size_t n = (size_t)strtoul(argv[3], NULL, 10);
    dfq_model m;
    int st = dfq_prepare(&m, model, model_len);
    if (st != 0) {
        fprintf(stderr, "bench_driver: %s: %s\n", argv[1], dfq_status_str(st));
        return 1;
    }
    size_t per_in = n ? in_bytes / sizeof(float) / n : 0;
    if (n == 0 || per_in * n * sizeof(float) != in_bytes) {
        fprintf(stderr, "bench_driver: %s: not %zu samples\n", argv[2], n);
        return 1;
    }
    size_t arena_len = dfq_arena_size(model, model_len);
    uint8_t *arena = aligned_alloc(DFQ_ARENA_ALIGN,
                                   (arena_len + DFQ_ARENA_ALIGN - 1) / DFQ_ARENA_ALIGN * DFQ_ARENA_ALIGN);
    size_t len = (size_t)strtoul(argv[4], NULL, 10);
    float *out = malloc((len ? len : 1) * sizeof(float));
    double *ms = malloc(n * sizeof(double));
    if (!arena || !out || !ms) {
        fprintf(stderr, "bench_driver: out of memory\n");
        return 1;
    }
    st = dfq_run_prepared(&m, inputs, per_in, out, len, arena, arena_len); /* warm-up */
    if (st != 0) {
        fprintf(stderr, "bench_driver: %s: %s\n", argv[1], dfq_status_str(st));
        return 1;
    }
    for (size_t i = 0; i < n; i++) {
        double t0 = now_ms();
        st = dfq_run_prepared(&m, inputs + i * per_in, per_in, out, len, arena, arena_len);
        ms[i] = now_ms() - t0;
        if (st != 0) {
            fprintf(stderr, "bench_driver: %s: %s\n", argv[1], dfq_status_str(st));
            return 1;
        }
    }
    qsort(ms, n, sizeof(double), cmp);
    printf("%.2f\n", ms[n / 2]);
    return 0;
}
