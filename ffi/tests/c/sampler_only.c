/*
 * The sampler-only library (cargo build -p esddpm-ffi --no-default-features: no tract):
 * it reports no runtime, and an ES-DDPM run driven by a caller's "model" (here a
 * constant epsilon of 0) goes through. Built and run by .ci/run.
 */
#include "esddpm.h"

#include <stdio.h>
#include <string.h>

int main(void) {
    EsdSchedulerParams sp;
    EsdSamplerParams p;
    EsdSampler *s = NULL;
    EsdModelCall call;
    float x[1024], eps[1024];
    size_t n = 0, m = 0, i;
    unsigned calls = 0;
    if (esd_has_runtime() != 0 || esd_version() != ESD_VERSION) return 1;
    if (esd_scheduler_params_init(&sp) || esd_sampler_params_init(&p)) return 1;
    p.sampler = ESD_SAMPLER_KIND_DDIM;
    p.steps = 10;
    if (esd_sampler_new(&sp, &p, &s) != ESD_STATUS_OK) return 1;
    if (esd_sampler_lengths(s, &n, &m) || n != 1024 || m != 1024) return 1;
    for (i = 0; i < 1024; i++) x[i] = (i % 2) ? 0.5f : -0.5f; /* "the prior's image" */
    memset(eps, 0, sizeof eps);
    if (esd_sampler_init(s, x, 1024)) return 1;
    while (esd_sampler_next(s, &call) == ESD_STATUS_OK && !call.done) {
        if (esd_sampler_sample(s, x, 1024) || esd_sampler_step(s, eps, 1024)) return 1;
        calls++;
    }
    if (esd_sampler_sample(s, x, 1024) || calls != 10) return 1;
    esd_sampler_free(s);
    printf("sampler-only: %u model calls, x[0] = %f\n", calls, (double)x[0]);
    return 0;
}
