// Attention of MoBA (spec step 5) on Hopper, FlashAttention-3 style: the same
// three modes, row tiles and outputs as the mma.sync kernel in attention.cu
// (see its header comment and docs/cuda_forward.md, "Hopper kernel"), on
// warpgroup matrix products (wgmma) with warp specialisation.
//
// A CTA of three warpgroups works through its tiles (a persistent grid):
//   warpgroup 0, the producer (40 registers per thread after setmaxnreg):
//     copies each tile's 128 query rows (gathered through the entry lists in
//     past mode) and then its keys and values, 128 keys per stage, with
//     cp.async into 128-byte-swizzled shared memory. K/V run through a ring
//     of kStages stages (3 by default: one Q buffer at D 128; 2 with two Q
//     buffers, MOBA_CUDA_SM90_STAGES=2). Each copy batch completes an
//     mbarrier by itself (cp.async.mbarrier.arrive.noinc).
//   warpgroups 1 and 2, the consumers (232 registers): 64 query rows each.
//     Per stage: S = Q K^T (wgmma, both operands in shared memory), K handed
//     back, mask, online softmax in registers (fp32, base 2), P rounded to the
//     input dtype and kept in registers as the A operand of O += P V (wgmma, V
//     read "transposed" from the same row-major tile), V handed back. The
//     epilogue is the mma.sync kernel's, row for row: partials + lse (past),
//     LSE merge + out/lse (current), out/lse (dense).
//
// Why cp.async rather than TMA for K/V: keys past the tile's range are
// zero-filled exactly as in the mma.sync kernel (a tensor map could only
// bound the copy at the end of the tensor), no tensor maps have to be encoded
// on the host through the driver API per launch, and the gathered Q rows need
// per-row copies anyway. The producer's copies share the SM's schedulers with
// the consumers, so they are kept cheap: per-thread offsets computed once per
// tile, swizzled destinations as immediates, no predicates on whole stages
// (about 65 SASS instructions per K or V stage and producer warp, down from
// ~205).
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
#include "backends/cuda/sm90_tiles.cuh"

namespace moba::backends::cuda::detail {
namespace {

constexpr int kKeys = 128;  // keys per pipeline stage (N of S = Q K^T, K of O += P V)
static_assert(kKeys == kTileRows, "Q tiles and K/V stages share the copy geometry");
constexpr int kWarpgroupThreads = 128;
constexpr int kConsumerThreads = 2 * kWarpgroupThreads;
constexpr int kSm90Threads = kWarpgroupThreads + kConsumerThreads;  // producer + 2 consumers
// Static shared memory for the barriers (its presence marks the sm_90a
// body): sized for the deepest pipeline, the same in every instantiation.
constexpr int kMaxBars = 16;
// The largest dynamic shared memory a CTA may have on sm_90 (227 KB), less
// the static barriers (rounded up to the 1024-byte alignment of the dynamic
// array).
constexpr int kSmemBudget = 227 * 1024 - 1024;

// Dynamic shared memory: kQBufs Q buffers, then kStages K stages and kStages
// V stages; every tile is a multiple of 1024 bytes, so with a 1024-aligned
// base every tile is aligned as the 128-byte swizzle requires. Two Q buffers
// (the next tile's Q lands while the current tile runs) where they fit next
// to the stages, else one (D 128 with 3 stages: 32 KB + 3 x 64 KB).
template <int D, int kStages>
struct Sm90Smem {
  static constexpr int kQBytes = kTileRows * D * 2;
  static constexpr int kKVBytes = kKeys * D * 2;
  static constexpr int kQBufs = 2 * kQBytes + 2 * kStages * kKVBytes + 1024 <= kSmemBudget ? 2 : 1;
  static constexpr int kK = kQBufs * kQBytes;
  static constexpr int kV = kK + kStages * kKVBytes;
  static constexpr int kBytes = kV + kStages * kKVBytes;
  static constexpr int kAlloc = kBytes + 1024;  // slack to align the base
  static_assert(kAlloc <= kSmemBudget, "shared memory beyond the sm_90 limit");
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// The shared-memory layout and the barrier indices: Q full / empty per Q
// buffer, K full, V full, K empty, V empty per stage.
template <int D, int kStages>
struct Sm90Layout : Sm90Smem<D, kStages> {
  using Smem = Sm90Smem<D, kStages>;
  static constexpr int kBarQFull = 0;
  static constexpr int kBarQEmpty = Smem::kQBufs;
  static constexpr int kBarKFull = 2 * Smem::kQBufs;
  static constexpr int kBarVFull = kBarKFull + kStages;
  static constexpr int kBarKEmpty = kBarVFull + kStages;
  static constexpr int kBarVEmpty = kBarKEmpty + kStages;
  static constexpr int kNumBars = kBarVEmpty + kStages;
  static_assert(kNumBars <= kMaxBars);
};

// 128 x 40 + 256 x 232 = 64,512 <= 65,536 registers of the SM.
constexpr int kProducerRegs = 40;
constexpr int kConsumerRegs = 232;

struct Sm90Shared {
  uint32_t base;  // 1024-aligned shared address of the tiles
  uint32_t bars;  // shared address of the barrier array
  __device__ uint32_t bar(int i) const { return bars + 8 * i; }
};

// The producer warpgroup: per tile the Q rows, then K and V in stages of
// kKeys keys through a ring of kStages stages. K and V of a stage have their
// own full and empty barriers: the consumers give K back right after
// S = Q K^T and V after O += P V, so the next K load starts half a stage
// earlier. With a single Q buffer the tile's first K/V stage is issued before
// its Q (that stage's slot frees before the previous tile's Q does), so at a
// tile boundary only Q's latency is exposed, not Q's and the first stage's.
template <class T, int D, AttnMode kMode, int kStages>
__device__ void produce(const AttnArgs& a, const Sm90Shared& sh, int tiles, int64_t chunk_row0) {
  using namespace sm90;  // NOLINT(google-build-using-namespace)
  using L = Sm90Layout<D, kStages>;
  const CopyLane cl(static_cast<int>(threadIdx.x));
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const int64_t k_ts = a.k_ts, v_ts = a.v_ts;
  const int64_t k_step = kCopyRowStep * k_ts, v_step = kCopyRowStep * v_ts;
  const uint32_t dst_k = sh.base + L::kK + cl.dst, dst_v = sh.base + L::kV + cl.dst;
  int stage = 0;
  uint32_t phase = 0, tile_count = 0;
  for (int index = blockIdx.x; index < tiles; index += gridDim.x) {
    AttnTile tk;
    if (!decode_tile<kMode>(a, index, tk)) continue;
    const int qbuf = L::kQBufs == 1 ? 0 : static_cast<int>(tile_count & 1);
    const uint32_t qphase = (tile_count / L::kQBufs) & 1;
    const auto load_q = [&] {
      mbar_wait(sh.bar(L::kBarQEmpty + qbuf), qphase ^ 1);
      load_q_tile<T, D, kMode>(a, tk, sh.base + qbuf * L::kQBytes + cl.dst, cl, chunk_row0);
      mbar_arrive_on_cp_async(sh.bar(L::kBarQFull + qbuf));
    };
    // This thread's chunk of its first row at key position 0.
    const T* krow =
        k + static_cast<int64_t>(tk.kvh) * a.k_hs + (tk.key_row0 + cl.row0) * k_ts + cl.chunk * 8;
    const T* vrow =
        v + static_cast<int64_t>(tk.kvh) * a.v_hs + (tk.key_row0 + cl.row0) * v_ts + cl.chunk * 8;
    const auto load_stage = [&](int t0) {
      const uint32_t ko = dst_k + stage * L::kKVBytes, vo = dst_v + stage * L::kKVBytes;
      const int valid = tk.hi - t0;  // keys of the stage in range
      mbar_wait(sh.bar(L::kBarKEmpty + stage), phase ^ 1);
      if (valid >= kKeys)
        copy_rows_full<T, D>(ko, krow + t0 * k_ts, k_step);
      else
        copy_rows_partial<T, D>(ko, krow + t0 * k_ts, k_step, cl.row0, valid, k);
      mbar_arrive_on_cp_async(sh.bar(L::kBarKFull + stage));
      mbar_wait(sh.bar(L::kBarVEmpty + stage), phase ^ 1);
      if (valid >= kKeys)
        copy_rows_full<T, D>(vo, vrow + t0 * v_ts, v_step);
      else
        copy_rows_partial<T, D>(vo, vrow + t0 * v_ts, v_step, cl.row0, valid, v);
      mbar_arrive_on_cp_async(sh.bar(L::kBarVFull + stage));
      if (++stage == kStages) {
        stage = 0;
        phase ^= 1;
      }
    };
    // With one Q buffer: the first stage, then Q, then the rest. The stage
    // is peeled rather than Q loaded under a flag inside the loop: there
    // Q's addresses were loop invariants, hoisted out of the loop by the
    // compiler, and spilled (they do not fit in 40 registers).
    int t0 = first_key_step(tk);
    if constexpr (L::kQBufs == 1) {
      if (t0 >= 0) {
        load_stage(t0);
        t0 = next_key_step<kMode, kKeys>(tk, t0, a.block_size);
      }
    }
    // A tile without keys still loads Q: the consumers wait for it.
    load_q();
    for (; t0 >= 0; t0 = next_key_step<kMode, kKeys>(tk, t0, a.block_size)) load_stage(t0);
    ++tile_count;
  }
  cp_async_wait_all_issued();  // leave no copy in flight behind an exited thread
}

// Named barriers 1 and 2 order the two consumer warpgroups' product issues
// ("ping-pong", as in FlashAttention-3): warpgroup w waits on barrier 1 + w
// before issuing a stage's products (S = Q K^T; with the overlap also the
// previous stage's P V) and then releases the other one, so one warpgroup's
// softmax runs while the other's products occupy the tensor cores.
__device__ __forceinline__ void named_barrier_sync(int id) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(kConsumerThreads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(kConsumerThreads) : "memory");
}

// What one consumer thread needs of its warpgroup and tile; shared by the
// two consumer loops below.
template <class T, int D, AttnMode kMode, int kStages>
struct ConsumerCtx {
  using L = Sm90Layout<D, kStages>;
  static constexpr int kDT = D / 8;      // n8 column groups of O
  static constexpr int kNT = kKeys / 8;  // n8 column groups of S
  const AttnArgs& a;
  const Sm90Shared& sh;
  int wg, g, tq, row_base;
  float scale_log2;
  int bs;

  // S = Q K^T of the stage, issued and committed (not waited for).
  __device__ __forceinline__ void issue_s(float (&s)[kKeys / 2], uint32_t desc_q, int stage) const {
    using namespace sm90;  // NOLINT(google-build-using-namespace)
    fence_proxy_async();
    const uint32_t desc_k = make_desc_lo(sh.base + L::kK + stage * L::kKVBytes, 16);
    wgmma_fence();
    wgmma_ss_k_major<T, kKeys, D, kTileRows, kKeys>(s, desc_q, desc_k);
    wgmma_commit();
  }

  // O += P V of the stage, issued and committed: V is [key][d] in shared
  // memory, the MN-major B operand; a k-step is 16 keys = two 8-row groups =
  // 2048 bytes.
  __device__ __forceinline__ void issue_pv(float (&o)[D / 2], const uint32_t (&p)[kKeys / 16][4],
                                           int stage) const {
    using namespace sm90;  // NOLINT(google-build-using-namespace)
    fence_proxy_async();
    const uint32_t desc_v = make_desc_lo(sh.base + L::kV + stage * L::kKVBytes, kKeys * 128);
    fence_operands(o);
    wgmma_fence();
    wgmma_rs_tb_steps<T, D>(o, p, desc_v);
    wgmma_commit();
  }

  // The causal / range mask of the step at t0 (when some key of it is
  // masked for some row). s[4 nt + e]: row row_base + g + 8 (e >> 1), key
  // t0 + 8 nt + 2 tq + (e & 1).
  __device__ __forceinline__ void mask(float (&s)[kKeys / 2], const AttnTile& tk, int t0,
                                       const int (&pos)[2]) const {
    if (!key_step_needs_mask<kMode, kKeys>(tk, t0, bs)) return;
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

  // P in the input dtype as wgmma A fragments: the accumulator layout of S
  // is the A-fragment layout of m16n8k16 per warp, 16 keys per k-step.
  __device__ __forceinline__ static void pack_p(const float (&s)[kKeys / 2],
                                                uint32_t (&p)[kKeys / 16][4]) {
#pragma unroll
    for (int kc = 0; kc < kKeys / 16; ++kc) {
      p[kc][0] = pack2<T>(s[8 * kc + 0], s[8 * kc + 1]);
      p[kc][1] = pack2<T>(s[8 * kc + 2], s[8 * kc + 3]);
      p[kc][2] = pack2<T>(s[8 * kc + 4], s[8 * kc + 5]);
      p[kc][3] = pack2<T>(s[8 * kc + 6], s[8 * kc + 7]);
    }
  }

  // The epilogue, the mma.sync kernel's (attention_common.cuh).
  __device__ __forceinline__ void store(const AttnTile& tk, const int (&pos)[2],
                                        const float (&m)[2], const float (&l)[2], float (&o)[D / 2],
                                        int64_t chunk_row0) const {
#pragma unroll
    for (int h = 0; h < 2; ++h)
      store_row<T, D, kMode>(a, tk, row_base + h * 8 + g, pos[h], a.entries, tk.entry0, m[h], l[h],
                             scale_log2, bs, chunk_row0, tq,
                             [&](int dt, int j) -> float& { return o[4 * dt + 2 * h + j]; });
  }
};

// Every consumer thread arrives on the "empty" barriers (expected count 256):
// no lane test and no __syncwarp between the products. Each thread arrives
// after its own wgmma.wait_group, so the phase completes only when both
// warpgroups' products have read the buffer. K is given back right after
// S = Q K^T, V after O += P V, Q right after the tile's last S = Q K^T (so
// with a single Q buffer the next tile's Q loads during this stage's softmax
// and P V).
//
// kOverlap false: per stage S, softmax, P V, each waited for before the next
// (the two warpgroups overlap each other through the ping-pong).
// kOverlap true (MOBA_CUDA_SM90_OVERLAP=1), FlashAttention-3's
// intra-warpgroup overlap on top: stage n issues S_n = Q K_n^T and then
// O += P_{n-1} V_{n-1} back to back, waits for S_n only
// (wgmma.wait_group 1), runs the softmax of S_n while P_{n-1} V_{n-1} is on
// the tensor cores, and then waits for it. O is rescaled by the previous
// stage's factor just before that product, so the arithmetic is the same
// sequence as without the overlap. O, S_n and P_{n-1} are live together
// (160 registers at D 128): this needs the consumers' setmaxnreg budget,
// which ptxas allocates against in the consumer branch.
template <class T, int D, AttnMode kMode, int kStages, bool kOverlap>
__device__ void consume(const AttnArgs& a, const Sm90Shared& sh, int tiles, int64_t chunk_row0,
                        int wg, bool pingpong) {
  using namespace sm90;  // NOLINT(google-build-using-namespace)
  using Ctx = ConsumerCtx<T, D, kMode, kStages>;
  using L = typename Ctx::L;
  constexpr int kNT = Ctx::kNT;
  const int tid = threadIdx.x - kWarpgroupThreads;
  const int warp = (tid >> 5) & 3, lane = tid & 31;
  const Ctx cx{a,           sh, wg, lane >> 2, lane & 3, wg * 64 + warp * 16, a.scale * kAttnLog2e,
               a.block_size};
  const int bs = a.block_size;
  const int my_turn = 1 + wg, other_turn = 2 - wg;
  // Warpgroup 0 issues first. Every stage pairs one sync of each warpgroup
  // with one arrive of the other, in the same order on both sides (both walk
  // the same tiles and stages), and warpgroup 0 takes the last arrive after
  // its loop, so no barrier is left half-arrived.
  if (pingpong && wg == 1) named_barrier_arrive(1);
  int stage = 0;
  uint32_t phase = 0, tile_count = 0;
  const auto advance = [&] {
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
  };

  for (int index = blockIdx.x; index < tiles; index += gridDim.x) {
    AttnTile tk;
    if (!decode_tile<kMode>(a, index, tk)) continue;
    const int qbuf = L::kQBufs == 1 ? 0 : static_cast<int>(tile_count & 1);
    const uint32_t q_empty = sh.bar(L::kBarQEmpty + qbuf);
    mbar_wait(sh.bar(L::kBarQFull + qbuf), (tile_count / L::kQBufs) & 1);
    ++tile_count;
    // A warpgroup whose 64 rows are all padding only keeps the barrier
    // protocol going (small past buckets are common with small blocks). The
    // shuffle makes the flag visibly warp-uniform for ptxas, which then
    // keeps the wgmma under it unserialised.
    const bool active = __shfl_sync(0xffffffffu, wg * 64 < tk.rows ? 1 : 0, 0) != 0;
    int pos[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = cx.row_base + h * 8 + cx.g;
      pos[h] = r < tk.rows ? tk.first_pos + r : tk.last_pos;
    }
    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    const uint32_t desc_q = make_desc_lo(sh.base + qbuf * L::kQBytes + wg * 64 * 128, 16);

    int t0 = first_key_step(tk);
    if (t0 < 0) mbar_arrive(q_empty);  // no key step: Q is not read
    if (!kOverlap || !active) {
      while (t0 >= 0) {
        const int t_next = next_key_step<kMode, kKeys>(tk, t0, bs);
        const uint32_t k_empty = sh.bar(L::kBarKEmpty + stage);
        const uint32_t v_empty = sh.bar(L::kBarVEmpty + stage);
        mbar_wait(sh.bar(L::kBarKFull + stage), phase);
        if (pingpong) named_barrier_sync(my_turn);
        if (active) {
          float s[kKeys / 2];
          cx.issue_s(s, desc_q, stage);
          if (pingpong) named_barrier_arrive(other_turn);
          wgmma_wait_all();
          fence_operands(s);
          mbar_arrive(k_empty);
          if (t_next < 0) mbar_arrive(q_empty);
          cx.mask(s, tk, t0, pos);
          // Online softmax, the mma.sync kernel's (attention_common.cuh).
#pragma unroll
          for (int h = 0; h < 2; ++h)
            online_softmax_row<kNT, Ctx::kDT>(
                m[h], l[h], cx.scale_log2,
                [&](int nt, int j) -> float& { return s[4 * nt + 2 * h + j]; },
                [&](int dt, int j) -> float& { return o[4 * dt + 2 * h + j]; });
          uint32_t p[kKeys / 16][4];
          Ctx::pack_p(s, p);
          mbar_wait(sh.bar(L::kBarVFull + stage), phase);
          cx.issue_pv(o, p, stage);
          wgmma_wait_all();
          fence_operands(o);
          mbar_arrive(v_empty);
        } else {
          if (pingpong) named_barrier_arrive(other_turn);
          mbar_arrive(k_empty);
          if (t_next < 0) mbar_arrive(q_empty);
          // V's phase must complete before this arrival, else it could count
          // towards the phase that the producer still waits for.
          mbar_wait(sh.bar(L::kBarVFull + stage), phase);
          mbar_arrive(v_empty);
        }
        advance();
        t0 = t_next;
      }
    } else if (t0 >= 0) {
      // The softmax of one stage's scores without touching O (the overlap
      // rescales O later); returns the factor O has to be scaled by, the
      // same expression as in online_softmax_row.
      float alpha[2];
      const auto softmax = [&](float(&s)[kKeys / 2]) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float m_old = m[h];
          online_softmax_row<kNT, 0>(
              m[h], l[h], cx.scale_log2,
              [&](int nt, int j) -> float& { return s[4 * nt + 2 * h + j]; },
              [&](int, int) -> float& { return alpha[h]; });
          const float ref = m[h] == -INFINITY ? 0.0f : m[h] * cx.scale_log2;
          alpha[h] = fast_exp2(m_old * cx.scale_log2 - ref);
        }
      };
      const auto rescale_o = [&] {
#pragma unroll
        for (int dt = 0; dt < Ctx::kDT; ++dt)
#pragma unroll
          for (int e = 0; e < 4; ++e) o[4 * dt + e] *= alpha[e >> 1];
      };
      uint32_t p[kKeys / 16][4];
      // Stage 0: S only.
      {
        const int t_next = next_key_step<kMode, kKeys>(tk, t0, bs);
        mbar_wait(sh.bar(L::kBarKFull + stage), phase);
        if (pingpong) named_barrier_sync(my_turn);
        float s[kKeys / 2];
        cx.issue_s(s, desc_q, stage);
        if (pingpong) named_barrier_arrive(other_turn);
        wgmma_wait_all();
        fence_operands(s);
        mbar_arrive(sh.bar(L::kBarKEmpty + stage));
        if (t_next < 0) mbar_arrive(q_empty);
        cx.mask(s, tk, t0, pos);
        softmax(s);
        Ctx::pack_p(s, p);
        t0 = t_next;
      }
      int v_stage = stage;  // the stage whose V pairs with p
      uint32_t v_phase = phase;
      advance();
      // Stage n >= 1: S_n and P_{n-1} V_{n-1}.
      while (t0 >= 0) {
        const int t_next = next_key_step<kMode, kKeys>(tk, t0, bs);
        mbar_wait(sh.bar(L::kBarKFull + stage), phase);
        if (pingpong) named_barrier_sync(my_turn);
        float s[kKeys / 2];
        cx.issue_s(s, desc_q, stage);
        rescale_o();
        mbar_wait(sh.bar(L::kBarVFull + v_stage), v_phase);
        cx.issue_pv(o, p, v_stage);
        if (pingpong) named_barrier_arrive(other_turn);
        wgmma_wait<1>();
        fence_operands(s);
        mbar_arrive(sh.bar(L::kBarKEmpty + stage));
        if (t_next < 0) mbar_arrive(q_empty);
        cx.mask(s, tk, t0, pos);
        softmax(s);
        wgmma_wait<0>();
        fence_operands(o);
        fence_operands(p);  // P_{n-1} stays allocated until its product is done
        mbar_arrive(sh.bar(L::kBarVEmpty + v_stage));
        Ctx::pack_p(s, p);
        v_stage = stage;
        v_phase = phase;
        advance();
        t0 = t_next;
      }
      // The last stage's P V.
      rescale_o();
      mbar_wait(sh.bar(L::kBarVFull + v_stage), v_phase);
      cx.issue_pv(o, p, v_stage);
      wgmma_wait<0>();
      fence_operands(o);
      fence_operands(p);
      mbar_arrive(sh.bar(L::kBarVEmpty + v_stage));
    }
    if (!active) continue;
    cx.store(tk, pos, m, l, o, chunk_row0);
  }
  if (pingpong && wg == 0) named_barrier_sync(1);
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <class T, int D, AttnMode kMode, int kStages, bool kOverlap>
__global__ void __launch_bounds__(kSm90Threads, 1)
    attention_sm90_kernel(const AttnArgs a, int pingpong) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace sm90;  // NOLINT(google-build-using-namespace)
  using L = Sm90Layout<D, kStages>;
  extern __shared__ __align__(1024) uint8_t smem_sm90[];
  __shared__ __align__(8) uint64_t bars[kMaxBars];
  Sm90Shared sh;
  sh.base = (smem_u32(smem_sm90) + 1023u) & ~1023u;
  sh.bars = smem_u32(bars);
  if (threadIdx.x == 0) {
    for (int b = 0; b < L::kQBufs; ++b) {
      mbar_init(sh.bar(L::kBarQFull + b), kWarpgroupThreads);  // cp.async arrivals
      mbar_init(sh.bar(L::kBarQEmpty + b), kConsumerThreads);
    }
    for (int s = 0; s < kStages; ++s) {
      mbar_init(sh.bar(L::kBarKFull + s), kWarpgroupThreads);
      mbar_init(sh.bar(L::kBarVFull + s), kWarpgroupThreads);
      mbar_init(sh.bar(L::kBarKEmpty + s), kConsumerThreads);
      mbar_init(sh.bar(L::kBarVEmpty + s), kConsumerThreads);
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
  // at entry comes from __launch_bounds__(384, 1); ptxas allocates each role
  // within its setmaxnreg count). The warpgroup index goes through a shuffle
  // from lane 0 (CUTLASS's idiom) so that ptxas knows it is warp-uniform: the
  // roles' control flow and the wgmma descriptors then live in uniform
  // registers, not in per-thread ones moved over (R2UR) before every wgmma.
  const int warpgroup =
      __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / kWarpgroupThreads, 0);
  if (warpgroup == 0) {
    setmaxnreg_dec<kProducerRegs>();
    produce<T, D, kMode, kStages>(a, sh, tiles, chunk_row0);
  } else {
    setmaxnreg_inc<kConsumerRegs>();
    consume<T, D, kMode, kStages, kOverlap>(a, sh, tiles, chunk_row0, warpgroup - 1, pingpong != 0);
  }
#endif
}

// MOBA_CUDA_SM90_PINGPONG=0 turns the consumer ping-pong off (read once; for
// A/B measurements of its effect).
bool pingpong_enabled() {
  static const ProcessSwitch knob("MOBA_CUDA_SM90_PINGPONG");
  return knob.on(true);
}

std::atomic<int> g_sm90_stages_override{0};

// MOBA_CUDA_SM90_OVERLAP and its test override.
ProcessSwitch& overlap_switch() {
  static ProcessSwitch knob("MOBA_CUDA_SM90_OVERLAP");
  return knob;
}

// The K/V pipeline depth: 3 stages by default (at D 128 with one Q buffer),
// MOBA_CUDA_SM90_STAGES=2 the first version's 2 stages with two Q buffers
// (read once; for A/B measurements), set_sm90_stages_override for tests.
int sm90_stages() {
  static const int env_value = [] {
    const char* v = std::getenv("MOBA_CUDA_SM90_STAGES");
    return v != nullptr && std::strcmp(v, "2") == 0 ? 2 : kSm90DefaultStages;
  }();
  const int forced = g_sm90_stages_override.load(std::memory_order_relaxed);
  return forced != 0 ? forced : env_value;
}

// The consumers' intra-warpgroup overlap: on by default (H100: config P at
// 1M 1,656 -> 1,531 ms, dense switch at 128K 282 -> 268 ms),
// MOBA_CUDA_SM90_OVERLAP=0 turns it off (read once),
// set_sm90_overlap_override for tests.
bool sm90_overlap() {
  return overlap_switch().on(true);
}

template <class T, int D, AttnMode kMode, int kStages, bool kOverlap>
cudaError_t launch_sm90_variant(const AttnArgs& a, cudaStream_t stream) {
  constexpr int smem = Sm90Smem<D, kStages>::kAlloc;
  const auto kernel = attention_sm90_kernel<T, D, kMode, kStages, kOverlap>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  int64_t ctas = 0;
  if ((err = sm90_persistent_ctas<kMode>(a, ctas)) != cudaSuccess) return err;
  if (ctas == 0) return cudaSuccess;
  kernel<<<static_cast<unsigned>(ctas), kSm90Threads, smem, stream>>>(a,
                                                                      pingpong_enabled() ? 1 : 0);
  return cudaGetLastError();
}

template <class T, int D, AttnMode kMode>
cudaError_t launch_sm90_typed(const AttnArgs& a, cudaStream_t stream) {
  const bool overlap = sm90_overlap();
  if (sm90_stages() == 2)
    return overlap ? launch_sm90_variant<T, D, kMode, 2, true>(a, stream)
                   : launch_sm90_variant<T, D, kMode, 2, false>(a, stream);
  return overlap ? launch_sm90_variant<T, D, kMode, 3, true>(a, stream)
                 : launch_sm90_variant<T, D, kMode, 3, false>(a, stream);
}

// MOBA_CUDA_SM90 and its test override.
ProcessSwitch& sm90_switch() {
  static ProcessSwitch knob("MOBA_CUDA_SM90");
  return knob;
}

// Whether the sm_90a body of the kernels is what the current device loads:
// only that body declares the static shared barriers.
bool sm90_body_loaded() {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(
          &attr,
          attention_sm90_kernel<__nv_bfloat16, 128, AttnMode::dense, kSm90DefaultStages, false>) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attr.sharedSizeBytes >= kMaxBars * sizeof(uint64_t);
}

}  // namespace

bool sm90_attention_wanted(bool dense, int block_size) {
  return sm90_switch().on(dense || block_size >= kSm90MinBlockSize);
}

void set_sm90_attention_override(int allow) {
  sm90_switch().set_override(allow);
}

void set_sm90_stages_override(int stages) {
  g_sm90_stages_override.store(stages == 2 || stages == 3 ? stages : 0, std::memory_order_relaxed);
}

void set_sm90_overlap_override(int overlap) {
  overlap_switch().set_override(overlap);
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
  return with_elem_dim(elem, a.head_dim, [&]<class T, int D>(ElemDimTag<T, D>) {
    return with_attn_mode(mode, [&]<AttnMode kMode>(ModeTag<kMode>) {
      return launch_sm90_typed<T, D, kMode>(a, stream);
    });
  });
}

}  // namespace moba::backends::cuda::detail
