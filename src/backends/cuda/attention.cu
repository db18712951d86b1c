// Attention of MoBA (spec step 5) on the tensor cores, FlashAttention-2
// style: a CTA of 4 warps owns 128 query rows (32 per warp, so every K/V
// fragment read from shared memory feeds two m16 products), streams the keys
// through shared memory 64 at a time, and keeps the softmax online in
// registers (running max, running sum, fp32 output accumulator).
//
// The three modes differ only in where the rows and keys come from and in
// what the epilogue writes:
//   past     rows gathered from a (kv head, block) entry list: every query
//            row and query head of the kv group that selected the block
//            (GQA heads share the K/V tile); keys are the whole block; the
//            epilogue writes the normalized partial output and its lse.
//   current  a row tile of one sequence and query head against the keys of
//            each row's current block up to its position; the epilogue merges
//            the row's partials by log-sum-exp and writes out and lse.
//   dense    causal attention over all keys up to each row's position (the
//            top_k >= blocks switch; no routing, no partials).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "backends/cuda/attention_common.cuh"
#include "backends/cuda/kernels.cuh"
#include "backends/cuda/sm90_attention.cuh"

namespace moba::backends::cuda::detail {
namespace {

constexpr int kThreads = 128;

template <int D>
constexpr int smem_bytes() {
  return (kTileRows + 2 * kTileKeys) * D * 2;
}

template <class T, int D>
__device__ __forceinline__ void load_keys(uint32_t dst, const T* base, int64_t token_stride,
                                          const AttnTile& tk, int t0) {
  constexpr int kChunks = D / 8;
  const T* head_base = base + tk.key_row0 * token_stride;
#pragma unroll
  for (int i = 0; i < kTileKeys * kChunks / kThreads; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int r = idx / kChunks, c = idx % kChunks;
    const int t = t0 + r;
    const bool full = t < tk.hi;
    const T* src = full ? head_base + static_cast<int64_t>(t) * token_stride + c * 8 : base;
    cp_async16(dst + tile_offset<D>(r, c), src, full);
  }
}

template <class T, int D, AttnMode kMode>
__device__ void attend_tile(const AttnArgs& a, uint8_t* smem, const int64_t* row_q,
                            const int32_t* row_info, const AttnTile& tk, int64_t chunk_row0) {
  constexpr int kChunks = D / 8;
  constexpr int kDT = D / 8;  // n8 tiles of the output
  const T* q = static_cast<const T*>(a.q);
  const T* kb = static_cast<const T*>(a.k) + static_cast<int64_t>(tk.kvh) * a.k_hs;
  const T* vb = static_cast<const T*>(a.v) + static_cast<int64_t>(tk.kvh) * a.v_hs;
  const uint32_t sQ = smem_u32(smem);
  const uint32_t sK = sQ + kTileRows * D * 2;
  const uint32_t sV = sK + kTileKeys * D * 2;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const float scale_log2 = a.scale * kAttnLog2e;
  const int bs = a.block_size;

#pragma unroll
  for (int i = 0; i < kTileRows * kChunks / kThreads; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int r = idx / kChunks, c = idx % kChunks;
    const int64_t off = row_q[r];
    cp_async16(sQ + tile_offset<D>(r, c), off >= 0 ? q + off + c * 8 : q, off >= 0);
  }
  int t0 = first_key_step(tk);
  if (t0 >= 0) load_keys<T, D>(sK, kb, a.k_ts, tk, t0);
  cp_async_commit();

  // Positions of this thread's four rows (mt, half) for the masks.
  int pos[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) pos[mt][h] = row_info[warp * 32 + mt * 16 + h * 8 + g];

  float o[2][kDT][4];
  float m[2][2], l[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
      o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.0f;
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.0f;
  }

  while (t0 >= 0) {
    cp_async_wait_all();
    __syncthreads();  // K chunk (and Q) landed; every warp is done with the previous V
    load_keys<T, D>(sV, vb, a.v_ts, tk, t0);
    cp_async_commit();

    float s[2][8][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
        s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t af[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
        ldmatrix_x4(af[mt],
                    sQ + tile_offset<D>(warp * 32 + mt * 16 + (lane & 15), 2 * ks + (lane >> 4)));
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bf[4];
        ldmatrix_x4(bf, sK + tile_offset<D>(np * 16 + (lane & 7) + ((lane >> 4) << 3),
                                            2 * ks + ((lane >> 3) & 1)));
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma16816<T>(s[mt][2 * np], af[mt], bf[0], bf[1]);
          mma16816<T>(s[mt][2 * np + 1], af[mt], bf[2], bf[3]);
        }
      }
    }

    if (key_step_needs_mask<kMode, kTileKeys>(tk, t0, bs)) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int t = t0 + nt * 8 + 2 * tq + (e & 1);
            bool keep;
            if constexpr (kMode == AttnMode::past) {
              keep = t < tk.hi;
            } else {
              const int p = pos[mt][e >> 1];
              keep = t <= p;
              if constexpr (kMode == AttnMode::current) keep = keep && t >= (p / bs) * bs;
            }
            if (!keep) s[mt][nt][e] = -INFINITY;
          }
    }

    // Online softmax: new row max (over the quad), rescale, exponentiate.
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        online_softmax_row<8, kDT>(
            m[mt][h], l[mt][h], scale_log2,
            [&](int nt, int j) -> float& { return s[mt][nt][2 * h + j]; },
            [&](int dt, int j) -> float& { return o[mt][dt][2 * h + j]; });

    cp_async_wait_all();
    __syncthreads();  // V landed; every warp is done reading K
    const int t_next = next_key_step<kMode, kTileKeys>(tk, t0, bs);
    if (t_next >= 0) {
      load_keys<T, D>(sK, kb, a.k_ts, tk, t_next);
      cp_async_commit();
    }

#pragma unroll
    for (int kc = 0; kc < kTileKeys / 16; ++kc) {
      uint32_t pf[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        pf[mt][0] = pack2<T>(s[mt][2 * kc][0], s[mt][2 * kc][1]);
        pf[mt][1] = pack2<T>(s[mt][2 * kc][2], s[mt][2 * kc][3]);
        pf[mt][2] = pack2<T>(s[mt][2 * kc + 1][0], s[mt][2 * kc + 1][1]);
        pf[mt][3] = pack2<T>(s[mt][2 * kc + 1][2], s[mt][2 * kc + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, sV + tile_offset<D>(kc * 16 + (lane & 7) + (((lane >> 3) & 1) << 3),
                                                  2 * dp + (lane >> 4)));
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma16816<T>(o[mt][2 * dp], pf[mt], bf[0], bf[1]);
          mma16816<T>(o[mt][2 * dp + 1], pf[mt], bf[2], bf[3]);
        }
      }
    }
    t0 = t_next;
  }

  // Epilogue (attention_common.cuh): partials + lse (past), LSE merge +
  // out/lse (current), out/lse (dense).
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      store_row<T, D, kMode>(a, tk, warp * 32 + mt * 16 + h * 8 + g, pos[mt][h], row_info, 0,
                             m[mt][h], l[mt][h], scale_log2, bs, chunk_row0, tq,
                             [&](int dt, int j) -> float& { return o[mt][dt][2 * h + j]; });
}

template <class T, int D, AttnMode kMode>
__global__ void __launch_bounds__(kThreads, 2) attention_kernel(const AttnArgs a) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int64_t row_q[kTileRows];     // element offset of the row's q vector; -1 for padding
  __shared__ int32_t row_info[kTileRows];  // past: entry index; otherwise: the row's position
  const SeqTable& st = a.seq;

  // The packed row of the chunk's first tile: row 0 of the partials.
  int64_t chunk_row0 = 0;
  {
    TileRows first{};
    if (locate_tile(st, a.tile_begin, first)) chunk_row0 = st.q_begin[first.seq] + first.first;
  }

  if constexpr (kMode == AttnMode::past) {
    const int tiles = *a.num_descs;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      AttnTile tk{};
      decode_past_tile(a, a.descs[tile], tk);
      const int r = threadIdx.x;
      if (r < tk.rows) {
        const int e = a.entries[tk.entry0 + r];
        row_q[r] = past_q_offset(a, e, chunk_row0);
        row_info[r] = e;
      } else {
        row_q[r] = -1;
        row_info[r] = 0;
      }
      __syncthreads();
      attend_tile<T, D, kMode>(a, smem, row_q, row_info, tk, chunk_row0);
      __syncthreads();  // the next tile rewrites the row tables and shared tiles
    }
  } else {
    // Heads vary fastest so that the query heads of a kv group run side by
    // side and share the K/V tiles in L2; the longest (last) tiles go first.
    const int head = static_cast<int>(blockIdx.x % a.heads_q);
    const int tiles = a.tile_end - a.tile_begin;
    const int tile = a.tile_begin + (tiles - 1 - static_cast<int>(blockIdx.x / a.heads_q));
    TileRows tr{};
    if (!locate_tile(st, tile, tr)) return;
    const int b = tr.seq;
    const int len_q = st.q_begin[b + 1] - st.q_begin[b];
    const int len_k = st.k_begin[b + 1] - st.k_begin[b];
    AttnTile tk{};
    tk.kvh = head / a.group;
    tk.key_row0 = st.k_begin[b];
    tk.first_pos = len_k - len_q + tr.first;
    tk.last_pos = tk.first_pos + tr.count - 1;
    tk.lo = kMode == AttnMode::current ? (tk.first_pos / a.block_size) * a.block_size : 0;
    tk.hi = tk.last_pos + 1;
    tk.rows = tr.count;
    tk.row0 = static_cast<int64_t>(st.q_begin[b]) + tr.first;
    tk.head = head;
    const int r = threadIdx.x;
    if (r < tr.count) {
      row_q[r] = (tk.row0 + r) * a.q_ts + static_cast<int64_t>(head) * a.q_hs;
      row_info[r] = tk.first_pos + r;
    } else {
      row_q[r] = -1;
      row_info[r] = tk.last_pos;
    }
    __syncthreads();
    attend_tile<T, D, kMode>(a, smem, row_q, row_info, tk, chunk_row0);
  }
}

template <class T, int D, AttnMode kMode>
cudaError_t launch_typed(const AttnArgs& a, cudaStream_t stream) {
  constexpr int smem = smem_bytes<D>();
  cudaError_t err = cudaFuncSetAttribute(attention_kernel<T, D, kMode>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  int64_t ctas;
  if constexpr (kMode == AttnMode::past)
    ctas = a.grid;
  else
    ctas = static_cast<int64_t>(a.tile_end - a.tile_begin) * a.heads_q;
  if (ctas <= 0) return cudaSuccess;
  attention_kernel<T, D, kMode><<<static_cast<unsigned>(ctas), kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_attention(Elem elem, AttnMode mode, const AttnArgs& a, cudaStream_t stream) {
  // Hopper with sm_90a code in the binary: the wgmma kernel (attention_sm90.cu)
  // for dense attention and large blocks (sm90_switch.cuh says why).
  if (sm90_attention_wanted(mode == AttnMode::dense, a.block_size) && sm90_attention_supported())
    return launch_attention_sm90(elem, mode, a, stream);
  return with_elem_dim(elem, a.head_dim, [&]<class T, int D>(ElemDimTag<T, D>) {
    return with_attn_mode(
        mode, [&]<AttnMode kMode>(ModeTag<kMode>) { return launch_typed<T, D, kMode>(a, stream); });
  });
}

}  // namespace moba::backends::cuda::detail
