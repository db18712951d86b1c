// Attention of MoBA (spec step 5) on Hopper, FlashAttention-3 style: the same
// three modes, row tiles and outputs as the mma.sync kernel in attention.cu
// (see its header comment and docs/cuda_forward.md, "Hopper kernel"), on
// warpgroup matrix products (wgmma) with warp specialisation.
//
// A CTA of three warpgroups works through its tiles (a persistent grid):
//   warpgroup 0, the producer (40 registers per thread after setmaxnreg):
//     copies each tile's 128 query rows (gathered through the entry lists in
//     past mode) and then its keys and values, 128 keys per stage, with
//     cp.async into 128-byte-swizzled shared memory. Q is double-buffered
//     across tiles, K/V run through kStages stages. Each copy batch completes
//     an mbarrier by itself (cp.async.mbarrier.arrive.noinc).
//   warpgroups 1 and 2, the consumers (232 registers): 64 query rows each.
//     Per stage: S = Q K^T (wgmma, both operands in shared memory), mask,
//     online softmax in registers (fp32, base 2), P rounded to the input
//     dtype and kept in registers as the A operand of O += P V (wgmma, V read
//     "transposed" from the same row-major tile), then the stage is handed
//     back to the producer. The epilogue is the mma.sync kernel's, row for
//     row: partials + lse (past), LSE merge + out/lse (current), out/lse
//     (dense).
//
// Why cp.async rather than TMA for K/V: keys past the tile's range are
// zero-filled exactly as in the mma.sync kernel (a tensor map could only
// bound the copy at the end of the tensor), no tensor maps have to be encoded
// on the host through the driver API per launch, and the gathered Q rows need
// per-row copies anyway. The producer warpgroup has nothing else to do, so
// the extra issue work is off the consumers' path.
//
// The device code exists only in the sm_90a pass (__CUDA_ARCH_FEAT_SM90_ALL);
// in every other pass the kernel body is empty and launch_attention never
// picks it (sm90_attention_supported() checks that the loaded cubin has the
// body: only that body declares the static shared barriers).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "backends/cuda/attention_common.cuh"
#include "backends/cuda/kernels.cuh"
#include "backends/cuda/sm90_attention.cuh"
#include "backends/cuda/sm90_ptx.cuh"
#include "backends/cuda/sm90_switch.cuh"

namespace moba::backends::cuda::detail {
namespace {

constexpr int kKeys = 128;  // keys per pipeline stage (N of S = Q K^T, K of O += P V)
constexpr int kStages = 2;
constexpr int kWarpgroupThreads = 128;
constexpr int kSm90Threads = 3 * kWarpgroupThreads;  // producer + 2 consumers
// Barriers in static shared memory (its presence marks the sm_90a body):
// Q full and empty per Q buffer, K full, V full and K/V empty per stage.
constexpr int kNumBars = 4 + 3 * kStages;

// Dynamic shared memory: two Q buffers, then K and V stages; every tile is
// a multiple of 1024 bytes, so with a 1024-aligned base every tile is
// aligned as the 128-byte swizzle requires.
template <int D>
struct Sm90Smem {
  static constexpr int kQBytes = kTileRows * D * 2;
  static constexpr int kKVBytes = kKeys * D * 2;
  static constexpr int kK = 2 * kQBytes;
  static constexpr int kV = kK + kStages * kKVBytes;
  static constexpr int kBytes = kV + kStages * kKVBytes;
  static constexpr int kAlloc = kBytes + 1024;  // slack to align the base
  static_assert(kAlloc <= 227 * 1024, "shared memory beyond the sm_90 limit");
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// 128 x 40 + 256 x 232 = 64,512 <= 65,536 registers of the SM.
constexpr int kProducerRegs = 40;
constexpr int kConsumerRegs = 232;

// Barrier indices.
constexpr int kBarQFull = 0;                      // [2] Q buffer landed (128 cp.async arrivals)
constexpr int kBarQEmpty = 2;                     // [2] Q buffer free again (8 consumer warps)
constexpr int kBarKFull = 4;                      // [kStages] K stage landed
constexpr int kBarVFull = kBarKFull + kStages;    // [kStages] V stage landed
constexpr int kBarKVEmpty = kBarVFull + kStages;  // [kStages] stage free again (8 warps)
static_assert(kBarKVEmpty + kStages == kNumBars);

struct Sm90Shared {
  uint32_t base;  // 1024-aligned shared address of the tiles
  uint32_t bars;  // shared address of the barrier array
  __device__ uint32_t bar(int i) const { return bars + 8 * i; }
};

// Byte offset of 16-byte chunk `chunk` of row `row` in a tile of kRows rows
// stored as column blocks of 64 elements (128 bytes per row), 128-byte
// swizzle: the layout the wgmma descriptors of sm90_ptx.cuh describe.
template <int kRows>
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
  return static_cast<uint32_t>((chunk >> 3) * (kRows * 128) + row * 128 +
                               (((chunk & 7) ^ (row & 7)) << 4));
}

// Tile `index` of the launch: a descriptor (past) or a (row tile, query
// head) pair, heads fastest and longest tiles first (current, dense), as in
// the mma.sync kernel; decoded the same way by the producer and the
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

// Element offset of the q vector of tile row r, or -1 for a padding row.
template <AttnMode kMode>
__device__ __forceinline__ int64_t q_row_offset(const AttnArgs& a, const AttnTile& tk, int r,
                                                int64_t chunk_row0) {
  if (r >= tk.rows) return -1;
  if constexpr (kMode == AttnMode::past) {
    return past_q_offset(a, a.entries[tk.entry0 + r], chunk_row0);
  } else {
    return (tk.row0 + r) * a.q_ts + static_cast<int64_t>(tk.head) * a.q_hs;
  }
}

// kKeys rows of K or V from key t0 on into a stage; rows at or past `hi`
// are zero-filled. Thread tid copies chunk tid % (D/8) of every
// (128 / (D/8))-th row, so a warp reads whole 256-byte (or 128-byte) rows.
template <class T, int D>
__device__ __forceinline__ void load_stage(uint32_t dst, const T* rows, const T* any,
                                           int64_t token_stride, int t0, int hi, int tid) {
  constexpr int kChunks = D / 8;
  constexpr int kRowStep = kWarpgroupThreads / kChunks;
  const int c = tid % kChunks;
#pragma unroll
  for (int r = tid / kChunks; r < kKeys; r += kRowStep) {
    const int t = t0 + r;
    const bool full = t < hi;
    const T* src = full ? rows + static_cast<int64_t>(t) * token_stride + c * 8 : any;
    cp_async16(dst + swizzled<kKeys>(r, c), src, full);
  }
}

template <class T, int D, AttnMode kMode>
__device__ void produce(const AttnArgs& a, const Sm90Shared& sh, int tiles, int64_t chunk_row0) {
  using namespace sm90;  // NOLINT(google-build-using-namespace)
  constexpr int kChunks = D / 8;
  constexpr int kRowStep = kWarpgroupThreads / kChunks;
  const int tid = threadIdx.x;  // 0..127
  const int c = tid % kChunks;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  uint32_t stage_count = 0, tile_count = 0;
  for (int index = blockIdx.x; index < tiles; index += gridDim.x) {
    AttnTile tk;
    if (!decode_tile<kMode>(a, index, tk)) continue;
    const int buf = static_cast<int>(tile_count & 1);
    mbar_wait(sh.bar(kBarQEmpty + buf), ((tile_count >> 1) & 1) ^ 1);
    const uint32_t sq = sh.base + buf * Sm90Smem<D>::kQBytes;
#pragma unroll 4
    for (int r = tid / kChunks; r < kTileRows; r += kRowStep) {
      const int64_t off = q_row_offset<kMode>(a, tk, r, chunk_row0);
      cp_async16(sq + swizzled<kTileRows>(r, c), off >= 0 ? q + off + c * 8 : q, off >= 0);
    }
    mbar_arrive_on_cp_async(sh.bar(kBarQFull + buf));

    const T* krows = k + static_cast<int64_t>(tk.kvh) * a.k_hs + tk.key_row0 * a.k_ts;
    const T* vrows = v + static_cast<int64_t>(tk.kvh) * a.v_hs + tk.key_row0 * a.v_ts;
    for (int t0 = first_key_step(tk); t0 >= 0;
         t0 = next_key_step<kMode, kKeys>(tk, t0, a.block_size)) {
      const int stage = static_cast<int>(stage_count % kStages);
      mbar_wait(sh.bar(kBarKVEmpty + stage), ((stage_count / kStages) & 1) ^ 1);
      load_stage<T, D>(sh.base + Sm90Smem<D>::kK + stage * Sm90Smem<D>::kKVBytes, krows, k, a.k_ts,
                       t0, tk.hi, tid);
      mbar_arrive_on_cp_async(sh.bar(kBarKFull + stage));
      load_stage<T, D>(sh.base + Sm90Smem<D>::kV + stage * Sm90Smem<D>::kKVBytes, vrows, v, a.v_ts,
                       t0, tk.hi, tid);
      mbar_arrive_on_cp_async(sh.bar(kBarVFull + stage));
      ++stage_count;
    }
    ++tile_count;
  }
  cp_async_wait_all_issued();  // leave no copy in flight behind an exited thread
}

// Named barriers 1 and 2 order the two consumer warpgroups' S = Q K^T
// issues ("ping-pong", as in FlashAttention-3): warpgroup w waits on barrier
// 1 + w before issuing and then releases the other one, so one warpgroup's
// softmax runs while the other's products occupy the tensor cores.
__device__ __forceinline__ void named_barrier_sync(int id) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(2 * kWarpgroupThreads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(2 * kWarpgroupThreads) : "memory");
}

template <class T, int D, AttnMode kMode>
__device__ void consume(const AttnArgs& a, const Sm90Shared& sh, int tiles, int64_t chunk_row0,
                        int wg, bool pingpong) {
  using namespace sm90;           // NOLINT(google-build-using-namespace)
  constexpr int kDT = D / 8;      // n8 column groups of O
  constexpr int kNT = kKeys / 8;  // n8 column groups of S
  const int tid = threadIdx.x - kWarpgroupThreads;
  const int warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const int row_base = wg * 64 + warp * 16;  // the warp's 16 rows: row_base + g (+ 8)
  const float scale_log2 = a.scale * kAttnLog2e;
  const int bs = a.block_size;
  const int my_turn = 1 + wg, other_turn = 2 - wg;
  // Warpgroup 0 issues first. Every stage pairs one sync of each warpgroup
  // with one arrive of the other, in the same order on both sides (both walk
  // the same tiles and stages), and warpgroup 0 takes the last arrive after
  // its loop, so no barrier is left half-arrived.
  if (pingpong && wg == 1) named_barrier_arrive(1);
  uint32_t stage_count = 0, tile_count = 0;

  for (int index = blockIdx.x; index < tiles; index += gridDim.x) {
    AttnTile tk;
    if (!decode_tile<kMode>(a, index, tk)) continue;
    const int buf = static_cast<int>(tile_count & 1);
    mbar_wait(sh.bar(kBarQFull + buf), (tile_count >> 1) & 1);
    // A warpgroup whose 64 rows are all padding only keeps the barrier
    // protocol going (small past buckets are common with small blocks).
    const bool active = wg * 64 < tk.rows;
    int pos[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = row_base + h * 8 + g;
      pos[h] = r < tk.rows ? tk.first_pos + r : tk.last_pos;
    }
    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    const uint64_t desc_q =
        make_desc(sh.base + buf * Sm90Smem<D>::kQBytes + wg * 64 * 128, 16, 1024);

    for (int t0 = first_key_step(tk); t0 >= 0; t0 = next_key_step<kMode, kKeys>(tk, t0, bs)) {
      const int stage = static_cast<int>(stage_count % kStages);
      const uint32_t parity = (stage_count / kStages) & 1;
      mbar_wait(sh.bar(kBarKFull + stage), parity);
      float s[kKeys / 2];
      if (pingpong) named_barrier_sync(my_turn);
      if (active) {
        fence_proxy_async();
        // S = Q K^T: D/16 k-steps; within a 64-column block a k-step moves
        // the start address by 32 bytes, the next block is a whole tile
        // column block further.
        const uint64_t desc_k =
            make_desc(sh.base + Sm90Smem<D>::kK + stage * Sm90Smem<D>::kKVBytes, 16, 1024);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
          const uint32_t a_off = (ks >> 2) * (kTileRows * 128) + (ks & 3) * 32;
          const uint32_t b_off = (ks >> 2) * (kKeys * 128) + (ks & 3) * 32;
          wgmma_ss<T, kKeys>(s, desc_q + (a_off >> 4), desc_k + (b_off >> 4), ks > 0 ? 1 : 0);
        }
        wgmma_commit();
        if (pingpong) named_barrier_arrive(other_turn);
        wgmma_wait_all();
        fence_operands(s);

        // s[4 nt + e]: row row_base + g + 8 (e >> 1), key t0 + 8 nt + 2 tq + (e & 1).
        if (key_step_needs_mask<kMode, kKeys>(tk, t0, bs)) {
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int t = t0 + nt * 8 + 2 * tq + (e & 1);
              bool keep;
              if constexpr (kMode == AttnMode::past) {
                keep = t < tk.hi;
              } else {
                const int p = pos[e >> 1];
                keep = t <= p;
                if constexpr (kMode == AttnMode::current) keep = keep && t >= (p / bs) * bs;
              }
              if (!keep) s[4 * nt + e] = -INFINITY;
            }
        }

        // Online softmax, the mma.sync kernel's (attention_common.cuh).
#pragma unroll
        for (int h = 0; h < 2; ++h)
          online_softmax_row<kNT, kDT>(
              m[h], l[h], scale_log2,
              [&](int nt, int j) -> float& { return s[4 * nt + 2 * h + j]; },
              [&](int dt, int j) -> float& { return o[4 * dt + 2 * h + j]; });

        // P in the input dtype as wgmma A fragments: the accumulator layout
        // of S is the A-fragment layout of m16n8k16 per warp, 16 keys per
        // k-step.
        uint32_t p[kKeys / 16][4];
#pragma unroll
        for (int kc = 0; kc < kKeys / 16; ++kc) {
          p[kc][0] = pack2<T>(s[8 * kc + 0], s[8 * kc + 1]);
          p[kc][1] = pack2<T>(s[8 * kc + 2], s[8 * kc + 3]);
          p[kc][2] = pack2<T>(s[8 * kc + 4], s[8 * kc + 5]);
          p[kc][3] = pack2<T>(s[8 * kc + 6], s[8 * kc + 7]);
        }

        // O += P V: V is [key][d] in shared memory, the MN-major B operand;
        // a k-step is 16 keys = two 8-row groups = 2048 bytes.
        mbar_wait(sh.bar(kBarVFull + stage), parity);
        fence_proxy_async();
        const uint64_t desc_v =
            make_desc(sh.base + Sm90Smem<D>::kV + stage * Sm90Smem<D>::kKVBytes, kKeys * 128, 1024);
        fence_operands(o);
        wgmma_fence();
#pragma unroll
        for (int kc = 0; kc < kKeys / 16; ++kc)
          wgmma_rs_tb<T, D>(o, p[kc], desc_v + ((kc * 16 * 128) >> 4));
        wgmma_commit();
        wgmma_wait_all();
        fence_operands(o);
      } else {
        if (pingpong) named_barrier_arrive(other_turn);
        mbar_wait(sh.bar(kBarVFull + stage), parity);
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(sh.bar(kBarKVEmpty + stage));
      ++stage_count;
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(sh.bar(kBarQEmpty + buf));
    ++tile_count;
    if (!active) continue;

      // Epilogue, the mma.sync kernel's (attention_common.cuh).
#pragma unroll
    for (int h = 0; h < 2; ++h)
      store_row<T, D, kMode>(a, tk, row_base + h * 8 + g, pos[h], a.entries, tk.entry0, m[h], l[h],
                             scale_log2, bs, chunk_row0, tq,
                             [&](int dt, int j) -> float& { return o[4 * dt + 2 * h + j]; });
  }
  if (pingpong && wg == 0) named_barrier_sync(1);
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <class T, int D, AttnMode kMode>
__global__ void __launch_bounds__(kSm90Threads, 1)
    attention_sm90_kernel(const AttnArgs a, int pingpong) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace sm90;  // NOLINT(google-build-using-namespace)
  extern __shared__ __align__(1024) uint8_t smem_sm90[];
  __shared__ __align__(8) uint64_t bars[kNumBars];
  Sm90Shared sh;
  sh.base = (smem_u32(smem_sm90) + 1023u) & ~1023u;
  sh.bars = smem_u32(bars);
  if (threadIdx.x == 0) {
    mbar_init(sh.bar(kBarQFull), kWarpgroupThreads);
    mbar_init(sh.bar(kBarQFull + 1), kWarpgroupThreads);
    mbar_init(sh.bar(kBarQEmpty), 8);
    mbar_init(sh.bar(kBarQEmpty + 1), 8);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(sh.bar(kBarKFull + s), kWarpgroupThreads);
      mbar_init(sh.bar(kBarVFull + s), kWarpgroupThreads);
      mbar_init(sh.bar(kBarKVEmpty + s), 8);
    }
  }
  __syncthreads();

  const SeqTable& st = a.seq;
  // The packed row of the chunk's first tile: row 0 of the partials.
  int64_t chunk_row0 = 0;
  {
    TileRows first{};
    if (locate_tile(st, a.tile_begin, first)) chunk_row0 = st.q_begin[first.seq] + first.first;
  }
  const int tiles =
      kMode == AttnMode::past ? *a.num_descs : (a.tile_end - a.tile_begin) * a.heads_q;

  // Each branch is one warpgroup role, so setmaxnreg applies (a register cap
  // at entry comes from __launch_bounds__(384, 1)).
  if (threadIdx.x < kWarpgroupThreads) {
    setmaxnreg_dec<kProducerRegs>();
    produce<T, D, kMode>(a, sh, tiles, chunk_row0);
  } else {
    setmaxnreg_inc<kConsumerRegs>();
    consume<T, D, kMode>(a, sh, tiles, chunk_row0,
                         static_cast<int>(threadIdx.x / kWarpgroupThreads) - 1, pingpong != 0);
  }
#endif
}

// MOBA_CUDA_SM90_PINGPONG=0 turns the consumer ping-pong off (read once; for
// A/B measurements of its effect).
bool pingpong_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("MOBA_CUDA_SM90_PINGPONG");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

template <class T, int D, AttnMode kMode>
cudaError_t launch_sm90_typed(const AttnArgs& a, cudaStream_t stream) {
  constexpr int smem = Sm90Smem<D>::kAlloc;
  cudaError_t err = cudaFuncSetAttribute(attention_sm90_kernel<T, D, kMode>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  int device = 0, sms = 0;
  if ((err = cudaGetDevice(&device)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess)
    return err;
  // Persistent: one CTA per SM (the shared memory and registers allow no more).
  int64_t ctas;
  if constexpr (kMode == AttnMode::past)
    ctas = a.grid;
  else
    ctas = static_cast<int64_t>(a.tile_end - a.tile_begin) * a.heads_q;
  ctas = std::min<int64_t>(ctas, sms);
  if (ctas <= 0) return cudaSuccess;
  attention_sm90_kernel<T, D, kMode>
      <<<static_cast<unsigned>(ctas), kSm90Threads, smem, stream>>>(a, pingpong_enabled() ? 1 : 0);
  return cudaGetLastError();
}

template <class T, int D>
cudaError_t launch_sm90_mode(AttnMode mode, const AttnArgs& a, cudaStream_t stream) {
  switch (mode) {
    case AttnMode::past:
      return launch_sm90_typed<T, D, AttnMode::past>(a, stream);
    case AttnMode::current:
      return launch_sm90_typed<T, D, AttnMode::current>(a, stream);
    case AttnMode::dense:
      return launch_sm90_typed<T, D, AttnMode::dense>(a, stream);
  }
  return cudaErrorInvalidValue;
}

std::atomic<int> g_sm90_override{-1};

// Whether the sm_90a body of the kernels is what the current device loads:
// only that body declares the static shared barriers.
bool sm90_body_loaded() {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, attention_sm90_kernel<__nv_bfloat16, 128, AttnMode::dense>) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attr.sharedSizeBytes >= kNumBars * sizeof(uint64_t);
}

}  // namespace

bool sm90_attention_wanted(bool dense, int block_size) {
  static const int env_value = [] {
    const char* v = std::getenv("MOBA_CUDA_SM90");
    if (v == nullptr || *v == '\0') return -1;
    return std::strcmp(v, "0") == 0 ? 0 : 1;
  }();
  const int override_value = g_sm90_override.load(std::memory_order_relaxed);
  const int forced = override_value >= 0 ? override_value : env_value;
  if (forced >= 0) return forced != 0;
  return dense || block_size >= kSm90MinBlockSize;
}

void set_sm90_attention_override(int allow) {
  g_sm90_override.store(allow < 0 ? -1 : (allow != 0 ? 1 : 0), std::memory_order_relaxed);
}

bool sm90_attention_supported() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  const auto probe = [device] {
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    return major == 9 && sm90_body_loaded();
  };
  // Per device: 0 unknown, 1 no, 2 yes (a device's answer never changes).
  static std::array<std::atomic<int>, 64> known{};
  if (device < 0 || device >= static_cast<int>(known.size())) return probe();
  int state = known[static_cast<size_t>(device)].load(std::memory_order_relaxed);
  if (state == 0) {
    state = probe() ? 2 : 1;
    known[static_cast<size_t>(device)].store(state, std::memory_order_relaxed);
  }
  return state == 2;
}

cudaError_t launch_attention_sm90(Elem elem, AttnMode mode, const AttnArgs& a,
                                  cudaStream_t stream) {
  if (elem == Elem::bf16)
    return a.head_dim == 64 ? launch_sm90_mode<__nv_bfloat16, 64>(mode, a, stream)
                            : launch_sm90_mode<__nv_bfloat16, 128>(mode, a, stream);
  return a.head_dim == 64 ? launch_sm90_mode<__half, 64>(mode, a, stream)
                          : launch_sm90_mode<__half, 128>(mode, a, stream);
}

}  // namespace moba::backends::cuda::detail
