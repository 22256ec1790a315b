/*
 * Generate a grid of ES-DDPM images with libesddpm and write it as a PGM (gray) or PPM
 * (color) file.
 *
 *   ./generate [MODEL_DIR] [OUT.pgm] [SEED]
 *
 * defaults: ../../models/fashion, samples.pgm, 0. Build: `make` or CMake (see README).
 */
#include "esddpm.h"

#include <stdio.h>
#include <stdlib.h>

#define COLS 8
#define ROWS 2

static int fail(const char *what, EsdStatus st) {
    fprintf(stderr, "%s failed: %s: %s\n", what, esd_status_str(st), esd_last_error_message());
    return 1;
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : "../../models/fashion";
    const char *path = argc > 2 ? argv[2] : "samples.pgm";
    EsdPipeline *pipeline = NULL;
    EsdLoadParams load;
    EsdGenerateParams params;
    EsdStatus st;
    uint32_t c, h, w, r, x, y;
    uint64_t seed_used = 0;
    size_t img, n = COLS * ROWS;
    unsigned char *pixels;
    FILE *f;

    if (esd_version() != ESD_VERSION) {
        fprintf(stderr, "header %s does not match library %s\n", ESD_VERSION_STRING,
                esd_version_string());
        return 1;
    }
    esd_load_params_init(&load);
    if ((st = esd_pipeline_new(dir, &load, &pipeline)) != ESD_STATUS_OK)
        return fail("esd_pipeline_new", st);
    esd_pipeline_image_shape(pipeline, &c, &h, &w);

    esd_generate_params_init(&params);
    params.batch = (uint32_t)n;
    params.seed = argc > 3 ? strtoull(argv[3], NULL, 10) : 0;
    params.t_prime = 100; /* ES-DDPM: the prior's images diffused to T' = 100 */
    params.sampler = ESD_SAMPLER_KIND_DDIM;
    params.steps = 10; /* 10 U-Net calls per image */

    img = (size_t)c * h * w;
    pixels = (unsigned char *)malloc(n * img);
    st = esd_pipeline_generate_u8(pipeline, &params, pixels, n * img, &seed_used);
    if (st != ESD_STATUS_OK) {
        free(pixels);
        esd_pipeline_free(pipeline);
        return fail("esd_pipeline_generate_u8", st);
    }

    /* Image i: h rows of w pixels, c bytes each; tile them COLS x ROWS. */
    f = fopen(path, "wb");
    if (!f) {
        perror(path);
        free(pixels);
        esd_pipeline_free(pipeline);
        return 1;
    }
    fprintf(f, "%s\n%u %u\n255\n", c == 1 ? "P5" : "P6", COLS * w, ROWS * h);
    for (r = 0; r < ROWS; r++)
        for (y = 0; y < h; y++)
            for (x = 0; x < COLS; x++) {
                const unsigned char *row = pixels + (r * COLS + x) * img + (size_t)y * w * c;
                fwrite(row, 1, (size_t)w * (c == 1 ? 1 : 3), f);
            }
    fclose(f);
    printf("wrote %s (%u images, seed %llu)\n", path, (unsigned)n, (unsigned long long)seed_used);
    free(pixels);
    esd_pipeline_free(pipeline);
    return 0;
}
