// The reference backend's forward pass against the spec: exact causal full
// attention when every block is selected, the spec's attention over its own
// routing otherwise, and the structural consequences the spec lists
// (causality, block 0, empty sequences, chunked prefill, strides).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "spec_oracle.hpp"
#include "support/testing.hpp"

namespace moba::testing {
namespace {

using spec::copy_rows;
using spec::Seq;

// The library computes the default scale as a float; the fp64 oracles would
// use 1/sqrt(D) in double. Pinning the float value makes both use the same
// scale so the comparisons can be as tight as one output rounding.
Case with_float_scale(Case c) {
  if (!c.softmax_scale) c.softmax_scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  return c;
}

// The magnitude of the fp64 terms behind an output: attention averages unit
// normal values, so outputs and their noise stay O(1).
constexpr double kUnitScale = 1.0;

void expect_matches_dense(const Workload& w) {
  SCOPED_TRACE(describe(w.c));
  Tensor out, lse;
  spec::run_forward(w, out, lse);
  std::vector<double> dense_out, dense_lse;
  dense_causal_attention(w, dense_out, dense_lse);
  EXPECT_TRUE(spec::within_one_rounding(out.to_double(), dense_out, w.c.dtype, kUnitScale));
  EXPECT_TRUE(spec::within_one_rounding(lse.to_double(), dense_lse, DType::float32, kUnitScale));
}

class ReferenceForward : public ::testing::TestWithParam<DType> {};

// Spec: "K >= n for every sequence (or B >= L) gives exactly causal full
// attention". Random varlen batches, chunked prefill, GQA 1/4/8.
TEST_P(ReferenceForward, FullTopKEqualsDenseCausal) {
  std::mt19937_64 rng(100 + static_cast<int>(GetParam()));
  for (int it = 0; it < 40; ++it) {
    // Mostly small head dims (the reference is slow); every tenth case D = 128.
    const std::vector<int64_t> dims =
        it % 10 == 9 ? std::vector<int64_t>{128} : std::vector<int64_t>{8, 16, 32, 64};
    Case c = with_float_scale(random_case(rng, GetParam(), dims, 100));
    int32_t longest = 1;
    for (int32_t l : c.lens_k.empty() ? c.lens_q : c.lens_k) longest = std::max(longest, l);
    if (it % 8 == 4) {  // "all blocks" as users write it
      c.top_k = std::numeric_limits<int64_t>::max();
    } else if (it % 2 == 0) {
      c.top_k = (longest + c.block_size - 1) / c.block_size +
                std::uniform_int_distribution<int>(0, 2)(rng);
    } else if (it % 8 == 5) {  // "one block" as users write it
      c.block_size = std::numeric_limits<int64_t>::max();
      c.top_k = std::uniform_int_distribution<int>(1, 3)(rng);
    } else {  // one block per sequence, any top_k
      c.block_size = longest + std::uniform_int_distribution<int>(0, 5)(rng);
      c.top_k = std::uniform_int_distribution<int>(1, 3)(rng);
    }
    expect_matches_dense(make_workload(c));
  }
}

TEST_P(ReferenceForward, FullTopKEqualsDenseCausalHeadDim128) {
  Case c;
  c.lens_q = {29, 0, 47};
  c.lens_k = {40, 5, 47};
  c.heads_q = 4;
  c.heads_kv = 1;
  c.head_dim = 128;
  c.block_size = 8;
  c.top_k = 6;
  c.dtype = GetParam();
  c.seed = 7;
  expect_matches_dense(make_workload(with_float_scale(c)));
}

// With a routing that skips blocks, the output and lse equal the spec's
// attention computed by the test over the selection the reference reports
// (the selection itself is checked against the spec in test_routing.cpp).
TEST_P(ReferenceForward, SparseRoutingMatchesSpecAttention) {
  std::mt19937_64 rng(200 + static_cast<int>(GetParam()));
  for (int it = 0; it < 40; ++it) {
    const std::vector<int64_t> dims =
        it % 10 == 9 ? std::vector<int64_t>{128} : std::vector<int64_t>{8, 16, 32, 64};
    Case c = with_float_scale(random_case(rng, GetParam(), dims, 100));
    c.block_size = std::vector<int64_t>{1, 3, 4, 8, 16}[static_cast<size_t>(it % 5)];
    c.top_k = std::vector<int64_t>{1, 2, 3}[static_cast<size_t>(it % 3)];
    const Workload w = make_workload(c);
    SCOPED_TRACE(describe(c));
    Tensor out, lse;
    spec::run_forward(w, out, lse);
    std::vector<double> want_out, want_lse;
    spec::attention(w, spec::run_routing(w), want_out, want_lse);
    EXPECT_TRUE(spec::within_one_rounding(out.to_double(), want_out, c.dtype, kUnitScale));
    EXPECT_TRUE(spec::within_one_rounding(lse.to_double(), want_lse, DType::float32, kUnitScale));
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, ReferenceForward,
                         ::testing::Values(DType::float32, DType::float16, DType::bfloat16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

// fp16/bf16 inputs are read exactly, the math is fp64 and only the output is
// rounded: so the result is the fp32 result (on the same values) rounded
// once more, and the lse (always fp32) is the same bits.
class ReferenceForwardHalf : public ::testing::TestWithParam<DType> {};

TEST_P(ReferenceForwardHalf, IsFp32RoundedOnce) {
  std::mt19937_64 rng(300 + static_cast<int>(GetParam()));
  for (int it = 0; it < 12; ++it) {
    Case c = with_float_scale(random_case(rng, GetParam(), {16, 32}, 80));
    c.top_k = 1000;  // the block means are rounded to the dtype, so compare full attention
    const Workload narrow = make_workload(c);
    Case c32 = c;
    c32.dtype = DType::float32;
    Workload wide = make_workload(c32);
    for (auto [src, dst] :
         {std::pair{&narrow.q, &wide.q}, {&narrow.k, &wide.k}, {&narrow.v, &wide.v}})
      for (int64_t i = 0; i < src->numel(); ++i) dst->set(i, src->get(i));
    Tensor out16, lse16, out32, lse32;
    spec::run_forward(narrow, out16, lse16);
    spec::run_forward(wide, out32, lse32);
    SCOPED_TRACE(describe(c));
    EXPECT_TRUE(spec::within_one_rounding(out16.to_double(), out32.to_double(), c.dtype, 0.0));
    EXPECT_TRUE(spec::same_bytes(lse16, lse32));
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, ReferenceForwardHalf,
                         ::testing::Values(DType::float16, DType::bfloat16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

// softmax_scale is honoured: with full top-k the output is dense attention
// at that scale, and different scales give different outputs.
TEST(ReferenceForwardScale, SoftmaxScaleHonoured) {
  Case c;
  c.lens_q = {23, 31};
  c.heads_q = 2;
  c.heads_kv = 1;
  c.head_dim = 16;
  c.block_size = 4;
  c.top_k = 100;
  std::vector<double> previous;
  for (float scale : {0.03125f, 0.3f, 1.7f}) {
    c.softmax_scale = scale;
    const Workload w = make_workload(c);
    expect_matches_dense(w);
    Tensor out, lse;
    spec::run_forward(w, out, lse);
    const std::vector<double> now = out.to_double();
    if (!previous.empty()) {
      EXPECT_GT(compare(now, previous).max_abs, 1e-2) << "scale " << scale << " had no effect";
    }
    previous = now;
  }
}

// Without softmax_scale the scale is 1/sqrt(D) (up to rounding the scale to
// fp32, hence a few fp32 ulps of slack).
TEST(ReferenceForwardScale, DefaultScaleIsInverseSqrtHeadDim) {
  for (int64_t d : {8, 64, 128}) {
    Case c;
    c.lens_q = {19};
    c.heads_q = 2;
    c.heads_kv = 2;
    c.head_dim = d;
    c.block_size = 5;
    c.top_k = 10;
    const Workload w = make_workload(c);  // softmax_scale unset
    Tensor out, lse;
    spec::run_forward(w, out, lse);
    std::vector<double> dense_out, dense_lse;
    dense_causal_attention(w, dense_out, dense_lse);  // 1/sqrt(D) in fp64
    EXPECT_LT(compare(out.to_double(), dense_out).max_abs, 1e-6) << "D=" << d;
    EXPECT_LT(compare(lse.to_double(), dense_lse).max_abs, 1e-6) << "D=" << d;
  }
}

// Spec: a query's output depends only on keys/values at positions <= its
// own. Perturbing k and v after a cut must leave every output (and lse) of
// the queries up to the cut bit-identical — this covers "a query in block 0
// attends only to keys 0..p" and "future blocks are never selected".
TEST(ReferenceForwardStructure, OutputsIgnoreLaterKeysAndValues) {
  std::mt19937_64 rng(400);
  for (int it = 0; it < 20; ++it) {
    Case c = with_float_scale(random_case(rng, DType::float32, {8, 16}, 80));
    c.block_size = std::vector<int64_t>{2, 4, 7}[static_cast<size_t>(it % 3)];
    c.top_k = 2 + it % 2;
    const Workload base = make_workload(c);
    Tensor base_out, base_lse;
    spec::run_forward(base, base_out, base_lse);
    const std::vector<Seq> seqs = spec::sequences(base);
    // One cut per sequence; everything after it is redrawn.
    Workload changed = base;
    std::vector<int64_t> cut(seqs.size());
    std::normal_distribution<float> normal(0.0f, 3.0f);
    const int64_t kv_row = c.heads_kv * c.head_dim;
    for (size_t b = 0; b < seqs.size(); ++b) {
      cut[b] = seqs[b].len_k == 0
                   ? 0
                   : std::uniform_int_distribution<int64_t>(0, seqs[b].len_k - 1)(rng);
      for (int64_t t = cut[b] + 1; t < seqs[b].len_k; ++t)
        for (int64_t e = 0; e < kv_row; ++e) {
          changed.k.set((seqs[b].k_begin + t) * kv_row + e, normal(rng));
          changed.v.set((seqs[b].k_begin + t) * kv_row + e, normal(rng));
        }
    }
    Tensor out, lse;
    spec::run_forward(changed, out, lse);
    SCOPED_TRACE(describe(c));
    const int64_t q_row = c.heads_q * c.head_dim;
    for (size_t b = 0; b < seqs.size(); ++b)
      for (int64_t i = 0; i < seqs[b].len_q; ++i) {
        const int64_t row = seqs[b].q_begin + i;
        const bool before_cut = seqs[b].position(i) <= cut[b];
        bool same = true;
        for (int64_t e = 0; e < q_row; ++e)
          same = same && out.get(row * q_row + e) == base_out.get(row * q_row + e);
        for (int64_t h = 0; h < c.heads_q; ++h)
          same = same && lse.get(h * base.total_q + row) == base_lse.get(h * base.total_q + row);
        if (before_cut) {
          EXPECT_TRUE(same) << "sequence " << b << " query at " << seqs[b].position(i) << ", cut "
                            << cut[b];
        } else {  // sanity: the perturbation reaches the queries after the cut
          EXPECT_FALSE(same) << "sequence " << b << " query at " << seqs[b].position(i);
        }
      }
  }
}

// Queries of block 0 have nothing to route: whatever top_k, their output is
// causal attention over keys 0..p, i.e. the dense causal output.
TEST(ReferenceForwardStructure, BlockZeroQueriesSeeTheirPrefix) {
  Case c;
  c.lens_q = {40, 3, 33};
  c.heads_q = 4;
  c.heads_kv = 2;
  c.head_dim = 16;
  c.block_size = 8;
  c.top_k = 1;
  const Workload w = make_workload(with_float_scale(c));
  Tensor out, lse;
  spec::run_forward(w, out, lse);
  std::vector<double> dense_out, dense_lse;
  dense_causal_attention(w, dense_out, dense_lse);
  const int64_t q_row = c.heads_q * c.head_dim;
  int checked = 0;
  for (const Seq& s : spec::sequences(w))
    for (int64_t i = 0; i < std::min(s.len_q, c.block_size); ++i) {
      const int64_t row = s.q_begin + i;
      for (int64_t e = 0; e < q_row; ++e)
        EXPECT_NEAR(
            out.get(row * q_row + e), dense_out[static_cast<size_t>(row * q_row + e)],
            spec::one_rounding(DType::float32, dense_out[static_cast<size_t>(row * q_row + e)]));
      for (int64_t h = 0; h < c.heads_q; ++h)
        EXPECT_NEAR(lse.get(h * w.total_q + row),
                    dense_lse[static_cast<size_t>(h * w.total_q + row)], 1e-6);
      ++checked;
    }
  EXPECT_EQ(checked, 8 + 3 + 8);
  // And with top_k 1 later queries do differ from dense: the check above is not vacuous.
  EXPECT_GT(compare(out.to_double(), dense_out).max_abs, 1e-3);
}

// Spec: "A sequence of length 0 produces nothing and must not disturb its
// neighbours." Batches with empty sequences (no keys, or keys but no
// queries) in the middle and at the ends give, for every other sequence,
// bit-for-bit the result of running it alone.
TEST(ReferenceForwardStructure, EmptySequencesDoNotDisturbNeighbours) {
  struct Layout {
    std::vector<int32_t> lens_q, lens_k;
  };
  const std::vector<Layout> layouts = {
      {{17, 0, 25}, {17, 0, 25}},
      {{17, 0, 9}, {30, 12, 20}},  // decode-style: keys but no queries in the middle
      {{0, 21, 0, 6, 0}, {0, 21, 0, 6, 0}},
      {{0, 0, 13}, {4, 0, 13}},
  };
  for (const Layout& layout : layouts) {
    Case c;
    c.lens_q = layout.lens_q;
    c.lens_k = layout.lens_k;
    c.heads_q = 4;
    c.heads_kv = 2;
    c.head_dim = 8;
    c.block_size = 4;
    c.top_k = 2;
    c.seed = 11;
    const Workload w = make_workload(c);
    SCOPED_TRACE(describe(c));
    Tensor out, lse;
    spec::run_forward(w, out, lse);
    const Tensor selected = spec::run_routing(w, 1);
    const std::vector<Seq> seqs = spec::sequences(w);
    for (size_t b = 0; b < seqs.size(); ++b) {
      if (seqs[b].len_q == 0) continue;
      const Workload alone = spec::slice(w, b);
      Tensor alone_out, alone_lse;
      spec::run_forward(alone, alone_out, alone_lse);
      Tensor part(c.dtype, alone_out.shape());
      copy_rows(part, 0, out, seqs[b].q_begin, seqs[b].len_q);
      EXPECT_TRUE(spec::same_bytes(part, alone_out)) << "out of sequence " << b;
      for (int64_t h = 0; h < c.heads_q; ++h)
        for (int64_t i = 0; i < seqs[b].len_q; ++i)
          EXPECT_EQ(lse.get(h * w.total_q + seqs[b].q_begin + i),
                    alone_lse.get(h * alone.total_q + i))
              << "lse of sequence " << b;
      // Routing too: block indices restart at every sequence.
      const Tensor alone_selected = spec::run_routing(alone, 1);
      const int64_t width = selected.shape()[2], alone_width = alone_selected.shape()[2];
      for (int64_t i = 0; i < seqs[b].len_q; ++i)
        for (int64_t h = 0; h < c.heads_q; ++h)
          for (int64_t m = 0; m < width; ++m) {
            const float want =
                m < alone_width ? alone_selected.get((i * c.heads_q + h) * alone_width + m) : -1.0f;
            EXPECT_EQ(selected.get(((seqs[b].q_begin + i) * c.heads_q + h) * width + m), want)
                << "routing of sequence " << b << " query " << i << " head " << h;
          }
    }
  }
}

// Spec: in chunked prefill / decode the Lq queries are the last Lq
// positions. So a chunk's outputs are the last rows of the full prefill's.
TEST(ReferenceForwardStructure, ChunkedPrefillEqualsTailOfFullPrefill) {
  Case full;
  full.lens_q = {37, 16, 50};
  full.heads_q = 8;
  full.heads_kv = 1;
  full.head_dim = 16;
  full.block_size = 6;
  full.top_k = 3;
  full.seed = 5;
  const Workload whole = make_workload(full);
  Tensor whole_out, whole_lse;
  spec::run_forward(whole, whole_out, whole_lse);
  for (const std::vector<int32_t>& chunk :
       {std::vector<int32_t>{1, 1, 1}, {12, 0, 50}, {5, 16, 7}}) {
    Case c = full;
    c.lens_k = full.lens_q;
    c.lens_q = chunk;
    Workload part = make_workload(c);
    part.k = whole.k;
    part.v = whole.v;
    const std::vector<Seq> seqs = spec::sequences(part), whole_seqs = spec::sequences(whole);
    for (size_t b = 0; b < seqs.size(); ++b)
      copy_rows(part.q, seqs[b].q_begin, whole.q,
                whole_seqs[b].q_begin + whole_seqs[b].len_q - seqs[b].len_q, seqs[b].len_q);
    Tensor out, lse;
    spec::run_forward(part, out, lse);
    SCOPED_TRACE(describe(c));
    Tensor want(c.dtype, out.shape());
    for (size_t b = 0; b < seqs.size(); ++b)
      copy_rows(want, seqs[b].q_begin, whole_out,
                whole_seqs[b].q_begin + whole_seqs[b].len_q - seqs[b].len_q, seqs[b].len_q);
    EXPECT_TRUE(spec::same_bytes(out, want));
  }
}

// Strided inputs and outputs — q, k, v as slices of one packed qkv tensor,
// out with padded rows, lse stored token-major — give bit-for-bit the
// contiguous result.
TEST(ReferenceForwardStructure, StridedViewsMatchContiguous) {
  Case c;
  c.lens_q = {13, 0, 22};
  c.heads_q = 4;
  c.heads_kv = 2;
  c.head_dim = 8;
  c.block_size = 4;
  c.top_k = 2;
  c.dtype = DType::bfloat16;
  const Workload w = make_workload(c);
  Tensor out, lse;
  spec::run_forward(w, out, lse);

  const int64_t t = w.total_q, d = c.head_dim, heads = c.heads_q + 2 * c.heads_kv;
  Tensor qkv(c.dtype, {t, heads, d});
  for (int64_t r = 0; r < t; ++r)
    for (int64_t e = 0; e < c.heads_q * d; ++e)
      qkv.set(r * heads * d + e, w.q.get(r * c.heads_q * d + e));
  for (int64_t r = 0; r < t; ++r)
    for (int64_t e = 0; e < c.heads_kv * d; ++e) {
      qkv.set(r * heads * d + c.heads_q * d + e, w.k.get(r * c.heads_kv * d + e));
      qkv.set(r * heads * d + (c.heads_q + c.heads_kv) * d + e, w.v.get(r * c.heads_kv * d + e));
    }
  const auto slice_of = [&](int64_t first_head, int64_t count) {
    TensorView v = qkv.view();
    v.data = static_cast<char*>(qkv.data()) + first_head * d * dtype_size(c.dtype);
    v.shape = {t, count, d};
    return v;
  };
  Inputs in = w.inputs();
  in.q = slice_of(0, c.heads_q);
  in.k = slice_of(c.heads_q, c.heads_kv);
  in.v = slice_of(c.heads_q + c.heads_kv, c.heads_kv);
  Tensor padded(c.dtype, {t, c.heads_q + 1, d});  // one spare head per row
  padded.poison();
  TensorView out_view = padded.view();
  out_view.shape = {t, c.heads_q, d};
  Tensor lse_t(DType::float32, {t, c.heads_q});  // [Hq, total_q] stored transposed
  TensorView lse_view = lse_t.view();
  lse_view.shape = {c.heads_q, t};
  lse_view.strides = {1, c.heads_q};
  forward(in, w.config(), out_view, lse_view, spec::reference_options());
  for (int64_t r = 0; r < t; ++r)
    for (int64_t h = 0; h < c.heads_q; ++h) {
      for (int64_t e = 0; e < d; ++e)
        ASSERT_EQ(padded.get((r * (c.heads_q + 1) + h) * d + e),
                  out.get((r * c.heads_q + h) * d + e));
      ASSERT_EQ(lse_t.get(r * c.heads_q + h), lse.get(h * t + r));
    }
  // The spare head of every row is left alone.
  for (int64_t r = 0; r < t; ++r)
    EXPECT_TRUE(std::isnan(padded.get((r * (c.heads_q + 1) + c.heads_q) * d)));
}

}  // namespace
}  // namespace moba::testing
