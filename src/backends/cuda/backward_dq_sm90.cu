// The query-major dq kernel of the CUDA backward on Hopper (sm_90a): the
// work of dq_kernel (backward_mma.cu) on warpgroup matrix products (wgmma)
// with warp specialisation, following the forward's attention_sm90.cu. Same
// modes, same row tiles (decoded by the forward's decode_tile, sm90_tiles.cuh),
// same masks and arithmetic, same epilogue (backward_dq_rows.cuh):
//   past:    the gathered entries of a tile descriptor against their whole
//            block -> an fp32 dq partial per entry;
//   current: a (row tile, query head) against each row's current block
//            (causal), plus the row's partials in selection-slot order -> dq;
//   dense:   keys 0..p -> dq.
//
// A CTA of three warpgroups works through its tiles (a persistent grid, one
// CTA per SM):
//   warpgroup 0, the producer (40 registers after setmaxnreg): per tile the
//     128 Q rows and dO rows (gathered through the entry lists in past mode,
//     the forward's load_q_tile) and each row's lse (base 2) and delta into
//     one buffer; then K and V in stages of kDqKeys keys through a ring of
//     kStages stages (cp.async, 128-byte swizzle; keys past the tile's range
//     zero-filled, as in the forward). The tile's first stage is issued
//     before its rows, whose buffer frees only when the previous tile's last
//     S and dP are done.
//   warpgroups 1 and 2, the consumers (232 registers): 64 rows each. Per
//     stage: S = Q K^T and dP = dO V^T (wgmma, operands in shared memory),
//     P = exp2(S scale log2e - lse2) masked as in dq_tile, dS = P (dP -
//     delta) scale rounded to the input dtype and kept in registers as the A
//     operand of dQ += dS K (wgmma, K read "transposed" from the same
//     row-major stage, as the forward reads V). dQ (64 x D fp32) stays in
//     registers for the tile. Keys are summed in ascending stage order with a
//     fixed product sequence, so dq is bitwise reproducible, as with dq_kernel
//     (the two kernels agree within rounding, not bitwise).
//
// Barriers (mbarriers): rows full (the producer's cp.async arrivals plus one
// plain arrival per producer thread after its row's lse / delta store: its
// release orders that store before the consumers' wait) and rows empty
// (every consumer thread, after its tile's last S and dP, its lse / delta
// read at the tile's start); per stage full (cp.async arrivals) and empty
// (every consumer thread, after its dQ product of the stage).
//
// The device code exists only in the sm_90a pass (__CUDA_ARCH_FEAT_SM90_ALL),
// as in attention_sm90.cu; bwd_sm90_dq_enabled() checks that the loaded code
// has the body (only that body declares static shared memory).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "backends/cuda/backward.cuh"
#include "backends/cuda/backward_dq_rows.cuh"
#include "backends/cuda/backward_rows.cuh"
#include "backends/cuda/sm90_backward_switch.cuh"
#include "backends/cuda/sm90_ptx.cuh"
#include "backends/cuda/sm90_switch.cuh"
#include "backends/cuda/sm90_tiles.cuh"

namespace moba::backends::cuda::detail {
namespace {

// Keys per stage: N of S = Q K^T and dP = dO V^T, K of dQ += dS K. 64 keeps
// S, dP and the dS fragments (80 registers) next to dQ (64 at D 128) within
// the consumers' budget; the ring is deeper instead.
constexpr int kDqKeys = 64;
constexpr int kStages = 4;
constexpr int kWarpgroupThreads = 128;
constexpr int kConsumerThreads = 2 * kWarpgroupThreads;
constexpr int kDqThreads = kWarpgroupThreads + kConsumerThreads;  // producer + 2 consumers
static_assert(kConsumerThreads / kWarpgroupThreads * 64 == kTileRows,
              "64 rows per consumer warpgroup");

// Barriers: rows full / empty, then full and empty per stage.
constexpr int kNumBars = 2 + 2 * kStages;
// Static shared memory of the sm_90a body: the barriers and the rows' lse
// (base 2) and delta (its presence marks the body).
constexpr size_t kBodyStaticSmem = kNumBars * sizeof(uint64_t) + kTileRows * sizeof(float2);

// Dynamic shared memory: Q and dO (128 rows each), then kStages K stages and
// kStages V stages (kDqKeys rows each), stored as the forward's tiles
// (sm90_tiles.cuh); every tile is a multiple of 1024 bytes, so with a
// 1024-aligned base every tile is aligned as the 128-byte swizzle requires.
template <int D>
struct DqSm90Smem {
  static constexpr int kRowBytes = kTileRows * D * 2;
  static constexpr int kKeyBytes = kDqKeys * D * 2;
  static constexpr int kQ = 0;
  static constexpr int kdO = kQ + kRowBytes;
  static constexpr int kK = kdO + kRowBytes;
  static constexpr int kV = kK + kStages * kKeyBytes;
  static constexpr int kAlloc = kV + kStages * kKeyBytes + 1024;  // slack to align the base
  static_assert(kAlloc + kBodyStaticSmem <= 227 * 1024, "shared memory beyond the sm_90 limit");
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// 128 x 40 + 256 x 232 = 64,512 <= 65,536 registers of the SM.
constexpr int kProducerRegs = 40;
constexpr int kConsumerRegs = 232;

constexpr int kBarRowsFull = 0;
constexpr int kBarRowsEmpty = 1;
constexpr int kBarFull = 2;
constexpr int kBarEmpty = kBarFull + kStages;
static_assert(kBarEmpty + kStages == kNumBars);

struct DqShared {
  uint32_t base;  // 1024-aligned shared address of the tiles
  uint32_t bars;  // shared address of the barrier array
  float2* rows;   // per tile row: lse in base 2, delta
  __device__ uint32_t bar(int i) const { return bars + 8 * i; }
};

// Row r of the tile: lse in base 2 and delta, as dq_kernel's rows (zeros for
// padding).
template <AttnMode kMode>
__device__ __forceinline__ float2 dq_row_stats(const BwdArgs& a, const AttnTile& tk, int r,
                                               int64_t chunk_row0) {
  const AttnArgs& f = a.f;
  if (r >= tk.rows) return make_float2(0.0f, 0.0f);
  int64_t row;
  int head;
  if constexpr (kMode == AttnMode::past) {
    const int e = f.entries[tk.entry0 + r];
    row = chunk_row0 + e / (f.heads_q * f.past);
    head = (e / f.past) % f.heads_q;
  } else {
    row = tk.row0 + r;
    head = tk.head;
  }
  return make_float2(f.lse[static_cast<int64_t>(head) * f.lse_hs + row * f.lse_ts] * kAttnLog2e,
                     a.delta[row * f.heads_q + head]);
}

template <class T, int D, AttnMode kMode>
__device__ void produce(const BwdArgs& a, const DqShared& sh, int tiles, int64_t chunk_row0) {
  using namespace sm90;  // NOLINT(google-build-using-namespace)
  using L = DqSm90Smem<D>;
  const AttnArgs& f = a.f;
  const int tid = static_cast<int>(threadIdx.x);  // 0..127
  const CopyLane cl(tid);
  const T* k = static_cast<const T*>(f.k);
  const T* v = static_cast<const T*>(f.v);
  const int64_t k_ts = f.k_ts, v_ts = f.v_ts;
  const int64_t k_step = kCopyRowStep * k_ts, v_step = kCopyRowStep * v_ts;
  const uint32_t dst_k = sh.base + L::kK + cl.dst, dst_v = sh.base + L::kV + cl.dst;
  int stage = 0;
  uint32_t phase = 0, tile_count = 0;
  for (int index = blockIdx.x; index < tiles; index += gridDim.x) {
    AttnTile tk;
    if (!decode_tile<kMode>(f, index, tk)) continue;
    const auto load_rows = [&] {
      mbar_wait(sh.bar(kBarRowsEmpty), (tile_count & 1) ^ 1);
      sh.rows[tid] = dq_row_stats<kMode>(a, tk, tid, chunk_row0);
      load_q_tile<T, D, kMode>(f, tk, sh.base + L::kQ + cl.dst, cl, chunk_row0);
      load_row_tile<T, D, kMode>(f, tk, sh.base + L::kdO + cl.dst, cl, chunk_row0,
                                 static_cast<const T*>(a.dout), a.do_ts, a.do_hs);
      mbar_arrive_on_cp_async(sh.bar(kBarRowsFull));
      mbar_arrive(sh.bar(kBarRowsFull));
    };
    // This thread's chunk of its first row at key position 0.
    const T* krow =
        k + static_cast<int64_t>(tk.kvh) * f.k_hs + (tk.key_row0 + cl.row0) * k_ts + cl.chunk * 8;
    const T* vrow =
        v + static_cast<int64_t>(tk.kvh) * f.v_hs + (tk.key_row0 + cl.row0) * v_ts + cl.chunk * 8;
    const auto load_stage = [&](int t0) {
      const uint32_t ko = dst_k + stage * L::kKeyBytes, vo = dst_v + stage * L::kKeyBytes;
      const int valid = tk.hi - t0;  // keys of the stage in range
      mbar_wait(sh.bar(kBarEmpty + stage), phase ^ 1);
      if (valid >= kDqKeys) {
        copy_rows_full<T, D, kDqKeys>(ko, krow + t0 * k_ts, k_step);
        copy_rows_full<T, D, kDqKeys>(vo, vrow + t0 * v_ts, v_step);
      } else {
        copy_rows_partial<T, D, kDqKeys>(ko, krow + t0 * k_ts, k_step, cl.row0, valid, k);
        copy_rows_partial<T, D, kDqKeys>(vo, vrow + t0 * v_ts, v_step, cl.row0, valid, v);
      }
      mbar_arrive_on_cp_async(sh.bar(kBarFull + stage));
      if (++stage == kStages) {
        stage = 0;
        phase ^= 1;
      }
    };
    // The first stage, then the rows, then the rest (the forward's order with
    // a single Q buffer; the stage is peeled for the same reason).
    int t0 = first_key_step(tk);
    if (t0 >= 0) {
      load_stage(t0);
      t0 = next_key_step<kMode, kDqKeys>(tk, t0, f.block_size);
    }
    // A tile without keys still loads its rows: the consumers wait for them.
    load_rows();
    for (; t0 >= 0; t0 = next_key_step<kMode, kDqKeys>(tk, t0, f.block_size)) load_stage(t0);
    ++tile_count;
  }
  cp_async_wait_all_issued();  // leave no copy in flight behind an exited thread
}

// Accumulator layout of a 64 x N wgmma product (per warp w of the
// warpgroup, lane = 4 g + tq): element 4 nt + 2 h + j is row 16 w + g + 8 h,
// column 8 nt + 2 tq + j (dq_tile's x[nt][2 h + j]). Rows are the tile's
// rows; for S and dP the columns are the stage's keys, for dQ the head
// dimension.
template <class T, int D, AttnMode kMode>
__device__ void consume(const BwdArgs& a, const DqShared& sh, int tiles, int64_t chunk_row0,
                        int wg) {
  using namespace sm90;  // NOLINT(google-build-using-namespace)
  using L = DqSm90Smem<D>;
  constexpr int kNT = kDqKeys / 8;  // n8 column groups of S
  const AttnArgs& f = a.f;
  const int tid = static_cast<int>(threadIdx.x) - kWarpgroupThreads;
  const int warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const int row_base = wg * 64 + warp * 16;
  const float scale = f.scale, scale_log2 = f.scale * kAttnLog2e;
  const int bs = f.block_size;
  // K-major A operands: this warpgroup's 64 rows of Q and dO.
  const uint32_t desc_q = make_desc_lo(sh.base + L::kQ + wg * 64 * 128, 16);
  const uint32_t desc_do = make_desc_lo(sh.base + L::kdO + wg * 64 * 128, 16);
  const uint32_t rows_full = sh.bar(kBarRowsFull), rows_empty = sh.bar(kBarRowsEmpty);
  int stage = 0;
  uint32_t phase = 0, tile_count = 0;

  for (int index = blockIdx.x; index < tiles; index += gridDim.x) {
    AttnTile tk;
    if (!decode_tile<kMode>(f, index, tk)) continue;
    mbar_wait(rows_full, tile_count & 1);
    ++tile_count;
    // A warpgroup whose 64 rows are all padding only keeps the barrier
    // protocol going. The shuffle makes the flag visibly warp-uniform for
    // ptxas (the wgmma under it stay unserialised).
    const bool active = __shfl_sync(0xffffffffu, wg * 64 < tk.rows ? 1 : 0, 0) != 0;
    // This thread's rows: row_base + g + 8 h, keys [first, pos] (past: the
    // whole block). Padding rows need no mask: their Q and dO rows are zero,
    // so S, dP, lse and delta are, and their dS is 0 (and never stored).
    float lse2[2], delta[2];
    int first[2], pos[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = row_base + g + 8 * h;
      const float2 stats = sh.rows[r];
      lse2[h] = stats.x;
      delta[h] = stats.y;
      pos[h] = kMode == AttnMode::past ? INT_MAX : tk.first_pos + r;
      first[h] = kMode == AttnMode::current ? (pos[h] / bs) * bs : 0;
    }
    float dq[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dq[i] = 0.0f;

    int t0 = first_key_step(tk);
    if (t0 < 0) mbar_arrive(rows_empty);  // no key step: the rows are not read
    while (t0 >= 0) {
      const int t_next = next_key_step<kMode, kDqKeys>(tk, t0, bs);
      // Wait before every arrival on empty, also when inactive: an arrival
      // before this phase completed could count towards the phase the
      // producer still waits for.
      mbar_wait(sh.bar(kBarFull + stage), phase);
      if (active) {
        const uint32_t sk = sh.base + L::kK + stage * L::kKeyBytes;
        const uint32_t sv = sh.base + L::kV + stage * L::kKeyBytes;
        // S = Q K^T, dP = dO V^T, committed as two groups: the exps of P
        // run while dP is still in flight.
        float s[kDqKeys / 2], dp[kDqKeys / 2];
        const uint32_t desc_k = make_desc_lo(sk, 16), desc_v = make_desc_lo(sv, 16);
        fence_proxy_async();
        wgmma_fence();
        wgmma_ss_k_major<T, kDqKeys, D, kTileRows, kDqKeys>(s, desc_q, desc_k);
        wgmma_commit();
        wgmma_ss_k_major<T, kDqKeys, D, kTileRows, kDqKeys>(dp, desc_do, desc_v);
        wgmma_commit();
        wgmma_wait<1>();
        fence_operands(s);

        // P, then dS, dq_tile's arithmetic element for element (a step that
        // masks nothing keeps every key, so skipping the test changes no
        // value), rounded to the input dtype as A fragments: the accumulator
        // layout of a 64 x 64 product is the m16n8k16 A-fragment layout per
        // warp, 16 keys per k-step (the forward's pack_p).
        const bool masked = key_step_needs_mask<kMode, kDqKeys>(tk, t0, bs);
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int h = e >> 1;
            const int key = t0 + nt * 8 + 2 * tq + (e & 1);
            const bool keep = !masked || (key < tk.hi && key >= first[h] && key <= pos[h]);
            float& x = s[4 * nt + e];
            x = keep ? fast_exp2(fmaf(x, scale_log2, -lse2[h])) : 0.0f;
          }
        wgmma_wait<0>();
        fence_operands(dp);
        if (t_next < 0) mbar_arrive(rows_empty);
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float& x = s[4 * nt + e];
            x = x * (dp[4 * nt + e] - delta[e >> 1]) * scale;
          }
        uint32_t ds[kDqKeys / 16][4];
#pragma unroll
        for (int kc = 0; kc < kDqKeys / 16; ++kc)
#pragma unroll
          for (int i = 0; i < 4; ++i)
            ds[kc][i] = pack2<T>(s[8 * kc + 2 * i], s[8 * kc + 2 * i + 1]);

        // dQ += dS K: K is [key][d] in shared memory, the MN-major B
        // operand; a k-step is 16 keys = 2048 bytes, the leading byte offset
        // the distance between 64-column blocks.
        const uint32_t desc_kt = make_desc_lo(sk, kDqKeys * 128);
        fence_operands(dq);
        wgmma_fence();
        wgmma_rs_tb_steps<T, D>(dq, ds, desc_kt);
        wgmma_commit();
        wgmma_wait_all();
        fence_operands(dq);
        fence_operands(ds);
      } else if (t_next < 0) {
        mbar_arrive(rows_empty);
      }
      mbar_arrive(sh.bar(kBarEmpty + stage));
      if (++stage == kStages) {
        stage = 0;
        phase ^= 1;
      }
      t0 = t_next;
    }
    if (!active) continue;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = row_base + g + 8 * h;
      if (r >= tk.rows) continue;
      const int64_t out = kMode == AttnMode::past ? f.entries[tk.entry0 + r] : tk.row0 + r;
      store_dq_row<T, D, kMode>(a, out, tk.head, chunk_row0, tq,
                                [&](int dt, int j) -> float& { return dq[4 * dt + 2 * h + j]; });
    }
  }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <class T, int D, AttnMode kMode>
__global__ void __launch_bounds__(kDqThreads, 1) dq_sm90_kernel(const BwdArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace sm90;  // NOLINT(google-build-using-namespace)
  extern __shared__ __align__(1024) uint8_t smem_dq[];
  __shared__ __align__(8) uint64_t bars[kNumBars];
  __shared__ float2 row_stats[kTileRows];
  const AttnArgs& f = a.f;
  DqShared sh;
  sh.base = (smem_u32(smem_dq) + 1023u) & ~1023u;
  sh.bars = smem_u32(bars);
  sh.rows = row_stats;
  if (threadIdx.x == 0) {
    mbar_init(sh.bar(kBarRowsFull), 2 * kWarpgroupThreads);  // cp.async + plain arrivals
    mbar_init(sh.bar(kBarRowsEmpty), kConsumerThreads);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(sh.bar(kBarFull + s), kWarpgroupThreads);  // cp.async arrivals
      mbar_init(sh.bar(kBarEmpty + s), kConsumerThreads);
    }
  }
  __syncthreads();
  const int64_t chunk_row0 = chunk_first_row(f.seq, f.tile_begin);
  const int tiles =
      kMode == AttnMode::past ? *f.num_descs : (f.tile_end - f.tile_begin) * f.heads_q;

  // One warpgroup role per branch, so setmaxnreg applies; the warpgroup
  // index goes through a shuffle so that ptxas knows it is warp-uniform (as
  // in attention_sm90.cu).
  const int warpgroup =
      __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / kWarpgroupThreads, 0);
  if (warpgroup == 0) {
    setmaxnreg_dec<kProducerRegs>();
    produce<T, D, kMode>(a, sh, tiles, chunk_row0);
  } else {
    setmaxnreg_inc<kConsumerRegs>();
    consume<T, D, kMode>(a, sh, tiles, chunk_row0, warpgroup - 1);
  }
#else
  (void)a;
#endif
}

template <class T, int D, AttnMode kMode>
cudaError_t dq_sm90_typed(const BwdArgs& a, cudaStream_t stream) {
  constexpr int smem = DqSm90Smem<D>::kAlloc;
  const auto kernel = dq_sm90_kernel<T, D, kMode>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  // a.f.grid is the mma.sync kernel's past grid (at most 2 per SM, at most
  // the descriptor bound): capped at one per SM here.
  int64_t ctas = 0;
  if ((err = sm90_persistent_ctas<kMode>(a.f, ctas)) != cudaSuccess) return err;
  if (ctas == 0) return cudaSuccess;
  kernel<<<static_cast<unsigned>(ctas), kDqThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

// MOBA_CUDA_SM90_BWD_DQ and its test override.
ProcessSwitch& dq_switch() {
  static ProcessSwitch knob("MOBA_CUDA_SM90_BWD_DQ");
  return knob;
}

// Whether the loaded code of the kernel is its sm_90a body: only that body
// declares static shared memory.
bool dq_sm90_body_loaded() {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, dq_sm90_kernel<__nv_bfloat16, 128, AttnMode::dense>) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attr.sharedSizeBytes >= kBodyStaticSmem;
}

}  // namespace

bool bwd_sm90_dq_enabled() {
  if (!dq_switch().on(true)) return false;
  // The same answer on every device that passes bwd_sm90_supported() (they
  // load the same sm_90a code).
  static const bool body = dq_sm90_body_loaded();
  return body;
}

void set_sm90_backward_dq_override(int allow) {
  dq_switch().set_override(allow);
}

cudaError_t launch_bwd_dq_sm90(Elem elem, AttnMode mode, const BwdArgs& a, cudaStream_t stream) {
  return with_elem_dim(elem, a.f.head_dim, [&]<class T, int D>(ElemDimTag<T, D>) {
    return with_attn_mode(mode, [&]<AttnMode kMode>(ModeTag<kMode>) {
      return dq_sm90_typed<T, D, kMode>(a, stream);
    });
  });
}

}  // namespace moba::backends::cuda::detail
