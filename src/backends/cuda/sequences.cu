// The bookkeeping kernels of the CUDA forward: batch geometry from the
// device-side cu_seqlens, block means of k, the inversion of a chunk's
// selection into per-block entry lists, and the NaN fill for invalid input.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "backends/cuda/kernels.cuh"

namespace moba::backends::cuda::detail {
namespace {

constexpr int kScanThreads = 1024;

// Exclusive prefix sum over the CTA of one int64 per thread; returns this
// thread's offset and writes the grand total to *total (all threads).
__device__ int64_t block_exclusive_scan(int64_t x, int64_t* total) {
  __shared__ int64_t warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t inclusive = x;
  for (int d = 1; d < 32; d <<= 1) {
    const int64_t y = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d) inclusive += y;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x >> 5;
    int64_t w = lane < nwarps ? warp_sums[lane] : 0;
    for (int d = 1; d < 32; d <<= 1) {
      const int64_t y = __shfl_up_sync(0xffffffffu, w, d);
      if (lane >= d) w += y;
    }
    if (lane < nwarps) warp_sums[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  const int64_t warp_base = warp == 0 ? 0 : warp_sums[warp - 1];
  *total = warp_sums[(blockDim.x >> 5) - 1];
  const int64_t result = warp_base + inclusive - x;
  __syncthreads();  // warp_sums is reused by the next call
  return result;
}

__global__ void __launch_bounds__(kScanThreads) prepare_kernel(const PrepareArgs a) {
  const int per = (a.batch + kScanThreads - 1) / kScanThreads;
  const int b0 = min(a.batch, static_cast<int>(threadIdx.x) * per);
  const int b1 = min(a.batch, b0 + per);
  bool bad = false;
  int64_t blocks = 0, tiles = 0;
  for (int b = b0; b < b1; ++b) {
    const int64_t q0 = a.cu_q[b * a.cu_q_stride], q1 = a.cu_q[(b + 1) * a.cu_q_stride];
    const int64_t k0 = a.cu_k[b * a.cu_k_stride], k1 = a.cu_k[(b + 1) * a.cu_k_stride];
    const int64_t lq = q1 - q0, lk = k1 - k0;
    if (lq < 0 || lk < 0 || lq > lk || lq > a.max_q || lk > a.max_k) bad = true;
    if (!bad) {
      blocks += (lk + a.block_size - 1) / a.block_size;
      tiles += (lq + kTileRows - 1) / kTileRows;
    }
  }
  if (threadIdx.x == 0) {
    if (a.cu_q[0] != 0 || a.cu_k[0] != 0 || a.cu_q[a.batch * a.cu_q_stride] != a.total_q ||
        a.cu_k[a.batch * a.cu_k_stride] != a.total_k)
      bad = true;
  }
  int64_t total_blocks = 0, total_tiles = 0;
  const int64_t block_base = block_exclusive_scan(blocks, &total_blocks);
  const int64_t tile_base = block_exclusive_scan(tiles, &total_tiles);
  // Monotone, anchored cu_seqlens bound every sum by the host's bounds; the
  // check guards the tables' sizes even so.
  if (total_blocks > a.blocks_bound || total_tiles > a.tiles_bound) bad = true;
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) *a.invalid = bad ? 1 : 0;
  int64_t blk = block_base, til = tile_base;
  for (int b = b0; b < b1; ++b) {
    if (bad) {
      a.q_begin[b] = a.k_begin[b] = a.block_begin[b] = a.tile_begin[b] = 0;
      continue;
    }
    const int64_t q0 = a.cu_q[b * a.cu_q_stride], k0 = a.cu_k[b * a.cu_k_stride];
    a.q_begin[b] = static_cast<int32_t>(q0);
    a.k_begin[b] = static_cast<int32_t>(k0);
    a.block_begin[b] = static_cast<int32_t>(blk);
    a.tile_begin[b] = static_cast<int32_t>(til);
    blk += (a.cu_k[(b + 1) * a.cu_k_stride] - k0 + a.block_size - 1) / a.block_size;
    til += (a.cu_q[(b + 1) * a.cu_q_stride] - q0 + kTileRows - 1) / kTileRows;
  }
  if (threadIdx.x == 0) {  // the closing entry holds the totals
    const int b = a.batch;
    a.q_begin[b] = bad ? 0 : static_cast<int32_t>(a.total_q);
    a.k_begin[b] = bad ? 0 : static_cast<int32_t>(a.total_k);
    a.block_begin[b] = bad ? 0 : static_cast<int32_t>(total_blocks);
    a.tile_begin[b] = bad ? 0 : static_cast<int32_t>(total_tiles);
  }
}

// One CTA per (block, kv head): fp64 sums over the block's keys (exact for
// fp16/bf16 inputs, so the mean matches the spec's regardless of order).
template <class T>
__global__ void __launch_bounds__(256) block_means_kernel(const MeansArgs a) {
  extern __shared__ double partial[];  // [row groups][D]
  const int gb = blockIdx.x;
  const int kvh = blockIdx.y;
  const SeqTable& st = a.seq;
  if (gb >= st.block_begin[st.batch]) return;
  const int b = upper_index(st.block_begin, st.batch + 1, gb);
  const int j = gb - st.block_begin[b];
  const int len_k = st.k_begin[b + 1] - st.k_begin[b];
  const int first = j * a.block_size;
  const int len = min(a.block_size, len_k - first);
  const int chunks = a.head_dim / 8;
  const int groups = blockDim.x / chunks;
  const int chunk = threadIdx.x % chunks;
  const int group = threadIdx.x / chunks;
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  if (group < groups) {
    const T* base = static_cast<const T*>(a.k) +
                    (static_cast<int64_t>(st.k_begin[b]) + first) * a.k_token_stride +
                    static_cast<int64_t>(kvh) * a.k_head_stride + chunk * 8;
    for (int r = group; r < len; r += groups) {
      const uint4 raw =
          *reinterpret_cast<const uint4*>(base + static_cast<int64_t>(r) * a.k_token_stride);
      const T* x = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] += static_cast<double>(to_float<T>(x[e]));
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) partial[group * a.head_dim + chunk * 8 + e] = acc[e];
  }
  __syncthreads();
  for (int d = threadIdx.x; d < a.head_dim; d += blockDim.x) {
    double sum = 0.0;
    for (int g = 0; g < groups; ++g) sum += partial[g * a.head_dim + d];
    const float mean = static_cast<float>(sum / static_cast<double>(len));
    static_cast<T*>(a.kbar)[(static_cast<int64_t>(kvh) * a.blocks_bound + gb) * a.head_dim + d] =
        from_float<T>(mean);
  }
}

__global__ void count_kernel(const InvertArgs a) {
  __shared__ int rows;
  if (threadIdx.x == 0) {
    int r0, r1;
    chunk_rows(a.seq, a.tile_begin, a.tile_end, &r0, &r1);
    rows = r1 - r0;
  }
  __syncthreads();
  const int64_t n = static_cast<int64_t>(rows) * a.heads_q * a.past;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t gb = a.sel[e];
    if (gb < 0) continue;
    const int head = static_cast<int>((e / a.past) % a.heads_q);
    atomicAdd(&a.counts[(head / a.group) * a.blocks_bound + gb], 1);
  }
}

// One CTA: entry offsets per bucket (into cursor) and the tile descriptors.
// Only the blocks of the chunk's own sequences can hold entries: for every
// kv head the buckets [block_begin[first seq], block_begin[last seq + 1]).
// Those are scanned in coalesced passes of kScanThreads x kScanItems buckets
// (entries and tiles packed in one int64, one block scan per pass); every
// other bucket gets the offset at its place (an empty list), so cursor stays
// the exclusive prefix over all buckets, as the backward's segment tables
// expect. Scanning all heads_kv x blocks_bound buckets per chunk instead cost
// 5 ms for config S at 512K.
constexpr int kScanItems = 4;

__global__ void __launch_bounds__(kScanThreads) scan_kernel(const InvertArgs a) {
  extern __shared__ int32_t head_start[];  // [heads_kv + 1]: offset of each head's range
  __shared__ int range_lo, range_span;
  const int heads_kv = a.heads_q / a.group;
  const int blocks_bound = static_cast<int>(a.blocks_bound);
  if (threadIdx.x == 0) {
    const SeqTable& st = a.seq;
    const int total = st.tile_begin[st.batch];
    const int t1 = min(a.tile_end, total);
    int lo = 0, hi = 0;
    if (a.tile_begin < t1) {
      TileRows first{}, last{};
      locate_tile(st, a.tile_begin, first);
      locate_tile(st, t1 - 1, last);
      lo = st.block_begin[first.seq];
      hi = st.block_begin[last.seq + 1];
    }
    range_lo = lo;
    range_span = hi - lo;
  }
  __syncthreads();
  const int lo = range_lo, span = range_span;
  const int n = heads_kv * span;  // virtual items: (head, block) in the range
  int64_t carry = 0;              // entries << 32 | tiles before this pass
  for (int pass = 0; pass < n; pass += kScanThreads * kScanItems) {
    const int v0 = pass + static_cast<int>(threadIdx.x) * kScanItems;
    int count[kScanItems];
    int bucket[kScanItems];
    int64_t local = 0;
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      const int v = v0 + i;
      const int h = v / span;
      bucket[i] = h * blocks_bound + lo + (v - h * span);
      count[i] = v < n ? a.counts[bucket[i]] : 0;
      local += (static_cast<int64_t>(count[i]) << 32) + (count[i] + kTileRows - 1) / kTileRows;
    }
    int64_t pass_total = 0;
    int64_t at = carry + block_exclusive_scan(local, &pass_total);
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      const int v = v0 + i;
      if (v >= n) break;
      const int off = static_cast<int>(at >> 32);
      int tile = static_cast<int>(at & 0xffffffff);
      if (v % span == 0) head_start[v / span] = off;
      a.cursor[bucket[i]] = off;
      for (int first = 0; first < count[i]; first += kTileRows)
        a.descs[tile++] = make_int4(bucket[i], off + first, min(kTileRows, count[i] - first), 0);
      at += (static_cast<int64_t>(count[i]) << 32) + (count[i] + kTileRows - 1) / kTileRows;
    }
    carry += pass_total;
  }
  if (threadIdx.x == 0) {
    head_start[heads_kv] = static_cast<int>(carry >> 32);
    if (span == 0)
      for (int h = 0; h < heads_kv; ++h) head_start[h] = 0;
    *a.num_descs = static_cast<int32_t>(carry & 0xffffffff);
  }
  __syncthreads();
  // Buckets outside the range: empty lists at the running offset.
  for (int h = 0; h < heads_kv; ++h) {
    int32_t* row = a.cursor + static_cast<int64_t>(h) * blocks_bound;
    for (int j = threadIdx.x; j < lo; j += kScanThreads) row[j] = head_start[h];
    for (int j = lo + span + threadIdx.x; j < blocks_bound; j += kScanThreads)
      row[j] = head_start[h + 1];
  }
}

__global__ void fill_kernel(const InvertArgs a) {
  __shared__ int rows;
  if (threadIdx.x == 0) {
    int r0, r1;
    chunk_rows(a.seq, a.tile_begin, a.tile_end, &r0, &r1);
    rows = r1 - r0;
  }
  __syncthreads();
  const int64_t n = static_cast<int64_t>(rows) * a.heads_q * a.past;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t gb = a.sel[e];
    if (gb < 0) continue;
    const int head = static_cast<int>((e / a.past) % a.heads_q);
    const int pos = atomicAdd(&a.cursor[(head / a.group) * a.blocks_bound + gb], 1);
    a.entries[pos] = static_cast<int32_t>(e);
  }
}

// 0x7fff is a quiet NaN both as float16 and as bfloat16.
__global__ void poison_outputs_kernel(const int32_t* invalid, uint16_t* out, int64_t o_ts,
                                      int64_t o_hs, int64_t tokens, int heads, int head_dim,
                                      float* lse, int64_t lse_hs, int64_t lse_ts) {
  if (*invalid == 0) return;
  const int64_t n = tokens * heads;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t token = i / heads;
    const int head = static_cast<int>(i % heads);
    uint16_t* row = out + token * o_ts + head * o_hs;
    for (int d = 0; d < head_dim; ++d) row[d] = 0x7fff;
    if (lse != nullptr) lse[head * lse_hs + token * lse_ts] = __int_as_float(0x7fc00000);
  }
}

__global__ void poison_selection_kernel(const int32_t* invalid, int32_t* sel, int64_t s_ts,
                                        int64_t s_hs, int64_t tokens, int heads, int width) {
  if (*invalid == 0) return;
  const int64_t n = tokens * heads;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int32_t* row = sel + (i / heads) * s_ts + (i % heads) * s_hs;
    for (int w = 0; w < width; ++w) row[w] = -1;
  }
}

int grid_for(int64_t items, int threads) {
  const int64_t blocks = (items + threads - 1) / threads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 65536 ? 65536 : blocks));
}

}  // namespace

cudaError_t launch_prepare(const PrepareArgs& a, cudaStream_t stream) {
  prepare_kernel<<<1, kScanThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t launch_block_means(Elem elem, const MeansArgs& a, cudaStream_t stream) {
  if (a.blocks_bound == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(a.blocks_bound), static_cast<unsigned>(a.heads_kv));
  const int threads = 256;
  const size_t smem = static_cast<size_t>(threads / (a.head_dim / 8)) * a.head_dim * sizeof(double);
  with_elem(elem, [&]<class T>(ElemTag<T>) {
    block_means_kernel<T><<<grid, threads, smem, stream>>>(a);
  });
  return cudaGetLastError();
}

cudaError_t launch_invert(const InvertArgs& a, cudaStream_t stream) {
  const int threads = 256;
  const int grid = grid_for(a.entries_bound, threads);
  count_kernel<<<grid, threads, 0, stream>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const size_t head_table = static_cast<size_t>(a.heads_q / a.group + 1) * sizeof(int32_t);
  scan_kernel<<<1, kScanThreads, head_table, stream>>>(a);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  fill_kernel<<<grid, threads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t launch_poison_outputs(const int32_t* invalid, void* out, int64_t o_ts, int64_t o_hs,
                                  int64_t tokens, int heads, int head_dim, float* lse,
                                  int64_t lse_hs, int64_t lse_ts, cudaStream_t stream) {
  poison_outputs_kernel<<<grid_for(tokens * heads, 256), 256, 0, stream>>>(
      invalid, static_cast<uint16_t*>(out), o_ts, o_hs, tokens, heads, head_dim, lse, lse_hs,
      lse_ts);
  return cudaGetLastError();
}

cudaError_t launch_poison_selection(const int32_t* invalid, int32_t* sel, int64_t s_ts,
                                    int64_t s_hs, int64_t tokens, int heads, int width,
                                    cudaStream_t stream) {
  poison_selection_kernel<<<grid_for(tokens * heads, 256), 256, 0, stream>>>(
      invalid, sel, s_ts, s_hs, tokens, heads, width);
  return cudaGetLastError();
}

}  // namespace moba::backends::cuda::detail
