// The kernels of the CUDA forward and their launchers, shared between the
// translation units of the backend. forward.cu plans the work and calls the
// launchers in stream order; every launcher returns the launch's error code.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "backends/cuda/common.cuh"

namespace moba::backends::cuda::detail {

enum class Elem { f16, bf16 };

/// The compile-time element type (and head dim) that with_elem and
/// with_elem_dim hand to their callable: the one place where a runtime dtype
/// and head dim pick a kernel instantiation.
template <class T>
struct ElemTag {};
template <class T, int D>
struct ElemDimTag {};

/// fn(ElemTag<T>{}) with T = __nv_bfloat16 or __half.
template <class Fn>
decltype(auto) with_elem(Elem elem, Fn&& fn) {
  if (elem == Elem::bf16) return fn(ElemTag<__nv_bfloat16>{});
  return fn(ElemTag<__half>{});
}

/// fn(ElemDimTag<T, D>{}) with D = 64 or 128 (the head dims the kernels
/// instantiate; the dispatch layer rejects others before any launch).
template <class Fn>
decltype(auto) with_elem_dim(Elem elem, int head_dim, Fn&& fn) {
  return with_elem(elem, [&]<class T>(ElemTag<T>) {
    if (head_dim == 64) return fn(ElemDimTag<T, 64>{});
    return fn(ElemDimTag<T, 128>{});
  });
}

/// Fills the SeqTable arrays from the caller's cu_seqlens and checks them
/// against the contract (start at 0, non-decreasing, end at the totals,
/// len_q <= len_k, lengths within max_seqlen, tables within the host's
/// bounds). On a violation every table is zeroed and *invalid set to 1, so
/// later kernels see an empty batch and never index out of bounds.
struct PrepareArgs {
  const int32_t* cu_q;
  int64_t cu_q_stride;
  const int32_t* cu_k;
  int64_t cu_k_stride;
  int batch;
  int64_t total_q, total_k, max_q, max_k;
  int block_size;
  int64_t blocks_bound, tiles_bound;
  int32_t *q_begin, *k_begin, *block_begin, *tile_begin, *invalid;
};
cudaError_t launch_prepare(const PrepareArgs& a, cudaStream_t stream);

/// kbar[kvh][block][d]: the mean of k over each block, summed exactly (fp64),
/// rounded to fp32 and then to the input dtype (spec step 2).
struct MeansArgs {
  const void* k;
  int64_t k_token_stride, k_head_stride;
  SeqTable seq;
  int heads_kv, head_dim, block_size;
  int64_t blocks_bound;
  void* kbar;
};
cudaError_t launch_block_means(Elem elem, const MeansArgs& a, cudaStream_t stream);

/// Routing (spec steps 3-4) of the row tiles [tile_begin, tile_end): gate
/// scores on the tensor cores, causal mask and top-k fused; only the chosen
/// block indices are written.
struct RouteArgs {
  const void* q;
  int64_t q_token_stride, q_head_stride;
  const void* kbar;  // [heads_kv][blocks_bound][D]; unread when no row has to choose
  SeqTable seq;
  int heads_q, heads_kv, group, head_dim, block_size;
  int64_t blocks_bound;
  int past;  // past blocks a query keeps: min(top_k - 1, blocks - 1 of the longest sequence)
  bool shared;
  int tile_begin, tile_end;
  // Output. user_layout: ascending block indices within the sequence, then
  // the current block, padded with -1 to `width`, at row = global query row.
  // Otherwise (forward workspace): global block indices (block_begin of the
  // sequence added), `past` slots padded with -1, at row = query row minus
  // the first row of tile_begin.
  int32_t* sel;
  int64_t sel_token_stride, sel_head_stride;
  int width;
  bool user_layout;
};
cudaError_t launch_route(Elem elem, const RouteArgs& a, cudaStream_t stream);

/// Inversion of a chunk's selection into per-(kv head, block) lists of
/// entries (entry = flat index into the selection workspace) and tiles of up
/// to kTileRows entries: count, scan (one CTA, over the buckets of the
/// chunk's own sequences only; every other bucket gets an empty list at its
/// offset, so cursor is the exclusive prefix over all buckets), fill.
struct InvertArgs {
  const int32_t* sel;  // [rows_bound][heads_q][past]
  int64_t entries_bound;
  SeqTable seq;
  int heads_q, group, past;
  int64_t blocks_bound;
  int tile_begin, tile_end;
  int32_t* counts;  // [heads_kv * blocks_bound], zeroed by the caller
  int32_t* cursor;  // [heads_kv * blocks_bound]
  int64_t buckets;
  int4* descs;  // {bucket, first entry, entries, 0}
  int32_t* num_descs;
  int32_t* entries;
};
cudaError_t launch_invert(const InvertArgs& a, cudaStream_t stream);

enum class AttnMode { past, current, dense };
template <AttnMode kMode>
using ModeTag = std::integral_constant<AttnMode, kMode>;

/// fn(ModeTag<mode>{}): the kernel instantiation of a runtime mode.
template <class Fn>
cudaError_t with_attn_mode(AttnMode mode, Fn&& fn) {
  switch (mode) {
    case AttnMode::past:
      return fn(ModeTag<AttnMode::past>{});
    case AttnMode::current:
      return fn(ModeTag<AttnMode::current>{});
    case AttnMode::dense:
      return fn(ModeTag<AttnMode::dense>{});
  }
  return cudaErrorInvalidValue;
}

/// Attention of 128-row tiles on the tensor cores with online softmax.
///   past:    rows gathered from the entry lists, keys = one whole past block;
///            writes the normalized partial output and its lse per entry.
///   current: the row tiles of a chunk against their current blocks (causal),
///            merged with the chunk's partials by log-sum-exp; writes out/lse.
///   dense:   plain causal attention (the top_k >= blocks switch).
struct AttnArgs {
  const void *q, *k, *v;
  int64_t q_ts, q_hs, k_ts, k_hs, v_ts, v_hs;
  void* out;
  int64_t o_ts, o_hs;
  float* lse;  // may be null
  int64_t lse_hs, lse_ts;
  SeqTable seq;
  int heads_q, group, head_dim, block_size;
  int past;  // partial slots per (row, head)
  float scale;
  int tile_begin, tile_end;  // row tiles of this chunk (current, dense; past: for the row base)
  // past mode
  const int4* descs;
  const int32_t* num_descs;
  const int32_t* entries;
  int64_t blocks_bound;
  int grid;         // persistent CTAs (past mode)
  void* part_o;     // [entries][D] in the input dtype
  float* part_lse;  // [entries]
};
cudaError_t launch_attention(Elem elem, AttnMode mode, const AttnArgs& a, cudaStream_t stream);

/// When the cu_seqlens were invalid: out and lse all NaN.
cudaError_t launch_poison_outputs(const int32_t* invalid, void* out, int64_t o_ts, int64_t o_hs,
                                  int64_t tokens, int heads, int head_dim, float* lse,
                                  int64_t lse_hs, int64_t lse_ts, cudaStream_t stream);
/// When the cu_seqlens were invalid: the selection all -1.
cudaError_t launch_poison_selection(const int32_t* invalid, int32_t* sel, int64_t s_ts,
                                    int64_t s_hs, int64_t tokens, int heads, int width,
                                    cudaStream_t stream);

}  // namespace moba::backends::cuda::detail
