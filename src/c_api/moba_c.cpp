// The C API: converts C views to C++ ones and exceptions to status codes.
#include "moba/moba.h"

#include <cstring>
#include <exception>
#include <new>
#include <string>

#include "c_api/conversions.hpp"
#include "moba/moba.hpp"

using namespace moba::c_api;  // NOLINT(google-build-using-namespace): the C entry points below

extern "C" {

moba_tensor moba_tensor_contiguous(void* data, moba_dtype dtype, int32_t ndim,
                                   const int64_t* shape) {
  moba_tensor t{};
  t.data = data;
  t.dtype = dtype;
  t.ndim = (ndim < 0 || ndim > MOBA_MAX_DIMS || shape == nullptr) ? 0 : ndim;
  int64_t stride = 1;
  for (int32_t d = t.ndim - 1; d >= 0; --d) {
    t.shape[d] = shape[d];
    t.strides[d] = stride;
    stride *= shape[d];
  }
  t.device_type = MOBA_DEVICE_CPU;
  t.device_index = 0;
  return t;
}

moba_options moba_default_options(void) {
  return moba_options{MOBA_BACKEND_AUTO, 0, nullptr, 0};
}

moba_status moba_forward(const moba_inputs* inputs, const moba_config* config,
                         const moba_tensor* out, const moba_tensor* lse,
                         const moba_options* options) {
  return guarded([&] {
    moba::TensorView lse_view;
    if (lse != nullptr) lse_view = to_view(*lse, "lse");
    moba::forward(to_inputs(inputs), to_config(config), to_view(out, "out"), lse_view,
                  to_options(options));
  });
}

moba_status moba_backward(const moba_inputs* inputs, const moba_config* config,
                          const moba_tensor* out, const moba_tensor* dout, const moba_tensor* lse,
                          const moba_tensor* dq, const moba_tensor* dk, const moba_tensor* dv,
                          const moba_options* options) {
  return guarded([&] {
    moba::backward(to_inputs(inputs), to_config(config), to_view(out, "out"), to_view(dout, "dout"),
                   to_view(lse, "lse"), to_view(dq, "dq"), to_view(dk, "dk"), to_view(dv, "dv"),
                   to_options(options));
  });
}

moba_status moba_routing(const moba_inputs* inputs, const moba_config* config,
                         const moba_tensor* selected, const moba_options* options) {
  return guarded([&] {
    moba::routing(to_inputs(inputs), to_config(config), to_view(selected, "selected"),
                  to_options(options));
  });
}

moba_status moba_routing_width(int64_t max_seqlen_k, const moba_config* config, int64_t* width) {
  return guarded([&] {
    require(width, "width");
    *width = moba::routing_width(max_seqlen_k, to_config(config));
  });
}

int moba_backend_available(moba_backend backend) {
  if (raw(backend) < MOBA_BACKEND_AUTO || raw(backend) > MOBA_BACKEND_CUDA) return 0;
  return moba::backend_available(static_cast<moba::Backend>(backend)) ? 1 : 0;
}

const char* moba_last_error(void) {
  return last_error().c_str();
}

const char* moba_status_string(moba_status status) {
  switch (status) {
    case MOBA_OK:
      return "ok";
    case MOBA_ERROR_INVALID_ARGUMENT:
      return "invalid argument";
    case MOBA_ERROR_UNSUPPORTED:
      return "unsupported";
    case MOBA_ERROR_BACKEND_UNAVAILABLE:
      return "backend unavailable";
    case MOBA_ERROR_OUT_OF_MEMORY:
      return "out of memory";
    case MOBA_ERROR_INTERNAL:
      return "internal error";
  }
  return "unknown status";
}

const char* moba_version(void) {
  return moba::version();
}

}  // extern "C"
