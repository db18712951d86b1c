// The C API reports every bad input as a status code plus a message from
// moba_last_error(), never by crashing: the bad-input table of the C++ API
// tests (tests/dispatch/scene.cpp) run through the C functions, and the
// failures only C can produce (NULL struct pointers, enum values outside the
// enums, the C meaning of softmax_scale).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "c_api/c_views.hpp"
#include "c_api/raw_enums.h"
#include "dispatch/scene.hpp"
#include "moba/moba.h"

namespace moba::testing {
namespace {

static_assert(static_cast<int>(Status::ok) == MOBA_OK);
static_assert(static_cast<int>(Status::invalid_argument) == MOBA_ERROR_INVALID_ARGUMENT);
static_assert(static_cast<int>(Status::unsupported) == MOBA_ERROR_UNSUPPORTED);
static_assert(static_cast<int>(Status::backend_unavailable) == MOBA_ERROR_BACKEND_UNAVAILABLE);
static_assert(static_cast<int>(Status::out_of_memory) == MOBA_ERROR_OUT_OF_MEMORY);
static_assert(static_cast<int>(Status::internal) == MOBA_ERROR_INTERNAL);

// A scene's call in C structs, to be broken further in ways only C allows.
struct CCall {
  explicit CCall(const Scene& s)
      : in(to_c(s.in)),
        cfg(to_c(s.cfg)),
        opt(to_c(s.opt)),
        out(to_c(s.out)),
        lse(to_c(s.lse)),
        dout(to_c(s.dout)),
        dq(to_c(s.dq)),
        dk(to_c(s.dk)),
        dv(to_c(s.dv)),
        selected(to_c(s.selected)) {}

  moba_status run(Op op) const {
    switch (op) {
      case Op::forward:
        return moba_forward(&in, &cfg, &out, &lse, &opt);
      case Op::backward:
        return moba_backward(&in, &cfg, &out, &dout, &lse, &dq, &dk, &dv, &opt);
      case Op::routing:
        return moba_routing(&in, &cfg, &selected, &opt);
    }
    return MOBA_ERROR_INTERNAL;
  }

  moba_inputs in;
  moba_config cfg;
  moba_options opt;
  moba_tensor out, lse, dout, dq, dk, dv, selected;
};

// `got` is `want`, and moba_last_error() is a clear message about `arguments`.
::testing::AssertionResult fails_with(moba_status got, moba_status want,
                                      const std::vector<std::string>& arguments,
                                      const std::vector<std::string>& mentions = {}) {
  if (got != want)
    return ::testing::AssertionFailure()
           << "status " << got << " (" << moba_status_string(got) << ") instead of " << want << " ("
           << moba_status_string(want) << "); last error: '" << moba_last_error() << "'";
  return is_clear_error(moba_last_error(), arguments, mentions);
}

std::vector<BadCall> c_bad_calls() {
  std::vector<BadCall> calls;
  for (BadCall& c : bad_calls())
    if (c.input.in_c_api) calls.push_back(std::move(c));
  return calls;
}

class CBadInputs : public ::testing::TestWithParam<BadCall> {};

TEST_P(CBadInputs, ReturnTheStatusAndMessageOfTheCxxApi) {
  const BadCall& call = GetParam();
  Scene s;
  call.input.mutate(s);
  const CCall c(s);
  EXPECT_TRUE(fails_with(c.run(call.op), static_cast<moba_status>(call.input.status),
                         call.input.arguments, call.input.mentions));
}

INSTANTIATE_TEST_SUITE_P(Table, CBadInputs, ::testing::ValuesIn(c_bad_calls()), bad_call_name);

TEST(CApiErrors, UntouchedSceneIsValidForEveryOperation) {
  for (Op op : kAllOps) {
    Scene s;
    EXPECT_EQ(CCall(s).run(op), MOBA_OK) << op_name(op) << ": " << moba_last_error();
  }
}

// NULL where a struct is required is an error naming the parameter; NULL lse
// (forward) and NULL options are documented as "absent" / "defaults".
TEST(CApiErrors, NullStructPointersAreInvalidArguments) {
  Scene s;
  const CCall c(s);
  const moba_status inv = MOBA_ERROR_INVALID_ARGUMENT;
  EXPECT_TRUE(
      fails_with(moba_forward(nullptr, &c.cfg, &c.out, &c.lse, &c.opt), inv, {"inputs"}, {"null"}));
  EXPECT_TRUE(
      fails_with(moba_forward(&c.in, nullptr, &c.out, &c.lse, &c.opt), inv, {"config"}, {"null"}));
  EXPECT_TRUE(
      fails_with(moba_forward(&c.in, &c.cfg, nullptr, &c.lse, &c.opt), inv, {"out"}, {"null"}));

  const moba_tensor* const args[] = {&c.out, &c.dout, &c.lse, &c.dq, &c.dk, &c.dv};
  const char* const names[] = {"out", "dout", "lse", "dq", "dk", "dv"};
  for (int skip = 0; skip < 6; ++skip) {
    const moba_tensor* a[6];
    for (int i = 0; i < 6; ++i) a[i] = i == skip ? nullptr : args[i];
    EXPECT_TRUE(fails_with(moba_backward(&c.in, &c.cfg, a[0], a[1], a[2], a[3], a[4], a[5], &c.opt),
                           inv, {names[skip]}, {"null"}));
  }
  EXPECT_TRUE(fails_with(
      moba_backward(nullptr, &c.cfg, &c.out, &c.dout, &c.lse, &c.dq, &c.dk, &c.dv, &c.opt), inv,
      {"inputs"}));
  EXPECT_TRUE(fails_with(
      moba_backward(&c.in, nullptr, &c.out, &c.dout, &c.lse, &c.dq, &c.dk, &c.dv, &c.opt), inv,
      {"config"}));

  EXPECT_TRUE(fails_with(moba_routing(nullptr, &c.cfg, &c.selected, &c.opt), inv, {"inputs"}));
  EXPECT_TRUE(fails_with(moba_routing(&c.in, nullptr, &c.selected, &c.opt), inv, {"config"}));
  EXPECT_TRUE(fails_with(moba_routing(&c.in, &c.cfg, nullptr, &c.opt), inv, {"selected"}));

  int64_t width = -1;
  EXPECT_TRUE(fails_with(moba_routing_width(5, nullptr, &width), inv, {"config"}));
  EXPECT_TRUE(fails_with(moba_routing_width(5, &c.cfg, nullptr), inv, {"width"}));
  EXPECT_EQ(width, -1);

  EXPECT_EQ(moba_forward(&c.in, &c.cfg, &c.out, nullptr, &c.opt), MOBA_OK) << moba_last_error();
  EXPECT_EQ(moba_forward(&c.in, &c.cfg, &c.out, &c.lse, nullptr), MOBA_OK) << moba_last_error();
  EXPECT_EQ(moba_backward(&c.in, &c.cfg, &c.out, &c.dout, &c.lse, &c.dq, &c.dk, &c.dv, nullptr),
            MOBA_OK)
      << moba_last_error();
  EXPECT_EQ(moba_routing(&c.in, &c.cfg, &c.selected, nullptr), MOBA_OK) << moba_last_error();
}

// Integers that name no enumerator, as a caller from another language can pass them.
TEST(CApiErrors, UnknownDtypeIsInvalidArgumentNamingTheTensor) {
  for (int value : {7, 4, -1}) {
    SCOPED_TRACE(value);
    Scene s;
    for (Op op : kAllOps) {
      CCall c(s);
      moba_test_set_dtype(&c.in.q, value);
      EXPECT_TRUE(fails_with(c.run(op), MOBA_ERROR_INVALID_ARGUMENT, {"q"}, {"dtype"}))
          << op_name(op);
      c = CCall(s);
      moba_test_set_dtype(&c.in.cu_seqlens_k, value);
      EXPECT_TRUE(fails_with(c.run(op), MOBA_ERROR_INVALID_ARGUMENT, {"cu_seqlens_k"}, {"dtype"}))
          << op_name(op);
    }
    CCall c(s);
    moba_test_set_dtype(&c.out, value);
    EXPECT_TRUE(fails_with(c.run(Op::forward), MOBA_ERROR_INVALID_ARGUMENT, {"out"}, {"dtype"}));
    c = CCall(s);
    moba_test_set_dtype(&c.lse, value);
    EXPECT_TRUE(fails_with(c.run(Op::forward), MOBA_ERROR_INVALID_ARGUMENT, {"lse"}, {"dtype"}));
    c = CCall(s);
    moba_test_set_dtype(&c.dk, value);
    EXPECT_TRUE(fails_with(c.run(Op::backward), MOBA_ERROR_INVALID_ARGUMENT, {"dk"}, {"dtype"}));
    c = CCall(s);
    moba_test_set_dtype(&c.selected, value);
    EXPECT_TRUE(
        fails_with(c.run(Op::routing), MOBA_ERROR_INVALID_ARGUMENT, {"selected"}, {"dtype"}));
  }
}

TEST(CApiErrors, UnknownDeviceTypeIsInvalidArgument) {
  Scene s;
  for (Op op : kAllOps) {
    CCall c(s);
    moba_test_set_device_type(&c.in.v, 5);
    EXPECT_TRUE(fails_with(c.run(op), MOBA_ERROR_INVALID_ARGUMENT, {"v"}, {"device"}))
        << op_name(op);
  }
}

TEST(CApiErrors, UnknownBackendIsInvalidArgument) {
  Scene s;
  for (Op op : kAllOps) {
    for (int value : {9, 4, -1}) {
      CCall c(s);
      moba_test_set_backend(&c.opt, value);
      EXPECT_TRUE(
          fails_with(c.run(op), MOBA_ERROR_INVALID_ARGUMENT, {"backend"}, {std::to_string(value)}))
          << op_name(op);
    }
  }
  EXPECT_EQ(moba_test_backend_available(9), 0);
  EXPECT_EQ(moba_test_backend_available(-1), 0);
}

TEST(CApiErrors, NegativeNumThreadsIsInvalidArgument) {
  Scene s;
  for (Op op : kAllOps)
    for (moba_backend b : {MOBA_BACKEND_AUTO, MOBA_BACKEND_REFERENCE, MOBA_BACKEND_CPU}) {
      CCall c(s);
      c.opt.backend = b;
      c.opt.num_threads = -1;
      EXPECT_TRUE(fails_with(c.run(op), MOBA_ERROR_INVALID_ARGUMENT, {"num_threads"}, {"-1"}))
          << op_name(op);
    }
}

TEST(CApiErrors, NdimOutsideZeroToFourIsInvalidArgument) {
  Scene s;
  for (int ndim : {5, -1, 1 << 30}) {
    CCall c(s);
    c.in.k.ndim = ndim;
    EXPECT_TRUE(fails_with(c.run(Op::forward), MOBA_ERROR_INVALID_ARGUMENT, {"k"})) << ndim;
    c = CCall(s);
    c.dv.ndim = ndim;
    EXPECT_TRUE(fails_with(c.run(Op::backward), MOBA_ERROR_INVALID_ARGUMENT, {"dv"})) << ndim;
  }
  // moba_tensor_contiguous cannot describe more than 4 dimensions: it yields a
  // 0-d view, which the calls then refuse.
  const int64_t shape[5] = {8, 4, 8, 1, 1};
  CCall c(s);
  c.in.q = moba_tensor_contiguous(c.in.q.data, MOBA_FLOAT32, 5, shape);
  EXPECT_TRUE(fails_with(c.run(Op::forward), MOBA_ERROR_INVALID_ARGUMENT, {"q"}));
}

// The C config's softmax_scale: "<= 0 means 1/sqrt(D)". Any other value must be
// a finite positive scale: +inf and NaN (which is not <= 0) are errors.
TEST(CApiSoftmaxScale, InfinityIsInvalidArgument) {
  Scene s;
  for (Op op : kAllOps) {
    CCall c(s);
    c.cfg.softmax_scale = std::numeric_limits<float>::infinity();
    EXPECT_TRUE(fails_with(c.run(op), MOBA_ERROR_INVALID_ARGUMENT, {"softmax_scale"}))
        << op_name(op);
  }
}

TEST(CApiSoftmaxScale, NanIsInvalidArgument) {
  Scene s;
  for (Op op : kAllOps) {
    CCall c(s);
    c.cfg.softmax_scale = std::numeric_limits<float>::quiet_NaN();
    EXPECT_TRUE(fails_with(c.run(op), MOBA_ERROR_INVALID_ARGUMENT, {"softmax_scale"}))
        << op_name(op);
  }
}

TEST(CApiSoftmaxScale, ZeroOrNegativeMeansTheDefault) {
  Scene s;  // its forward ran with the default scale 1/sqrt(8)
  const size_t out_bytes = static_cast<size_t>(4 * s.out.numel()),
               lse_bytes = static_cast<size_t>(4 * s.lse.numel());
  const std::vector<char> out(static_cast<char*>(s.out.data),
                              static_cast<char*>(s.out.data) + out_bytes);
  const std::vector<char> lse(static_cast<char*>(s.lse.data),
                              static_cast<char*>(s.lse.data) + lse_bytes);
  for (float scale : {0.0f, -0.0f, -1.0f, -std::numeric_limits<float>::infinity()}) {
    CCall c(s);
    c.cfg.softmax_scale = scale;
    std::memset(s.out.data, 0, out_bytes);
    std::memset(s.lse.data, 0, lse_bytes);
    ASSERT_EQ(c.run(Op::forward), MOBA_OK) << scale << ": " << moba_last_error();
    EXPECT_EQ(std::memcmp(s.out.data, out.data(), out_bytes), 0) << scale;
    EXPECT_EQ(std::memcmp(s.lse.data, lse.data(), lse_bytes), 0) << scale;
  }
  // ... while a positive scale is used as given: it changes the result.
  CCall c(s);
  c.cfg.softmax_scale = 2.0f;
  ASSERT_EQ(c.run(Op::forward), MOBA_OK) << moba_last_error();
  EXPECT_NE(std::memcmp(s.lse.data, lse.data(), lse_bytes), 0);
}

TEST(CApiRoutingWidth, MatchesTheCxxApiAndRefusesBadArguments) {
  moba_config cfg{4, 3, 0.0f, 0};
  for (int64_t len : {0, 1, 4, 5, 12, 13, 1000}) {
    int64_t width = -1;
    ASSERT_EQ(moba_routing_width(len, &cfg, &width), MOBA_OK) << moba_last_error();
    Config cxx;
    cxx.block_size = 4;
    cxx.top_k = 3;
    EXPECT_EQ(width, routing_width(len, cxx)) << len;
    EXPECT_EQ(width, std::min<int64_t>(3, (len + 3) / 4)) << len;
  }
  int64_t width = -1;
  EXPECT_TRUE(fails_with(moba_routing_width(-1, &cfg, &width), MOBA_ERROR_INVALID_ARGUMENT,
                         {"max_seqlen_k"}));
  cfg.block_size = 0;
  EXPECT_TRUE(
      fails_with(moba_routing_width(5, &cfg, &width), MOBA_ERROR_INVALID_ARGUMENT, {"block_size"}));
  cfg.block_size = 4;
  cfg.top_k = 0;
  EXPECT_TRUE(
      fails_with(moba_routing_width(5, &cfg, &width), MOBA_ERROR_INVALID_ARGUMENT, {"top_k"}));
  EXPECT_EQ(width, -1) << "a failed call must not write its result";
}

// moba_last_error(): set by a failing call; cleared at the start of every call
// that returns a moba_status, so a successful call leaves ""; untouched by the
// functions that return no status; per thread.
TEST(CApiLastError, IsClearedByTheNextStatusReturningCall) {
  Scene s;
  CCall bad(s), good(s);
  bad.cfg.top_k = 0;
  ASSERT_EQ(bad.run(Op::forward), MOBA_ERROR_INVALID_ARGUMENT);
  const std::string message = moba_last_error();
  EXPECT_TRUE(is_clear_error(message, {"top_k"}));

  // Functions without a status leave the message alone.
  EXPECT_NE(moba_version(), nullptr);
  EXPECT_NE(moba_status_string(MOBA_OK), nullptr);
  EXPECT_EQ(moba_backend_available(MOBA_BACKEND_CPU), 1);
  (void)moba_default_options();
  (void)moba_tensor_contiguous(nullptr, MOBA_FLOAT32, 0, nullptr);
  EXPECT_EQ(moba_last_error(), message);

  for (Op op : kAllOps) {
    ASSERT_EQ(bad.run(op), MOBA_ERROR_INVALID_ARGUMENT);
    EXPECT_STRNE(moba_last_error(), "");
    ASSERT_EQ(good.run(op), MOBA_OK) << moba_last_error();
    EXPECT_STREQ(moba_last_error(), "") << op_name(op);
  }
  ASSERT_EQ(bad.run(Op::routing), MOBA_ERROR_INVALID_ARGUMENT);
  int64_t width = 0;
  ASSERT_EQ(moba_routing_width(4, &good.cfg, &width), MOBA_OK);
  EXPECT_STREQ(moba_last_error(), "");

  // A second failure replaces the first message.
  ASSERT_EQ(bad.run(Op::forward), MOBA_ERROR_INVALID_ARGUMENT);
  bad.cfg.top_k = Scene::kTopK;
  bad.cfg.block_size = -3;
  ASSERT_EQ(bad.run(Op::forward), MOBA_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(is_clear_error(moba_last_error(), {"block_size"}, {"-3"}));
  EXPECT_EQ(std::string(moba_last_error()).find("top_k"), std::string::npos);
}

TEST(CApiLastError, ValidCallAfterFailedCallWritesWhatAFreshCallDoes) {
  Scene fresh, s;
  CCall bad(s), good(s);
  bad.cfg.block_size = 0;
  std::memset(s.out.data, 0, static_cast<size_t>(4 * s.out.numel()));
  ASSERT_EQ(bad.run(Op::forward), MOBA_ERROR_INVALID_ARGUMENT);
  ASSERT_EQ(good.run(Op::forward), MOBA_OK);
  EXPECT_EQ(std::memcmp(s.out.data, fresh.out.data, static_cast<size_t>(4 * s.out.numel())), 0);
}

TEST(CApiLastError, IsPerThread) {
  Scene s;
  CCall bad(s);
  bad.cfg.top_k = 0;
  ASSERT_EQ(bad.run(Op::forward), MOBA_ERROR_INVALID_ARGUMENT);
  const std::string mine = moba_last_error();

  std::string other_before, other_after;
  std::thread other([&] {
    other_before = moba_last_error();  // a new thread has no error yet
    CCall other_bad(s);
    other_bad.cfg.block_size = 0;
    (void)other_bad.run(Op::routing);
    other_after = moba_last_error();
  });
  other.join();
  EXPECT_EQ(other_before, "");
  EXPECT_TRUE(is_clear_error(other_after, {"block_size"}));
  EXPECT_EQ(moba_last_error(), mine);
}

TEST(CApiStatus, EveryCodeHasItsOwnDescription) {
  const moba_status codes[] = {MOBA_OK,
                               MOBA_ERROR_INVALID_ARGUMENT,
                               MOBA_ERROR_UNSUPPORTED,
                               MOBA_ERROR_BACKEND_UNAVAILABLE,
                               MOBA_ERROR_OUT_OF_MEMORY,
                               MOBA_ERROR_INTERNAL};
  std::vector<std::string> seen;
  for (moba_status code : codes) {
    const char* text = moba_status_string(code);
    ASSERT_NE(text, nullptr);
    EXPECT_GT(std::strlen(text), 0u) << code;
    for (const std::string& other : seen) EXPECT_NE(other, text) << code;
    seen.emplace_back(text);
  }
  EXPECT_STREQ(moba_status_string(MOBA_OK), "ok");
  EXPECT_STREQ(moba_status_string(MOBA_ERROR_INVALID_ARGUMENT), "invalid argument");
  EXPECT_STREQ(moba_status_string(MOBA_ERROR_UNSUPPORTED), "unsupported");
  EXPECT_STREQ(moba_status_string(MOBA_ERROR_BACKEND_UNAVAILABLE), "backend unavailable");
  EXPECT_STREQ(moba_status_string(MOBA_ERROR_OUT_OF_MEMORY), "out of memory");
  EXPECT_STREQ(moba_status_string(MOBA_ERROR_INTERNAL), "internal error");
  for (int unknown : {6, 42, -1}) {
    const char* text = moba_test_status_string(unknown);
    ASSERT_NE(text, nullptr);
    EXPECT_GT(std::strlen(text), 0u);
    for (const std::string& known : seen) EXPECT_NE(known, text) << unknown;
  }
}

TEST(CApiVersion, IsSemanticVersionOfTheLibrary) {
  const char* v = moba_version();
  ASSERT_NE(v, nullptr);
  EXPECT_TRUE(std::regex_match(v, std::regex(R"([0-9]+\.[0-9]+\.[0-9]+)"))) << v;
  EXPECT_STREQ(v, version());
}

TEST(CApiBackends, AvailabilityMatchesTheCxxApi) {
  EXPECT_EQ(moba_backend_available(MOBA_BACKEND_AUTO), 1);
  EXPECT_EQ(moba_backend_available(MOBA_BACKEND_REFERENCE), 1);
  EXPECT_EQ(moba_backend_available(MOBA_BACKEND_CPU), 1);
  EXPECT_EQ(moba_backend_available(MOBA_BACKEND_CUDA), backend_available(Backend::cuda) ? 1 : 0);
}

}  // namespace
}  // namespace moba::testing
