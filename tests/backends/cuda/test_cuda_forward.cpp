// The CUDA forward and routing against the reference backend (and the fp64
// dense oracle for top_k >= blocks), through the public API on device
// tensors and a non-default stream. Every test skips when no GPU is present.
//
// Selections must agree with the reference except where the competing gate
// scores are within floating-point noise (spec: relative difference below
// about 1e-5 of the accumulated magnitude); the rows where they legitimately
// differ are left out of the output comparison, and there may only be few.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "backends/cuda/cuda_testing.hpp"
#include "core/dtype.hpp"
#include "core/routing.hpp"
#include "support/testing.hpp"

namespace moba::testing {
namespace {

// Forward and routing of a workload on the device.
class DeviceRun : public DeviceWorkload {
 public:
  using DeviceWorkload::DeviceWorkload;

  // Forward on the device into NaN-poisoned outputs, copied back.
  void forward(Tensor& out, Tensor& lse, const Inputs& in) const {
    const DeviceBuffer d_out = buffer_for(out), d_lse = buffer_for(lse);
    poison(d_out);
    poison(d_lse);
    enqueue_forward(out, lse, d_out, d_lse, in);
    synchronize();
    download(d_out, out);
    download(d_lse, lse);
  }
  void forward(Tensor& out, Tensor& lse) const { forward(out, lse, inputs()); }

  // The forward call alone, on the stream, into the given device buffers
  // (shaped like out and lse).
  void enqueue_forward(const Tensor& out, const Tensor& lse, const DeviceBuffer& d_out,
                       const DeviceBuffer& d_lse, const Inputs& in) const {
    moba::forward(in, w_.config(), on_device(out.view(), d_out.get()),
                  on_device(lse.view(), d_lse.get()), options());
  }

  // A device buffer of t's size (contents undefined).
  static DeviceBuffer buffer_for(const Tensor& t) {
    return DeviceBuffer(static_cast<size_t>(t.numel() * dtype_size(t.dtype())));
  }

  // Fills a buffer with 0xff bytes (NaN in every float type) on the stream.
  void poison(const DeviceBuffer& b) const {
    if (b.bytes()) cuda_ok(cudaMemsetAsync(b.get(), 0xff, b.bytes(), stream()), "memset");
  }

  // Routing on the device into a -7-poisoned selection of width `width`.
  std::vector<int32_t> routing(int64_t width) const {
    Tensor sel(DType::int32, {w_.total_q, w_.c.heads_q, width});
    DeviceBuffer d(static_cast<size_t>(sel.numel() * 4));
    std::vector<int32_t> poison(static_cast<size_t>(sel.numel()), -7);
    if (d.bytes())
      cuda_ok(cudaMemcpy(d.get(), poison.data(), d.bytes(), cudaMemcpyHostToDevice), "poison");
    moba::routing(inputs(), w_.config(), on_device(sel.view(), d.get()), options());
    synchronize();
    download(d, sel);
    const auto* p = static_cast<const int32_t*>(sel.data());
    return std::vector<int32_t>(p, p + sel.numel());
  }
};

int64_t width_of(const Workload& w) {
  const auto& lens_k = w.c.lens_k.empty() ? w.c.lens_q : w.c.lens_k;
  const int64_t max_k = std::max<int64_t>(1, *std::max_element(lens_k.begin(), lens_k.end()));
  return routing_width(max_k, w.config());
}

std::vector<int32_t> reference_routing(const Workload& w, int64_t width) {
  Tensor sel(DType::int32, {w.total_q, w.c.heads_q, width});
  ExecOptions o;
  o.backend = Backend::reference;
  routing(w.inputs(), w.config(), sel.view(), o);
  const auto* p = static_cast<const int32_t*>(sel.data());
  return std::vector<int32_t>(p, p + sel.numel());
}

// Gate scores in fp64 from the spec's block means, to judge near ties: the
// score of block j for (token, head) and the magnitude sum_d |q_d kbar_d|
// that bounds its accumulation error (summed over the group when shared).
class GateScores {
 public:
  explicit GateScores(const Workload& w) : w_(w) {
    const auto* cq = static_cast<const int32_t*>(w.cu_q.data());
    const auto* ck = static_cast<const int32_t*>(w.cu_k.data());
    for (size_t b = 0; b + 1 < static_cast<size_t>(w.cu_q.numel()); ++b)
      for (int32_t t = cq[b]; t < cq[b + 1]; ++t) seq_of_token_[t] = static_cast<int>(b);
    ck_ = ck;
  }
  std::pair<double, double> score(int64_t token, int64_t head, int64_t block) const {
    const Case& c = w_.c;
    const int64_t group = c.heads_q / c.heads_kv;
    const int b = seq_of_token_.at(token);
    const auto& mean = kbar(b, head / group, block);
    double s = 0.0, mag = 0.0;
    const int64_t h0 = c.gqa_shared_routing ? (head / group) * group : head;
    const int64_t h1 = c.gqa_shared_routing ? h0 + group : head + 1;
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t d = 0; d < c.head_dim; ++d) {
        const double x =
            w_.q.get((token * c.heads_q + h) * c.head_dim + d) * mean[static_cast<size_t>(d)];
        s += x;
        mag += std::abs(x);
      }
    return {s, mag};
  }

 private:
  const std::vector<double>& kbar(int b, int64_t kvh, int64_t block) const {
    const auto key = std::make_tuple(b, kvh, block);
    auto it = cache_.find(key);
    if (it != cache_.end()) return it->second;
    const Case& c = w_.c;
    const int64_t len = ck_[b + 1] - ck_[b];
    const int64_t begin = block * c.block_size, end = std::min(len, begin + c.block_size);
    std::vector<double> mean(static_cast<size_t>(c.head_dim));
    for (int64_t d = 0; d < c.head_dim; ++d) {
      double sum = 0.0;
      for (int64_t t = begin; t < end; ++t)
        sum += w_.k.get(((ck_[b] + t) * c.heads_kv + kvh) * c.head_dim + d);
      mean[static_cast<size_t>(d)] =
          core::round_to(c.dtype, static_cast<float>(sum / static_cast<double>(end - begin)));
    }
    return cache_.emplace(key, std::move(mean)).first->second;
  }

  const Workload& w_;
  const int32_t* ck_ = nullptr;
  std::map<int32_t, int> seq_of_token_;
  mutable std::map<std::tuple<int, int64_t, int64_t>, std::vector<double>> cache_;
};

// Checks the CUDA selection against the reference; returns the (token, head)
// pairs whose selections differ within the near-tie allowance.
std::set<std::pair<int64_t, int64_t>> check_selection(const Workload& w,
                                                      const std::vector<int32_t>& got,
                                                      const std::vector<int32_t>& want,
                                                      int64_t width) {
  std::set<std::pair<int64_t, int64_t>> differing;
  GateScores scores(w);
  for (int64_t t = 0; t < w.total_q; ++t)
    for (int64_t h = 0; h < w.c.heads_q; ++h) {
      const size_t at = static_cast<size_t>((t * w.c.heads_q + h) * width);
      const std::vector<int32_t> a(got.begin() + static_cast<long>(at),
                                   got.begin() + static_cast<long>(at + width));
      const std::vector<int32_t> r(want.begin() + static_cast<long>(at),
                                   want.begin() + static_cast<long>(at + width));
      if (a == r) continue;
      // Same count, same current block, ascending: only the past choice may differ.
      const auto count = [](const std::vector<int32_t>& x) {
        return std::count_if(x.begin(), x.end(), [](int32_t v) { return v >= 0; });
      };
      EXPECT_EQ(count(a), count(r)) << "token " << t << " head " << h << ": " << describe(w.c);
      EXPECT_TRUE(std::is_sorted(a.begin(), a.begin() + count(a)))
          << "token " << t << " head " << h;
      const int64_t n = count(r);
      if (n == 0 || count(a) != n ||
          a[static_cast<size_t>(n - 1)] != r[static_cast<size_t>(n - 1)]) {
        ADD_FAILURE() << "token " << t << " head " << h << ": current block or count differs; "
                      << describe(w.c);
        continue;
      }
      std::vector<int32_t> only_a, only_r;
      std::set_difference(a.begin(), a.begin() + n, r.begin(), r.begin() + n,
                          std::back_inserter(only_a));
      std::set_difference(r.begin(), r.begin() + n, a.begin(), a.begin() + n,
                          std::back_inserter(only_r));
      for (int32_t x : only_a)
        for (int32_t y : only_r) {
          const auto [sx, mx] = scores.score(t, h, x);
          const auto [sy, my] = scores.score(t, h, y);
          EXPECT_LE(std::abs(sx - sy), 1e-5 * std::max(mx, my) + 1e-12)
              << "token " << t << " head " << h << ": cuda chose block " << x << " (score " << sx
              << "), the reference block " << y << " (score " << sy << "); " << describe(w.c);
        }
      differing.insert({t, h});
    }
  return differing;
}

double lse_tolerance() {
  return 2e-3;
}

// Output and lse of the CUDA forward against the reference, row by row.
void check_forward(const Workload& w, const Tensor& out, const Tensor& lse, const Tensor& ref_out,
                   const Tensor& ref_lse, const std::set<std::pair<int64_t, int64_t>>& skip) {
  const Case& c = w.c;
  const double tol = output_tolerance(c.dtype);
  double worst = 0.0, worst_lse = 0.0;
  for (int64_t t = 0; t < w.total_q; ++t)
    for (int64_t h = 0; h < c.heads_q; ++h) {
      if (skip.count({t, h})) continue;
      for (int64_t d = 0; d < c.head_dim; ++d) {
        const int64_t i = (t * c.heads_q + h) * c.head_dim + d;
        const double e = std::abs(static_cast<double>(out.get(i)) - ref_out.get(i));
        if (!(e <= tol)) {
          ADD_FAILURE() << "out[" << t << ", " << h << ", " << d << "] = " << out.get(i)
                        << ", reference " << ref_out.get(i) << "; " << describe(c);
          return;
        }
        worst = std::max(worst, e);
      }
      const int64_t j = h * w.total_q + t;
      const double e = std::abs(static_cast<double>(lse.get(j)) - ref_lse.get(j));
      if (!(e <= lse_tolerance())) {
        ADD_FAILURE() << "lse[" << h << ", " << t << "] = " << lse.get(j) << ", reference "
                      << ref_lse.get(j) << "; " << describe(c);
        return;
      }
      worst_lse = std::max(worst_lse, e);
    }
  ::testing::Test::RecordProperty("max_abs_out_error", std::to_string(worst));
  ::testing::Test::RecordProperty("max_abs_lse_error", std::to_string(worst_lse));
}

// The full comparison of one case: routing, then forward on the rows whose
// routing agrees.
void expect_matches_reference(const Case& c) {
  SCOPED_TRACE(describe(c));
  const Workload w = make_workload(c);
  const DeviceRun run(w);
  const int64_t width = width_of(w);
  const std::set<std::pair<int64_t, int64_t>> differing =
      check_selection(w, run.routing(width), reference_routing(w, width), width);
  EXPECT_LE(differing.size(),
            static_cast<size_t>(std::max<int64_t>(2, w.total_q * c.heads_q / 100)))
      << "too many near-tie selection differences";

  Tensor out = w.new_out(), lse = w.new_lse();
  run.forward(out, lse);
  Tensor ref_out = w.new_out(), ref_lse = w.new_lse();
  ExecOptions o;
  o.backend = Backend::reference;
  forward(w.inputs(), w.config(), ref_out.view(), ref_lse.view(), o);
  check_forward(w, out, lse, ref_out, ref_lse, differing);
}

const NamedCase kSweep[] = {
    {"varlen_empty_tiny_bf16_d128_gqa4",
     make_case({300, 0, 1, 517, 64}, {}, 8, 2, 128, 64, 3, bf16)},
    {"varlen_fp16_d64_gqa8", make_case({1000, 37}, {}, 8, 1, 64, 128, 4, f16)},
    {"chunked_prefill_bf16_d128",
     make_case({5, 100, 0, 64}, {900, 1000, 50, 64}, 4, 4, 128, 256, 2, bf16)},
    {"top_k_1_fp16", make_case({333, 2}, {}, 2, 1, 64, 64, 1, f16)},
    {"partial_blocks_b48_fp16_d128", make_case({200, 77}, {}, 2, 2, 128, 48, 3, f16)},
    {"block_100_bf16_d64", make_case({450}, {}, 4, 1, 64, 100, 3, bf16)},
    {"block_256_gqa4_bf16", make_case({1100}, {}, 4, 1, 128, 256, 3, bf16)},
    {"block_4096_chunked_bf16", make_case({40}, {9000}, 4, 1, 128, 4096, 2, bf16)},
    {"block_8192_chunked_fp16", make_case({16, 8}, {20000, 9000}, 2, 1, 64, 8192, 2, f16)},
    {"tiny_block_1_bf16", make_case({70, 3}, {}, 4, 1, 64, 1, 3, bf16)},
    {"tiny_block_3_wide_top_k_fp16", make_case({200}, {}, 2, 1, 128, 3, 20, f16)},
    {"tiny_block_8_bf16_d128", make_case({130, 129}, {}, 8, 8, 128, 8, 5, bf16)},
    {"tiny_block_16_shared_fp16", make_case({257}, {}, 8, 2, 64, 16, 4, f16, true)},
    {"top_k_12_many_blocks_bf16", make_case({700}, {}, 4, 1, 64, 32, 12, bf16)},
    {"shared_gqa8_bf16_d128", make_case({400, 90}, {500, 90}, 8, 1, 128, 64, 4, bf16, true)},
};

class CudaSweep : public ::testing::TestWithParam<NamedCase> {};

TEST_P(CudaSweep, MatchesReference) {
  SKIP_WITHOUT_GPU();
  expect_matches_reference(GetParam().c);
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaSweep, ::testing::ValuesIn(kSweep),
                         [](const ::testing::TestParamInfo<NamedCase>& info) {
                           return std::string(info.param.name);
                         });

TEST(CudaForward, RandomCasesMatchReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(2024);
  for (DType dtype : {bf16, f16})
    for (int i = 0; i < 25; ++i) expect_matches_reference(random_case(rng, dtype, {64, 128}, 300));
}

// Top-k at least the number of blocks against the fp64 dense causal oracle,
// bf16/fp16 x D 64/128, on whichever kernel the switches pick; `label`, where
// given, prints the largest differences under it.
void expect_dense_causal(const char* label) {
  for (DType dtype : {bf16, f16})
    for (int64_t d : {64, 128}) {
      const Case c =
          make_case({700, 0, 33, 1}, {}, 4, 2, d, 64, 100, dtype, false, static_cast<uint64_t>(d));
      SCOPED_TRACE(describe(c));
      const Workload w = make_workload(c);
      const DeviceRun run(w);
      Tensor out = w.new_out(), lse = w.new_lse();
      run.forward(out, lse);
      std::vector<double> dense_out, dense_lse;
      dense_causal_attention(w, dense_out, dense_lse);
      const ErrorStats eo = compare(out.to_double(), dense_out),
                       el = compare(lse.to_double(), dense_lse);
      if (label != nullptr)
        std::printf("[ %s ] dtype %s D %lld: out max %.3e | lse max %.3e\n", label,
                    dtype == bf16 ? "bf16" : "fp16", static_cast<long long>(d), eo.max_abs,
                    el.max_abs);
      EXPECT_TRUE(eo.finite && el.finite);
      EXPECT_LE(eo.max_abs, output_tolerance(dtype));
      EXPECT_LE(el.max_abs, lse_tolerance());
    }
}

TEST(CudaForward, TopKAtLeastBlocksIsDenseCausal) {
  SKIP_WITHOUT_GPU();
  expect_dense_causal(nullptr);
}

// Chunked prefill where top_k covers every block: the dense path with
// queries at the last positions.
TEST(CudaForward, DenseSwitchWithChunkedPrefill) {
  SKIP_WITHOUT_GPU();
  const Case c = make_case({10, 130}, {300, 140}, 2, 1, 128, 128, 3, bf16);
  const Workload w = make_workload(c);
  const DeviceRun run(w);
  Tensor out = w.new_out(), lse = w.new_lse();
  run.forward(out, lse);
  std::vector<double> dense_out, dense_lse;
  dense_causal_attention(w, dense_out, dense_lse);
  EXPECT_LE(compare(out.to_double(), dense_out).max_abs, output_tolerance(bf16));
  EXPECT_LE(compare(lse.to_double(), dense_lse).max_abs, lse_tolerance());
}

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  return a.numel() == b.numel() &&
         std::memcmp(a.data(), b.data(), static_cast<size_t>(a.numel() * dtype_size(a.dtype()))) ==
             0;
}

// A tiny partial-output budget splits the queries into many chunks; the
// result must not change by a bit (every row's work is the same).
TEST(CudaForward, ManyChunksGiveTheSameResult) {
  SKIP_WITHOUT_GPU();
  const Case c = make_case({600, 0, 250, 1}, {}, 8, 2, 128, 32, 4, bf16);
  const Workload w = make_workload(c);
  const DeviceRun run(w);
  Tensor out1 = w.new_out(), lse1 = w.new_lse(), out2 = w.new_out(), lse2 = w.new_lse();
  run.forward(out1, lse1);
  ASSERT_EQ(setenv("MOBA_CUDA_PARTIAL_BYTES", "1", 1), 0);  // one row tile per chunk
  run.forward(out2, lse2);
  unsetenv("MOBA_CUDA_PARTIAL_BYTES");
  EXPECT_TRUE(bitwise_equal(out1, out2));
  EXPECT_TRUE(bitwise_equal(lse1, lse2));
  expect_matches_reference(c);
}

TEST(CudaForward, RepeatedRunsAreBitwiseIdentical) {
  SKIP_WITHOUT_GPU();
  const Case c = make_case({900, 300}, {}, 8, 2, 64, 64, 5, f16);
  const Workload w = make_workload(c);
  const DeviceRun run(w);
  Tensor out1 = w.new_out(), lse1 = w.new_lse(), out2 = w.new_out(), lse2 = w.new_lse();
  run.forward(out1, lse1);
  run.forward(out2, lse2);
  EXPECT_TRUE(bitwise_equal(out1, out2));
  EXPECT_TRUE(bitwise_equal(lse1, lse2));
}

// A forward captured in a CUDA graph and replayed gives the direct result bit
// for bit: no host synchronisation or host read of device data inside, the
// workspace allocated and freed by the graph. Replayed twice into poisoned
// outputs (the per-call tables are rebuilt inside the graph). Routed with
// small blocks, routed with 1024-key blocks (the Hopper kernel's past mode
// where it runs) and the dense switch.
TEST(CudaForward, CapturedInAGraph) {
  SKIP_WITHOUT_GPU();
  const Case cases[] = {
      make_case({600, 0, 250, 1}, {}, 8, 2, 128, 64, 3, bf16),
      make_case({3000, 700}, {}, 4, 2, 64, 1024, 2, f16),
      make_case({900, 130}, {}, 8, 2, 128, 256, 100, bf16),
  };
  for (const Case& c : cases) {
    const Workload w = make_workload(c);
    const DeviceRun run(w);
    Tensor direct_out = w.new_out(), direct_lse = w.new_lse();
    run.forward(direct_out, direct_lse);
    Tensor out = w.new_out(), lse = w.new_lse();
    const DeviceBuffer d_out = DeviceRun::buffer_for(out), d_lse = DeviceRun::buffer_for(lse);
    cudaGraph_t graph = nullptr;
    cuda_ok(cudaStreamBeginCapture(run.stream(), cudaStreamCaptureModeThreadLocal),
            "begin capture");
    run.enqueue_forward(out, lse, d_out, d_lse, run.inputs());
    cuda_ok(cudaStreamEndCapture(run.stream(), &graph), "end capture");
    cudaGraphExec_t exec = nullptr;
    cuda_ok(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
    for (int round = 0; round < 2; ++round) {
      run.poison(d_out);
      run.poison(d_lse);
      cuda_ok(cudaGraphLaunch(exec, run.stream()), "launch");
      run.synchronize();
      download(d_out, out);
      download(d_lse, lse);
      EXPECT_TRUE(bitwise_equal(out, direct_out)) << "replay " << round;
      EXPECT_TRUE(bitwise_equal(lse, direct_lse)) << "replay " << round;
    }
    (void)cudaGraphExecDestroy(exec);
    (void)cudaGraphDestroy(graph);
  }
}

// q, k, v as slices of one packed [tokens, 3, heads, D] tensor, out with a
// padded token stride, lse absent: the same numbers as the contiguous run.
TEST(CudaForward, StridedViewsMatchContiguous) {
  SKIP_WITHOUT_GPU();
  const Case c = make_case({300, 45}, {}, 4, 4, 64, 64, 3, bf16);
  const Workload w = make_workload(c);
  const DeviceRun run(w);
  Tensor out_ref = w.new_out(), lse_ref = w.new_lse();
  run.forward(out_ref, lse_ref);

  const int64_t T = w.total_q, H = c.heads_q, D = c.head_dim;
  Tensor packed(bf16, {T, 3, H, D});
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t d = 0; d < D; ++d) {
        const int64_t src = (t * H + h) * D + d;
        packed.set(((t * 3 + 0) * H + h) * D + d, w.q.get(src));
        packed.set(((t * 3 + 1) * H + h) * D + d, w.k.get(src));
        packed.set(((t * 3 + 2) * H + h) * D + d, w.v.get(src));
      }
  const DeviceBuffer d_packed = upload(packed);
  Inputs in = run.inputs();
  for (int i = 0; i < 3; ++i) {
    TensorView& view = i == 0 ? in.q : i == 1 ? in.k : in.v;
    view.data = static_cast<uint16_t*>(d_packed.get()) + i * H * D;
    view.strides = {3 * H * D, D, 1, 0};
  }
  const int64_t out_token_stride = H * D + 8;  // padded rows
  DeviceBuffer d_out(static_cast<size_t>(T * out_token_stride * 2));
  cuda_ok(cudaMemset(d_out.get(), 0xff, d_out.bytes()), "memset");
  TensorView out_view = on_device(w.new_out().view(), d_out.get());
  out_view.strides = {out_token_stride, D, 1, 0};
  forward(in, w.config(), out_view, TensorView{}, run.options());
  cuda_ok(cudaStreamSynchronize(run.stream()), "sync");
  std::vector<uint16_t> raw(static_cast<size_t>(T * out_token_stride));
  cuda_ok(cudaMemcpy(raw.data(), d_out.get(), d_out.bytes(), cudaMemcpyDeviceToHost), "download");
  const auto* want = static_cast<const uint16_t*>(out_ref.data());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < H * D; ++j)
      ASSERT_EQ(raw[static_cast<size_t>(t * out_token_stride + j)], want[t * H * D + j])
          << "token " << t << " element " << j;
}

// Identical keys make every block mean, hence every gate score, equal: the
// tie rule must pick the lowest past blocks, exactly like the reference.
TEST(CudaRouting, TiesGoToTheLowerBlock) {
  SKIP_WITHOUT_GPU();
  for (bool shared : {false, true}) {
    Case c = make_case({500, 70}, {}, 4, 2, 128, 16, 4, bf16, shared);
    Workload w = make_workload(c);
    for (int64_t i = 0; i < w.k.numel(); ++i)
      w.k.set(i, 0.25f * static_cast<float>(i % c.head_dim % 7) - 0.5f);
    const DeviceRun run(w);
    const int64_t width = width_of(w);
    EXPECT_EQ(run.routing(width), reference_routing(w, width)) << "shared=" << shared;
  }
}

// A block whose keys hold a NaN has a NaN score and ranks below every other.
TEST(CudaRouting, NanScoresRankLowest) {
  SKIP_WITHOUT_GPU();
  Case c = make_case({400}, {}, 2, 1, 64, 32, 3, f16);
  Workload w = make_workload(c);
  for (int64_t block : {0, 3, 5}) w.k.set((block * 32 + 1) * c.head_dim + 2, std::nanf(""));
  const DeviceRun run(w);
  const int64_t width = width_of(w);
  const std::vector<int32_t> got = run.routing(width), want = reference_routing(w, width);
  EXPECT_EQ(got, want);
  // Rows in blocks 6.. have better blocks than 0, 3 and 5 to choose from.
  for (int64_t t = 6 * 32; t < w.total_q; ++t)
    for (int64_t s = 0; s < width; ++s) {
      const int32_t b = got[static_cast<size_t>((t * c.heads_q) * width + s)];
      EXPECT_TRUE(b != 0 && b != 3 && b != 5) << "token " << t;
    }
}

TEST(CudaRouting, MatchesReferenceWithWideOutput) {
  SKIP_WITHOUT_GPU();
  const Case c = make_case({300, 20}, {400, 20}, 4, 1, 64, 16, 6, bf16);
  const Workload w = make_workload(c);
  const DeviceRun run(w);
  const int64_t width = width_of(w) + 3;  // extra columns are padded with -1
  const std::vector<int32_t> got = run.routing(width);
  check_selection(w, got, reference_routing(w, width), width);
  for (int64_t i = 0; i < w.total_q * c.heads_q; ++i)
    EXPECT_EQ(got[static_cast<size_t>(i * width + width - 1)], -1);
}

// Device cu_seqlens are not read on the host; when they break the contract
// the kernels touch no memory out of bounds and fill every output with NaN
// (routing: with -1), so the caller sees the failure without a sync.
TEST(CudaForward, InvalidDeviceCuSeqlensGiveNaN) {
  SKIP_WITHOUT_GPU();
  Case c = make_case({100, 60}, {}, 2, 1, 64, 32, 2, bf16);
  Workload w = make_workload(c);
  auto* cu = static_cast<int32_t*>(w.cu_q.data());
  cu[1] = 170;  // beyond total_q = 160, and then decreasing
  const DeviceRun run(w);
  Tensor out = w.new_out(), lse = w.new_lse();
  run.forward(out, lse);
  for (int64_t i = 0; i < out.numel(); ++i) ASSERT_TRUE(std::isnan(out.get(i))) << i;
  for (int64_t i = 0; i < lse.numel(); ++i) ASSERT_TRUE(std::isnan(lse.get(i))) << i;
  for (int32_t s : run.routing(width_of(w))) ASSERT_EQ(s, -1);
}

TEST(CudaForward, RejectsWhatItDoesNotSupport) {
  SKIP_WITHOUT_GPU();
  const auto status_of = [](auto&& fn) {
    try {
      fn();
    } catch (const Error& e) {
      return std::make_pair(e.status(), std::string(e.what()));
    }
    return std::make_pair(Status::ok, std::string());
  };
  {
    const Case c = make_case({64}, {}, 2, 1, 64, 16, 2, DType::float32);
    const Workload w = make_workload(c);
    const DeviceRun run(w);
    Tensor out = w.new_out(), lse = w.new_lse();
    const auto [st, msg] = status_of([&] { run.forward(out, lse); });
    EXPECT_EQ(st, Status::unsupported) << msg;
    EXPECT_NE(msg.find("float32"), std::string::npos) << msg;
  }
  {
    const Case c = make_case({64}, {}, 2, 1, 96, 16, 2, bf16);
    const Workload w = make_workload(c);
    const DeviceRun run(w);
    Tensor out = w.new_out(), lse = w.new_lse();
    const auto [st, msg] = status_of([&] { run.forward(out, lse); });
    EXPECT_EQ(st, Status::unsupported) << msg;
    EXPECT_NE(msg.find("head dim"), std::string::npos) << msg;
  }
  {
    const Case c = make_case({64}, {}, 2, 1, 64, 16, 2, bf16);
    const Workload w = make_workload(c);
    const DeviceRun run(w);
    Inputs in = run.inputs();
    in.q.data = static_cast<uint16_t*>(in.q.data) + 1;  // rows no longer 16-byte aligned
    in.q.shape[0] -= 1;
    in.cu_seqlens_q = in.cu_seqlens_k;  // keep the batch valid for the smaller q
    Tensor out(bf16, {63, 2, 64}), lse(DType::float32, {2, 63});
    const auto [st, msg] = status_of([&] { run.forward(out, lse, in); });
    EXPECT_EQ(st, Status::unsupported) << msg;
    EXPECT_NE(msg.find("16-byte"), std::string::npos) << msg;
  }
}

TEST(CudaForward, EmptyBatchIsANoOp) {
  SKIP_WITHOUT_GPU();
  const Case c = make_case({0, 0}, {5, 0}, 2, 1, 64, 16, 2, bf16);
  const Workload w = make_workload(c);
  const DeviceRun run(w);
  Tensor out = w.new_out(), lse = w.new_lse();
  EXPECT_NO_THROW(run.forward(out, lse));
}

// ---- Routing with small blocks (the filter + per-row insertion kernel) ----

// Sets every key of block j of its sequence to value(j, kv head, d), so the
// block means are exactly those values.
template <class Fn>
void set_block_keys(Workload& w, Fn value) {
  const auto* ck = static_cast<const int32_t*>(w.cu_k.data());
  const Case& c = w.c;
  for (int64_t b = 0; b + 1 < w.cu_k.numel(); ++b)
    for (int64_t t = ck[b]; t < ck[b + 1]; ++t)
      for (int64_t h = 0; h < c.heads_kv; ++h)
        for (int64_t d = 0; d < c.head_dim; ++d)
          w.k.set((t * c.heads_kv + h) * c.head_dim + d, value((t - ck[b]) / c.block_size, h, d));
}

// Hundreds of blocks whose means take only three values (0.25, 0.5, 1 times
// a constant vector): every score is S, 2S or 4S for the row's S = sum of q,
// so each row sees ~170 exactly tied blocks per value, across many 32-block
// units, and must keep the lowest-indexed blocks of the best value, exactly
// like the reference (powers of two keep the three classes exact multiples
// in any summation order). Top-k 6 / 9 / 17 exercise a list with sentinels,
// a full list of 8 and a full list of 16.
TEST(CudaRouting, ExactTiesAcrossManyBlocks) {
  SKIP_WITHOUT_GPU();
  for (int64_t top_k : {6, 9, 17})
    for (bool shared : {false, true}) {
      const Case c = make_case({2100, 700}, {2100, 900}, 4, 2, 128, 4, top_k, bf16, shared);
      SCOPED_TRACE(describe(c));
      Workload w = make_workload(c);
      set_block_keys(w, [](int64_t j, int64_t h, int64_t) {
        return 0.25f * static_cast<float>(1 << ((j + h) % 3));
      });
      const DeviceRun run(w);
      const int64_t width = width_of(w);
      EXPECT_EQ(run.routing(width), reference_routing(w, width));
    }
}

// Sequences whose block counts sit on both sides of the kernel's 32-block
// units and 64-block stages (block 2: 31..129 blocks), varlen and chunked
// prefill (rows of one tile in different blocks, unaligned offsets).
TEST(CudaRouting, BlockCountsAroundTheUnitBoundaries) {
  SKIP_WITHOUT_GPU();
  expect_matches_reference(
      make_case({62, 63, 64, 65, 128, 129, 130, 190, 257}, {}, 2, 1, 64, 2, 5, bf16));
  expect_matches_reference(make_case({40, 100, 1}, {200, 389, 130}, 2, 2, 128, 3, 17, f16));
}

// One block per token: the 128 rows of a tile have 128 different current
// blocks, so the causal test runs in every unit of the scan.
TEST(CudaRouting, EveryRowInItsOwnBlock) {
  SKIP_WITHOUT_GPU();
  expect_matches_reference(make_case({600}, {}, 2, 1, 64, 1, 8, bf16));
}

// GQA with small blocks, per head and shared by the group.
TEST(CudaRouting, GqaWithSmallBlocks) {
  SKIP_WITHOUT_GPU();
  expect_matches_reference(make_case({500, 130}, {}, 8, 2, 64, 4, 12, f16));
  expect_matches_reference(make_case({700, 300}, {}, 8, 2, 128, 8, 6, bf16, true));
}

// More past blocks kept than the register lists hold (top-k 24: the wide
// path) with many candidates per row.
TEST(CudaRouting, TopKBeyondTheRegisterLists) {
  SKIP_WITHOUT_GPU();
  expect_matches_reference(make_case({300, 77}, {}, 2, 1, 64, 2, 24, bf16));
}

// NaN in every block but three: rows keep the three real blocks and then
// the lowest-indexed NaN blocks (NaN ranks lowest, ties to the lower
// index), which keeps the kernel's threshold open (NaN) for the whole scan.
TEST(CudaRouting, MostBlocksNan) {
  SKIP_WITHOUT_GPU();
  for (int64_t top_k : {4, 8}) {
    const Case c = make_case({300, 260}, {}, 2, 1, 64, 4, top_k, f16);
    SCOPED_TRACE(describe(c));
    Workload w = make_workload(c);
    const auto* ck = static_cast<const int32_t*>(w.cu_k.data());
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t block = 0; block * 4 < ck[b + 1] - ck[b]; ++block)
        if (block != 5 && block != 40 && block != 60)
          w.k.set((ck[b] + block * 4 + 1) * c.head_dim + 3, std::nanf(""));
    const DeviceRun run(w);
    const int64_t width = width_of(w);
    EXPECT_EQ(run.routing(width), reference_routing(w, width));
  }
}

// Many chunks with small blocks and GQA: each chunk's inversion scans only
// its own sequences' buckets; the result must not change by a bit.
TEST(CudaForward, ManyChunksWithSmallBlocks) {
  SKIP_WITHOUT_GPU();
  const Case c = make_case({300, 0, 170, 1, 200}, {}, 4, 2, 64, 4, 6, bf16);
  const Workload w = make_workload(c);
  const DeviceRun run(w);
  Tensor out1 = w.new_out(), lse1 = w.new_lse(), out2 = w.new_out(), lse2 = w.new_lse();
  run.forward(out1, lse1);
  ASSERT_EQ(setenv("MOBA_CUDA_PARTIAL_BYTES", "1", 1), 0);  // one row tile per chunk
  run.forward(out2, lse2);
  unsetenv("MOBA_CUDA_PARTIAL_BYTES");
  EXPECT_TRUE(bitwise_equal(out1, out2));
  EXPECT_TRUE(bitwise_equal(lse1, lse2));
  expect_matches_reference(c);
}

}  // namespace
}  // namespace moba::testing

// ---------------------------------------------------------------------------
// The Hopper (sm_90a) attention kernel, attention_sm90.cu. On an H100 the
// tests above already run it (it is the default there; MOBA_CUDA_SM90=0 runs
// them on the mma.sync kernel). These pin each kernel in turn on the same
// inputs, so a failure names the kernel, and print the largest differences
// for a first look: test_cuda_forward --gtest_filter='CudaForwardSm90.*'

#include "backends/cuda/sm90_switch.cuh"

namespace moba::testing {
namespace {

namespace cuda_detail = ::moba::backends::cuda::detail;

// The knob behind the MOBA_CUDA_SM90* switches (no GPU needed): the
// environment read when the knob is made, the test override above it.
TEST(Sm90Switch, OverrideThenEnvironmentThenFallback) {
  ::setenv("MOBA_TEST_KNOB_OFF", "0", 1);
  ::setenv("MOBA_TEST_KNOB_ON", "yes", 1);
  ::setenv("MOBA_TEST_KNOB_EMPTY", "", 1);
  ::unsetenv("MOBA_TEST_KNOB_UNSET");
  cuda_detail::ProcessSwitch off("MOBA_TEST_KNOB_OFF"), on("MOBA_TEST_KNOB_ON");
  cuda_detail::ProcessSwitch empty("MOBA_TEST_KNOB_EMPTY"), unset("MOBA_TEST_KNOB_UNSET");
  EXPECT_EQ(off.forced(), 0);
  EXPECT_EQ(on.forced(), 1);
  EXPECT_EQ(empty.forced(), -1);
  EXPECT_EQ(unset.forced(), -1);
  EXPECT_FALSE(off.on(true));
  EXPECT_TRUE(on.on(false));
  EXPECT_TRUE(unset.on(true));
  EXPECT_FALSE(unset.on(false));
  // Read once: a later change of the environment does not count.
  ::setenv("MOBA_TEST_KNOB_UNSET", "1", 1);
  EXPECT_EQ(unset.forced(), -1);
  off.set_override(7);  // any non-zero value is "on"
  EXPECT_TRUE(off.on(false));
  on.set_override(0);
  EXPECT_FALSE(on.on(true));
  on.set_override(-3);  // negative: back to the environment
  EXPECT_TRUE(on.on(false));
  ::unsetenv("MOBA_TEST_KNOB_OFF");
  ::unsetenv("MOBA_TEST_KNOB_ON");
  ::unsetenv("MOBA_TEST_KNOB_EMPTY");
  ::unsetenv("MOBA_TEST_KNOB_UNSET");
}

// Pins the attention kernel while alive; afterwards MOBA_CUDA_SM90 decides.
class PinAttentionKernel {
 public:
  explicit PinAttentionKernel(bool sm90) { cuda_detail::set_sm90_attention_override(sm90 ? 1 : 0); }
  ~PinAttentionKernel() { cuda_detail::set_sm90_attention_override(-1); }
  PinAttentionKernel(const PinAttentionKernel&) = delete;
  PinAttentionKernel& operator=(const PinAttentionKernel&) = delete;
};

#define SKIP_WITHOUT_SM90()                     \
  SKIP_WITHOUT_GPU();                           \
  if (!cuda_detail::sm90_attention_supported()) \
  GTEST_SKIP() << "no compute capability 9.x device or no sm_90a code in this build"

// Both kernels' out and lse on one workload (same routing: the routing
// kernels are deterministic), compared with each other.
void expect_kernels_agree(const char* name, const Case& c) {
  SCOPED_TRACE(std::string(name) + ": " + describe(c));
  const Workload w = make_workload(c);
  const DeviceRun run(w);
  Tensor out_mma = w.new_out(), lse_mma = w.new_lse();
  Tensor out_sm90 = w.new_out(), lse_sm90 = w.new_lse();
  {
    const PinAttentionKernel pin(false);
    run.forward(out_mma, lse_mma);
  }
  {
    const PinAttentionKernel pin(true);
    run.forward(out_sm90, lse_sm90);
  }
  const ErrorStats eo = compare(out_sm90.to_double(), out_mma.to_double());
  const ErrorStats el = compare(lse_sm90.to_double(), lse_mma.to_double());
  std::printf("[ sm90 vs mma.sync ] %-36s out max %.3e mean %.3e | lse max %.3e | finite %d\n",
              name, eo.max_abs, eo.mean_abs, el.max_abs, eo.finite && el.finite ? 1 : 0);
  EXPECT_TRUE(eo.finite && el.finite);
  EXPECT_LE(eo.max_abs, output_tolerance(c.dtype));
  EXPECT_LE(el.max_abs, lse_tolerance());
}

// Shapes for the three modes: past tiles of one stage (partial, masked) to
// 32 stages (block 4096), more tiles than SMs (the persistent loop, both Q
// buffers, stage phases across tiles), tiles of <= 64 rows (one idle
// consumer warpgroup), varlen with empty sequences, chunked prefill, GQA and
// shared routing, D 64/128, bf16/fp16.
const NamedCase kSm90Cases[] = {
    {"past_block_4096_bf16_d128", make_case({40}, {9000}, 4, 1, 128, 4096, 2, bf16)},
    {"past_block_4096_fp16_d64", make_case({200, 8}, {12000, 4100}, 8, 2, 64, 4096, 3, f16)},
    {"past_many_tiles_fp16_d64", make_case({8192}, {}, 16, 4, 64, 256, 4, f16)},
    {"past_many_tiles_bf16_d128", make_case({6000, 2100}, {}, 8, 2, 128, 128, 6, bf16)},
    {"past_block_48_fp16_d128", make_case({2000, 300}, {}, 8, 2, 128, 48, 4, f16)},
    {"past_shared_gqa8_bf16_d64", make_case({1500}, {}, 8, 1, 64, 64, 5, bf16, true)},
    {"varlen_empty_bf16_d128", make_case({300, 0, 1, 517, 64}, {}, 8, 2, 128, 64, 3, bf16)},
    {"current_tiny_blocks_bf16_d128", make_case({1000, 77}, {}, 4, 2, 128, 16, 1, bf16)},
    {"current_block_1_fp16_d64", make_case({300, 3}, {}, 4, 1, 64, 1, 1, f16)},
    {"current_block_300_fp16_d64", make_case({1000}, {1400}, 4, 4, 64, 300, 1, f16)},
    {"dense_many_tiles_bf16_d128", make_case({3000, 1000}, {}, 8, 2, 128, 256, 100, bf16)},
    {"dense_chunked_prefill_fp16_d64", make_case({100, 700}, {2000, 700}, 4, 4, 64, 128, 64, f16)},
    {"dense_tiny_fp16_d128", make_case({1, 2, 65, 129}, {}, 2, 1, 128, 64, 100, f16)},
};

TEST(CudaForwardSm90, AgreesWithMmaSyncKernel) {
  SKIP_WITHOUT_SM90();
  for (const NamedCase& nc : kSm90Cases) expect_kernels_agree(nc.name, nc.c);
}

// Pins the Hopper kernel's pipeline variant (stages, intra-warpgroup
// overlap) for a scope, then hands the choice back to the environment.
class PinSm90Pipeline {
 public:
  PinSm90Pipeline(int stages, int overlap) {
    cuda_detail::set_sm90_stages_override(stages);
    cuda_detail::set_sm90_overlap_override(overlap);
  }
  ~PinSm90Pipeline() {
    cuda_detail::set_sm90_stages_override(0);
    cuda_detail::set_sm90_overlap_override(-1);
  }
  PinSm90Pipeline(const PinSm90Pipeline&) = delete;
  PinSm90Pipeline& operator=(const PinSm90Pipeline&) = delete;
};

// Every pipeline variant (2 or 3 K/V stages, with and without the overlap)
// against the mma.sync kernel on the same shapes, in one process, whatever
// MOBA_CUDA_SM90_STAGES / MOBA_CUDA_SM90_OVERLAP say.
TEST(CudaForwardSm90, PipelineVariantsAgreeWithMmaSyncKernel) {
  SKIP_WITHOUT_SM90();
  for (int stages : {2, 3})
    for (int overlap : {0, 1}) {
      SCOPED_TRACE("stages " + std::to_string(stages) + ", overlap " + std::to_string(overlap));
      const PinSm90Pipeline pin(stages, overlap);
      for (const NamedCase& nc : kSm90Cases) expect_kernels_agree(nc.name, nc.c);
    }
}

// The whole named sweep and the dense oracle with the Hopper kernel pinned:
// the same checks as CudaSweep and TopKAtLeastBlocksIsDenseCausal, also
// when MOBA_CUDA_SM90=0 is set for the rest of the run.
TEST(CudaForwardSm90, SweepMatchesReference) {
  SKIP_WITHOUT_SM90();
  const PinAttentionKernel pin(true);
  for (const NamedCase& nc : kSweep) {
    SCOPED_TRACE(nc.name);
    expect_matches_reference(nc.c);
  }
}

TEST(CudaForwardSm90, DenseMatchesFp64Oracle) {
  SKIP_WITHOUT_SM90();
  const PinAttentionKernel pin(true);
  expect_dense_causal("sm90 vs fp64 dense");
}

}  // namespace
}  // namespace moba::testing
