/*
 * The C test of libesddpm: every function of include/esddpm.h, every NULL argument, a
 * too-small buffer, a bad model path, a corrupt model buffer, cancellation (from a
 * progress callback and from another thread), determinism, sessions, control and the
 * sampler-only API. Built and run by ffi/tests/c_api.rs (plain, under AddressSanitizer
 * and UndefinedBehaviorSanitizer, and under Valgrind).
 *
 *   api_test MODEL_DIR OUT_FILE    (OUT_FILE: the bytes of a fixed generation, which the
 *                                   Rust test compares with the Rust API's)
 */
#define _POSIX_C_SOURCE 200809L /* mkdtemp */
#include "esddpm.h"

#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int failures = 0;
static int checks = 0;

#define CHECK(cond)                                                                     \
    do {                                                                                \
        checks++;                                                                       \
        if (!(cond)) {                                                                  \
            failures++;                                                                 \
            fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__,     \
                    __LINE__, #cond, esd_last_error_message());                         \
        }                                                                               \
    } while (0)

#define CHECK_STATUS(call, expected)                                                    \
    do {                                                                                \
        EsdStatus st_ = (call);                                                         \
        checks++;                                                                       \
        if (st_ != (expected)) {                                                        \
            failures++;                                                                 \
            fprintf(stderr, "%s:%d: %s returned %u (%s), expected %u; last error: %s\n",\
                    __FILE__, __LINE__, #call, (unsigned)st_, esd_status_str(st_),      \
                    (unsigned)(expected), esd_last_error_message());                    \
        }                                                                               \
    } while (0)

#define OK(call) CHECK_STATUS(call, ESD_STATUS_OK)

/* Prints how long the part of the test that just ended took (to stderr), so that a slow
 * run (Valgrind) shows where its time goes. */
static void section_done(const char *name) {
    static struct timespec last;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (last.tv_sec != 0 || last.tv_nsec != 0)
        fprintf(stderr, "api_test: %-24s %8.2f s\n", name,
                (double)(now.tv_sec - last.tv_sec) + (double)(now.tv_nsec - last.tv_nsec) * 1e-9);
    last = now;
}

static int all_bytes(const unsigned char *p, size_t n, unsigned char v) {
    size_t i;
    for (i = 0; i < n; i++)
        if (p[i] != v) return 0;
    return 1;
}

static unsigned char *read_file(const char *dir, const char *name, size_t *len) {
    char path[1024];
    FILE *f;
    long n;
    unsigned char *buf;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = (unsigned char *)malloc((size_t)n + 1);
    if (fread(buf, 1, (size_t)n, f) != (size_t)n) n = 0;
    fclose(f);
    buf[n] = 0;
    *len = (size_t)n;
    return buf;
}

/* ---- progress and cancellation ---- */

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    unsigned calls;
    unsigned last_step;
    unsigned total;
    int saw_preview;
    unsigned cancel_at; /* 0 = never */
    const EsdPipeline *pipeline;
} ProgressLog;

static void on_progress(void *user, const EsdProgress *p) {
    ProgressLog *log = (ProgressLog *)user;
    pthread_mutex_lock(&log->lock);
    log->calls++;
    log->last_step = p->step;
    log->total = p->total;
    if (p->preview != NULL && p->preview_len > 0 && p->preview[0] >= -1.5f &&
        p->preview[0] <= 1.5f)
        log->saw_preview = 1;
    if (log->cancel_at != 0 && p->step == log->cancel_at) esd_pipeline_cancel(log->pipeline);
    pthread_cond_broadcast(&log->cond);
    pthread_mutex_unlock(&log->lock);
}

typedef struct {
    const EsdPipeline *pipeline;
    const EsdGenerateParams *params;
    unsigned char *out;
    size_t len;
    EsdStatus status;
} GenJob;

static void *generate_thread(void *arg) {
    GenJob *job = (GenJob *)arg;
    job->status = esd_pipeline_generate_u8(job->pipeline, job->params, job->out, job->len, NULL);
    return NULL;
}

/* ---- threads: one pipeline, four threads at once == the same calls one by one ---- */

static void test_threads(const EsdPipeline *p, size_t img) {
    enum { JOBS = 4 };
    EsdGenerateParams params[JOBS];
    GenJob jobs[JOBS];
    pthread_t tid[JOBS];
    unsigned char *seq[JOBS];
    int j;
    for (j = 0; j < JOBS; j++) {
        esd_generate_params_init(&params[j]);
        params[j].seed = 1000 + (uint64_t)j;
        params[j].t_prime = 30;
        params[j].steps = 3;
        params[j].sampler = j % 2 ? ESD_SAMPLER_KIND_DDIM : ESD_SAMPLER_KIND_DDPM;
        seq[j] = (unsigned char *)malloc(img);
        OK(esd_pipeline_generate_u8(p, &params[j], seq[j], img, NULL));
        jobs[j].pipeline = p;
        jobs[j].params = &params[j];
        jobs[j].out = (unsigned char *)malloc(img);
        jobs[j].len = img;
        jobs[j].status = ESD_STATUS_PANIC;
    }
    for (j = 0; j < JOBS; j++) CHECK(pthread_create(&tid[j], NULL, generate_thread, &jobs[j]) == 0);
    for (j = 0; j < JOBS; j++) {
        pthread_join(tid[j], NULL);
        CHECK(jobs[j].status == ESD_STATUS_OK);
        CHECK(memcmp(jobs[j].out, seq[j], img) == 0);
        free(jobs[j].out);
        free(seq[j]);
    }
}

/* ---- hostile models (tests/models/broken), through the in-memory loader ---- */

typedef struct {
    unsigned char *scheduler, *manifest, *unet, *prior, *prior_cond;
    size_t scheduler_len, manifest_len, unet_len, prior_len, prior_cond_len;
} Tiny;

static EsdStatus load_tiny(const Tiny *t, const unsigned char *unet, size_t unet_len,
                           const unsigned char *prior, size_t prior_len, const char *manifest,
                           uint64_t memory_limit, EsdPipeline **out) {
    EsdLoadParams lp;
    EsdFile files[3];
    esd_load_params_init(&lp);
    lp.threads = 1;
    lp.memory_limit = memory_limit;
    files[0].name = "unet.onnx";
    files[0].data = unet;
    files[0].len = unet_len;
    files[1].name = "prior.onnx";
    files[1].data = prior;
    files[1].len = prior_len;
    files[2].name = "prior_cond.onnx";
    files[2].data = t->prior_cond;
    files[2].len = t->prior_cond_len;
    if (manifest != NULL)
        return esd_pipeline_new_from_memory(t->scheduler, t->scheduler_len,
                                            (const uint8_t *)manifest, strlen(manifest), files,
                                            3, &lp, out);
    return esd_pipeline_new_from_memory(t->scheduler, t->scheduler_len, t->manifest,
                                        t->manifest_len, files, 3, &lp, out);
}

static void test_hostile_models(const char *models_dir) {
    char tiny_dir[1024], broken_dir[1024];
    Tiny t;
    EsdPipeline *p = NULL;
    EsdGenerateParams gp;
    EsdLoadParams lp;
    size_t len = 0, i;
    unsigned char *m, out[256], *big;
    const char *huge_manifest =
        "{\"format\": \"esddpm/1\", \"unet\": {\"file\": \"unet.onnx\", "
        "\"sample_shape\": [1, 65536, 65536]}, \"priors\": {}}";

    snprintf(tiny_dir, sizeof tiny_dir, "%s/../../tests/models/tiny", models_dir);
    snprintf(broken_dir, sizeof broken_dir, "%s/../../tests/models/broken", models_dir);
    t.scheduler = read_file(tiny_dir, "scheduler_config.json", &t.scheduler_len);
    t.manifest = read_file(tiny_dir, "esddpm.json", &t.manifest_len);
    t.unet = read_file(tiny_dir, "unet.onnx", &t.unet_len);
    t.prior = read_file(tiny_dir, "prior.onnx", &t.prior_len);
    t.prior_cond = read_file(tiny_dir, "prior_cond.onnx", &t.prior_cond_len);
    CHECK(t.scheduler && t.manifest && t.unet && t.prior && t.prior_cond);
    if (!(t.scheduler && t.manifest && t.unet && t.prior && t.prior_cond)) return;
    esd_generate_params_init(&gp);
    gp.t_prime = 20;
    gp.steps = 2;
    gp.sampler = ESD_SAMPLER_KIND_DDIM;

    /* The good folder loads and generates. */
    OK(load_tiny(&t, t.unet, t.unet_len, t.prior, t.prior_len, NULL, 0, &p));
    OK(esd_pipeline_generate_u8(p, &gp, out, sizeof out, NULL));
    /* A batch whose buffers are over the limit: refused before they exist. */
    gp.batch = 1u << 30;
    big = (unsigned char *)malloc(16);
    CHECK_STATUS(esd_pipeline_generate_u8(p, &gp, big, 16, NULL), ESD_STATUS_BUFFER_TOO_SMALL);
    free(big);
    esd_pipeline_free(p);
    p = NULL;
    OK(load_tiny(&t, t.unet, t.unet_len, t.prior, t.prior_len, NULL, 4u << 20, &p));
    gp.batch = 20000;
    big = (unsigned char *)malloc(20000 * 256);
    memset(big, 0x5A, 20000 * 256);
    CHECK_STATUS(esd_pipeline_generate_u8(p, &gp, big, 20000 * 256, NULL),
                 ESD_STATUS_MEMORY_LIMIT);
    CHECK(all_bytes(big, 20000 * 256, 0x5A));
    free(big);
    gp.batch = 1;
    OK(esd_pipeline_generate_u8(p, &gp, out, sizeof out, NULL)); /* still usable */
    esd_pipeline_free(p);
    p = NULL;
    /* A limit below the U-Net's weights; an old (shorter) EsdLoadParams is accepted. */
    CHECK_STATUS(load_tiny(&t, t.unet, t.unet_len, t.prior, t.prior_len, NULL, 100000, &p),
                 ESD_STATUS_MEMORY_LIMIT);
    CHECK(p == NULL);
    esd_load_params_init(&lp);
    lp.struct_size = (uint32_t)offsetof(EsdLoadParams, memory_limit);
    lp.threads = 1;
    OK(esd_pipeline_new(tiny_dir, &lp, &p));
    esd_pipeline_free(p);
    p = NULL;

    /* A U-Net that outputs +inf: NON_FINITE at generation, buffer untouched. */
    m = read_file(broken_dir, "unet_inf.onnx", &len);
    CHECK(m != NULL);
    OK(load_tiny(&t, m, len, t.prior, t.prior_len, NULL, 0, &p));
    memset(out, 0x33, sizeof out);
    CHECK_STATUS(esd_pipeline_generate_u8(p, &gp, out, sizeof out, NULL), ESD_STATUS_NON_FINITE);
    CHECK(all_bytes(out, sizeof out, 0x33));
    esd_pipeline_free(p);
    p = NULL;
    free(m);
    /* NaN everywhere: the same status. */
    m = read_file(broken_dir, "unet_nan.onnx", &len);
    OK(load_tiny(&t, m, len, t.prior, t.prior_len, NULL, 0, &p));
    CHECK_STATUS(esd_pipeline_generate_u8(p, &gp, out, sizeof out, NULL), ESD_STATUS_NON_FINITE);
    esd_pipeline_free(p);
    p = NULL;
    free(m);
    /* Wrong output dtype, wrong output channels, wrong input rank: MODEL_SIGNATURE. */
    {
        const char *sig[3] = {"unet_out_f64.onnx", "unet_wrong_out.onnx", "unet_rank3.onnx"};
        for (i = 0; i < 3; i++) {
            m = read_file(broken_dir, sig[i], &len);
            CHECK(m != NULL);
            CHECK_STATUS(load_tiny(&t, m, len, t.prior, t.prior_len, NULL, 0, &p),
                         ESD_STATUS_MODEL_SIGNATURE);
            CHECK(p == NULL);
            free(m);
        }
    }
    /* Not ONNX, truncated: MODEL_LOAD. */
    m = read_file(broken_dir, "not_onnx.onnx", &len);
    CHECK_STATUS(load_tiny(&t, m, len, t.prior, t.prior_len, NULL, 0, &p), ESD_STATUS_MODEL_LOAD);
    free(m);
    CHECK_STATUS(load_tiny(&t, t.unet, t.unet_len / 2, t.prior, t.prior_len, NULL, 0, &p),
                 ESD_STATUS_MODEL_LOAD);
    /* A huge declared input (16 GiB per image): MEMORY_LIMIT before allocating. */
    m = read_file(broken_dir, "unet_huge_input.onnx", &len);
    CHECK(m != NULL);
    CHECK_STATUS(load_tiny(&t, m, len, t.prior, t.prior_len, huge_manifest, 0, &p),
                 ESD_STATUS_MEMORY_LIMIT);
    CHECK(p == NULL && strstr(esd_last_error_message(), "U-Net") != NULL);
    free(m);
    /* A [0, 255] prior declared as [-1, 1]: PRIOR_RANGE, buffer untouched. */
    m = read_file(broken_dir, "prior_255.onnx", &len);
    CHECK(m != NULL);
    OK(load_tiny(&t, t.unet, t.unet_len, m, len, NULL, 0, &p));
    memset(out, 0x44, sizeof out);
    CHECK_STATUS(esd_pipeline_generate_u8(p, &gp, out, sizeof out, NULL), ESD_STATUS_PRIOR_RANGE);
    CHECK(all_bytes(out, sizeof out, 0x44));
    CHECK(strstr(esd_last_error_message(), "output_range") != NULL);
    esd_pipeline_free(p);
    p = NULL;
    free(m);

    free(t.scheduler);
    free(t.manifest);
    free(t.unet);
    free(t.prior);
    free(t.prior_cond);
}

/* ---- the sampler-only API ---- */

static void test_sampler_only(void) {
    EsdSchedulerParams sp;
    EsdSamplerParams p;
    EsdSampler *s = NULL;
    EsdModelCall call;
    size_t n = 0, m = 0, i;
    unsigned steps = 0;
    float x0[1024], buf[1024], eps[1024], before[1024];

    CHECK_STATUS(esd_scheduler_params_init(NULL), ESD_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(esd_sampler_params_init(NULL), ESD_STATUS_NULL_ARGUMENT);
    OK(esd_scheduler_params_init(&sp));
    OK(esd_sampler_params_init(&p));
    CHECK(sp.struct_size == sizeof sp && p.struct_size == sizeof p);
    CHECK(sp.num_train_timesteps == 1000 && p.t_prime == 100);
    p.sampler = ESD_SAMPLER_KIND_DDIM;
    p.steps = 10;
    p.seed = 7;

    CHECK_STATUS(esd_sampler_new(&sp, &p, NULL), ESD_STATUS_NULL_ARGUMENT);
    p.sampler = 9;
    CHECK_STATUS(esd_sampler_new(&sp, &p, &s), ESD_STATUS_INVALID_ARGUMENT);
    CHECK(s == NULL);
    p.sampler = ESD_SAMPLER_KIND_DDIM;
    p.struct_size = 3;
    CHECK_STATUS(esd_sampler_new(&sp, &p, &s), ESD_STATUS_INVALID_ARGUMENT);
    p.struct_size = sizeof p;
    p.t_prime = 5000;
    CHECK_STATUS(esd_sampler_new(&sp, &p, &s), ESD_STATUS_INVALID_ARGUMENT);
    p.t_prime = 100;
    /* The memory limit: a huge shape is refused before its buffers exist. */
    p.batch = 65536;
    p.height = 65536;
    CHECK_STATUS(esd_sampler_new(&sp, &p, &s), ESD_STATUS_MEMORY_LIMIT);
    CHECK(s == NULL && strstr(esd_last_error_message(), "memory limit") != NULL);
    p.batch = 1;
    p.height = 32;
    p.memory_limit = 1000; /* below one 32x32 sample's buffers */
    CHECK_STATUS(esd_sampler_new(&sp, &p, &s), ESD_STATUS_MEMORY_LIMIT);
    p.memory_limit = 0;
    /* A caller built before memory_limit existed passes the shorter struct. */
    p.struct_size = (uint32_t)offsetof(EsdSamplerParams, memory_limit);
    OK(esd_sampler_new(&sp, &p, &s));
    esd_sampler_free(s);
    s = NULL;
    p.struct_size = sizeof p;
    OK(esd_sampler_new(&sp, &p, &s));
    CHECK(s != NULL);

    OK(esd_sampler_lengths(s, &n, &m));
    CHECK(n == 1024 && m == 1024);
    CHECK_STATUS(esd_sampler_lengths(NULL, &n, &m), ESD_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(esd_sampler_lengths(s, NULL, &m), ESD_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(esd_sampler_lengths(s, &n, NULL), ESD_STATUS_NULL_ARGUMENT);

    /* Out of order: no init yet. */
    CHECK_STATUS(esd_sampler_next(s, &call), ESD_STATUS_INVALID_STATE);
    CHECK_STATUS(esd_sampler_sample(s, buf, 1024), ESD_STATUS_INVALID_STATE);
    memset(eps, 0, sizeof eps);
    CHECK_STATUS(esd_sampler_step(s, eps, 1024), ESD_STATUS_INVALID_STATE);

    for (i = 0; i < 1024; i++) x0[i] = (float)((int)(i % 7) - 3) / 3.0f;
    CHECK_STATUS(esd_sampler_init(NULL, x0, 1024), ESD_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(esd_sampler_init(s, x0, 1000), ESD_STATUS_INVALID_ARGUMENT);
    OK(esd_sampler_init(s, x0, 1024));
    CHECK_STATUS(esd_sampler_preview(s, buf, 1024), ESD_STATUS_INVALID_STATE);
    CHECK_STATUS(esd_sampler_next(s, NULL), ESD_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(esd_sampler_next(NULL, &call), ESD_STATUS_NULL_ARGUMENT);

    while (esd_sampler_next(s, &call) == ESD_STATUS_OK && !call.done) {
        CHECK(call.total == 10 && call.step == steps);
        if (steps == 0) CHECK(call.timestep == 99);
        OK(esd_sampler_sample(s, buf, 1024));
        CHECK_STATUS(esd_sampler_sample(s, buf, 10), ESD_STATUS_BUFFER_TOO_SMALL);
        CHECK_STATUS(esd_sampler_sample(s, NULL, 1024), ESD_STATUS_NULL_ARGUMENT);
        /* A NaN output is refused and leaves the run unchanged. */
        memcpy(before, buf, sizeof buf);
        eps[3] = NAN;
        CHECK_STATUS(esd_sampler_step(s, eps, 1024), ESD_STATUS_NON_FINITE);
        eps[3] = 0.0f;
        OK(esd_sampler_sample(s, buf, 1024));
        CHECK(memcmp(before, buf, sizeof buf) == 0);
        CHECK_STATUS(esd_sampler_step(s, eps, 1023), ESD_STATUS_INVALID_ARGUMENT);
        CHECK_STATUS(esd_sampler_step(s, NULL, 1024), ESD_STATUS_NULL_ARGUMENT);
        /* "The model": epsilon = 0, so x0 = x / sqrt(abar) each step. */
        OK(esd_sampler_step(s, eps, 1024));
        OK(esd_sampler_preview(s, buf, 1024));
        steps++;
        if (steps > 20) break;
    }
    CHECK(steps == 10 && call.done == 1);
    CHECK_STATUS(esd_sampler_step(s, eps, 1024), ESD_STATUS_INVALID_STATE);
    OK(esd_sampler_sample(s, buf, 1024));
    for (i = 0; i < 1024; i++) CHECK(buf[i] >= -1.0f && buf[i] <= 1.0f);
    esd_sampler_free(s);
    esd_sampler_free(NULL);

    /* From noise: the image must be NULL. */
    p.start = ESD_START_NOISE;
    p.steps = 5;
    OK(esd_sampler_new(&sp, &p, &s));
    CHECK_STATUS(esd_sampler_init(s, x0, 1024), ESD_STATUS_INVALID_ARGUMENT);
    OK(esd_sampler_init(s, NULL, 0));
    OK(esd_sampler_next(s, &call));
    CHECK(call.done == 0 && call.total == 5 && call.timestep == 800);
    esd_sampler_free(s);
}

/* The plan cache: a second start from it gives the same bytes; an unusable directory
   is an IO error; a struct from before plan_cache existed is accepted. */
static void test_plan_cache(const char *models_dir) {
    char tmpl[] = "/tmp/esd_plan_cache_XXXXXX", cache[1100], cmd[1200];
    EsdLoadParams lp;
    EsdGenerateParams gp;
    EsdPipeline *p = NULL;
    unsigned char first[2 * 1024], second[2 * 1024], nocache[2 * 1024];
    FILE *f;
    int run;

    CHECK(mkdtemp(tmpl) != NULL);
    snprintf(cache, sizeof cache, "%s/plans", tmpl);
    esd_generate_params_init(&gp);
    gp.seed = 5;
    gp.batch = 2;
    gp.t_prime = 30;
    gp.steps = 4;
    gp.sampler = ESD_SAMPLER_KIND_DDIM;

    esd_load_params_init(&lp);
    lp.threads = 1;
    OK(esd_pipeline_new(models_dir, &lp, &p));
    OK(esd_pipeline_generate_u8(p, &gp, nocache, sizeof nocache, NULL));
    esd_pipeline_free(p);
    for (run = 0; run < 2; run++) {
        p = NULL;
        lp.plan_cache = cache;
        OK(esd_pipeline_new(models_dir, &lp, &p));
        OK(esd_pipeline_generate_u8(p, &gp, run == 0 ? first : second, sizeof first, NULL));
        esd_pipeline_free(p);
    }
    CHECK(memcmp(first, nocache, sizeof first) == 0);
    CHECK(memcmp(second, nocache, sizeof second) == 0);

    /* A regular file where the directory should be. */
    snprintf(cmd, sizeof cmd, "%s/file", tmpl);
    f = fopen(cmd, "wb");
    CHECK(f != NULL);
    if (f) fclose(f);
    snprintf(cache, sizeof cache, "%s/file/plans", tmpl);
    p = NULL;
    lp.plan_cache = cache;
    CHECK_STATUS(esd_pipeline_new(models_dir, &lp, &p), ESD_STATUS_IO);
    CHECK(p == NULL);
    lp.plan_cache = "\xff\xfe";
    CHECK_STATUS(esd_pipeline_new(models_dir, &lp, &p), ESD_STATUS_INVALID_UTF8);
    CHECK(p == NULL);
    /* A caller built before plan_cache existed: no cache. */
    lp.plan_cache = cache;
    lp.struct_size = (uint32_t)offsetof(EsdLoadParams, plan_cache);
    OK(esd_pipeline_new(models_dir, &lp, &p));
    esd_pipeline_free(p);

    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpl);
    CHECK(system(cmd) == 0);
}

int main(int argc, char **argv) {
    const char *dir;
    EsdPipeline *p = NULL, *pm = NULL;
    EsdLoadParams lp;
    EsdGenerateParams gp;
    uint32_t c = 0, h = 0, w = 0;
    size_t latent_len = 0, img, i;
    unsigned char *a, *b, *small;
    float *f;
    uint64_t seed_used = 0;
    ProgressLog log;
    FILE *out;

    if (argc != 3) {
        fprintf(stderr, "usage: %s MODEL_DIR OUT_FILE\n", argv[0]);
        return 2;
    }
    dir = argv[1];
    section_done("start");

    /* Version and status strings. */
    CHECK(esd_version() == ESD_VERSION);
    CHECK(strcmp(esd_version_string(), ESD_VERSION_STRING) == 0);
    CHECK(esd_has_runtime() == 1);
    for (i = 0; i <= ESD_STATUS_PRIOR_RANGE; i++) CHECK(strlen(esd_status_str((uint32_t)i)) > 0);
    CHECK(strcmp(esd_status_str(9999), "unknown status") == 0);
    CHECK(strcmp(esd_status_str(ESD_STATUS_OK), "ok") == 0);

    /* Loading: NULLs, a bad path, bad params, then the real folder. */
    CHECK_STATUS(esd_load_params_init(NULL), ESD_STATUS_NULL_ARGUMENT);
    OK(esd_load_params_init(&lp));
    CHECK(lp.struct_size == sizeof lp && lp.threads == 0);
    CHECK(strlen(esd_last_error_message()) == 0);
    CHECK_STATUS(esd_pipeline_new(NULL, &lp, &p), ESD_STATUS_NULL_ARGUMENT);
    CHECK(strstr(esd_last_error_message(), "folder") != NULL);
    CHECK_STATUS(esd_pipeline_new(dir, &lp, NULL), ESD_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(esd_pipeline_new("/nonexistent/models", &lp, &p), ESD_STATUS_IO);
    CHECK(strstr(esd_last_error_message(), "/nonexistent/models") != NULL);
    CHECK(p == NULL);
    CHECK_STATUS(esd_pipeline_new("\xff\xfe", &lp, &p), ESD_STATUS_INVALID_UTF8);
    lp.struct_size = 1;
    CHECK_STATUS(esd_pipeline_new(dir, &lp, &p), ESD_STATUS_INVALID_ARGUMENT);
    lp.struct_size = sizeof lp;
    lp.threads = 1;
    OK(esd_pipeline_new(dir, &lp, &p));
    CHECK(p != NULL);
    if (p == NULL) return 1;

    OK(esd_pipeline_image_shape(p, &c, &h, &w));
    CHECK(c == 1 && h == 32 && w == 32);
    section_done("load");
    CHECK_STATUS(esd_pipeline_image_shape(NULL, &c, &h, &w), ESD_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(esd_pipeline_image_shape(p, NULL, &h, &w), ESD_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(esd_pipeline_image_shape(p, &c, NULL, &w), ESD_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(esd_pipeline_image_shape(p, &c, &h, NULL), ESD_STATUS_NULL_ARGUMENT);
    OK(esd_pipeline_latent_len(p, NULL, &latent_len));
    CHECK(latent_len == 64);
    OK(esd_pipeline_latent_len(p, "vae", &latent_len));
    CHECK(latent_len == 16);
    CHECK_STATUS(esd_pipeline_latent_len(p, "nope", &latent_len), ESD_STATUS_INVALID_ARGUMENT);
    CHECK_STATUS(esd_pipeline_latent_len(NULL, NULL, &latent_len), ESD_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(esd_pipeline_latent_len(p, NULL, NULL), ESD_STATUS_NULL_ARGUMENT);

    /* Generation: ES-DDPM, T' = 100, 3 DDIM steps (cheap under Valgrind), 2 images. */
    img = (size_t)c * h * w;
    CHECK_STATUS(esd_generate_params_init(NULL), ESD_STATUS_NULL_ARGUMENT);
    OK(esd_generate_params_init(&gp));
    CHECK(gp.struct_size == sizeof gp && gp.batch == 1 && gp.clip_sample == -1);
    gp.batch = 2;
    gp.seed = 42;
    gp.t_prime = 100;
    gp.sampler = ESD_SAMPLER_KIND_DDIM;
    gp.steps = 3;
    a = (unsigned char *)malloc(2 * img);
    b = (unsigned char *)malloc(2 * img);
    small = (unsigned char *)malloc(2 * img);
    memset(small, 0xAB, 2 * img);
    CHECK_STATUS(esd_pipeline_generate_u8(p, &gp, small, 2 * img - 1, NULL),
                 ESD_STATUS_BUFFER_TOO_SMALL);
    CHECK(all_bytes(small, 2 * img, 0xAB));
    CHECK_STATUS(esd_pipeline_generate_u8(NULL, &gp, a, 2 * img, NULL), ESD_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(esd_pipeline_generate_u8(p, &gp, NULL, 2 * img, NULL), ESD_STATUS_NULL_ARGUMENT);
    OK(esd_pipeline_generate_u8(p, &gp, a, 2 * img, &seed_used));
    CHECK(seed_used == 42);
    OK(esd_pipeline_generate_u8(p, &gp, b, 2 * img, NULL));
    CHECK(memcmp(a, b, 2 * img) == 0);
    out = fopen(argv[2], "wb");
    CHECK(out != NULL);
    if (out) {
        CHECK(fwrite(a, 1, 2 * img, out) == 2 * img);
        fclose(out);
    }
    gp.seed = 43;
    OK(esd_pipeline_generate_u8(p, &gp, b, 2 * img, NULL));
    CHECK(memcmp(a, b, 2 * img) != 0);
    /* Image 1 of the batch equals image 0 of a batch starting there. */
    gp.seed = 42;
    gp.batch = 1;
    gp.first_image = 1;
    OK(esd_pipeline_generate_u8(p, &gp, b, img, NULL));
    CHECK(memcmp(a + img, b, img) == 0);
    gp.first_image = 0;
    gp.batch = 2;

    /* f32 output agrees with the u8 one. */
    f = (float *)malloc(2 * img * sizeof(float));
    CHECK_STATUS(esd_pipeline_generate_f32(p, &gp, f, 10, NULL), ESD_STATUS_BUFFER_TOO_SMALL);
    CHECK_STATUS(esd_pipeline_generate_f32(p, &gp, NULL, 2 * img, NULL), ESD_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(esd_pipeline_generate_f32(NULL, &gp, f, 2 * img, NULL), ESD_STATUS_NULL_ARGUMENT);
    OK(esd_pipeline_generate_f32(p, &gp, f, 2 * img, NULL));
    for (i = 0; i < 2 * img; i++) {
        float v = f[i] < -1.0f ? -1.0f : (f[i] > 1.0f ? 1.0f : f[i]);
        CHECK((unsigned char)lroundf((v + 1.0f) * 127.5f) == a[i]);
    }

    /* Bad parameters. */
    gp.sampler = 7;
    CHECK_STATUS(esd_pipeline_generate_u8(p, &gp, b, 2 * img, NULL), ESD_STATUS_INVALID_ARGUMENT);
    gp.sampler = ESD_SAMPLER_KIND_DDIM;
    gp.t_prime = 5000;
    CHECK_STATUS(esd_pipeline_generate_u8(p, &gp, b, 2 * img, NULL), ESD_STATUS_INVALID_ARGUMENT);
    gp.t_prime = 100;
    gp.batch = 0;
    CHECK_STATUS(esd_pipeline_generate_u8(p, &gp, b, 2 * img, NULL), ESD_STATUS_INVALID_ARGUMENT);
    gp.batch = 2;
    gp.prior = "nope";
    CHECK_STATUS(esd_pipeline_generate_u8(p, &gp, b, 2 * img, NULL), ESD_STATUS_INVALID_ARGUMENT);
    gp.prior = NULL;
    gp.latents = NULL;
    gp.latents_len = 5;
    CHECK_STATUS(esd_pipeline_generate_u8(p, &gp, b, 2 * img, NULL), ESD_STATUS_INVALID_ARGUMENT);
    gp.latents_len = 0;
    gp.struct_size = 0;
    CHECK_STATUS(esd_pipeline_generate_u8(p, &gp, b, 2 * img, NULL), ESD_STATUS_INVALID_ARGUMENT);
    gp.struct_size = sizeof gp;
    /* NULL params = the defaults: 1 image, DDPM from T' = 100 (100 steps). */
    {
        EsdSession *d = NULL;
        EsdSessionStatus ds;
        OK(esd_session_begin(p, NULL, &d, NULL));
        OK(esd_session_status(d, &ds));
        CHECK(ds.total == 100 && ds.next_timestep == 99);
        OK(esd_session_read_u8(d, b, img));
        CHECK_STATUS(esd_session_read_u8(d, b, img - 1), ESD_STATUS_BUFFER_TOO_SMALL);
        esd_session_free(d);
    }

    /* A random seed is reported and reproduces. */
    gp.random_seed = 1;
    OK(esd_pipeline_generate_u8(p, &gp, b, 2 * img, &seed_used));
    gp.random_seed = 0;
    gp.seed = seed_used;
    OK(esd_pipeline_generate_u8(p, &gp, small, 2 * img, NULL));
    CHECK(memcmp(b, small, 2 * img) == 0);
    gp.seed = 42;

    section_done("generate and parameters");

    /* Progress callback with preview; cancellation from the callback. */
    memset(&log, 0, sizeof log);
    pthread_mutex_init(&log.lock, NULL);
    pthread_cond_init(&log.cond, NULL);
    log.pipeline = p;
    CHECK_STATUS(esd_pipeline_set_progress(NULL, on_progress, &log, 1), ESD_STATUS_NULL_ARGUMENT);
    OK(esd_pipeline_set_progress(p, on_progress, &log, 1));
    OK(esd_pipeline_generate_u8(p, &gp, b, 2 * img, NULL));
    CHECK(log.calls == 3 && log.last_step == 3 && log.total == 3 && log.saw_preview);
    CHECK(memcmp(a, b, 2 * img) == 0);
    log.calls = 0;
    log.cancel_at = 2;
    memset(small, 0xAB, 2 * img);
    CHECK_STATUS(esd_pipeline_generate_u8(p, &gp, small, 2 * img, NULL), ESD_STATUS_CANCELLED);
    CHECK(log.calls == 2);
    CHECK(all_bytes(small, 2 * img, 0xAB));
    CHECK(strstr(esd_last_error_message(), "cancel") != NULL);
    log.cancel_at = 0;
    OK(esd_pipeline_generate_u8(p, &gp, b, 2 * img, NULL)); /* usable again */
    CHECK(memcmp(a, b, 2 * img) == 0);
    CHECK_STATUS(esd_pipeline_cancel(NULL), ESD_STATUS_NULL_ARGUMENT);

    /* Cancellation from another thread during a long run (DDPM, 100 steps). */
    {
        GenJob job;
        pthread_t th;
        EsdGenerateParams lg = gp;
        lg.sampler = ESD_SAMPLER_KIND_DDPM;
        lg.steps = 0;
        lg.batch = 1;
        log.calls = 0;
        job.pipeline = p;
        job.params = &lg;
        job.out = small;
        job.len = img;
        job.status = ESD_STATUS_OK;
        memset(small, 0xAB, 2 * img);
        CHECK(pthread_create(&th, NULL, generate_thread, &job) == 0);
        pthread_mutex_lock(&log.lock);
        while (log.calls < 2) pthread_cond_wait(&log.cond, &log.lock);
        pthread_mutex_unlock(&log.lock);
        OK(esd_pipeline_cancel(p));
        pthread_join(th, NULL);
        CHECK(job.status == ESD_STATUS_CANCELLED);
        CHECK(log.calls < 100);
        CHECK(all_bytes(small, 2 * img, 0xAB));
    }
    OK(esd_pipeline_set_progress(p, NULL, NULL, 0));
    section_done("progress and cancel");

    /* Session: step by step equals generate. */
    {
        EsdSession *s = NULL;
        EsdSessionStatus ss;
        unsigned frames = 0;
        float *pv = (float *)malloc(2 * img * sizeof(float));
        CHECK_STATUS(esd_session_begin(NULL, &gp, &s, NULL), ESD_STATUS_NULL_ARGUMENT);
        CHECK_STATUS(esd_session_begin(p, &gp, NULL, NULL), ESD_STATUS_NULL_ARGUMENT);
        OK(esd_session_begin(p, &gp, &s, &seed_used));
        CHECK(s != NULL && seed_used == 42);
        OK(esd_session_status(s, &ss));
        CHECK(ss.done == 0 && ss.steps_done == 0 && ss.total == 3 && ss.next_timestep == 99);
        CHECK_STATUS(esd_session_status(NULL, &ss), ESD_STATUS_NULL_ARGUMENT);
        CHECK_STATUS(esd_session_status(s, NULL), ESD_STATUS_NULL_ARGUMENT);
        do {
            OK(esd_session_step(s, &ss));
            OK(esd_session_preview_f32(s, pv, 2 * img));
            OK(esd_session_read_f32(s, f, 2 * img));
            frames++;
        } while (!ss.done && frames < 50);
        CHECK(frames == 3 && ss.steps_done == 3);
        OK(esd_session_step(s, NULL)); /* no-op once done */
        OK(esd_session_read_u8(s, b, 2 * img));
        CHECK(memcmp(a, b, 2 * img) == 0);
        CHECK_STATUS(esd_session_read_u8(s, b, 2 * img - 1), ESD_STATUS_BUFFER_TOO_SMALL);
        CHECK_STATUS(esd_session_read_u8(s, NULL, 2 * img), ESD_STATUS_NULL_ARGUMENT);
        CHECK_STATUS(esd_session_read_f32(s, f, 1), ESD_STATUS_BUFFER_TOO_SMALL);
        CHECK_STATUS(esd_session_preview_f32(s, pv, 1), ESD_STATUS_BUFFER_TOO_SMALL);
        CHECK_STATUS(esd_session_preview_f32(NULL, pv, 2 * img), ESD_STATUS_NULL_ARGUMENT);
        CHECK_STATUS(esd_session_read_f32(NULL, f, 2 * img), ESD_STATUS_NULL_ARGUMENT);
        CHECK_STATUS(esd_session_read_u8(NULL, b, 2 * img), ESD_STATUS_NULL_ARGUMENT);
        CHECK_STATUS(esd_session_step(NULL, NULL), ESD_STATUS_NULL_ARGUMENT);
        /* The session keeps the models alive after the pipeline is freed. */
        {
            EsdPipeline *p2 = NULL;
            EsdSession *s2 = NULL;
            OK(esd_pipeline_new(dir, &lp, &p2));
            OK(esd_session_begin(p2, &gp, &s2, NULL));
            esd_pipeline_free(p2);
            do OK(esd_session_step(s2, &ss)); while (!ss.done);
            OK(esd_session_read_u8(s2, b, 2 * img));
            CHECK(memcmp(a, b, 2 * img) == 0);
            esd_session_free(s2);
        }
        esd_session_free(s);
        esd_session_free(NULL);
        free(pv);
    }

    section_done("sessions");

    /* Control: latents and interpolation, class labels, img2img, inpainting. */
    {
        float *z = (float *)malloc(2 * 64 * sizeof(float));
        float *mid = (float *)malloc(64 * sizeof(float));
        float *mask = (float *)malloc(img * sizeof(float));
        int64_t labels[2] = {1, 2};
        EsdGenerateParams cp = gp;
        CHECK_STATUS(esd_pipeline_latents(p, &gp, z, 10), ESD_STATUS_BUFFER_TOO_SMALL);
        CHECK_STATUS(esd_pipeline_latents(NULL, &gp, z, 128), ESD_STATUS_NULL_ARGUMENT);
        CHECK_STATUS(esd_pipeline_latents(p, &gp, NULL, 128), ESD_STATUS_NULL_ARGUMENT);
        OK(esd_pipeline_latents(p, &gp, z, 128));
        cp.latents = z;
        cp.latents_len = 128;
        OK(esd_pipeline_generate_u8(p, &cp, b, 2 * img, NULL));
        CHECK(memcmp(a, b, 2 * img) == 0); /* the seeded latents, passed back */
        OK(esd_slerp(z, z + 64, 64, 0.0f, mid, 64));
        CHECK(memcmp(mid, z, 64 * sizeof(float)) == 0);
        OK(esd_slerp(z, z + 64, 64, 0.5f, mid, 64));
        CHECK(memcmp(mid, z, 64 * sizeof(float)) != 0);
        CHECK_STATUS(esd_slerp(z, z + 64, 64, 0.5f, mid, 63), ESD_STATUS_BUFFER_TOO_SMALL);
        CHECK_STATUS(esd_slerp(NULL, z, 64, 0.5f, mid, 64), ESD_STATUS_NULL_ARGUMENT);
        CHECK_STATUS(esd_slerp(z, NULL, 64, 0.5f, mid, 64), ESD_STATUS_NULL_ARGUMENT);
        CHECK_STATUS(esd_slerp(z, z + 64, 64, NAN, mid, 64), ESD_STATUS_INVALID_ARGUMENT);
        cp.latents_len = 100; /* wrong length */
        CHECK_STATUS(esd_pipeline_generate_u8(p, &cp, b, 2 * img, NULL), ESD_STATUS_INVALID_ARGUMENT);
        cp = gp;
        cp.class_labels = labels; /* the shipped priors are unconditional */
        cp.class_labels_len = 2;
        CHECK_STATUS(esd_pipeline_generate_u8(p, &cp, b, 2 * img, NULL), ESD_STATUS_INVALID_ARGUMENT);
        cp = gp;
        cp.start = ESD_START_STRENGTH; /* img2img from the first result */
        cp.strength = 0.7;
        cp.init_image = f;
        cp.init_image_len = 2 * img;
        OK(esd_pipeline_generate_u8(p, &cp, b, 2 * img, NULL));
        cp.init_image_len = 7;
        CHECK_STATUS(esd_pipeline_generate_u8(p, &cp, b, 2 * img, NULL), ESD_STATUS_INVALID_ARGUMENT);
        cp = gp;
        cp.init_image = f;
        cp.init_image_len = 2 * img;
        for (i = 0; i < img; i++) mask[i] = (i < img / 2) ? 1.0f : 0.0f; /* keep the top */
        cp.inpaint_mask = mask;
        cp.inpaint_mask_len = img;
        OK(esd_pipeline_generate_u8(p, &cp, b, 2 * img, NULL));
        cp.inpaint_mask_len = 3;
        CHECK_STATUS(esd_pipeline_generate_u8(p, &cp, b, 2 * img, NULL), ESD_STATUS_INVALID_ARGUMENT);
        free(z);
        free(mid);
        free(mask);
    }

    section_done("control");

    /* From memory: the same bytes; a corrupt model; bad text. */
    {
        size_t sl = 0, el = 0, ul = 0, gl = 0, vl = 0;
        unsigned char *sc = read_file(dir, "scheduler_config.json", &sl);
        unsigned char *ec = read_file(dir, "esddpm.json", &el);
        unsigned char *un = read_file(dir, "unet.onnx", &ul);
        unsigned char *gn = read_file(dir, "gan_generator.onnx", &gl);
        unsigned char *vn = read_file(dir, "vae_decoder.onnx", &vl);
        EsdFile files[3];
        CHECK(sc && ec && un && gn && vn);
        files[0].name = "unet.onnx";
        files[0].data = un;
        files[0].len = ul;
        files[1].name = "gan_generator.onnx";
        files[1].data = gn;
        files[1].len = gl;
        files[2].name = "vae_decoder.onnx";
        files[2].data = vn;
        files[2].len = vl;
        OK(esd_pipeline_new_from_memory(sc, sl, ec, el, files, 3, &lp, &pm));
        OK(esd_pipeline_generate_u8(pm, &gp, b, 2 * img, NULL));
        CHECK(memcmp(a, b, 2 * img) == 0);
        esd_pipeline_free(pm);
        pm = NULL;
        files[0].len = ul / 3; /* truncated U-Net */
        CHECK_STATUS(esd_pipeline_new_from_memory(sc, sl, ec, el, files, 3, &lp, &pm),
                     ESD_STATUS_MODEL_LOAD);
        CHECK(pm == NULL);
        files[0].len = ul;
        files[0].data = (const uint8_t *)"not an onnx file";
        files[0].len = 16;
        CHECK_STATUS(esd_pipeline_new_from_memory(sc, sl, ec, el, files, 3, &lp, &pm),
                     ESD_STATUS_MODEL_LOAD);
        files[0].data = un;
        files[0].len = ul;
        CHECK_STATUS(esd_pipeline_new_from_memory(sc, sl, ec, el, files, 2, &lp, &pm),
                     ESD_STATUS_IO); /* the VAE's file is missing */
        CHECK_STATUS(esd_pipeline_new_from_memory((const uint8_t *)"{", 1, ec, el, files, 3, &lp, &pm),
                     ESD_STATUS_CONFIG);
        CHECK_STATUS(esd_pipeline_new_from_memory((const uint8_t *)"\xff", 1, ec, el, files, 3, &lp, &pm),
                     ESD_STATUS_INVALID_UTF8);
        CHECK_STATUS(esd_pipeline_new_from_memory(NULL, 0, ec, el, files, 3, &lp, &pm),
                     ESD_STATUS_NULL_ARGUMENT);
        CHECK_STATUS(esd_pipeline_new_from_memory(sc, sl, NULL, 0, files, 3, &lp, &pm),
                     ESD_STATUS_NULL_ARGUMENT);
        CHECK_STATUS(esd_pipeline_new_from_memory(sc, sl, ec, el, NULL, 0, &lp, &pm),
                     ESD_STATUS_NULL_ARGUMENT);
        CHECK_STATUS(esd_pipeline_new_from_memory(sc, sl, ec, el, files, 3, &lp, NULL),
                     ESD_STATUS_NULL_ARGUMENT);
        files[1].name = NULL;
        CHECK_STATUS(esd_pipeline_new_from_memory(sc, sl, ec, el, files, 3, &lp, &pm),
                     ESD_STATUS_NULL_ARGUMENT);
        CHECK(pm == NULL);
        free(sc);
        free(ec);
        free(un);
        free(gn);
        free(vn);
    }

    section_done("from memory");
    test_sampler_only();
    section_done("sampler only");
    test_threads(p, img);
    section_done("threads");
    test_hostile_models(dir);
    section_done("hostile models");
    test_plan_cache(dir);
    section_done("plan cache");

    esd_pipeline_free(p);
    esd_pipeline_free(NULL);
    free(a);
    free(b);
    free(small);
    free(f);
    pthread_mutex_destroy(&log.lock);
    pthread_cond_destroy(&log.cond);
    printf("%d checks, %d failures\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
