// A small RAII wrapper over esddpm.h: objects own their handles (move-only), failures
// throw esddpm::Error with the status and the library's message.
#pragma once

#include "esddpm.h"

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace esddpm {

/// A failed call: the status and esd_last_error_message().
class Error : public std::runtime_error {
  public:
    Error(const std::string &what, EsdStatus status)
        : std::runtime_error(what + ": " + esd_status_str(status) + ": " +
                             esd_last_error_message()),
          status_(status) {}
    EsdStatus status() const { return status_; }

  private:
    EsdStatus status_;
};

inline void check(EsdStatus status, const char *what) {
    if (status != ESD_STATUS_OK) throw Error(what, status);
}

/// Generation parameters with the library's defaults.
inline EsdGenerateParams default_params() {
    EsdGenerateParams p;
    check(esd_generate_params_init(&p), "esd_generate_params_init");
    return p;
}

class Session;

/// A loaded model folder.
class Pipeline {
  public:
    explicit Pipeline(const std::string &folder, uint32_t threads = 0) {
        EsdLoadParams load;
        check(esd_load_params_init(&load), "esd_load_params_init");
        load.threads = threads;
        check(esd_pipeline_new(folder.c_str(), &load, &handle_), "esd_pipeline_new");
        check(esd_pipeline_image_shape(handle_, &c_, &h_, &w_), "esd_pipeline_image_shape");
    }
    ~Pipeline() { esd_pipeline_free(handle_); }
    Pipeline(const Pipeline &) = delete;
    Pipeline &operator=(const Pipeline &) = delete;
    Pipeline(Pipeline &&o) noexcept
        : handle_(std::exchange(o.handle_, nullptr)), c_(o.c_), h_(o.h_), w_(o.w_) {}

    uint32_t channels() const { return c_; }
    uint32_t height() const { return h_; }
    uint32_t width() const { return w_; }
    size_t image_len() const { return size_t(c_) * h_ * w_; }

    /// `params.batch` images as 8-bit pixels (image after image, HWC).
    std::vector<uint8_t> generate(const EsdGenerateParams &params, uint64_t *seed_used = nullptr) const {
        std::vector<uint8_t> out(params.batch * image_len());
        check(esd_pipeline_generate_u8(handle_, &params, out.data(), out.size(), seed_used),
              "esd_pipeline_generate_u8");
        return out;
    }

    /// Cancels the generations running on this pipeline (any thread).
    void cancel() const { esd_pipeline_cancel(handle_); }

    const EsdPipeline *get() const { return handle_; }

  private:
    EsdPipeline *handle_ = nullptr;
    uint32_t c_ = 0, h_ = 0, w_ = 0;
};

/// A step-wise generation: one U-Net call per step(), e.g. one per frame.
class Session {
  public:
    Session(const Pipeline &pipeline, const EsdGenerateParams &params)
        : len_(params.batch * pipeline.image_len()) {
        check(esd_session_begin(pipeline.get(), &params, &handle_, &seed_), "esd_session_begin");
    }
    ~Session() { esd_session_free(handle_); }
    Session(const Session &) = delete;
    Session &operator=(const Session &) = delete;
    Session(Session &&o) noexcept
        : handle_(std::exchange(o.handle_, nullptr)), len_(o.len_), seed_(o.seed_) {}

    /// One step; returns where the session stands.
    EsdSessionStatus step() {
        EsdSessionStatus s;
        check(esd_session_step(handle_, &s), "esd_session_step");
        return s;
    }
    EsdSessionStatus status() const {
        EsdSessionStatus s;
        check(esd_session_status(handle_, &s), "esd_session_status");
        return s;
    }
    bool done() const { return status().done != 0; }
    /// The predicted clean images of the last step (NCHW floats).
    std::vector<float> preview() const {
        std::vector<float> out(len_);
        check(esd_session_preview_f32(handle_, out.data(), out.size()), "esd_session_preview_f32");
        return out;
    }
    /// The current images as 8-bit pixels (the result once done).
    std::vector<uint8_t> read() const {
        std::vector<uint8_t> out(len_);
        check(esd_session_read_u8(handle_, out.data(), out.size()), "esd_session_read_u8");
        return out;
    }
    uint64_t seed() const { return seed_; }

  private:
    EsdSession *handle_ = nullptr;
    size_t len_;
    uint64_t seed_ = 0;
};

}  // namespace esddpm
