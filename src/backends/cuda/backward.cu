// The CUDA backward of MoBA: dQ, dK, dV from dO, the saved output and the
// saved log-sum-exp. The routing is recomputed with the forward's own kernels
// (same plan, same chunks, same code), so every query attends to exactly the
// keys it attended to in the forward. The products run on the tensor cores
// (backward_mma.cu; on Hopper backward_sm90.cu and backward_dq_sm90.cu);
// docs/cuda_backward.md explains the design and the two modes.
#include <cuda_runtime.h>
#include <cub/device/device_segmented_sort.cuh>

#include <algorithm>
#include <cstdint>
#include <string>

#include "backends/backend.hpp"
#include "backends/cuda/backward.cuh"
#include "backends/cuda/host.cuh"
#include "backends/cuda/kernels.cuh"
#include "backends/cuda/sm90_backward_switch.cuh"
#include "core/problem.hpp"
#include "core/routing.hpp"

namespace moba::backends::cuda {
namespace {

using namespace host;  // NOLINT(google-build-using-namespace)
using detail::BwdArgs;
using detail::ElemTag;
using detail::from_float;

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

void store_rows(Elem elem, const float* acc, const core::Rows& dst, int64_t tokens, int64_t heads,
                int64_t head_dim, cudaStream_t stream) {
  const int64_t n = tokens * heads * head_dim;
  if (n == 0) return;
  const int grid = grid_for(n, 256);
  with_elem(elem, [&]<class T>(ElemTag<T>) {
    store_rows_kernel<T><<<grid, 256, 0, stream>>>(acc, dst.data, dst.token_stride, dst.head_stride,
                                                   tokens, static_cast<int>(heads),
                                                   static_cast<int>(head_dim));
  });
  check(cudaGetLastError(), "launch of the gradient store kernel");
}

}  // namespace

void backward(const core::Problem& p, const core::Rows& out, const core::Rows& dout,
              const core::Lse& lse, const Gradients& grads, void* stream_handle,
              bool deterministic) {
  check_supported(p);
  check_rows_aligned(grads.dq, "dq", 4);
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
  Plan plan = make_plan(p);
  // The key-major dK/dV kernel: the Hopper one (128-key tiles) where it is
  // wanted and this binary and device can run it, else the mma.sync one
  // (64-key tiles); sm90_backward_switch.cuh.
  const bool sm90_dkv =
      detail::bwd_sm90_wanted(plan.dense, plan.block) && detail::bwd_sm90_supported();
  const int key_tile = sm90_dkv ? detail::kBwdSm90KeyTile : detail::kBwdKeyTile;
  // The fast mode fuses dq into the Hopper dK/dV kernel (atomics into fp32
  // sums per chunk) unless MOBA_CUDA_SM90_BWD_FUSED_DQ=0; otherwise the
  // query-major dq passes run, on the Hopper kernel under the same switch
  // unless MOBA_CUDA_SM90_BWD_DQ=0 keeps them on mma.sync.
  const bool fused_dq = sm90_dkv && !deterministic && detail::bwd_sm90_fused_dq_enabled();
  const bool sm90_dq = sm90_dkv && detail::bwd_sm90_dq_enabled();
  if (plan.dense) {
    // Causal attention ignores the blocks; the key-major kernel then walks
    // key tiles, so the tables are built for blocks of that size.
    plan.block = key_tile;
    plan.blocks_max = core::num_blocks(p.max_seqlen_k, plan.block);
    plan.blocks_bound = std::min(p.total_k, p.batch * plan.blocks_max);
  }
  const bool routed = !plan.dense && plan.past > 0;

  Workspace ws;
  const Tables tables = reserve_tables(ws, p.batch);
  const int64_t acc_elems = p.total_k * p.heads_kv * p.head_dim;
  const int64_t dk_off = ws.reserve(acc_elems * 4), dv_off = ws.reserve(acc_elems * 4);
  const int64_t delta_off = ws.reserve(p.total_q * p.heads_q * 4);
  Chunks chunks;
  int64_t begin_off = 0, sorted_off = 0, sort_tmp_off = 0, part_off = 0, dq_acc_off = 0;
  int64_t dq_tiles = 0;  // row tiles per chunk of the dq passes
  size_t sort_tmp_bytes = 0;
  // Fused dq: the fp32 sums of a chunk's rows, 4 D bytes per (row, head);
  // a row tile's share per entry where entries are routed.
  const int64_t dq_acc_tile_bytes = int64_t{kTileRows} * p.heads_q * p.head_dim * 4;
  // Row tiles per chunk of the fused pass; (row, head) indices of a chunk
  // stay below 2^31 (KvRow::dq).
  int64_t fused_tiles = 0;
  const int64_t fused_tiles_max =
      std::max<int64_t>(1, INT32_MAX / (int64_t{kTileRows} * p.heads_q));
  if (fused_dq && routed) {
    // One chunking, of the lists and the sums: no dq partials, no second
    // routing pass.
    fused_tiles = std::min(fused_tiles_max,
                           tiles_per_chunk(p, plan, (p.head_dim * 4 + plan.past - 1) / plan.past));
    chunks = reserve_chunks(ws, p, plan, fused_tiles);
    begin_off = ws.reserve(chunks.buckets * 4);
  } else if (fused_dq) {
    fused_tiles =
        std::clamp<int64_t>(partial_budget() / dq_acc_tile_bytes, 1,
                            std::min(fused_tiles_max, std::max<int64_t>(plan.tiles_bound, 1)));
  } else if (routed) {
    // The dq passes keep an fp32 partial per entry; the dK/dV pass only the
    // lists (and, deterministic, their sorted copy), so it can take far
    // larger chunks. Every dK/dV chunk reads and writes the fp32
    // accumulators of every key tile it touches (2 x 8 GB for config P at
    // 1M), so when the chunkings differ the dK/dV pass routes the queries a
    // second time in its own, larger chunks (routing is deterministic: the
    // same selection) instead of following the dq chunks.
    dq_tiles = tiles_per_chunk(p, plan, p.head_dim * 4);
    const int64_t kv_tiles = std::max(dq_tiles, tiles_per_chunk(p, plan, deterministic ? 4 : 0));
    chunks = reserve_chunks(ws, p, plan, kv_tiles);
    begin_off = ws.reserve(chunks.buckets * 4);
    part_off = ws.reserve(dq_tiles * kTileRows * p.heads_q * plan.past * p.head_dim * 4);
    if (deterministic) {
      sorted_off = ws.reserve(chunks.entries_bound * 4);
      check(cub::DeviceSegmentedSort::SortKeys(
                nullptr, sort_tmp_bytes, static_cast<const int32_t*>(nullptr),
                static_cast<int32_t*>(nullptr), chunks.entries_bound, chunks.buckets,
                static_cast<const int32_t*>(nullptr), static_cast<const int32_t*>(nullptr), stream),
            "cub::DeviceSegmentedSort::SortKeys (size query)");
      sort_tmp_off = ws.reserve(static_cast<int64_t>(sort_tmp_bytes));
    }
  }
  if (fused_dq) dq_acc_off = ws.reserve(fused_tiles * dq_acc_tile_bytes);
  ws.allocate(stream);
  const SeqTable st = seq_table(ws, tables, p.batch);
  prepare(p, plan, ws, tables, stream);

  BwdArgs a{};
  // The saved output goes where the forward writes it; the lse is read.
  a.f = attn_args(p, out, lse, st, plan);
  a.dout = dout.data;
  a.do_ts = dout.token_stride;
  a.do_hs = dout.head_stride;
  a.delta = ws.at<float>(delta_off);
  a.heads_kv = static_cast<int>(p.heads_kv);
  a.total_q = p.total_q;
  a.dense = plan.dense;
  a.key_tiles_per_block = (plan.block + key_tile - 1) / key_tile;
  a.dq = grads.dq.data;
  a.dq_ts = grads.dq.token_stride;
  a.dq_hs = grads.dq.head_stride;
  a.dk_acc = ws.at<float>(dk_off);
  a.dv_acc = ws.at<float>(dv_off);
  check(cudaMemsetAsync(a.dk_acc, 0, static_cast<size_t>(acc_elems) * 4, stream),
        "cudaMemsetAsync");
  check(cudaMemsetAsync(a.dv_acc, 0, static_cast<size_t>(acc_elems) * 4, stream),
        "cudaMemsetAsync");
  if (fused_dq) {
    // Zeroed once; each chunk's store zeroes what it read.
    a.dq_acc = ws.at<float>(dq_acc_off);
    check(
        cudaMemsetAsync(a.dq_acc, 0, static_cast<size_t>(fused_tiles * dq_acc_tile_bytes), stream),
        "cudaMemsetAsync");
  }
  check(detail::launch_bwd_delta(elem, a, stream), "launch of the delta kernel");

  // Key-major work items: (kv head, block, key tile); CTAs whose tile lies
  // beyond a short last block exit at once.
  const int64_t dkv_items = p.heads_kv * plan.blocks_bound * a.key_tiles_per_block;
  if (dkv_items > INT32_MAX)
    fail(Status::unsupported, "cuda backend: heads_kv x key tiles beyond 2^31 - 1");
  const auto launch_dq = [&](AttnMode mode, const char* what) {
    check(sm90_dq ? detail::launch_bwd_dq_sm90(elem, mode, a, stream)
                  : detail::launch_bwd_dq(elem, mode, a, stream),
          what);
  };
  const auto dkv = [&](int64_t t0, int64_t t1) {
    a.f.tile_begin = static_cast<int>(t0);
    a.f.tile_end = static_cast<int>(t1);
    check(sm90_dkv ? detail::launch_bwd_dkv_sm90(elem, a, dkv_items, stream)
                   : detail::launch_bwd_dkv(elem, a, dkv_items, stream),
          "launch of the dk/dv kernel");
    // Fused dq: the kernel summed the chunk's dq; write it.
    if (fused_dq)
      check(detail::launch_bwd_store_dq_chunk(elem, a, stream), "launch of the dq store kernel");
  };
  if (!routed && fused_dq) {
    for (int64_t t0 = 0; t0 < plan.tiles_bound; t0 += fused_tiles)
      dkv(t0, std::min(plan.tiles_bound, t0 + fused_tiles));
  } else if (!routed) {
    // top_k >= blocks: causal attention; top_k == 1: the current block only.
    const AttnMode mode = plan.dense ? AttnMode::dense : AttnMode::current;
    for_tile_ranges(plan.tiles_bound, p.heads_q, [&](int t0, int t1) {
      a.f.tile_begin = t0;
      a.f.tile_end = t1;
      launch_dq(mode, "launch of the dq kernel");
    });
    dkv(0, plan.tiles_bound);
  } else {
    if (plan.ranks) block_means(p, plan, st, ws.at<void>(chunks.kbar), stream);
    detail::RouteArgs route = chunk_route_args(p, plan, st, ws, chunks);
    detail::InvertArgs inv = invert_args(p, plan, st, ws, chunks, tables);
    a.sel = route.sel;
    a.seg_begin = ws.at<int32_t>(begin_off);
    a.seg_end = inv.cursor;
    // The forward's fill lists entries in any order (atomics); sorting each
    // list fixes the dK/dV summation order. The fast mode skips the sort.
    a.lists = deterministic ? ws.at<int32_t>(sorted_off) : inv.entries;
    a.f.descs = inv.descs;
    a.f.num_descs = inv.num_descs;
    a.f.entries = inv.entries;
    a.f.grid = static_cast<int>(
        std::min<int64_t>(chunks.descs_bound, int64_t{2} * multiprocessors(p.device.index)));
    a.dq_part = fused_dq ? nullptr : ws.at<float>(part_off);
    // dq of the row tiles [t0, t1): the entries' partials per past block,
    // then each row tile's current block plus its partials.
    const auto dq = [&](int64_t t0, int64_t t1) {
      a.f.tile_begin = static_cast<int>(t0);
      a.f.tile_end = static_cast<int>(t1);
      launch_dq(AttnMode::past, "launch of the past dq kernel");
      launch_dq(AttnMode::current, "launch of the current dq kernel");
    };
    // dK/dV of the row tiles [t0, t1) (routed and inverted).
    const auto lists_and_dkv = [&](int64_t t0, int64_t t1) {
      segment_begin_kernel<<<grid_for(chunks.buckets, 256), 256, 0, stream>>>(
          inv.counts, inv.cursor, ws.at<int32_t>(begin_off), chunks.buckets);
      check(cudaGetLastError(), "launch of the segment kernel");
      if (deterministic) {
        size_t tmp = sort_tmp_bytes;
        check(cub::DeviceSegmentedSort::SortKeys(ws.at<void>(sort_tmp_off), tmp, inv.entries,
                                                 ws.at<int32_t>(sorted_off), chunks.entries_bound,
                                                 chunks.buckets, a.seg_begin, a.seg_end, stream),
              "cub::DeviceSegmentedSort::SortKeys");
      }
      dkv(t0, t1);
    };
    if (!fused_dq && chunks.tiles == dq_tiles) {
      // One chunking: route and invert once per chunk for both.
      for (int64_t t0 = 0; t0 < plan.tiles_bound; t0 += dq_tiles) {
        const int64_t t1 = std::min(plan.tiles_bound, t0 + dq_tiles);
        route_and_invert(elem, route, inv, t0, t1, stream);
        dq(t0, t1);
        lists_and_dkv(t0, t1);
      }
    } else {
      // Two chunkings: the dq passes in theirs, then the dK/dV pass in its
      // own. Fused dq: no dq passes, only the dK/dV chunks.
      if (!fused_dq) {
        for (int64_t t0 = 0; t0 < plan.tiles_bound; t0 += dq_tiles) {
          const int64_t t1 = std::min(plan.tiles_bound, t0 + dq_tiles);
          route_and_invert(elem, route, inv, t0, t1, stream);
          dq(t0, t1);
        }
      }
      for (int64_t t0 = 0; t0 < plan.tiles_bound; t0 += chunks.tiles) {
        const int64_t t1 = std::min(plan.tiles_bound, t0 + chunks.tiles);
        route_and_invert(elem, route, inv, t0, t1, stream);
        lists_and_dkv(t0, t1);
      }
    }
  }
  store_rows(elem, a.dk_acc, grads.dk, p.total_k, p.heads_kv, p.head_dim, stream);
  store_rows(elem, a.dv_acc, grads.dv, p.total_k, p.heads_kv, p.head_dim, stream);
  // Invalid device cu_seqlens: the tables were zeroed, nothing was computed;
  // say so with NaN gradients, as the forward does with its outputs.
  const int hd = static_cast<int>(p.head_dim);
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
