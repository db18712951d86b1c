// Device-side helpers shared by the CUDA backend's tests: owned device
// buffers, host <-> device copies, device views of host tensors and the named
// shape cases of the sweeps.
#pragma once

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "support/testing.hpp"

namespace moba::testing {

inline void cuda_ok(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

inline bool have_gpu() {
  return backend_available(Backend::cuda);
}

#define SKIP_WITHOUT_GPU() \
  if (!::moba::testing::have_gpu()) GTEST_SKIP() << "no CUDA device"

// An owned device allocation.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes_ > 0) cuda_ok(cudaMalloc(&data_, bytes_), "cudaMalloc");
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), bytes_(o.bytes_) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (data_ != nullptr) (void)cudaFree(data_);
  }
  void* get() const { return data_; }
  size_t bytes() const { return bytes_; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

inline size_t bytes_of(const Tensor& t) {
  return static_cast<size_t>(t.numel() * dtype_size(t.dtype()));
}

/// Copies `t` into `b` (sized for it).
inline void upload(const Tensor& t, DeviceBuffer& b) {
  if (b.bytes() > 0)
    cuda_ok(cudaMemcpy(b.get(), t.data(), b.bytes(), cudaMemcpyHostToDevice), "upload");
}

/// A new device copy of `t`.
inline DeviceBuffer upload(const Tensor& t) {
  DeviceBuffer b(bytes_of(t));
  upload(t, b);
  return b;
}

inline void download(const DeviceBuffer& b, Tensor& t) {
  if (b.bytes() > 0)
    cuda_ok(cudaMemcpy(t.data(), b.get(), b.bytes(), cudaMemcpyDeviceToHost), "download");
}

/// `v`'s shape and strides over device memory `data`.
inline TensorView on_device(TensorView v, void* data) {
  v.data = data;
  v.device = Device{DeviceType::cuda, 0};
  return v;
}

/// A workload's inputs on the device and a non-default stream the calls run on.
class DeviceWorkload {
 public:
  explicit DeviceWorkload(const Workload& w)
      : w_(w),
        q_(upload(w.q)),
        k_(upload(w.k)),
        v_(upload(w.v)),
        cu_q_(upload(w.cu_q)),
        cu_k_(upload(w.cu_k)) {
    cuda_ok(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  }
  ~DeviceWorkload() { (void)cudaStreamDestroy(stream_); }
  DeviceWorkload(const DeviceWorkload&) = delete;
  DeviceWorkload& operator=(const DeviceWorkload&) = delete;

  Inputs inputs() const {
    Inputs in;
    in.q = on_device(w_.q.view(), q_.get());
    in.k = on_device(w_.k.view(), k_.get());
    in.v = on_device(w_.v.view(), v_.get());
    in.cu_seqlens_q = on_device(w_.cu_q.view(), cu_q_.get());
    in.cu_seqlens_k = on_device(w_.cu_k.view(), cu_k_.get());
    const auto& lens_k = w_.c.lens_k.empty() ? w_.c.lens_q : w_.c.lens_k;
    in.max_seqlen_q =
        std::max<int64_t>(1, *std::max_element(w_.c.lens_q.begin(), w_.c.lens_q.end()));
    in.max_seqlen_k = std::max<int64_t>(1, *std::max_element(lens_k.begin(), lens_k.end()));
    return in;
  }
  ExecOptions options(bool deterministic = false) const {
    ExecOptions o;
    o.backend = Backend::cuda;
    o.stream = stream_;
    o.deterministic = deterministic;
    return o;
  }
  cudaStream_t stream() const { return stream_; }
  void synchronize() const { cuda_ok(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }

 protected:
  const Workload& w_;

 private:
  DeviceBuffer q_, k_, v_, cu_q_, cu_k_;
  cudaStream_t stream_ = nullptr;
};

/// A shape of a sweep, named for the test's parameter.
struct NamedCase {
  const char* name;
  Case c;
};

inline Case make_case(std::vector<int32_t> lens_q, std::vector<int32_t> lens_k, int64_t hq,
                      int64_t hkv, int64_t d, int64_t block, int64_t top_k, DType dtype,
                      bool shared = false, uint64_t seed = 7) {
  Case c;
  c.lens_q = std::move(lens_q);
  c.lens_k = std::move(lens_k);
  c.heads_q = hq;
  c.heads_kv = hkv;
  c.head_dim = d;
  c.block_size = block;
  c.top_k = top_k;
  c.dtype = dtype;
  c.gqa_shared_routing = shared;
  c.seed = seed;
  return c;
}

inline constexpr DType bf16 = DType::bfloat16;
inline constexpr DType f16 = DType::float16;

}  // namespace moba::testing
