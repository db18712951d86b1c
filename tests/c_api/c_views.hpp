// Conversions from the C++ API's structs to the C API's, so one scene can be
// run through both APIs.
#pragma once

#include <optional>

#include "moba/moba.h"
#include "moba/moba.hpp"

namespace moba::testing {

inline moba_tensor to_c(const TensorView& t) {
  moba_tensor c{};
  c.data = t.data;
  c.dtype = static_cast<moba_dtype>(t.dtype);  // DType values are those of moba_dtype
  c.ndim = t.ndim;
  for (int i = 0; i < kMaxDims; ++i) {
    c.shape[i] = t.shape[static_cast<size_t>(i)];
    c.strides[i] = t.strides[static_cast<size_t>(i)];
  }
  c.device_type = t.device.type == DeviceType::cpu ? MOBA_DEVICE_CPU : MOBA_DEVICE_CUDA;
  c.device_index = t.device.index;
  return c;
}

inline moba_inputs to_c(const Inputs& in) {
  return moba_inputs{
      to_c(in.q),      to_c(in.k),     to_c(in.v), to_c(in.cu_seqlens_q), to_c(in.cu_seqlens_k),
      in.max_seqlen_q, in.max_seqlen_k};
}

// The C config has no "absent" scale: 0 asks for the default 1/sqrt(D).
inline moba_config to_c(const Config& cfg) {
  return moba_config{cfg.block_size, cfg.top_k, cfg.softmax_scale.value_or(0.0f),
                     cfg.gqa_shared_routing ? 1 : 0};
}

inline moba_options to_c(const ExecOptions& o) {
  moba_options c = moba_default_options();
  c.backend = static_cast<moba_backend>(o.backend);  // only called with the four named backends
  c.num_threads = o.num_threads;
  c.stream = o.stream;
  c.deterministic = o.deterministic ? 1 : 0;
  return c;
}

}  // namespace moba::testing
