#include "device.hpp"

#include <chrono>
#include <cstring>
#include <fstream>
#include <new>
#include <utility>

#ifdef MOBA_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace moba::cli {
namespace {

// Host buffers are aligned for the widest vector loads the CPU backend uses.
constexpr std::align_val_t kHostAlignment{64};

#ifndef MOBA_WITH_CUDA
[[noreturn]] void no_cuda() {
  throw Error(Status::backend_unavailable,
              "moba: backend cuda: this build of moba has no CUDA backend");
}
#else
void check_cuda(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  const Status category =
      status == cudaErrorMemoryAllocation ? Status::out_of_memory : Status::internal;
  throw Error(category, std::string("moba: ") + what + ": " + cudaGetErrorString(status));
}
#endif

}  // namespace

Placement placement_for(Backend backend) noexcept {
  return backend == Backend::cuda ? Placement::cuda : Placement::host;
}

Device device_of(Placement placement) {
  if (placement == Placement::host) return Device{};
#ifdef MOBA_WITH_CUDA
  int index = 0;
  check_cuda(cudaGetDevice(&index), "cudaGetDevice");
  return Device{DeviceType::cuda, index};
#else
  no_cuda();
#endif
}

Buffer::Buffer(Placement placement, size_t bytes) : placement_(placement), size_(bytes) {
  if (bytes == 0) return;
  if (placement == Placement::host) {
    data_ = ::operator new(bytes, kHostAlignment);
    return;
  }
#ifdef MOBA_WITH_CUDA
  check_cuda(cudaMalloc(&data_, bytes),
             ("cudaMalloc of " + std::to_string(bytes) + " bytes").c_str());
#else
  no_cuda();
#endif
}

Buffer::Buffer(Buffer&& other) noexcept
    : placement_(other.placement_),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)) {}

Buffer& Buffer::operator=(Buffer&& other) noexcept {
  if (this != &other) {
    release();
    placement_ = other.placement_;
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

Buffer::~Buffer() {
  release();
}

void Buffer::release() noexcept {
  if (data_ == nullptr) return;
  if (placement_ == Placement::host) {
    ::operator delete(data_, kHostAlignment);
  } else {
#ifdef MOBA_WITH_CUDA
    cudaFree(data_);
#endif
  }
  data_ = nullptr;
  size_ = 0;
}

void Buffer::upload(const void* src, size_t bytes, size_t offset) {
  if (bytes == 0) return;
  if (offset + bytes > size_) throw Error(Status::internal, "moba: Buffer::upload out of range");
  char* dst = static_cast<char*>(data_) + offset;
  if (placement_ == Placement::host) {
    std::memcpy(dst, src, bytes);
    return;
  }
#ifdef MOBA_WITH_CUDA
  check_cuda(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy to the device");
#endif
}

void Buffer::download(void* dst, size_t bytes, size_t offset) const {
  if (bytes == 0) return;
  if (offset + bytes > size_) throw Error(Status::internal, "moba: Buffer::download out of range");
  const char* src = static_cast<const char*>(data_) + offset;
  if (placement_ == Placement::host) {
    std::memcpy(dst, src, bytes);
    return;
  }
#ifdef MOBA_WITH_CUDA
  check_cuda(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy from the device");
#endif
}

void synchronize(Placement placement) {
  if (placement == Placement::host) return;
#ifdef MOBA_WITH_CUDA
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
#else
  no_cuda();
#endif
}

double time_call_ms(Placement placement, const std::function<void()>& call) {
  if (placement == Placement::host) {
    const auto start = std::chrono::steady_clock::now();
    call();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
        .count();
  }
#ifdef MOBA_WITH_CUDA
  // Events on the default stream time the kernels themselves, not the launch
  // overhead of the host; the library runs on the default stream here.
  cudaEvent_t start = nullptr, stop = nullptr;
  check_cuda(cudaEventCreate(&start), "cudaEventCreate");
  check_cuda(cudaEventCreate(&stop), "cudaEventCreate");
  float ms = 0.0f;
  try {
    check_cuda(cudaEventRecord(start), "cudaEventRecord");
    call();
    check_cuda(cudaEventRecord(stop), "cudaEventRecord");
    check_cuda(cudaEventSynchronize(stop), "cudaEventSynchronize");
    check_cuda(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
  } catch (...) {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    throw;
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ms;
#else
  no_cuda();
#endif
}

std::string describe_device(Placement placement) {
  if (placement == Placement::cuda) {
#ifdef MOBA_WITH_CUDA
    int index = 0;
    cudaDeviceProp prop{};
    check_cuda(cudaGetDevice(&index), "cudaGetDevice");
    check_cuda(cudaGetDeviceProperties(&prop, index), "cudaGetDeviceProperties");
    return std::string(prop.name) + " (cuda:" + std::to_string(index) + ")";
#else
    no_cuda();
#endif
  }
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos && colon + 2 <= line.size()) return line.substr(colon + 2);
    }
  }
  return "cpu";
}

}  // namespace moba::cli
