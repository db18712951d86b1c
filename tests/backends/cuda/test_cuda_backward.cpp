// The CUDA backward against the reference backend's (fp64) backward, through
// the public API on device tensors and a non-default stream, in both modes;
// the deterministic mode must be bitwise reproducible. Every test skips when
// no GPU is present.
//
// out and lse come from the CUDA forward (as in training). Where the CUDA
// routing legitimately differs from the reference's (a near tie, see the
// forward's tests), the rows concerned and the keys of the blocks involved
// are left out of the comparison; there may only be few.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "backends/cuda/cuda_testing.hpp"
#include "backends/cuda/sm90_backward_switch.cuh"
#include "support/testing.hpp"

namespace moba::testing {
namespace {

namespace cuda_detail = ::moba::backends::cuda::detail;

// Pins whether the fast mode fuses dq into the Hopper dK/dV kernel (where
// that kernel runs) while alive; afterwards MOBA_CUDA_SM90_BWD_FUSED_DQ
// decides.
class PinFusedDq {
 public:
  explicit PinFusedDq(bool fused) {
    cuda_detail::set_sm90_backward_fused_dq_override(fused ? 1 : 0);
  }
  ~PinFusedDq() { cuda_detail::set_sm90_backward_fused_dq_override(-1); }
  PinFusedDq(const PinFusedDq&) = delete;
  PinFusedDq& operator=(const PinFusedDq&) = delete;
};

struct Grads {
  Tensor dq, dk, dv;
};

// A workload on the device with a random dO; runs the forward, the routing
// and the backward on a non-default stream.
class BackwardRun : public DeviceWorkload {
 public:
  explicit BackwardRun(const Workload& w)
      : DeviceWorkload(w),
        dout_(w.new_out()),
        out_(bytes_of(dout_)),
        dout_d_(bytes_of(dout_)),
        lse_(bytes_of(w.new_lse())) {
    std::mt19937_64 rng(w.c.seed + 99);
    dout_.randn(rng);
    upload(dout_, dout_d_);
  }

  const Tensor& dout() const { return dout_; }

  void forward() {
    Tensor out = w_.new_out(), lse = w_.new_lse();
    moba::forward(inputs(), w_.config(), on_device(out.view(), out_.get()),
                  on_device(lse.view(), lse_.get()), options(false));
    synchronize();
  }

  // Backward into NaN-poisoned gradients, copied back.
  Grads backward(bool deterministic) const {
    Grads g{w_.new_out(), Tensor(w_.c.dtype, {w_.total_k, w_.c.heads_kv, w_.c.head_dim}),
            Tensor(w_.c.dtype, {w_.total_k, w_.c.heads_kv, w_.c.head_dim})};
    DeviceBuffer dq(bytes_of(g.dq)), dk(bytes_of(g.dk)), dv(bytes_of(g.dv));
    for (const DeviceBuffer* b : {&dq, &dk, &dv})
      if (b->bytes()) cuda_ok(cudaMemset(b->get(), 0xff, b->bytes()), "memset");
    Tensor out = w_.new_out(), lse = w_.new_lse();
    moba::backward(inputs(), w_.config(), on_device(out.view(), out_.get()),
                   on_device(dout_.view(), dout_d_.get()), on_device(lse.view(), lse_.get()),
                   on_device(g.dq.view(), dq.get()), on_device(g.dk.view(), dk.get()),
                   on_device(g.dv.view(), dv.get()), options(deterministic));
    synchronize();
    download(dq, g.dq);
    download(dk, g.dk);
    download(dv, g.dv);
    return g;
  }

  std::vector<int32_t> routing(int64_t width, Backend backend) const {
    Tensor sel(DType::int32, {w_.total_q, w_.c.heads_q, width});
    ExecOptions o;
    o.backend = backend;
    if (backend == Backend::cuda) {
      DeviceBuffer d(bytes_of(sel));
      o.stream = stream();
      moba::routing(inputs(), w_.config(), on_device(sel.view(), d.get()), o);
      synchronize();
      download(d, sel);
    } else {
      moba::routing(w_.inputs(), w_.config(), sel.view(), o);
    }
    const auto* p = static_cast<const int32_t*>(sel.data());
    return std::vector<int32_t>(p, p + sel.numel());
  }

 private:
  Tensor dout_;
  DeviceBuffer out_, dout_d_, lse_;
};

Grads reference_gradients(const Workload& w, const Tensor& dout) {
  Tensor out = w.new_out(), lse = w.new_lse();
  ExecOptions o;
  o.backend = Backend::reference;
  forward(w.inputs(), w.config(), out.view(), lse.view(), o);
  Grads g{w.new_out(), Tensor(w.c.dtype, {w.total_k, w.c.heads_kv, w.c.head_dim}),
          Tensor(w.c.dtype, {w.total_k, w.c.heads_kv, w.c.head_dim})};
  backward(w.inputs(), w.config(), out.view(), dout.view(), lse.view(), g.dq.view(), g.dk.view(),
           g.dv.view(), o);
  return g;
}

// Max error relative to max(1, the largest reference magnitude), over the
// (token, head) rows not excluded.
double scaled_error(const Tensor& got, const Tensor& want, int64_t heads, int64_t d,
                    const std::set<std::pair<int64_t, int64_t>>& excluded, const char* name) {
  double worst = 0.0, scale = 1.0;
  for (int64_t i = 0; i < want.numel(); ++i) scale = std::max(scale, std::abs(double{want.get(i)}));
  for (int64_t i = 0; i < want.numel(); ++i) {
    if (excluded.count({i / d / heads, i / d % heads}) != 0) continue;
    const double e = std::abs(double{got.get(i)} - double{want.get(i)});
    if (!(e <= 1e30)) {
      ADD_FAILURE() << name << "[" << i << "] = " << got.get(i) << ", not finite";
      return INFINITY;
    }
    worst = std::max(worst, e);
  }
  return worst / scale;
}

double gradient_tolerance(DType dtype) {
  return dtype == DType::float16 ? 1e-2 : 5e-2;
}

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  return std::equal(static_cast<const unsigned char*>(a.data()),
                    static_cast<const unsigned char*>(a.data()) + bytes_of(a),
                    static_cast<const unsigned char*>(b.data()));
}

void expect_gradients_match(const Case& c, bool deterministic) {
  SCOPED_TRACE(describe(c) + (deterministic ? " deterministic" : " fast"));
  const Workload w = make_workload(c);
  BackwardRun run(w);
  run.forward();
  const Grads g = run.backward(deterministic);
  const Grads ref = reference_gradients(w, run.dout());

  // Rows whose CUDA routing differs from the reference (near ties), and the
  // keys of every block either side picked for them.
  const auto& lens_k = c.lens_k.empty() ? c.lens_q : c.lens_k;
  const int64_t max_k = std::max<int64_t>(1, *std::max_element(lens_k.begin(), lens_k.end()));
  const int64_t width = routing_width(max_k, w.config());
  const std::vector<int32_t> got = run.routing(width, Backend::cuda),
                             want = run.routing(width, Backend::reference);
  std::set<std::pair<int64_t, int64_t>> rows, keys;
  const auto* cq = static_cast<const int32_t*>(w.cu_q.data());
  const auto* ck = static_cast<const int32_t*>(w.cu_k.data());
  const int64_t group = c.heads_q / c.heads_kv;
  for (size_t b = 0; b + 1 < static_cast<size_t>(w.cu_q.numel()); ++b)
    for (int64_t t = cq[b]; t < cq[b + 1]; ++t)
      for (int64_t h = 0; h < c.heads_q; ++h) {
        const size_t at = static_cast<size_t>((t * c.heads_q + h) * width);
        if (std::equal(got.begin() + static_cast<long>(at),
                       got.begin() + static_cast<long>(at + width),
                       want.begin() + static_cast<long>(at)))
          continue;
        rows.insert({t, h});
        for (size_t s = at; s < at + static_cast<size_t>(width); ++s)
          for (int32_t blk : {got[s], want[s]})
            for (int64_t j = blk * c.block_size;
                 blk >= 0 && j < std::min<int64_t>((blk + 1) * c.block_size, ck[b + 1] - ck[b]);
                 ++j)
              keys.insert({ck[b] + j, h / group});
      }
  EXPECT_LE(rows.size(), static_cast<size_t>(std::max<int64_t>(2, w.total_q * c.heads_q / 100)))
      << "too many near-tie selection differences";

  const double tol = gradient_tolerance(c.dtype);
  EXPECT_LE(scaled_error(g.dq, ref.dq, c.heads_q, c.head_dim, rows, "dq"), tol);
  EXPECT_LE(scaled_error(g.dk, ref.dk, c.heads_kv, c.head_dim, keys, "dk"), tol);
  EXPECT_LE(scaled_error(g.dv, ref.dv, c.heads_kv, c.head_dim, keys, "dv"), tol);
}

const NamedCase kSweep[] = {
    {"varlen_empty_tiny_bf16_d128_gqa4",
     make_case({300, 0, 1, 517, 64}, {}, 8, 2, 128, 64, 3, bf16)},
    {"varlen_fp16_d64_gqa8", make_case({400, 37}, {}, 8, 1, 64, 128, 3, f16)},
    {"chunked_prefill_bf16_d128",
     make_case({5, 100, 0, 64}, {900, 700, 50, 64}, 4, 4, 128, 256, 2, bf16)},
    {"top_k_1_fp16", make_case({333, 2}, {}, 2, 1, 64, 64, 1, f16)},
    {"top_k_ge_blocks_dense_fp16_d128", make_case({300, 0, 33}, {}, 4, 2, 128, 64, 100, f16)},
    {"dense_chunked_prefill_bf16", make_case({40, 7}, {300, 7}, 2, 1, 64, 32, 50, bf16)},
    {"partial_blocks_b48_fp16_d128", make_case({200, 77}, {}, 2, 2, 128, 48, 3, f16)},
    {"block_100_bf16_d64", make_case({450}, {}, 4, 1, 64, 100, 3, bf16)},
    {"tiny_block_1_bf16", make_case({70, 3}, {}, 4, 1, 64, 1, 3, bf16)},
    {"tiny_block_3_wide_top_k_fp16", make_case({200}, {}, 2, 1, 128, 3, 20, f16)},
    {"tiny_block_16_shared_fp16", make_case({257}, {}, 8, 2, 64, 16, 4, f16, true)},
    {"shared_gqa8_bf16_d128", make_case({300, 90}, {400, 90}, 8, 1, 128, 64, 4, bf16, true)},
    // The tensor-core kernels' tile boundaries: buckets with several 64-entry
    // row tiles and current blocks of several 64-row tiles per head (1500
    // rows, 12 blocks of 128: two 64-key tiles per block).
    {"many_gathered_rows_bf16_d128_gqa4", make_case({1500}, {}, 8, 2, 128, 128, 3, bf16)},
    // A group of 16 query heads on one kv head; blocks of 200 keys: three full
    // 64-key tiles and one of 8.
    {"gqa16_block_200_fp16_d64", make_case({900, 65}, {}, 16, 1, 64, 200, 3, f16)},
    // The dense switch over many 64-key tiles, with more than 64 later rows
    // per tile and a chunked prefill.
    {"dense_long_bf16_d64", make_case({700, 130}, {700, 400}, 4, 2, 64, 128, 8, bf16)},
    // Routed with a long chunked prefill: past and current rows of one key
    // tile come from different halves of the sequence.
    {"chunked_prefill_long_fp16_d128", make_case({600}, {1100}, 4, 1, 128, 96, 4, f16)},
};

class CudaBackwardSweep : public ::testing::TestWithParam<NamedCase> {};

TEST_P(CudaBackwardSweep, DeterministicMatchesReference) {
  SKIP_WITHOUT_GPU();
  expect_gradients_match(GetParam().c, true);
}

TEST_P(CudaBackwardSweep, FastMatchesReference) {
  SKIP_WITHOUT_GPU();
  expect_gradients_match(GetParam().c, false);
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaBackwardSweep, ::testing::ValuesIn(kSweep),
                         [](const ::testing::TestParamInfo<NamedCase>& info) {
                           return std::string(info.param.name);
                         });

TEST(CudaBackward, RandomCasesMatchReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(77);
  for (DType dtype : {bf16, f16})
    for (int i = 0; i < 6; ++i)
      expect_gradients_match(random_case(rng, dtype, {64, 128}, 200), i % 2 == 0);
}

// The fast mode with dq fused into the Hopper dK/dV kernel pinned on or off.
Grads fast_backward(const BackwardRun& run, bool fused_dq) {
  const PinFusedDq pin(fused_dq);
  return run.backward(false);
}

// Deterministic mode: two runs bitwise equal. The fast mode's dq passes use
// the same fixed order, so their dq is bitwise equal too (only dK/dV use
// atomics); dq fused into the Hopper dK/dV kernel (atomics) is equal within
// rounding.
void expect_deterministic_reproducible(const Case& c) {
  SCOPED_TRACE(describe(c));
  const Workload w = make_workload(c);
  BackwardRun run(w);
  run.forward();
  const Grads a = run.backward(true), b = run.backward(true);
  const Grads fast = fast_backward(run, false), fused = fast_backward(run, true);
  EXPECT_TRUE(bitwise_equal(a.dq, b.dq));
  EXPECT_TRUE(bitwise_equal(a.dk, b.dk));
  EXPECT_TRUE(bitwise_equal(a.dv, b.dv));
  EXPECT_TRUE(bitwise_equal(a.dq, fast.dq));
  EXPECT_LE(scaled_error(fused.dq, a.dq, c.heads_q, c.head_dim, {}, "dq"), 1e-2);
}

TEST(CudaBackward, DeterministicModeIsBitwiseReproducible) {
  SKIP_WITHOUT_GPU();
  for (const Case& c : {make_case({600, 3, 250}, {}, 8, 2, 128, 32, 4, bf16),
                        make_case({500}, {}, 4, 1, 64, 64, 100, f16)})
    expect_deterministic_reproducible(c);
}

// One row tile per chunk (a one-byte chunk budget): still the same gradients
// within rounding (the dK/dV summation is regrouped by chunk), dq bitwise.
// A 100000-byte budget gives the dq passes one row tile per chunk (1024
// entries x 280 bytes) but the dK/dV pass 3-4 (28 or 24 bytes per entry),
// so the backward routes twice, in two chunkings.
void expect_many_chunks_match_one_chunk(const Case& c) {
  SCOPED_TRACE(describe(c));
  const Workload w = make_workload(c);
  BackwardRun run(w);
  run.forward();
  const Grads one = run.backward(true);
  for (const char* budget : {"1", "100000"}) {
    SCOPED_TRACE(std::string("MOBA_CUDA_PARTIAL_BYTES=") + budget);
    setenv("MOBA_CUDA_PARTIAL_BYTES", budget, 1);
    const Grads many = run.backward(true), many_fast = fast_backward(run, false),
                many_fused = fast_backward(run, true);
    unsetenv("MOBA_CUDA_PARTIAL_BYTES");
    EXPECT_TRUE(bitwise_equal(one.dq, many.dq));
    EXPECT_TRUE(bitwise_equal(one.dq, many_fast.dq));
    EXPECT_LE(scaled_error(many_fused.dq, one.dq, c.heads_q, c.head_dim, {}, "dq"), 1e-2);
    for (const Grads* g : {&many, &many_fast, &many_fused}) {
      EXPECT_LE(scaled_error(g->dk, one.dk, c.heads_kv, c.head_dim, {}, "dk"), 1e-2);
      EXPECT_LE(scaled_error(g->dv, one.dv, c.heads_kv, c.head_dim, {}, "dv"), 1e-2);
    }
  }
}

TEST(CudaBackward, ManyChunksMatchOneChunk) {
  SKIP_WITHOUT_GPU();
  expect_many_chunks_match_one_chunk(make_case({700, 130}, {}, 4, 2, 64, 32, 3, bf16));
}

TEST(CudaBackward, KeysNoQueryAttendsGetZero) {
  SKIP_WITHOUT_GPU();
  // The second sequence has 40 keys and no queries: its keys get exactly zero.
  const Case c = make_case({50, 0}, {50, 40}, 2, 1, 64, 16, 2, bf16);
  const Workload w = make_workload(c);
  BackwardRun run(w);
  run.forward();
  for (bool det : {true, false}) {
    const Grads g = run.backward(det);
    for (int64_t i = 50 * 64; i < g.dk.numel(); ++i) {
      ASSERT_EQ(g.dk.get(i), 0.0f) << i;
      ASSERT_EQ(g.dv.get(i), 0.0f) << i;
    }
  }
}

TEST(CudaBackward, InvalidDeviceCuSeqlensGiveNaN) {
  SKIP_WITHOUT_GPU();
  Case c = make_case({100, 60}, {}, 2, 1, 64, 32, 2, bf16);
  Workload w = make_workload(c);
  static_cast<int32_t*>(w.cu_q.data())[1] = 170;  // beyond total_q = 160, then decreasing
  const BackwardRun run(w);
  const Grads g = run.backward(true);
  for (const Tensor* t : {&g.dq, &g.dk, &g.dv})
    for (int64_t i = 0; i < t->numel(); ++i) ASSERT_TRUE(std::isnan(t->get(i))) << i;
}

TEST(CudaBackward, RejectsWhatItDoesNotSupport) {
  SKIP_WITHOUT_GPU();
  for (const auto& [c, needle] :
       {std::pair{make_case({64}, {}, 2, 1, 64, 16, 2, DType::float32), "float32"},
        std::pair{make_case({64}, {}, 2, 1, 96, 16, 2, bf16), "head dim"}}) {
    const Workload w = make_workload(c);
    const BackwardRun run(w);
    Status status = Status::ok;
    std::string msg;
    try {
      (void)run.backward(true);
    } catch (const Error& e) {
      status = e.status();
      msg = e.what();
    }
    EXPECT_EQ(status, Status::unsupported) << msg;
    EXPECT_NE(msg.find(needle), std::string::npos) << msg;
  }
}

}  // namespace
}  // namespace moba::testing

// ---------------------------------------------------------------------------
// The Hopper (sm_90a) dK/dV and dq kernels, backward_sm90.cu and
// backward_dq_sm90.cu. On an H100 the tests above run them where they are the
// default (dense, blocks >= 1024; MOBA_CUDA_SM90_BWD=0 runs them on the
// mma.sync kernels, MOBA_CUDA_SM90_BWD_DQ=0 only dq). These pin the kernels
// in turn on the same inputs, so a failure names the kernel, run the
// reference sweep with the Hopper kernels pinned, and print the largest
// differences for a first look:
// test_cuda_backward --gtest_filter='CudaBackwardSm90.*'
#include <cstdio>

namespace moba::testing {
namespace {

// Pins the kernels while alive: the dK/dV kernel, and where it is the Hopper
// one, the dq kernel and whether the fast mode fuses dq into it (then the
// dq kernel does not run in that mode); afterwards MOBA_CUDA_SM90_BWD,
// MOBA_CUDA_SM90_BWD_DQ and MOBA_CUDA_SM90_BWD_FUSED_DQ decide.
class PinBackwardKernels {
 public:
  PinBackwardKernels(bool sm90_dkv, bool sm90_dq, bool fused_dq) : fused_(fused_dq) {
    cuda_detail::set_sm90_backward_override(sm90_dkv ? 1 : 0);
    cuda_detail::set_sm90_backward_dq_override(sm90_dq ? 1 : 0);
  }
  ~PinBackwardKernels() {
    cuda_detail::set_sm90_backward_override(-1);
    cuda_detail::set_sm90_backward_dq_override(-1);
  }
  PinBackwardKernels(const PinBackwardKernels&) = delete;
  PinBackwardKernels& operator=(const PinBackwardKernels&) = delete;

 private:
  PinFusedDq fused_;
};

// Every backward on Hopper kernels only, the fast mode with fused dq.
struct PinHopper : PinBackwardKernels {
  PinHopper() : PinBackwardKernels(true, true, true) {}
};

#define SKIP_WITHOUT_SM90_BWD()           \
  SKIP_WITHOUT_GPU();                     \
  if (!cuda_detail::bwd_sm90_supported()) \
  GTEST_SKIP() << "no compute capability 9.x device or no sm_90a code in this build"

// Whether the Hopper dq kernel would run (its sm_90a body is loaded): where
// the dK/dV kernel's is, it must be (same build), else the tests below
// would compare the mma.sync dq kernel with itself.
bool sm90_dq_kernel_runs() {
  const PinHopper pin;
  return cuda_detail::bwd_sm90_dq_enabled();
}

// Shapes for the 128-key tiles: blocks smaller than a tile and partial
// tiles (blocks of 3, 16, 48, 100, 200: one consumer warpgroup idle or
// partly masked), a tile per block with buckets of several 64-row steps
// (block 128, 1500 rows), blocks of 1024 and 4096 with a chunked prefill,
// top-k 1, the dense switch with chunked prefill and over many tiles, varlen
// with empty and 1-token sequences, GQA 1/4/8/16, D 64/128, bf16/fp16.
const NamedCase kSm90Cases[] = {
    {"varlen_empty_tiny_bf16_d128_gqa4",
     make_case({300, 0, 1, 517, 64}, {}, 8, 2, 128, 64, 3, bf16)},
    {"block_3_wide_top_k_fp16_d128", make_case({200}, {}, 2, 1, 128, 3, 20, f16)},
    {"block_16_gqa4_fp16_d64", make_case({257, 40}, {}, 8, 2, 64, 16, 4, f16)},
    {"block_48_fp16_d128", make_case({200, 77}, {}, 2, 2, 128, 48, 3, f16)},
    {"block_100_gqa4_bf16_d64", make_case({450}, {}, 4, 1, 64, 100, 3, bf16)},
    {"block_200_gqa16_fp16_d64", make_case({900, 65}, {}, 16, 1, 64, 200, 3, f16)},
    {"block_128_many_rows_bf16_d128", make_case({1500}, {}, 8, 2, 128, 128, 3, bf16)},
    {"block_1024_gqa1_fp16_d64", make_case({3000, 1}, {}, 4, 4, 64, 1024, 2, f16)},
    {"block_4096_chunked_gqa8_bf16_d128",
     make_case({200, 8}, {9000, 4100}, 8, 1, 128, 4096, 2, bf16)},
    {"block_4096_chunked_fp16_d64", make_case({300}, {8500}, 4, 2, 64, 4096, 2, f16)},
    {"top_k_1_fp16_d64", make_case({333, 2}, {}, 2, 1, 64, 64, 1, f16)},
    {"dense_chunked_prefill_bf16_d64", make_case({40, 7}, {300, 7}, 2, 1, 64, 32, 50, bf16)},
    {"dense_long_chunked_fp16_d128", make_case({700, 130}, {700, 400}, 4, 2, 128, 128, 8, f16)},
};

// The kernels on one workload (same routing): mma.sync only, the Hopper
// dK/dV kernel with the mma.sync dq kernel, Hopper only, and (fast mode)
// Hopper with dq fused into the dK/dV kernel.
//   dK/dV: Hopper within the tolerance of mma.sync;
//   dq with only dK/dV switched: bitwise equal (dq does not depend on the
//   dK/dV kernel);
//   dq on the Hopper kernel: within the tolerance of mma.sync (the products
//   sum in another order, so P and dS may round differently);
//   fused: dq, dK and dV within the tolerance of mma.sync;
//   deterministic: dK/dV bitwise equal whichever dq kernel ran.
void expect_kernels_agree(const char* name, const Case& c, bool deterministic) {
  SCOPED_TRACE(std::string(name) + ": " + describe(c) +
               (deterministic ? " deterministic" : " fast"));
  const Workload w = make_workload(c);
  BackwardRun run(w);
  run.forward();
  const auto with_kernels = [&](bool sm90_dkv, bool sm90_dq, bool fused_dq) {
    const PinBackwardKernels pin(sm90_dkv, sm90_dq, fused_dq);
    return run.backward(deterministic);
  };
  const Grads mma = with_kernels(false, false, false), dkv = with_kernels(true, false, false),
              sm90 = with_kernels(true, true, false);
  const double ek = scaled_error(dkv.dk, mma.dk, c.heads_kv, c.head_dim, {}, "dk");
  const double ev = scaled_error(dkv.dv, mma.dv, c.heads_kv, c.head_dim, {}, "dv");
  const double eq = scaled_error(sm90.dq, mma.dq, c.heads_q, c.head_dim, {}, "dq");
  std::printf("[ sm90 vs mma.sync ] %-36s %s dk %.3e dv %.3e dq %.3e\n", name,
              deterministic ? "det " : "fast", ek, ev, eq);
  const double tol = gradient_tolerance(c.dtype);
  EXPECT_LE(ek, tol);
  EXPECT_LE(ev, tol);
  EXPECT_LE(eq, tol);
  EXPECT_TRUE(bitwise_equal(dkv.dq, mma.dq));
  if (deterministic) {
    EXPECT_TRUE(bitwise_equal(sm90.dk, dkv.dk));
    EXPECT_TRUE(bitwise_equal(sm90.dv, dkv.dv));
  } else {
    const Grads fused = with_kernels(true, true, true);
    const double fq = scaled_error(fused.dq, mma.dq, c.heads_q, c.head_dim, {}, "dq");
    const double fk = scaled_error(fused.dk, mma.dk, c.heads_kv, c.head_dim, {}, "dk");
    const double fv = scaled_error(fused.dv, mma.dv, c.heads_kv, c.head_dim, {}, "dv");
    std::printf("[ fused vs mma.sync] %-36s fast dk %.3e dv %.3e dq %.3e\n", name, fk, fv, fq);
    EXPECT_LE(fq, tol);
    EXPECT_LE(fk, tol);
    EXPECT_LE(fv, tol);
  }
}

TEST(CudaBackwardSm90, AgreesWithMmaSyncKernels) {
  SKIP_WITHOUT_SM90_BWD();
  ASSERT_TRUE(sm90_dq_kernel_runs());
  for (const NamedCase& nc : kSm90Cases)
    for (bool deterministic : {true, false}) expect_kernels_agree(nc.name, nc.c, deterministic);
}

// The whole named sweep and the random cases against the reference with the
// Hopper kernels pinned: the checks of CudaBackwardSweep and
// RandomCasesMatchReference, whatever MOBA_CUDA_SM90_BWD says.
TEST(CudaBackwardSm90, SweepMatchesReference) {
  SKIP_WITHOUT_SM90_BWD();
  const PinHopper pin;
  for (const NamedCase& nc : kSweep) {
    SCOPED_TRACE(nc.name);
    for (bool deterministic : {true, false}) expect_gradients_match(nc.c, deterministic);
  }
  std::mt19937_64 rng(77);
  for (DType dtype : {bf16, f16})
    for (int i = 0; i < 6; ++i)
      expect_gradients_match(random_case(rng, dtype, {64, 128}, 200), i % 2 == 0);
}

TEST(CudaBackwardSm90, DeterministicModeIsBitwiseReproducible) {
  SKIP_WITHOUT_SM90_BWD();
  const PinHopper pin;
  for (const Case& c : {make_case({600, 3, 250}, {}, 8, 2, 128, 32, 4, bf16),
                        make_case({500}, {}, 4, 1, 64, 64, 100, f16),
                        make_case({200, 8}, {9000, 4100}, 8, 2, 128, 4096, 2, bf16)})
    expect_deterministic_reproducible(c);
}

// dq on the Hopper kernel over the Hopper shapes: bitwise reproducible, and
// the fast mode's bitwise equal to the deterministic mode's (each dq is a
// fixed-order sum; the order of the entry lists does not enter it). The
// fused dq is not run here (its atomics sum in any order).
TEST(CudaBackwardSm90, DqIsBitwiseReproducible) {
  SKIP_WITHOUT_SM90_BWD();
  ASSERT_TRUE(sm90_dq_kernel_runs());
  const PinBackwardKernels pin(true, true, false);
  for (const NamedCase& nc : kSm90Cases) {
    SCOPED_TRACE(std::string(nc.name) + ": " + describe(nc.c));
    const Workload w = make_workload(nc.c);
    BackwardRun run(w);
    run.forward();
    const Grads a = run.backward(false), b = run.backward(false), det = run.backward(true);
    EXPECT_TRUE(bitwise_equal(a.dq, b.dq));
    EXPECT_TRUE(bitwise_equal(a.dq, det.dq));
  }
}

TEST(CudaBackwardSm90, ManyChunksMatchOneChunk) {
  SKIP_WITHOUT_SM90_BWD();
  const PinHopper pin;
  expect_many_chunks_match_one_chunk(make_case({700, 130}, {}, 4, 2, 64, 32, 3, bf16));
}

}  // namespace
}  // namespace moba::testing
