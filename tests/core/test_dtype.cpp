// Tests of the scalar dtype conversions (src/core/dtype.hpp) that every host
// backend and the test oracles read and write through. Decoding is checked
// exhaustively over all 65536 patterns; encoding (round-to-nearest-even) is
// checked at every rounding boundary of every representable value, on random
// bit patterns, and against GCC's _Float16 where the compiler has it.
#include <gtest/gtest.h>

#include <cfenv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <ostream>
#include <random>
#include <vector>

#include "core/dtype.hpp"

namespace moba::core {
namespace {

uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

float float_of(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

// A 16-bit IEEE-style binary format described by its field widths.
struct Format {
  const char* name;
  int exponent_bits;
  int mantissa_bits;
  float (*to_float)(uint16_t);
  uint16_t (*from_float)(float);

  int bias() const { return (1 << (exponent_bits - 1)) - 1; }
  int max_exponent() const { return bias(); }      // of the largest finite value
  int min_exponent() const { return 1 - bias(); }  // of the smallest normal value
  uint16_t exponent_field(uint16_t h) const {
    return static_cast<uint16_t>((h >> mantissa_bits) & ((1 << exponent_bits) - 1));
  }
  uint16_t mantissa_field(uint16_t h) const {
    return static_cast<uint16_t>(h & ((1 << mantissa_bits) - 1));
  }
  bool is_nan(uint16_t h) const {
    return exponent_field(h) == (1 << exponent_bits) - 1 && mantissa_field(h) != 0;
  }
  // The value of a pattern from its fields, by the textbook formula.
  double decode(uint16_t h) const {
    const double sign = (h & 0x8000u) ? -1.0 : 1.0;
    const int e = exponent_field(h);
    const double m = mantissa_field(h);
    if (e == (1 << exponent_bits) - 1)
      return m == 0 ? sign * std::numeric_limits<double>::infinity()
                    : std::numeric_limits<double>::quiet_NaN();
    if (e == 0) return sign * std::ldexp(m, min_exponent() - mantissa_bits);
    return sign * std::ldexp(1.0 + std::ldexp(m, -mantissa_bits), e - bias());
  }
  // Round-to-nearest-even of a float into this format, done in double on
  // the value (not the bits): scale to the grid spacing at |x|, let rint
  // round ties to even, scale back. Values at or beyond the largest finite
  // value plus half its spacing overflow to infinity (that midpoint is a tie
  // whose even neighbour is the next power of two, i.e. infinity).
  float round(float x) const {
    if (std::isnan(x)) return x;
    const double a = std::fabs(static_cast<double>(x));
    const double overflow = std::ldexp(2.0 - std::ldexp(1.0, -(mantissa_bits + 1)), max_exponent());
    double r;
    if (a >= overflow) {
      r = std::numeric_limits<double>::infinity();
    } else {
      int e;
      std::frexp(a, &e);  // a = f * 2^e with f in [0.5, 1): floor(log2 a) = e - 1
      const int exponent = std::max(e - 1, min_exponent());
      const double spacing = std::ldexp(1.0, exponent - mantissa_bits);
      r = std::rint(a / spacing) * spacing;
    }
    return static_cast<float>(std::copysign(r, static_cast<double>(x)));
  }
};

const Format kHalf{"float16", 5, 10, fp16_to_float, float_to_fp16};
const Format kBfloat{"bfloat16", 8, 7, bf16_to_float, float_to_bf16};

// Names the format in GoogleTest's messages instead of dumping its bytes.
void PrintTo(const Format& format, std::ostream* os) {
  *os << format.name;
}

class DtypeTest : public ::testing::TestWithParam<Format> {
 protected:
  void SetUp() override { ASSERT_EQ(std::fegetround(), FE_TONEAREST); }
  const Format& f() const { return GetParam(); }

  // Checks from_float(x) against the value-based reference, bit for bit in
  // the decoded float (so the sign of zero counts too).
  void check_rounding(float x) const {
    const uint16_t h = f().from_float(x);
    const float got = f().to_float(h);
    const float want = f().round(x);
    if (std::isnan(x)) {
      ASSERT_TRUE(f().is_nan(h)) << f().name << ": NaN input 0x" << std::hex << bits_of(x);
      return;
    }
    ASSERT_EQ(bits_of(got), bits_of(want))
        << f().name << ": x=" << x << " (0x" << std::hex << bits_of(x) << ") -> 0x" << h << " = "
        << std::dec << got << ", expected " << want;
  }
};

TEST_P(DtypeTest, DecodeMatchesFormulaForAllPatterns) {
  for (uint32_t p = 0; p < 0x10000u; ++p) {
    const auto h = static_cast<uint16_t>(p);
    const float got = f().to_float(h);
    const double want = f().decode(h);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(got)) << f().name << " pattern 0x" << std::hex << p;
    } else {
      ASSERT_EQ(static_cast<double>(got), want) << f().name << " pattern 0x" << std::hex << p;
      ASSERT_EQ(std::signbit(got), (p & 0x8000u) != 0)
          << f().name << " pattern 0x" << std::hex << p;
    }
  }
}

TEST_P(DtypeTest, RoundTripIsIdentityForAllNonNaNPatterns) {
  for (uint32_t p = 0; p < 0x10000u; ++p) {
    const auto h = static_cast<uint16_t>(p);
    const uint16_t back = f().from_float(f().to_float(h));
    if (f().is_nan(h)) {
      ASSERT_TRUE(f().is_nan(back)) << f().name << " NaN pattern 0x" << std::hex << p;
      ASSERT_EQ(back & 0x8000u, h & 0x8000u)
          << f().name << " NaN sign, pattern 0x" << std::hex << p;
    } else {
      ASSERT_EQ(back, h) << f().name << " pattern 0x" << std::hex << p;
    }
  }
}

// For every non-negative finite value v of the format and its successor w
// (the next value, or 2^(max_exponent+1) past the largest), the floats at v,
// around the midpoint (v + w) / 2 and in between must round like the
// reference; this visits every rounding boundary, subnormals included, of
// both signs.
TEST_P(DtypeTest, RoundingAtEveryBoundary) {
  std::mt19937_64 rng(21);
  const uint16_t inf_pattern =
      static_cast<uint16_t>(((1u << f().exponent_bits) - 1) << f().mantissa_bits);
  for (uint32_t p = 0; p < inf_pattern; ++p) {
    const float v = f().to_float(static_cast<uint16_t>(p));
    const double w = p + 1 == inf_pattern ? std::ldexp(1.0, f().max_exponent() + 1)
                                          : f().to_float(static_cast<uint16_t>(p + 1));
    const float mid = static_cast<float>((v + w) / 2);  // exact: one more bit than the format
    ASSERT_EQ(static_cast<double>(mid), (v + w) / 2);
    const float inf = std::numeric_limits<float>::infinity();
    std::vector<float> xs = {v,   std::nextafter(v, inf),   std::nextafter(v, -inf),
                             mid, std::nextafter(mid, inf), std::nextafter(mid, -inf)};
    std::uniform_real_distribution<double> between(v, w);
    for (int r = 0; r < 4; ++r) xs.push_back(static_cast<float>(between(rng)));
    for (float x : xs) {
      check_rounding(x);
      check_rounding(-x);
      if (HasFatalFailure()) return;
    }
  }
}

TEST_P(DtypeTest, RoundingOfRandomFloatBitPatterns) {
  std::mt19937_64 rng(22);
  for (int i = 0; i < 1000000 && !HasFatalFailure(); ++i)
    check_rounding(float_of(static_cast<uint32_t>(rng())));
}

TEST_P(DtypeTest, SpecialValues) {
  const float inf = std::numeric_limits<float>::infinity();
  const float max_finite = f().to_float(static_cast<uint16_t>(
      (((1u << f().exponent_bits) - 2) << f().mantissa_bits) | ((1u << f().mantissa_bits) - 1)));
  const float min_subnormal = f().to_float(1);
  // Infinities stay infinities, with their sign.
  EXPECT_EQ(f().to_float(f().from_float(inf)), inf);
  EXPECT_EQ(f().to_float(f().from_float(-inf)), -inf);
  // Overflow: the largest float and anything at or past max + half a spacing go to inf.
  EXPECT_EQ(f().to_float(f().from_float(std::numeric_limits<float>::max())), inf);
  EXPECT_EQ(f().to_float(f().from_float(-std::numeric_limits<float>::max())), -inf);
  const double half_spacing = std::ldexp(1.0, f().max_exponent() - f().mantissa_bits - 1);
  const float tie = static_cast<float>(max_finite + half_spacing);
  EXPECT_EQ(f().to_float(f().from_float(tie)), inf);
  EXPECT_EQ(f().to_float(f().from_float(std::nextafter(tie, 0.0f))), max_finite);
  EXPECT_EQ(f().to_float(f().from_float(max_finite)), max_finite);
  // Zeros keep their sign; half the smallest subnormal is a tie that goes to
  // (even) zero, just above it goes to the smallest subnormal.
  EXPECT_EQ(f().from_float(0.0f), 0x0000);
  EXPECT_EQ(f().from_float(-0.0f), 0x8000);
  EXPECT_EQ(f().from_float(min_subnormal / 2), 0x0000);
  EXPECT_EQ(f().from_float(-min_subnormal / 2), 0x8000);
  EXPECT_EQ(f().from_float(std::nextafter(min_subnormal / 2, 1.0f)), 0x0001);
  EXPECT_EQ(f().from_float(min_subnormal * 1.5f), 0x0002);  // tie between 1 and 2 -> even 2
  EXPECT_EQ(f().from_float(min_subnormal * 2.5f), 0x0002);  // tie between 2 and 3 -> even 2
  EXPECT_EQ(f().from_float(std::numeric_limits<float>::denorm_min()), 0x0000);
  // Ties to even in the normal range: 1 + half a spacing -> 1, 1 + 3 halves -> 1 + 2 spacings.
  const float spacing_at_one = std::ldexp(1.0f, -f().mantissa_bits);
  EXPECT_EQ(f().to_float(f().from_float(1.0f + spacing_at_one / 2)), 1.0f);
  EXPECT_EQ(f().to_float(f().from_float(1.0f + 3 * spacing_at_one / 2)), 1.0f + 2 * spacing_at_one);
}

// Every float NaN (both signs, quiet and signalling payloads) converts to a
// NaN of the format, never to infinity or a number.
TEST_P(DtypeTest, EveryFloatNaNStaysNaN) {
  for (uint32_t sign : {0u, 0x80000000u}) {
    for (uint32_t payload = 1; payload < (1u << 23); ++payload) {
      const uint16_t h = f().from_float(float_of(sign | 0x7f800000u | payload));
      if (!f().is_nan(h)) {
        FAIL() << f().name << ": float NaN 0x" << std::hex << (sign | 0x7f800000u | payload)
               << " became 0x" << h;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, DtypeTest, ::testing::Values(kHalf, kBfloat),
                         [](const auto& info) { return std::string(info.param.name); });

#ifdef __FLT16_MANT_DIG__
uint16_t bits_of(_Float16 h) {
  uint16_t b;
  std::memcpy(&b, &h, sizeof b);
  return b;
}

// GCC's _Float16 (IEEE binary16 with the compiler's round-to-nearest-even
// conversions) is a second, independent oracle for float16.
TEST(Float16, AgreesWithCompilerFloat16) {
  for (uint32_t p = 0; p < 0x10000u; ++p) {
    _Float16 h;
    const auto pattern = static_cast<uint16_t>(p);
    std::memcpy(&h, &pattern, sizeof h);
    const float want = static_cast<float>(h);
    const float got = fp16_to_float(pattern);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(got)) << std::hex << p;
    } else {
      ASSERT_EQ(bits_of(got), bits_of(want)) << std::hex << p;
    }
  }
  std::mt19937_64 rng(23);
  for (int i = 0; i < 2000000; ++i) {
    // Half the draws uniform over all bit patterns, half concentrated on the
    // float16 range (exponents around 2^-26 .. 2^17) where rounding is busiest.
    uint32_t b = static_cast<uint32_t>(rng());
    if (i % 2) b = (b & 0x807fffffu) | ((97u + static_cast<uint32_t>(rng() % 48)) << 23);
    const float x = float_of(b);
    const _Float16 want = static_cast<_Float16>(x);
    const uint16_t got = float_to_fp16(x);
    if (std::isnan(x)) {
      ASSERT_TRUE(kHalf.is_nan(got));
    } else {
      ASSERT_EQ(got, bits_of(want)) << "x=" << x << " (0x" << std::hex << b << ")";
    }
  }
}
#endif

TEST(LoadStore, RoundTripAndRounding) {
  std::mt19937_64 rng(24);
  std::normal_distribution<float> normal(0.0f, 100.0f);
  for (DType dtype : {DType::float32, DType::float16, DType::bfloat16}) {
    std::vector<unsigned char> buffer(static_cast<size_t>(64 * dtype_size(dtype)));
    for (int i = 0; i < 2000; ++i) {
      const float x = normal(rng);
      const int64_t at = i % 64;
      store(buffer.data(), dtype, at, x);
      const float back = load(buffer.data(), dtype, at);
      const float want = dtype == DType::float16    ? kHalf.round(x)
                         : dtype == DType::bfloat16 ? kBfloat.round(x)
                                                    : x;
      ASSERT_EQ(bits_of(back), bits_of(want)) << dtype_name(dtype) << " x=" << x;
      ASSERT_EQ(bits_of(round_to(dtype, x)), bits_of(want)) << dtype_name(dtype) << " x=" << x;
      // A stored value is exactly representable: storing it again changes nothing.
      store(buffer.data(), dtype, at, back);
      ASSERT_EQ(bits_of(load(buffer.data(), dtype, at)), bits_of(back));
    }
  }
  // Elements are addressed by element offset, not byte offset.
  std::vector<uint16_t> halves(4, 0);
  store(halves.data(), DType::float16, 2, 1.0f);
  EXPECT_EQ(halves, (std::vector<uint16_t>{0, 0, 0x3c00, 0}));
  std::vector<uint16_t> bf(4, 0);
  store(bf.data(), DType::bfloat16, 3, -2.0f);
  EXPECT_EQ(bf, (std::vector<uint16_t>{0, 0, 0, 0xc000}));
  std::vector<int32_t> ints = {7, -3};
  EXPECT_EQ(load(ints.data(), DType::int32, 1), -3.0f);
}

}  // namespace
}  // namespace moba::core
