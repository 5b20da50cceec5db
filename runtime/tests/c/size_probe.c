/* Links the runtime into a static program with --gc-sections; built with and without
 * -DUSE_DFQ, the difference in .text is what the runtime adds to a firmware. */
#include "diffdfq.h"

#include <stdio.h>

static _Alignas(DFQ_ARENA_ALIGN) uint8_t arena[256];

int main(int argc, char **argv) {
    (void)argv;
#ifdef USE_DFQ
    float x[4] = {0}, y[4];
    int st = dfq_run_f32((const uint8_t *)argv, (size_t)argc, x, 4, y, 4, arena, sizeof arena);
    printf("%s %zu\n", dfq_status_str(st), dfq_arena_size((const uint8_t *)argv, (size_t)argc));
#else
    printf("%s %d\n", "x", arena[argc]);
#endif
    return 0;
}
