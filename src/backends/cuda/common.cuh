// Device helpers shared by the CUDA kernels of the MoBA forward: the PTX
// wrappers for asynchronous copies, ldmatrix and the m16n8k16 tensor-core
// product, the swizzled shared-memory tile layout, and the small integer
// utilities every kernel uses to find its sequence.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace moba::backends::cuda::detail {

// Rows of queries handled by one CTA of the attention and routing kernels.
// The batch is cut into "row tiles" of this many queries of one sequence.
inline constexpr int kTileRows = 128;
// Keys per iteration of the attention kernels.
inline constexpr int kTileKeys = 64;
// Block representatives per shared-memory stage of the routing kernel.
inline constexpr int kRouteBlocks = 64;

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous global -> shared copy; when `full` is false nothing is
// read and the destination is zero-filled (src must still be a valid address).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool full) {
  const int bytes = full ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a * b on the tensor cores: a is 16x16 (row major), b 16x8 (column
// major), d 16x8 in fp32. The element type picks the PTX variant.
template <class T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                 uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, "
      "%9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to the element type, packed as the tensor cores expect
// (the lower index in the low half).
template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <class T>
__device__ __forceinline__ float2 unpack2(uint32_t v);
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
}
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t v) {
  return __half22float2(*reinterpret_cast<__half2*>(&v));
}

template <class T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// 2^x on the special-function unit (relative error ~2^-22); 2^-inf = 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Byte offset of the 16-byte chunk `chunk` of row `row` in a shared-memory
// tile whose rows are D elements of 2 bytes. The chunk index is XORed with
// the row's low three bits so that the eight rows read by one ldmatrix
// phase land in eight different bank groups.
template <int D>
__device__ __forceinline__ uint32_t tile_offset(int row, int chunk) {
  return static_cast<uint32_t>(row * D * 2 + ((chunk ^ (row & 7)) << 4));
}

// The last index i in [0, n) with a[i] <= x, for a non-decreasing a with
// a[0] <= x (the sequence owning item x of a prefix-sum table).
__device__ __forceinline__ int upper_index(const int32_t* a, int n, int32_t x) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (a[mid] <= x)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// The batch geometry, prepared on the device by prepare_sequences: prefix
// tables of batch + 1 entries each. When the cu_seqlens were found invalid
// every table is all zeros (every sequence empty) and *invalid is set.
struct SeqTable {
  const int32_t* q_begin = nullptr;      // cu_seqlens_q
  const int32_t* k_begin = nullptr;      // cu_seqlens_k
  const int32_t* block_begin = nullptr;  // prefix of ceil(len_k / block_size)
  const int32_t* tile_begin = nullptr;   // prefix of ceil(len_q / kTileRows)
  const int32_t* invalid = nullptr;      // 1 when the cu_seqlens break the contract
  int batch = 0;
};

// Where a row tile lives: its sequence, its first query (index within the
// sequence) and its number of rows. Returns false past the last tile.
struct TileRows {
  int seq;
  int first;  // query index within the sequence
  int count;
};
__device__ __forceinline__ bool locate_tile(const SeqTable& st, int tile, TileRows& out) {
  if (tile >= st.tile_begin[st.batch]) return false;
  const int b = upper_index(st.tile_begin, st.batch + 1, tile);
  const int len_q = st.q_begin[b + 1] - st.q_begin[b];
  out.seq = b;
  out.first = (tile - st.tile_begin[b]) * kTileRows;
  out.count = min(kTileRows, len_q - out.first);
  return true;
}

// The rows [*row_begin, *row_end) of row tiles [tile_begin, tile_end), in packed
// query order (empty when the range holds no tile).
__device__ inline void chunk_rows(const SeqTable& st, int tile_begin, int tile_end, int* row_begin,
                                  int* row_end) {
  const int total = st.tile_begin[st.batch];
  const int t1 = min(tile_end, total);
  if (tile_begin >= t1) {
    *row_begin = *row_end = 0;
    return;
  }
  TileRows first{}, last{};
  locate_tile(st, tile_begin, first);
  locate_tile(st, t1 - 1, last);
  *row_begin = st.q_begin[first.seq] + first.first;
  *row_end = st.q_begin[last.seq] + last.first + last.count;
}

}  // namespace moba::backends::cuda::detail
