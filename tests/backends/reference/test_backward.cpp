// The reference backend's backward pass: against central finite
// differences of its own forward (the ground truth that needs no second
// derivation), against the spec's gradients recomputed by the test, and the
// structural properties (no gradient to keys nobody attends, empty
// sequences, dtype rounding).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <random>
#include <vector>

#include "spec_oracle.hpp"
#include "support/testing.hpp"

namespace moba::testing {
namespace {

using spec::Seq;

Case with_float_scale(Case c) {
  if (!c.softmax_scale) c.softmax_scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  return c;
}

double loss(const Workload& w, const Tensor& weights) {
  Tensor out, lse;
  spec::run_forward(w, out, lse);
  double sum = 0.0;
  for (int64_t i = 0; i < out.numel(); ++i) sum += static_cast<double>(out.get(i)) * weights.get(i);
  return sum;
}

// dL/dx for L = sum(out * W), checked coordinate by coordinate against
// (L(x + h) - L(x - h)) / 2h on every element of q, k and v. The inputs are
// multiples of 1/64 and h = 2^-7, so x +- h is exact in fp32; the reference
// computes in fp64 and rounds only its outputs, so the difference quotient is
// accurate to ~1e-5 (fp32 output rounding amplified by 1/2h, plus an O(h^2)
// truncation term). The routing is sparse (block 4, top-k 2, group 2, a
// chunked-prefill sequence), the scale is not the default, and every
// coordinate whose nudge changes the routing is skipped: the routing passes
// no gradient, so there the loss is not differentiable.
TEST(ReferenceBackward, MatchesCentralFiniteDifferences) {
  Case c;
  // The second sequence is a chunk of 5 queries over 24 keys: only there do
  // keys exist that no query attends (elsewhere each key is in the current
  // block of the query at its own position).
  c.lens_q = {16, 5};
  c.lens_k = {16, 24};
  c.heads_q = 4;
  c.heads_kv = 2;
  c.head_dim = 8;
  c.block_size = 4;
  c.top_k = 2;
  c.softmax_scale = 0.7f;
  Workload w = make_workload(c);
  std::mt19937_64 rng(800);
  std::uniform_int_distribution<int> sixty_fourths(-64, 64);
  for (Tensor* t : {&w.q, &w.k, &w.v}) spec::fill(*t, [&] { return sixty_fourths(rng) / 64.0; });
  Tensor weights = w.new_out();
  weights.randn(rng);

  const spec::Grads grads = spec::run_backward(w, weights);
  const Tensor routing = spec::run_routing(w);
  // Sparse routing: some keys are attended by no query and get exactly zero gradient.
  const std::vector<bool> used = spec::attended_keys(w, routing);
  ASSERT_LT(std::count(used.begin(), used.end(), true), static_cast<std::ptrdiff_t>(used.size()));
  for (size_t key = 0; key < used.size(); ++key)
    for (int64_t e = 0; e < c.head_dim; ++e)
      if (!used[key]) {
        ASSERT_EQ(grads.dk.get(static_cast<int64_t>(key) * c.head_dim + e), 0.0f)
            << "key row*Hkv+head " << key;
        ASSERT_EQ(grads.dv.get(static_cast<int64_t>(key) * c.head_dim + e), 0.0f)
            << "key row*Hkv+head " << key;
      }

  const float h = 1.0f / 128.0f;
  Workload x = w;
  struct Target {
    const char* name;
    Tensor* input;
    const Tensor* grad;
    bool moves_routing;
  };
  for (const Target& target :
       {Target{"q", &x.q, &grads.dq, true}, Target{"k", &x.k, &grads.dk, true},
        Target{"v", &x.v, &grads.dv, false}}) {
    int64_t skipped = 0, checked = 0;
    double err2 = 0.0, ref2 = 0.0;
    for (int64_t i = 0; i < target.input->numel(); ++i) {
      const float x0 = target.input->get(i);
      target.input->set(i, x0 + h);
      const double plus = loss(x, weights);
      const bool routing_plus =
          !target.moves_routing || spec::same_bytes(spec::run_routing(x), routing);
      target.input->set(i, x0 - h);
      const double minus = loss(x, weights);
      const bool routing_minus =
          !target.moves_routing || spec::same_bytes(spec::run_routing(x), routing);
      target.input->set(i, x0);
      if (!routing_plus || !routing_minus) {
        ++skipped;
        continue;
      }
      ++checked;
      const double fd = (plus - minus) / (2.0 * h);
      const double g = target.grad->get(i);
      err2 += (fd - g) * (fd - g);
      ref2 += g * g;
      ASSERT_NEAR(g, fd, 1e-3 * std::abs(fd) + 1e-4) << "d" << target.name << "[" << i << "]";
    }
    SCOPED_TRACE(target.name);
    EXPECT_LT(skipped * 10, checked) << "too many coordinates flip the routing";
    EXPECT_LT(std::sqrt(err2), 1e-4 * std::sqrt(ref2)) << "relative L2 error of d" << target.name;
    EXPECT_GT(ref2, 1e-2) << "gradient of " << target.name << " should not vanish";
  }
}

// Gradients of random varlen cases (GQA 1/4/8, shared routing, chunked
// prefill, all dtypes) equal the spec's gradients recomputed by the test
// over the reference's routing, within one output rounding.
class ReferenceBackwardDtype : public ::testing::TestWithParam<DType> {};

TEST_P(ReferenceBackwardDtype, MatchesSpecGradients) {
  std::mt19937_64 rng(900 + static_cast<int>(GetParam()));
  for (int it = 0; it < 30; ++it) {
    Case c = with_float_scale(random_case(rng, GetParam(), {8, 16, 32}, 80));
    c.block_size = std::vector<int64_t>{2, 3, 8, 16, 64}[static_cast<size_t>(it % 5)];
    c.top_k = std::vector<int64_t>{1, 2, 3, 1000}[static_cast<size_t>(it % 4)];
    const Workload w = make_workload(c);
    Tensor dout = w.new_out();
    dout.randn(rng);
    SCOPED_TRACE(describe(c));
    const spec::Grads grads = spec::run_backward(w, dout);
    const Tensor routing = spec::run_routing(w);
    const spec::Gradients want = spec::attention_backward(w, routing, dout);
    // fp64 noise is relative to the sum of many O(1) terms, hence the scale.
    EXPECT_TRUE(spec::within_one_rounding(grads.dq.to_double(), want.dq, c.dtype, 100.0)) << "dq";
    EXPECT_TRUE(spec::within_one_rounding(grads.dk.to_double(), want.dk, c.dtype, 100.0)) << "dk";
    EXPECT_TRUE(spec::within_one_rounding(grads.dv.to_double(), want.dv, c.dtype, 100.0)) << "dv";
  }
}

// Keys no query attends to (unselected blocks, keys before a chunk's
// queries that no one routes to, future keys) get exactly zero dk and dv;
// attended keys get a nonzero dv (checked in fp32, where P * dout cannot
// underflow).
TEST_P(ReferenceBackwardDtype, UnattendedKeysGetExactlyZeroGradient) {
  std::mt19937_64 rng(1000 + static_cast<int>(GetParam()));
  int64_t unattended = 0;
  for (int it = 0; it < 20; ++it) {
    Case c = with_float_scale(random_case(rng, GetParam(), {8, 16}, 100));
    // Every key is attended by the query at its own position, if there is
    // one: unattended keys need chunks with few queries over many keys.
    if (c.lens_k.empty()) c.lens_k = c.lens_q;
    for (size_t b = 0; b < c.lens_q.size(); ++b)
      c.lens_q[b] = std::uniform_int_distribution<int32_t>(0, std::min(c.lens_k[b], 6))(rng);
    c.block_size = 1 + it % 5;
    c.top_k = 1 + it % 3;
    const Workload w = make_workload(c);
    Tensor dout = w.new_out();
    dout.randn(rng);
    const spec::Grads grads = spec::run_backward(w, dout);
    const std::vector<bool> used = spec::attended_keys(w, spec::run_routing(w));
    SCOPED_TRACE(describe(c));
    for (size_t key = 0; key < used.size(); ++key) {
      bool dk_zero = true, dv_zero = true;
      for (int64_t e = 0; e < c.head_dim; ++e) {
        dk_zero = dk_zero && grads.dk.get(static_cast<int64_t>(key) * c.head_dim + e) == 0.0f;
        dv_zero = dv_zero && grads.dv.get(static_cast<int64_t>(key) * c.head_dim + e) == 0.0f;
      }
      if (!used[key]) {
        ++unattended;
        EXPECT_TRUE(dk_zero && dv_zero)
            << "unattended key (row * Hkv + kv head) " << key << " got a gradient";
      } else if (c.dtype == DType::float32) {
        EXPECT_FALSE(dv_zero) << "attended key (row * Hkv + kv head) " << key << " got no dv";
      }
    }
  }
  EXPECT_GT(unattended, 100) << "the cases should leave many keys unattended";
}

INSTANTIATE_TEST_SUITE_P(Dtypes, ReferenceBackwardDtype,
                         ::testing::Values(DType::float32, DType::float16, DType::bfloat16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

// fp16/bf16 gradients are the fp32 gradients on the same values rounded once
// more (the reference reads inputs exactly and accumulates in fp64). Full
// top-k, because the block means, and so the routing, are rounded to the
// dtype.
class ReferenceBackwardHalf : public ::testing::TestWithParam<DType> {};

TEST_P(ReferenceBackwardHalf, IsFp32RoundedOnce) {
  std::mt19937_64 rng(1100 + static_cast<int>(GetParam()));
  for (int it = 0; it < 10; ++it) {
    Case c = with_float_scale(random_case(rng, GetParam(), {16}, 60));
    c.top_k = 1000;
    const Workload narrow = make_workload(c);
    Tensor dout = narrow.new_out();
    dout.randn(rng);
    Case c32 = c;
    c32.dtype = DType::float32;
    Workload wide = make_workload(c32);
    Tensor dout32 = wide.new_out();
    for (auto [src, dst] : {std::pair<const Tensor*, Tensor*>{&narrow.q, &wide.q},
                            {&narrow.k, &wide.k},
                            {&narrow.v, &wide.v},
                            {&dout, &dout32}})
      for (int64_t i = 0; i < src->numel(); ++i) dst->set(i, src->get(i));
    const spec::Grads g16 = spec::run_backward(narrow, dout);
    const spec::Grads g32 = spec::run_backward(wide, dout32);
    SCOPED_TRACE(describe(c));
    EXPECT_TRUE(spec::within_one_rounding(g16.dq.to_double(), g32.dq.to_double(), c.dtype, 0.0))
        << "dq";
    EXPECT_TRUE(spec::within_one_rounding(g16.dk.to_double(), g32.dk.to_double(), c.dtype, 0.0))
        << "dk";
    EXPECT_TRUE(spec::within_one_rounding(g16.dv.to_double(), g32.dv.to_double(), c.dtype, 0.0))
        << "dv";
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, ReferenceBackwardHalf,
                         ::testing::Values(DType::float16, DType::bfloat16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

// Empty sequences in a batch leave the other sequences' gradients exactly as
// when each runs alone, and keys of a sequence without queries get zero.
TEST(ReferenceBackwardStructure, EmptySequencesDoNotDisturbNeighbours) {
  Case c;
  c.lens_q = {0, 14, 0, 0, 9};
  c.lens_k = {3, 14, 0, 6, 20};
  c.heads_q = 4;
  c.heads_kv = 2;
  c.head_dim = 8;
  c.block_size = 4;
  c.top_k = 2;
  c.seed = 12;
  const Workload w = make_workload(c);
  std::mt19937_64 rng(1200);
  Tensor dout = w.new_out();
  dout.randn(rng);
  const spec::Grads grads = spec::run_backward(w, dout);
  const int64_t q_row = c.heads_q * c.head_dim, k_row = c.heads_kv * c.head_dim;
  const std::vector<Seq> seqs = spec::sequences(w);
  for (size_t b = 0; b < seqs.size(); ++b) {
    const Seq& s = seqs[b];
    if (s.len_q == 0) {
      for (int64_t e = 0; e < s.len_k * k_row; ++e) {
        ASSERT_EQ(grads.dk.get(s.k_begin * k_row + e), 0.0f) << "sequence " << b;
        ASSERT_EQ(grads.dv.get(s.k_begin * k_row + e), 0.0f) << "sequence " << b;
      }
      continue;
    }
    const Workload alone = spec::slice(w, b);
    Tensor alone_dout = alone.new_out();
    for (int64_t e = 0; e < s.len_q * q_row; ++e)
      alone_dout.set(e, dout.get(s.q_begin * q_row + e));
    const spec::Grads g = spec::run_backward(alone, alone_dout);
    for (int64_t e = 0; e < s.len_q * q_row; ++e)
      ASSERT_EQ(grads.dq.get(s.q_begin * q_row + e), g.dq.get(e)) << "dq of sequence " << b;
    for (int64_t e = 0; e < s.len_k * k_row; ++e) {
      ASSERT_EQ(grads.dk.get(s.k_begin * k_row + e), g.dk.get(e)) << "dk of sequence " << b;
      ASSERT_EQ(grads.dv.get(s.k_begin * k_row + e), g.dv.get(e)) << "dv of sequence " << b;
    }
  }
}

}  // namespace
}  // namespace moba::testing
