// moba — Mixture of Block Attention.
//
// The public C++ API. Every entry point takes non-owning tensor views, so the
// library runs on memory owned by anyone (PyTorch, NumPy, an inference
// engine). The semantics are those of shared/MOBA_SPEC.md, implemented by
// several backends behind one dispatch:
//
//   reference  plain loops in fp64, the oracle of every test;
//   cpu        block-tiled, multi-threaded, vectorized;
//   cuda       GPU kernels (when the library was built with CUDA).
//
// Errors are reported by throwing moba::Error, whose message names the
// offending argument and what was expected.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <string>

namespace moba {

/// Element type of a tensor. Attention inputs are float32, float16 or
/// bfloat16; cu_seqlens and routing results are int32.
enum class DType : int { float32 = 0, float16 = 1, bfloat16 = 2, int32 = 3 };

/// Size of one element of `dtype` in bytes.
int dtype_size(DType dtype) noexcept;
/// Lower-case name of `dtype` ("float32", "float16", "bfloat16", "int32").
const char* dtype_name(DType dtype) noexcept;

enum class DeviceType : int { cpu = 0, cuda = 1 };

struct Device {
  DeviceType type = DeviceType::cpu;
  int index = 0;
  friend bool operator==(const Device&, const Device&) = default;
};

inline constexpr int kMaxDims = 4;

/// A non-owning strided view of a tensor. Strides are in elements. A view
/// whose `data` is null is "absent" (only allowed where an argument is
/// documented as optional).
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::float32;
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};
  std::array<int64_t, kMaxDims> strides{};
  Device device{};

  /// A row-major contiguous view of `shape`.
  static TensorView contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape,
                               Device device = {});
  int64_t numel() const noexcept;
  bool present() const noexcept { return data != nullptr; }
};

/// The MoBA hyper-parameters.
struct Config {
  /// Keys per block (the original's `moba_chunk_size`), >= 1.
  int64_t block_size = 0;
  /// Blocks each query attends to, counting its current block, >= 1. A value
  /// at least the number of blocks gives exactly causal full attention.
  int64_t top_k = 0;
  /// Scale of q·k inside the softmax; defaults to 1/sqrt(head_dim).
  std::optional<float> softmax_scale;
  /// When true, the query heads that share a kv head share one selection,
  /// made from the sum of their gate scores.
  bool gqa_shared_routing = false;
};

/// The attention inputs, packed varlen as in flash-attn.
///
///   q             [total_q, Hq, D]
///   k, v          [total_k, Hkv, D]      Hq % Hkv == 0
///   cu_seqlens_q  [batch + 1] int32      non-decreasing, 0 .. total_q
///   cu_seqlens_k  [batch + 1] int32      non-decreasing, 0 .. total_k
///
/// For training and prefill cu_seqlens_q == cu_seqlens_k. A sequence with
/// fewer queries than keys (decode, chunked prefill) has its queries at the
/// last positions of its keys. The last dimension of q, k, v must be
/// contiguous (stride 1); other strides are free (e.g. a packed qkv tensor).
///
/// `max_seqlen_q` / `max_seqlen_k` are upper bounds of the sequence lengths;
/// 0 means "compute them" (only possible when cu_seqlens live on the host).
struct Inputs {
  TensorView q, k, v;
  TensorView cu_seqlens_q, cu_seqlens_k;
  int64_t max_seqlen_q = 0;
  int64_t max_seqlen_k = 0;
};

enum class Backend : int { automatic = 0, reference = 1, cpu = 2, cuda = 3 };

/// Lower-case name of `backend` ("auto", "reference", "cpu", "cuda").
const char* backend_name(Backend backend) noexcept;
/// Parses a backend name as printed by backend_name; throws moba::Error.
Backend parse_backend(const std::string& name);
/// Whether `backend` was compiled in and can run here (for cuda: a device is
/// present).
bool backend_available(Backend backend) noexcept;

struct ExecOptions {
  /// `automatic` picks cuda for device tensors and cpu for host tensors.
  Backend backend = Backend::automatic;
  /// Worker threads of the cpu backend; 0 means all hardware threads.
  int num_threads = 0;
  /// CUDA stream (a cudaStream_t) to run on; null means the default stream.
  void* stream = nullptr;
  /// Bitwise reproducible gradients where a backend offers a faster
  /// non-deterministic mode.
  bool deterministic = false;
};

/// Error categories, shared with the C API's status codes.
enum class Status : int {
  ok = 0,
  invalid_argument = 1,
  unsupported = 2,
  backend_unavailable = 3,
  out_of_memory = 4,
  internal = 5,
};

class Error : public std::runtime_error {
 public:
  Error(Status status, const std::string& message) : std::runtime_error(message), status_(status) {}
  Status status() const noexcept { return status_; }

 private:
  Status status_;
};

/// MoBA forward.
///
///   out  [total_q, Hq, D], dtype of q (last dim contiguous)
///   lse  [Hq, total_q] float32, optional: the natural-log log-sum-exp of
///        each query's scaled scores over the keys it attended to.
void forward(const Inputs& inputs, const Config& config, const TensorView& out,
             const TensorView& lse, const ExecOptions& options = {});

/// MoBA backward: gradients of the attention (step 5 of the spec) given the
/// gradient `dout` of the output. The routing passes no gradient.
///
///   out, dout    [total_q, Hq, D], dtype of q
///   lse          [Hq, total_q] float32, as written by forward
///   dq           [total_q, Hq, D], dtype of q       (overwritten)
///   dk, dv       [total_k, Hkv, D], dtype of k / v  (overwritten)
void backward(const Inputs& inputs, const Config& config, const TensorView& out,
              const TensorView& dout, const TensorView& lse, const TensorView& dq,
              const TensorView& dk, const TensorView& dv, const ExecOptions& options = {});

/// The routing decision: for every query and query head, the blocks it
/// attends to, as block indices within its sequence in ascending order,
/// padded with -1.
///
///   selected  [total_q, Hq, W] int32 with W >= min(top_k, blocks of the
///             longest sequence); see routing_width.
void routing(const Inputs& inputs, const Config& config, const TensorView& selected,
             const ExecOptions& options = {});

/// The smallest W accepted by routing(): min(top_k, ceil(max_seqlen_k / block_size)).
int64_t routing_width(int64_t max_seqlen_k, const Config& config);

/// Library version, "MAJOR.MINOR.PATCH".
const char* version() noexcept;

}  // namespace moba
