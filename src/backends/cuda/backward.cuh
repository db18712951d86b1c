// The tensor-core kernels of the CUDA backward and their launchers, shared
// between backward.cu (the host side) and backward_mma.cu (the kernels).
// docs/cuda_backward.md explains the design.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "backends/cuda/kernels.cuh"

namespace moba::backends::cuda::detail {

// Keys per work item of the key-major dK/dV kernel (4 warps x 16 keys) and
// gathered rows per step of it.
inline constexpr int kBwdKeyTile = 64;
inline constexpr int kBwdRowTile = 64;
// Keys per work item of the Hopper dK/dV kernel (2 consumer warpgroups x 64
// keys); it streams the same kBwdRowTile-row steps.
inline constexpr int kBwdSm90KeyTile = 128;

/// What the backward kernels read and write. `f` carries the forward's view
/// of the problem (q, k, v, the saved output in f.out, the saved lse, the
/// geometry, the chunk's row tiles and the forward's tile descriptors).
struct BwdArgs {
  AttnArgs f;
  const void* dout;
  int64_t do_ts, do_hs;
  float* delta;  // [total_q][heads_q]: rowsum(dO * O)
  int heads_kv;
  int64_t total_q;
  bool dense;  // top_k >= blocks: every key up to the row's position
  // Routed chunks: the selection of the chunk's rows ([rows][heads_q][past],
  // global block indices, -1 padded; null when nothing is routed) and, per
  // (kv head, block) bucket, its entries lists[seg_begin[b], seg_end[b])
  // (sorted in deterministic mode).
  const int32_t* sel;
  const int32_t* seg_begin;
  const int32_t* seg_end;
  const int32_t* lists;
  int key_tiles_per_block;  // ceil(block_size / key tile): kBwdKeyTile, or kBwdSm90KeyTile
  float* dq_part;           // [entries of the chunk][D]: dq of an entry from its past block
  // Fast mode on Hopper, dq fused into the dK/dV kernel: fp32 dq of the
  // chunk's rows, [row - first row of the chunk][heads_q][D], added to by
  // atomics (null otherwise).
  float* dq_acc;
  void* dq;
  int64_t dq_ts, dq_hs;
  float *dk_acc, *dv_acc;  // [total_k][heads_kv][D], carried across chunks
};

/// delta = rowsum(dO * O) per (row, query head), fp32.
cudaError_t launch_bwd_delta(Elem elem, const BwdArgs& a, cudaStream_t stream);

/// Key-major dK/dV of the chunk's rows: one CTA per (kv head, block, 64-key
/// tile); adds the contributions of the rows whose current block holds the
/// tile (causally) and of the entries that chose the block to the fp32
/// accumulators, in a fixed order given fixed lists.
cudaError_t launch_bwd_dkv(Elem elem, const BwdArgs& a, int64_t items, cudaStream_t stream);

/// The same on Hopper (backward_sm90.cu): one CTA per (kv head, block,
/// 128-key tile), the same rows in the same order. Only when
/// bwd_sm90_supported() (sm90_backward_switch.cuh). With a.dq_acc set it
/// also computes dQ = dS K per row step and adds it to a.dq_acc by fp32
/// atomics (the fused fast mode; the dq passes then do not run).
cudaError_t launch_bwd_dkv_sm90(Elem elem, const BwdArgs& a, int64_t items, cudaStream_t stream);

/// dq of the chunk's rows from a.dq_acc (the fused mode's fp32 sums) in the
/// dtype; zeroes the sums it read, ready for the next chunk.
cudaError_t launch_bwd_store_dq_chunk(Elem elem, const BwdArgs& a, cudaStream_t stream);

/// Query-major dQ. past: the gathered entries of a descriptor against their
/// whole block -> dq_part; current: a row tile against its current blocks,
/// plus the row's dq_part in selection order -> dq; dense: keys 0..p -> dq.
cudaError_t launch_bwd_dq(Elem elem, AttnMode mode, const BwdArgs& a, cudaStream_t stream);

/// The same on Hopper (backward_dq_sm90.cu): the same row tiles, masks,
/// arithmetic and epilogue, equal within rounding (each bitwise
/// reproducible). Only when bwd_sm90_supported() and bwd_sm90_dq_enabled()
/// (sm90_backward_switch.cuh).
cudaError_t launch_bwd_dq_sm90(Elem elem, AttnMode mode, const BwdArgs& a, cudaStream_t stream);

}  // namespace moba::backends::cuda::detail
