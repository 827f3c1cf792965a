/* Decode speed through the C API: usage bench_capi BUNDLE RUNS NEW_TOKENS PROMPT_IDS.
 * Prints the median decode tokens/s over RUNS generations (greedy, EOS ignored). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgelm.h"

static bool count(const char *piece, size_t len, int32_t id, void *user) {
    (void)piece;
    (void)len;
    if (id >= 0) ++*(size_t *)user;
    return true;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 5) return 2;
    int runs = atoi(argv[2]);
    uint32_t prompt[1024];
    size_t n = 0;
    for (char *p = argv[4]; *p && n < 1024;) {
        prompt[n++] = (uint32_t)strtoul(p, &p, 10);
        if (*p == ',') p++;
    }
    edgelm_model *m = NULL;
    if (edgelm_model_load(argv[1], NULL, &m) != EDGELM_OK) {
        fprintf(stderr, "%s\n", edgelm_last_error());
        return 1;
    }
    edgelm_gen_params gp = edgelm_gen_params_default();
    gp.max_new_tokens = (uint32_t)atoi(argv[3]);
    gp.ignore_eos = true;
    double tps[256];
    for (int i = 0; i < runs + 1 && i < 256; i++) {
        size_t tokens = 0;
        edgelm_stats st;
        if (edgelm_generate_ids(m, prompt, n, &gp, count, &tokens, &st) != EDGELM_OK) return 1;
        if (i > 0) tps[i - 1] = st.decode_tokens_per_s; /* the first run warms up */
    }
    qsort(tps, (size_t)runs, sizeof(double), cmp);
    printf("%f\n", tps[runs / 2]);
    edgelm_model_free(m);
    return 0;
}
