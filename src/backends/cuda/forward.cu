// The CUDA backend's host side: plans a forward or a routing call, takes one
// stream-ordered workspace, and launches the kernels on the caller's stream.
// It never synchronizes and never reads device memory on the host: the
// cu_seqlens stay on the device, and the host sizes everything from upper
// bounds (totals, batch, max_seqlen). docs/cuda_forward.md explains the
// design and the measurements behind it.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "backends/backend.hpp"
#include "backends/cuda/host.cuh"
#include "backends/cuda/kernels.cuh"
#include "core/problem.hpp"
#include "core/routing.hpp"

namespace moba::backends::cuda {
// The shared host helpers (host.cuh) were this file's own until the backward
// needed the same plan and routing.
using namespace host;  // NOLINT(google-build-using-namespace)

bool device_available() noexcept {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return count > 0;
}

void forward(const core::Problem& p, const core::Rows& out, const core::Lse& lse,
             void* stream_handle) {
  check_supported(p);
  check_rows_aligned(out, "out", 4);
  check_device_pointer(out.data, "out", p.device.index);
  check_device_pointer(lse.data, "lse", p.device.index);
  if (p.total_q == 0 || p.batch == 0) return;
  DeviceGuard guard(p.device.index);
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  const Plan plan = make_plan(p);
  const Elem elem = elem_of(p.q.dtype);

  Workspace ws;
  const Tables tables = reserve_tables(ws, p.batch);
  const bool routed = !plan.dense && plan.past > 0;
  Chunks chunks;
  int64_t part_o_off = 0, part_lse_off = 0;
  if (routed) {
    // Per entry: the partial output (input dtype) and its lse.
    chunks = reserve_chunks(ws, p, plan, tiles_per_chunk(p, plan, p.head_dim * 2 + 4));
    part_o_off = ws.reserve(chunks.entries_bound * p.head_dim * 2);
    part_lse_off = ws.reserve(chunks.entries_bound * 4);
  }
  ws.allocate(stream);
  const SeqTable st = seq_table(ws, tables, p.batch);
  prepare(p, plan, ws, tables, stream);

  AttnArgs attn = attn_args(p, out, lse, st, plan);
  if (!routed) {
    // top_k >= blocks: causal attention; top_k == 1: the current block only.
    const AttnMode mode = plan.dense ? AttnMode::dense : AttnMode::current;
    for_tile_ranges(plan.tiles_bound, p.heads_q, [&](int t0, int t1) {
      attn.tile_begin = t0;
      attn.tile_end = t1;
      check(detail::launch_attention(elem, mode, attn, stream), "launch of the attention kernel");
    });
  } else {
    if (plan.ranks) block_means(p, plan, st, ws.at<void>(chunks.kbar), stream);
    detail::RouteArgs route = chunk_route_args(p, plan, st, ws, chunks);
    detail::InvertArgs inv = invert_args(p, plan, st, ws, chunks, tables);
    attn.descs = inv.descs;
    attn.num_descs = inv.num_descs;
    attn.entries = inv.entries;
    attn.part_o = ws.at<void>(part_o_off);
    attn.part_lse = ws.at<float>(part_lse_off);
    attn.grid = static_cast<int>(
        std::min<int64_t>(chunks.descs_bound, int64_t{2} * multiprocessors(p.device.index)));
    for (int64_t t0 = 0; t0 < plan.tiles_bound; t0 += chunks.tiles) {
      const int t1 = static_cast<int>(std::min(plan.tiles_bound, t0 + chunks.tiles));
      route_and_invert(elem, route, inv, t0, t1, stream);
      attn.tile_begin = static_cast<int>(t0);
      attn.tile_end = t1;
      check(detail::launch_attention(elem, AttnMode::past, attn, stream),
            "launch of the past-block attention kernel");
      check(detail::launch_attention(elem, AttnMode::current, attn, stream),
            "launch of the current-block attention kernel");
    }
  }
  check(detail::launch_poison_outputs(st.invalid, out.data, out.token_stride, out.head_stride,
                                      p.total_q, static_cast<int>(p.heads_q),
                                      static_cast<int>(p.head_dim), lse.data, lse.head_stride,
                                      lse.token_stride, stream),
        "launch of the invalid-input kernel");
}

void routing(const core::Problem& p, const Selection& selection, void* stream_handle) {
  check_supported(p);
  check_device_pointer(selection.data, "selected", p.device.index);
  if (selection.width > INT32_MAX) fail(Status::unsupported, "selected: width beyond 2^31 - 1");
  if (p.total_q == 0 || p.batch == 0) return;
  DeviceGuard guard(p.device.index);
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  Plan plan = make_plan(p);
  // The routing result is the selection itself, so also the dense case runs
  // the kernel (every row then keeps all its past blocks).
  plan.past =
      static_cast<int>(std::min<int64_t>(p.top_k - 1, std::max<int64_t>(plan.blocks_max - 1, 0)));
  const Elem elem = elem_of(p.q.dtype);

  Workspace ws;
  const Tables tables = reserve_tables(ws, p.batch);
  const int64_t kbar_off =
      plan.ranks ? ws.reserve(p.heads_kv * plan.blocks_bound * p.head_dim * 2) : 0;
  ws.allocate(stream);
  const SeqTable st = seq_table(ws, tables, p.batch);
  prepare(p, plan, ws, tables, stream);
  void* kbar = plan.ranks ? ws.at<void>(kbar_off) : nullptr;
  if (plan.ranks) block_means(p, plan, st, kbar, stream);

  detail::RouteArgs route = route_args(p, plan, st, kbar);
  route.sel = selection.data;
  route.sel_token_stride = selection.token_stride;
  route.sel_head_stride = selection.head_stride;
  route.width = static_cast<int>(selection.width);
  route.user_layout = true;
  for_tile_ranges(
      plan.tiles_bound, p.gqa_shared_routing ? p.heads_kv : p.heads_q, [&](int t0, int t1) {
        route.tile_begin = t0;
        route.tile_end = t1;
        check(detail::launch_route(elem, route, stream), "launch of the routing kernel");
      });
  check(detail::launch_poison_selection(
            st.invalid, selection.data, selection.token_stride, selection.head_stride, p.total_q,
            static_cast<int>(p.heads_q), static_cast<int>(selection.width), stream),
        "launch of the invalid-input kernel");
}

}  // namespace moba::backends::cuda
