// Tests of the routing rule every backend shares (src/core/routing.hpp):
// core::select_blocks against a brute-force sort-based selection, plus the
// properties of spec step 4 stated one by one, and the block geometry helpers.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/routing.hpp"

namespace moba::core {
namespace {

constexpr int32_t kSentinel = 0x5a5a5a5a;  // marks out[] entries beyond width

// The spec's selection written the obvious way: order the past blocks by
// (finite before NaN, higher score first, lower index first), keep the first
// top_k - 1, add the current block, sort ascending, pad with -1.
template <class Score>
std::vector<int32_t> brute_force_selection(const std::vector<Score>& scores, int64_t current,
                                           int64_t top_k, int64_t width) {
  std::vector<int32_t> past(static_cast<size_t>(current));
  std::iota(past.begin(), past.end(), 0);
  std::sort(past.begin(), past.end(), [&](int32_t a, int32_t b) {
    const Score sa = scores[static_cast<size_t>(a)];
    const Score sb = scores[static_cast<size_t>(b)];
    const int class_a = std::isnan(sa) ? 1 : 0;
    const int class_b = std::isnan(sb) ? 1 : 0;
    if (class_a != class_b) return class_a < class_b;
    if (class_a == 0 && sa != sb) return sa > sb;
    return a < b;
  });
  const size_t keep = static_cast<size_t>(std::min<int64_t>(top_k - 1, current));
  std::vector<int32_t> selected(past.begin(), past.begin() + static_cast<std::ptrdiff_t>(keep));
  selected.push_back(static_cast<int32_t>(current));
  std::sort(selected.begin(), selected.end());
  selected.resize(static_cast<size_t>(width), -1);
  return selected;
}

// Runs select_blocks on a copy of the past scores that is exactly `current`
// long (so a sanitizer build catches any read of a future entry) and checks
// the entries past `width` are left alone.
template <class Score>
std::vector<int32_t> run_select(const std::vector<Score>& scores, int64_t current, int64_t top_k,
                                int64_t width, int64_t* count) {
  const std::vector<Score> past(scores.begin(), scores.begin() + current);
  std::vector<int32_t> out(static_cast<size_t>(width + 2), kSentinel);
  *count = select_blocks(past.data(), current, top_k, out.data(), width);
  EXPECT_EQ(out[static_cast<size_t>(width)], kSentinel) << "wrote past width";
  EXPECT_EQ(out[static_cast<size_t>(width + 1)], kSentinel) << "wrote past width";
  out.resize(static_cast<size_t>(width));
  return out;
}

std::string show(const std::vector<int32_t>& v) {
  std::ostringstream s;
  s << '[';
  for (size_t i = 0; i < v.size(); ++i) s << (i ? "," : "") << v[i];
  s << ']';
  return s.str();
}

template <class Score>
std::string show_scores(const std::vector<Score>& v, int64_t current) {
  std::ostringstream s;
  s << '[';
  for (int64_t i = 0; i < current; ++i) s << (i ? "," : "") << v[static_cast<size_t>(i)];
  s << ']';
  return s.str();
}

// Draws score vectors of several kinds: continuous values, values from a tiny
// integer set (many exact ties), and either of those with NaN and +-inf mixed in.
template <class Score>
std::vector<Score> draw_scores(std::mt19937_64& rng, int64_t n) {
  std::vector<Score> scores(static_cast<size_t>(n));
  const int kind = std::uniform_int_distribution<int>(0, 4)(rng);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_int_distribution<int> tiny(-1, 1);
  std::uniform_int_distribution<int> percent(0, 99);
  for (auto& s : scores) {
    s = (kind == 0 || kind == 3) ? static_cast<Score>(normal(rng)) : static_cast<Score>(tiny(rng));
    if (kind >= 3) {
      const int r = percent(rng);
      if (r < 15)
        s = std::numeric_limits<Score>::quiet_NaN();
      else if (r < 20)
        s = std::numeric_limits<Score>::infinity();
      else if (r < 25)
        s = -std::numeric_limits<Score>::infinity();
    }
    if (kind == 4 && percent(rng) < 50) s = std::numeric_limits<Score>::quiet_NaN();
  }
  return scores;
}

template <class Score>
void check_random_against_brute_force(uint64_t seed, int iterations) {
  std::mt19937_64 rng(seed);
  for (int it = 0; it < iterations; ++it) {
    const int64_t current = std::uniform_int_distribution<int64_t>(0, 40)(rng);
    const int64_t top_k = std::uniform_int_distribution<int64_t>(1, 45)(rng);
    const int64_t count = std::min(top_k, current + 1);
    const int64_t width = count + std::uniform_int_distribution<int64_t>(0, 3)(rng);
    // Future entries (index > current) hold +inf: a rule that read them would pick them.
    std::vector<Score> scores = draw_scores<Score>(rng, current + 5);
    for (size_t j = static_cast<size_t>(current); j < scores.size(); ++j)
      scores[j] = std::numeric_limits<Score>::infinity();

    int64_t got_count = -1;
    const std::vector<int32_t> got = run_select(scores, current, top_k, width, &got_count);
    const std::vector<int32_t> want = brute_force_selection(scores, current, top_k, width);
    ASSERT_EQ(got_count, count) << "current=" << current << " top_k=" << top_k;
    ASSERT_EQ(got, want) << "current=" << current << " top_k=" << top_k
                         << " scores=" << show_scores(scores, current);
  }
}

TEST(SelectBlocks, MatchesBruteForceFloat) {
  check_random_against_brute_force<float>(11, 6000);
}

TEST(SelectBlocks, MatchesBruteForceDouble) {
  check_random_against_brute_force<double>(12, 6000);
}

// The invariants of spec step 4, checked directly on random inputs (so a
// mistake shared by select_blocks and the brute force would still show).
TEST(SelectBlocks, Invariants) {
  std::mt19937_64 rng(13);
  for (int it = 0; it < 4000; ++it) {
    const int64_t current = std::uniform_int_distribution<int64_t>(0, 60)(rng);
    const int64_t top_k = std::uniform_int_distribution<int64_t>(1, 70)(rng);
    const int64_t count = std::min(top_k, current + 1);
    const int64_t width = count + std::uniform_int_distribution<int64_t>(0, 4)(rng);
    const std::vector<float> scores = draw_scores<float>(rng, current);
    int64_t got_count = -1;
    const std::vector<int32_t> out = run_select(scores, current, top_k, width, &got_count);
    SCOPED_TRACE(::testing::Message()
                 << "current=" << current << " top_k=" << top_k << " out=" << show(out));
    ASSERT_EQ(got_count, count);
    EXPECT_EQ(num_selected(current, top_k), count);
    // Exactly `count` entries, strictly ascending, within 0..current, then -1.
    for (int64_t m = 0; m < count; ++m) {
      const int32_t b = out[static_cast<size_t>(m)];
      ASSERT_GE(b, 0);
      ASSERT_LE(b, current) << "future block selected";
      if (m > 0) {
        ASSERT_LT(out[static_cast<size_t>(m - 1)], b) << "not strictly ascending";
      }
    }
    for (int64_t m = count; m < width; ++m) ASSERT_EQ(out[static_cast<size_t>(m)], -1);
    // The current block is always there (and, being the largest, last).
    ASSERT_EQ(out[static_cast<size_t>(count - 1)], current);
    // No unselected past block ranks above a selected one.
    std::vector<bool> chosen(static_cast<size_t>(current + 1), false);
    for (int64_t m = 0; m < count; ++m)
      chosen[static_cast<size_t>(out[static_cast<size_t>(m)])] = true;
    for (int32_t a = 0; a < current; ++a) {
      if (!chosen[static_cast<size_t>(a)]) continue;
      for (int32_t b = 0; b < current; ++b) {
        if (chosen[static_cast<size_t>(b)]) continue;
        const float sa = scores[static_cast<size_t>(a)], sb = scores[static_cast<size_t>(b)];
        if (std::isnan(sa)) {
          ASSERT_TRUE(std::isnan(sb)) << "NaN block " << a << " kept over non-NaN " << b;
          ASSERT_LT(a, b) << "NaN tie not broken toward the lower index";
        } else if (!std::isnan(sb)) {
          ASSERT_GE(sa, sb) << "block " << a << " kept over better block " << b;
          if (sa == sb) {
            ASSERT_LT(a, b) << "tie not broken toward the lower index";
          }
        }
      }
    }
  }
}

TEST(SelectBlocks, TargetedCases) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  struct Example {
    std::vector<float> past;
    int64_t top_k;
    std::vector<int32_t> expected;  // ascending, padded to the width used below
  };
  const std::vector<Example> examples = {
      // Block 0 only: the current block alone, whatever top_k is.
      {{}, 1, {0}},
      {{}, 5, {0, -1, -1}},
      // top_k 1: only the current block, even with great past scores.
      {{9.0f, 8.0f}, 1, {2}},
      // Best past block wins.
      {{1.0f, 3.0f, 2.0f}, 2, {1, 3}},
      {{1.0f, 3.0f, 2.0f}, 3, {1, 2, 3}},
      // Every past block fits.
      {{1.0f, 3.0f, 2.0f}, 4, {0, 1, 2, 3}},
      {{1.0f, 3.0f, 2.0f}, 9, {0, 1, 2, 3, -1}},
      // Ties go to the lower block index.
      {{5.0f, 5.0f, 5.0f, 5.0f}, 3, {0, 1, 4}},
      {{1.0f, 5.0f, 2.0f, 5.0f, 5.0f}, 3, {1, 3, 5}},
      // +0 and -0 compare equal: a tie.
      {{-0.0f, 0.0f}, 2, {0, 2}},
      {{0.0f, -0.0f}, 2, {0, 2}},
      // NaN ranks below everything, -inf included; among NaNs the lower index.
      {{nan, -inf, nan}, 2, {1, 3}},
      {{nan, 1.0f}, 2, {1, 2}},
      {{nan, nan, nan}, 3, {0, 1, 3}},
      {{nan, -1e30f, nan, 0.0f}, 3, {1, 3, 4}},
      // +inf beats any finite score; two +inf tie toward the lower index.
      {{1e30f, inf, 3.0f, inf}, 3, {1, 3, 4}},
      // Negative scores: the largest (least negative) wins.
      {{-3.0f, -1.0f, -2.0f}, 2, {1, 3}},
  };
  for (const Example& e : examples) {
    const int64_t current = static_cast<int64_t>(e.past.size());
    const int64_t width = static_cast<int64_t>(e.expected.size());
    int64_t count = -1;
    const std::vector<int32_t> got = run_select(e.past, current, e.top_k, width, &count);
    EXPECT_EQ(got, e.expected) << "past=" << show_scores(e.past, current) << " top_k=" << e.top_k;
    EXPECT_EQ(count, std::min<int64_t>(e.top_k, current + 1));
  }
}

// Huge top_k (as used for "full attention") must not allocate or overflow.
TEST(SelectBlocks, HugeTopK) {
  const std::vector<double> past = {0.5, -1.0, 2.0};
  std::vector<int32_t> out(4, kSentinel);
  EXPECT_EQ(select_blocks(past.data(), 3, std::numeric_limits<int64_t>::max(), out.data(), 4), 4);
  EXPECT_EQ(out, (std::vector<int32_t>{0, 1, 2, 3}));
}

TEST(NumBlocks, MatchesCounting) {
  for (int64_t block = 1; block <= 70; ++block) {
    for (int64_t len = 0; len <= 300; ++len) {
      int64_t blocks = 0;  // blocks j with a first position j * block inside the sequence
      while (blocks * block < len) ++blocks;
      ASSERT_EQ(num_blocks(len, block), blocks) << "len=" << len << " block=" << block;
    }
  }
}

TEST(NumBlocks, LargeValues) {
  const int64_t len = int64_t{1} << 40;
  EXPECT_EQ(num_blocks(len, 1), len);
  EXPECT_EQ(num_blocks(len, 4096), int64_t{1} << 28);
  EXPECT_EQ(num_blocks(len + 1, 4096), (int64_t{1} << 28) + 1);
  EXPECT_EQ(num_blocks(len, len), 1);
  EXPECT_EQ(num_blocks(1, len), 1);
  EXPECT_EQ(num_blocks(0, len), 0);
  // Block sizes near the int64 limit ("one block, whatever the length") must not overflow.
  const int64_t max = std::numeric_limits<int64_t>::max();
  EXPECT_EQ(num_blocks(5, max), 1);
  EXPECT_EQ(num_blocks(max, max), 1);
  EXPECT_EQ(num_blocks(max, 1), max);
  EXPECT_EQ(num_blocks(max, 2), max / 2 + 1);
}

TEST(NumSelected, IsMinOfTopKAndBlocksSoFar) {
  for (int64_t current = 0; current < 50; ++current)
    for (int64_t top_k = 1; top_k < 60; ++top_k)
      ASSERT_EQ(num_selected(current, top_k), top_k < current + 1 ? top_k : current + 1);
}

TEST(RanksAbove, IsAStrictTotalOrder) {
  // On a mix of ties, NaNs and infinities, ranks_above must be irreflexive,
  // asymmetric and total (exactly one of a<b, b<a for a != b), and
  // transitive: select_blocks's heap relies on all four.
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> s = {1.0f, nan, -inf, 1.0f, inf, nan, 0.0f, -0.0f, 2.0f, -inf, inf};
  const auto n = static_cast<int32_t>(s.size());
  for (int32_t a = 0; a < n; ++a) {
    EXPECT_FALSE(ranks_above(s.data(), a, a));
    for (int32_t b = 0; b < n; ++b) {
      if (a == b) continue;
      EXPECT_NE(ranks_above(s.data(), a, b), ranks_above(s.data(), b, a)) << a << " vs " << b;
      for (int32_t c = 0; c < n; ++c) {
        if (ranks_above(s.data(), a, b) && ranks_above(s.data(), b, c)) {
          EXPECT_TRUE(ranks_above(s.data(), a, c)) << a << " " << b << " " << c;
        }
      }
    }
  }
}

}  // namespace
}  // namespace moba::core
