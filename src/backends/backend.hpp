// The interface every backend implements. The dispatch layer validates the
// arguments (core::make_problem and friends) before calling any of these, so
// backends may assume well-formed, non-aliasing inputs.
#pragma once

#include <cstdint>

#include "core/problem.hpp"

namespace moba::backends {

/// Where routing() writes: [total_q, Hq, width] int32, last dim contiguous.
struct Selection {
  int32_t* data = nullptr;
  int64_t token_stride = 0;
  int64_t head_stride = 0;
  int64_t width = 0;

  int32_t* at(int64_t token, int64_t head) const noexcept {
    return data + token * token_stride + head * head_stride;
  }
};

/// Gradients written by backward().
struct Gradients {
  core::Rows dq, dk, dv;
};

namespace reference {
void forward(const core::Problem& p, const core::Rows& out, const core::Lse& lse);
void backward(const core::Problem& p, const core::Rows& dout, const Gradients& grads);
void routing(const core::Problem& p, const Selection& selection);
}  // namespace reference

namespace cpu {
void forward(const core::Problem& p, const core::Rows& out, const core::Lse& lse, int num_threads);
void backward(const core::Problem& p, const core::Rows& out, const core::Rows& dout,
              const core::Lse& lse, const Gradients& grads, int num_threads);
void routing(const core::Problem& p, const Selection& selection, int num_threads);
}  // namespace cpu

#ifdef MOBA_WITH_CUDA
namespace cuda {
bool device_available() noexcept;
void forward(const core::Problem& p, const core::Rows& out, const core::Lse& lse, void* stream);
void backward(const core::Problem& p, const core::Rows& out, const core::Rows& dout,
              const core::Lse& lse, const Gradients& grads, void* stream, bool deterministic);
void routing(const core::Problem& p, const Selection& selection, void* stream);
}  // namespace cuda
#endif

}  // namespace moba::backends
