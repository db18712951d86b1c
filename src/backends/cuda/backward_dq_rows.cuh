// Device code shared by the two query-major dq kernels of the CUDA backward:
// dq_kernel (backward_mma.cu, mma.sync) and dq_sm90_kernel
// (backward_dq_sm90.cu, wgmma). Both run the same row tiles with the same
// per-row sums; the epilogue that turns a row's fp32 sum into its output is
// this one copy, so both write the same thing in the same order (an fp32
// partial per entry; or the row's partials added in selection-slot order and
// dq written in the dtype).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "backends/cuda/backward.cuh"

namespace moba::backends::cuda::detail {

// The packed row of the chunk's first row tile: row 0 of its selection.
__device__ __forceinline__ int64_t chunk_first_row(const SeqTable& st, int tile_begin) {
  TileRows first{};
  return locate_tile(st, tile_begin, first) ? st.q_begin[first.seq] + first.first : 0;
}

// The epilogue of one dq row: this thread's columns 8 dt + 2 tq + j of the
// row's sum, read and written through dq(dt, j) (a float&). past: `out` is
// the entry, whose fp32 partial is written; current: `out` is the packed
// query row (query head `head`), whose partials from its past blocks are
// added in selection-slot order (a fixed order) before dq is written in the
// dtype; dense: dq written in the dtype.
template <class T, int D, AttnMode kMode, class Acc>
__device__ __forceinline__ void store_dq_row(const BwdArgs& a, int64_t out, int head,
                                             int64_t chunk_row0, int tq, Acc&& dq) {
  constexpr int kDT = D / 8;
  if constexpr (kMode == AttnMode::past) {
    float* dst = a.dq_part + out * D + 2 * tq;
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
      *reinterpret_cast<float2*>(dst + dt * 8) = make_float2(dq(dt, 0), dq(dt, 1));
  } else {
    if constexpr (kMode == AttnMode::current) {
      if (a.sel != nullptr) {
        const AttnArgs& f = a.f;
        const int64_t base = ((out - chunk_row0) * f.heads_q + head) * f.past;
        for (int sl = 0; sl < f.past; ++sl) {
          if (a.sel[base + sl] < 0) continue;
          const float* src = a.dq_part + (base + sl) * D + 2 * tq;
#pragma unroll
          for (int dt = 0; dt < kDT; ++dt) {
            const float2 y = *reinterpret_cast<const float2*>(src + dt * 8);
            dq(dt, 0) += y.x;
            dq(dt, 1) += y.y;
          }
        }
      }
    }
    T* dst = static_cast<T*>(a.dq) + out * a.dq_ts + static_cast<int64_t>(head) * a.dq_hs + 2 * tq;
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
      *reinterpret_cast<uint32_t*>(dst + dt * 8) = pack2<T>(dq(dt, 0), dq(dt, 1));
  }
}

}  // namespace moba::backends::cuda::detail
