/* Exercises the edgelm C API as a firmware or C program would, including misuse. Builds as
 * C99 and C11 with -pedantic-errors and as C++, as the header promises.
 *
 * usage: test_capi BUNDLE EXPECTED_IDS PROMPT_IDS [ENCODER_BUNDLE EXPECTED_EMBEDDING]
 *   EXPECTED_IDS: comma-separated greedy ids the Rust runtime produced for PROMPT_IDS
 *                 (with ignore_eos and as many new tokens as listed).
 *   EXPECTED_EMBEDDING: comma-separated reference embedding of "Turn on the hallway light".
 * Prints one line per check and a final "N passed, M failed" line; exits non-zero on failure. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "edgelm.h"

static int passed, failed;

#define CHECK(cond, ...)                                  \
    do {                                                  \
        if (cond) {                                       \
            passed++;                                     \
        } else {                                          \
            failed++;                                     \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);   \
            printf(__VA_ARGS__);                          \
            printf(" (last error: %s)\n", edgelm_last_error()); \
        }                                                 \
    } while (0)

static size_t parse_ids(const char *csv, uint32_t *out, size_t cap) {
    size_t n = 0;
    const char *p = csv;
    while (*p && n < cap) {
        out[n++] = (uint32_t)strtoul(p, (char **)&p, 10);
        if (*p == ',') p++;
    }
    return n;
}

struct collect {
    uint32_t ids[512];
    size_t n;
    char text[8192];
    size_t text_len;
    size_t stop_after; /* 0 = never */
    useconds_t delay_us;
};

static bool on_token(const char *piece, size_t len, int32_t id, void *user) {
    struct collect *c = (struct collect *)user;
    if (id >= 0 && c->n < 512) c->ids[c->n++] = (uint32_t)id; /* -1: trailing text only */
    if (piece == NULL || strlen(piece) != len) return false; /* NUL-terminated, len bytes */
    if (c->text_len + len < sizeof c->text) {
        memcpy(c->text + c->text_len, piece, len);
        c->text_len += len;
        c->text[c->text_len] = 0;
    }
    if (c->delay_us) usleep(c->delay_us);
    return !(c->stop_after && c->n >= c->stop_after);
}

struct cancel_args {
    edgelm_model *model;
    useconds_t after_us;
};

static void *cancel_later(void *arg) {
    struct cancel_args *a = (struct cancel_args *)arg;
    usleep(a->after_us);
    edgelm_cancel(a->model);
    return NULL;
}

static void *free_later(void *arg) {
    struct cancel_args *a = (struct cancel_args *)arg;
    usleep(a->after_us);
    edgelm_model_free(a->model);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4 && argc != 6) {
        fprintf(stderr, "usage: %s BUNDLE EXPECTED_IDS PROMPT_IDS [ENCODER_BUNDLE EXPECTED_EMBEDDING]\n", argv[0]);
        return 2;
    }
    uint32_t expected[512], prompt[512];
    size_t n_expected = parse_ids(argv[2], expected, 512);
    size_t n_prompt = parse_ids(argv[3], prompt, 512);

    char version[32];
    snprintf(version, sizeof version, "%d.%d.%d", EDGELM_VERSION_MAJOR, EDGELM_VERSION_MINOR, EDGELM_VERSION_PATCH);
    CHECK(strcmp(edgelm_version(), version) == 0, "version %s equals the header's %s", edgelm_version(), version);

    /* A failed ONNX Runtime load is not remembered: a later load that finds the library (here
       through EDGELM_ORT_LIB, which the test sets) succeeds. This must be the first load. */
    edgelm_model *model = NULL;
    edgelm_load_options bad_ort = edgelm_load_options_default();
    bad_ort.ort_library = "/nonexistent/libonnxruntime.so";
    CHECK(edgelm_model_load(argv[1], &bad_ort, &model) == EDGELM_ERR_RUNTIME, "wrong ort_library fails");
    CHECK(strstr(edgelm_last_error(), "/nonexistent/libonnxruntime.so") != NULL, "message names the path");
    CHECK(strstr(edgelm_last_error(), "--") == NULL, "message speaks of no command-line flag: %s",
          edgelm_last_error());
    CHECK(model == NULL, "out untouched on a failed load");
    CHECK(edgelm_model_load(argv[1], NULL, &model) == EDGELM_OK && model != NULL, "then a load with defaults works");
    CHECK(edgelm_model_free(model) == EDGELM_OK, "free it");
    model = NULL;

    /* kv_cache is a plain integer checked at the boundary. */
    edgelm_load_options bad_kv = edgelm_load_options_default();
    bad_kv.kv_cache = 7;
    CHECK(edgelm_model_load(argv[1], &bad_kv, &model) == EDGELM_ERR_INVALID_ARGUMENT && model == NULL,
          "kv_cache 7 is refused");

    /* Misuse before any model exists. */
    CHECK(edgelm_model_load(NULL, NULL, &model) == EDGELM_ERR_INVALID_ARGUMENT, "NULL path");
    CHECK(strstr(edgelm_last_error(), "path is NULL") != NULL, "message names the argument");
    CHECK(edgelm_model_load(argv[1], NULL, NULL) == EDGELM_ERR_INVALID_ARGUMENT, "NULL out");
    CHECK(edgelm_model_load("/nonexistent/bundle", NULL, &model) == EDGELM_ERR_BUNDLE, "missing bundle");
    CHECK(model == NULL, "out untouched on failure");
    CHECK(edgelm_model_load("\xff\xfe", NULL, &model) == EDGELM_ERR_INVALID_UTF8, "invalid UTF-8 path");

    /* Signatures (the harness signs a copy of the bundle and names the files in the
       environment): a signed bundle loads with its key required, an unsigned, altered or
       foreign-signed one is EDGELM_ERR_SIGNATURE, and inconsistent options are refused. */
    const char *signed_bundle = getenv("EDGELM_TEST_SIGNED_BUNDLE");
    const char *altered_bundle = getenv("EDGELM_TEST_ALTERED_BUNDLE");
    const char *key = getenv("EDGELM_TEST_KEY");
    const char *other_key = getenv("EDGELM_TEST_OTHER_KEY");
    CHECK(signed_bundle && altered_bundle && key && other_key, "the harness set the signature files");
    if (signed_bundle && altered_bundle && key && other_key) {
        edgelm_load_options sig = edgelm_load_options_default();
        sig.trusted_keys = &key;
        sig.n_trusted_keys = 1;
        sig.require_signature = true;
        CHECK(edgelm_model_load(signed_bundle, &sig, &model) == EDGELM_OK && model != NULL,
              "signed bundle loads with its key required: %s", edgelm_last_error());
        CHECK(edgelm_model_free(model) == EDGELM_OK, "free it");
        model = NULL;
        CHECK(edgelm_model_load(argv[1], &sig, &model) == EDGELM_ERR_SIGNATURE && model == NULL,
              "unsigned bundle refused");
        CHECK(strstr(edgelm_last_error(), "unsigned") != NULL, "message says unsigned: %s", edgelm_last_error());
        CHECK(edgelm_model_load(altered_bundle, &sig, &model) == EDGELM_ERR_SIGNATURE && model == NULL,
              "altered bundle refused");
        CHECK(strstr(edgelm_last_error(), "altered") != NULL, "message says altered: %s", edgelm_last_error());
        sig.trusted_keys = &other_key;
        CHECK(edgelm_model_load(signed_bundle, &sig, &model) == EDGELM_ERR_SIGNATURE && model == NULL,
              "bundle signed by an untrusted key refused");
        CHECK(strstr(edgelm_last_error(), "not trusted") != NULL, "message: %s", edgelm_last_error());
        sig.trusted_keys = NULL;
        CHECK(edgelm_model_load(signed_bundle, &sig, &model) == EDGELM_ERR_INVALID_ARGUMENT, "NULL key array");
        sig.n_trusted_keys = 0;
        CHECK(edgelm_model_load(signed_bundle, &sig, &model) == EDGELM_ERR_INVALID_ARGUMENT,
              "required with no key");
        CHECK(model == NULL, "out untouched");
    }

    edgelm_load_options opts = edgelm_load_options_default();
    opts.threads = 1;
    edgelm_status st = edgelm_model_load(argv[1], &opts, &model);
    CHECK(st == EDGELM_OK && model != NULL, "load bundle: %d", (int)st);
    if (model == NULL) {
        printf("%d passed, %d failed\n", passed, failed);
        return 1;
    }

    /* What the model is. */
    edgelm_kind kind = EDGELM_KIND_ENCODER;
    uint32_t context = 0, vocab = 0, dim = 0;
    CHECK(edgelm_model_kind(model, &kind) == EDGELM_OK && kind == EDGELM_KIND_CAUSAL_LM, "kind: causal LM");
    CHECK(edgelm_model_context_length(model, &context) == EDGELM_OK && context > 0, "context length %u", context);
    CHECK(edgelm_model_vocab_size(model, &vocab) == EDGELM_OK && vocab > 0, "vocabulary size %u", vocab);
    CHECK(edgelm_model_embedding_dim(model, &dim) == EDGELM_ERR_UNSUPPORTED, "no embedding dim for a causal LM");
    CHECK(edgelm_model_vocab_size(model, NULL) == EDGELM_ERR_INVALID_ARGUMENT, "NULL out");
    CHECK(edgelm_model_context_length(NULL, &context) == EDGELM_ERR_INVALID_HANDLE, "NULL handle");

    /* Greedy ids equal the Rust runtime's. */
    edgelm_gen_params params = edgelm_gen_params_default();
    params.max_new_tokens = (uint32_t)n_expected;
    params.ignore_eos = true;
    struct collect c;
    memset(&c, 0, sizeof c);
    edgelm_stats stats;
    st = edgelm_generate_ids(model, prompt, n_prompt, &params, on_token, &c, &stats);
    CHECK(st == EDGELM_OK, "generate_ids: %d", (int)st);
    CHECK(c.n == n_expected, "token count %zu vs %zu", c.n, n_expected);
    CHECK(stats.generated_tokens == n_expected && stats.prompt_tokens == n_prompt, "stats counts");
    CHECK(stats.stop_reason == EDGELM_STOP_MAX_TOKENS, "stop reason max tokens");
    CHECK(stats.ttft_ms > 0 && stats.peak_rss_bytes > 0, "stats timing and memory");
    int same = c.n == n_expected;
    for (size_t i = 0; same && i < n_expected; i++) same = c.ids[i] == expected[i];
    CHECK(same, "greedy ids equal the Rust runtime's");

    /* Text prompt streams text. */
    struct collect t;
    memset(&t, 0, sizeof t);
    params.max_new_tokens = 16;
    edgelm_stats chat_stats, raw_stats;
    st = edgelm_generate(model, "Open the garage door", &params, on_token, &t, &chat_stats);
    CHECK(st == EDGELM_OK && t.n == 16, "text generate: %d, %zu tokens", (int)st, t.n);
    /* By default the prompt is one user turn of the chat template; raw_prompt feeds it as is. */
    params.raw_prompt = true;
    st = edgelm_generate(model, "Open the garage door", &params, NULL, NULL, &raw_stats);
    params.raw_prompt = false;
    CHECK(st == EDGELM_OK && chat_stats.prompt_tokens > raw_stats.prompt_tokens,
          "the chat template wraps the prompt: %u vs %u raw tokens", chat_stats.prompt_tokens, raw_stats.prompt_tokens);
    edgelm_stats untouched;
    memset(&untouched, 0xAB, sizeof untouched);
    CHECK(edgelm_generate(model, "", &params, NULL, NULL, &untouched) == EDGELM_ERR_INVALID_ARGUMENT &&
              untouched.prompt_tokens == 0xABABABABu,
          "stats untouched on failure");
    params.max_new_tokens = 0;
    CHECK(edgelm_generate(model, "hi", &params, NULL, NULL, NULL) == EDGELM_ERR_INVALID_ARGUMENT, "max_new_tokens 0");
    params.max_new_tokens = 16;

    /* Bad arguments to generate. */
    CHECK(edgelm_generate(model, "\xc3\x28", &params, on_token, &t, NULL) == EDGELM_ERR_INVALID_UTF8,
          "invalid UTF-8 prompt");
    CHECK(edgelm_generate(model, NULL, &params, on_token, &t, NULL) == EDGELM_ERR_INVALID_ARGUMENT, "NULL prompt");
    CHECK(edgelm_generate(NULL, "hi", &params, on_token, &t, NULL) == EDGELM_ERR_INVALID_HANDLE, "NULL model");
    CHECK(edgelm_generate(NULL, NULL, &params, on_token, &t, NULL) == EDGELM_ERR_INVALID_HANDLE,
          "the handle is checked before the prompt");
    CHECK(edgelm_generate_ids(NULL, NULL, 1, &params, NULL, NULL, NULL) == EDGELM_ERR_INVALID_HANDLE,
          "the handle is checked before the ids");
    int not_a_model = 42;
    CHECK(edgelm_generate((edgelm_model *)&not_a_model, "hi", &params, NULL, NULL, NULL) == EDGELM_ERR_INVALID_HANDLE,
          "foreign handle");
    CHECK(edgelm_generate(model, "", &params, NULL, NULL, NULL) == EDGELM_ERR_INVALID_ARGUMENT, "empty prompt");
    uint32_t huge = 1u << 30;
    CHECK(edgelm_generate_ids(model, &huge, 1, &params, NULL, NULL, NULL) == EDGELM_ERR_CONTEXT_OVERFLOW,
          "id outside the vocabulary");
    params.n_stop_strings = 1;
    params.stop_strings = NULL;
    CHECK(edgelm_generate(model, "hi", &params, NULL, NULL, NULL) == EDGELM_ERR_INVALID_ARGUMENT,
          "NULL stop_strings with a count");
    params.n_stop_strings = 0;

    /* The callback stops generation. */
    struct collect s;
    memset(&s, 0, sizeof s);
    s.stop_after = 3;
    params.max_new_tokens = 50;
    st = edgelm_generate_ids(model, prompt, n_prompt, &params, on_token, &s, &stats);
    CHECK(st == EDGELM_OK && s.n == 3 && stats.stop_reason == EDGELM_STOP_CANCELLED, "callback stop: %zu", s.n);

    /* edgelm_cancel from a second thread stops a long generation within a token. */
    struct collect l;
    memset(&l, 0, sizeof l);
    l.delay_us = 2000;
    params.max_new_tokens = 200;
    struct cancel_args ca = {model, 30000};
    pthread_t th;
    pthread_create(&th, NULL, cancel_later, &ca);
    st = edgelm_generate_ids(model, prompt, n_prompt, &params, on_token, &l, &stats);
    pthread_join(th, NULL);
    CHECK(st == EDGELM_OK && stats.stop_reason == EDGELM_STOP_CANCELLED && l.n < 200,
          "cancel from another thread: %zu tokens", l.n);
    CHECK(stats.generated_tokens == l.n, "cancelled stats count the delivered tokens");

    /* The model still works after all that. */
    struct collect again;
    memset(&again, 0, sizeof again);
    params.max_new_tokens = (uint32_t)n_expected;
    st = edgelm_generate_ids(model, prompt, n_prompt, &params, on_token, &again, NULL);
    same = st == EDGELM_OK && again.n == n_expected;
    for (size_t i = 0; same && i < n_expected; i++) same = again.ids[i] == expected[i];
    CHECK(same, "same greedy ids after misuse and cancellation");

    /* Embeddings are refused for a causal LM, with checks first. */
    float emb[8];
    size_t emb_len = 0;
    CHECK(edgelm_embed(model, "hi", emb, 8, &emb_len) == EDGELM_ERR_UNSUPPORTED, "embed unsupported");
    CHECK(edgelm_embed(model, "hi", emb, 8, NULL) == EDGELM_ERR_INVALID_ARGUMENT, "embed NULL out_len");

    /* Freeing a model while another thread generates with it returns at once and cancels
       that generation, which still returns normally. */
    edgelm_model *doomed = NULL;
    CHECK(edgelm_model_load(argv[1], &opts, &doomed) == EDGELM_OK, "load a second handle");
    struct collect d;
    memset(&d, 0, sizeof d);
    d.delay_us = 2000;
    params.max_new_tokens = 200;
    struct cancel_args fa = {doomed, 30000};
    pthread_create(&th, NULL, free_later, &fa);
    st = edgelm_generate_ids(doomed, prompt, n_prompt, &params, on_token, &d, &stats);
    pthread_join(th, NULL);
    CHECK(st == EDGELM_OK && stats.stop_reason == EDGELM_STOP_CANCELLED && d.n < 200,
          "free cancels the running generation: %zu tokens", d.n);
    CHECK(edgelm_model_free(doomed) == EDGELM_ERR_INVALID_HANDLE, "the freed handle is dead");

    /* Free, double free, use after free. */
    CHECK(edgelm_model_free(model) == EDGELM_OK, "free");
    CHECK(edgelm_model_free(model) == EDGELM_ERR_INVALID_HANDLE, "double free is an error");
    CHECK(edgelm_generate(model, "hi", NULL, NULL, NULL, NULL) == EDGELM_ERR_INVALID_HANDLE, "use after free");
    CHECK(edgelm_cancel(model) == EDGELM_ERR_INVALID_HANDLE, "cancel after free");
    CHECK(edgelm_model_free(NULL) == EDGELM_ERR_INVALID_HANDLE, "free NULL");

    if (argc == 6) {
        /* An encoder bundle: embeddings, and the calls that do not apply to it. */
        float want[1024], got[1024];
        size_t n_want = 0;
        for (char *p = argv[5]; *p && n_want < 1024;) {
            want[n_want++] = strtof(p, &p);
            if (*p == ',') p++;
        }
        edgelm_model *enc = NULL;
        CHECK(edgelm_model_load(argv[4], &opts, &enc) == EDGELM_OK, "load encoder");
        CHECK(edgelm_model_kind(enc, &kind) == EDGELM_OK && kind == EDGELM_KIND_ENCODER, "kind: encoder");
        CHECK(edgelm_model_embedding_dim(enc, &dim) == EDGELM_OK && dim == n_want, "embedding dim %u", dim);
        CHECK(edgelm_model_context_length(enc, &context) == EDGELM_OK && context > 0, "encoder context %u", context);
        size_t len = 0;
        CHECK(edgelm_embed(enc, "Turn on the hallway light", NULL, 0, &len) == EDGELM_ERR_INVALID_ARGUMENT &&
                  len == n_want,
              "size query gives the dimension: %zu", len);
        CHECK(edgelm_embed(enc, "Turn on the hallway light", got, 1024, &len) == EDGELM_OK && len == n_want, "embed");
        float worst = 0;
        for (size_t i = 0; i < n_want && i < len; i++) {
            float d = got[i] > want[i] ? got[i] - want[i] : want[i] - got[i];
            if (d > worst) worst = d;
        }
        CHECK(worst < 1e-4f, "embedding within 1e-4 of transformers: %g", (double)worst);
        CHECK(edgelm_generate(enc, "hi", NULL, NULL, NULL, NULL) == EDGELM_ERR_UNSUPPORTED, "generate on an encoder");
        CHECK(edgelm_model_free(enc) == EDGELM_OK, "free encoder");
    }

    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
