// The reference backend's routing (moba::routing with backend reference)
// against the spec's steps 1-4, recomputed by the test from q and k.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "spec_oracle.hpp"
#include "support/testing.hpp"

namespace moba::testing {
namespace {

using spec::Seq;

const int32_t* row_of(const Tensor& selected, int64_t token, int64_t head) {
  const int64_t heads = selected.shape()[1], width = selected.shape()[2];
  return static_cast<const int32_t*>(selected.data()) + (token * heads + head) * width;
}

std::vector<int32_t> row_vector(const Tensor& selected, int64_t token, int64_t head) {
  const int32_t* row = row_of(selected, token, head);
  return std::vector<int32_t>(row, row + selected.shape()[2]);
}

// Checks every routing row of `w` against the spec recomputed from q and k;
// returns the number of near-tie swaps that were allowed.
int64_t expect_routing_follows_spec(const Workload& w, const Tensor& selected) {
  const int64_t group = w.c.heads_q / w.c.heads_kv;
  const int64_t width = selected.shape()[2];
  int64_t near_ties = 0;
  for (const Seq& s : spec::sequences(w))
    for (int64_t kv = 0; kv < w.c.heads_kv; ++kv) {
      const std::vector<double> means = spec::block_means(w, s, kv);
      for (int64_t i = 0; i < s.len_q; ++i)
        for (int64_t h = kv * group; h < (kv + 1) * group; ++h) {
          const int64_t current = s.position(i) / w.c.block_size;
          const std::vector<double> scores = spec::gate_scores(w, s, i, h, means);
          EXPECT_TRUE(spec::acceptable_selection(row_of(selected, s.q_begin + i, h), width, scores,
                                                 current, w.c.top_k, &near_ties))
              << "query " << i << " (position " << s.position(i) << ") of the sequence at row "
              << s.q_begin << ", head " << h;
          if (w.c.gqa_shared_routing && h % group != 0) {
            EXPECT_EQ(row_vector(selected, s.q_begin + i, h),
                      row_vector(selected, s.q_begin + i, kv * group))
                << "shared routing differs inside kv group " << kv << " at head " << h;
          }
        }
    }
  return near_ties;
}

class ReferenceRouting : public ::testing::TestWithParam<DType> {};

// Random varlen batches (chunked prefill, GQA 1/4/8, shared routing in a
// quarter of them): every selection is the spec's, up to near ties.
TEST_P(ReferenceRouting, FollowsSpecOnRandomCases) {
  std::mt19937_64 rng(500 + static_cast<int>(GetParam()));
  int64_t near_ties = 0, queries = 0;
  for (int it = 0; it < 80; ++it) {
    Case c = random_case(rng, GetParam(), {8, 16, 32, 64}, 100);
    c.block_size = std::vector<int64_t>{1, 2, 3, 5, 8, 16}[static_cast<size_t>(it % 6)];
    c.top_k = std::vector<int64_t>{1, 2, 3, 4, 7}[static_cast<size_t>(it % 5)];
    const Workload w = make_workload(c);
    SCOPED_TRACE(describe(c));
    near_ties += expect_routing_follows_spec(w, spec::run_routing(w, it % 3));
    queries += w.total_q * c.heads_q;
  }
  // Near ties must stay rare: a rule that ignored the scores would need them everywhere.
  EXPECT_LT(near_ties * 1000, queries)
      << near_ties << " near-tie swaps in " << queries << " selections";
}

// q and k drawn from {-1, 0, 1} with full blocks: block means and scores are
// exact, so exact ties abound and must go to the lower block index, with no
// allowance at all.
TEST_P(ReferenceRouting, ExactTiesGoToLowerBlock) {
  std::mt19937_64 rng(600 + static_cast<int>(GetParam()));
  std::uniform_int_distribution<int> tiny(-1, 1);
  int64_t tied = 0;
  for (int it = 0; it < 20; ++it) {
    Case c;
    c.dtype = GetParam();
    c.block_size = std::vector<int64_t>{1, 2, 4, 8}[static_cast<size_t>(it % 4)];
    c.top_k = 2 + it % 3;
    c.heads_kv = 1 + it % 2;
    c.heads_q = c.heads_kv * (it % 3 == 0 ? 1 : 4);
    c.head_dim = 8;
    c.gqa_shared_routing = it % 4 == 1;
    for (int b = 0; b < 3; ++b) {
      const int32_t len =
          static_cast<int32_t>(c.block_size * std::uniform_int_distribution<int>(0, 12)(rng));
      c.lens_k.push_back(len);
      c.lens_q.push_back(it % 2 ? len : std::uniform_int_distribution<int32_t>(0, len)(rng));
    }
    Workload w = make_workload(c);
    spec::fill(w.q, [&] { return tiny(rng); });
    spec::fill(w.k, [&] { return tiny(rng); });
    const Tensor selected = spec::run_routing(w);
    const int64_t group = c.heads_q / c.heads_kv;
    SCOPED_TRACE(describe(c));
    for (const Seq& s : spec::sequences(w))
      for (int64_t i = 0; i < s.len_q; ++i)
        for (int64_t h = 0; h < c.heads_q; ++h) {
          const std::vector<double> scores =
              spec::gate_scores(w, s, i, h, spec::block_means(w, s, h / group));
          const int64_t current = s.position(i) / c.block_size;
          std::vector<int32_t> want = spec::expected_selection(scores, current, c.top_k);
          want.resize(static_cast<size_t>(selected.shape()[2]), -1);
          ASSERT_EQ(row_vector(selected, s.q_begin + i, h), want) << "query " << i << " head " << h;
          for (size_t a = 0; a < scores.size(); ++a)
            for (size_t b = a + 1; b < scores.size(); ++b) tied += scores[a] == scores[b];
        }
  }
  EXPECT_GT(tied, 1000) << "the draw should produce many exact ties";
}

INSTANTIATE_TEST_SUITE_P(Dtypes, ReferenceRouting,
                         ::testing::Values(DType::float32, DType::float16, DType::bfloat16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

// Without shared routing each query head routes on its own scores: redrawing
// q of head 0 changes head 0's routing and nothing else.
TEST(ReferenceRoutingHeads, HeadsRouteIndependently) {
  for (int64_t heads_kv : {1, 2}) {
    Case c;
    c.lens_q = {60, 45};
    c.lens_k = {60, 70};
    c.heads_q = 4;
    c.heads_kv = heads_kv;
    c.head_dim = 16;
    c.block_size = 4;
    c.top_k = 3;
    const Workload base = make_workload(c);
    const Tensor before = spec::run_routing(base);
    Workload changed = base;
    std::mt19937_64 rng(700);
    std::normal_distribution<float> normal;
    for (int64_t t = 0; t < base.total_q; ++t)
      for (int64_t e = 0; e < c.head_dim; ++e)
        changed.q.set(t * c.heads_q * c.head_dim + e, normal(rng));
    const Tensor after = spec::run_routing(changed);
    int head0_changes = 0;
    for (int64_t t = 0; t < base.total_q; ++t) {
      head0_changes += row_vector(before, t, 0) != row_vector(after, t, 0);
      for (int64_t h = 1; h < c.heads_q; ++h)
        ASSERT_EQ(row_vector(before, t, h), row_vector(after, t, h))
            << "token " << t << " head " << h;
    }
    EXPECT_GT(head0_changes, 10) << "redrawing q of head 0 should change its routing";
  }
}

// gqa_shared_routing: all heads of a kv group share one selection, the one
// the sum of their scores makes; other groups are unaffected by a group's q.
TEST(ReferenceRoutingHeads, SharedRoutingUsesGroupSum) {
  Case c;
  c.lens_q = {50, 0, 64};
  c.lens_k = {50, 9, 80};
  c.heads_q = 8;
  c.heads_kv = 2;
  c.head_dim = 16;
  c.block_size = 4;
  c.top_k = 3;
  c.gqa_shared_routing = true;
  const Workload w = make_workload(c);
  const Tensor shared = spec::run_routing(w);
  expect_routing_follows_spec(w, shared);  // group sums, and identical rows within a group

  // The shared selection is not just one head's own: it differs from the
  // unshared one for some query head.
  Workload own = w;
  own.c.gqa_shared_routing = false;
  const Tensor unshared = spec::run_routing(own);
  int differ = 0;
  for (int64_t t = 0; t < w.total_q; ++t)
    for (int64_t h = 0; h < c.heads_q; ++h)
      differ += row_vector(shared, t, h) != row_vector(unshared, t, h);
  EXPECT_GT(differ, 10);

  // Redrawing q of head 0 (group 0) leaves group 1 (heads 4..7) alone.
  Workload changed = w;
  std::mt19937_64 rng(701);
  std::normal_distribution<float> normal;
  for (int64_t t = 0; t < w.total_q; ++t)
    for (int64_t e = 0; e < c.head_dim; ++e)
      changed.q.set(t * c.heads_q * c.head_dim + e, normal(rng));
  const Tensor after = spec::run_routing(changed);
  expect_routing_follows_spec(changed, after);
  int group0_changes = 0;
  for (int64_t t = 0; t < w.total_q; ++t) {
    group0_changes += row_vector(shared, t, 1) != row_vector(after, t, 1);
    for (int64_t h = 4; h < 8; ++h) ASSERT_EQ(row_vector(shared, t, h), row_vector(after, t, h));
  }
  EXPECT_GT(group0_changes, 5) << "head 0's q feeds the selection of its whole group";
}

// A case small enough to route by hand. One sequence of 8 tokens, block 2
// (4 blocks), D = 8, preceded by a 3-token sequence so block indices must
// restart. k is built so that block j's mean is e_{j+1} (the tokens of a
// block are e_{j+1} +- e_7), so query p's score for block j is q_p[j+1]; v
// of token t is e_t, and a tiny softmax_scale makes attention uniform, so
// out_p is 1/|keys| on exactly the keys query p attends to.
struct HandCase {
  Workload w;
  int64_t first_row = 0;  // row of token 0 of the hand-built sequence
};

HandCase hand_case(DType dtype, int64_t top_k, bool chunk) {
  Case c;
  c.lens_k = {3, 8};
  c.lens_q = {3, chunk ? 2 : 8};  // the chunk holds positions 6 and 7
  c.heads_q = 1;
  c.heads_kv = 1;
  c.head_dim = 8;
  c.block_size = 2;
  c.top_k = top_k;
  c.dtype = dtype;
  c.softmax_scale = std::ldexp(1.0f, -60);
  HandCase hc{make_workload(c), 3};
  Workload& w = hc.w;
  // Scores of blocks 0, 1, 2 for positions 4..7 (positions 0..3 have at most one past block).
  const float q_scores[8][3] = {{},        {},         {5, 5, 5},        {-9, 0, 0},
                                {1, 2, 0}, {3, -1, 0}, {0.5f, 0.25f, 1}, {1, 1, 1}};
  const int64_t q_first = chunk ? 6 : 0;
  for (int64_t p = q_first; p < 8; ++p) {
    const int64_t row = 3 + p - q_first;
    for (int64_t e = 0; e < 8; ++e) w.q.set(row * 8 + e, 0.0f);
    w.q.set(row * 8 + 0, 1.0f);  // no block mean has an e_0 component: no effect on routing
    for (int j = 0; j < 3; ++j) w.q.set(row * 8 + 1 + j, q_scores[p][j]);
  }
  for (int64_t t = 0; t < 8; ++t)
    for (int64_t e = 0; e < 8; ++e) {
      const float block_part = e == t / 2 + 1 ? 1.0f : 0.0f;
      const float token_part = e == 7 ? (t % 2 ? -1.0f : 1.0f) : 0.0f;
      w.k.set((3 + t) * 8 + e, block_part + token_part);
      w.v.set((3 + t) * 8 + e, e == t ? 1.0f : 0.0f);
    }
  return hc;
}

TEST(ReferenceHandCase, SelectionAndOutputAreAsComputedByHand) {
  struct Expected {
    int64_t top_k;
    std::vector<std::vector<int32_t>> blocks;  // per position 0..7 of the second sequence
    std::vector<std::vector<int32_t>> keys;
  };
  const std::vector<Expected> expected = {
      {2,
       {{0, -1}, {0, -1}, {0, 1}, {0, 1}, {1, 2}, {0, 2}, {2, 3}, {0, 3}},
       {{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {2, 3, 4}, {0, 1, 4, 5}, {4, 5, 6}, {0, 1, 6, 7}}},
      {3,
       {{0, -1, -1},
        {0, -1, -1},
        {0, 1, -1},
        {0, 1, -1},
        {0, 1, 2},
        {0, 1, 2},
        {0, 2, 3},
        {0, 1, 3}},
       {{0},
        {0, 1},
        {0, 1, 2},
        {0, 1, 2, 3},
        {0, 1, 2, 3, 4},
        {0, 1, 2, 3, 4, 5},
        {0, 1, 4, 5, 6},
        {0, 1, 2, 3, 6, 7}}},
  };
  for (DType dtype : {DType::float32, DType::float16, DType::bfloat16})
    for (const Expected& e : expected)
      for (bool chunk : {false, true}) {
        const HandCase hc = hand_case(dtype, e.top_k, chunk);
        SCOPED_TRACE(describe(hc.w.c) + (chunk ? " (chunk)" : ""));
        const Tensor selected = spec::run_routing(hc.w);
        ASSERT_EQ(selected.shape()[2], e.top_k);
        // The 3-token first sequence: blocks {0}, {0}, {0, 1}.
        if (!chunk) {
          EXPECT_EQ(row_vector(selected, 0, 0)[0], 0);
          EXPECT_EQ(row_vector(selected, 1, 0)[0], 0);
          EXPECT_EQ(row_vector(selected, 2, 0)[1], 1);
        }
        Tensor out, lse;
        spec::run_forward(hc.w, out, lse);
        for (int64_t p = chunk ? 6 : 0; p < 8; ++p) {
          const int64_t row = hc.first_row + p - (chunk ? 6 : 0);
          EXPECT_EQ(row_vector(selected, row, 0), e.blocks[static_cast<size_t>(p)])
              << "position " << p;
          const std::vector<int32_t>& keys = e.keys[static_cast<size_t>(p)];
          std::vector<double> want(8, 0.0), got(8);
          for (int32_t t : keys)
            want[static_cast<size_t>(t)] = 1.0 / static_cast<double>(keys.size());
          for (int64_t x = 0; x < 8; ++x) got[static_cast<size_t>(x)] = out.get(row * 8 + x);
          EXPECT_TRUE(spec::within_one_rounding(got, want, dtype)) << "position " << p;
          EXPECT_NEAR(lse.get(row), std::log(static_cast<double>(keys.size())), 1e-6)
              << "position " << p;
        }
      }
}

// Spec step 2: the block means are rounded to k's dtype (through fp32)
// before scoring. Block 1's keys average to 1 + u/4 in component 0 (u: the
// dtype's spacing at 1), which rounds to 1, and to -u/16 in component 1;
// block 0's mean is (1, 0). With q = (1, 1): rounded means score block 0 at
// 1 and block 1 at 1 - u/16, so block 0 wins; unrounded means would score
// block 1 at 1 + 3u/16 and pick it. (For fp32 the mean itself is an fp32
// value, so the same holds.)
TEST(ReferenceHandCase, BlockMeansAreRoundedToTheInputDtype) {
  for (DType dtype : {DType::float32, DType::float16, DType::bfloat16}) {
    const float u = std::ldexp(1.0f, dtype == DType::float16    ? -10
                                     : dtype == DType::bfloat16 ? -7
                                                                : -23);
    Case c;
    c.lens_q = {9};
    c.heads_q = 1;
    c.heads_kv = 1;
    c.head_dim = 8;
    c.block_size = 4;
    c.top_k = 2;
    c.dtype = dtype;
    Workload w = make_workload(c);
    for (int64_t t = 0; t < 9; ++t)
      for (int64_t e = 0; e < 8; ++e) {
        float k = 0.0f;
        if (e == 0 && t < 8) k = t == 5 ? 1.0f + u : 1.0f;
        if (e == 1 && t / 4 == 1) k = -u / 16;
        w.k.set(t * 8 + e, k);
        w.q.set(t * 8 + e, e < 2 ? 1.0f : 0.0f);
      }
    ASSERT_EQ(w.k.get(5 * 8), 1.0f + u) << "the keys must be exact in " << dtype_name(dtype);
    ASSERT_EQ(w.k.get(4 * 8 + 1), -u / 16) << "the keys must be exact in " << dtype_name(dtype);
    const Tensor selected = spec::run_routing(w);
    EXPECT_EQ(row_vector(selected, 8, 0), (std::vector<int32_t>{0, 2})) << dtype_name(dtype);
  }
}

// A block whose mean is NaN (its keys hold +inf and -inf in one component)
// has a NaN score for every query, which ranks below every number.
TEST(ReferenceHandCase, NaNScoreRanksLowest) {
  const float inf = std::numeric_limits<float>::infinity();
  for (DType dtype : {DType::float32, DType::float16, DType::bfloat16}) {
    Case c;
    c.lens_q = {8};
    c.heads_q = 1;
    c.heads_kv = 1;
    c.head_dim = 8;
    c.block_size = 2;
    c.dtype = dtype;
    for (int64_t top_k : {2, 3, 4}) {
      c.top_k = top_k;
      Workload w = make_workload(c);
      for (int64_t t = 0; t < 8; ++t)
        for (int64_t e = 0; e < 8; ++e) {
          float k = 0.0f;
          if (t / 2 == 0 && e == 1) k = 1.0f;                 // kbar_0 = e_1
          if (t / 2 == 2 && e == 2) k = 1.0f;                 // kbar_2 = e_2
          if (t / 2 == 1 && e == 0) k = t == 2 ? inf : -inf;  // kbar_1 = NaN e_0
          w.k.set(t * 8 + e, k);
          // Scores: block 0 -> -5, block 1 -> NaN, block 2 -> -7.
          w.q.set(t * 8 + e, e == 1 ? -5.0f : e == 2 ? -7.0f : 0.0f);
        }
      const Tensor selected = spec::run_routing(w);
      SCOPED_TRACE(describe(c));
      const std::vector<std::vector<int32_t>> want =
          top_k == 2 ? std::vector<std::vector<int32_t>>{{0, 2}, {0, 2}, {0, 3}, {0, 3}}
          : top_k == 3
              ? std::vector<std::vector<int32_t>>{{0, 1, 2}, {0, 1, 2}, {0, 2, 3}, {0, 2, 3}}
              : std::vector<std::vector<int32_t>>{
                    {0, 1, 2, -1}, {0, 1, 2, -1}, {0, 1, 2, 3}, {0, 1, 2, 3}};
      for (int64_t p = 4; p < 8; ++p)
        EXPECT_EQ(row_vector(selected, p, 0), want[static_cast<size_t>(p - 4)]) << "position " << p;
    }
  }
}

}  // namespace
}  // namespace moba::testing
