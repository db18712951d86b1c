// The backward of MoBA's attention on the tensor cores (mma.sync m16n8k16,
// fp32 accumulation), FlashAttention-2's backward recast for MoBA's sparsity:
//
//   dkv_kernel  key-major. One CTA per (kv head, block, 64-key tile) keeps
//               its tile's K and V in shared memory and dK, dV in registers
//               (each of the 4 warps owns 16 keys) while it streams 64-row
//               tiles of the rows that attend to the tile: first the rows
//               whose current block holds it (causal; every query head of
//               the kv group), then the entries that chose the block as a
//               past block (the forward's per-bucket lists). Per row tile:
//               S^T = K Q^T, P^T = exp(scale S^T - lse), dV += P^T dO,
//               dP^T = V dO^T, dS^T = P^T (dP^T - delta) scale, dK += dS^T Q.
//               GQA reduces inside the CTA, without replication or atomics;
//               the result is added once to the fp32 accumulators.
//   dq_kernel   query-major, the forward's attention kernel turned around:
//               128 rows (8 warps x 16) stream 64-key chunks; S = Q K^T,
//               dP = dO V^T, dS = P (dP - delta) scale, dQ += dS K.
//                 past:    the gathered entries of one (kv head, block)
//                          descriptor against that whole block -> an fp32
//                          dq partial per entry;
//                 current: a row tile against each row's current block, plus
//                          the row's partials in selection order -> dq;
//                 dense:   keys 0..p -> dq.
//               Every dq is a fixed-order sum, so it is bitwise reproducible
//               in both modes and independent of the chunking.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "backends/cuda/backward.cuh"
#include "backends/cuda/backward_dq_rows.cuh"
#include "backends/cuda/backward_rows.cuh"

namespace moba::backends::cuda::detail {
namespace {

constexpr int kKvThreads = 128;  // 4 warps x 16 keys = kBwdKeyTile
constexpr int kDqThreads = 256;  // 8 warps x 16 rows = kTileRows
constexpr int kDqRows = kTileRows;
static_assert(kKvThreads / 32 * 16 == kBwdKeyTile, "one warp per 16 keys");
static_assert(kDqThreads / 32 * 16 == kDqRows, "one warp per 16 rows");
static_assert(kBwdKeyTile == 64 && kBwdRowTile == 64 && kTileKeys == 64,
              "the fragment loops below assume 64-wide tiles");

// K, V (one key tile) and two buffers of Q, dO (row tiles), D elements of 2
// bytes per row.
template <int D>
constexpr int dkv_smem_bytes() {
  return (2 * kBwdKeyTile + 4 * kBwdRowTile) * D * 2;
}
// Q, dO (128 rows) and two buffers of K, V (64 keys).
template <int D>
constexpr int dq_smem_bytes() {
  return (2 * kDqRows + 4 * kTileKeys) * D * 2;
}
static_assert(dq_smem_bytes<128>() <= 227 * 1024 && dkv_smem_bytes<128>() <= 227 * 1024,
              "shared memory per CTA");

// Rows [t0, t0 + kRows) of a key-like tensor (key t valid below hi) into a
// swizzled shared tile; invalid rows are zero-filled. `fallback` is a valid
// address for the zero-fill copies.
template <class T, int D, int kRows, int kThreads>
__device__ __forceinline__ void load_key_rows(uint32_t dst, const T* base, int64_t token_stride,
                                              int t0, int hi, const T* fallback) {
  constexpr int kChunks = D / 8;
  static_assert(kRows * kChunks % kThreads == 0, "whole copies per thread");
#pragma unroll
  for (int i = 0; i < kRows * kChunks / kThreads; ++i) {
    const int idx = static_cast<int>(threadIdx.x) + i * kThreads;
    const int r = idx / kChunks, c = idx % kChunks;
    const int t = t0 + r;
    const bool full = t < hi;
    cp_async16(dst + tile_offset<D>(r, c),
               full ? base + static_cast<int64_t>(t) * token_stride + c * 8 : fallback, full);
  }
}

// Gathered rows: row r of the tile is the D-vector at element offset
// offs(r) (negative: zero-filled).
template <class T, int D, int kRows, int kThreads, class Offset>
__device__ __forceinline__ void load_gathered_rows(uint32_t dst, const T* base, Offset offs) {
  constexpr int kChunks = D / 8;
  static_assert(kRows * kChunks % kThreads == 0, "whole copies per thread");
#pragma unroll
  for (int i = 0; i < kRows * kChunks / kThreads; ++i) {
    const int idx = static_cast<int>(threadIdx.x) + i * kThreads;
    const int r = idx / kChunks, c = idx % kChunks;
    const int64_t off = offs(r);
    cp_async16(dst + tile_offset<D>(r, c), off >= 0 ? base + off + c * 8 : base, off >= 0);
  }
}

// acc (16 x 16 NP) += A B^T over k = 0..D: A is the warp's 16 rows of the
// shared tile sA from row a_row0, B the 16 NP rows of sB from row b_row0
// (both [row][D]). Fragment addressing as in the forward's Q K^T.
template <class T, int D, int NP>
__device__ __forceinline__ void mma_abt(float (&acc)[2 * NP][4], uint32_t sA, int a_row0,
                                        uint32_t sB, int b_row0, int lane) {
#pragma unroll 2
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t af[4];
    ldmatrix_x4(af, sA + tile_offset<D>(a_row0 + (lane & 15), 2 * ks + (lane >> 4)));
#pragma unroll
    for (int np = 0; np < NP; ++np) {
      uint32_t bf[4];
      ldmatrix_x4(bf, sB + tile_offset<D>(b_row0 + np * 16 + (lane & 7) + ((lane >> 4) << 3),
                                          2 * ks + ((lane >> 3) & 1)));
      mma16816<T>(acc[2 * np], af, bf[0], bf[1]);
      mma16816<T>(acc[2 * np + 1], af, bf[2], bf[3]);
    }
  }
}

// acc (16 x D) += X B over k = 0..16 KC: X is a 16 x 16 KC accumulator-layout
// tile rounded to T (it becomes the A operand, as P in the forward's P V), B
// the 16 KC rows of sB from row b_row0 ([k][D], read transposed).
template <class T, int D, int KC>
__device__ __forceinline__ void mma_xb(float (&acc)[D / 8][4], const float (&x)[2 * KC][4],
                                       uint32_t sB, int b_row0, int lane) {
#pragma unroll
  for (int kc = 0; kc < KC; ++kc) {
    uint32_t af[4];
    af[0] = pack2<T>(x[2 * kc][0], x[2 * kc][1]);
    af[1] = pack2<T>(x[2 * kc][2], x[2 * kc][3]);
    af[2] = pack2<T>(x[2 * kc + 1][0], x[2 * kc + 1][1]);
    af[3] = pack2<T>(x[2 * kc + 1][2], x[2 * kc + 1][3]);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t bf[4];
      ldmatrix_x4_trans(
          bf, sB + tile_offset<D>(b_row0 + kc * 16 + (lane & 7) + (((lane >> 3) & 1) << 3),
                                  2 * dp + (lane >> 4)));
      mma16816<T>(acc[2 * dp], af, bf[0], bf[1]);
      mma16816<T>(acc[2 * dp + 1], af, bf[2], bf[3]);
    }
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&x)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) x[i][0] = x[i][1] = x[i][2] = x[i][3] = 0.0f;
}

// ---------------------------------------------------------------- delta

template <class T, int D>
__global__ void __launch_bounds__(128) delta_kernel(const BwdArgs a) {
  constexpr int E = D / 32;  // columns per lane
  const AttnArgs& f = a.f;
  const int lane = threadIdx.x & 31;
  const int64_t n = a.total_q * f.heads_q;
  for (int64_t w = blockIdx.x * int64_t{4} + threadIdx.x / 32; w < n; w += int64_t{gridDim.x} * 4) {
    const int64_t row = w / f.heads_q;
    const int h = static_cast<int>(w % f.heads_q);
    const T* o = static_cast<const T*>(f.out) + row * f.o_ts + h * f.o_hs + lane * E;
    const T* d = static_cast<const T*>(a.dout) + row * a.do_ts + h * a.do_hs + lane * E;
    float s = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) s = fmaf(to_float<T>(o[e]), to_float<T>(d[e]), s);
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) s += __shfl_xor_sync(0xffffffffu, s, m);
    if (lane == 0) a.delta[w] = s;
  }
}

// ---------------------------------------------------------------- dK, dV

template <class T, int D>
__global__ void __launch_bounds__(kKvThreads) dkv_kernel(const BwdArgs a) {
  constexpr int kDT = D / 8;
  constexpr int kTileBytes = kBwdRowTile * D * 2;
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ KvRow slots[2][kBwdRowTile];
  __shared__ int chunk[2];
  // The tile's row sources, kept in shared memory rather than in registers
  // across the loop (the loop needs every register for dK, dV and the
  // fragments).
  __shared__ KvRowSource src;
  const AttnArgs& f = a.f;
  const SeqTable& st = f.seq;

  KvTile kt;
  if (!decode_kv_tile<kBwdKeyTile>(a, blockIdx.x, kt)) return;
  const int kvh = kt.kvh, b = kt.b, t0 = kt.t0, t1 = kt.t1;
  if (threadIdx.x == 0) chunk_rows(st, f.tile_begin, f.tile_end, &chunk[0], &chunk[1]);
  __syncthreads();
  int n_tiles;
  {
    const KvRowSource rs = kv_row_source(a, kt, chunk[0], chunk[1]);
    n_tiles = rs.n_tiles;
    if (n_tiles == 0) return;  // nothing of this chunk attends to the tile
    if (threadIdx.x == 0) src = rs;
  }
  __syncthreads();

  const T* q = static_cast<const T*>(f.q);
  const T* dout = static_cast<const T*>(a.dout);
  const auto fill_slots = [&](int tile, KvRow* s) {
    const int r = threadIdx.x;
    if (r < kBwdRowTile) s[r] = kv_row(a, src, tile, r);
  };

  const uint32_t sK = smem_u32(smem);
  const uint32_t sV = sK + kBwdKeyTile * D * 2;
  const uint32_t sQ0 = sV + kBwdKeyTile * D * 2;  // Q of buffer i at sQ0 + 2 i kTileBytes
  const auto load_rows = [&](int buf) {
    const KvRow* s = slots[buf];
    const uint32_t dst = sQ0 + 2 * buf * kTileBytes;
    load_gathered_rows<T, D, kBwdRowTile, kKvThreads>(dst, q, [&](int r) { return s[r].q; });
    load_gathered_rows<T, D, kBwdRowTile, kKvThreads>(dst + kTileBytes, dout,
                                                      [&](int r) { return s[r].dout; });
  };

  {
    const int64_t key_row0 = st.k_begin[b];
    const T* k = static_cast<const T*>(f.k);
    const T* v = static_cast<const T*>(f.v);
    load_key_rows<T, D, kBwdKeyTile, kKvThreads>(
        sK, k + static_cast<int64_t>(kvh) * f.k_hs + key_row0 * f.k_ts, f.k_ts, t0, t1, k);
    load_key_rows<T, D, kBwdKeyTile, kKvThreads>(
        sV, v + static_cast<int64_t>(kvh) * f.v_hs + key_row0 * f.v_ts, f.v_ts, t0, t1, v);
  }
  fill_slots(0, slots[0]);
  __syncthreads();
  load_rows(0);
  cp_async_commit();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const float scale_log2 = f.scale * kAttnLog2e;
  // This thread's keys: rows g and g + 8 of the warp's 16.
  const int key_lo = t0 + warp * 16 + g;
  float dk[kDT][4], dv[kDT][4];
  zero(dk);
  zero(dv);

  for (int it = 0; it < n_tiles; ++it) {
    const int buf = it & 1;
    if (it + 1 < n_tiles) fill_slots(it + 1, slots[buf ^ 1]);
    cp_async_wait_all();
    __syncthreads();  // tile `it` landed; slots of it + 1 visible; buffer buf ^ 1 free
    if (it + 1 < n_tiles) {
      load_rows(buf ^ 1);
      cp_async_commit();
    }
    const KvRow* s = slots[buf];
    const uint32_t sQ = sQ0 + 2 * buf * kTileBytes;
    const uint32_t sdO = sQ + kTileBytes;

    // Two halves of 32 rows each, one after the other, so that only 16 x 32
    // scores and 16 x 32 dP values are live next to dK and dV (no spills).
#pragma unroll 1
    for (int half = 0; half < 2; ++half) {
      const int r0 = half * 32;
      // P^T = exp(scale K Q^T - lse), masked by key validity and causality.
      float x[4][4];
      zero(x);
      mma_abt<T, D, 2>(x, sK, warp * 16, sQ, r0, lane);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const KvRow& row = s[r0 + nt * 8 + 2 * tq + j];
          const int pos = row.pos;
          const float lse2 = row.lse2;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int key = key_lo + 8 * h;
            const bool keep = key < t1 && key <= pos;
            float& e = x[nt][2 * h + j];
            e = keep ? fast_exp2(fmaf(e, scale_log2, -lse2)) : 0.0f;
          }
        }
      mma_xb<T, D, 2>(dv, x, sdO, r0, lane);  // dV += P^T dO

      // dS^T = P^T (V dO^T - delta) scale, then dK += dS^T Q.
      float dp[4][4];
      zero(dp);
      mma_abt<T, D, 2>(dp, sV, warp * 16, sdO, r0, lane);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float delta = s[r0 + nt * 8 + 2 * tq + j].delta;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float& e = x[nt][2 * h + j];
            e = e * (dp[nt][2 * h + j] - delta) * f.scale;
          }
        }
      mma_xb<T, D, 2>(dk, x, sQ, r0, lane);
    }
    __syncthreads();  // the next iteration refills slots[buf]
  }

  // One owner per (key, kv head) and chunk: add to the accumulators.
  const int64_t key_row0 = st.k_begin[b];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int key = key_lo + 8 * h;
    if (key >= t1) continue;
    add_key_grads<D>(
        a, key_row0 + key, kvh, tq, [&](int dt, int j) { return dk[dt][2 * h + j]; },
        [&](int dt, int j) { return dv[dt][2 * h + j]; });
  }
}

// ---------------------------------------------------------------- dQ

// One row of the query-major kernel.
struct DqRow {
  int64_t q, dout;  // element offsets; -1 for padding
  int64_t out;      // past: the entry; otherwise the packed query row
  float lse2, delta;
  int first, pos;  // keys [first, pos] (past: [0, INT_MAX]); pos -1 for padding
};

template <class T, int D, AttnMode kMode>
__device__ void dq_tile(const BwdArgs& a, uint8_t* smem, const DqRow* rows, int kvh,
                        int64_t key_row0, int lo, int hi, int first_pos, int last_pos, int nrows,
                        int head, int64_t chunk_row0) {
  constexpr int kDT = D / 8;
  constexpr int kKeyBytes = kTileKeys * D * 2;
  const AttnArgs& f = a.f;
  const T* k = static_cast<const T*>(f.k);
  const T* v = static_cast<const T*>(f.v);
  const T* kb = k + static_cast<int64_t>(kvh) * f.k_hs + key_row0 * f.k_ts;
  const T* vb = v + static_cast<int64_t>(kvh) * f.v_hs + key_row0 * f.v_ts;
  const uint32_t sQ = smem_u32(smem);
  const uint32_t sdO = sQ + kDqRows * D * 2;
  const uint32_t sKV = sdO + kDqRows * D * 2;  // buffer i: K at sKV + 2 i kKeyBytes, V after it
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int bs = f.block_size;

  // The next 64-key chunk after t that some row needs, or -1 (current mode
  // skips chunks wholly before every remaining row's block, as the forward).
  const auto next_chunk = [&](int t) {
    t += kTileKeys;
    if (t >= hi) return -1;
    if constexpr (kMode == AttnMode::current) {
      const int p = max(first_pos, t);
      if (p > last_pos) return -1;
      t = max(t, (p / bs) * bs);
    }
    return t;
  };

  load_gathered_rows<T, D, kDqRows, kDqThreads>(sQ, static_cast<const T*>(f.q),
                                                [&](int r) { return rows[r].q; });
  load_gathered_rows<T, D, kDqRows, kDqThreads>(sdO, static_cast<const T*>(a.dout),
                                                [&](int r) { return rows[r].dout; });
  int t = lo < hi ? lo : -1;
  if (t >= 0) {
    load_key_rows<T, D, kTileKeys, kDqThreads>(sKV, kb, f.k_ts, t, hi, k);
    load_key_rows<T, D, kTileKeys, kDqThreads>(sKV + kKeyBytes, vb, f.v_ts, t, hi, v);
  }
  cp_async_commit();

  // This thread's rows: g and g + 8 of the warp's 16.
  int first[2], pos[2];
  float lse2[2], delta[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const DqRow& r = rows[warp * 16 + g + 8 * h];
    first[h] = r.first;
    pos[h] = r.pos;
    lse2[h] = r.lse2;
    delta[h] = r.delta;
  }
  const float scale_log2 = f.scale * kAttnLog2e;
  float dq[kDT][4];
  zero(dq);

  int buf = 0;
  while (t >= 0) {
    cp_async_wait_all();
    __syncthreads();  // chunk t (and Q, dO) landed; every warp is done with buffer buf ^ 1
    const int t_next = next_chunk(t);
    const uint32_t sK = sKV + 2 * buf * kKeyBytes, sV = sK + kKeyBytes;
    if (t_next >= 0) {
      const uint32_t nK = sKV + 2 * (buf ^ 1) * kKeyBytes;
      load_key_rows<T, D, kTileKeys, kDqThreads>(nK, kb, f.k_ts, t_next, hi, k);
      load_key_rows<T, D, kTileKeys, kDqThreads>(nK + kKeyBytes, vb, f.v_ts, t_next, hi, v);
      cp_async_commit();
    }
    // Two halves of 32 keys, one after the other, to keep few scores live.
#pragma unroll 1
    for (int half = 0; half < 2; ++half) {
      const int c0 = half * 32;
      float x[4][4], dp[4][4];
      zero(x);
      zero(dp);
      mma_abt<T, D, 2>(x, sQ, warp * 16, sK, c0, lane);
      mma_abt<T, D, 2>(dp, sdO, warp * 16, sV, c0, lane);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e >> 1;
          const int key = t + c0 + nt * 8 + 2 * tq + (e & 1);
          const bool keep = key < hi && key >= first[h] && key <= pos[h];
          const float p = keep ? fast_exp2(fmaf(x[nt][e], scale_log2, -lse2[h])) : 0.0f;
          x[nt][e] = p * (dp[nt][e] - delta[h]) * f.scale;
        }
      mma_xb<T, D, 2>(dq, x, sK, c0, lane);  // dQ += dS K
    }
    buf ^= 1;
    t = t_next;
  }
  cp_async_wait_all();  // nothing may still be landing when the next descriptor reloads

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = warp * 16 + g + 8 * h;
    if (r >= nrows) continue;
    store_dq_row<T, D, kMode>(a, rows[r].out, head, chunk_row0, tq,
                              [&](int dt, int j) -> float& { return dq[dt][2 * h + j]; });
  }
}

template <class T, int D, AttnMode kMode>
__global__ void __launch_bounds__(kDqThreads) dq_kernel(const BwdArgs a) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ DqRow rows[kDqRows];
  const AttnArgs& f = a.f;
  const SeqTable& st = f.seq;
  const int64_t chunk_row0 = chunk_first_row(st, f.tile_begin);
  const auto fill = [&](int r, int64_t row, int head, int64_t out, int first, int pos) {
    DqRow x{};
    x.q = row * f.q_ts + static_cast<int64_t>(head) * f.q_hs;
    x.dout = row * a.do_ts + static_cast<int64_t>(head) * a.do_hs;
    x.out = out;
    x.lse2 = f.lse[static_cast<int64_t>(head) * f.lse_hs + row * f.lse_ts] * kAttnLog2e;
    x.delta = a.delta[row * f.heads_q + head];
    x.first = first;
    x.pos = pos;
    rows[r] = x;
  };
  const auto pad = [&](int r) {
    DqRow x{};
    x.q = x.dout = -1;
    x.out = 0;
    x.lse2 = x.delta = 0.0f;
    x.first = 0;
    x.pos = -1;
    rows[r] = x;
  };

  if constexpr (kMode == AttnMode::past) {
    const int tiles = *f.num_descs;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const int4 desc = f.descs[tile];
      const int kvh = static_cast<int>(desc.x / f.blocks_bound);
      const int gb = static_cast<int>(desc.x - kvh * f.blocks_bound);
      const int b = upper_index(st.block_begin, st.batch + 1, gb);
      const int len_k = st.k_begin[b + 1] - st.k_begin[b];
      const int lo = (gb - st.block_begin[b]) * f.block_size;
      const int hi = min(lo + f.block_size, len_k);
      const int r = threadIdx.x;
      if (r < kDqRows) {
        if (r < desc.z) {
          const int e = f.entries[desc.y + r];
          const int64_t row = chunk_row0 + e / (f.heads_q * f.past);
          fill(r, row, (e / f.past) % f.heads_q, e, 0, INT_MAX);
        } else {
          pad(r);
        }
      }
      __syncthreads();
      dq_tile<T, D, kMode>(a, smem, rows, kvh, st.k_begin[b], lo, hi, 0, 0, desc.z, 0, chunk_row0);
      __syncthreads();  // the next descriptor rewrites the rows and the shared tiles
    }
  } else {
    // Heads fastest (a kv group's heads share K/V in L2), longest tiles first.
    const int head = static_cast<int>(blockIdx.x % f.heads_q);
    const int tiles = f.tile_end - f.tile_begin;
    const int tile = f.tile_begin + (tiles - 1 - static_cast<int>(blockIdx.x / f.heads_q));
    TileRows tr{};
    if (!locate_tile(st, tile, tr)) return;
    const int b = tr.seq;
    const int len_q = st.q_begin[b + 1] - st.q_begin[b];
    const int len_k = st.k_begin[b + 1] - st.k_begin[b];
    const int first_pos = len_k - len_q + tr.first;
    const int last_pos = first_pos + tr.count - 1;
    const int bs = f.block_size;
    const int lo = kMode == AttnMode::current ? (first_pos / bs) * bs : 0;
    const int64_t row_first = static_cast<int64_t>(st.q_begin[b]) + tr.first;
    const int r = threadIdx.x;
    if (r < kDqRows) {
      if (r < tr.count) {
        const int pos = first_pos + r;
        fill(r, row_first + r, head, row_first + r,
             kMode == AttnMode::current ? (pos / bs) * bs : 0, pos);
      } else {
        pad(r);
      }
    }
    __syncthreads();
    dq_tile<T, D, kMode>(a, smem, rows, head / f.group, st.k_begin[b], lo, last_pos + 1, first_pos,
                         last_pos, tr.count, head, chunk_row0);
  }
}

// ---------------------------------------------------------------- launchers

template <class T, int D>
cudaError_t dkv_typed(const BwdArgs& a, int64_t items, cudaStream_t stream) {
  constexpr int smem = dkv_smem_bytes<D>();
  const cudaError_t err =
      cudaFuncSetAttribute(dkv_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  if (items <= 0) return cudaSuccess;
  if (items > INT32_MAX) return cudaErrorInvalidConfiguration;
  dkv_kernel<T, D><<<static_cast<unsigned>(items), kKvThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <class T, int D, AttnMode kMode>
cudaError_t dq_typed(const BwdArgs& a, cudaStream_t stream) {
  constexpr int smem = dq_smem_bytes<D>();
  const cudaError_t err = cudaFuncSetAttribute(dq_kernel<T, D, kMode>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  int64_t ctas;
  if constexpr (kMode == AttnMode::past)
    ctas = a.f.grid;
  else
    ctas = static_cast<int64_t>(a.f.tile_end - a.f.tile_begin) * a.f.heads_q;
  if (ctas <= 0) return cudaSuccess;
  dq_kernel<T, D, kMode><<<static_cast<unsigned>(ctas), kDqThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

// The fused mode's dq of a chunk: its rows' fp32 sums (a.dq_acc, relative
// to the chunk's first row) -> dq in the dtype; the sums read are zeroed for
// the next chunk. A warp per (row, query head).
template <class T, int D>
__global__ void __launch_bounds__(128) store_dq_chunk_kernel(const BwdArgs a) {
  constexpr int E = D / 32;  // columns per lane
  const AttnArgs& f = a.f;
  __shared__ int chunk[2];
  if (threadIdx.x == 0) chunk_rows(f.seq, f.tile_begin, f.tile_end, &chunk[0], &chunk[1]);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(chunk[1] - chunk[0]) * f.heads_q;
  for (int64_t w = blockIdx.x * int64_t{4} + threadIdx.x / 32; w < n; w += int64_t{gridDim.x} * 4) {
    const int64_t row = chunk[0] + w / f.heads_q;
    const int h = static_cast<int>(w % f.heads_q);
    float* acc = a.dq_acc + w * D + lane * E;
    T* dst = static_cast<T*>(a.dq) + row * a.dq_ts + h * a.dq_hs + lane * E;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      dst[e] = from_float<T>(acc[e]);
      acc[e] = 0.0f;
    }
  }
}

template <class T, int D>
cudaError_t store_dq_chunk_typed(const BwdArgs& a, cudaStream_t stream) {
  // Rows of the chunk: at most kTileRows per row tile.
  const int64_t warps = int64_t{a.f.tile_end - a.f.tile_begin} * kTileRows * a.f.heads_q;
  if (warps <= 0) return cudaSuccess;
  const int64_t grid = std::min<int64_t>((warps + 3) / 4, 65535);
  store_dq_chunk_kernel<T, D><<<static_cast<unsigned>(grid), 128, 0, stream>>>(a);
  return cudaGetLastError();
}

template <class T, int D>
cudaError_t delta_typed(const BwdArgs& a, cudaStream_t stream) {
  const int64_t warps = a.total_q * a.f.heads_q;
  if (warps <= 0) return cudaSuccess;
  const int64_t grid = std::min<int64_t>((warps + 3) / 4, 65535);
  delta_kernel<T, D><<<static_cast<unsigned>(grid), 128, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_bwd_delta(Elem elem, const BwdArgs& a, cudaStream_t stream) {
  return with_elem_dim(elem, a.f.head_dim, [&]<class T, int D>(ElemDimTag<T, D>) {
    return delta_typed<T, D>(a, stream);
  });
}

cudaError_t launch_bwd_store_dq_chunk(Elem elem, const BwdArgs& a, cudaStream_t stream) {
  return with_elem_dim(elem, a.f.head_dim, [&]<class T, int D>(ElemDimTag<T, D>) {
    return store_dq_chunk_typed<T, D>(a, stream);
  });
}

cudaError_t launch_bwd_dkv(Elem elem, const BwdArgs& a, int64_t items, cudaStream_t stream) {
  return with_elem_dim(elem, a.f.head_dim, [&]<class T, int D>(ElemDimTag<T, D>) {
    return dkv_typed<T, D>(a, items, stream);
  });
}

cudaError_t launch_bwd_dq(Elem elem, AttnMode mode, const BwdArgs& a, cudaStream_t stream) {
  return with_elem_dim(elem, a.f.head_dim, [&]<class T, int D>(ElemDimTag<T, D>) {
    return with_attn_mode(
        mode, [&]<AttnMode kMode>(ModeTag<kMode>) { return dq_typed<T, D, kMode>(a, stream); });
  });
}

}  // namespace moba::backends::cuda::detail
