// The fast CPU backend against the reference, on random shapes (fixed seeds)
// and targeted edge cases: routing, output, log-sum-exp and gradients.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>
#include <set>

#include "core/routing.hpp"
#include "support/testing.hpp"

namespace moba::testing {
namespace {

ExecOptions with_backend(Backend b, int threads = 0) {
  ExecOptions o;
  o.backend = b;
  o.num_threads = threads;
  return o;
}

struct Result {
  Tensor out, lse, selected;
};

Result run_forward(const Workload& w, Backend b, int threads = 0) {
  Result r;
  r.out = w.new_out();
  r.lse = w.new_lse();
  r.out.poison();
  r.lse.poison();
  forward(w.inputs(), w.config(), r.out.view(), r.lse.view(), with_backend(b, threads));
  int64_t max_k = 0;
  const std::vector<int32_t>& lens_k = w.c.lens_k.empty() ? w.c.lens_q : w.c.lens_k;
  for (int32_t l : lens_k) max_k = std::max<int64_t>(max_k, l);
  const int64_t width = std::max<int64_t>(1, routing_width(max_k, w.config()));
  r.selected = Tensor(DType::int32, {w.total_q, w.c.heads_q, width});
  routing(w.inputs(), w.config(), r.selected.view(), with_backend(b, threads));
  return r;
}

// Absolute + relative tolerance for comparing two roundings of the same value.
bool close(double actual, double expected, DType dtype) {
  const double rtol = dtype == DType::float32 ? 2e-5 : dtype == DType::float16 ? 2e-3 : 1.6e-2;
  const double atol = dtype == DType::float32 ? 2e-5 : dtype == DType::float16 ? 2e-4 : 2e-3;
  return std::abs(actual - expected) <= atol + rtol * std::abs(expected);
}

// Gate score of (token, head) for block j of its sequence, in fp64 from the
// tensors (used only to judge whether differing selections are near ties).
double gate_score(const Workload& w, int64_t seq, int64_t token, int64_t head, int64_t block) {
  const auto* ck = static_cast<const int32_t*>(w.cu_k.data());
  const int64_t d = w.c.head_dim, hkv = w.c.heads_kv, kvh = head / (w.c.heads_q / hkv);
  const int64_t len_k = ck[seq + 1] - ck[seq];
  const int64_t begin = block * w.c.block_size, end = std::min(begin + w.c.block_size, len_k);
  double score = 0.0;
  for (int64_t c = 0; c < d; ++c) {
    double sum = 0.0;
    for (int64_t t = begin; t < end; ++t) sum += w.k.get(((ck[seq] + t) * hkv + kvh) * d + c);
    score += static_cast<double>(w.q.get((token * w.c.heads_q + head) * d + c)) *
             (sum / static_cast<double>(end - begin));
  }
  return score;
}

// Compares the cpu backend with the reference on one case; returns the
// number of (token, head) pairs skipped as near ties.
int check_case(const Case& c, int threads = 0) {
  SCOPED_TRACE(describe(c));
  const Workload w = make_workload(c);
  const Result ref = run_forward(w, Backend::reference);
  const Result cpu = run_forward(w, Backend::cpu, threads);
  const int64_t d = c.head_dim, width = ref.selected.shape()[2];
  const auto* cq = static_cast<const int32_t*>(w.cu_q.data());
  int near_ties = 0;
  std::set<std::pair<int64_t, int64_t>>
      skip;  // (token, head) whose selection differs by a near tie
  for (size_t s = 0; s + 1 < static_cast<size_t>(w.cu_q.numel()); ++s) {
    for (int64_t t = cq[s]; t < cq[s + 1]; ++t) {
      for (int64_t h = 0; h < c.heads_q; ++h) {
        std::set<int64_t> a, b;
        for (int64_t m = 0; m < width; ++m) {
          a.insert(static_cast<int64_t>(ref.selected.get((t * c.heads_q + h) * width + m)));
          b.insert(static_cast<int64_t>(cpu.selected.get((t * c.heads_q + h) * width + m)));
        }
        if (a == b) continue;
        // Every block chosen by one side only must score within noise of one chosen by the other
        // only.
        double lo = 1e300, hi = -1e300, scale = 1e-3;
        for (int64_t j : a)
          if (!b.count(j)) lo = std::min(lo, gate_score(w, static_cast<int64_t>(s), t, h, j));
        for (int64_t j : b)
          if (!a.count(j)) hi = std::max(hi, gate_score(w, static_cast<int64_t>(s), t, h, j));
        scale = std::max({scale, std::abs(lo), std::abs(hi)});
        EXPECT_LE(std::abs(lo - hi), 1e-5 * scale * (c.gqa_shared_routing ? c.heads_q : 1))
            << "selection differs beyond a near tie at token " << t << " head " << h;
        skip.insert({t, h});
        ++near_ties;
      }
    }
  }
  int64_t bad_out = 0, bad_lse = 0;
  for (int64_t t = 0; t < w.total_q; ++t)
    for (int64_t h = 0; h < c.heads_q; ++h) {
      if (skip.count({t, h}) || (c.gqa_shared_routing && !skip.empty())) continue;
      for (int64_t x = 0; x < d; ++x) {
        const int64_t i = (t * c.heads_q + h) * d + x;
        if (!close(cpu.out.get(i), ref.out.get(i), c.dtype)) {
          if (bad_out++ < 3)
            ADD_FAILURE() << "out[" << t << "," << h << "," << x << "] cpu " << cpu.out.get(i)
                          << " ref " << ref.out.get(i);
        }
      }
      const double l_cpu = cpu.lse.get(h * w.total_q + t), l_ref = ref.lse.get(h * w.total_q + t);
      if (!(std::abs(l_cpu - l_ref) <= 1e-4 * (1.0 + std::abs(l_ref)))) {
        if (bad_lse++ < 3)
          ADD_FAILURE() << "lse[" << h << "," << t << "] cpu " << l_cpu << " ref " << l_ref;
      }
    }
  EXPECT_EQ(bad_out, 0);
  EXPECT_EQ(bad_lse, 0);
  return near_ties;
}

class CpuRandom : public ::testing::TestWithParam<DType> {};

TEST_P(CpuRandom, ForwardAndRoutingMatchReference) {
  std::mt19937_64 rng(1234 + static_cast<int>(GetParam()));
  int near_ties = 0;
  for (int i = 0; i < 40; ++i)
    near_ties += check_case(random_case(rng, GetParam(), {8, 64, 128}, 160));
  EXPECT_LE(near_ties, 4);
}

INSTANTIATE_TEST_SUITE_P(AllDtypes, CpuRandom,
                         ::testing::Values(DType::float32, DType::float16, DType::bfloat16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

TEST(Cpu, EdgeCases) {
  Case c;
  c.head_dim = 64;
  // empty sequence in the middle, length 1, partial last block
  c.lens_q = {50, 0, 1, 37};
  for (int64_t block : {1, 7, 16, 64, 512})
    for (int64_t k : {1, 2, 3, 1000}) {
      c.block_size = block;
      c.top_k = k;
      check_case(c);
    }
  // GQA ratios and head dims
  for (auto [hq, hkv] : {std::pair{1, 1}, {4, 1}, {8, 1}, {8, 2}})
    for (int64_t d : {64, 128}) {
      c.heads_q = hq;
      c.heads_kv = hkv;
      c.head_dim = d;
      c.block_size = 8;
      c.top_k = 3;
      check_case(c);
    }
}

TEST(Cpu, ChunkedPrefillAndDecode) {
  Case c;
  c.lens_k = {100, 64, 33, 9};
  c.lens_q = {1, 64, 10, 0};
  c.heads_q = 4;
  c.heads_kv = 2;
  c.block_size = 16;
  c.top_k = 3;
  check_case(c);
}

TEST(Cpu, ThreadCountDoesNotChangeResults) {
  Case c;
  c.lens_q = {300, 200};
  c.heads_q = 4;
  c.heads_kv = 2;
  c.block_size = 32;
  c.top_k = 3;
  const Workload w = make_workload(c);
  const Result one = run_forward(w, Backend::cpu, 1);
  const Result many = run_forward(w, Backend::cpu, 3);
  EXPECT_EQ(compare(one.out.to_double(), many.out.to_double()).max_abs, 0.0);
  EXPECT_EQ(compare(one.lse.to_double(), many.lse.to_double()).max_abs, 0.0);
  EXPECT_EQ(compare(one.selected.to_double(), many.selected.to_double()).max_abs, 0.0);
}

TEST(Cpu, FullTopKEqualsDenseCausal) {
  Case c;
  c.lens_q = {130, 0, 1, 77};
  c.heads_q = 8;
  c.heads_kv = 2;
  c.block_size = 16;
  c.top_k = 9;  // >= blocks of every sequence
  const Workload w = make_workload(c);
  const Result cpu = run_forward(w, Backend::cpu);
  std::vector<double> out, lse;
  dense_causal_attention(w, out, lse);
  EXPECT_LT(compare(cpu.out.to_double(), out).max_abs, 2e-5);
  EXPECT_LT(compare(cpu.lse.to_double(), lse).max_abs, 2e-5);
}

}  // namespace
}  // namespace moba::testing

namespace moba::testing {
namespace {

struct Grads {
  Tensor dq, dk, dv;
};

Grads run_backward(const Workload& w, const Tensor& out, const Tensor& lse, const Tensor& dout,
                   Backend b, int threads = 0) {
  Grads g{Tensor(w.c.dtype, w.q.shape()), Tensor(w.c.dtype, w.k.shape()),
          Tensor(w.c.dtype, w.v.shape())};
  g.dq.poison();
  g.dk.poison();
  g.dv.poison();
  backward(w.inputs(), w.config(), out.view(), dout.view(), lse.view(), g.dq.view(), g.dk.view(),
           g.dv.view(), with_backend(b, threads));
  return g;
}

// |actual - expected| <= tol * (max |expected| + |expected| + 0.05), per
// element: relative to the gradient's scale, with a floor for gradients that
// are zero in exact arithmetic (e.g. a query attending to one key).
void expect_grad_close(const Tensor& actual, const Tensor& expected, DType dtype,
                       const char* name) {
  const double tol = dtype == DType::float32 ? 1e-4 : dtype == DType::float16 ? 4e-3 : 3e-2;
  double max_ref = 0.0;
  for (int64_t i = 0; i < expected.numel(); ++i)
    max_ref = std::max(max_ref, std::abs(static_cast<double>(expected.get(i))));
  int bad = 0;
  for (int64_t i = 0; i < expected.numel(); ++i) {
    const double a = actual.get(i), e = expected.get(i);
    if (!(std::abs(a - e) <= tol * (max_ref + std::abs(e) + 0.05)) && bad++ < 3)
      ADD_FAILURE() << name << "[" << i << "] cpu " << a << " ref " << e << " (max |ref| "
                    << max_ref << ")";
  }
  EXPECT_EQ(bad, 0) << name;
}

void check_backward(const Case& c, int threads = 0) {
  SCOPED_TRACE(describe(c));
  const Workload w = make_workload(c);
  const Result fwd = run_forward(w, Backend::cpu, threads);
  const Result ref_fwd = run_forward(w, Backend::reference);
  if (compare(fwd.selected.to_double(), ref_fwd.selected.to_double()).max_abs != 0.0)
    return;  // near tie: covered by the forward tests
  Tensor dout = w.new_out();
  std::mt19937_64 rng(c.seed ^ 0x9e3779b97f4a7c15ull);
  dout.randn(rng);
  const Grads cpu = run_backward(w, fwd.out, fwd.lse, dout, Backend::cpu, threads);
  const Grads ref = run_backward(w, ref_fwd.out, ref_fwd.lse, dout, Backend::reference);
  expect_grad_close(cpu.dq, ref.dq, c.dtype, "dq");
  expect_grad_close(cpu.dk, ref.dk, c.dtype, "dk");
  expect_grad_close(cpu.dv, ref.dv, c.dtype, "dv");
}

class CpuBackwardRandom : public ::testing::TestWithParam<DType> {};

TEST_P(CpuBackwardRandom, GradientsMatchReference) {
  std::mt19937_64 rng(777 + static_cast<int>(GetParam()));
  for (int i = 0; i < 30; ++i) check_backward(random_case(rng, GetParam(), {8, 64, 128}, 140));
}

INSTANTIATE_TEST_SUITE_P(AllDtypes, CpuBackwardRandom,
                         ::testing::Values(DType::float32, DType::float16, DType::bfloat16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

TEST(CpuBackward, EdgeCases) {
  Case c;
  c.lens_q = {70, 0, 1, 37};
  c.heads_q = 4;
  c.heads_kv = 1;
  for (int64_t block : {1, 5, 16, 300, 600})
    for (int64_t k : {1, 2, 4, 1000}) {
      c.block_size = block;
      c.top_k = k;
      check_backward(c);
    }
  c.lens_k = {90, 10, 33, 37};
  c.lens_q = {20, 0, 33, 1};
  c.block_size = 8;
  c.top_k = 2;
  check_backward(c);
  c.gqa_shared_routing = true;
  check_backward(c);
}

TEST(CpuBackward, ThreadCountDoesNotChangeGradients) {
  Case c;
  c.lens_q = {300, 200};
  c.heads_q = 4;
  c.heads_kv = 2;
  c.block_size = 32;
  c.top_k = 3;
  const Workload w = make_workload(c);
  const Result fwd = run_forward(w, Backend::cpu, 1);
  Tensor dout = w.new_out();
  std::mt19937_64 rng(5);
  dout.randn(rng);
  const Grads one = run_backward(w, fwd.out, fwd.lse, dout, Backend::cpu, 1);
  const Grads many = run_backward(w, fwd.out, fwd.lse, dout, Backend::cpu, 3);
  EXPECT_EQ(compare(one.dq.to_double(), many.dq.to_double()).max_abs, 0.0);
  EXPECT_EQ(compare(one.dk.to_double(), many.dk.to_double()).max_abs, 0.0);
  EXPECT_EQ(compare(one.dv.to_double(), many.dv.to_double()).max_abs, 0.0);
}

}  // namespace
}  // namespace moba::testing
