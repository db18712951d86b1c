// A validated MoBA problem: every argument checked once, here, before any
// backend runs, and the per-sequence geometry every backend shares.
#pragma once

#include <cstdint>
#include <vector>

#include "moba/moba.hpp"

namespace moba::core {

/// Throws moba::Error(status, message).
[[noreturn]] void fail(Status status, const std::string& message);

/// One sequence of the varlen batch.
struct Sequence {
  int64_t q_begin = 0;  // first query row in q
  int64_t k_begin = 0;  // first key row in k / v
  int64_t len_q = 0;
  int64_t len_k = 0;
  /// Absolute position of the sequence's first query (queries are its last
  /// positions).
  int64_t q_offset() const noexcept { return len_k - len_q; }
};

/// A [tokens, heads, dim] tensor with a contiguous last dimension.
struct Rows {
  void* data = nullptr;
  DType dtype = DType::float32;
  int64_t token_stride = 0;  // in elements
  int64_t head_stride = 0;   // in elements

  int64_t offset(int64_t token, int64_t head) const noexcept {
    return token * token_stride + head * head_stride;
  }
};

/// A [heads, tokens] float32 tensor (the log-sum-exp).
struct Lse {
  float* data = nullptr;
  int64_t head_stride = 0;
  int64_t token_stride = 0;

  float& at(int64_t head, int64_t token) const noexcept {
    return data[head * head_stride + token * token_stride];
  }
};

struct Problem {
  Rows q, k, v;
  int64_t total_q = 0, total_k = 0;
  int64_t heads_q = 0, heads_kv = 0, head_dim = 0;
  int64_t group = 1;  // query heads per kv head
  int64_t block_size = 0, top_k = 0;
  float softmax_scale = 1.0f;
  bool gqa_shared_routing = false;
  int64_t max_seqlen_q = 0, max_seqlen_k = 0;
  Device device{};
  /// Host copy of the batch geometry (filled when cu_seqlens are on the host).
  std::vector<Sequence> sequences;
  /// The cu_seqlens tensors as given, in their own memory (host or device):
  /// device backends read the batch geometry from here. `batch` sequences,
  /// batch + 1 entries each; strides in elements.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  int64_t cu_seqlens_q_stride = 1, cu_seqlens_k_stride = 1;
  int64_t batch = 0;

  int64_t kv_head(int64_t query_head) const noexcept { return query_head / group; }
};

/// Validates the inputs and configuration and builds the problem. Throws
/// moba::Error naming the offending argument.
Problem make_problem(const Inputs& inputs, const Config& config);

/// Validates an output or extra input of shape [tokens, heads, head_dim] with
/// the given dtype and device, and returns its row view.
Rows check_rows(const Problem& problem, const TensorView& view, const char* name, int64_t tokens,
                int64_t heads, DType dtype);

/// Validates the [Hq, total_q] float32 log-sum-exp tensor.
Lse check_lse(const Problem& problem, const TensorView& view, const char* name);

/// Throws if the memory of output `out` overlaps any of `others` (by address range).
void check_no_overlap(const TensorView& out, const char* out_name,
                      std::initializer_list<std::pair<const TensorView*, const char*>> others);

/// The routing width W accepted for this problem.
int64_t min_routing_width(const Problem& problem);

}  // namespace moba::core
