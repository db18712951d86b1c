// The attention inputs of a CLI run: generated (seeded normal values) or
// loaded from .npy / .safetensors files, then placed where the backend runs.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "array.hpp"
#include "device.hpp"
#include "moba/moba.hpp"

namespace moba::cli {

/// What the workload options of `moba run` / `moba routing` describe.
struct WorkloadOptions {
  // Generated workloads.
  int64_t tokens = 4096;         // per sequence
  int64_t batch = 1;             // sequences of `tokens` each
  std::vector<int64_t> seqlens;  // varlen lengths; replaces tokens x batch
  int64_t heads_q = 8;
  int64_t heads_kv = 2;
  int64_t head_dim = 128;
  uint64_t seed = 0;
  /// float32, float16 or bfloat16. Empty: float32 when generating, the
  /// type of the q file when loading (float64 files become float32).
  std::string dtype;

  // Loaded workloads: .npy files or one .safetensors file.
  std::string q_path, k_path, v_path;
  std::string safetensors_path;
  std::string q_name = "q", k_name = "k", v_name = "v";
  std::vector<int64_t> cu_seqlens;    // varlen batch of loaded [tokens, heads, dim] data
  std::vector<int64_t> cu_seqlens_k;  // keys, when they differ from the queries

  int threads = 0;  // for generating random values; 0 = all hardware threads
};

/// Parses "float32" / "float16" / "bfloat16" (also "fp32", "fp16", "bf16").
/// Throws UsageError naming `option`.
DType parse_dtype(const std::string& name, const std::string& option = "--dtype");

/// Host-side inputs in the packed varlen layout of the library.
struct Workload {
  Array q, k, v;  // [total_q, Hq, D], [total_k, Hkv, D], all of `dtype`
  std::vector<int32_t> cu_q, cu_k;
  DType dtype = DType::float32;
  int64_t total_q = 0, total_k = 0;
  int64_t heads_q = 0, heads_kv = 0, head_dim = 0;
  int64_t max_len_q = 0, max_len_k = 0;
  /// "random", "npy" or "safetensors".
  std::string source = "random";
  /// Shape of the output as the caller laid out q: [B, T, Hq, D] when q was
  /// loaded as 4-D, otherwise [total_q, Hq, D].
  std::vector<int64_t> out_shape;

  int64_t batch() const { return static_cast<int64_t>(cu_q.size()) - 1; }
  std::vector<int64_t> lens_q() const;
  std::vector<int64_t> lens_k() const;
};

/// Builds the workload the options describe. Throws UsageError for
/// inconsistent options, FileError for unreadable or malformed files.
Workload make_workload(const WorkloadOptions& options);

/// Generates q, k, v from N(0, 1) rounded to `dtype`. `lens_k` empty means
/// equal to `lens_q`; a sequence's queries are the last of its keys. The
/// values depend only on `seed` and the shapes, not on `threads`.
Workload generate_workload(const std::vector<int64_t>& lens_q, const std::vector<int64_t>& lens_k,
                           int64_t heads_q, int64_t heads_kv, int64_t head_dim, DType dtype,
                           uint64_t seed, int threads = 0);

/// Fills `array` with N(0, stddev) values from the stream (seed, stream);
/// deterministic for any number of threads.
void fill_normal(Array& array, uint64_t seed, uint64_t stream, int threads, double stddev = 1.0);

/// A workload copied to where a backend runs, with the library's views.
struct PlacedWorkload {
  Placement placement = Placement::host;
  Buffer q, k, v, cu_q, cu_k;
  Inputs inputs;
};

PlacedWorkload place(const Workload& workload, Placement placement);

/// A buffer for a contiguous tensor of `shape` and `dtype` at `placement`,
/// and its view.
struct PlacedTensor {
  Buffer buffer;
  TensorView view;
};
PlacedTensor make_tensor(Placement placement, DType dtype, std::initializer_list<int64_t> shape);
/// Copies a host array (of the same byte size) into a placed tensor.
PlacedTensor place_array(Placement placement, const Array& array, DType dtype,
                         std::initializer_list<int64_t> shape);
/// Copies a placed tensor back into a host array of element type `type`.
Array download(const PlacedTensor& tensor, ElementType type, std::vector<int64_t> shape);

}  // namespace moba::cli
