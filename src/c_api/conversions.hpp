// Shared plumbing of the C API's translation units: C views to C++ ones,
// exceptions to status codes and the thread's last error message.
#pragma once

#include <cstring>
#include <exception>
#include <new>
#include <string>

#include "moba/moba.h"
#include "moba/moba.hpp"

namespace moba::c_api {

// The calling thread's message of its most recent status-returning call.
inline std::string& last_error() {
  thread_local std::string message;
  return message;
}

inline moba_status remember(moba_status status, const char* message) {
  last_error() = message;
  return status;
}

// Runs fn, turning every exception into a status and a message.
template <class Fn>
moba_status guarded(Fn&& fn) noexcept {
  try {
    last_error().clear();
    fn();
    return MOBA_OK;
  } catch (const moba::Error& e) {
    return remember(static_cast<moba_status>(e.status()), e.what());
  } catch (const std::bad_alloc&) {
    return remember(MOBA_ERROR_OUT_OF_MEMORY, "moba: out of memory");
  } catch (const std::exception& e) {
    return remember(MOBA_ERROR_INTERNAL, e.what());
  } catch (...) {
    return remember(MOBA_ERROR_INTERNAL, "moba: unknown error");
  }
}

inline void require(const void* p, const char* name) {
  if (p == nullptr)
    throw moba::Error(moba::Status::invalid_argument,
                      std::string("moba: ") + name + ": null pointer");
}

// The integer stored in a C enum field: a C caller may store any int there,
// and loading an out-of-range value through the enum type is undefined in C++.
template <class Enum>
int raw(const Enum& field) {
  static_assert(sizeof(Enum) == sizeof(int));
  int value;
  std::memcpy(&value, &field, sizeof value);
  return value;
}

inline moba::TensorView to_view(const moba_tensor& t, const char* name) {
  if (raw(t.dtype) < MOBA_FLOAT32 || raw(t.dtype) > MOBA_INT32)
    throw moba::Error(
        moba::Status::invalid_argument,
        std::string("moba: ") + name + ": unknown dtype " + std::to_string(raw(t.dtype)));
  if (t.ndim < 0 || t.ndim > MOBA_MAX_DIMS)
    throw moba::Error(
        moba::Status::invalid_argument,
        std::string("moba: ") + name + ": ndim " + std::to_string(t.ndim) + " outside [0, 4]");
  if (raw(t.device_type) != MOBA_DEVICE_CPU && raw(t.device_type) != MOBA_DEVICE_CUDA)
    throw moba::Error(moba::Status::invalid_argument,
                      std::string("moba: ") + name + ": unknown device type");
  moba::TensorView v;
  v.data = t.data;
  v.dtype = static_cast<moba::DType>(t.dtype);
  v.ndim = t.ndim;
  for (int i = 0; i < t.ndim; ++i) {
    v.shape[static_cast<size_t>(i)] = t.shape[i];
    v.strides[static_cast<size_t>(i)] = t.strides[i];
  }
  v.device = moba::Device{static_cast<moba::DeviceType>(t.device_type), t.device_index};
  return v;
}

inline moba::TensorView to_view(const moba_tensor* t, const char* name) {
  require(t, name);
  return to_view(*t, name);
}

inline moba::Inputs to_inputs(const moba_inputs* in) {
  require(in, "inputs");
  moba::Inputs out;
  out.q = to_view(in->q, "q");
  out.k = to_view(in->k, "k");
  out.v = to_view(in->v, "v");
  out.cu_seqlens_q = to_view(in->cu_seqlens_q, "cu_seqlens_q");
  out.cu_seqlens_k = to_view(in->cu_seqlens_k, "cu_seqlens_k");
  out.max_seqlen_q = in->max_seqlen_q;
  out.max_seqlen_k = in->max_seqlen_k;
  return out;
}

inline moba::Config to_config(const moba_config* c) {
  require(c, "config");
  moba::Config out;
  out.block_size = c->block_size;
  out.top_k = c->top_k;
  if (!(c->softmax_scale <= 0.0f)) out.softmax_scale = c->softmax_scale;  // NaN reaches validation
  out.gqa_shared_routing = c->gqa_shared_routing != 0;
  return out;
}

inline moba::ExecOptions to_options(const moba_options* o) {
  moba::ExecOptions out;
  if (o == nullptr) return out;
  if (raw(o->backend) < MOBA_BACKEND_AUTO || raw(o->backend) > MOBA_BACKEND_CUDA)
    throw moba::Error(moba::Status::invalid_argument,
                      "moba: options.backend: unknown backend " + std::to_string(raw(o->backend)));
  if (o->num_threads < 0)
    throw moba::Error(
        moba::Status::invalid_argument,
        "moba: options.num_threads: expected >= 0, got " + std::to_string(o->num_threads));
  out.backend = static_cast<moba::Backend>(o->backend);
  out.num_threads = o->num_threads;
  out.stream = o->stream;
  out.deterministic = o->deterministic != 0;
  return out;
}

}  // namespace moba::c_api
