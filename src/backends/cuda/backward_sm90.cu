// The key-major dK/dV kernel of the CUDA backward on Hopper (sm_90a): the
// work of dkv_kernel (backward_mma.cu) on warpgroup matrix products (wgmma)
// with warp specialisation, following the forward's attention_sm90.cu.
//
// One CTA per work item (kv head, block, 128-key tile), key tiles fastest,
// decoded as in dkv_kernel (backward_rows.cuh); it sees the same rows in the
// same order (current rows head by head, then the bucket's past entries, in
// 64-row steps), so the fp32 sums per key have a fixed order. Three
// warpgroups:
//   warpgroup 0, the producer (40 registers after setmaxnreg): copies the
//     tile's K and V once (128 rows each, keys past the tile zero-filled),
//     then per 64-row step the rows' metadata (lse in base 2, delta,
//     position: a KvRow slot per row) and their Q and dO rows (cp.async,
//     gathered, 128-byte swizzle) through a ring of kStages stages.
//   warpgroups 1 and 2, the consumers (232 registers): 64 keys each. Per
//     stage: S^T = K_w Q^T and dP^T = V_w dO^T (wgmma, both operands in
//     shared memory), P^T = exp2(S^T scale log2e - lse2) masked (key < tile
//     end, key <= position), dS^T = P^T (dP^T - delta) scale, both rounded
//     to the input dtype and kept in registers as the A operands of
//     dV += P^T dO and dK += dS^T Q (wgmma, dO and Q read "transposed" from
//     the same row-major stage, as the forward reads V). dK and dV (64 x D
//     fp32 per warpgroup) stay in registers for the whole item; the epilogue
//     adds each key's to the fp32 accumulators, as dkv_kernel does.
//
// Fused dq (kFusedDq: the fast mode, a.dq_acc set): each consumer also
// stores its dS^T to shared memory (key by key, the MN-major A operand of
// dQ = dS K); after a named barrier over both consumers, warpgroup w computes
// columns [64 w, 64 w + 64) of the stage's dQ over all 128 keys (K read
// "transposed" from the tile) and adds them to the rows' fp32 sums in
// a.dq_acc with 8-byte reductions (FlashAttention-3's scheme). Two dS
// buffers alternate by stage: a warpgroup writes a buffer again only after
// the next stage's barrier, which the other passes only after its product on
// that buffer completed. 5 products per (row, key) pair instead of the dq
// passes' 3 on top of the 4 here, at the price of the atomics and of a
// summation order that varies from run to run.
//
// Barriers (mbarriers): K/V full (the producer's cp.async arrivals), and per
// stage full (cp.async arrivals, plus one plain arrival per producer thread
// after the stage's metadata slots are written: its release orders those
// shared stores before the consumers' wait) and empty (every consumer thread,
// after its products of the stage are done and its slot reads with them).
//
// The device code exists only in the sm_90a pass (__CUDA_ARCH_FEAT_SM90_ALL),
// as in attention_sm90.cu; bwd_sm90_supported() checks that the loaded cubin
// has the body (only that body declares static shared memory).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backends/cuda/backward.cuh"
#include "backends/cuda/backward_rows.cuh"
#include "backends/cuda/sm90_backward_switch.cuh"
#include "backends/cuda/sm90_ptx.cuh"
#include "backends/cuda/sm90_switch.cuh"

namespace moba::backends::cuda::detail {
namespace {

constexpr int kKeyTile = kBwdSm90KeyTile;  // keys per item
constexpr int kRows = kBwdRowTile;         // gathered rows per stage
constexpr int kWgKeys = 64;                // keys per consumer warpgroup (M of every product)
constexpr int kWarpgroupThreads = 128;
constexpr int kDkvThreads = 3 * kWarpgroupThreads;  // producer + 2 consumers
constexpr int kStages = 3;
static_assert(2 * kWgKeys == kKeyTile, "two consumer warpgroups per key tile");
static_assert(kRows == 64, "the fragment loops below assume 64-row stages");

// Barriers: K/V full, then full and empty per stage.
constexpr int kNumBars = 1 + 2 * kStages;
// Static shared memory of the sm_90a body: the barriers and the stages'
// metadata slots (its presence marks the body).
constexpr size_t kBodyStaticSmem = kNumBars * sizeof(uint64_t) + kStages * kRows * sizeof(KvRow);

// Dynamic shared memory: K, V (128 rows), then per stage Q and dO (64 rows).
// Tiles are stored as the forward's: column blocks of 64 elements, rows of
// 128 bytes, 16-byte chunk c of row r at c ^ (r % 8) (the 128-byte swizzle
// of the wgmma descriptors, sm90_ptx.cuh); every tile is a multiple of 1024
// bytes, so with a 1024-aligned base every tile is aligned as it requires.
// Fused dq: two dS^T buffers after the stages (128 keys x 64 rows each, a
// key per 128-byte row).
template <int D, bool kFusedDq>
struct DkvSm90Smem {
  static constexpr int kKVBytes = kKeyTile * D * 2;
  static constexpr int kRowBytes = kRows * D * 2;
  static constexpr int kK = 0;
  static constexpr int kV = kK + kKVBytes;
  static constexpr int kStage0 = kV + kKVBytes;      // stage s: Q at kStage0 + s kStageBytes,
  static constexpr int kStageBytes = 2 * kRowBytes;  // dO kRowBytes after it
  static constexpr int kDs = kStage0 + kStages * kStageBytes;  // buffer b at kDs + b kDsBytes
  static constexpr int kDsBytes = kKeyTile * kRows * 2;
  static constexpr int kAlloc = kDs + (kFusedDq ? 2 * kDsBytes : 0) + 1024;  // slack to align
  static_assert(kAlloc + kBodyStaticSmem <= 227 * 1024, "shared memory beyond the sm_90 limit");
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// 128 x 40 + 256 x 232 = 64,512 <= 65,536 registers of the SM.
constexpr int kProducerRegs = 40;
constexpr int kConsumerRegs = 232;

constexpr int kBarKV = 0;
constexpr int kBarFull = 1;
constexpr int kBarEmpty = kBarFull + kStages;
static_assert(kBarEmpty + kStages == kNumBars);

// Rows of a swizzled tile of kTileRows rows (as the forward's producer
// copies them): row r is the D-vector at element offset offs(r) of base
// (negative: zero-filled). Lane l of producer warp w copies chunk l % 8 of
// each 64-column block of rows r0 + 16 i, r0 = 4 w + l / 8: a warp
// instruction reads four whole 128-byte row segments, and all of a thread's
// rows have the same r % 8, so its destinations are one per-thread offset
// plus constants.
template <class T, int D, int kTileRows, class Offset>
__device__ __forceinline__ void copy_tile_rows(uint32_t tile, const T* base, Offset offs, int tid) {
  const int chunk = tid & 7, r0 = tid >> 3;
  const uint32_t dst = tile + r0 * 128 + ((chunk ^ (r0 & 7)) << 4);
#pragma unroll
  for (int i = 0; i < kTileRows / 16; ++i) {
    const int64_t off = offs(r0 + 16 * i);
    const bool in = off >= 0;
    const T* src = base + (in ? off + chunk * 8 : 0);
#pragma unroll
    for (int b = 0; b < D / 64; ++b)
      cp_async16(dst + i * 16 * 128 + b * kTileRows * 128, src + b * 64, in);
  }
}

// Named barrier 1 over the producer warpgroup: the stage's slots are written
// before any producer thread reads their offsets.
__device__ __forceinline__ void producer_sync() {
  asm volatile("bar.sync 1, %0;\n" ::"n"(kWarpgroupThreads) : "memory");
}

// Named barrier 2 over both consumer warpgroups (fused dq): the stage's dS^T
// halves are in shared memory.
__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 2, %0;\n" ::"n"(2 * kWarpgroupThreads) : "memory");
}

__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}

struct DkvShared {
  uint32_t base;  // 1024-aligned shared address of the tiles
  uint32_t bars;  // shared address of the barrier array
  KvRow (*slots)[kRows];
  __device__ uint32_t bar(int i) const { return bars + 8 * i; }
};

template <class T, int D>
__device__ void produce(const BwdArgs& a, const KvTile& kt, const DkvShared& sh,
                        const KvRowSource& src, int n_tiles) {
  using namespace sm90;             // NOLINT(google-build-using-namespace)
  using L = DkvSm90Smem<D, false>;  // the tiles the producer fills sit alike in both layouts
  const AttnArgs& f = a.f;
  const int tid = static_cast<int>(threadIdx.x);  // 0..127
  {
    const int64_t key_row0 = f.seq.k_begin[kt.b];
    const int t0 = kt.t0, t1 = kt.t1;
    const auto key_offset = [&](int r, int64_t ts) -> int64_t {
      return t0 + r < t1 ? (t0 + r) * ts : -1;
    };
    const T* k =
        static_cast<const T*>(f.k) + static_cast<int64_t>(kt.kvh) * f.k_hs + key_row0 * f.k_ts;
    const T* v =
        static_cast<const T*>(f.v) + static_cast<int64_t>(kt.kvh) * f.v_hs + key_row0 * f.v_ts;
    copy_tile_rows<T, D, kKeyTile>(
        sh.base + L::kK, k, [&](int r) { return key_offset(r, f.k_ts); }, tid);
    copy_tile_rows<T, D, kKeyTile>(
        sh.base + L::kV, v, [&](int r) { return key_offset(r, f.v_ts); }, tid);
    mbar_arrive_on_cp_async(sh.bar(kBarKV));
  }
  const T* q = static_cast<const T*>(f.q);
  const T* dout = static_cast<const T*>(a.dout);
  int stage = 0;
  uint32_t phase = 0;
  for (int tile = 0; tile < n_tiles; ++tile) {
    mbar_wait(sh.bar(kBarEmpty + stage), phase ^ 1);
    KvRow* s = sh.slots[stage];
    if (tid < kRows) s[tid] = kv_row(a, src, tile, tid);
    producer_sync();
    const uint32_t sq = sh.base + L::kStage0 + stage * L::kStageBytes;
    copy_tile_rows<T, D, kRows>(
        sq, q, [&](int r) { return s[r].q; }, tid);
    copy_tile_rows<T, D, kRows>(
        sq + L::kRowBytes, dout, [&](int r) { return s[r].dout; }, tid);
    mbar_arrive_on_cp_async(sh.bar(kBarFull + stage));
    mbar_arrive(sh.bar(kBarFull + stage));
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
  cp_async_wait_all_issued();  // leave no copy in flight behind an exited thread
}

// Accumulator layout of a 64 x N wgmma product (per warp w of the
// warpgroup, lane = 4 g + tq): element 4 nt + 2 h + j is row 16 w + g + 8 h,
// column 8 nt + 2 tq + j. Rows are keys here; for S^T and dP^T the columns
// are the stage's rows, for dK and dV the head dimension.
template <class T, int D, bool kFusedDq>
__device__ void consume(const BwdArgs& a, const KvTile& kt, const DkvShared& sh, int n_tiles,
                        int wg) {
  using namespace sm90;  // NOLINT(google-build-using-namespace)
  using L = DkvSm90Smem<D, kFusedDq>;
  constexpr int kNT = kRows / 8;  // n8 column groups of S^T
  const AttnArgs& f = a.f;
  const int tid = static_cast<int>(threadIdx.x) - kWarpgroupThreads;
  const int warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const int t1 = kt.t1;
  // This thread's keys: key_lo and key_lo + 8.
  const int key_lo = kt.t0 + wg * kWgKeys + warp * 16 + g;
  // A warpgroup whose 64 keys all lie past the tile's end only keeps the
  // barrier protocol going. The shuffle makes the flag visibly warp-uniform
  // for ptxas (the wgmma under it stay unserialised).
  const bool active = __shfl_sync(0xffffffffu, kt.t0 + wg * kWgKeys < t1 ? 1 : 0, 0) != 0;
  const float scale = f.scale, scale_log2 = f.scale * kAttnLog2e;
  // K-major A operands: this warpgroup's 64 rows of K and V.
  const uint32_t desc_k = make_desc_lo(sh.base + L::kK + wg * kWgKeys * 128, 16);
  const uint32_t desc_v = make_desc_lo(sh.base + L::kV + wg * kWgKeys * 128, 16);
  float dk[D / 2], dv[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.0f;

  // Fused dq: this thread's key row of a dS^T buffer (a key per 128 bytes,
  // 16-byte chunk c of key k at c ^ (k % 8) = c ^ g); this warpgroup's dQ
  // columns, if any (D 64: warpgroup 0 only), and their K operand.
  const uint32_t ds_row = sh.base + L::kDs + (wg * kWgKeys + warp * 16 + g) * 128;
  const bool dq_cols = kFusedDq && wg * 64 < D;
  const uint32_t desc_k_t = make_desc_lo(sh.base + L::kK + wg * kKeyTile * 128, kKeyTile * 128);
  if (kFusedDq && !active) {
    // Idle keys (past the tile's end) enter dQ with dS = 0 on zero K rows;
    // stale shared memory could hold NaN, so the buffers get zeros once.
#pragma unroll
    for (int b = 0; b < 2; ++b)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int c = 0; c < 8; ++c)
          st_shared_u32(ds_row + b * L::kDsBytes + h * 1024 + c * 16 + tq * 4, 0u);
  }

  if (active || dq_cols) mbar_wait(sh.bar(kBarKV), 0);  // an idle warpgroup's dQ reads K
  int stage = 0;
  uint32_t phase = 0;
  for (int tile = 0; tile < n_tiles; ++tile) {
    const uint32_t full = sh.bar(kBarFull + stage), empty = sh.bar(kBarEmpty + stage);
    // Wait before every arrival on empty, also when inactive: an arrival
    // before this phase completed could count towards the phase the producer
    // still waits for.
    mbar_wait(full, phase);
    if (active) {
      const uint32_t sq = sh.base + L::kStage0 + stage * L::kStageBytes;
      const uint32_t sdo = sq + L::kRowBytes;
      // S^T = K_w Q^T, dP^T = V_w dO^T, committed as two groups: the
      // exps of P^T run while dP^T is still in flight, and dS^T is computed
      // while dV += P^T dO runs (its operands are ready first).
      float st[kRows / 2], dpt[kRows / 2];
      const uint32_t desc_q = make_desc_lo(sq, 16), desc_do = make_desc_lo(sdo, 16);
      fence_proxy_async();
      wgmma_fence();
      wgmma_ss_k_major<T, kRows, D, kKeyTile, kRows>(st, desc_k, desc_q);
      wgmma_commit();
      wgmma_ss_k_major<T, kRows, D, kKeyTile, kRows>(dpt, desc_v, desc_do);
      wgmma_commit();
      wgmma_wait<1>();
      fence_operands(st);

      // P^T and dS^T (dkv_kernel's arithmetic, element for element), rounded
      // to the input dtype as A fragments: the accumulator layout of a
      // 64 x 64 product is the m16n8k16 A-fragment layout per warp, 16 rows
      // of the stage per k-step.
      const KvRow* s = sh.slots[stage];
      uint32_t p[kRows / 16][4], ds[kRows / 16][4];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const KvRow& row = s[nt * 8 + 2 * tq + j];
          const int pos = row.pos;
          const float lse2 = row.lse2;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int key = key_lo + 8 * h;
            const bool keep = key < t1 && key <= pos;
            float& e = st[4 * nt + 2 * h + j];
            e = keep ? fast_exp2(fmaf(e, scale_log2, -lse2)) : 0.0f;
          }
        }
      }
#pragma unroll
      for (int kc = 0; kc < kRows / 16; ++kc)
#pragma unroll
        for (int i = 0; i < 4; ++i) p[kc][i] = pack2<T>(st[8 * kc + 2 * i], st[8 * kc + 2 * i + 1]);

      // dV += P^T dO, dK += dS^T Q: dO and Q are [row][d] in shared memory,
      // the MN-major B operand; a k-step is 16 rows = 2048 bytes, the
      // leading byte offset the distance between 64-column blocks.
      const uint32_t desc_do_t = make_desc_lo(sdo, kRows * 128);
      const uint32_t desc_q_t = make_desc_lo(sq, kRows * 128);
      wgmma_wait<0>();
      fence_operands(dpt);
      fence_operands(dv);
      wgmma_fence();
      wgmma_rs_tb_steps<T, D>(dv, p, desc_do_t);
      wgmma_commit();

#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float delta = s[nt * 8 + 2 * tq + j].delta;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float& d = dpt[4 * nt + 2 * h + j];
            d = st[4 * nt + 2 * h + j] * (d - delta) * scale;
          }
        }
      }
#pragma unroll
      for (int kc = 0; kc < kRows / 16; ++kc)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          ds[kc][i] = pack2<T>(dpt[8 * kc + 2 * i], dpt[8 * kc + 2 * i + 1]);
      fence_operands(dk);
      wgmma_fence();
      wgmma_rs_tb_steps<T, D>(dk, ds, desc_q_t);
      wgmma_commit();
      if constexpr (kFusedDq) {
        // dS^T to shared memory while dK runs: fragment word (kc, i) holds
        // rows 8 nt + 2 tq (+1) of key 16 warp + g + 8 h, nt = 2 kc + i / 2,
        // h = i % 2 (the accumulator layout above); 32 distinct banks per
        // warp store.
        const uint32_t row = ds_row + (tile & 1) * L::kDsBytes + tq * 4;
#pragma unroll
        for (int kc = 0; kc < kRows / 16; ++kc)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int nt = 2 * kc + (i >> 1);
            st_shared_u32(row + (i & 1) * 1024 + ((nt ^ g) << 4), ds[kc][i]);
          }
      }
      wgmma_wait<0>();
      fence_operands(dv);
      fence_operands(dk);
      fence_operands(p);
      fence_operands(ds);
    }
    if constexpr (kFusedDq) {
      // dQ of the stage's rows 16 warp + g + 8 h, columns 64 wg + 8 nt +
      // 2 tq + j; their dq_acc rows are read before the stage is released.
      int dq_row[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) dq_row[h] = sh.slots[stage][warp * 16 + g + 8 * h].dq;
      mbar_arrive(empty);
      fence_proxy_async();  // the dS^T stores, for the other warpgroup's wgmma too
      consumers_sync();
      if (dq_cols) {
        float dq[32];
        wgmma_fence();
        wgmma_ss_tt_steps<T, 64, kKeyTile / 16>(
            dq, make_desc_lo(sh.base + L::kDs + (tile & 1) * L::kDsBytes, kKeyTile * 128),
            desc_k_t);
        wgmma_commit();
        wgmma_wait<0>();
        fence_operands(dq);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (dq_row[h] < 0) continue;
          float* dst = a.dq_acc + static_cast<int64_t>(dq_row[h]) * D + wg * 64 + 2 * tq;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
            red_add_f32x2(dst + 8 * nt, dq[4 * nt + 2 * h], dq[4 * nt + 2 * h + 1]);
        }
      }
    } else {
      mbar_arrive(empty);
    }
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
  if (!active) return;

  // One owner per (key, kv head) per launch: add to the accumulators.
  const int64_t key_row0 = f.seq.k_begin[kt.b];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int key = key_lo + 8 * h;
    if (key >= t1) continue;
    add_key_grads<D>(
        a, key_row0 + key, kt.kvh, tq, [&](int dt, int j) { return dk[4 * dt + 2 * h + j]; },
        [&](int dt, int j) { return dv[4 * dt + 2 * h + j]; });
  }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <class T, int D, bool kFusedDq>
__global__ void __launch_bounds__(kDkvThreads, 1) dkv_sm90_kernel(const BwdArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace sm90;  // NOLINT(google-build-using-namespace)
  extern __shared__ __align__(1024) uint8_t smem_dkv[];
  __shared__ __align__(8) uint64_t bars[kNumBars];
  __shared__ KvRow slots[kStages][kRows];
  __shared__ KvRowSource src;
  __shared__ int chunk[2];
  const AttnArgs& f = a.f;

  KvTile kt;
  if (!decode_kv_tile<kKeyTile>(a, blockIdx.x, kt)) return;
  DkvShared sh;
  sh.base = (smem_u32(smem_dkv) + 1023u) & ~1023u;
  sh.bars = smem_u32(bars);
  sh.slots = slots;
  if (threadIdx.x == 0) {
    chunk_rows(f.seq, f.tile_begin, f.tile_end, &chunk[0], &chunk[1]);
    mbar_init(sh.bar(kBarKV), kWarpgroupThreads);  // cp.async arrivals
    for (int s = 0; s < kStages; ++s) {
      mbar_init(sh.bar(kBarFull + s), 2 * kWarpgroupThreads);   // cp.async + plain arrivals
      mbar_init(sh.bar(kBarEmpty + s), 2 * kWarpgroupThreads);  // every consumer thread
    }
  }
  __syncthreads();
  int n_tiles;
  {
    const KvRowSource rs = kv_row_source(a, kt, chunk[0], chunk[1]);
    n_tiles = rs.n_tiles;
    if (n_tiles == 0) return;  // nothing of this chunk attends to the tile
    if (threadIdx.x == 0) src = rs;
  }
  __syncthreads();

  // One warpgroup role per branch, so setmaxnreg applies; the warpgroup
  // index goes through a shuffle so that ptxas knows it is warp-uniform (as
  // in attention_sm90.cu).
  const int warpgroup =
      __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / kWarpgroupThreads, 0);
  if (warpgroup == 0) {
    setmaxnreg_dec<kProducerRegs>();
    produce<T, D>(a, kt, sh, src, n_tiles);
  } else {
    setmaxnreg_inc<kConsumerRegs>();
    consume<T, D, kFusedDq>(a, kt, sh, n_tiles, warpgroup - 1);
  }
#else
  (void)a;
#endif
}

template <class T, int D, bool kFusedDq>
cudaError_t dkv_sm90_typed(const BwdArgs& a, int64_t items, cudaStream_t stream) {
  constexpr int smem = DkvSm90Smem<D, kFusedDq>::kAlloc;
  const auto kernel = dkv_sm90_kernel<T, D, kFusedDq>;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  if (items <= 0) return cudaSuccess;
  if (items > INT32_MAX) return cudaErrorInvalidConfiguration;
  kernel<<<static_cast<unsigned>(items), kDkvThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

// MOBA_CUDA_SM90_BWD and its test override.
ProcessSwitch& bwd_switch() {
  static ProcessSwitch knob("MOBA_CUDA_SM90_BWD");
  return knob;
}

// MOBA_CUDA_SM90_BWD_FUSED_DQ and its test override.
ProcessSwitch& fused_dq_switch() {
  static ProcessSwitch knob("MOBA_CUDA_SM90_BWD_FUSED_DQ");
  return knob;
}

// Whether the loaded code of the kernel is its sm_90a body: only that body
// declares static shared memory.
bool dkv_sm90_body_loaded() {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, dkv_sm90_kernel<__nv_bfloat16, 128, false>) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attr.sharedSizeBytes >= kBodyStaticSmem;
}

}  // namespace

bool bwd_sm90_wanted(bool dense, int block_size) {
  return bwd_switch().on(kSm90BackwardByDefault && (dense || block_size >= kSm90MinBlockSize));
}

void set_sm90_backward_override(int allow) {
  bwd_switch().set_override(allow);
}

bool bwd_sm90_fused_dq_enabled() {
  return fused_dq_switch().on(kSm90FusedDqByDefault);
}

void set_sm90_backward_fused_dq_override(int allow) {
  fused_dq_switch().set_override(allow);
}

bool bwd_sm90_supported() {
  if (!sm90_attention_supported()) return false;
  // The same answer on every device that passes the check above (they load
  // the same sm_90a code).
  static const bool body = dkv_sm90_body_loaded();
  return body;
}

cudaError_t launch_bwd_dkv_sm90(Elem elem, const BwdArgs& a, int64_t items, cudaStream_t stream) {
  return with_elem_dim(elem, a.f.head_dim, [&]<class T, int D>(ElemDimTag<T, D>) {
    return a.dq_acc != nullptr ? dkv_sm90_typed<T, D, true>(a, items, stream)
                               : dkv_sm90_typed<T, D, false>(a, items, stream);
  });
}

}  // namespace moba::backends::cuda::detail
