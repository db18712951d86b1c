// Where the CLI keeps tensors (host memory or a CUDA device) and how it times
// calls there. Everything CUDA-specific in the CLI lives in device.cpp, so the
// rest compiles the same with or without a CUDA build.
#pragma once

#include <cstddef>
#include <functional>
#include <string>

#include "moba/moba.hpp"

namespace moba::cli {

enum class Placement { host, cuda };

/// Where tensors must live for `backend` (cuda: on the device; else host).
Placement placement_for(Backend backend) noexcept;
/// The library's device descriptor for a placement (the current CUDA device).
Device device_of(Placement placement);

/// An owned, uninitialised byte buffer in host or device memory.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Placement placement, size_t bytes);
  Buffer(Buffer&& other) noexcept;
  Buffer& operator=(Buffer&& other) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer();

  void* data() const noexcept { return data_; }
  size_t size() const noexcept { return size_; }
  Placement placement() const noexcept { return placement_; }

  /// Copies `bytes` bytes from host memory to offset `offset` of the buffer.
  void upload(const void* src, size_t bytes, size_t offset = 0);
  /// Copies `bytes` bytes at offset `offset` of the buffer to host memory.
  void download(void* dst, size_t bytes, size_t offset = 0) const;

 private:
  void release() noexcept;

  Placement placement_ = Placement::host;
  void* data_ = nullptr;
  size_t size_ = 0;
};

/// Waits until all work queued on the placement's device has finished.
void synchronize(Placement placement);

/// Runs `call` once and returns its duration in milliseconds: wall clock on
/// the host, CUDA events on the default stream for the device.
double time_call_ms(Placement placement, const std::function<void()>& call);

/// A human-readable name of the hardware: the CPU model or the GPU's name.
std::string describe_device(Placement placement);

}  // namespace moba::cli
