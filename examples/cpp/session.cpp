// A game-loop style use of the step-wise session: one U-Net call per "frame", with
// the x0 preview available between frames; writes the final images as a PGM strip.
//
//   ./session [MODEL_DIR] [OUT.pgm] [SEED]
#include "esddpm.hpp"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>

int main(int argc, char **argv) {
    const std::string dir = argc > 1 ? argv[1] : "../../models/fashion";
    const std::string path = argc > 2 ? argv[2] : "session.pgm";
    try {
        esddpm::Pipeline pipeline(dir, 1);
        EsdGenerateParams params = esddpm::default_params();
        params.batch = 4;
        params.seed = argc > 3 ? std::strtoull(argv[3], nullptr, 10) : 0;
        params.t_prime = 100;
        params.sampler = ESD_SAMPLER_KIND_DDIM;
        params.steps = 10;

        esddpm::Session session(pipeline, params);
        unsigned frame = 0;
        while (!session.done()) {
            EsdSessionStatus s = session.step();  // this frame's budget: one step
            std::vector<float> x0 = session.preview();
            std::printf("frame %u: step %u/%u, preview[0] = %.3f\n", ++frame, s.steps_done,
                        s.total, x0[0]);
        }
        std::vector<uint8_t> px = session.read();
        const uint32_t w = pipeline.width(), h = pipeline.height(), n = params.batch;
        std::ofstream f(path, std::ios::binary);
        f << "P5\n" << n * w << " " << h << "\n255\n";
        for (uint32_t y = 0; y < h; y++)
            for (uint32_t i = 0; i < n; i++)
                f.write(reinterpret_cast<const char *>(&px[i * pipeline.image_len() + y * w]), w);
        std::printf("wrote %s (seed %llu, %u frames)\n", path.c_str(),
                    static_cast<unsigned long long>(session.seed()), frame);
    } catch (const esddpm::Error &e) {
        std::cerr << e.what() << "\n";
        return 1;
    }
    return 0;
}
