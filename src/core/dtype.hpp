// Scalar conversions between the storage dtypes and float, shared by every
// host backend. Rounding is round-to-nearest-even, as on the GPU.
#pragma once

#include <cstdint>
#include <cstring>

#include "moba/moba.hpp"

namespace moba::core {

inline float bf16_to_float(uint16_t h) noexcept {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) noexcept {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u)
    return static_cast<uint16_t>((bits >> 16) | 0x40u);  // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float fp16_to_float(uint16_t h) noexcept {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: value = man * 2^-24
    float f = static_cast<float>(man) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t float_to_fp16(float f) noexcept {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // overflow (incl. inf) after rounding
  if (abs < 0x38800000u) {                        // result is subnormal or zero
    if (abs < 0x33000000u) return sign;           // below half the smallest subnormal
    const uint32_t man = (abs & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(abs >> 23);  // 14 .. 24
    const uint32_t half = 1u << (shift - 1);
    const uint32_t rem = man & ((1u << shift) - 1);
    uint32_t r = man >> shift;
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = abs - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return static_cast<uint16_t>(sign | (r >> 13));
}

/// Reads element `i` (an element offset) of a buffer of `dtype` as float.
inline float load(const void* base, DType dtype, int64_t i) noexcept {
  switch (dtype) {
    case DType::float16:
      return fp16_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::bfloat16:
      return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::int32:
      return static_cast<float>(static_cast<const int32_t*>(base)[i]);
    case DType::float32:
      break;
  }
  return static_cast<const float*>(base)[i];
}

/// Writes `x` rounded to `dtype` at element offset `i`.
inline void store(void* base, DType dtype, int64_t i, float x) noexcept {
  switch (dtype) {
    case DType::float16:
      static_cast<uint16_t*>(base)[i] = float_to_fp16(x);
      return;
    case DType::bfloat16:
      static_cast<uint16_t*>(base)[i] = float_to_bf16(x);
      return;
    case DType::int32:
      static_cast<int32_t*>(base)[i] = static_cast<int32_t>(x);
      return;
    case DType::float32:
      break;
  }
  static_cast<float*>(base)[i] = x;
}

/// Rounds a float to the precision of `dtype` (identity for float32).
inline float round_to(DType dtype, float x) noexcept {
  switch (dtype) {
    case DType::float16:
      return fp16_to_float(float_to_fp16(x));
    case DType::bfloat16:
      return bf16_to_float(float_to_bf16(x));
    default:
      return x;
  }
}

}  // namespace moba::core
