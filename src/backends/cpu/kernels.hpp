// Inner kernels of the CPU backend: matrix products (single-threaded BLAS;
// the backend parallelizes across work units itself), a vectorizable exp and
// row conversion to fp32.
#pragma once

#include <cblas.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "core/dtype.hpp"
#include "core/problem.hpp"

namespace moba::backends::cpu {

// Row-major products on fp32 matrices with leading dimensions in elements.

/// C[m x n] = beta * C + op(A) op(B), op(X) = X or X^T as `ta` / `tb` say.
inline void gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int64_t m, int64_t n, int64_t k,
                 const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                 float beta) {
  if (m == 0 || n == 0) return;
  const auto i = [](int64_t x) { return static_cast<blasint>(x); };
  cblas_sgemm(CblasRowMajor, ta, tb, i(m), i(n), i(k), 1.0f, a, i(lda), b, i(ldb), beta, c, i(ldc));
}

/// C[m x n] = beta * C + A[m x k] * B[n x k]^T
inline void gemm_nt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                    int64_t ldb, float* c, int64_t ldc, float beta = 0.0f) {
  gemm(CblasNoTrans, CblasTrans, m, n, k, a, lda, b, ldb, c, ldc, beta);
}

/// C[m x n] = beta * C + A[m x k] * B[k x n]
inline void gemm_nn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                    int64_t ldb, float* c, int64_t ldc, float beta = 0.0f) {
  gemm(CblasNoTrans, CblasNoTrans, m, n, k, a, lda, b, ldb, c, ldc, beta);
}

/// C[m x n] = beta * C + A[k x m]^T * B[k x n]
inline void gemm_tn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                    int64_t ldb, float* c, int64_t ldc, float beta = 0.0f) {
  gemm(CblasTrans, CblasNoTrans, m, n, k, a, lda, b, ldb, c, ldc, beta);
}

/// exp(x) for finite x to about 2 ulp; branch-free so loops over it vectorize
/// (Cephes' polynomial). Results below 2^-126 flush to 0.
inline float fast_exp(float x) noexcept {
  x = std::min(std::max(x, -87.0f), 88.3762626647949f);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float fx = x * 1.44269504088896341f + magic;
  fx -= magic;
  x = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  const float z = x * x;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float pow2;
  std::memcpy(&pow2, &bits, sizeof pow2);
  return y * pow2;
}

/// x[i] = exp(x[i] * scale - shift) for i < n; returns the sum.
inline float exp_scaled(float* __restrict x, int64_t n, float scale, float shift) noexcept {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float e = fast_exp(x[i] * scale - shift);
    x[i] = e;
    sum += e;
  }
  return sum;
}

inline float max_of(const float* x, int64_t n) noexcept {
  float m = x[0];
#pragma omp simd reduction(max : m)
  for (int64_t i = 1; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

/// Converts rows token .. token + rows - 1 of one head of `src` to a dense
/// [rows x width] fp32 matrix.
inline void load_rows(const core::Rows& src, int64_t token, int64_t head, int64_t rows,
                      int64_t width, float* dst) noexcept {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t base = src.offset(token + r, head);
    float* d = dst + r * width;
    switch (src.dtype) {
      case DType::float32:
        std::memcpy(d, static_cast<const float*>(src.data) + base,
                    sizeof(float) * static_cast<size_t>(width));
        break;
      case DType::bfloat16: {
        const auto* s = static_cast<const uint16_t*>(src.data) + base;
        for (int64_t c = 0; c < width; ++c) d[c] = core::bf16_to_float(s[c]);
        break;
      }
      case DType::float16: {
        const auto* s = static_cast<const uint16_t*>(src.data) + base;
        for (int64_t c = 0; c < width; ++c) d[c] = core::fp16_to_float(s[c]);
        break;
      }
      default:
        for (int64_t c = 0; c < width; ++c) d[c] = core::load(src.data, src.dtype, base + c);
    }
  }
}

/// Writes a dense fp32 row to element offset `offset` of `dst`, rounded to its dtype.
inline void store_row(const core::Rows& dst, int64_t offset, const float* src,
                      int64_t width) noexcept {
  switch (dst.dtype) {
    case DType::float32:
      std::memcpy(static_cast<float*>(dst.data) + offset, src,
                  sizeof(float) * static_cast<size_t>(width));
      break;
    case DType::bfloat16: {
      auto* d = static_cast<uint16_t*>(dst.data) + offset;
      for (int64_t c = 0; c < width; ++c) d[c] = core::float_to_bf16(src[c]);
      break;
    }
    default:
      for (int64_t c = 0; c < width; ++c) core::store(dst.data, dst.dtype, offset + c, src[c]);
  }
}

/// A [rows x head_dim] fp32 view of keys or values: straight into the caller's
/// fp32 tensor when possible, else converted into `buffer`.
struct Tile {
  const float* data = nullptr;
  int64_t ld = 0;
};

inline Tile key_tile(const core::Rows& src, int64_t token, int64_t head, int64_t rows,
                     int64_t width, float* buffer) noexcept {
  if (src.dtype == DType::float32)
    return Tile{static_cast<const float*>(src.data) + src.offset(token, head), src.token_stride};
  load_rows(src, token, head, rows, width, buffer);
  return Tile{buffer, width};
}

}  // namespace moba::backends::cpu
