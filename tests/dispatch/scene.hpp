// A small valid call of the public API (inputs, config, every output) that
// the bad-input tests break one argument at a time, and the table of those
// breakages. Shared by the C++ API tests here and the C API tests in
// tests/c_api, so both APIs are held to the same list of bad inputs.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

#include <gtest/gtest.h>

#include "moba/moba.hpp"

namespace moba::testing {

enum class Op { forward, backward, routing };
inline constexpr std::array<Op, 3> kAllOps{Op::forward, Op::backward, Op::routing};
const char* op_name(Op op);

/// A valid float32 problem on the host: sequences of 3, 0 and 5 tokens
/// (cu_seqlens [0, 3, 3, 8] for q and k), Hq 4, Hkv 2, D 8, block 2, top-k 2,
/// backend reference, with out / lse / dout / dq / dk / dv / selected of the
/// right shapes. Every tensor sits at the start of its own, much larger
/// buffer: a broken view that validation wrongly accepted reads garbage
/// instead of crashing the test binary, and there is room for views that
/// overlap or are reshaped (head dim 264 included).
class Scene {
 public:
  static constexpr int64_t kTotal = 8, kHeadsQ = 4, kHeadsKv = 2, kHeadDim = 8;
  static constexpr int64_t kBlockSize = 2, kTopK = 2;
  static constexpr int64_t kMaxSeqlen = 5;
  static constexpr int64_t kRoutingWidth = 2;  // min(top_k, ceil(5 / 2))

  Scene();
  Scene(const Scene&) = delete;
  Scene& operator=(const Scene&) = delete;

  Inputs in;
  Config cfg;
  ExecOptions opt;
  TensorView out, lse, dout, dq, dk, dv, selected;

  /// Calls the C++ API.
  void run(Op op) const;

  /// Overwrites the int32 entries of cu_seqlens_q / cu_seqlens_k (and their lengths).
  void set_cu_seqlens(const std::vector<int32_t>& q, const std::vector<int32_t>& k);
  /// Marks every tensor as living on cuda:0 (the data stays on the host, which
  /// validation must never touch) and gives the max_seqlen bounds that device
  /// cu_seqlens require.
  void put_on_cuda();

 private:
  std::array<std::vector<double>, 12> buffers_;
};

/// Gives `view` a row-major contiguous layout of `shape`, keeping its data and dtype.
void reshape(TensorView& view, std::initializer_list<int64_t> shape);
/// The address `elements` elements (of view's dtype) past the start of `view`.
void* element_address(const TensorView& view, int64_t elements);

/// One way to break a call, and the error it must produce.
struct BadInput {
  std::string name;  // [A-Za-z0-9_]
  std::vector<Op> ops;
  std::function<void(Scene&)> mutate;
  Status status;
  std::vector<std::string> arguments;  // every one must be named in the message, as a word
  std::vector<std::string> mentions;   // substrings the message must contain (expected values)
  // Whether the C API expresses the same breakage with the same meaning (the C
  // config cannot say "no softmax_scale", and reads <= 0 as the default).
  bool in_c_api = true;
};

/// One bad input applied to one operation.
struct BadCall {
  BadInput input;
  Op op;
};

/// Prints the call's name in test failures (instead of its bytes).
void PrintTo(const BadCall& call, std::ostream* os);

/// Every bad input of the table, for every operation it applies to.
std::vector<BadCall> bad_calls();
std::string bad_call_name(const ::testing::TestParamInfo<BadCall>& info);

/// Whether `message` reads like an error of this library: it starts with
/// "moba: ", names every one of `arguments` as a whole word (so "k" is not
/// found inside "cu_seqlens_k") and contains every one of `mentions`.
::testing::AssertionResult is_clear_error(std::string_view message,
                                          const std::vector<std::string>& arguments,
                                          const std::vector<std::string>& mentions = {});

/// Runs `call` and checks it throws moba::Error with `status` and a clear
/// message about `arguments`.
::testing::AssertionResult throws_error(const std::function<void()>& call, Status status,
                                        const std::vector<std::string>& arguments,
                                        const std::vector<std::string>& mentions = {});

}  // namespace moba::testing
