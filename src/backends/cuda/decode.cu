// MoBA decode and chunked prefill against a KV cache on the GPU
// (include/moba/kv_cache.hpp; docs/cuda_decode.md explains the design).
//
//   append    validate (1 CTA per sequence: cu_seqlens_new, capacity, pages;
//             advances seqlens) -> copy + block sums (1 CTA per (sequence,
//             touched block): fp32 sums in token order, as the CPU)
//   decode    validate (1 CTA per sequence: cu_seqlens_q, len_q <= seqlens,
//             pages; zeroes the per-call tables, NaN rows of invalid
//             sequences) -> route (1 CTA per routing row: scores against the
//             block means from the sums, exact radix top-k; the first row of
//             a kv group to choose a block appends it to a work list) ->
//             attend (1 CTA per (work item, key chunk): the block's chunk is
//             read once for every query row of the kv group that selected
//             it, through per-warp cp.async rings, S^T = K Q^T and
//             O^T += V^T P^T on the tensor cores (mma.m16n8k16) with the
//             online softmax on the fp32 accumulators, one partial per row;
//             the CTA writing a row's last partial merges the row by
//             log-sum-exp into out / lse)
//
// Nothing here synchronizes or reads device memory on the host (except
// kv_bytes_read, a benchmark utility). Grids come from host-known bounds
// (batch, capacity, total_q); work items past a sequence's real length exit
// at once. Values only the device knows are checked there: a violation
// leaves the sequence's cache untouched (append) or fills its rows with NaN
// (decode) / -1 (routing), never reading or writing out of bounds.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "backends/cuda/common.cuh"
#include "backends/cuda/decode.hpp"
#include "backends/cuda/host.cuh"
#include "core/routing.hpp"

namespace moba::backends::cuda {
namespace {

using detail::from_float;
using detail::to_float;
using detail::unpack2;
using detail::upper_index;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kThreads = 128;          // append and attend: 4 warps
constexpr int kValidateThreads = 512;  // decode validation: page-table scan of a long sequence
constexpr int kRouteThreads = 512;     // route: 16 warps score blocks kRouteBatch at a time
constexpr int kRouteBatch = 8;         // block sums in flight per routing warp
constexpr int kSmemScores = 8192;   // routing scores kept in shared memory up to this many blocks
constexpr int kDenseUnits = 64;     // key ranges per sequence when top_k covers every block
constexpr int64_t kMinChunk = 128;  // keys per split-K chunk, at least (unless forced)
// Split-K cost model (choose_split): a CTA's fixed cost (prologue, pipeline
// fill, epilogue) in bytes of K/V it could have streamed meanwhile.
constexpr double kCtaFixedBytes = 64 << 10;
constexpr int64_t kDefaultDecodeBytes = int64_t{256} << 20;  // partials + scores per launch

// The cache geometry the kernels read (core::Cache in device terms).
struct CacheArgs {
  void *k, *v;
  int64_t k_ps, k_rs, k_hs, v_ps, v_rs, v_hs;  // page, row, head strides (elements)
  const int32_t* table;                        // null: contiguous layout
  int64_t table_ss, table_ps;
  int page_size, num_pages, capacity;
  int page_shift;  // log2(page_size) when it is a power of two, else -1
  int32_t* seqlens;
  int64_t seqlens_stride;
  float* sums;
  int64_t sums_ss, sums_bs, sums_hs;
  int heads_kv, block_size;  // block_size capped at the capacity (same blocks below it)
  float inv_block;           // 1 / block_size, rounded as the CPU rounds it

  __device__ int64_t page_of(int seq, int token) const {
    return table != nullptr ? table[seq * table_ss + (token / page_size) * table_ps] : seq;
  }
  __device__ int64_t row(int64_t page_stride, int64_t row_stride, int seq, int token) const {
    if (table == nullptr)  // contiguous: one page of `capacity` rows per sequence
      return seq * page_stride + static_cast<int64_t>(token) * row_stride;
    return page_of(seq, token) * page_stride + static_cast<int64_t>(token % page_size) * row_stride;
  }
  __device__ float* sum(int seq, int block, int head) const {
    return sums + seq * sums_ss + block * sums_bs + head * sums_hs;
  }
};

// Whether the page-table entries of sequence `seq` for tokens [begin, end)
// are pages of the pool (all threads of the CTA; contiguous layout: true).
__device__ bool pages_valid(const CacheArgs& c, int seq, int64_t begin, int64_t end) {
  bool ok = true;
  if (c.table != nullptr && end > begin) {
    const int64_t first = begin / c.page_size, last = (end - 1) / c.page_size;
    // Unrolled: the loads are independent, so several are in flight (a 1M
    // sequence in pages of 256 is 4,096 entries).
#pragma unroll 8
    for (int64_t p = first + threadIdx.x; p <= last; p += blockDim.x) {
      const int32_t e = c.table[seq * c.table_ss + p * c.table_ps];
      ok &= e >= 0 && e < c.num_pages;
    }
  }
  return __syncthreads_and(ok) != 0;
}

// 8 elements (16 bytes) to fp32.
template <class T>
__device__ __forceinline__ void to_floats(const uint4& raw, float (&f)[8]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 p = unpack2<T>(w[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) {
  return a > b ? a : b;
}

__device__ __forceinline__ float nan_f() {
  return __int_as_float(0x7fc00000);
}

// ---------------------------------------------------------------- append

struct AppendArgs {
  CacheArgs c;
  const void *k_new, *v_new;
  int64_t kn_ts, kn_hs, vn_ts, vn_hs;
  const int32_t* cu;
  int64_t cu_stride;
  int batch, total, head_dim;
  int32_t* start;  // workspace [batch]: first new position, -1 = write nothing
};

// One CTA per sequence: checks its share of the append and, when it is
// valid, advances seqlens (the copy kernel reads the old length from start).
__global__ void __launch_bounds__(kThreads) append_validate_kernel(const AppendArgs a) {
  const int b = blockIdx.x;
  const int64_t first = a.cu[0], last = a.cu[a.batch * a.cu_stride];
  const int64_t c0 = a.cu[b * a.cu_stride], c1 = a.cu[(b + 1) * a.cu_stride];
  const int64_t len = a.c.seqlens[b * a.c.seqlens_stride];
  const int64_t added = c1 - c0;
  bool ok = first == 0 && last == a.total && 0 <= c0 && c0 <= c1 && c1 <= a.total && len >= 0 &&
            len <= a.c.capacity && added <= a.c.capacity - len;
  ok = pages_valid(a.c, b, ok ? len : 0, ok ? len + added : 0) && ok;
  if (threadIdx.x == 0) {
    a.start[b] = ok && added > 0 ? static_cast<int32_t>(len) : -1;
    if (ok && added > 0) a.c.seqlens[b * a.c.seqlens_stride] = static_cast<int32_t>(len + added);
  }
}

// One CTA per (touched block, sequence): copies the block's new rows and
// extends its fp32 sums in token order (the first token of a block starts
// it afresh), each thread owning 8 consecutive elements of a kv head.
template <class T>
__global__ void __launch_bounds__(kThreads) append_copy_kernel(const AppendArgs a) {
  const int b = blockIdx.y;
  const int start = a.start[b];
  if (start < 0) return;
  const int c0 = a.cu[b * a.cu_stride];
  const int added = a.cu[(b + 1) * a.cu_stride] - c0;
  const int bs = a.c.block_size;
  const int64_t block = start / bs + static_cast<int64_t>(blockIdx.x);
  const int64_t end = static_cast<int64_t>(start) + added;
  if (block * bs >= end) return;
  const int t0 = static_cast<int>(max64(start, block * bs));
  const int t1 = static_cast<int>(min64(end, (block + 1) * bs));
  const bool fresh = t0 % bs == 0;
  const int vecs = a.head_dim / 8;
  for (int e = threadIdx.x; e < a.c.heads_kv * vecs; e += blockDim.x) {
    const int h = e / vecs, x = (e % vecs) * 8;
    float* sum = a.c.sum(b, static_cast<int>(block), h) + x;
    float s[8] = {};
    if (!fresh) {
      const float4 lo = *reinterpret_cast<const float4*>(sum);
      const float4 hi = *reinterpret_cast<const float4*>(sum + 4);
      s[0] = lo.x, s[1] = lo.y, s[2] = lo.z, s[3] = lo.w;
      s[4] = hi.x, s[5] = hi.y, s[6] = hi.z, s[7] = hi.w;
    }
#pragma unroll 4
    for (int t = t0; t < t1; ++t) {
      const int64_t r = c0 + (t - start);
      const uint4 kr = *reinterpret_cast<const uint4*>(static_cast<const T*>(a.k_new) +
                                                       r * a.kn_ts + h * a.kn_hs + x);
      const uint4 vr = *reinterpret_cast<const uint4*>(static_cast<const T*>(a.v_new) +
                                                       r * a.vn_ts + h * a.vn_hs + x);
      *reinterpret_cast<uint4*>(static_cast<T*>(a.c.k) + a.c.row(a.c.k_ps, a.c.k_rs, b, t) +
                                h * a.c.k_hs + x) = kr;
      *reinterpret_cast<uint4*>(static_cast<T*>(a.c.v) + a.c.row(a.c.v_ps, a.c.v_rs, b, t) +
                                h * a.c.v_hs + x) = vr;
      float f[8];
      to_floats<T>(kr, f);
      const bool first = fresh && t == t0;
#pragma unroll
      for (int i = 0; i < 8; ++i) s[i] = first ? f[i] : s[i] + f[i];
    }
    *reinterpret_cast<float4*>(sum) = make_float4(s[0], s[1], s[2], s[3]);
    *reinterpret_cast<float4*>(sum + 4) = make_float4(s[4], s[5], s[6], s[7]);
  }
}

// ---------------------------------------------------------------- decode

// Per-call device state, written by the validate kernel (which also zeroes
// the per-call tables: no memset node, one launch fewer).
struct State {
  int32_t* q_begin;  // [batch + 1]: cu_seqlens_q, contiguous
  int32_t* len;      // [batch]: seqlens, or -1 for a sequence that breaks the contract
  int32_t* invalid;  // 1 when cu_seqlens_q breaks it (every row is then invalid)
  // Routed attention only (null otherwise):
  uint32_t* mark;  // [batch][Hkv][mark_words]: bit j set when some row of the group chose block j
  int2* items;     // [item_cap]: (sequence * Hkv + kv head, block), one per marked block
  int32_t* item_count;  // entries of `items`
  int32_t* done;        // [total_q][Hq]: partials written per row (the last writer merges)
  int mark_words, item_cap;
};

struct Geometry {
  int batch, total_q, heads_q, group;
  int unit;    // keys per routing block (block_size), or per dense key range
  int units;   // units of the capacity
  bool dense;  // top_k covers every block: no routing, every unit up to the row's own
  int width;   // selection slots per row (min(top_k, blocks))
  int split;   // key chunks per unit
  int chunk;   // keys per chunk
  int top_k;
  bool shared;
};

// The sequence of query token t, its first query row and its length, or
// false when the row must be poisoned.
struct RowSeq {
  int seq, q0, len_q, len, pos;
};
__device__ bool locate_row(const State& st, const Geometry& g, int t, RowSeq& r) {
  if (*st.invalid != 0) return false;
  r.seq = upper_index(st.q_begin, g.batch + 1, t);
  r.q0 = st.q_begin[r.seq];
  r.len_q = st.q_begin[r.seq + 1] - r.q0;
  r.len = st.len[r.seq];
  if (r.len < 0) return false;
  r.pos = r.len - r.len_q + (t - r.q0);
  return true;
}

// Partial slots of a row at position `pos`, numbered rank * split + chunk:
// every chunk of each selected past block, then the chunks of its own block
// that start at or before pos. Routing always selects min(top_k - 1, cur)
// past blocks (dense: all cur of them), so the count needs no selection.
__device__ __forceinline__ int row_slots(const Geometry& g, int pos) {
  const int cur = pos / g.unit;
  const int past = g.dense ? cur : min(g.top_k - 1, cur);
  return past * g.split + (pos - cur * g.unit) / g.chunk + 1;
}

struct ValidateArgs {
  CacheArgs c;
  const int32_t* cu;
  int64_t cu_stride;
  Geometry g;
  State st;
  // Decode only (out null otherwise): rows of invalid sequences are set to NaN here.
  uint16_t* out;
  int64_t o_ts, o_hs;
  float* lse;
  int64_t lse_hs, lse_ts;
  int head_dim;
  uint16_t nan_bits;  // NaN of the output dtype
};

// NaN into out rows [t0, t1) (every head) and their lse.
__device__ void poison_rows(const ValidateArgs& a, int64_t t0, int64_t t1) {
  const int64_t per_token = static_cast<int64_t>(a.g.heads_q) * a.head_dim;
  for (int64_t e = threadIdx.x; e < (t1 - t0) * per_token; e += blockDim.x) {
    const int64_t t = t0 + e / per_token, h = (e % per_token) / a.head_dim, x = e % a.head_dim;
    a.out[t * a.o_ts + h * a.o_hs + x] = a.nan_bits;
    if (a.lse != nullptr && x == 0) a.lse[h * a.lse_hs + t * a.lse_ts] = nan_f();
  }
}

// One CTA per sequence: 0 <= len_q <= seqlens <= capacity and the page-table
// entries of the cached tokens; CTA 0 also checks cu_seqlens_q as a whole
// (start 0, end at total_q, non-decreasing). Writes the per-sequence state,
// zeroes the sequence's routing marks and row counters, and poisons the
// out / lse rows of an invalid sequence (all rows when cu_seqlens_q is bad),
// so the attention kernel only ever handles valid rows.
__global__ void __launch_bounds__(kValidateThreads) decode_validate_kernel(const ValidateArgs a) {
  const int b = blockIdx.x;
  const Geometry& g = a.g;
  const int64_t q0 = a.cu[b * a.cu_stride], q1 = a.cu[(b + 1) * a.cu_stride];
  const int64_t len = a.c.seqlens[b * a.c.seqlens_stride];
  const bool bounded = 0 <= q0 && q0 <= q1 && q1 <= g.total_q;  // rows [q0, q1) exist
  bool ok = bounded && len >= 0 && len <= a.c.capacity && q1 - q0 <= len;
  ok = pages_valid(a.c, b, 0, ok && q1 > q0 ? len : 0) && ok;
  if (b == 0) {
    bool good = a.cu[0] == 0 && a.cu[g.batch * a.cu_stride] == g.total_q;
    for (int i = threadIdx.x; i < g.batch; i += blockDim.x)
      good &= a.cu[i * a.cu_stride] <= a.cu[(i + 1) * a.cu_stride];
    good = __syncthreads_and(good) != 0;
    if (threadIdx.x == 0) {
      *a.st.invalid = good ? 0 : 1;
      if (a.st.item_count != nullptr) *a.st.item_count = 0;
    }
    if (!good && a.out != nullptr) poison_rows(a, 0, g.total_q);
  }
  if (a.st.mark != nullptr) {
    const int64_t words = static_cast<int64_t>(a.c.heads_kv) * a.st.mark_words;
    uint32_t* mark = a.st.mark + b * words;
    for (int64_t i = threadIdx.x; i < words; i += blockDim.x) mark[i] = 0u;
  }
  if (bounded && a.st.done != nullptr)
    for (int64_t i = q0 * g.heads_q + threadIdx.x; i < q1 * g.heads_q; i += blockDim.x)
      a.st.done[i] = 0;
  if (bounded && !ok && a.out != nullptr) poison_rows(a, q0, q1);
  if (threadIdx.x != 0) return;
  if (b == 0) a.st.q_begin[0] = static_cast<int32_t>(q0);
  a.st.q_begin[b + 1] = static_cast<int32_t>(q1);
  a.st.len[b] = ok ? static_cast<int32_t>(len) : -1;
}

struct RouteArgs {
  CacheArgs c;
  const void* q;
  int64_t q_ts, q_hs;
  Geometry g;
  State st;
  int32_t* sel;  // [token][head][width]
  int64_t sel_ts, sel_hs;
  int width;      // of `sel`
  int row_begin;  // first routing row of this launch
  float* scores;  // [rows of a launch][units] when units > kSmemScores
};

// The spec's ranking as one unsigned key: higher score first, NaN lowest,
// -0 equal to +0 (ties go to the lower index, by the caller).
__device__ __forceinline__ uint32_t score_key(float s) {
  const uint32_t u = __float_as_uint(s + 0.0f);
  return (s != s) ? 0u : ((u & 0x80000000u) ? ~u : (u | 0x80000000u));
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Exclusive count of `flag` over the CTA's THREADS threads (in thread
// order); the CTA's total goes to *total. Uses `warps` (THREADS / 32 entries).
template <int THREADS>
__device__ int cta_exclusive_count(bool flag, int* warps, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) warps[warp] = __popc(ballot);
  __syncthreads();
  int before = __popc(ballot & ((1u << lane) - 1u)), sum = 0;
  for (int w = 0; w < THREADS / 32; ++w) {
    if (w < warp) before += warps[w];
    sum += warps[w];
  }
  __syncthreads();
  *total = sum;
  return before;
}

// One CTA (8 warps) per routing row: a query row (t, head), or with shared routing
// (t, kv head) for the whole group. Scores of the past blocks against their
// means (sum * (1 / block_size) rounded to the dtype, spec step 2), the
// top-(k-1) by an exact radix select on the ranking keys (ties to the lower
// block), written ascending with the current block last, -1 padded.
template <class T, int D>
__global__ void __launch_bounds__(kRouteThreads) route_kernel(const RouteArgs a) {
  __shared__ float smem_scores[kSmemScores];
  __shared__ unsigned hist[256];
  __shared__ int warp_counts[kRouteThreads / 32];
  __shared__ unsigned found_prefix;
  __shared__ int found_remaining;
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row = a.row_begin + static_cast<int>(blockIdx.x);
  const int heads = g.shared ? g.heads_q / g.group : g.heads_q;
  const int t = row / heads, hr = row % heads;
  const int kv = g.shared ? hr : hr / g.group;
  const int h_first = g.shared ? hr * g.group : hr, h_count = g.shared ? g.group : 1;
  auto sel_row = [&](int i) { return a.sel + t * a.sel_ts + (h_first + i) * a.sel_hs; };

  RowSeq r{};
  const bool ok = locate_row(a.st, g, t, r);
  const int cur = ok ? r.pos / a.c.block_size : 0;
  const int past = ok ? min(g.top_k - 1, cur) : 0;
  if (!ok || past + 1 > a.width) {  // invalid sequence, or no room for the selection
    for (int i = 0; i < h_count; ++i)
      for (int s = threadIdx.x; s < a.width; s += blockDim.x) sel_row(i)[s] = -1;
    return;
  }
  const int group_id = r.seq * a.c.heads_kv + kv;
  uint32_t* mark =
      a.st.mark == nullptr ? nullptr : a.st.mark + static_cast<int64_t>(group_id) * a.st.mark_words;
  // The first row of the kv group to choose a block appends it to the
  // attention work list (the set bit makes the others skip it), so the
  // attention grid covers chosen blocks only.
  auto emit = [&](int slot, int block) {
    for (int i = 0; i < h_count; ++i) sel_row(i)[slot] = block;
    if (mark == nullptr) return;
    const uint32_t bit = 1u << (block & 31);
    if ((atomicOr(mark + (block >> 5), bit) & bit) == 0u) {
      const int at = atomicAdd(a.st.item_count, 1);
      if (at < a.st.item_cap) a.st.items[at] = make_int2(group_id, block);
    }
  };
  for (int s = past + 1 + threadIdx.x; s < a.width; s += blockDim.x)
    for (int i = 0; i < h_count; ++i) sel_row(i)[s] = -1;
  if (threadIdx.x == 0) emit(past, cur);
  if (past == cur) {  // every past block fits
    for (int j = threadIdx.x; j < cur; j += blockDim.x) emit(j, j);
    return;
  }
  if (past == 0) return;

  float* scores =
      g.units <= kSmemScores ? smem_scores : a.scores + static_cast<int64_t>(blockIdx.x) * g.units;
  // Scores: warp w takes blocks w, w + W, ... (W warps) in batches of
  // kRouteBatch whose sums are all loaded before any is used (the loads are
  // independent: one memory latency per batch, not per block); lanes split
  // the head dim.
  constexpr int kPer = D / 32;
  constexpr int kWarps = kRouteThreads / 32;
  using Vec = std::conditional_t<kPer == 4, float4, float2>;
  for (int base = warp; base < cur; base += kWarps * kRouteBatch) {
    float mean[kRouteBatch][kPer];
#pragma unroll
    for (int u = 0; u < kRouteBatch; ++u) {
      const int j = min(base + u * kWarps, cur - 1);  // clamped: a valid address, result unused
      const Vec v = *reinterpret_cast<const Vec*>(a.c.sum(r.seq, j, kv) + lane * kPer);
      const float* f = reinterpret_cast<const float*>(&v);
#pragma unroll
      for (int x = 0; x < kPer; ++x)
        mean[u][x] = to_float<T>(from_float<T>(__fmul_rn(f[x], a.c.inv_block)));
    }
    float total[kRouteBatch] = {};
    for (int i = 0; i < h_count; ++i) {  // shared routing: the group's scores summed in head order
      const T* q = static_cast<const T*>(a.q) + t * a.q_ts + (h_first + i) * a.q_hs + lane * kPer;
      float qv[kPer];
#pragma unroll
      for (int x = 0; x < kPer; ++x) qv[x] = to_float<T>(q[x]);
#pragma unroll
      for (int u = 0; u < kRouteBatch; ++u) {
        float dot = 0.0f;
#pragma unroll
        for (int x = 0; x < kPer; ++x) dot = fmaf(qv[x], mean[u][x], dot);
        dot = warp_sum(dot);
        total[u] = i == 0 ? dot : total[u] + dot;
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int u = 0; u < kRouteBatch; ++u)
        if (base + u * kWarps < cur) scores[base + u * kWarps] = total[u];
    }
  }
  __syncthreads();

  // Radix select of the past-th largest key, 8 bits at a time.
  unsigned prefix = 0, mask = 0;
  int remaining = past;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int j = threadIdx.x; j < cur; j += blockDim.x) {
      const unsigned u = score_key(scores[j]);
      if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (warp == 0) {
      // Lane l owns buckets 255 - 8l down to 248 - 8l (descending keys).
      int local = 0;
#pragma unroll
      for (int e = 0; e < 8; ++e) local += static_cast<int>(hist[255 - 8 * lane - e]);
      int inclusive = local;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, inclusive, o);
        if (lane >= o) inclusive += y;
      }
      const int exclusive = inclusive - local;
      const unsigned here =
          __ballot_sync(0xffffffffu, exclusive < remaining && remaining <= inclusive);
      if (lane == __ffs(here) - 1) {
        int acc = exclusive;
        for (int e = 0; e < 8; ++e) {
          const unsigned bucket = 255u - 8u * lane - e;
          if (acc + static_cast<int>(hist[bucket]) >= remaining) {
            found_prefix = prefix | (bucket << shift);
            found_remaining = remaining - acc;
            break;
          }
          acc += static_cast<int>(hist[bucket]);
        }
      }
    }
    __syncthreads();
    prefix = found_prefix;
    remaining = found_remaining;
    mask |= 255u << shift;
    __syncthreads();
  }
  // Keys above the threshold, plus the first `remaining` equal to it (the
  // lower block indices), in ascending block order.
  int base_gt = 0, base_eq = 0;
  for (int j0 = 0; j0 < cur; j0 += blockDim.x) {
    const int j = j0 + static_cast<int>(threadIdx.x);
    const unsigned u = j < cur ? score_key(scores[j]) : 0u;
    const bool gt = j < cur && u > prefix, eq = j < cur && u == prefix;
    int n_gt = 0, n_eq = 0;
    const int before_gt = base_gt + cta_exclusive_count<kRouteThreads>(gt, warp_counts, &n_gt);
    const int before_eq = base_eq + cta_exclusive_count<kRouteThreads>(eq, warp_counts, &n_eq);
    if (gt || (eq && before_eq < remaining)) emit(before_gt + min(before_eq, remaining), j);
    base_gt += n_gt;
    base_eq += n_eq;
  }
}

struct AttendArgs {
  CacheArgs c;
  const void* q;
  int64_t q_ts, q_hs;
  Geometry g;
  State st;
  const int32_t* sel;  // [total_q][Hq][width] (routed)
  float scale_log2;    // softmax_scale * log2(e)
  int t_begin, t_end;  // query tokens of this launch
  float* part_o;       // [(t - t_begin) * Hq + head][slots][D], normalized
  float* part_lse;     // [(t - t_begin) * Hq + head][slots], log2 domain
  void* out;           // [total_q][Hq][D] (strides below), dtype T
  int64_t o_ts, o_hs;
  float* lse;  // [Hq][total_q] (strides below), optional
  int64_t lse_hs, lse_ts;
};

// The slot of block `j` in a row's selection (ascending, -1 padded), or -1.
// The entries are loaded kRankBatch at a time, all before any is used: one
// memory latency for a selection of up to kRankBatch blocks (config P's 12),
// where a binary search waits for log2(width) dependent loads.
constexpr int kRankBatch = 16;
__device__ __forceinline__ int find_rank(const int32_t* row, int width, int j) {
  for (int base = 0; base < width; base += kRankBatch) {
    int v[kRankBatch];
#pragma unroll
    for (int u = 0; u < kRankBatch; ++u) v[u] = base + u < width ? row[base + u] : -1;
    int below = 0;
    bool hit = false, beyond = false;
#pragma unroll
    for (int u = 0; u < kRankBatch; ++u) {
      below += v[u] >= 0 && v[u] < j ? 1 : 0;
      hit = hit || v[u] == j;
      beyond = beyond || v[u] < 0 || v[u] > j;
    }
    // Ascending: every entry of the earlier batches is below j.
    if (hit) return base + below;
    if (beyond) return -1;
  }
  return -1;
}

// The rank of unit j in the selection of row (t, head) at position pos, or
// -1 when the row does not read it.
__device__ __forceinline__ int rank_of(const AttendArgs& a, int t, int head, int pos, int j) {
  const int cur = pos / a.g.unit;
  if (j > cur) return -1;
  if (a.g.dense) return j;
  return find_rank(a.sel + (static_cast<int64_t>(t) * a.g.heads_q + head) * a.g.width, a.g.width,
                   j);
}

struct RowInfo {
  int t, head, pos, slot;
};

constexpr int kWarps = kThreads / 32;
constexpr int kMergeWarps = kWarps;
constexpr int kRows = 8;       // query rows per pass: the n of mma.m16n8k16
constexpr int kTileKeys = 16;  // keys per warp step: the m of mma.m16n8k16 (S^T = K Q^T)

// The log-sum-exp merge of one row's `count` partial slots into out / lse,
// by the whole CTA (the last CTA to write a partial of the row). Slots are
// read through L2 (__ldcg: other CTAs wrote them; their fences precede the
// counter increment this CTA observed). The loads are independent: the
// maximum first, then warp w sums slots w, w + 4, ... with fixed weights,
// and the warps' sums are added in shared memory, in a fixed order.
template <class T, int D>
__device__ void merge_row(const AttendArgs& a, int t, int head, int count, float* scratch) {
  constexpr int kPer = D / 32;
  using Vec = std::conditional_t<kPer == 4, float4, float2>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int slots = a.g.width * a.g.split;
  const int64_t row = static_cast<int64_t>(t - a.t_begin) * a.g.heads_q + head;
  const float* lse = a.part_lse + row * slots;
  const float* po = a.part_o + row * slots * D;
  float* max_s = scratch;                  // [kMergeWarps]
  float* l_s = scratch + kMergeWarps;      // [kMergeWarps]
  float* o_s = scratch + 2 * kMergeWarps;  // [kMergeWarps][D]
  float mx = -INFINITY;
  for (int s = threadIdx.x; s < count; s += blockDim.x) mx = fmaxf(mx, __ldcg(lse + s));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if (lane == 0) max_s[warp] = mx;
  __syncthreads();
  mx = max_s[0];
#pragma unroll
  for (int w = 1; w < kMergeWarps; ++w) mx = fmaxf(mx, max_s[w]);
  float l = 0.0f, o[kPer] = {};
#pragma unroll 4
  for (int s = warp; s < count; s += kMergeWarps) {
    const float w = detail::fast_exp2(__ldcg(lse + s) - mx);
    const Vec v = __ldcg(reinterpret_cast<const Vec*>(po + static_cast<int64_t>(s) * D) + lane);
    const float* f = reinterpret_cast<const float*>(&v);
    l += w;
#pragma unroll
    for (int x = 0; x < kPer; ++x) o[x] = fmaf(f[x], w, o[x]);
  }
#pragma unroll
  for (int x = 0; x < kPer; ++x) o_s[warp * D + lane * kPer + x] = o[x];
  if (lane == 0) l_s[warp] = l;
  __syncthreads();
  float total = l_s[0];
#pragma unroll
  for (int w = 1; w < kMergeWarps; ++w) total += l_s[w];
  T* out = static_cast<T*>(a.out) + t * a.o_ts + head * a.o_hs;
  for (int x = threadIdx.x; x < D; x += blockDim.x) {
    float sum = o_s[x];
#pragma unroll
    for (int w = 1; w < kMergeWarps; ++w) sum += o_s[w * D + x];
    out[x] = from_float<T>(sum / total);
  }
  if (a.lse != nullptr && threadIdx.x == 0)
    a.lse[head * a.lse_hs + t * a.lse_ts] = (mx + __log2f(total)) * kLn2;
  __syncthreads();  // scratch is reused by the next row
}

// Waits until at most N of this thread's cp.async groups are pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// The transpose of an 8x8 matrix of 16-bit elements held by the warp in the
// ldmatrix fragment layout (lane l: row l / 4, columns 2 (l % 4) and
// 2 (l % 4) + 1, the lower column in the lower half); the result is the
// transposed matrix in the same layout.
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// Shared memory of attend_kernel. Each warp owns a ring of attend_stages key
// tiles (16 keys of K, then the same 16 keys of V, rows of D elements with
// the 16-byte chunks XOR-swizzled by the row's low three bits, so that the
// 8 rows one ldmatrix phase reads sit in 8 different bank groups). After the
// key loop the same memory holds the warps' accumulators
// [kWarps][kRows][D + 4] (the 4 pads make the fragment stores conflict
// free), then the merge scratch.
template <int D>
__host__ __device__ constexpr int attend_stages() {
  return D == 128 ? 3 : 4;  // 96 KB (2 CTAs per SM) / 64 KB (3 CTAs per SM)
}
template <int D>
__host__ __device__ constexpr int attend_tile_bytes() {
  return kTileKeys * D * 2;
}
template <int D>
__host__ __device__ constexpr int attend_acc_stride() {
  return D + 4;
}
template <int D>
__host__ __device__ constexpr int attend_smem_bytes() {
  constexpr int ring = kWarps * attend_stages<D>() * 2 * attend_tile_bytes<D>();
  constexpr int acc = kWarps * kRows * attend_acc_stride<D>() * 4;
  return ring > acc ? ring : acc;
}
// CTAs per SM the shared memory allows; the register budget is held to it.
template <int D>
__host__ __device__ constexpr int attend_min_blocks() {
  return D == 128 ? 2 : 3;
}

// One CTA per work item x key chunk: keys [k0, k1) of one unit of one
// (sequence, kv head), read once for every query row of the kv group that
// needs them (in passes of kRows rows). Routed: the items are the work list
// the routing kernel built (chosen blocks only; CTAs past its length exit);
// dense: the grid is (units x split, Hkv, batch).
//
// Tensor cores: warp w takes the 16-key tiles w, w + 4, ... of the chunk. Per
// tile, S^T (16 keys x 8 rows) = K (16 x D) Q^T (D x 8), D / 16 mma.m16n8k16
// with K from ldmatrix and Q^T held in registers; the online softmax runs on
// the fp32 accumulator (lane (g, q) = (lane / 4, lane % 4) holds keys g and
// g + 8 of rows 2q and 2q + 1: a row's maximum over the tile is 3 shuffles
// across g); then O^T (D x 8) += V^T (D x 16) P^T (16 x 8), D / 16 mmas with
// V^T from ldmatrix.trans and P^T from the accumulator: rounded to T, the
// two 8x8 halves (keys 0-7, keys 8-15) are exactly the B fragments once
// transposed (movmatrix). Padding rows have zero queries and are masked.
//
// The keys are software-pipelined per warp: each lane copies its share of a
// tile (8 lanes per 128 bytes of a key row) with cp.async into the warp's
// ring attend_stages - 1 tiles ahead of the tile it computes, and looks the
// page table up one tile ahead of that;
// cp.async.wait_group and __syncwarp order the ring (no CTA barrier in the
// key loop). The first tiles of a chunk are requested before the rows are
// collected (every row that reads the chunk reads from k0 on), so the row
// search overlaps the first loads.
//
// The warps' partials (m, l, O) per row are merged in shared memory and
// written as the row's partial slot; the CTA that writes a row's last
// partial (a per-row counter) merges the row into out / lse (split-K
// without a separate merge launch).
template <class T, int D>
__global__ void __launch_bounds__(kThreads, attend_min_blocks<D>())
    attend_kernel(const AttendArgs a) {
  constexpr int kStages = attend_stages<D>();
  constexpr int kTileBytes = attend_tile_bytes<D>();
  constexpr int kStageBytes = 2 * kTileBytes;  // K tile, then V tile
  constexpr int kRowBytes = D * 2;
  constexpr int kSteps = D / 16;  // mma k-steps of S^T, m-tiles of O^T
  constexpr int kAcc = attend_acc_stride<D>();
  __shared__ RowInfo rows_s[kThreads];
  __shared__ int warp_counts[kWarps];
  __shared__ float m_s[kWarps][kRows], l_s[kWarps][kRows], w_s[kWarps][kRows];
  __shared__ float lse_s[kRows];
  __shared__ int last_s[kRows];  // slots of the pass's rows this CTA merges (0: not last)
  extern __shared__ uint4 attend_smem[];
  float* const acc_s = reinterpret_cast<float*>(attend_smem);
  static_assert(kStages >= 2, "the ring keeps at least one tile in flight");
  static_assert(2 * kMergeWarps + kMergeWarps * D <= attend_smem_bytes<D>() / 4,
                "merge scratch fits the ring");

  const Geometry& g = a.g;
  const int c = static_cast<int>(blockIdx.x % static_cast<unsigned>(g.split));
  int b, h, j;
  if (g.dense) {
    b = blockIdx.z;
    h = blockIdx.y;
    j = static_cast<int>(blockIdx.x / static_cast<unsigned>(g.split));
  } else {
    const int item = static_cast<int>(blockIdx.x / static_cast<unsigned>(g.split));
    if (item >= min(*a.st.item_count, a.st.item_cap)) return;
    const int2 e = a.st.items[item];
    b = e.x / a.c.heads_kv;
    h = e.x % a.c.heads_kv;
    j = e.y;
  }
  if (*a.st.invalid != 0) return;
  const int len = a.st.len[b];
  const int q0 = a.st.q_begin[b], q1 = a.st.q_begin[b + 1];
  const int ta = max(q0, a.t_begin), tb = min(q1, a.t_end);
  if (len <= 0 || ta >= tb) return;
  const int64_t unit_begin = static_cast<int64_t>(j) * g.unit;
  const int64_t k0_64 = unit_begin + static_cast<int64_t>(c) * g.chunk;
  if (static_cast<int64_t>(c) * g.chunk >= g.unit || k0_64 >= len) return;
  const int k0 = static_cast<int>(k0_64);
  const int k1 = static_cast<int>(min64(min64(k0_64 + g.chunk, unit_begin + g.unit), len));
  const int q_offset = len - (q1 - q0);
  const int slots = g.width * g.split;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2, quad = lane & 3;  // mma fragment coordinates

  // ---- the warp's key-tile ring
  // Lane l copies 16-byte chunks 8w + l % 8 (w < D / 64) of keys l / 8 + 4v
  // (v < 4) of a tile: 8 lanes cover 128 contiguous bytes of a key row, so
  // each copy instruction reads 4 whole 128-byte lines. In shared memory a
  // chunk goes to its row's chunk XOR (row % 8), which for these rows is
  // (l % 8) ^ (l / 8) ^ 4 (v % 2): two lane offsets, the rest immediates.
  const int copy_key = lane >> 3, copy_chunk = lane & 7;
  const uint32_t ring = detail::smem_u32(attend_smem) + warp * kStages * kStageBytes;
  const uint32_t copy_dst[2] = {
      ring + static_cast<uint32_t>(copy_key * kRowBytes + ((copy_chunk ^ copy_key) << 4)),
      ring + static_cast<uint32_t>(copy_key * kRowBytes + ((copy_chunk ^ copy_key ^ 4) << 4))};
  const T* const kbase = static_cast<const T*>(a.c.k) + h * a.c.k_hs + copy_chunk * 8;
  const T* const vbase = static_cast<const T*>(a.c.v) + h * a.c.v_hs + copy_chunk * 8;
  // The first key of this warp's i-th tile.
  auto tile_key = [&](int i) { return k0 + (warp + i * kWarps) * kTileKeys; };
  // The sources of this lane's 4 keys of tile i (kbase / vbase for keys at
  // or past bound, which are not read). A whole tile (all 16 keys before
  // bound) that is contiguous, or that starts on a multiple of 16 when pages
  // are multiples of 16 keys (units and chunks are, so every tile then is),
  // lies in one page: one page-table entry and one division, and the keys
  // are 4 row strides apart. Cut tiles and smaller pages look each key up.
  struct TileSrc {
    const T* k[4];
    const T* v[4];
  };
  const int64_t k_step = 4 * a.c.k_rs, v_step = 4 * a.c.v_rs;  // keys l / 8 + 4v: 4 rows apart
  const auto page_index = [&](int key) {
    return a.c.page_shift >= 0 ? key >> a.c.page_shift : key / a.c.page_size;
  };
  auto locate = [&](int i, int bound) {
    TileSrc r;
    const int first = tile_key(i);
    const bool whole = first + kTileKeys <= bound;
    if (whole && (a.c.table == nullptr ||
                  ((a.c.page_size & (kTileKeys - 1)) == 0 && (first & (kTileKeys - 1)) == 0))) {
      int64_t page = b, row = first + copy_key;  // contiguous: one page per sequence
      if (a.c.table != nullptr) {
        const int p = page_index(first);
        page = a.c.table[b * a.c.table_ss + p * a.c.table_ps];
        row -= static_cast<int64_t>(p) * a.c.page_size;
      }
      const int64_t ko = page * a.c.k_ps + row * a.c.k_rs, vo = page * a.c.v_ps + row * a.c.v_rs;
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        r.k[v] = kbase + ko + v * k_step;
        r.v[v] = vbase + vo + v * v_step;
      }
      return r;
    }
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int key = first + copy_key + 4 * v;
      r.k[v] = kbase;
      r.v[v] = vbase;
      if (key < bound) {
        int64_t page = b, row = key;
        if (a.c.table != nullptr) {
          const int p = page_index(key);
          page = a.c.table[b * a.c.table_ss + p * a.c.table_ps];
          row -= static_cast<int64_t>(p) * a.c.page_size;
        }
        r.k[v] = kbase + page * a.c.k_ps + row * a.c.k_rs;
        r.v[v] = vbase + page * a.c.v_ps + row * a.c.v_rs;
      }
    }
    return r;
  };
  // Copies this lane's share of tile i into `stage` and commits it as one
  // group (empty for a tile past bound, so group n is always tile n). Keys
  // at or past bound are zero-filled: a stale or uninitialised V row would
  // turn its zero probability into NaN.
  auto issue = [&](int stage, int i, const TileSrc& r, int bound) {
    const int first = tile_key(i);
    if (first < bound) {
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const bool full = first + copy_key + 4 * v < bound;
        const uint32_t dst = copy_dst[v & 1] + stage * kStageBytes + v * 4 * kRowBytes;
#pragma unroll
        for (int w = 0; w < D / 64; ++w) {
          detail::cp_async16(dst + w * 128, r.k[v] + 64 * w, full);
          detail::cp_async16(dst + kTileBytes + w * 128, r.v[v] + 64 * w, full);
        }
      }
    }
    detail::cp_async_commit();
  };
  // Tiles 0 .. kStages - 2 in flight, the rows of tile kStages - 1 located.
  TileSrc next_src;
  auto prime = [&](int bound) {
    TileSrc rows[kStages - 1];
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) rows[s] = locate(s, bound);
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) issue(s, s, rows[s], bound);
    next_src = locate(kStages - 1, bound);
  };
  prime(k1);  // before the rows are known: any row that reads the chunk reads from k0
  bool primed = true;

  // ldmatrix row addresses (the swizzle term is added per 16-column step):
  // K as the A operand (16 keys x 16 dims): matrices (keys 0-7 | 8-15) x
  // (dims 0-7 | 8-15) in the order a0..a3 = (0-7, 0-7), (8-15, 0-7),
  // (0-7, 8-15), (8-15, 8-15): lane l addresses key l % 16, column half l / 16.
  // V^T as the A operand (16 dims x 16 keys) through ldmatrix.trans of the
  // row-major V tile: a0..a3 = (keys 0-7, dims 0-7), (keys 0-7, dims 8-15),
  // (keys 8-15, dims 0-7), (keys 8-15, dims 8-15): lane l addresses key
  // l % 8 + 8 (l / 16), column half (l / 8) % 2.
  const int k_row = lane & 15, k_half = lane >> 4;
  const int v_row = (lane & 7) + ((lane >> 4) << 3), v_half = (lane >> 3) & 1;
  const int swz = lane & 7;  // == k_row & 7 == v_row & 7

  const int candidates = (tb - ta) * g.group;
  for (int c_base = 0; c_base < candidates; c_base += kThreads) {
    // Collect the rows of these candidates that read this chunk.
    RowInfo info{};
    bool need = false;
    const int ci = c_base + static_cast<int>(threadIdx.x);
    if (ci < candidates) {
      info.t = ta + ci / g.group;
      info.head = h * g.group + ci % g.group;
      info.pos = q_offset + (info.t - q0);
      if (info.pos >= k0) {
        const int rank = rank_of(a, info.t, info.head, info.pos, j);
        need = rank >= 0;
        info.slot = rank * g.split + c;
      }
    }
    int count = 0;
    const int at = cta_exclusive_count<kThreads>(need, warp_counts, &count);
    if (need) rows_s[at] = info;
    __syncthreads();

    for (int r0 = 0; r0 < count; r0 += kRows) {
      const int n = min(kRows, count - r0);
      int max_pos = 0;
      for (int i = 0; i < n; ++i) max_pos = max(max_pos, rows_s[r0 + i].pos);
      const int kend = min(k1, max_pos + 1);  // > k0: every row reaches k0
      if (!primed) prime(kend);
      primed = false;

      // Q^T as the B operand (16 dims x 8 rows) of k-step s: lane (g, q)
      // holds dims 16 s + 2q, +1 and 16 s + 8 + 2q, +1 of row g, i.e. words
      // 8 s + q and 8 s + 4 + q of the query row. Rows past n are zero.
      uint32_t qf[kSteps][2];
      if (gid < n) {
        const RowInfo& ri = rows_s[r0 + gid];
        const auto* qw = reinterpret_cast<const uint32_t*>(static_cast<const T*>(a.q) +
                                                           ri.t * a.q_ts + ri.head * a.q_hs);
#pragma unroll
        for (int s = 0; s < kSteps; ++s) {
          qf[s][0] = qw[8 * s + quad];
          qf[s][1] = qw[8 * s + 4 + quad];
        }
      } else {
#pragma unroll
        for (int s = 0; s < kSteps; ++s) qf[s][0] = qf[s][1] = 0u;
      }
      // The last key of each of this lane's rows 2q, 2q + 1 (-1: padding).
      int lim[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int r = 2 * quad + e;
        lim[e] = r < n ? min(rows_s[r0 + r].pos, kend - 1) : -1;
      }

      // O^T accumulators: o[s][e] is dim 16 s + g + 8 (e / 2) of row 2q + e % 2.
      float o[kSteps][4];
#pragma unroll
      for (int s = 0; s < kSteps; ++s) o[s][0] = o[s][1] = o[s][2] = o[s][3] = 0.0f;
      float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // base-2 scaled scores
      int stage = 0;
      for (int i = 0; tile_key(i) < kend; ++i) {
        // Tile i's group is complete when at most kStages - 2 are pending;
        // __syncwarp makes every lane's copies visible to the warp and
        // orders the last tile's reads before the refill of its stage.
        cp_async_wait<kStages - 2>();
        __syncwarp();
        issue(stage == 0 ? kStages - 1 : stage - 1, i + kStages - 1, next_src, kend);
        next_src = locate(i + kStages, kend);  // in flight during this tile's compute
        const uint32_t kt = ring + stage * kStageBytes, vt = kt + kTileBytes;
        stage = stage == kStages - 1 ? 0 : stage + 1;

        // S^T = K Q^T, two accumulators (even / odd k-steps) to halve the
        // dependent mma chain. s[e]: key g + 8 (e / 2), row 2q + e % 2.
        float sa[4] = {0.0f, 0.0f, 0.0f, 0.0f}, sb[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int s = 0; s < kSteps; ++s) {
          uint32_t kf[4];
          detail::ldmatrix_x4(kf, kt + k_row * kRowBytes + (((2 * s + k_half) ^ swz) << 4));
          detail::mma16816<T>((s & 1) != 0 ? sb : sa, kf, qf[s][0], qf[s][1]);
        }
        const int key = tile_key(i) + gid;
        float x[4];
#pragma unroll
        for (int e = 0; e < 4; ++e)
          x[e] = key + 8 * (e >> 1) <= lim[e & 1] ? (sa[e] + sb[e]) * a.scale_log2 : -INFINITY;
        // Online softmax per row over the tile: the row's 16 keys are spread
        // over the 8 lanes of equal q (lane bits 2-4).
        float alpha[2], ref[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float mx = fmaxf(x[e], x[e + 2]);
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
          const float m_new = fmaxf(m[e], mx);
          ref[e] = m_new == -INFINITY ? 0.0f : m_new;  // no -inf - -inf
          alpha[e] = detail::fast_exp2(m[e] - ref[e]);
          m[e] = m_new;
        }
        float p[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) p[e] = detail::fast_exp2(x[e] - ref[e & 1]);
        // l is this lane's share of the row sum (its two keys per tile); the
        // lanes' shares are added once after the loop.
        l[0] = fmaf(l[0], alpha[0], p[0] + p[2]);
        l[1] = fmaf(l[1], alpha[1], p[1] + p[3]);
#pragma unroll
        for (int s = 0; s < kSteps; ++s) {
          o[s][0] *= alpha[0];
          o[s][1] *= alpha[1];
          o[s][2] *= alpha[0];
          o[s][3] *= alpha[1];
        }
        // P^T as the B operand (16 keys x 8 rows): b0 holds keys 2q, 2q + 1
        // of row g, b1 keys 8 + 2q, +1. The accumulator holds the transpose
        // of that layout for each 8x8 half (key g, rows 2q, 2q + 1).
        const uint32_t pb0 = transpose8x8(detail::pack2<T>(p[0], p[1]));
        const uint32_t pb1 = transpose8x8(detail::pack2<T>(p[2], p[3]));
#pragma unroll
        for (int s = 0; s < kSteps; ++s) {
          uint32_t vf[4];
          detail::ldmatrix_x4_trans(vf, vt + v_row * kRowBytes + (((2 * s + v_half) ^ swz) << 4));
          detail::mma16816<T>(o[s], vf, pb0, pb1);
        }
      }
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        l[e] += __shfl_xor_sync(0xffffffffu, l[e], 4);
        l[e] += __shfl_xor_sync(0xffffffffu, l[e], 8);
        l[e] += __shfl_xor_sync(0xffffffffu, l[e], 16);
      }

      // Merge the warps' partials per row; write the normalized partial.
      // acc_s overlays the ring: every copy must have landed and every warp
      // finished its tiles.
      detail::cp_async_wait_all();
      __syncthreads();
      float* const acc_w = acc_s + warp * kRows * kAcc;
#pragma unroll
      for (int s = 0; s < kSteps; ++s)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          acc_w[(2 * quad + (e & 1)) * kAcc + 16 * s + gid + 8 * (e >> 1)] = o[s][e];
      if (gid == 0) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          m_s[warp][2 * quad + e] = m[e];
          l_s[warp][2 * quad + e] = l[e];
        }
      }
      __syncthreads();
      if (static_cast<int>(threadIdx.x) < n) {
        // Every row reads key k0 (warp 0's first tile): its maximum is finite.
        const int i = static_cast<int>(threadIdx.x);
        float mm = -INFINITY;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) mm = fmaxf(mm, m_s[w][i]);
        float wt[kWarps], ll = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          // A warp whose tiles are all past the row's position saw no key.
          wt[w] = m_s[w][i] == -INFINITY ? 0.0f : detail::fast_exp2(m_s[w][i] - mm);
          ll = fmaf(l_s[w][i], wt[w], ll);
        }
#pragma unroll
        for (int w = 0; w < kWarps; ++w) w_s[w][i] = wt[w] / ll;
        lse_s[i] = mm + __log2f(ll);
      }
      __syncthreads();
      for (int e = threadIdx.x; e < n * D; e += kThreads) {
        const int i = e / D, x = e % D;
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w)
          sum = fmaf(acc_s[(w * kRows + i) * kAcc + x], w_s[w][i], sum);
        const RowInfo& ri = rows_s[r0 + i];
        const int64_t at_row =
            (static_cast<int64_t>(ri.t - a.t_begin) * g.heads_q + ri.head) * slots + ri.slot;
        a.part_o[at_row * D + x] = sum;
        if (x == 0) a.part_lse[at_row] = lse_s[i];
      }
      // Count this CTA's partials; the one that completes a row merges it.
      __threadfence();
      __syncthreads();
      if (threadIdx.x < kRows) {
        int merge = 0;
        if (static_cast<int>(threadIdx.x) < n) {
          const RowInfo& ri = rows_s[r0 + threadIdx.x];
          const int expected = row_slots(g, ri.pos);
          const int64_t row = static_cast<int64_t>(ri.t) * g.heads_q + ri.head;
          if (atomicAdd(a.st.done + row, 1) == expected - 1) merge = expected;
        }
        last_s[threadIdx.x] = merge;
      }
      __syncthreads();
      for (int i = 0; i < n; ++i)
        if (last_s[i] > 0)  // CTA-uniform
          merge_row<T, D>(a, rows_s[r0 + i].t, rows_s[r0 + i].head, last_s[i], acc_s);
      __syncthreads();  // rows_s, acc_s and the ring are reused
    }
  }
  // No pass ran (no row of this launch reads the chunk): the speculative
  // copies must land before the CTA's shared memory is given up.
  detail::cp_async_wait_all();
}

struct BytesArgs {
  CacheArgs c;
  Geometry g;  // unit = block_size (dense or not)
  State st;
  const int32_t* sel;
  unsigned long long* keys;
};

// One warp per (block, kv head, sequence): keys the decode reads from the
// block, up to the last position of any row of the group that selected it
// (the CPU's count, so both backends report the same bytes).
__global__ void __launch_bounds__(32) bytes_kernel(const BytesArgs a) {
  const Geometry& g = a.g;
  const int b = blockIdx.z, h = blockIdx.y, j = blockIdx.x, lane = threadIdx.x;
  if (*a.st.invalid != 0) return;
  const int len = a.st.len[b];
  const int q0 = a.st.q_begin[b], q1 = a.st.q_begin[b + 1];
  if (len <= 0 || q1 == q0 || static_cast<int64_t>(j) * g.unit >= len) return;
  const int q_offset = len - (q1 - q0);
  int reach = 0;
  for (int ci = lane; ci < (q1 - q0) * g.group; ci += 32) {
    const int t = q0 + ci / g.group, head = h * g.group + ci % g.group;
    const int pos = q_offset + (t - q0), cur = pos / g.unit;
    if (j > cur) continue;
    const bool chosen =
        g.dense ||
        find_rank(a.sel + (static_cast<int64_t>(t) * g.heads_q + head) * g.width, g.width, j) >= 0;
    if (chosen)
      reach = max(reach,
                  static_cast<int>(min64(min64(pos + int64_t{1}, (j + int64_t{1}) * g.unit), len)));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) reach = max(reach, __shfl_xor_sync(0xffffffffu, reach, o));
  if (lane == 0 && reach > 0)
    atomicAdd(a.keys, static_cast<unsigned long long>(reach - j * g.unit));
}

// ---------------------------------------------------------------- host

using core::fail;
using detail::ElemDimTag;
using detail::ElemTag;
using detail::with_elem;
using detail::with_elem_dim;
using host::check;
using host::check_device_pointer;
using host::DeviceGuard;
using host::elem_of;
using host::env_bytes;
using host::Workspace;

int64_t decode_budget() {
  return env_bytes("MOBA_CUDA_DECODE_BYTES", kDefaultDecodeBytes);
}

void check_aligned(const void* data, std::initializer_list<int64_t> strides, int64_t elems,
                   int64_t elem_bytes, const char* name) {
  bool ok = reinterpret_cast<uintptr_t>(data) % static_cast<uintptr_t>(elems * elem_bytes) == 0;
  for (int64_t s : strides) ok = ok && s % elems == 0;
  if (!ok)
    fail(Status::unsupported,
         std::string(name) + ": the cuda backend needs every row to start on a " +
             std::to_string(elems * elem_bytes) + "-byte boundary (data pointer and strides " +
             "multiples of " + std::to_string(elems) + " elements)");
}

// What the CUDA kernels need beyond core::make_cache.
void check_cache(const core::Cache& c) {
  if (c.dtype != DType::float16 && c.dtype != DType::bfloat16)
    fail(Status::unsupported, std::string("cache.k: the cuda backend supports float16 and "
                                          "bfloat16 caches, got ") +
                                  dtype_name(c.dtype));
  if (c.head_dim != 64 && c.head_dim != 128)
    fail(Status::unsupported, "cache.k: the cuda backend supports head dims 64 and 128, got " +
                                  std::to_string(c.head_dim));
  if (c.capacity > INT32_MAX || c.num_pages > INT32_MAX)
    fail(Status::unsupported, "cache.k: capacity and page count must stay below 2^31");
  if (c.batch > 65535 || c.heads_kv > 65535)
    fail(Status::unsupported,
         "cache: the cuda backend supports at most 65535 sequences and "
         "65535 kv heads");
  check_aligned(c.k.data, {c.k.page_stride, c.k.row_stride, c.k.head_stride}, 8, 2, "cache.k");
  check_aligned(c.v.data, {c.v.page_stride, c.v.row_stride, c.v.head_stride}, 8, 2, "cache.v");
  check_aligned(c.sums, {c.sums_seq_stride, c.sums_block_stride, c.sums_head_stride}, 4, 4,
                "cache.block_sums");
  const int dev = c.device.index;
  check_device_pointer(c.k.data, "cache.k", dev);
  check_device_pointer(c.v.data, "cache.v", dev);
  check_device_pointer(c.page_table, "cache.page_table", dev);
  check_device_pointer(c.seqlens, "cache.seqlens", dev);
  check_device_pointer(c.sums, "cache.block_sums", dev);
}

CacheArgs cache_args(const core::Cache& c) {
  CacheArgs a{};
  a.k = c.k.data;
  a.v = c.v.data;
  a.k_ps = c.k.page_stride;
  a.k_rs = c.k.row_stride;
  a.k_hs = c.k.head_stride;
  a.v_ps = c.v.page_stride;
  a.v_rs = c.v.row_stride;
  a.v_hs = c.v.head_stride;
  a.table = c.paged ? c.page_table : nullptr;
  a.table_ss = c.table_seq_stride;
  a.table_ps = c.table_page_stride;
  a.page_size = static_cast<int>(std::min<int64_t>(c.page_size, INT32_MAX));
  a.page_shift = -1;
  for (int shift = 0; shift < 31; ++shift)
    if (a.page_size == 1 << shift) a.page_shift = shift;
  a.num_pages = static_cast<int>(c.num_pages);
  a.capacity = static_cast<int>(c.capacity);
  a.seqlens = c.seqlens;
  a.seqlens_stride = c.seqlens_stride;
  a.sums = c.sums;
  a.sums_ss = c.sums_seq_stride;
  a.sums_bs = c.sums_block_stride;
  a.sums_hs = c.sums_head_stride;
  a.heads_kv = static_cast<int>(c.heads_kv);
  // A block at least as long as the capacity is one block either way.
  a.block_size =
      static_cast<int>(std::min<int64_t>(c.block_size, std::max<int64_t>(c.capacity, 1)));
  a.inv_block = 1.0f / static_cast<float>(c.block_size);
  return a;
}

// The validated call on the device: host geometry, workspace, state.
struct Call {
  CacheArgs cache;
  Geometry g{};
  Workspace ws;
  int64_t q_begin_off = 0, len_off = 0, invalid_off = 0;
  // Routed attention: marks, the work list and the per-row merge counters.
  bool routed = false;
  int64_t mark_off = 0, count_off = 0, items_off = 0, done_off = 0;
  int mark_words = 0, item_cap = 0;
  cudaStream_t stream = nullptr;
  int head_dim = 0;

  State state() const {
    State s{};
    s.q_begin = ws.at<int32_t>(q_begin_off);
    s.len = ws.at<int32_t>(len_off);
    s.invalid = ws.at<int32_t>(invalid_off);
    if (routed) {
      s.mark = ws.at<uint32_t>(mark_off);
      s.items = ws.at<int2>(items_off);
      s.item_count = ws.at<int32_t>(count_off);
      s.mark_words = mark_words;
      s.item_cap = item_cap;
    }
    return s;
  }
};

// Host geometry and the validate kernel's share of the workspace; `unit`
// is the routing block (routing, bytes) or the attention unit (decode).
void plan(Call& call, const core::Cache& c, const core::Decode& d, bool attention) {
  const CacheArgs& ca = call.cache;
  call.head_dim = static_cast<int>(c.head_dim);
  Geometry& g = call.g;
  g.batch = static_cast<int>(c.batch);
  g.total_q = static_cast<int>(d.total_q);
  g.heads_q = static_cast<int>(d.heads_q);
  g.group = static_cast<int>(d.group);
  g.top_k = static_cast<int>(std::min<int64_t>(d.top_k, INT32_MAX));
  g.shared = d.gqa_shared_routing;
  const int64_t capacity = std::max<int64_t>(c.capacity, 1);
  const int64_t blocks = core::num_blocks(capacity, ca.block_size);
  g.dense = d.top_k >= blocks;
  g.unit = ca.block_size;
  if (g.dense && attention) {
    // Every block up to the row's own is read: causal attention, cut into
    // at most kDenseUnits ranges of whole 64-key steps.
    const int64_t per = (capacity + kDenseUnits - 1) / kDenseUnits;
    g.unit = static_cast<int>(std::min<int64_t>(capacity, (per + 63) / 64 * 64));
  }
  g.units = static_cast<int>(core::num_blocks(capacity, g.unit));
  g.width = g.dense ? g.units : static_cast<int>(std::min<int64_t>(d.top_k, blocks));
  g.split = 1;
  g.chunk = g.unit;
  call.q_begin_off = call.ws.reserve((c.batch + 1) * 4);
  call.len_off = call.ws.reserve(c.batch * 4);
  call.invalid_off = call.ws.reserve(4);
  call.routed = attention && !g.dense;
  if (call.routed) {
    // Work items: the distinct blocks each (sequence, kv group) chose, at
    // most min(units, its rows x width) per group (rows: query tokens x
    // heads that route separately).
    const int64_t routing_heads = d.gqa_shared_routing ? 1 : d.group;
    const int64_t cap = c.heads_kv * std::min<int64_t>(c.batch * int64_t{g.units},
                                                       d.total_q * routing_heads * g.width);
    if (cap > INT32_MAX) fail(Status::unsupported, "cache: too many attention work items");
    call.item_cap = static_cast<int>(cap);
    call.mark_words = (g.units + 31) / 32;
    call.mark_off = call.ws.reserve(c.batch * c.heads_kv * call.mark_words * 4);
    call.count_off = call.ws.reserve(4);
    call.items_off = call.ws.reserve(cap * 8);
  }
}

// The validate kernel; `out` (decode) gets NaN rows for invalid sequences.
void validate(Call& call, const core::Decode& d, const core::Rows* out = nullptr,
              const core::Lse* lse = nullptr, int32_t* done = nullptr) {
  ValidateArgs v{};
  v.c = call.cache;
  v.cu = d.cu_q;
  v.cu_stride = d.cu_q_stride;
  v.g = call.g;
  v.st = call.state();
  v.st.done = done;
  if (out != nullptr) {
    v.out = static_cast<uint16_t*>(out->data);
    v.o_ts = out->token_stride;
    v.o_hs = out->head_stride;
    v.lse = lse != nullptr ? lse->data : nullptr;
    v.lse_hs = lse != nullptr ? lse->head_stride : 0;
    v.lse_ts = lse != nullptr ? lse->token_stride : 0;
    v.head_dim = call.head_dim;
    v.nan_bits = out->dtype == DType::bfloat16 ? uint16_t{0x7fc0} : uint16_t{0x7e00};
  }
  decode_validate_kernel<<<call.g.batch, kValidateThreads, 0, call.stream>>>(v);
  check(cudaGetLastError(), "launch of the decode validation kernel");
}

// Routing rows [0, rows) in launches whose score buffers fit the budget.
void route(Call& call, const core::Cache& c, const core::Decode& d, int32_t* sel, int64_t sel_ts,
           int64_t sel_hs, int width, int64_t scores_off, int64_t launch_rows) {
  RouteArgs r{};
  r.c = call.cache;
  r.q = d.q.data;
  r.q_ts = d.q.token_stride;
  r.q_hs = d.q.head_stride;
  r.g = call.g;
  r.st = call.state();
  r.sel = sel;
  r.sel_ts = sel_ts;
  r.sel_hs = sel_hs;
  r.width = width;
  r.scores = call.g.units > kSmemScores ? call.ws.at<float>(scores_off) : nullptr;
  const int64_t rows = d.total_q * (d.gqa_shared_routing ? c.heads_kv : d.heads_q);
  for (int64_t r0 = 0; r0 < rows; r0 += launch_rows) {
    r.row_begin = static_cast<int>(r0);
    const auto grid = static_cast<unsigned>(std::min(launch_rows, rows - r0));
    with_elem_dim(elem_of(c.dtype), static_cast<int>(c.head_dim),
                  [&]<class T, int D>(ElemDimTag<T, D>) {
                    route_kernel<T, D><<<grid, kRouteThreads, 0, call.stream>>>(r);
                  });
    check(cudaGetLastError(), "launch of the decode routing kernel");
  }
}

// Reserves the routing score buffer (blocks beyond shared memory) and
// returns the rows per routing launch.
int64_t reserve_scores(Call& call, const core::Cache& c, const core::Decode& d,
                       int64_t* scores_off) {
  const int64_t rows = d.total_q * (d.gqa_shared_routing ? c.heads_kv : d.heads_q);
  int64_t launch_rows = std::min<int64_t>(std::max<int64_t>(rows, 1), INT32_MAX);
  if (call.g.units > kSmemScores) {
    launch_rows = std::clamp<int64_t>(decode_budget() / (call.g.units * 4), 1, launch_rows);
    *scores_off = call.ws.reserve(launch_rows * call.g.units * 4);
  }
  return launch_rows;
}

void check_queries(const core::Cache& c, const core::Decode& d) {
  check_cache(c);
  check_aligned(d.q.data, {d.q.token_stride, d.q.head_stride}, 8, 2, "q");
  check_device_pointer(d.q.data, "q", c.device.index);
  check_device_pointer(d.cu_q, "cu_seqlens_q", c.device.index);
  if (d.total_q * d.heads_q > INT32_MAX)
    fail(Status::unsupported, "q: the cuda backend supports total_q x Hq < 2^31");
}

using AttendKernel = void (*)(AttendArgs);

// What the host needs of an attention kernel on a device: queried once per
// (device, kernel) and kept, since every eager decode step would otherwise
// pay for cudaFuncSetAttribute and the occupancy query.
struct AttendFacts {
  int resident = 1;  // CTAs per SM (occupancy API with the kernel's shared memory)
  int sms = 1;
};

AttendFacts attend_facts(AttendKernel kernel, int smem, int device) {
  struct Known {
    int device;
    AttendKernel kernel;
    AttendFacts facts;
  };
  static std::mutex mutex;
  static std::vector<Known> known;
  const std::lock_guard<std::mutex> lock(mutex);
  for (const Known& k : known)
    if (k.device == device && k.kernel == kernel) return k.facts;
  // Static + dynamic shared memory exceeds the default 48 KB: opt in (not a
  // stream operation, so allowed during graph capture). The attribute stays
  // set for the device's context.
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
        "cudaFuncSetAttribute (decode attention shared memory)");
  AttendFacts f;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&f.resident, kernel, kThreads,
                                                      static_cast<size_t>(smem)),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  f.resident = std::max(f.resident, 1);
  f.sms = std::max(host::multiprocessors(device), 1);
  known.push_back({device, kernel, f});
  return f;
}

// Keys per split-K chunk when a unit of `unit` keys is cut into `split`
// chunks: a multiple of the 16-key tile (the last chunk may be shorter).
int64_t chunk_keys(int64_t unit, int64_t split) {
  const int64_t chunk = (unit + split - 1) / split;
  return std::min<int64_t>(unit, (chunk + kTileKeys - 1) / kTileKeys * kTileKeys);
}

// Split-K: chunks per unit for `items` work items of `unit` keys of
// `key_bytes` (K and V) each, by a cost model of the launch. The CTAs run in
// waves of `slots` = SMs x resident CTAs; a wave of n CTAs streaming c keys
// each takes F + n c / min(n, A) key-times, where a key-time is what one CTA
// needs for a key when it has the DRAM to itself (its cp.async ring is then
// the limit), A = SMs is the number of CTAs assumed to keep the DRAM busy
// (each keeps ~48-64 KB in flight; one per SM is several MB in all), and F
// the per-CTA fixed cost (kCtaFixedBytes: row search, pipeline fill, merge).
// So a wave of at least A CTAs is bandwidth-bound, a smaller one (a tail)
// is bound by its CTAs, and each wave adds F: the model prefers few waves
// with no thin tail, e.g. config P at batch 1 with shared routing (96 items,
// 132 SMs x 2) gets 2 chunks of 2,048 keys (one wave of 192 CTAs), at batch
// 8 (768 items) whole blocks (3 waves). MOBA_CUDA_DECODE_SPLIT forces the
// split (chunks of at least one tile), for tests and measurements.
int64_t choose_split(int64_t items, int64_t unit, int64_t key_bytes, const AttendFacts& f) {
  const int64_t forced = env_bytes("MOBA_CUDA_DECODE_SPLIT", 0);
  if (forced > 0) return std::min(forced, (unit + kTileKeys - 1) / kTileKeys);
  items = std::max<int64_t>(items, 1);
  const int64_t slots = int64_t{f.sms} * f.resident;
  const double saturating = f.sms;
  const double fixed = kCtaFixedBytes / static_cast<double>(key_bytes);
  // More than 8 waves' worth of CTAs only adds fixed costs.
  const int64_t max_split = std::clamp<int64_t>((unit + kMinChunk - 1) / kMinChunk, 1,
                                                std::max<int64_t>(1, 8 * slots / items));
  int64_t best = 1;
  double best_cost = 0.0;
  for (int64_t s = 1; s <= max_split; ++s) {
    const int64_t chunk = chunk_keys(unit, s);
    if ((unit + chunk - 1) / chunk != s) continue;  // the same chunks as a smaller split
    const int64_t ctas = items * s, full = ctas / slots, rest = ctas % slots;
    const auto wave = [&](int64_t n) {
      return fixed + static_cast<double>(n) * static_cast<double>(chunk) /
                         std::min(static_cast<double>(n), saturating);
    };
    const double cost = static_cast<double>(full) * wave(slots) + (rest > 0 ? wave(rest) : 0.0);
    if (s == 1 || cost < best_cost) {
      best = s;
      best_cost = cost;
    }
  }
  return best;
}

}  // namespace

void kv_append(const core::Cache& c, const core::Append& a, void* stream_handle) {
  check_cache(c);
  check_aligned(a.k.data, {a.k.token_stride, a.k.head_stride}, 8, 2, "k_new");
  check_aligned(a.v.data, {a.v.token_stride, a.v.head_stride}, 8, 2, "v_new");
  check_device_pointer(a.k.data, "k_new", c.device.index);
  check_device_pointer(a.v.data, "v_new", c.device.index);
  check_device_pointer(a.cu, "cu_seqlens_new", c.device.index);
  if (a.total > INT32_MAX) fail(Status::unsupported, "k_new: at most 2^31 - 1 rows");
  if (c.batch == 0) return;
  DeviceGuard guard(c.device.index);
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  Workspace ws;
  const int64_t start_off = ws.reserve(c.batch * 4);
  ws.allocate(stream);
  AppendArgs args{};
  args.c = cache_args(c);
  args.k_new = a.k.data;
  args.v_new = a.v.data;
  args.kn_ts = a.k.token_stride;
  args.kn_hs = a.k.head_stride;
  args.vn_ts = a.v.token_stride;
  args.vn_hs = a.v.head_stride;
  args.cu = a.cu;
  args.cu_stride = a.cu_stride;
  args.batch = static_cast<int>(c.batch);
  args.total = static_cast<int>(a.total);
  args.head_dim = static_cast<int>(c.head_dim);
  args.start = ws.at<int32_t>(start_off);
  append_validate_kernel<<<args.batch, kThreads, 0, stream>>>(args);
  check(cudaGetLastError(), "launch of the append validation kernel");
  if (a.total == 0) return;
  // A sequence's new rows touch at most ceil(rows / block) + 1 blocks.
  const int64_t touched = core::num_blocks(a.total, args.c.block_size) + 1;
  const dim3 grid(static_cast<unsigned>(touched), static_cast<unsigned>(c.batch));
  with_elem(elem_of(c.dtype), [&]<class T>(ElemTag<T>) {
    append_copy_kernel<T><<<grid, kThreads, 0, stream>>>(args);
  });
  check(cudaGetLastError(), "launch of the append kernel");
}

void kv_decode(const core::Cache& c, const core::Decode& d, const core::Rows& out,
               const core::Lse& lse, void* stream_handle) {
  check_queries(c, d);
  check_device_pointer(out.data, "out", c.device.index);
  check_device_pointer(lse.data, "lse", c.device.index);
  if (d.total_q == 0 || c.batch == 0) return;
  DeviceGuard guard(c.device.index);
  Call call;
  call.stream = static_cast<cudaStream_t>(stream_handle);
  call.cache = cache_args(c);
  plan(call, c, d, /*attention=*/true);
  Geometry& g = call.g;

  AttendKernel kernel = nullptr;
  int smem = 0;
  with_elem_dim(elem_of(c.dtype), static_cast<int>(c.head_dim),
                [&]<class T, int D>(ElemDimTag<T, D>) {
                  kernel = attend_kernel<T, D>;
                  smem = attend_smem_bytes<D>();
                });
  const AttendFacts facts = attend_facts(kernel, smem, c.device.index);

  // Items: the work-list bound (routed; exact for a decode step with shared
  // routing) or every unit (dense).
  const int64_t items = call.routed ? call.item_cap : c.batch * c.heads_kv * int64_t{g.units};
  const int64_t split = choose_split(items, g.unit, c.head_dim * 4, facts);
  const int64_t chunk = chunk_keys(g.unit, split);
  g.chunk = static_cast<int>(chunk);
  g.split = static_cast<int>((g.unit + chunk - 1) / chunk);
  const int64_t grid_x = (call.routed ? call.item_cap : int64_t{g.units}) * g.split;
  if (grid_x > INT32_MAX) fail(Status::unsupported, "cache: too many key chunks for one launch");

  // Workspace: selection for every row, merge counters for every row;
  // partials for a range of query tokens.
  int64_t sel_off = 0, scores_off = 0, launch_rows = 0;
  if (!g.dense) {
    sel_off = call.ws.reserve(d.total_q * d.heads_q * g.width * 4);
    launch_rows = reserve_scores(call, c, d, &scores_off);
  }
  const int64_t done_off = call.ws.reserve(d.total_q * d.heads_q * 4);
  const int64_t slots = int64_t{g.width} * g.split;
  const int64_t per_token = d.heads_q * slots * (c.head_dim + 1) * 4;
  const int64_t range = std::clamp<int64_t>(decode_budget() / per_token, 1, d.total_q);
  const int64_t part_o_off = call.ws.reserve(range * d.heads_q * slots * c.head_dim * 4);
  const int64_t part_lse_off = call.ws.reserve(range * d.heads_q * slots * 4);
  call.ws.allocate(call.stream);
  int32_t* done = call.ws.at<int32_t>(done_off);
  validate(call, d, &out, &lse, done);
  int32_t* sel = g.dense ? nullptr : call.ws.at<int32_t>(sel_off);
  if (!g.dense)
    route(call, c, d, sel, d.heads_q * g.width, g.width, g.width, scores_off, launch_rows);

  AttendArgs at{};
  at.c = call.cache;
  at.q = d.q.data;
  at.q_ts = d.q.token_stride;
  at.q_hs = d.q.head_stride;
  at.g = g;
  at.st = call.state();
  at.st.done = done;
  at.sel = sel;
  at.scale_log2 = d.softmax_scale * kLog2e;
  at.part_o = call.ws.at<float>(part_o_off);
  at.part_lse = call.ws.at<float>(part_lse_off);
  at.out = out.data;
  at.o_ts = out.token_stride;
  at.o_hs = out.head_stride;
  at.lse = lse.data;
  at.lse_hs = lse.head_stride;
  at.lse_ts = lse.token_stride;
  const dim3 grid = call.routed
                        ? dim3(static_cast<unsigned>(grid_x))
                        : dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(c.heads_kv),
                               static_cast<unsigned>(c.batch));
  for (int64_t t0 = 0; t0 < d.total_q; t0 += range) {
    at.t_begin = static_cast<int>(t0);
    at.t_end = static_cast<int>(std::min(d.total_q, t0 + range));
    kernel<<<grid, kThreads, static_cast<size_t>(smem), call.stream>>>(at);
    check(cudaGetLastError(), "launch of the decode attention kernel");
  }
}

void kv_routing(const core::Cache& c, const core::Decode& d, const Selection& selection,
                void* stream_handle) {
  check_queries(c, d);
  check_device_pointer(selection.data, "selected", c.device.index);
  if (selection.width > INT32_MAX) fail(Status::unsupported, "selected: width beyond 2^31 - 1");
  if (d.total_q == 0 || c.batch == 0 || selection.width == 0) return;
  DeviceGuard guard(c.device.index);
  Call call;
  call.stream = static_cast<cudaStream_t>(stream_handle);
  call.cache = cache_args(c);
  plan(call, c, d, /*attention=*/false);
  // Dense or not, the routing kernel writes every row (all blocks up to the
  // row's own when top_k covers them).
  int64_t scores_off = 0;
  const int64_t launch_rows = reserve_scores(call, c, d, &scores_off);
  call.ws.allocate(call.stream);
  validate(call, d);
  route(call, c, d, selection.data, selection.token_stride, selection.head_stride,
        static_cast<int>(selection.width), scores_off, launch_rows);
}

int64_t kv_bytes_read(const core::Cache& c, const core::Decode& d, void* stream_handle) {
  check_queries(c, d);
  if (d.total_q == 0 || c.batch == 0) return 0;
  DeviceGuard guard(c.device.index);
  Call call;
  call.stream = static_cast<cudaStream_t>(stream_handle);
  call.cache = cache_args(c);
  plan(call, c, d, /*attention=*/false);
  const Geometry& g = call.g;
  int64_t sel_off = 0, scores_off = 0, launch_rows = 0;
  if (!g.dense) {
    sel_off = call.ws.reserve(d.total_q * d.heads_q * g.width * 4);
    launch_rows = reserve_scores(call, c, d, &scores_off);
  }
  const int64_t keys_off = call.ws.reserve(8);
  call.ws.allocate(call.stream);
  validate(call, d);
  BytesArgs b{};
  b.c = call.cache;
  b.g = g;
  b.st = call.state();
  b.sel = g.dense ? nullptr : call.ws.at<int32_t>(sel_off);
  b.keys = call.ws.at<unsigned long long>(keys_off);
  if (!g.dense)
    route(call, c, d, call.ws.at<int32_t>(sel_off), d.heads_q * g.width, g.width, g.width,
          scores_off, launch_rows);
  check(cudaMemsetAsync(b.keys, 0, 8, call.stream), "cudaMemsetAsync");
  const dim3 grid(static_cast<unsigned>(g.units), static_cast<unsigned>(c.heads_kv),
                  static_cast<unsigned>(c.batch));
  bytes_kernel<<<grid, 32, 0, call.stream>>>(b);
  check(cudaGetLastError(), "launch of the bytes-read kernel");
  unsigned long long keys = 0;
  check(cudaMemcpyAsync(&keys, b.keys, 8, cudaMemcpyDeviceToHost, call.stream), "cudaMemcpyAsync");
  check(cudaStreamSynchronize(call.stream), "cudaStreamSynchronize");
  return static_cast<int64_t>(keys) * c.head_dim * dtype_size(c.dtype) * 2;
}

}  // namespace moba::backends::cuda
