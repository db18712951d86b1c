// Device code shared by the Hopper (sm_90a) kernels that run the forward's
// row tiles with a copying producer warpgroup: the forward's attention kernel
// (attention_sm90.cu) and the backward's query-major dq kernel
// (backward_dq_sm90.cu). The producer's copy geometry into 128-byte-swizzled
// tiles, the decoding of a launch's tiles in the three modes, and the copy of
// a tile's 128 rows of a query-like tensor (gathered in past mode).
//
// The device code exists only in the sm_90a device pass
// (__CUDA_ARCH_FEAT_SM90_ALL), as the kernels' bodies (sm90_ptx.cuh says why);
// the launchers' grid size is host code.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "backends/cuda/attention_common.cuh"
#include "backends/cuda/kernels.cuh"
#include "backends/cuda/sm90_ptx.cuh"

namespace moba::backends::cuda::detail {

// The persistent grid of these kernels: one CTA per SM at most (their shared
// memory and registers allow no more), and no more than there is work: past
// mode a.grid (the launch's descriptor bound), else one per (row tile, query
// head). 0 when there is nothing to launch.
template <AttnMode kMode>
cudaError_t sm90_persistent_ctas(const AttnArgs& a, int64_t& ctas) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess)
    return err;
  if constexpr (kMode == AttnMode::past)
    ctas = a.grid;
  else
    ctas = static_cast<int64_t>(a.tile_end - a.tile_begin) * a.heads_q;
  ctas = std::clamp<int64_t>(ctas, 0, sms);
  return cudaSuccess;
}

}  // namespace moba::backends::cuda::detail

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

namespace moba::backends::cuda::detail {

// The producer's copy geometry, the same for Q tiles and K/V stages (kRows
// rows of D elements, kTileRows unless said otherwise, stored as column
// blocks of 64 elements with rows of 128 bytes, 16-byte chunk c of row r at
// c ^ (r % 8): the 128-byte swizzle that the wgmma descriptors of
// sm90_ptx.cuh describe). Lane l of producer warp w copies chunk l % 8 of
// each column block of rows r0 + 16 i (i < kRows / 16), r0 = 4 w + l / 8: a
// warp instruction reads four whole 128-byte row segments. All of a thread's
// rows have the same r % 8, so its destination for (i, block) is one
// per-thread offset plus a constant (an immediate in the SASS), and its
// source advances by 16 rows per i.
inline constexpr int kCopyRowStep = 16;
inline constexpr int kCopyRows = kTileRows / kCopyRowStep;  // rows per thread
inline constexpr uint32_t kCopyRowGroupBytes = kCopyRowStep * 128;
inline constexpr uint32_t kColumnBlockBytes = kTileRows * 128;

struct CopyLane {
  int row0;      // first row
  int chunk;     // 16-byte chunk within a 64-column block
  uint32_t dst;  // swizzled byte offset of (row0, chunk) in a tile
  __device__ explicit CopyLane(int tid) {
    const int lane = tid & 31, warp = tid >> 5;
    row0 = 4 * warp + (lane >> 3);
    chunk = lane & 7;
    dst = static_cast<uint32_t>(row0 * 128 + ((chunk ^ (row0 & 7)) << 4));
  }
};

// A thread's chunks of kRows / 16 rows, all in range: src points at chunk
// `chunk` of the thread's first row, row_step is 16 rows in elements.
template <class T, int D, int kRows = kTileRows>
__device__ __forceinline__ void copy_rows_full(uint32_t dst, const T* src, int64_t row_step) {
  using namespace sm90;  // NOLINT(google-build-using-namespace)
  constexpr uint32_t kBlockBytes = kRows * 128u;
#pragma unroll
  for (int i = 0; i < kRows / kCopyRowStep; ++i) {
#pragma unroll
    for (int b = 0; b < D / 64; ++b)
      cp_async16_full(dst + i * kCopyRowGroupBytes + b * kBlockBytes, src + b * 64);
    src += row_step;
  }
}

// The same for a tile whose rows at or past `valid` (counted from the tile's
// row 0; row0 is the thread's first row) are zero-filled: nothing is read for
// them (`fallback` is any valid address), so keys past the tile's range
// contribute exact zeros, as in the mma.sync kernels.
template <class T, int D, int kRows = kTileRows>
__device__ __forceinline__ void copy_rows_partial(uint32_t dst, const T* src, int64_t row_step,
                                                  int row0, int valid, const T* fallback) {
  constexpr uint32_t kBlockBytes = kRows * 128u;
#pragma unroll
  for (int i = 0; i < kRows / kCopyRowStep; ++i) {
    const bool in = row0 + i * kCopyRowStep < valid;
#pragma unroll
    for (int b = 0; b < D / 64; ++b)
      cp_async16(dst + i * kCopyRowGroupBytes + b * kBlockBytes, in ? src + b * 64 : fallback, in);
    src += row_step;
  }
}

// Tile `index` of the launch: a descriptor (past) or a (row tile, query
// head) pair, heads fastest and longest tiles first (current, dense), as in
// the mma.sync kernels; decoded the same way by the producer and the
// consumers. False when the row tile does not exist.
template <AttnMode kMode>
__device__ __forceinline__ bool decode_tile(const AttnArgs& a, int index, AttnTile& tk) {
  tk.first_pos = tk.last_pos = 0;
  tk.row0 = 0;
  tk.head = 0;
  tk.entry0 = 0;
  if constexpr (kMode == AttnMode::past) {
    decode_past_tile(a, a.descs[index], tk);
    return true;
  } else {
    const int head = index % a.heads_q;
    const int tiles = a.tile_end - a.tile_begin;
    const int tile = a.tile_begin + (tiles - 1 - index / a.heads_q);
    const SeqTable& st = a.seq;
    TileRows tr{};
    if (!locate_tile(st, tile, tr)) return false;
    const int b = tr.seq;
    const int len_q = st.q_begin[b + 1] - st.q_begin[b];
    const int len_k = st.k_begin[b + 1] - st.k_begin[b];
    tk.kvh = head / a.group;
    tk.key_row0 = st.k_begin[b];
    tk.first_pos = len_k - len_q + tr.first;
    tk.last_pos = tk.first_pos + tr.count - 1;
    tk.lo = kMode == AttnMode::current ? (tk.first_pos / a.block_size) * a.block_size : 0;
    tk.hi = tk.last_pos + 1;
    tk.rows = tr.count;
    tk.row0 = static_cast<int64_t>(st.q_begin[b]) + tr.first;
    tk.head = head;
    return true;
  }
}

// The tile's 128 rows of a query-like tensor (base, token stride ts, head
// stride hs: q, or the backward's dO) into a tile; padding rows are
// zero-filled. Past mode gathers them through the entry list: lane l of warp
// w decodes row 4 w + l % 4 + 16 (l / 4) (the rows its warp copies, one
// each) and the warp passes the offsets around by shuffles, so each row costs
// one entry load and its two divisions once instead of once per
// chunk-copying thread.
template <class T, int D, AttnMode kMode>
__device__ __forceinline__ void load_row_tile(const AttnArgs& a, const AttnTile& tk, uint32_t dst,
                                              const CopyLane& cl, int64_t chunk_row0, const T* base,
                                              int64_t ts, int64_t hs) {
  if constexpr (kMode == AttnMode::past) {
    const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3;
    const int my_row = 4 * warp + (lane & 3) + kCopyRowStep * (lane >> 2);
    int64_t my_off = -1;
    if (my_row < tk.rows) {
      // past_q_offset (attention_common.cuh) with the given strides.
      const int e = a.entries[tk.entry0 + my_row];
      const int local = e / (a.heads_q * a.past);
      const int head = (e / a.past) % a.heads_q;
      my_off = (chunk_row0 + local) * ts + static_cast<int64_t>(head) * hs;
    }
#pragma unroll
    for (int i = 0; i < kCopyRows; ++i) {
      const int64_t off = __shfl_sync(0xffffffffu, my_off, 4 * i + (lane >> 3));
      const bool in = off >= 0;
      const T* src = base + off + cl.chunk * 8;
#pragma unroll
      for (int b = 0; b < D / 64; ++b)
        cp_async16(dst + i * kCopyRowGroupBytes + b * kColumnBlockBytes, in ? src + b * 64 : base,
                   in);
    }
  } else {
    const T* src =
        base + (tk.row0 + cl.row0) * ts + static_cast<int64_t>(tk.head) * hs + cl.chunk * 8;
    const int64_t row_step = kCopyRowStep * ts;
    if (tk.rows == kTileRows)
      copy_rows_full<T, D>(dst, src, row_step);
    else
      copy_rows_partial<T, D>(dst, src, row_step, cl.row0, tk.rows, base);
  }
}

// The tile's 128 query rows into a Q buffer.
template <class T, int D, AttnMode kMode>
__device__ __forceinline__ void load_q_tile(const AttnArgs& a, const AttnTile& tk, uint32_t dst,
                                            const CopyLane& cl, int64_t chunk_row0) {
  load_row_tile<T, D, kMode>(a, tk, dst, cl, chunk_row0, static_cast<const T*>(a.q), a.q_ts,
                             a.q_hs);
}

}  // namespace moba::backends::cuda::detail

#endif  // __CUDA_ARCH_FEAT_SM90_ALL
