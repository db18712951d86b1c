// Every bad argument of forward, backward and routing must be refused with
// moba::Error, the right Status and a message that starts with "moba: " and
// names the argument, before any backend runs.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "dispatch/scene.hpp"

namespace moba::testing {
namespace {

// The untouched scene is valid for every operation, so each bad input below
// fails because of its one breakage.
TEST(DispatchScene, IsValidForEveryOperation) {
  for (Op op : kAllOps) {
    Scene s;
    EXPECT_NO_THROW(s.run(op)) << op_name(op);
  }
}

class BadInputs : public ::testing::TestWithParam<BadCall> {};

TEST_P(BadInputs, AreRefusedWithAClearError) {
  const BadCall& call = GetParam();
  Scene s;
  call.input.mutate(s);
  EXPECT_TRUE(throws_error([&] { s.run(call.op); }, call.input.status, call.input.arguments,
                           call.input.mentions));
}

INSTANTIATE_TEST_SUITE_P(Table, BadInputs, ::testing::ValuesIn(bad_calls()), bad_call_name);

// A refused call must not write its outputs: validation runs before any backend.
TEST(DispatchErrors, RefusedCallLeavesOutputsUntouched) {
  Scene s;
  const std::vector<unsigned char> before(
      static_cast<unsigned char*>(s.out.data),
      static_cast<unsigned char*>(s.out.data) + 4 * s.out.numel());
  std::memset(s.out.data, 0x5a, before.size());
  s.cfg.top_k = 0;
  EXPECT_THROW(s.run(Op::forward), Error);
  const auto* bytes = static_cast<const unsigned char*>(s.out.data);
  for (size_t i = 0; i < before.size(); ++i) ASSERT_EQ(bytes[i], 0x5a) << "byte " << i;
}

// A failed call leaves no state behind: the next valid call gives what a fresh one does.
TEST(DispatchErrors, ValidCallAfterFailedCallSucceeds) {
  Scene fresh, s;
  fresh.run(Op::forward);
  s.cfg.block_size = -1;
  EXPECT_THROW(s.run(Op::forward), Error);
  s.cfg.block_size = Scene::kBlockSize;
  ASSERT_NO_THROW(s.run(Op::forward));
  EXPECT_EQ(std::memcmp(s.out.data, fresh.out.data, 4 * s.out.numel()), 0);
  EXPECT_EQ(std::memcmp(s.lse.data, fresh.lse.data, 4 * s.lse.numel()), 0);
}

TEST(DispatchErrors, ErrorIsARuntimeErrorWithStatus) {
  Scene s;
  s.cfg.top_k = 0;
  try {
    s.run(Op::routing);
    FAIL() << "accepted top_k 0";
  } catch (const std::runtime_error& e) {  // catchable as a standard exception
    const auto* moba_error = dynamic_cast<const Error*>(&e);
    ASSERT_NE(moba_error, nullptr);
    EXPECT_EQ(moba_error->status(), Status::invalid_argument);
  }
}

TEST(RoutingWidth, IsMinOfTopKAndBlocksOfLongestSequence) {
  Config cfg;
  cfg.block_size = 4;
  for (int64_t top_k : {1, 2, 3, 100}) {
    cfg.top_k = top_k;
    for (int64_t len : {0, 1, 4, 5, 16, 17}) {
      const int64_t blocks = (len + 3) / 4;
      EXPECT_EQ(routing_width(len, cfg), std::min(top_k, blocks))
          << "len " << len << " top_k " << top_k;
    }
  }
}

// Block and top-k values that fit int64 must not overflow the width arithmetic:
// one block of any size covers a 5-token sequence.
TEST(RoutingWidth, HugeBlockSizeIsOneBlock) {
  Config cfg;
  cfg.top_k = 4;
  for (int64_t b : {int64_t{1} << 40, std::numeric_limits<int64_t>::max() / 2,
                    std::numeric_limits<int64_t>::max()}) {
    cfg.block_size = b;
    EXPECT_EQ(routing_width(5, cfg), 1) << "block_size " << b;
  }
  cfg.block_size = 2;
  cfg.top_k = std::numeric_limits<int64_t>::max();
  EXPECT_EQ(routing_width(5, cfg), 3);
}

TEST(RoutingWidth, RefusesBadArguments) {
  Config cfg;
  cfg.block_size = 4;
  cfg.top_k = 2;
  EXPECT_TRUE(
      throws_error([&] { routing_width(-1, cfg); }, Status::invalid_argument, {"max_seqlen_k"}));
  cfg.block_size = 0;
  EXPECT_TRUE(throws_error([&] { routing_width(8, cfg); }, Status::invalid_argument, {"block_size"},
                           {">= 1"}));
  cfg.block_size = 4;
  cfg.top_k = -3;
  EXPECT_TRUE(
      throws_error([&] { routing_width(8, cfg); }, Status::invalid_argument, {"top_k"}, {">= 1"}));
}

TEST(Names, BackendsRoundTripAndUnknownNamesAreRefused) {
  for (Backend b : {Backend::automatic, Backend::reference, Backend::cpu, Backend::cuda})
    EXPECT_EQ(parse_backend(backend_name(b)), b);
  EXPECT_TRUE(
      throws_error([] { parse_backend("gpu"); }, Status::invalid_argument, {"backend"}, {"gpu"}));
  EXPECT_TRUE(throws_error([] { parse_backend(""); }, Status::invalid_argument, {"backend"}));
}

TEST(Names, DtypesHaveNamesAndSizes) {
  EXPECT_STREQ(dtype_name(DType::float32), "float32");
  EXPECT_STREQ(dtype_name(DType::float16), "float16");
  EXPECT_STREQ(dtype_name(DType::bfloat16), "bfloat16");
  EXPECT_STREQ(dtype_name(DType::int32), "int32");
  EXPECT_EQ(dtype_size(DType::float32), 4);
  EXPECT_EQ(dtype_size(DType::float16), 2);
  EXPECT_EQ(dtype_size(DType::bfloat16), 2);
  EXPECT_EQ(dtype_size(DType::int32), 4);
}

TEST(Names, HostBackendsAreAvailable) {
  EXPECT_TRUE(backend_available(Backend::automatic));
  EXPECT_TRUE(backend_available(Backend::reference));
  EXPECT_TRUE(backend_available(Backend::cpu));
#ifndef MOBA_WITH_CUDA
  EXPECT_FALSE(backend_available(Backend::cuda));
#endif
}

TEST(Names, TensorViewContiguousRefusesTooManyDimensions) {
  EXPECT_TRUE(throws_error(
      [] {
        TensorView::contiguous(nullptr, DType::float32, {1, 2, 3, 4, 5});
      },
      Status::invalid_argument, {"TensorView::contiguous"}, {"4"}));
}

}  // namespace
}  // namespace moba::testing
