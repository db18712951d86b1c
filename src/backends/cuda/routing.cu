// Routing on the GPU (spec steps 3 and 4): the gate scores <q, kbar_j> of a
// tile of 128 queries against the block means of their sequence are formed
// on the tensor cores and folded straight into per-query top-k lists held in
// registers, so the tokens x blocks score matrix never reaches memory. Only
// the chosen block indices are written.
//
// Ranking: a score and its block index form one 64-bit key whose order is
// the spec's: higher score first, NaN lowest, ties toward the lower block
// index.
//
// Where the time goes. The scores are cheap: 2 x D flops per candidate on
// the tensor cores (8.8 TFLOP for config S at 512K, ~10 ms of mma.sync).
// What cost 160 ms before was the top-k insertion: with a list per thread,
// a warp runs the insertion path whenever any of its 64 (thread, row) lists
// wants a candidate, which is nearly always. So the work is split in two:
//
//  * filter (every candidate, in the mma accumulator layout): one float
//    compare against the row's exact threshold (the score of its `past`-th
//    best key so far); survivors go to a small per-row buffer in shared
//    memory and set a bit in a per-row mask;
//  * insert (per row, once per 32 candidates): each row's list belongs to a
//    single thread, which walks the row's survivors (a handful; ~past x
//    ln(units) per row over a whole scan) and inserts them exactly. Its new
//    threshold is broadcast to the quad for the next filter.
//
// A warp owns 32 rows (two m16 tiles, so each B fragment from shared memory
// feeds two mma), and the 32 lanes own one row each.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "backends/cuda/kernels.cuh"

namespace moba::backends::cuda::detail {
namespace {

constexpr int kWarpRows = 32;                       // two m16 tiles per warp
constexpr int kRouteWarps = kTileRows / kWarpRows;  // 4
constexpr int kRouteThreads = kRouteWarps * 32;     // one row tile per CTA
constexpr int kStageBlocks = kRouteBlocks;          // block means per smem stage
constexpr int kUnitBlocks = 32;                     // candidates between thresholds
constexpr int kUnitTiles = kUnitBlocks / 8;         // n8 tiles per unit
constexpr int kWideThreads = 256;                   // route_wide_kernel: 8 rows at a time
static_assert(kStageBlocks % kUnitBlocks == 0, "a stage holds whole units");
static_assert(kUnitBlocks == 32, "a unit's survivor mask is one 32-bit word");

// The ranking key of block j with score s: larger is better. Scores map to
// their order-preserving unsigned image (NaN to 0, the lowest; -0 as +0),
// the low word is ~j so that equal scores favour the lower index. A key of 0
// is "no candidate"; ~0 is a sentinel above every real key.
__device__ __forceinline__ uint64_t rank_key(float s, int j) {
  uint32_t u = __float_as_uint(s + 0.0f);
  u = (s != s) ? 0u : ((u & 0x80000000u) ? ~u : (u | 0x80000000u));
  return (static_cast<uint64_t>(u) << 32) | (0xffffffffu - static_cast<uint32_t>(j));
}
__device__ __forceinline__ int key_block(uint64_t key) {
  return static_cast<int>(0xffffffffu - static_cast<uint32_t>(key));
}

// The score of a ranking key as the float threshold of the filter: a
// candidate passes when !(s <= threshold). For an empty or NaN key (high word
// 0) the threshold is NaN, which passes everything (the exact insertion then
// decides). A candidate equal to a real threshold is rejected, which is exact:
// the threshold's block was scanned in an earlier unit, so it has the lower
// index and wins the tie.
__device__ __forceinline__ float key_threshold(uint64_t key) {
  const uint32_t u = static_cast<uint32_t>(key >> 32);
  if (u == 0) return __uint_as_float(0x7fffffffu);
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

// Inserts x into the descending list best[0..KK), dropping the last entry;
// the caller has checked x > best[KK - 1]. (Only constant indices: a
// run-time index would move the list to local memory.)
template <int KK>
__device__ __forceinline__ void insert_key(uint64_t (&best)[KK], uint64_t x) {
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

// Writes the selection of one query row: count = min(past, current) past
// blocks, either all of 0..current-1 or the `past` keys best[KK - past ..]
// (the entries above them are sentinels).
template <int KK>
__device__ void write_selection(const RouteArgs& a, int32_t* dst, int current, int block_base,
                                const uint64_t (&best)[KK]) {
  const bool all = current <= a.past;
  const int count = all ? current : a.past;
  const int first = KK - a.past;  // first real entry when !all
  if (!a.user_layout) {
    if (all) {
      for (int s = 0; s < count; ++s) dst[s] = block_base + s;
    } else {
#pragma unroll
      for (int i = 0; i < KK; ++i)
        if (i >= first) dst[i - first] = block_base + key_block(best[i]);
    }
    for (int s = count; s < a.past; ++s) dst[s] = -1;
    return;
  }
  if (all) {
    for (int s = 0; s < count; ++s) dst[s] = s;
  } else {
    // Ascending order: each kept block goes to its rank among the kept.
#pragma unroll
    for (int i = 0; i < KK; ++i) {
      if (i < first) continue;
      const int bi = key_block(best[i]);
      int rank = 0;
#pragma unroll
      for (int m = 0; m < KK; ++m)
        if (m >= first && key_block(best[m]) < bi) ++rank;
      dst[rank] = bi;
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

// One CTA routes one row tile (128 rows) for one query head (or, shared, one
// kv head with the group's scores summed in the accumulator). Warp w owns
// tile rows w*32 + [0, 32): in the mma layout, lane (g, tq) sees rows
// 8R + g for R = 0..3 (R = 2 x m16 tile + half), and it owns the list of
// row 8 tq + g.
template <class T, int D, int KK, bool kShared>
__global__ void __launch_bounds__(kRouteThreads, 2) route_kernel(const RouteArgs a) {
  __shared__ __align__(128) uint8_t stage[2][kStageBlocks * D * 2];
  // Survivors of the filter: the score of candidate unit_first + slot of
  // warp row r at survivors[warp][r][slot] (only where the mask bit is set).
  __shared__ float survivors[kRouteWarps][kWarpRows][kUnitBlocks];
  const int units = kShared ? a.heads_kv : a.heads_q;
  const int head_unit = blockIdx.x % units;
  // Longest tiles first: the later tiles of a sequence scan more blocks, so
  // starting them first shortens the tail of the launch.
  const int tile = a.tile_end - 1 - static_cast<int>(blockIdx.x / units);
  TileRows tr{};
  if (tile < a.tile_begin || !locate_tile(a.seq, tile, tr)) return;

  const SeqTable& st = a.seq;
  const int b = tr.seq;
  const int len_q = st.q_begin[b + 1] - st.q_begin[b];
  const int len_k = st.k_begin[b + 1] - st.k_begin[b];
  const int offset = len_k - len_q;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int warp_row = warp * kWarpRows;  // first tile row of the warp
  const int current_first = (offset + tr.first) / a.block_size;
  const int current_last = (offset + tr.first + tr.count - 1) / a.block_size;
  const int kvh = kShared ? head_unit : head_unit / a.group;
  const int64_t qrow_base = st.q_begin[b] + tr.first;

  // The row this lane owns. Padding rows behave like the last row (their
  // scores are 0 and they are never written).
  const int own = warp_row + 8 * tq + g;
  const bool own_valid = own < tr.count;
  const int own_current = own_valid ? (offset + tr.first + own) / a.block_size : current_last;

  // KK - past sentinels on top, so best[KK - 1] is the row's past-th best.
  uint64_t best[KK];
#pragma unroll
  for (int i = 0; i < KK; ++i) best[i] = i < KK - a.past ? ~0ull : 0ull;

  // Only a tile with a row that has more past blocks than it keeps ranks.
  if (current_last > a.past) {
    // The current block of the four rows this lane sees (R = 0..3).
    int current[4];
    float threshold[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = warp_row + 8 * r + g;
      current[r] = row < tr.count ? (offset + tr.first + row) / a.block_size : current_last;
      threshold[r] = __uint_as_float(0x7fffffffu);  // NaN: open
    }
    const T* kbar = static_cast<const T*>(a.kbar) +
                    (static_cast<int64_t>(kvh) * a.blocks_bound + st.block_begin[b]) * D;
    uint32_t frag[2][D / 16][4];
    const auto load_fragments = [&](int head) {
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        const int r0 = warp_row + 16 * m + g, r1 = r0 + 8;
        load_query_fragments<T, D>(a, qrow_base + r0, r0 < tr.count, qrow_base + r1, r1 < tr.count,
                                   head, tq, frag[m]);
      }
    };
    if (!kShared) load_fragments(head_unit);

    constexpr int kChunks = D / 8;
    const auto load_stage = [&](int first_block, int buffer) {
      const uint32_t base = smem_u32(stage[buffer]);
      for (int idx = threadIdx.x; idx < kStageBlocks * kChunks; idx += kRouteThreads) {
        const int r = idx / kChunks, c = idx % kChunks;
        const int j = first_block + r;
        const bool full = j < current_last;
        const T* src = full ? kbar + static_cast<int64_t>(j) * D + c * 8 : kbar;
        cp_async16(base + tile_offset<D>(r, c), src, full);
      }
      cp_async_commit();
    };

    // This lane's survivor slots: row 8R + g, slots nt*8 + 2tq + e.
    float* const filter_dst = &survivors[warp][g][2 * tq];
    const float* const own_src = &survivors[warp][8 * tq + g][0];

    load_stage(0, 0);
    int buffer = 0;
    for (int first_block = 0; first_block < current_last;
         first_block += kStageBlocks, buffer ^= 1) {
      cp_async_wait_all();
      __syncthreads();
      if (first_block + kStageBlocks < current_last)
        load_stage(first_block + kStageBlocks, buffer ^ 1);
      const uint32_t base = smem_u32(stage[buffer]);
#pragma unroll 1
      for (int half = 0; half < kStageBlocks / kUnitBlocks; ++half) {
        const int unit_first = first_block + half * kUnitBlocks;
        if (unit_first >= current_last) break;
        float acc[2][kUnitTiles][4];
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
          for (int nt = 0; nt < kUnitTiles; ++nt)
            acc[m][nt][0] = acc[m][nt][1] = acc[m][nt][2] = acc[m][nt][3] = 0.0f;
        for (int gi = 0; gi < (kShared ? a.group : 1); ++gi) {
          if (kShared) load_fragments(kvh * a.group + gi);
#pragma unroll
          for (int nt = 0; nt < kUnitTiles; ++nt) {
            if (unit_first + nt * 8 >= current_last) break;
            const int brow = half * kUnitBlocks + nt * 8 + (lane & 7);
#pragma unroll
            for (int ks = 0; ks < D / 16; ks += 2) {
              uint32_t bf[4];
              ldmatrix_x4(bf, base + tile_offset<D>(brow, ks * 2 + (lane >> 3)));
#pragma unroll
              for (int m = 0; m < 2; ++m) {
                mma16816<T>(acc[m][nt], frag[m][ks], bf[0], bf[1]);
                mma16816<T>(acc[m][nt], frag[m][ks + 1], bf[2], bf[3]);
              }
            }
          }
        }

        // Filter: one compare per candidate against its row's threshold.
        // Only a unit that may reach a row's current block needs the causal
        // test (rows of a tile are ascending, so current_first bounds all);
        // the common case is compiled without it.
        uint32_t mask[4] = {0u, 0u, 0u, 0u};
        const auto filter = [&](auto causal) {
#pragma unroll
          for (int m = 0; m < 2; ++m)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
              for (int nt = 0; nt < kUnitTiles; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                  const int r = 2 * m + h;
                  const float s = acc[m][nt][2 * h + e];
                  bool pass = !(s <= threshold[r]);
                  if constexpr (decltype(causal)::value)
                    pass = pass && unit_first + nt * 8 + 2 * tq + e < current[r];
                  if (pass) {
                    filter_dst[r * 8 * kUnitBlocks + nt * 8 + e] = s;
                    mask[r] |= 1u << (nt * 8 + e);
                  }
                }
        };
        if (unit_first + kUnitBlocks > current_first) {
          filter(std::true_type{});
        } else {
          filter(std::false_type{});
        }
        // Each row's mask, OR-ed over the quad, to the lane that owns the
        // row (reduce-scatter in two shuffles: lane tq ends with row tq).
#pragma unroll
        for (int r = 0; r < 4; ++r) mask[r] <<= 2 * tq;
        const bool upper = (tq & 2) != 0;
        uint32_t keep0 = upper ? mask[2] : mask[0], keep1 = upper ? mask[3] : mask[1];
        keep0 |= __shfl_xor_sync(0xffffffffu, upper ? mask[0] : mask[2], 2);
        keep1 |= __shfl_xor_sync(0xffffffffu, upper ? mask[1] : mask[3], 2);
        const bool odd = (tq & 1) != 0;
        uint32_t pending = odd ? keep1 : keep0;
        pending |= __shfl_xor_sync(0xffffffffu, odd ? keep0 : keep1, 1);
        __syncwarp();

        // Insert: each lane walks its own row's survivors.
        while (pending != 0u) {
          const int slot = __ffs(pending) - 1;
          pending &= pending - 1u;
          const uint64_t key = rank_key(own_src[slot], unit_first + slot);
          if (key > best[KK - 1]) insert_key(best, key);
        }
        __syncwarp();
        const float own_threshold = key_threshold(best[KK - 1]);
#pragma unroll
        for (int r = 0; r < 4; ++r)
          threshold[r] = __shfl_sync(0xffffffffu, own_threshold, (lane & ~3) | r);
      }
    }
  }

  if (!own_valid) return;
  const int heads = kShared ? a.group : 1;
  const int first_head = kShared ? head_unit * a.group : head_unit;
  const int64_t row_shift = a.user_layout ? 0 : chunk_first_row(a);
  const int64_t qrow = qrow_base + own;
  const int block_base = a.user_layout ? 0 : st.block_begin[b];
  for (int hi = 0; hi < heads; ++hi) {
    const int64_t head_offset = static_cast<int64_t>(first_head + hi) * a.sel_head_stride;
    write_selection<KK>(a, a.sel + (qrow - row_shift) * a.sel_token_stride + head_offset,
                        own_current, block_base, best);
  }
}

// Routing when a query keeps more than 16 past blocks: one warp per query
// row finds the score threshold of its top `past` by repeated arg-max
// passes (O(past * blocks * D) per row; the fast kernel covers the common
// top-k), then writes the kept blocks in ascending order.
template <class T>
__global__ void __launch_bounds__(kWideThreads) route_wide_kernel(const RouteArgs a) {
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

  for (int r = warp; r < tr.count; r += kWideThreads / 32) {
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
    route_wide_kernel<T><<<grid, kWideThreads, 0, stream>>>(a);
#undef MOBA_ROUTE
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_route(Elem elem, const RouteArgs& a, cudaStream_t stream) {
  return with_elem_dim(elem, a.head_dim, [&]<class T, int D>(ElemDimTag<T, D>) {
    return launch_route_typed<T, D>(a, stream);
  });
}

}  // namespace moba::backends::cuda::detail
