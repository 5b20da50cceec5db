/*
 * Shared by main.c and classify.c: the model's header (MODEL_HEADER, named on the command
 * line with MODEL and MODEL_UP), its sizes, and the statically allocated buffers: the whole
 * program's memory is known at link time.
 */
#include MODEL_HEADER

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define ARENA_SIZE CAT(MODEL_UP, _ARENA_SIZE)
#define INPUT_SIZE CAT(MODEL_UP, _INPUT_SIZE)
#define OUTPUT_SIZE CAT(MODEL_UP, _OUTPUT_SIZE)
#define MODEL_BYTES CAT(MODEL, _model)
#define MODEL_LEN CAT(MODEL, _model_len)

static uint8_t arena[ARENA_SIZE] __attribute__((aligned(DFQ_ARENA_ALIGN)));
static float input[INPUT_SIZE];
static float output[OUTPUT_SIZE];
