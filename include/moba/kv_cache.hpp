// moba — MoBA decode with a KV cache.
//
// Generation appends one token (decode) or a chunk of tokens (chunked
// prefill) per sequence, then attends with the new queries, which are the
// LAST positions of their sequences. The cache keeps, next to K and V, the
// running fp32 sum of k over each MoBA block, so routing a new query costs
// O(blocks x D) — one product with the block means — and never re-reads the
// cached keys; attention then reads the selected blocks only.
//
// All memory is owned by the caller and described by views (no hidden
// allocation grows with the context):
//
//   contiguous layout (page_table absent)
//     k, v        [batch, capacity, Hkv, D]        one slot per sequence
//   paged layout (page_table present), as in vLLM
//     k, v        [num_pages, page_size, Hkv, D]   a shared page pool
//     page_table  [batch, max_pages] int32         token t of sequence b lives at
//                                                  row t % page_size of page
//                                                  page_table[b, t / page_size]
//   both
//     seqlens     [batch] int32                    tokens cached per sequence;
//                                                  append() advances it
//     block_sums  [batch, max_blocks, Hkv, D] float32   max_blocks >=
//                                                  ceil(capacity / block_size)
//     block_size  the MoBA block size (Config::block_size of every call)
//
// capacity is k.shape[1] (contiguous) or max_pages * page_size (paged). In
// the paged layout block_size must be a multiple of page_size, so a block is
// a whole number of pages (what a GPU kernel streams); page-table entries are
// checked (0 <= entry < num_pages) for the pages a call touches; entries past
// a sequence's length are never read and may hold anything (e.g. -1).
//
// Block sums are exact fp32 sums, in token order, of k's values (k's dtype
// converted to fp32): the block mean used for routing is sum * (1 / count)
// rounded to k's dtype, as moba::forward computes it (spec, step 2), so a
// decode step routes and attends exactly as the prefill path would for the
// same positions. Entry (b, j) is only meaningful for blocks j below
// ceil(seqlens[b] / block_size); a block is (re)initialized when its first
// token is appended, so recycling a slot only needs seqlens[b] = 0.
//
// Backends: a cache in host memory runs on the cpu backend; a cache on a
// CUDA device runs on the cuda backend (ExecOptions::backend automatic or
// cuda; fp16/bf16, head dims 64 and 128, 16-byte aligned K/V rows and
// block-sum rows). Every view of a call must be on the cache's device
// (invalid_argument otherwise); a device cache on a build without CUDA or a
// machine without a GPU gives Status::backend_unavailable.
//
// CUDA: everything runs on ExecOptions::stream, with no host
// synchronization and no host read of device memory, so append, decode and
// routing can be captured in a CUDA graph. The host validates only what it
// knows (shapes, dtypes, strides, devices, alignment, block_size a multiple
// of page_size); the values in device memory are checked by the kernels, and
// a violation never reads or writes out of bounds:
//   kv_cache_append   a sequence whose share breaks the contract (its
//                     cu_seqlens_new pair decreasing or outside [0, total_new],
//                     seqlens[b] outside [0, capacity], seqlens[b] + added >
//                     capacity, or a page-table entry of a page it would
//                     write outside [0, num_pages)) is left untouched: no K/V
//                     row, block sum or length written. If cu_seqlens_new[0]
//                     != 0 or cu_seqlens_new[batch] != total_new, nothing is
//                     written at all.
//   kv_cache_decode   if cu_seqlens_q does not start at 0, end at total_q and
//                     never decrease, every out row and lse entry is NaN;
//                     otherwise the rows of a sequence with len_q > seqlens,
//                     seqlens outside [0, capacity], or a page-table entry
//                     of a cached page (tokens [0, seqlens)) outside
//                     [0, num_pages) are NaN, the other rows are computed.
//   kv_cache_routing  the same rows come back all -1 (a valid row always
//                     holds its current block), as do rows whose selection
//                     does not fit W (W is only checked to be >= 1 on the host).
// Per-call device memory is one stream-ordered allocation (cudaMallocAsync /
// cudaFreeAsync on the stream, as moba::forward), sized from host-known
// bounds: O(batch x Hkv x ceil(capacity / block_size)) bytes of tables, the
// selection (total_q x Hq x min(top_k, blocks) int32), split-K partials
// (Hq x slots x (D + 1) floats per query token; query tokens go in launches
// whose partials fit 256 MiB) and, when the capacity holds more than 8,192
// blocks, routing scores (4 bytes per block and routing row, within the same
// budget). MOBA_CUDA_DECODE_BYTES overrides the 256 MiB.
// Append allocates batch int32. kv_cache_bytes_read synchronizes the stream
// (it returns a host value; a benchmark utility). docs/cuda_decode.md has the
// design.
#pragma once

#include <cstdint>

#include "moba/moba.hpp"

namespace moba {

/// A description of caller-owned KV-cache memory; see the file comment.
struct KVCache {
  TensorView k, v;
  /// [batch, max_pages] int32; absent (null data) for the contiguous layout.
  TensorView page_table;
  /// [batch] int32: current length of every sequence.
  TensorView seqlens;
  /// [batch, max_blocks, Hkv, D] float32: running sum of k per block.
  TensorView block_sums;
  int64_t block_size = 0;

  bool paged() const noexcept { return page_table.present(); }
};

/// Appends new keys and values to every sequence and updates the block sums.
///
///   k_new, v_new    [total_new, Hkv, D], dtype of the cache
///   cu_seqlens_new  [batch + 1] int32: sequence b receives rows
///                   cu_seqlens_new[b] .. cu_seqlens_new[b + 1] (0 rows: untouched)
///
/// Host cache: throws (before writing anything) if a sequence would exceed
/// the capacity or a page it needs is out of range. Device cache: those
/// checks run on the device and skip the offending sequence (file comment).
void kv_cache_append(const KVCache& cache, const TensorView& k_new, const TensorView& v_new,
                     const TensorView& cu_seqlens_new, const ExecOptions& options = {});

/// MoBA attention of new queries against the cache (decode: 1 query per
/// sequence; chunked prefill: several). Sequence b's queries are its last
/// positions seqlens[b] - len_q .. seqlens[b] - 1, so their own keys must
/// already be appended. Routing uses the block sums; attention reads only
/// the selected blocks, split over (sequence, kv head, block range) work
/// items merged by log-sum-exp when few sequences would leave threads idle.
///
///   q             [total_q, Hq, D], dtype of the cache, Hq % Hkv == 0
///   cu_seqlens_q  [batch + 1] int32, len_q <= seqlens[b]
///   config        config.block_size must equal cache.block_size
///   out           [total_q, Hq, D], dtype of q
///   lse           [Hq, total_q] float32, optional
///
/// The result equals moba::forward on the cached K/V with cu_seqlens_k from
/// seqlens (same routing, output within floating-point tolerance).
void kv_cache_decode(const KVCache& cache, const TensorView& q, const TensorView& cu_seqlens_q,
                     const Config& config, const TensorView& out, const TensorView& lse,
                     const ExecOptions& options = {});

/// The routing kv_cache_decode uses: selected [total_q, Hq, W] int32 with W
/// >= routing_width(max(seqlens), config), block indices ascending, -1 padded.
/// (A device cache cannot check W on the host: a row that does not fit is all
/// -1; min(top_k, ceil(capacity / block_size)) always fits.)
void kv_cache_routing(const KVCache& cache, const TensorView& q, const TensorView& cu_seqlens_q,
                      const Config& config, const TensorView& selected,
                      const ExecOptions& options = {});

/// Bytes of K and V a decode would read for these queries: the selected blocks
/// of every kv group, each once (keys past a query's position excluded). For
/// benchmarks (achieved bandwidth); it routes, so it costs about one routing
/// (and, for a device cache, a stream synchronization).
int64_t kv_cache_bytes_read(const KVCache& cache, const TensorView& q,
                            const TensorView& cu_seqlens_q, const Config& config,
                            const ExecOptions& options = {});

}  // namespace moba
