// The C API is a thin skin over the C++ API: for the same inputs, forward,
// backward and routing through C write exactly the bytes the C++ calls write,
// on every host backend.
#include <gtest/gtest.h>

#include <cstring>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "c_api/c_views.hpp"
#include "moba/moba.h"
#include "support/testing.hpp"

namespace moba {
// Names the backend in test output instead of its bytes.
static void PrintTo(Backend backend, std::ostream* os) {
  *os << backend_name(backend);
}
}  // namespace moba

namespace moba::testing {
namespace {

// Everything the three operations write for one workload.
struct Written {
  Tensor out, lse, dq, dk, dv, selected;

  explicit Written(const Workload& w, int64_t width)
      : out(w.new_out()),
        lse(w.new_lse()),
        dq(w.new_out()),
        dk(w.c.dtype, {w.total_k, w.c.heads_kv, w.c.head_dim}),
        dv(w.c.dtype, {w.total_k, w.c.heads_kv, w.c.head_dim}),
        selected(DType::int32, {w.total_q, w.c.heads_q, width}) {
    // Different garbage in the C and C++ copies would hide nothing: both are
    // poisoned alike, and an element left unwritten by one call but not the
    // other shows up as a difference.
    for (Tensor* t : {&out, &lse, &dq, &dk, &dv, &selected}) t->poison();
  }
};

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.numel() == b.numel() && a.dtype() == b.dtype() &&
         std::memcmp(a.data(), b.data(), static_cast<size_t>(a.numel() * dtype_size(a.dtype()))) ==
             0;
}

int64_t width_for(const Workload& w) {
  const auto* cu = static_cast<const int32_t*>(w.cu_k.data());
  int64_t longest = 0;
  for (int64_t b = 0; b + 1 < w.cu_k.numel(); ++b)
    longest = std::max<int64_t>(longest, cu[b + 1] - cu[b]);
  return std::max<int64_t>(1, routing_width(longest, w.config()));
}

struct GoodCase {
  std::string name;
  Case c;
};

std::vector<GoodCase> good_cases() {
  std::vector<GoodCase> cases;
  Case gqa;  // prefill, GQA 4:1, an empty and a one-token sequence
  gqa.lens_q = {19, 0, 1, 12};
  gqa.heads_q = 4;
  gqa.heads_kv = 1;
  gqa.head_dim = 16;
  gqa.block_size = 4;
  gqa.top_k = 2;
  gqa.seed = 3;
  cases.push_back({"float32_gqa_prefill", gqa});

  Case decode = gqa;  // fewer queries than keys, float16, explicit scale
  decode.lens_q = {2, 5};
  decode.lens_k = {17, 9};
  decode.heads_q = decode.heads_kv = 2;
  decode.dtype = DType::float16;
  decode.softmax_scale = 0.3f;
  decode.seed = 4;
  cases.push_back({"float16_decode_explicit_scale", decode});

  Case shared = gqa;  // bfloat16 with one selection per kv group
  shared.lens_q = {14, 7};
  shared.heads_q = 4;
  shared.heads_kv = 2;
  shared.head_dim = 8;
  shared.block_size = 3;
  shared.top_k = 3;
  shared.dtype = DType::bfloat16;
  shared.gqa_shared_routing = true;
  shared.seed = 5;
  cases.push_back({"bfloat16_shared_routing", shared});
  return cases;
}

void PrintTo(const GoodCase& good, std::ostream* os) {
  *os << good.name;
}

class CApiGoodPath : public ::testing::TestWithParam<std::tuple<Backend, GoodCase>> {};

TEST_P(CApiGoodPath, WritesTheBytesOfTheCxxApi) {
  const auto& [backend, good] = GetParam();
  const Workload w = make_workload(good.c);
  Tensor dout = w.new_out();
  std::mt19937_64 rng(good.c.seed + 100);
  dout.randn(rng);
  ExecOptions opt;
  opt.backend = backend;
  const int64_t width = width_for(w);

  Written cxx(w, width);
  forward(w.inputs(), w.config(), cxx.out.view(), cxx.lse.view(), opt);
  backward(w.inputs(), w.config(), cxx.out.view(), dout.view(), cxx.lse.view(), cxx.dq.view(),
           cxx.dk.view(), cxx.dv.view(), opt);
  routing(w.inputs(), w.config(), cxx.selected.view(), opt);

  Written c(w, width);
  const moba_inputs in = to_c(w.inputs());
  const moba_config cfg = to_c(w.config());
  const moba_options copt = to_c(opt);
  const moba_tensor out = to_c(c.out.view()), lse = to_c(c.lse.view()), dq = to_c(c.dq.view());
  const moba_tensor dk = to_c(c.dk.view()), dv = to_c(c.dv.view()), sel = to_c(c.selected.view());
  const moba_tensor cdout = to_c(dout.view());
  ASSERT_EQ(moba_forward(&in, &cfg, &out, &lse, &copt), MOBA_OK) << moba_last_error();
  ASSERT_EQ(moba_backward(&in, &cfg, &out, &cdout, &lse, &dq, &dk, &dv, &copt), MOBA_OK)
      << moba_last_error();
  ASSERT_EQ(moba_routing(&in, &cfg, &sel, &copt), MOBA_OK) << moba_last_error();
  EXPECT_STREQ(moba_last_error(), "");

  EXPECT_TRUE(same_bytes(c.out, cxx.out)) << "out";
  EXPECT_TRUE(same_bytes(c.lse, cxx.lse)) << "lse";
  EXPECT_TRUE(same_bytes(c.dq, cxx.dq)) << "dq";
  EXPECT_TRUE(same_bytes(c.dk, cxx.dk)) << "dk";
  EXPECT_TRUE(same_bytes(c.dv, cxx.dv)) << "dv";
  EXPECT_TRUE(same_bytes(c.selected, cxx.selected)) << "selected";
  // The outputs are real results, not two copies of the poison.
  bool routed = false;
  for (int64_t i = 0; i < c.selected.numel(); ++i)
    routed |= static_cast<const int32_t*>(c.selected.data())[i] == 0;
  EXPECT_TRUE(routed || w.total_q == 0);
}

std::string good_path_name(const ::testing::TestParamInfo<std::tuple<Backend, GoodCase>>& info) {
  return std::string(backend_name(std::get<0>(info.param))) + "_" + std::get<1>(info.param).name;
}

INSTANTIATE_TEST_SUITE_P(Host, CApiGoodPath,
                         ::testing::Combine(::testing::Values(Backend::reference, Backend::cpu),
                                            ::testing::ValuesIn(good_cases())),
                         good_path_name);

// NULL options are the defaults: the automatic backend, which picks cpu for host tensors.
TEST(CApiDefaults, NullOptionsMatchDefaultCxxOptions) {
  const Workload w = make_workload(good_cases()[0].c);
  Written cxx(w, width_for(w)), c(w, width_for(w));
  forward(w.inputs(), w.config(), cxx.out.view(), cxx.lse.view());
  const moba_inputs in = to_c(w.inputs());
  const moba_config cfg = to_c(w.config());
  const moba_tensor out = to_c(c.out.view()), lse = to_c(c.lse.view());
  ASSERT_EQ(moba_forward(&in, &cfg, &out, &lse, nullptr), MOBA_OK) << moba_last_error();
  EXPECT_TRUE(same_bytes(c.out, cxx.out));
  EXPECT_TRUE(same_bytes(c.lse, cxx.lse));
}

TEST(CApiDefaults, DefaultOptions) {
  const moba_options o = moba_default_options();
  EXPECT_EQ(o.backend, MOBA_BACKEND_AUTO);
  EXPECT_EQ(o.num_threads, 0);
  EXPECT_EQ(o.stream, nullptr);
  EXPECT_EQ(o.deterministic, 0);
}

TEST(CApiDefaults, TensorContiguousMatchesTheCxxView) {
  float data[1];
  const int64_t shapes[][4] = {{7, 3, 16, 0}, {5, 0, 8, 0}, {2, 3, 4, 5}};
  const int32_t ndims[] = {3, 3, 4};
  for (int i = 0; i < 3; ++i) {
    const moba_tensor t = moba_tensor_contiguous(data, MOBA_BFLOAT16, ndims[i], shapes[i]);
    TensorView v =
        TensorView::contiguous(data, DType::bfloat16, {shapes[i][0], shapes[i][1], shapes[i][2]});
    if (ndims[i] == 4) v = TensorView::contiguous(data, DType::bfloat16, {2, 3, 4, 5});
    EXPECT_EQ(t.data, data);
    EXPECT_EQ(t.dtype, MOBA_BFLOAT16);
    EXPECT_EQ(t.device_type, MOBA_DEVICE_CPU);
    EXPECT_EQ(t.device_index, 0);
    ASSERT_EQ(t.ndim, v.ndim);
    for (int d = 0; d < t.ndim; ++d) {
      EXPECT_EQ(t.shape[d], v.shape[static_cast<size_t>(d)]) << i << " dim " << d;
      EXPECT_EQ(t.strides[d], v.strides[static_cast<size_t>(d)]) << i << " dim " << d;
    }
  }
  const moba_tensor scalar = moba_tensor_contiguous(data, MOBA_INT32, 0, nullptr);
  EXPECT_EQ(scalar.ndim, 0);
}

}  // namespace
}  // namespace moba::testing
