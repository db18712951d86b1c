// Routing on the GPU (spec steps 3 and 4): the gate scores <q, kbar_j> of a
// tile of 128 queries against the block means of their sequence are formed
// on the tensor cores 64 blocks at a time and folded straight into per-query
// top-k lists held in registers, so the tokens x blocks score matrix never
// reaches memory. Only the chosen block indices are written.
//
// Ranking: a score and its block index form one 64-bit key whose order is
// the spec's: higher score first, NaN lowest, ties toward the lower block
// index. Each thread keeps the best keys among the candidates it sees; the
// four threads that share a query row then merge their lists.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "backends/cuda/kernels.cuh"

namespace moba::backends::cuda::detail {
namespace {

constexpr int kRouteThreads = 256;  // 8 warps x 16 rows = one row tile

// The ranking key of block j with score s: larger is better. Scores map to
// their order-preserving unsigned image (NaN to 0, the lowest; -0 as +0),
// the low word is ~j so that equal scores favour the lower index. A key of 0
// is "no candidate".
__device__ __forceinline__ uint64_t rank_key(float s, int j) {
  uint32_t u = __float_as_uint(s + 0.0f);
  u = (s != s) ? 0u : ((u & 0x80000000u) ? ~u : (u | 0x80000000u));
  return (static_cast<uint64_t>(u) << 32) | (0xffffffffu - static_cast<uint32_t>(j));
}
__device__ __forceinline__ int key_block(uint64_t key) {
  return static_cast<int>(0xffffffffu - static_cast<uint32_t>(key));
}

// Inserts x into the descending list best[0..KK) (dropping the last entry)
// unless it cannot make the row's top KK: x <= floor, a key that at least KK
// keys of the row reach (see quad_floor).
template <int KK>
__device__ __forceinline__ void insert_key(uint64_t (&best)[KK], uint64_t x, uint64_t floor) {
  if (x <= best[KK - 1] || x <= floor) return;
#pragma unroll
  for (int i = KK - 1; i > 0; --i)
    best[i] = x > best[i - 1] ? best[i - 1] : (x > best[i] ? x : best[i]);
  best[0] = x > best[0] ? x : best[0];
}

__device__ __forceinline__ uint64_t shfl_xor64(uint64_t x, int mask) {
  const uint32_t lo = __shfl_xor_sync(0xffffffffu, static_cast<uint32_t>(x), mask);
  const uint32_t hi = __shfl_xor_sync(0xffffffffu, static_cast<uint32_t>(x >> 32), mask);
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

// The largest KK-th best key among the quad's four lists: that thread holds
// KK keys at or above it, so no key below it can be in the row's top KK
// (nor in its top `past` <= KK). Candidates under it are dropped without
// touching the list, which keeps the warp off the insertion path for most of
// a long scan. (Only constant indices into `best`: a run-time index would
// move the lists to local memory.)
template <int KK>
__device__ __forceinline__ uint64_t quad_floor(const uint64_t (&best)[KK]) {
  uint64_t f = best[KK - 1];
  f = max(f, shfl_xor64(f, 1));
  return max(f, shfl_xor64(f, 2));
}

// The score of a ranking key as a float, for a cheap first test of the
// candidates: a candidate whose score is below it cannot beat the key. An
// empty or NaN key (high word 0) admits everything (open = true).
__device__ __forceinline__ float key_score(uint64_t key, bool& open) {
  const uint32_t u = static_cast<uint32_t>(key >> 32);
  open = u == 0;
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

// Merges the lists of the four threads of a quad: winners[r] is the block of
// the r-th best key of the row, for r < count (count <= KK, warp-uniform).
template <int KK>
__device__ __forceinline__ void quad_merge(uint64_t (&best)[KK], int count, int (&winners)[KK]) {
#pragma unroll
  for (int r = 0; r < KK; ++r) {
    if (r >= count) break;
    uint64_t m = best[0];
    m = max(m, shfl_xor64(m, 1));
    m = max(m, shfl_xor64(m, 2));
    winners[r] = key_block(m);
    if (best[0] == m) {
#pragma unroll
      for (int i = 0; i + 1 < KK; ++i) best[i] = best[i + 1];
      best[KK - 1] = 0;
    }
  }
}

// Writes the selection of one query row (count = min(past, current) past
// blocks, either all of 0..current-1 or the merged winners).
template <int KK>
__device__ void write_selection(const RouteArgs& a, int32_t* dst, int current, int block_base,
                                const int (&winners)[KK]) {
  const bool all = current <= a.past;
  const int count = all ? current : a.past;
  if (!a.user_layout) {
    if (all) {
      for (int s = 0; s < count; ++s) dst[s] = block_base + s;
    } else {
#pragma unroll
      for (int s = 0; s < KK; ++s)
        if (s < count) dst[s] = block_base + winners[s];
    }
    for (int s = count; s < a.past; ++s) dst[s] = -1;
    return;
  }
  if (all) {
    for (int s = 0; s < count; ++s) dst[s] = s;
  } else {
    // Ascending order: each winner goes to its rank among the winners.
#pragma unroll
    for (int i = 0; i < KK; ++i) {
      if (i >= count) break;
      int rank = 0;
#pragma unroll
      for (int m = 0; m < KK; ++m)
        if (m < count && winners[m] < winners[i]) ++rank;
      dst[rank] = winners[i];
    }
  }
  dst[count] = current;
  for (int s = count + 1; s < a.width; ++s) dst[s] = -1;
}

// Loads the A fragments (16 rows x D) of query rows row0 / row0 + 8 of head
// `head` straight from global memory (the tile is read once per CTA).
template <class T, int D>
__device__ __forceinline__ void load_query_fragments(const RouteArgs& a, int64_t row0, bool valid0,
                                                     int64_t row1, bool valid1, int head, int tq,
                                                     uint32_t (&frag)[D / 16][4]) {
  const T* q = static_cast<const T*>(a.q);
  const T* p0 = q + row0 * a.q_token_stride + static_cast<int64_t>(head) * a.q_head_stride + 2 * tq;
  const T* p1 = q + row1 * a.q_token_stride + static_cast<int64_t>(head) * a.q_head_stride + 2 * tq;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    frag[ks][0] = valid0 ? *reinterpret_cast<const uint32_t*>(p0 + ks * 16) : 0u;
    frag[ks][1] = valid1 ? *reinterpret_cast<const uint32_t*>(p1 + ks * 16) : 0u;
    frag[ks][2] = valid0 ? *reinterpret_cast<const uint32_t*>(p0 + ks * 16 + 8) : 0u;
    frag[ks][3] = valid1 ? *reinterpret_cast<const uint32_t*>(p1 + ks * 16 + 8) : 0u;
  }
}

// The packed query row of the first row of the launch's first tile: row 0
// of the forward's selection workspace.
__device__ int64_t chunk_first_row(const RouteArgs& a) {
  TileRows first{};
  locate_tile(a.seq, a.tile_begin, first);
  return a.seq.q_begin[first.seq] + first.first;
}

template <class T, int D, int KK, bool kShared>
__global__ void __launch_bounds__(kRouteThreads) route_kernel(const RouteArgs a) {
  __shared__ __align__(128) uint8_t stage[2][kRouteBlocks * D * 2];
  const int units = kShared ? a.heads_kv : a.heads_q;
  const int unit = blockIdx.x % units;
  const int tile = a.tile_begin + static_cast<int>(blockIdx.x / units);
  TileRows tr{};
  if (tile >= a.tile_end || !locate_tile(a.seq, tile, tr)) return;

  const SeqTable& st = a.seq;
  const int b = tr.seq;
  const int len_q = st.q_begin[b + 1] - st.q_begin[b];
  const int len_k = st.k_begin[b + 1] - st.k_begin[b];
  const int offset = len_k - len_q;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int r0 = warp * 16 + g, r1 = r0 + 8;  // rows within the tile
  const bool valid0 = r0 < tr.count, valid1 = r1 < tr.count;
  // Padding rows get no candidates (current block 0).
  const int current0 = valid0 ? (offset + tr.first + r0) / a.block_size : 0;
  const int current1 = valid1 ? (offset + tr.first + r1) / a.block_size : 0;
  const int current_last = (offset + tr.first + tr.count - 1) / a.block_size;
  const int kvh = kShared ? unit : unit / a.group;
  const int64_t qrow0 = st.q_begin[b] + tr.first + r0, qrow1 = qrow0 + 8;

  int winners0[KK], winners1[KK];
#pragma unroll
  for (int i = 0; i < KK; ++i) winners0[i] = winners1[i] = 0;

  // Only a row with more past blocks than it keeps has to rank them.
  if (current_last > a.past) {
    uint64_t best0[KK], best1[KK];
#pragma unroll
    for (int i = 0; i < KK; ++i) best0[i] = best1[i] = 0;
    uint64_t floor0 = 0, floor1 = 0;
    const T* kbar = static_cast<const T*>(a.kbar) +
                    (static_cast<int64_t>(kvh) * a.blocks_bound + st.block_begin[b]) * D;
    uint32_t frag[D / 16][4];
    if (!kShared) load_query_fragments<T, D>(a, qrow0, valid0, qrow1, valid1, unit, tq, frag);

    constexpr int kChunks = D / 8;
    const auto load_stage = [&](int first_block, int buffer) {
      const uint32_t base = smem_u32(stage[buffer]);
      for (int idx = threadIdx.x; idx < kRouteBlocks * kChunks; idx += kRouteThreads) {
        const int r = idx / kChunks, c = idx % kChunks;
        const int j = first_block + r;
        const bool full = j < current_last;
        const T* src = full ? kbar + static_cast<int64_t>(j) * D + c * 8 : kbar;
        cp_async16(base + tile_offset<D>(r, c), src, full);
      }
      cp_async_commit();
    };

    load_stage(0, 0);
    int buffer = 0;
    for (int first_block = 0; first_block < current_last;
         first_block += kRouteBlocks, buffer ^= 1) {
      cp_async_wait_all();
      __syncthreads();
      if (first_block + kRouteBlocks < current_last)
        load_stage(first_block + kRouteBlocks, buffer ^ 1);
      const uint32_t base = smem_u32(stage[buffer]);
      float acc[8][4];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
      for (int gi = 0; gi < (kShared ? a.group : 1); ++gi) {
        if (kShared)
          load_query_fragments<T, D>(a, qrow0, valid0, qrow1, valid1, kvh * a.group + gi, tq, frag);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          if (first_block + nt * 8 >= current_last) break;
#pragma unroll
          for (int ks = 0; ks < D / 16; ks += 2) {
            uint32_t bf[4];
            ldmatrix_x4(bf, base + tile_offset<D>(nt * 8 + (lane & 7), ks * 2 + (lane >> 3)));
            mma16816<T>(acc[nt], frag[ks], bf[0], bf[1]);
            mma16816<T>(acc[nt], frag[ks + 1], bf[2], bf[3]);
          }
        }
      }
      // A candidate scoring below the row's floor cannot be kept: one float
      // compare rejects it (the exact key comparison runs for the rest).
      bool open0, open1;
      const float bar0 = key_score(max(floor0, best0[KK - 1]), open0);
      const float bar1 = key_score(max(floor1, best1[KK - 1]), open1);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = first_block + nt * 8 + 2 * tq + e;
          const float s0 = acc[nt][e], s1 = acc[nt][2 + e];
          if (j < current0 && (open0 || s0 >= bar0)) insert_key(best0, rank_key(s0, j), floor0);
          if (j < current1 && (open1 || s1 >= bar1)) insert_key(best1, rank_key(s1, j), floor1);
        }
      }
      floor0 = quad_floor(best0);
      floor1 = quad_floor(best1);
    }
    quad_merge(best0, a.past, winners0);
    quad_merge(best1, a.past, winners1);
  }

  if (tq != 0) return;
  const int heads = kShared ? a.group : 1;
  const int first_head = kShared ? unit * a.group : unit;
  const int64_t row_shift = a.user_layout ? 0 : chunk_first_row(a);
  for (int hi = 0; hi < heads; ++hi) {
    const int head = first_head + hi;
    const int block_base = a.user_layout ? 0 : st.block_begin[b];
    const int64_t head_offset = static_cast<int64_t>(head) * a.sel_head_stride;
    if (valid0)
      write_selection<KK>(a, a.sel + (qrow0 - row_shift) * a.sel_token_stride + head_offset,
                          current0, block_base, winners0);
    if (valid1)
      write_selection<KK>(a, a.sel + (qrow1 - row_shift) * a.sel_token_stride + head_offset,
                          current1, block_base, winners1);
  }
}

// Routing when a query keeps more than 16 past blocks: one warp per query
// row finds the score threshold of its top `past` by repeated arg-max
// passes (O(past * blocks * D) per row; the fast kernel covers the common
// top-k), then writes the kept blocks in ascending order.
template <class T>
__global__ void __launch_bounds__(kRouteThreads) route_wide_kernel(const RouteArgs a) {
  const int units = a.shared ? a.heads_kv : a.heads_q;
  const int unit = blockIdx.x % units;
  const int tile = a.tile_begin + static_cast<int>(blockIdx.x / units);
  TileRows tr{};
  if (tile >= a.tile_end || !locate_tile(a.seq, tile, tr)) return;
  const SeqTable& st = a.seq;
  const int b = tr.seq;
  const int len_q = st.q_begin[b + 1] - st.q_begin[b];
  const int len_k = st.k_begin[b + 1] - st.k_begin[b];
  const int offset = len_k - len_q;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int kvh = a.shared ? unit : unit / a.group;
  const int heads = a.shared ? a.group : 1;
  const int first_head = a.shared ? unit * a.group : unit;
  const T* q = static_cast<const T*>(a.q);
  const T* kbar = static_cast<const T*>(a.kbar) +
                  (static_cast<int64_t>(kvh) * a.blocks_bound + st.block_begin[b]) * a.head_dim;

  for (int r = warp; r < tr.count; r += kRouteThreads / 32) {
    const int64_t qrow = st.q_begin[b] + tr.first + r;
    const int current = (offset + tr.first + r) / a.block_size;
    const bool all = current <= a.past;
    const auto score = [&](int j) {
      float s = 0.0f;
      for (int hi = 0; hi < heads; ++hi) {
        const T* qv =
            q + qrow * a.q_token_stride + static_cast<int64_t>(first_head + hi) * a.q_head_stride;
        const T* kv = kbar + static_cast<int64_t>(j) * a.head_dim;
        for (int d = 0; d < a.head_dim; ++d) s = fmaf(to_float<T>(qv[d]), to_float<T>(kv[d]), s);
      }
      return s;
    };
    // The key of the past-th best block: every block ranking at or above it is kept.
    uint64_t threshold = 0;
    if (!all) {
      uint64_t last = ~0ull;
      for (int round = 0; round < a.past; ++round) {
        uint64_t best = 0;
        for (int j = lane; j < current; j += 32) {
          const uint64_t key = rank_key(score(j), j);
          if (key < last && key > best) best = key;
        }
        for (int m = 16; m > 0; m >>= 1) best = max(best, shfl_xor64(best, m));
        last = best;
      }
      threshold = last;
    }
    const int64_t row_shift = a.user_layout ? 0 : chunk_first_row(a);
    for (int hi = 0; hi < heads; ++hi) {
      const int head = first_head + hi;
      const int64_t row = qrow - row_shift;
      int32_t* dst =
          a.sel + row * a.sel_token_stride + static_cast<int64_t>(head) * a.sel_head_stride;
      const int base = a.user_layout ? 0 : st.block_begin[b];
      int written = 0;
      for (int j0 = 0; j0 < current; j0 += 32) {
        const int j = j0 + lane;
        const bool keep = j < current && (all || rank_key(score(j), j) >= threshold);
        const uint32_t mask = __ballot_sync(0xffffffffu, keep);
        if (keep) dst[written + __popc(mask & ((1u << lane) - 1))] = base + j;
        written += __popc(mask);
      }
      const int count = written;
      if (a.user_layout) {
        if (lane == 0) dst[count] = current;
        for (int s = count + 1 + lane; s < a.width; s += 32) dst[s] = -1;
      } else {
        for (int s = count + lane; s < a.past; s += 32) dst[s] = -1;
      }
    }
  }
}

template <class T, int D>
cudaError_t launch_route_typed(const RouteArgs& a, cudaStream_t stream) {
  const int units = a.shared ? a.heads_kv : a.heads_q;
  const int64_t ctas = static_cast<int64_t>(a.tile_end - a.tile_begin) * units;
  if (ctas <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(ctas));
#define MOBA_ROUTE(KK)                                                      \
  do {                                                                      \
    if (a.shared)                                                           \
      route_kernel<T, D, KK, true><<<grid, kRouteThreads, 0, stream>>>(a);  \
    else                                                                    \
      route_kernel<T, D, KK, false><<<grid, kRouteThreads, 0, stream>>>(a); \
  } while (0)
  if (a.past <= 4)
    MOBA_ROUTE(4);
  else if (a.past <= 8)
    MOBA_ROUTE(8);
  else if (a.past <= 16)
    MOBA_ROUTE(16);
  else
    route_wide_kernel<T><<<grid, kRouteThreads, 0, stream>>>(a);
#undef MOBA_ROUTE
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_route(Elem elem, const RouteArgs& a, cudaStream_t stream) {
  if (elem == Elem::bf16) {
    return a.head_dim == 64 ? launch_route_typed<__nv_bfloat16, 64>(a, stream)
                            : launch_route_typed<__nv_bfloat16, 128>(a, stream);
  }
  return a.head_dim == 64 ? launch_route_typed<__half, 64>(a, stream)
                          : launch_route_typed<__half, 128>(a, stream);
}

}  // namespace moba::backends::cuda::detail
