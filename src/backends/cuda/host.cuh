// Host-side machinery shared by the CUDA forward and backward: error checks,
// the device guard, the stream-ordered workspace, argument checks, the plan
// (geometry from upper bounds only) and the launch helpers for the sequence
// tables, block means and routing, and the chunk builders (workspace layout,
// routing and inversion arguments) of a routed call. One copy for both
// directions, so the backward recomputes the routing with exactly the
// forward's code and chunking.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "backends/backend.hpp"
#include "backends/cuda/kernels.cuh"
#include "core/problem.hpp"
#include "core/routing.hpp"

namespace moba::backends::cuda::host {

using core::fail;
using detail::AttnArgs;
using detail::AttnMode;
using detail::Elem;
using detail::kTileRows;
using detail::SeqTable;

// Default cap on the chunk workspace that holds the partial outputs of the
// past blocks (one D-vector in the input dtype and an fp32 lse per (row,
// head, selected past block)); the queries are processed in chunks that fit.
// MOBA_CUDA_PARTIAL_BYTES overrides it (tests use a tiny value to exercise
// many chunks).
inline constexpr int64_t kDefaultPartialBytes = int64_t{2} << 30;

inline void check(cudaError_t err, const std::string& what) {
  if (err == cudaSuccess) return;
  (void)cudaGetLastError();  // clear a non-sticky error so the next call starts clean
  const Status status = err == cudaErrorMemoryAllocation ? Status::out_of_memory : Status::internal;
  fail(status, "cuda backend: " + what + " failed: " + cudaGetErrorName(err) + " (" +
                   cudaGetErrorString(err) + ")");
}

// Makes the tensors' device current for the call and restores the caller's.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) {
      check(cudaSetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")");
    } else {
      previous_ = -1;
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// One stream-ordered allocation carved into aligned pieces; freed in stream
// order when the call returns (also when it throws), so it is safe to capture
// the whole call in a CUDA graph.
class Workspace {
 public:
  // Reserves `bytes` (rounded to 256) and returns the piece's offset.
  int64_t reserve(int64_t bytes) {
    const int64_t offset = size_;
    size_ += (std::max<int64_t>(bytes, 0) + 255) / 256 * 256;
    return offset;
  }
  void allocate(cudaStream_t stream) {
    stream_ = stream;
    if (size_ > 0)
      check(cudaMallocAsync(&base_, static_cast<size_t>(size_), stream),
            "cudaMallocAsync(" + std::to_string(size_) + " bytes)");
  }
  template <class T>
  T* at(int64_t offset) const {
    return reinterpret_cast<T*>(static_cast<char*>(base_) + offset);
  }
  ~Workspace() {
    if (base_ != nullptr) (void)cudaFreeAsync(base_, stream_);
  }

 private:
  int64_t size_ = 0;
  void* base_ = nullptr;
  cudaStream_t stream_ = nullptr;
};

inline Elem elem_of(DType dtype) {
  return dtype == DType::bfloat16 ? Elem::bf16 : Elem::f16;
}

inline void check_device_pointer(const void* ptr, const char* name, int device) {
  if (ptr == nullptr) return;
  cudaPointerAttributes attr{};
  check(cudaPointerGetAttributes(&attr, ptr),
        std::string("cudaPointerGetAttributes(") + name + ")");
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    fail(Status::invalid_argument,
         std::string(name) + ": the cuda backend expects device memory, but the pointer is not");
  if (attr.type == cudaMemoryTypeDevice && attr.device != device)
    fail(Status::invalid_argument, std::string(name) +
                                       ": lives on cuda:" + std::to_string(attr.device) +
                                       ", expected cuda:" + std::to_string(device));
}

inline void check_rows_aligned(const core::Rows& r, const char* name, int64_t bytes) {
  const int64_t elems = bytes / 2;
  if (reinterpret_cast<uintptr_t>(r.data) % static_cast<uintptr_t>(bytes) != 0 ||
      r.token_stride % elems != 0 || r.head_stride % elems != 0)
    fail(Status::unsupported,
         std::string(name) + ": the cuda backend needs every row to start on a " +
             std::to_string(bytes) + "-byte boundary (data pointer, token and head strides " +
             "multiples of " + std::to_string(elems) + " elements)");
}

inline void check_supported(const core::Problem& p) {
  if (p.q.dtype == DType::float32)
    fail(Status::unsupported,
         "q: the cuda backend supports float16 and bfloat16 inputs, got float32 "
         "(convert the inputs, or use the cpu backend)");
  if (p.head_dim != 64 && p.head_dim != 128)
    fail(Status::unsupported,
         "q: the cuda backend supports head dims 64 and 128, got " + std::to_string(p.head_dim));
  if (p.heads_q > 65535)
    fail(Status::unsupported, "q: the cuda backend supports at most 65535 heads");
  check_rows_aligned(p.q, "q", 16);
  check_rows_aligned(p.k, "k", 16);
  check_rows_aligned(p.v, "v", 16);
  check_device_pointer(p.q.data, "q", p.device.index);
  check_device_pointer(p.k.data, "k", p.device.index);
  check_device_pointer(p.v.data, "v", p.device.index);
  check_device_pointer(p.cu_seqlens_q, "cu_seqlens_q", p.device.index);
  check_device_pointer(p.cu_seqlens_k, "cu_seqlens_k", p.device.index);
}

// Host-side geometry from upper bounds only.
struct Plan {
  // The block size, capped at the longest key sequence: a block at least as
  // long as every sequence is one block per sequence either way.
  int block = 1;
  int64_t blocks_max = 0;    // blocks of the longest key sequence
  int64_t tiles_bound = 0;   // row tiles of the whole batch, at most
  int64_t blocks_bound = 0;  // blocks of the whole batch, at most
  bool dense = false;        // top_k >= blocks everywhere: exact causal attention
  int past = 0;              // past blocks a query keeps, at most
  bool ranks = false;        // some query has more past blocks than it keeps
};

inline Plan make_plan(const core::Problem& p) {
  Plan plan;
  plan.block =
      static_cast<int>(std::min<int64_t>(p.block_size, std::max<int64_t>(p.max_seqlen_k, 1)));
  plan.blocks_max = core::num_blocks(p.max_seqlen_k, plan.block);
  const int64_t tiles_per_seq = (p.max_seqlen_q + kTileRows - 1) / kTileRows;
  plan.tiles_bound =
      std::min((p.total_q + p.batch * (kTileRows - 1)) / kTileRows, p.batch * tiles_per_seq);
  plan.blocks_bound = std::min(p.total_k, p.batch * plan.blocks_max);
  plan.dense = p.top_k >= plan.blocks_max;
  plan.past =
      static_cast<int>(std::min<int64_t>(p.top_k - 1, std::max<int64_t>(plan.blocks_max - 1, 0)));
  plan.ranks = p.top_k - 1 < plan.blocks_max - 1;
  return plan;
}

// The batch tables at the front of the workspace.
struct Tables {
  int64_t q_begin, k_begin, block_begin, tile_begin, invalid, num_descs;
};

inline Tables reserve_tables(Workspace& ws, int64_t batch) {
  const int64_t n = (batch + 1) * 4;
  return Tables{ws.reserve(n), ws.reserve(n), ws.reserve(n),
                ws.reserve(n), ws.reserve(4), ws.reserve(4)};
}

inline SeqTable seq_table(const Workspace& ws, const Tables& t, int64_t batch) {
  SeqTable st;
  st.q_begin = ws.at<int32_t>(t.q_begin);
  st.k_begin = ws.at<int32_t>(t.k_begin);
  st.block_begin = ws.at<int32_t>(t.block_begin);
  st.tile_begin = ws.at<int32_t>(t.tile_begin);
  st.invalid = ws.at<int32_t>(t.invalid);
  st.batch = static_cast<int>(batch);
  return st;
}

inline void prepare(const core::Problem& p, const Plan& plan, const Workspace& ws, const Tables& t,
                    cudaStream_t stream) {
  detail::PrepareArgs a{};
  a.cu_q = p.cu_seqlens_q;
  a.cu_q_stride = p.cu_seqlens_q_stride;
  a.cu_k = p.cu_seqlens_k;
  a.cu_k_stride = p.cu_seqlens_k_stride;
  a.batch = static_cast<int>(p.batch);
  a.total_q = p.total_q;
  a.total_k = p.total_k;
  a.max_q = p.max_seqlen_q;
  a.max_k = p.max_seqlen_k;
  a.block_size = plan.block;
  a.blocks_bound = plan.blocks_bound;
  a.tiles_bound = plan.tiles_bound;
  a.q_begin = ws.at<int32_t>(t.q_begin);
  a.k_begin = ws.at<int32_t>(t.k_begin);
  a.block_begin = ws.at<int32_t>(t.block_begin);
  a.tile_begin = ws.at<int32_t>(t.tile_begin);
  a.invalid = ws.at<int32_t>(t.invalid);
  check(detail::launch_prepare(a, stream), "launch of the sequence-table kernel");
}

inline void block_means(const core::Problem& p, const Plan& plan, const SeqTable& st, void* kbar,
                        cudaStream_t stream) {
  detail::MeansArgs a{};
  a.k = p.k.data;
  a.k_token_stride = p.k.token_stride;
  a.k_head_stride = p.k.head_stride;
  a.seq = st;
  a.heads_kv = static_cast<int>(p.heads_kv);
  a.head_dim = static_cast<int>(p.head_dim);
  a.block_size = plan.block;
  a.blocks_bound = plan.blocks_bound;
  a.kbar = kbar;
  check(detail::launch_block_means(elem_of(p.k.dtype), a, stream),
        "launch of the block-means kernel");
}

inline detail::RouteArgs route_args(const core::Problem& p, const Plan& plan, const SeqTable& st,
                                    const void* kbar) {
  detail::RouteArgs a{};
  a.q = p.q.data;
  a.q_token_stride = p.q.token_stride;
  a.q_head_stride = p.q.head_stride;
  a.kbar = kbar;
  a.seq = st;
  a.heads_q = static_cast<int>(p.heads_q);
  a.heads_kv = static_cast<int>(p.heads_kv);
  a.group = static_cast<int>(p.group);
  a.head_dim = static_cast<int>(p.head_dim);
  a.block_size = plan.block;
  a.blocks_bound = plan.blocks_bound;
  a.past = plan.past;
  a.shared = p.gqa_shared_routing;
  return a;
}

inline AttnArgs attn_args(const core::Problem& p, const core::Rows& out, const core::Lse& lse,
                          const SeqTable& st, const Plan& plan) {
  AttnArgs a{};
  a.q = p.q.data;
  a.k = p.k.data;
  a.v = p.v.data;
  a.q_ts = p.q.token_stride;
  a.q_hs = p.q.head_stride;
  a.k_ts = p.k.token_stride;
  a.k_hs = p.k.head_stride;
  a.v_ts = p.v.token_stride;
  a.v_hs = p.v.head_stride;
  a.out = out.data;
  a.o_ts = out.token_stride;
  a.o_hs = out.head_stride;
  a.lse = lse.data;
  a.lse_hs = lse.head_stride;
  a.lse_ts = lse.token_stride;
  a.seq = st;
  a.heads_q = static_cast<int>(p.heads_q);
  a.group = static_cast<int>(p.group);
  a.head_dim = static_cast<int>(p.head_dim);
  a.block_size = plan.block;
  a.past = plan.past;
  a.scale = p.softmax_scale;
  a.blocks_bound = plan.blocks_bound;
  return a;
}

// A byte budget from the environment variable `name` when it holds a positive
// integer, else `fallback`.
inline int64_t env_bytes(const char* name, int64_t fallback) {
  if (const char* env = std::getenv(name)) {
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    if (end != env && v > 0) return v;
  }
  return fallback;
}

inline int64_t partial_budget() {
  return env_bytes("MOBA_CUDA_PARTIAL_BYTES", kDefaultPartialBytes);
}

// The per-chunk buffers of a routed call (forward or backward), reserved in
// one place so both directions chunk the queries identically: the selection
// of the chunk's rows, the per-(kv head, block) entry lists and their
// 128-entry tile descriptors.
struct Chunks {
  int64_t tiles = 0;          // row tiles per chunk
  int64_t entries_bound = 0;  // selection entries of one chunk, at most
  int64_t descs_bound = 0;
  int64_t buckets = 0;  // heads_kv x blocks_bound
  int64_t kbar = 0, sel = 0, counts = 0, cursor = 0, entries = 0, descs = 0;  // offsets
};

// Row tiles per chunk such that the chunk's selection, lists and
// descriptors plus `extra_bytes_per_entry` per selection entry (the
// forward's partial outputs, the backward's dq partials) stay within
// partial_budget().
inline int64_t tiles_per_chunk(const core::Problem& p, const Plan& plan,
                               int64_t extra_bytes_per_entry) {
  const int64_t per_tile_entries = int64_t{kTileRows} * p.heads_q * plan.past;
  if (per_tile_entries > INT32_MAX / 2)
    fail(Status::unsupported, "cuda backend: heads_q x (top_k - 1) is too large for one row tile");
  // Selection + entry + descriptor share, plus the caller's own.
  const int64_t per_entry_bytes = 4 + 4 + 16 + extra_bytes_per_entry;
  int64_t tiles = partial_budget() / (per_tile_entries * per_entry_bytes);
  tiles = std::clamp<int64_t>(tiles, 1, std::max<int64_t>(plan.tiles_bound, 1));
  return std::min<int64_t>(tiles, (INT32_MAX / 2) / per_tile_entries);
}

inline Chunks reserve_chunks(Workspace& ws, const core::Problem& p, const Plan& plan,
                             int64_t tiles) {
  Chunks c;
  c.tiles = tiles;
  c.buckets = p.heads_kv * plan.blocks_bound;
  if (plan.ranks) c.kbar = ws.reserve(p.heads_kv * plan.blocks_bound * p.head_dim * 2);
  c.entries_bound = tiles * int64_t{kTileRows} * p.heads_q * plan.past;
  c.descs_bound = c.entries_bound / kTileRows + c.buckets;
  c.sel = ws.reserve(c.entries_bound * 4);
  c.counts = ws.reserve(c.buckets * 4);
  c.cursor = ws.reserve(c.buckets * 4);
  c.entries = ws.reserve(c.entries_bound * 4);
  c.descs = ws.reserve(c.descs_bound * 16);
  return c;
}

// Routing of a chunk into its selection workspace: global block indices,
// `past` slots per (row, head) padded with -1, rows relative to the chunk.
inline detail::RouteArgs chunk_route_args(const core::Problem& p, const Plan& plan,
                                          const SeqTable& st, const Workspace& ws,
                                          const Chunks& c) {
  detail::RouteArgs a = route_args(p, plan, st, plan.ranks ? ws.at<void>(c.kbar) : nullptr);
  a.sel = ws.at<int32_t>(c.sel);
  a.sel_token_stride = p.heads_q * plan.past;
  a.sel_head_stride = plan.past;
  a.width = plan.past;
  a.user_layout = false;
  return a;
}

inline detail::InvertArgs invert_args(const core::Problem& p, const Plan& plan, const SeqTable& st,
                                      const Workspace& ws, const Chunks& c, const Tables& t) {
  detail::InvertArgs a{};
  a.sel = ws.at<int32_t>(c.sel);
  a.entries_bound = c.entries_bound;
  a.seq = st;
  a.heads_q = static_cast<int>(p.heads_q);
  a.group = static_cast<int>(p.group);
  a.past = plan.past;
  a.blocks_bound = plan.blocks_bound;
  a.counts = ws.at<int32_t>(c.counts);
  a.cursor = ws.at<int32_t>(c.cursor);
  a.buckets = c.buckets;
  a.descs = ws.at<int4>(c.descs);
  a.num_descs = ws.at<int32_t>(t.num_descs);
  a.entries = ws.at<int32_t>(c.entries);
  return a;
}

// Routes the row tiles [t0, t1) and inverts their selection into the entry
// lists and tile descriptors.
inline void route_and_invert(Elem elem, detail::RouteArgs& route, detail::InvertArgs& inv,
                             int64_t t0, int64_t t1, cudaStream_t stream) {
  route.tile_begin = inv.tile_begin = static_cast<int>(t0);
  route.tile_end = inv.tile_end = static_cast<int>(t1);
  check(detail::launch_route(elem, route, stream), "launch of the routing kernel");
  check(cudaMemsetAsync(inv.counts, 0, static_cast<size_t>(inv.buckets) * 4, stream),
        "cudaMemsetAsync");
  check(detail::launch_invert(inv, stream), "launch of the selection-inversion kernels");
}

// Launches over row tiles [0, tiles) in pieces whose grids (tiles x units
// CTAs) stay within the 2^31 - 1 limit.
template <class Fn>
inline void for_tile_ranges(int64_t tiles, int64_t units, Fn&& fn) {
  const int64_t step = std::max<int64_t>(1, (int64_t{INT32_MAX} / std::max<int64_t>(units, 1)));
  for (int64_t t = 0; t < tiles; t += step)
    fn(static_cast<int>(t), static_cast<int>(std::min(tiles, t + step)));
}

inline int multiprocessors(int device) {
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute");
  return sms;
}

}  // namespace moba::backends::cuda::host
