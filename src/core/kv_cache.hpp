// A validated KV cache (see include/moba/kv_cache.hpp): the geometry every
// backend's append and decode share, checked once here.
#pragma once

#include <cstdint>
#include <vector>

#include "core/problem.hpp"
#include "moba/kv_cache.hpp"

namespace moba::core {

/// Element strides of a [pages or batch, rows, Hkv, D] K or V buffer.
struct CacheRows {
  void* data = nullptr;
  int64_t page_stride = 0, row_stride = 0, head_stride = 0;
};

/// The cache with both layouts folded into one: the contiguous layout is a
/// paged one with one page of `capacity` rows per sequence (page b of
/// sequence b).
struct Cache {
  CacheRows k, v;
  DType dtype = DType::float32;
  Device device{};
  int64_t batch = 0, heads_kv = 0, head_dim = 0, block_size = 0;
  int64_t capacity = 0;   // tokens per sequence
  int64_t page_size = 0;  // rows per page (capacity for the contiguous layout)
  int64_t num_pages = 0;  // pages in the pool (batch for the contiguous layout)
  bool paged = false;
  const int32_t* page_table = nullptr;
  int64_t table_seq_stride = 0, table_page_stride = 0;
  int32_t* seqlens = nullptr;
  int64_t seqlens_stride = 0;
  float* sums = nullptr;
  int64_t sums_seq_stride = 0, sums_block_stride = 0, sums_head_stride = 0;

  int64_t page_of(int64_t seq, int64_t token) const noexcept {
    return paged ? page_table[seq * table_seq_stride + (token / page_size) * table_page_stride]
                 : seq;
  }
  /// Element offset of (token, kv head) of a sequence in `rows` (k or v).
  int64_t offset(const CacheRows& rows, int64_t seq, int64_t token, int64_t head) const noexcept {
    return page_of(seq, token) * rows.page_stride + (token % page_size) * rows.row_stride +
           head * rows.head_stride;
  }
  int64_t length(int64_t seq) const noexcept { return seqlens[seq * seqlens_stride]; }
  float* block_sum(int64_t seq, int64_t block, int64_t head) const noexcept {
    return sums + seq * sums_seq_stride + block * sums_block_stride + head * sums_head_stride;
  }
};

/// Validates the cache description (not the page-table entries: see
/// check_pages; the seqlens values only for a host cache). Throws
/// moba::Error naming the offending field.
Cache make_cache(const KVCache& cache);

/// Checks that the page-table entries of sequence `seq` covering tokens
/// [0, end) are valid page indices.
void check_pages(const Cache& cache, int64_t seq, int64_t end);

/// A validated append: new rows per sequence. For a host cache the
/// cu_seqlens_new values are read and checked here (`begin`); for a device
/// cache only what the host knows is checked (shapes, dtypes, devices) and
/// the device backend checks the values (see include/moba/kv_cache.hpp).
struct Append {
  Rows k, v;
  int64_t total = 0;            // rows of k_new / v_new
  const int32_t* cu = nullptr;  // cu_seqlens_new as given (host or device memory)
  int64_t cu_stride = 1;
  std::vector<int64_t> begin;  // host caches: first new row of each sequence (batch + 1 entries)
};

Append make_append(const Cache& cache, const TensorView& k_new, const TensorView& v_new,
                   const TensorView& cu_seqlens_new);

/// A validated decode: the queries of each sequence are its last positions.
/// As for Append, the per-sequence values (q_begin, len_k, max_len_k) are
/// read and checked here only for a host cache; a device backend reads
/// cu_q and the cache's seqlens on the device.
struct Decode {
  Rows q;
  int64_t total_q = 0, heads_q = 0, group = 1;
  int64_t top_k = 0;
  float softmax_scale = 1.0f;
  bool gqa_shared_routing = false;
  const int32_t* cu_q = nullptr;  // cu_seqlens_q as given (host or device memory)
  int64_t cu_q_stride = 1;
  std::vector<int64_t> q_begin;  // host caches: batch + 1 entries
  std::vector<int64_t> len_k;    // host caches: cached length of each sequence
  int64_t max_len_k = 0;         // host caches

  int64_t len_q(int64_t seq) const noexcept {
    return q_begin[static_cast<size_t>(seq + 1)] - q_begin[static_cast<size_t>(seq)];
  }
};

Decode make_decode(const Cache& cache, const TensorView& q, const TensorView& cu_seqlens_q,
                   const Config& config);

/// A Problem carrying only what core::check_rows / check_lse read (head dim,
/// heads, token count, device), to validate decode outputs with them.
Problem output_problem(const Cache& cache, const Decode& decode);

}  // namespace moba::core
