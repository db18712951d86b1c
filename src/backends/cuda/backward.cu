// The CUDA backward of MoBA: dQ, dK, dV from dO, the saved output and the
// saved log-sum-exp. The routing is recomputed with the forward's own kernels
// (same plan, same chunks, same code), so every query attends to exactly the
// keys it attended to in the forward. docs/cuda_backward.md explains the
// design, the two modes and what is still missing.
//
// First version: the per-key work runs on the CUDA cores, one warp per
// (query row, head) or per (key, kv head), each lane owning D/32 columns;
// softmax probabilities are recomputed in fp32 from the saved lse.
#include <cuda_runtime.h>
#include <cub/device/device_segmented_sort.cuh>

#include <algorithm>
#include <cstdint>
#include <string>

#include "backends/backend.hpp"
#include "backends/cuda/host.cuh"
#include "backends/cuda/kernels.cuh"
#include "core/problem.hpp"

namespace moba::backends::cuda {
namespace {

using namespace host;  // NOLINT(google-build-using-namespace)
using detail::from_float;
using detail::to_float;
using detail::upper_index;

constexpr int kWarpsPerCta = 4;

// What every backward kernel reads. Row pointers are typed in the kernels.
struct BwdArgs {
  const void *q, *k, *v, *out, *dout;
  int64_t q_ts, q_hs, k_ts, k_hs, v_ts, v_hs, o_ts, o_hs, do_ts, do_hs;
  const float* lse;
  int64_t lse_hs, lse_ts;
  float* delta;  // [total_q][heads_q]
  SeqTable seq;
  int heads_q, heads_kv, group, block_size;
  int64_t total_q, total_k;
  float scale;
  bool dense;  // top_k >= blocks: keys 0..p; otherwise the current block up to p + past
  // Routed chunks: the selection of the chunk's rows ([rows][heads_q][past],
  // global block indices, -1 padded) and the sorted per-(kv head, block)
  // entry lists [seg_begin[bucket], seg_end[bucket]).
  const int32_t* sel;
  int past;
  int64_t blocks_bound;
  const int32_t* seg_begin;
  const int32_t* seg_end;
  const int32_t* entries;
  int tile_begin, tile_end;
  // Outputs: dq in the input dtype; fp32 accumulators [total_k][heads_kv][D].
  void* dq;
  int64_t dq_ts, dq_hs;
  float *dk_acc, *dv_acc;
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// The lane's E = D/32 consecutive columns of a row, in fp32.
template <class T, int E>
__device__ __forceinline__ void load_cols(float (&x)[E], const void* base, int64_t offset,
                                          int lane) {
  const T* p = static_cast<const T*>(base) + offset + lane * E;
#pragma unroll
  for (int e = 0; e < E; ++e) x[e] = to_float<T>(p[e]);
}

template <int E>
__device__ __forceinline__ float dot_cols(const float (&a)[E], const float (&b)[E]) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < E; ++e) s = fmaf(a[e], b[e], s);
  return warp_sum(s);
}

// delta[row][h] = rowsum(dO * O) in fp32 (equal to sum_m P_m dP_m).
template <class T, int D>
__global__ void __launch_bounds__(kWarpsPerCta * 32) delta_kernel(const BwdArgs a) {
  constexpr int E = D / 32;
  const int lane = threadIdx.x & 31;
  const int64_t n = a.total_q * a.heads_q;
  for (int64_t w = blockIdx.x * int64_t{kWarpsPerCta} + threadIdx.x / 32; w < n;
       w += int64_t{gridDim.x} * kWarpsPerCta) {
    const int64_t row = w / a.heads_q;
    const int h = static_cast<int>(w % a.heads_q);
    float o[E], d[E];
    load_cols<T, E>(o, a.out, row * a.o_ts + h * a.o_hs, lane);
    load_cols<T, E>(d, a.dout, row * a.do_ts + h * a.do_hs, lane);
    const float s = dot_cols<E>(o, d);
    if (lane == 0) a.delta[w] = s;
  }
}

// Where a query row sits: its sequence's key base, its position p and the
// first key of its current block (0 in dense mode: keys 0..p).
struct QueryPos {
  int seq, k_base, pos, first_key;
};
__device__ __forceinline__ QueryPos locate_query(const BwdArgs& a, int row) {
  QueryPos r;
  r.seq = upper_index(a.seq.q_begin, a.seq.batch + 1, row);
  const int len_q = a.seq.q_begin[r.seq + 1] - a.seq.q_begin[r.seq];
  const int len_k = a.seq.k_begin[r.seq + 1] - a.seq.k_begin[r.seq];
  r.k_base = a.seq.k_begin[r.seq];
  r.pos = len_k - len_q + (row - a.seq.q_begin[r.seq]);
  r.first_key = a.dense ? 0 : r.pos / a.block_size * a.block_size;
  return r;
}

// Query-major: one warp per (row, query head) of the chunk. Accumulates dq
// over the row's keys in a fixed order (past blocks in selection order, then
// the current block) and writes it once. With kAtomic (fast mode) it also
// adds the row's dK/dV contributions to the fp32 accumulators with atomics.
template <class T, int D, bool kAtomic>
__global__ void __launch_bounds__(kWarpsPerCta * 32) dq_kernel(const BwdArgs a) {
  constexpr int E = D / 32;
  __shared__ int rows[2];
  if (threadIdx.x == 0) detail::chunk_rows(a.seq, a.tile_begin, a.tile_end, &rows[0], &rows[1]);
  __syncthreads();
  const int row0 = rows[0], row1 = rows[1];
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t{row1 - row0} * a.heads_q;
  for (int64_t w = blockIdx.x * int64_t{kWarpsPerCta} + threadIdx.x / 32; w < n;
       w += int64_t{gridDim.x} * kWarpsPerCta) {
    const int row = row0 + static_cast<int>(w / a.heads_q);
    const int h = static_cast<int>(w % a.heads_q);
    const int kvh = h / a.group;
    const QueryPos qp = locate_query(a, row);
    float q[E], dout[E], dq[E];
    load_cols<T, E>(q, a.q, row * a.q_ts + h * a.q_hs, lane);
    load_cols<T, E>(dout, a.dout, row * a.do_ts + h * a.do_hs, lane);
#pragma unroll
    for (int e = 0; e < E; ++e) dq[e] = 0.f;
    const float lse = a.lse[h * a.lse_hs + int64_t{row} * a.lse_ts];
    const float delta = a.delta[int64_t{row} * a.heads_q + h];

    const auto key_range = [&](int k0, int k1) {  // keys [k0, k1) of the sequence
      for (int j = k0; j < k1; ++j) {
        const int64_t kr = qp.k_base + j;
        float kk[E], vv[E];
        load_cols<T, E>(kk, a.k, kr * a.k_ts + kvh * a.k_hs, lane);
        load_cols<T, E>(vv, a.v, kr * a.v_ts + kvh * a.v_hs, lane);
        const float p = expf(dot_cols<E>(q, kk) * a.scale - lse);
        const float ds = p * (dot_cols<E>(dout, vv) - delta) * a.scale;
#pragma unroll
        for (int e = 0; e < E; ++e) dq[e] = fmaf(ds, kk[e], dq[e]);
        if constexpr (kAtomic) {
          const int64_t acc = (kr * a.heads_kv + kvh) * D + lane * E;
#pragma unroll
          for (int e = 0; e < E; ++e) {
            atomicAdd(a.dk_acc + acc + e, ds * q[e]);
            atomicAdd(a.dv_acc + acc + e, p * dout[e]);
          }
        }
      }
    };
    if (a.sel != nullptr) {
      const int32_t* sel = a.sel + (int64_t{row - row0} * a.heads_q + h) * a.past;
      const int block0 = a.seq.block_begin[qp.seq];
      for (int s = 0; s < a.past; ++s) {
        const int gb = sel[s];
        if (gb < 0) continue;
        const int first = (gb - block0) * a.block_size;
        key_range(first, first + a.block_size);  // past blocks are always complete
      }
    }
    key_range(qp.first_key, qp.pos + 1);
    T* out = static_cast<T*>(a.dq) + int64_t{row} * a.dq_ts + h * a.dq_hs + lane * E;
#pragma unroll
    for (int e = 0; e < E; ++e) out[e] = from_float<T>(dq[e]);
  }
}

// Key-major (deterministic mode): one warp per (key, kv head). Adds, in a
// fixed order, the contributions of the chunk's rows that attend to the key:
// first the rows whose current block holds it (causally; dense mode: every
// later row), row by row and head by head, then the gathered entries of the
// rows that selected its block as a past block, in ascending entry order.
// Each warp owns its key's accumulators, so no atomics are needed.
template <class T, int D>
__global__ void __launch_bounds__(kWarpsPerCta * 32) dkv_kernel(const BwdArgs a) {
  constexpr int E = D / 32;
  __shared__ int rows[2];
  if (threadIdx.x == 0) detail::chunk_rows(a.seq, a.tile_begin, a.tile_end, &rows[0], &rows[1]);
  __syncthreads();
  const int row0 = rows[0], row1 = rows[1];
  if (row0 >= row1) return;
  const int lane = threadIdx.x & 31;
  const int keys_valid = a.seq.k_begin[a.seq.batch];
  const int64_t n = int64_t{keys_valid} * a.heads_kv;
  for (int64_t w = blockIdx.x * int64_t{kWarpsPerCta} + threadIdx.x / 32; w < n;
       w += int64_t{gridDim.x} * kWarpsPerCta) {
    const int kr = static_cast<int>(w / a.heads_kv);
    const int kvh = static_cast<int>(w % a.heads_kv);
    const int b = upper_index(a.seq.k_begin, a.seq.batch + 1, kr);
    const int len_q = a.seq.q_begin[b + 1] - a.seq.q_begin[b];
    const int len_k = a.seq.k_begin[b + 1] - a.seq.k_begin[b];
    const int j = kr - a.seq.k_begin[b];
    const int lb = j / a.block_size;
    float kk[E], vv[E], dk[E], dv[E];
    load_cols<T, E>(kk, a.k, int64_t{kr} * a.k_ts + kvh * a.k_hs, lane);
    load_cols<T, E>(vv, a.v, int64_t{kr} * a.v_ts + kvh * a.v_hs, lane);
    const int64_t acc = (int64_t{kr} * a.heads_kv + kvh) * D + lane * E;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      dk[e] = a.dk_acc[acc + e];
      dv[e] = a.dv_acc[acc + e];
    }
    const auto add_row = [&](int row, int h) {
      float q[E], dout[E];
      load_cols<T, E>(q, a.q, int64_t{row} * a.q_ts + h * a.q_hs, lane);
      load_cols<T, E>(dout, a.dout, int64_t{row} * a.do_ts + h * a.do_hs, lane);
      const float lse = a.lse[h * a.lse_hs + int64_t{row} * a.lse_ts];
      const float delta = a.delta[int64_t{row} * a.heads_q + h];
      const float p = expf(dot_cols<E>(q, kk) * a.scale - lse);
      const float ds = p * (dot_cols<E>(dout, vv) - delta) * a.scale;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        dk[e] = fmaf(ds, q[e], dk[e]);
        dv[e] = fmaf(p, dout[e], dv[e]);
      }
    };
    // Rows whose key set holds key j through the current block (or, dense,
    // through causality): positions j .. last, last = the block's last key.
    const int shift = len_k - len_q;  // query i sits at position shift + i
    const int last_pos = a.dense ? len_k - 1 : min((lb + 1) * a.block_size, len_k) - 1;
    const int r_first = max(row0, a.seq.q_begin[b] + max(0, j - shift));
    const int r_last = min(row1 - 1, a.seq.q_begin[b] + last_pos - shift);
    for (int row = r_first; row <= r_last; ++row)
      for (int g = 0; g < a.group; ++g) add_row(row, kvh * a.group + g);
    if (a.sel != nullptr) {
      const int64_t bucket = kvh * a.blocks_bound + a.seq.block_begin[b] + lb;
      const int e1 = a.seg_end[bucket];
      for (int e = a.seg_begin[bucket]; e < e1; ++e) {
        const int entry = a.entries[e];
        add_row(row0 + entry / (a.heads_q * a.past), (entry / a.past) % a.heads_q);
      }
    }
#pragma unroll
    for (int e = 0; e < E; ++e) {
      a.dk_acc[acc + e] = dk[e];
      a.dv_acc[acc + e] = dv[e];
    }
  }
}

// Start offsets of the filled entry lists: after the fill the cursor of a
// bucket points one past its last entry.
__global__ void segment_begin_kernel(const int32_t* counts, const int32_t* cursor, int32_t* begin,
                                     int64_t buckets) {
  for (int64_t b = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; b < buckets;
       b += int64_t{gridDim.x} * blockDim.x)
    begin[b] = cursor[b] - counts[b];
}

// fp32 accumulators (or zeros when acc is null) -> strided rows in the dtype.
template <class T>
__global__ void store_rows_kernel(const float* acc, void* dst, int64_t ts, int64_t hs,
                                  int64_t tokens, int heads, int head_dim) {
  const int64_t n = tokens * heads * head_dim;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t token = i / (int64_t{heads} * head_dim);
    const int h = static_cast<int>(i / head_dim % heads);
    const int d = static_cast<int>(i % head_dim);
    static_cast<T*>(dst)[token * ts + h * hs + d] = from_float<T>(acc ? acc[i] : 0.f);
  }
}

int grid_for(int64_t items, int per_cta) {
  const int64_t g = (items + per_cta - 1) / per_cta;
  return static_cast<int>(std::clamp<int64_t>(g, 1, 65535));
}

template <class T, int D>
void launch_kernels(const BwdArgs& a, int kind, int64_t units, cudaStream_t stream) {
  const int grid = grid_for(units, kWarpsPerCta);
  const int threads = kWarpsPerCta * 32;
  if (kind == 0) delta_kernel<T, D><<<grid, threads, 0, stream>>>(a);
  if (kind == 1) dq_kernel<T, D, false><<<grid, threads, 0, stream>>>(a);
  if (kind == 2) dq_kernel<T, D, true><<<grid, threads, 0, stream>>>(a);
  if (kind == 3) dkv_kernel<T, D><<<grid, threads, 0, stream>>>(a);
}

enum Kind { kDelta = 0, kDq = 1, kDqAtomic = 2, kDkv = 3 };

void launch(Elem elem, int head_dim, const BwdArgs& a, Kind kind, int64_t units,
            cudaStream_t stream, const char* what) {
  if (units <= 0) return;
  if (elem == Elem::bf16)
    head_dim == 64 ? launch_kernels<__nv_bfloat16, 64>(a, kind, units, stream)
                   : launch_kernels<__nv_bfloat16, 128>(a, kind, units, stream);
  else
    head_dim == 64 ? launch_kernels<__half, 64>(a, kind, units, stream)
                   : launch_kernels<__half, 128>(a, kind, units, stream);
  check(cudaGetLastError(), std::string("launch of the ") + what + " kernel");
}

void store_rows(Elem elem, const float* acc, const core::Rows& dst, int64_t tokens, int64_t heads,
                int64_t head_dim, cudaStream_t stream) {
  const int64_t n = tokens * heads * head_dim;
  if (n == 0) return;
  const int grid = grid_for(n, 256);
  if (elem == Elem::bf16)
    store_rows_kernel<__nv_bfloat16>
        <<<grid, 256, 0, stream>>>(acc, dst.data, dst.token_stride, dst.head_stride, tokens,
                                   static_cast<int>(heads), static_cast<int>(head_dim));
  else
    store_rows_kernel<__half>
        <<<grid, 256, 0, stream>>>(acc, dst.data, dst.token_stride, dst.head_stride, tokens,
                                   static_cast<int>(heads), static_cast<int>(head_dim));
  check(cudaGetLastError(), "launch of the gradient store kernel");
}

}  // namespace

void backward(const core::Problem& p, const core::Rows& out, const core::Rows& dout,
              const core::Lse& lse, const Gradients& grads, void* stream_handle,
              bool deterministic) {
  check_supported(p);
  check_device_pointer(out.data, "out", p.device.index);
  check_device_pointer(dout.data, "dout", p.device.index);
  check_device_pointer(lse.data, "lse", p.device.index);
  check_device_pointer(grads.dq.data, "dq", p.device.index);
  check_device_pointer(grads.dk.data, "dk", p.device.index);
  check_device_pointer(grads.dv.data, "dv", p.device.index);
  if (p.total_q + p.total_k == 0) return;
  DeviceGuard guard(p.device.index);
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  const Elem elem = elem_of(p.q.dtype);
  if (p.total_q == 0 || p.batch == 0) {
    // No query attends to anything: every key's gradient is zero.
    store_rows(elem, nullptr, grads.dk, p.total_k, p.heads_kv, p.head_dim, stream);
    store_rows(elem, nullptr, grads.dv, p.total_k, p.heads_kv, p.head_dim, stream);
    return;
  }
  const Plan plan = make_plan(p);
  const bool routed = !plan.dense && plan.past > 0;

  Workspace ws;
  const Tables tables = reserve_tables(ws, p.batch);
  const int64_t acc_elems = p.total_k * p.heads_kv * p.head_dim;
  const int64_t dk_off = ws.reserve(acc_elems * 4), dv_off = ws.reserve(acc_elems * 4);
  const int64_t delta_off = ws.reserve(p.total_q * p.heads_q * 4);
  int64_t kbar_off = 0, sel_off = 0, counts_off = 0, cursor_off = 0, begin_off = 0, entries_off = 0,
          sorted_off = 0, descs_off = 0, sort_tmp_off = 0;
  int64_t chunk_tiles = std::max<int64_t>(plan.tiles_bound, 1), entries_bound = 0;
  size_t sort_tmp_bytes = 0;
  const int64_t buckets = p.heads_kv * plan.blocks_bound;
  if (routed) {
    if (plan.ranks) kbar_off = ws.reserve(p.heads_kv * plan.blocks_bound * p.head_dim * 2);
    const int64_t per_tile_entries = int64_t{kTileRows} * p.heads_q * plan.past;
    if (per_tile_entries > INT32_MAX / 2)
      fail(Status::unsupported,
           "cuda backend: heads_q x (top_k - 1) is too large for one row tile");
    // Selection + entries + sorted entries + descriptor share, per entry; the
    // same budget (and override) as the forward's chunks.
    const int64_t per_entry_bytes = 4 + 4 + 4 + 16;
    chunk_tiles = partial_budget() / (per_tile_entries * per_entry_bytes);
    chunk_tiles = std::clamp<int64_t>(chunk_tiles, 1, std::max<int64_t>(plan.tiles_bound, 1));
    chunk_tiles = std::min<int64_t>(chunk_tiles, (INT32_MAX / 2) / per_tile_entries);
    entries_bound = chunk_tiles * per_tile_entries;
    sel_off = ws.reserve(entries_bound * 4);
    if (deterministic) {
      const int64_t descs_bound = entries_bound / kTileRows + buckets;
      counts_off = ws.reserve(buckets * 4);
      cursor_off = ws.reserve(buckets * 4);
      begin_off = ws.reserve(buckets * 4);
      entries_off = ws.reserve(entries_bound * 4);
      sorted_off = ws.reserve(entries_bound * 4);
      descs_off = ws.reserve(descs_bound * 16);
      check(cub::DeviceSegmentedSort::SortKeys(
                nullptr, sort_tmp_bytes, static_cast<const int32_t*>(nullptr),
                static_cast<int32_t*>(nullptr), entries_bound, buckets,
                static_cast<const int32_t*>(nullptr), static_cast<const int32_t*>(nullptr), stream),
            "cub::DeviceSegmentedSort::SortKeys (size query)");
      sort_tmp_off = ws.reserve(static_cast<int64_t>(sort_tmp_bytes));
    }
  }
  ws.allocate(stream);
  const SeqTable st = seq_table(ws, tables, p.batch);
  prepare(p, plan, ws, tables, stream);

  BwdArgs a{};
  a.q = p.q.data;
  a.k = p.k.data;
  a.v = p.v.data;
  a.out = out.data;
  a.dout = dout.data;
  a.q_ts = p.q.token_stride;
  a.q_hs = p.q.head_stride;
  a.k_ts = p.k.token_stride;
  a.k_hs = p.k.head_stride;
  a.v_ts = p.v.token_stride;
  a.v_hs = p.v.head_stride;
  a.o_ts = out.token_stride;
  a.o_hs = out.head_stride;
  a.do_ts = dout.token_stride;
  a.do_hs = dout.head_stride;
  a.lse = lse.data;
  a.lse_hs = lse.head_stride;
  a.lse_ts = lse.token_stride;
  a.delta = ws.at<float>(delta_off);
  a.seq = st;
  a.heads_q = static_cast<int>(p.heads_q);
  a.heads_kv = static_cast<int>(p.heads_kv);
  a.group = static_cast<int>(p.group);
  a.block_size = plan.block;
  a.total_q = p.total_q;
  a.total_k = p.total_k;
  a.scale = p.softmax_scale;
  a.dense = plan.dense;
  a.past = plan.past;
  a.blocks_bound = plan.blocks_bound;
  a.dq = grads.dq.data;
  a.dq_ts = grads.dq.token_stride;
  a.dq_hs = grads.dq.head_stride;
  a.dk_acc = ws.at<float>(dk_off);
  a.dv_acc = ws.at<float>(dv_off);
  check(cudaMemsetAsync(a.dk_acc, 0, static_cast<size_t>(acc_elems) * 4, stream),
        "cudaMemsetAsync");
  check(cudaMemsetAsync(a.dv_acc, 0, static_cast<size_t>(acc_elems) * 4, stream),
        "cudaMemsetAsync");
  const int hd = static_cast<int>(p.head_dim);
  launch(elem, hd, a, kDelta, p.total_q * p.heads_q, stream, "delta");

  // One pass per chunk of row tiles: dq of the chunk's rows, and the chunk's
  // dK/dV contributions added to the accumulators (chunks in order).
  const auto run_chunk = [&](int64_t t0, int64_t t1) {
    a.tile_begin = static_cast<int>(t0);
    a.tile_end = static_cast<int>(t1);
    const int64_t rows_bound = std::min(p.total_q, (t1 - t0) * kTileRows);
    if (deterministic) {
      launch(elem, hd, a, kDq, rows_bound * p.heads_q, stream, "dq");
      launch(elem, hd, a, kDkv, p.total_k * p.heads_kv, stream, "dk/dv");
    } else {
      launch(elem, hd, a, kDqAtomic, rows_bound * p.heads_q, stream, "dq/dk/dv");
    }
  };
  if (!routed) {
    run_chunk(0, plan.tiles_bound);
  } else {
    void* kbar = plan.ranks ? ws.at<void>(kbar_off) : nullptr;
    if (plan.ranks) block_means(p, plan, st, kbar, stream);
    detail::RouteArgs route = route_args(p, plan, st, kbar);
    route.sel = ws.at<int32_t>(sel_off);
    route.sel_token_stride = p.heads_q * plan.past;
    route.sel_head_stride = plan.past;
    route.width = plan.past;
    route.user_layout = false;
    a.sel = route.sel;
    detail::InvertArgs inv{};
    if (deterministic) {
      inv.sel = route.sel;
      inv.entries_bound = entries_bound;
      inv.seq = st;
      inv.heads_q = static_cast<int>(p.heads_q);
      inv.group = static_cast<int>(p.group);
      inv.past = plan.past;
      inv.blocks_bound = plan.blocks_bound;
      inv.counts = ws.at<int32_t>(counts_off);
      inv.cursor = ws.at<int32_t>(cursor_off);
      inv.buckets = buckets;
      inv.descs = ws.at<int4>(descs_off);
      inv.num_descs = ws.at<int32_t>(tables.num_descs);
      inv.entries = ws.at<int32_t>(entries_off);
      a.seg_begin = ws.at<int32_t>(begin_off);
      a.seg_end = inv.cursor;
      a.entries = ws.at<int32_t>(sorted_off);
    }
    for (int64_t t0 = 0; t0 < plan.tiles_bound; t0 += chunk_tiles) {
      const int64_t t1 = std::min(plan.tiles_bound, t0 + chunk_tiles);
      route.tile_begin = inv.tile_begin = static_cast<int>(t0);
      route.tile_end = inv.tile_end = static_cast<int>(t1);
      check(detail::launch_route(elem, route, stream), "launch of the routing kernel");
      if (deterministic) {
        // The forward's inversion fills the lists with atomics (any order);
        // sorting each list makes the dK/dV summation order fixed.
        check(cudaMemsetAsync(inv.counts, 0, static_cast<size_t>(buckets) * 4, stream),
              "cudaMemsetAsync");
        check(detail::launch_invert(inv, stream), "launch of the selection-inversion kernels");
        segment_begin_kernel<<<grid_for(buckets, 256), 256, 0, stream>>>(
            inv.counts, inv.cursor, ws.at<int32_t>(begin_off), buckets);
        check(cudaGetLastError(), "launch of the segment kernel");
        size_t tmp = sort_tmp_bytes;
        check(cub::DeviceSegmentedSort::SortKeys(ws.at<void>(sort_tmp_off), tmp, inv.entries,
                                                 ws.at<int32_t>(sorted_off), entries_bound, buckets,
                                                 a.seg_begin, a.seg_end, stream),
              "cub::DeviceSegmentedSort::SortKeys");
      }
      run_chunk(t0, t1);
    }
  }
  store_rows(elem, a.dk_acc, grads.dk, p.total_k, p.heads_kv, p.head_dim, stream);
  store_rows(elem, a.dv_acc, grads.dv, p.total_k, p.heads_kv, p.head_dim, stream);
  // Invalid device cu_seqlens: the tables were zeroed, nothing was computed;
  // say so with NaN gradients, as the forward does with its outputs.
  const auto poison = [&](const core::Rows& r, int64_t tokens, int64_t heads) {
    check(detail::launch_poison_outputs(st.invalid, r.data, r.token_stride, r.head_stride, tokens,
                                        static_cast<int>(heads), hd, nullptr, 0, 0, stream),
          "launch of the invalid-input kernel");
  };
  poison(grads.dq, p.total_q, p.heads_q);
  poison(grads.dk, p.total_k, p.heads_kv);
  poison(grads.dv, p.total_k, p.heads_kv);
}

}  // namespace moba::backends::cuda
