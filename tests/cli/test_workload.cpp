// Workloads of the CLI: generated (deterministic), loaded from files in both
// layouts with conversions, the errors for inconsistent inputs, and the
// sparsity counted from the backend's routing.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "core/dtype.hpp"
#include "errors.hpp"
#include "npy.hpp"
#include "safetensors.hpp"
#include "sparsity.hpp"
#include "temp_dir.hpp"
#include "workload.hpp"

namespace moba::cli {
namespace {

Array ramp(ElementType type, std::vector<int64_t> shape, double start) {
  Array a(type, std::move(shape));
  for (int64_t i = 0; i < a.numel(); ++i) a.set(i, start + 0.01 * static_cast<double>(i % 997));
  return a;
}

template <class Fn>
void expect_usage_error(Fn&& fn, const std::string& fragment) {
  try {
    fn();
    FAIL() << "expected a UsageError containing: " << fragment;
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST(Workload, GeneratedValuesDependOnlyOnTheSeed) {
  const Workload a = generate_workload({300, 0, 70}, {}, 4, 2, 64, DType::float32, 7, 1);
  const Workload b = generate_workload({300, 0, 70}, {}, 4, 2, 64, DType::float32, 7, 3);
  const Workload c = generate_workload({300, 0, 70}, {}, 4, 2, 64, DType::float32, 8, 1);
  EXPECT_EQ(a.q.bytes, b.q.bytes);
  EXPECT_EQ(a.k.bytes, b.k.bytes);
  EXPECT_EQ(a.v.bytes, b.v.bytes);
  EXPECT_NE(a.q.bytes, c.q.bytes);
  EXPECT_NE(a.q.bytes, a.k.bytes) << "q, k and v must be independent streams";
  EXPECT_EQ(a.cu_q, (std::vector<int32_t>{0, 300, 300, 370}));
  EXPECT_EQ(a.cu_k, a.cu_q);
  EXPECT_EQ(a.total_q, 370);
  EXPECT_EQ(a.max_len_k, 300);
  EXPECT_EQ(a.q.shape, (std::vector<int64_t>{370, 4, 64}));
  EXPECT_EQ(a.k.shape, (std::vector<int64_t>{370, 2, 64}));
}

TEST(Workload, GeneratedValuesAreStandardNormal) {
  Array a(ElementType::float32, {1 << 18});
  fill_normal(a, 3, 0, 2);
  double sum = 0, sum_sq = 0;
  int64_t beyond3 = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double x = a.get(i);
    sum += x;
    sum_sq += x * x;
    beyond3 += std::abs(x) > 3.0;
  }
  const double n = static_cast<double>(a.numel());
  EXPECT_NEAR(sum / n, 0.0, 0.01);
  EXPECT_NEAR(sum_sq / n, 1.0, 0.01);
  EXPECT_NEAR(static_cast<double>(beyond3) / n, 0.0027, 0.0006);  // two-sided tail of N(0, 1)
}

TEST(Workload, GeneratedRespectsDtypeAndBatch) {
  WorkloadOptions o;
  o.tokens = 33;
  o.batch = 3;
  o.heads_q = 4;
  o.heads_kv = 1;
  o.head_dim = 16;
  o.dtype = "bf16";
  const Workload w = make_workload(o);
  EXPECT_EQ(w.dtype, DType::bfloat16);
  EXPECT_EQ(w.q.type, ElementType::bfloat16);
  EXPECT_EQ(w.cu_q, (std::vector<int32_t>{0, 33, 66, 99}));
  EXPECT_EQ(w.out_shape, (std::vector<int64_t>{99, 4, 16}));
  o.batch = 0;
  expect_usage_error([&] { make_workload(o); }, "--batch: expected >= 1");
  o.batch = 1;
  o.dtype = "float8";
  expect_usage_error([&] { make_workload(o); }, "--dtype: unknown dtype 'float8'");
}

TEST(Workload, Loads4DNpyAsAnEqualLengthBatch) {
  testing::TempDir dir;
  const Array q = ramp(ElementType::float32, {2, 5, 4, 8}, -1.0);
  const Array k = ramp(ElementType::float32, {2, 7, 2, 8}, 0.5);
  const Array v = ramp(ElementType::float32, {2, 7, 2, 8}, 2.0);
  WorkloadOptions o;
  o.q_path = dir.file("q.npy");
  o.k_path = dir.file("k.npy");
  o.v_path = dir.file("v.npy");
  write_npy(o.q_path, q);
  write_npy(o.k_path, k);
  write_npy(o.v_path, v);
  const Workload w = make_workload(o);
  EXPECT_EQ(w.source, "npy");
  EXPECT_EQ(w.dtype, DType::float32);
  EXPECT_EQ(w.cu_q, (std::vector<int32_t>{0, 5, 10}));
  EXPECT_EQ(w.cu_k, (std::vector<int32_t>{0, 7, 14}));
  EXPECT_EQ(w.q.shape, (std::vector<int64_t>{10, 4, 8}));
  EXPECT_EQ(w.k.shape, (std::vector<int64_t>{14, 2, 8}));
  EXPECT_EQ(w.out_shape, (std::vector<int64_t>{2, 5, 4, 8}));
  EXPECT_EQ(w.q.bytes, q.bytes);
  EXPECT_EQ(w.v.bytes, v.bytes);

  o.dtype = "bfloat16";
  const Workload b = make_workload(o);
  EXPECT_EQ(b.dtype, DType::bfloat16);
  for (int64_t i = 0; i < q.numel(); ++i)
    ASSERT_EQ(b.q.get(i), core::round_to(DType::bfloat16, static_cast<float>(q.get(i)))) << i;

  o.cu_seqlens = {0, 5, 10};
  expect_usage_error([&] { make_workload(o); },
                     "--cu-seqlens: only for [tokens, heads, head_dim] inputs");
}

TEST(Workload, Loads3DNpyWithCuSeqlens) {
  testing::TempDir dir;
  WorkloadOptions o;
  o.q_path = dir.file("q.npy");
  o.k_path = dir.file("k.npy");
  o.v_path = dir.file("v.npy");
  write_npy(o.q_path, ramp(ElementType::float16, {8, 2, 8}, 0.0));
  write_npy(o.k_path, ramp(ElementType::float16, {8, 2, 8}, 1.0));
  write_npy(o.v_path, ramp(ElementType::float16, {8, 2, 8}, 2.0));
  const Workload single = make_workload(o);
  EXPECT_EQ(single.dtype, DType::float16) << "without --dtype the file's dtype is kept";
  EXPECT_EQ(single.cu_q, (std::vector<int32_t>{0, 8}));

  o.cu_seqlens = {0, 3, 3, 8};
  const Workload w = make_workload(o);
  EXPECT_EQ(w.cu_q, (std::vector<int32_t>{0, 3, 3, 8}));
  EXPECT_EQ(w.cu_k, w.cu_q);
  EXPECT_EQ(w.max_len_q, 5);

  o.cu_seqlens = {1, 8};
  expect_usage_error([&] { make_workload(o); }, "--cu-seqlens: must start at 0");
  o.cu_seqlens = {0, 5, 4, 8};
  expect_usage_error([&] { make_workload(o); }, "--cu-seqlens: must be non-decreasing");
  o.cu_seqlens = {0, 7};
  expect_usage_error([&] { make_workload(o); }, "--cu-seqlens: last entry must equal the 8 tokens");
  o.cu_seqlens.clear();
  o.cu_seqlens_k = {0, 8};
  expect_usage_error([&] { make_workload(o); }, "--cu-seqlens-k: needs --cu-seqlens");
}

TEST(Workload, DecodeStyleFilesNeedKeyOffsets) {
  testing::TempDir dir;
  WorkloadOptions o;
  o.q_path = dir.file("q.npy");
  o.k_path = dir.file("k.npy");
  o.v_path = dir.file("v.npy");
  write_npy(o.q_path, ramp(ElementType::float32, {2, 2, 8}, 0.0));
  write_npy(o.k_path, ramp(ElementType::float32, {40, 1, 8}, 1.0));
  write_npy(o.v_path, ramp(ElementType::float32, {40, 1, 8}, 2.0));
  const Workload one = make_workload(o);  // one sequence: 2 queries at the end of 40 keys
  EXPECT_EQ(one.cu_k, (std::vector<int32_t>{0, 40}));
  o.cu_seqlens = {0, 1, 2};
  expect_usage_error([&] { make_workload(o); }, "pass --cu-seqlens-k for the keys");
  o.cu_seqlens_k = {0, 25, 40};
  const Workload two = make_workload(o);
  EXPECT_EQ(two.lens_q(), (std::vector<int64_t>{1, 1}));
  EXPECT_EQ(two.lens_k(), (std::vector<int64_t>{25, 15}));
}

TEST(Workload, InconsistentFilesAreNamed) {
  testing::TempDir dir;
  WorkloadOptions o;
  o.q_path = dir.file("q.npy");
  o.k_path = dir.file("k.npy");
  o.v_path = dir.file("v.npy");
  const auto write = [&](std::vector<int64_t> q, std::vector<int64_t> k, std::vector<int64_t> v) {
    write_npy(o.q_path, Array(ElementType::float32, std::move(q)));
    write_npy(o.k_path, Array(ElementType::float32, std::move(k)));
    write_npy(o.v_path, Array(ElementType::float32, std::move(v)));
  };
  write({8, 16}, {8, 1, 16}, {8, 1, 16});
  expect_usage_error([&] { make_workload(o); },
                     o.q_path + ": expected shape [tokens, heads, head_dim] or");
  write({8, 2, 16}, {1, 8, 1, 16}, {1, 8, 1, 16});
  expect_usage_error([&] { make_workload(o); }, o.k_path + ": expected 3 dimensions");
  write({8, 2, 16}, {8, 1, 16}, {8, 2, 16});
  expect_usage_error([&] { make_workload(o); }, o.v_path + ": expected shape [8, 1, 16]");
  write({8, 2, 16}, {8, 1, 32}, {8, 1, 32});
  expect_usage_error([&] { make_workload(o); }, "head_dim 32 differs");
  write({2, 8, 2, 16}, {3, 8, 1, 16}, {3, 8, 1, 16});
  expect_usage_error([&] { make_workload(o); }, "batch 3 differs");
}

TEST(Workload, LoadsSafetensorsByName) {
  testing::TempDir dir;
  const Array q = ramp(ElementType::bfloat16, {6, 4, 8}, -0.5);
  const Array k = ramp(ElementType::bfloat16, {6, 2, 8}, 0.25);
  const Array v = ramp(ElementType::bfloat16, {6, 2, 8}, 1.5);
  WorkloadOptions o;
  o.safetensors_path = dir.file("in.safetensors");
  write_safetensors(o.safetensors_path, {{"layer0.q", &q}, {"layer0.k", &k}, {"layer0.v", &v}});
  o.q_name = "layer0.q";
  o.k_name = "layer0.k";
  o.v_name = "layer0.v";
  const Workload w = make_workload(o);
  EXPECT_EQ(w.source, "safetensors");
  EXPECT_EQ(w.dtype, DType::bfloat16);
  EXPECT_EQ(w.q.bytes, q.bytes);
  EXPECT_EQ(w.k.bytes, k.bytes);
  EXPECT_EQ(w.v.bytes, v.bytes);
  o.v_name = "v";
  try {
    make_workload(o);
    FAIL() << "expected an error for a missing tensor";
  } catch (const FileError& e) {
    EXPECT_NE(std::string(e.what()).find("no tensor named 'v'"), std::string::npos) << e.what();
  }
}

TEST(Workload, Float64FilesBecomeFloat32) {
  testing::TempDir dir;
  WorkloadOptions o;
  o.q_path = dir.file("q.npy");
  o.k_path = dir.file("k.npy");
  o.v_path = dir.file("v.npy");
  write_npy(o.q_path, ramp(ElementType::float64, {4, 1, 8}, 0.1));
  write_npy(o.k_path, ramp(ElementType::float64, {4, 1, 8}, 0.2));
  write_npy(o.v_path, ramp(ElementType::float64, {4, 1, 8}, 0.3));
  const Workload w = make_workload(o);
  EXPECT_EQ(w.dtype, DType::float32);
  EXPECT_EQ(w.q.get(1), static_cast<double>(static_cast<float>(0.11)));
}

// Attended keys per query from the spec's geometry alone: every selected past
// block is complete, the current block is cut at the query.
Sparsity closed_form(const Workload& w, int64_t block, int64_t top_k) {
  Sparsity s;
  const auto lens_q = w.lens_q(), lens_k = w.lens_k();
  for (size_t b = 0; b < lens_q.size(); ++b)
    for (int64_t i = 0; i < lens_q[b]; ++i) {
      const int64_t pos = lens_k[b] - lens_q[b] + i, current = pos / block;
      s.attended +=
          w.heads_q * ((std::min(top_k, current + 1) - 1) * block + pos - current * block + 1);
      s.causal += w.heads_q * (pos + 1);
    }
  return s;
}

TEST(Sparsity, MatchesTheClosedFormInChunksOrNot) {
  const Workload w =
      generate_workload({70, 0, 1, 45}, {70, 13, 30, 100}, 4, 2, 16, DType::float32, 11, 1);
  const PlacedWorkload placed = place(w, Placement::host);
  ExecOptions exec;
  exec.backend = Backend::reference;
  for (const auto& [block, top_k] : {std::pair<int64_t, int64_t>{8, 3}, {16, 1}, {5, 4}, {1, 2}}) {
    Config config;
    config.block_size = block;
    config.top_k = top_k;
    const Sparsity expected = closed_form(w, block, top_k);
    const Sparsity whole = measure_sparsity(w, placed, config, exec);
    EXPECT_EQ(whole.attended, expected.attended) << "block " << block << " top_k " << top_k;
    EXPECT_EQ(whole.causal, expected.causal);
    EXPECT_EQ(whole.calls, 2) << "sequences whose rows are contiguous share a call";
    // A budget of a few rows per call splits every sequence into pieces.
    const int64_t width = std::min(top_k, (int64_t{100} + block - 1) / block);
    const Sparsity chunked = measure_sparsity(w, placed, config, exec, 7 * w.heads_q * width * 4);
    EXPECT_EQ(chunked.attended, expected.attended) << "block " << block << " top_k " << top_k;
    EXPECT_EQ(chunked.causal, expected.causal);
    EXPECT_GT(chunked.calls, 10);
    EXPECT_GT(whole.fraction(), 0.0);
    EXPECT_LT(whole.fraction(), 1.0);
  }
}

TEST(Sparsity, DenseTopKIsZeroAndEmptyIsZero) {
  const Workload w = generate_workload({64, 17}, {}, 2, 1, 16, DType::float16, 1, 1);
  const PlacedWorkload placed = place(w, Placement::host);
  ExecOptions exec;
  exec.backend = Backend::cpu;
  Config config;
  config.block_size = 8;
  config.top_k = 8;  // the blocks of the longest sequence
  const Sparsity dense = measure_sparsity(w, placed, config, exec);
  EXPECT_EQ(dense.attended, dense.causal);
  EXPECT_EQ(dense.fraction(), 0.0);
  config.top_k = 1;
  config.block_size = 1;  // each query attends to itself only
  const Sparsity self = measure_sparsity(w, placed, config, exec);
  EXPECT_EQ(self.attended, 2 * (64 + 17));

  const Workload empty = generate_workload({0, 0}, {}, 2, 1, 16, DType::float32, 1, 1);
  const Sparsity none = measure_sparsity(empty, place(empty, Placement::host), config, exec);
  EXPECT_EQ(none.causal, 0);
  EXPECT_EQ(none.calls, 0);
  EXPECT_EQ(none.fraction(), 0.0);
}

}  // namespace
}  // namespace moba::cli
