// The MoBA spec (shared/MOBA_SPEC.md) recomputed inside the tests, in fp64,
// straight from the workload tensors and without library code (beyond the
// dtype conversions, which tests/core checks exhaustively), so that
// the reference backend — the oracle of every other backend — is itself
// checked against something independent. Also: thin wrappers that run the
// reference backend through the public API, and the "one output rounding"
// tolerance.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "support/testing.hpp"

namespace moba {
/// Names a dtype in GoogleTest's messages (found by argument-dependent lookup).
inline void PrintTo(DType dtype, std::ostream* os) {
  *os << dtype_name(dtype);
}
}  // namespace moba

namespace moba::testing::spec {

/// One sequence of a workload's batch.
struct Seq {
  int64_t q_begin = 0, k_begin = 0, len_q = 0, len_k = 0;
  int64_t position(int64_t i) const { return len_k - len_q + i; }
};
std::vector<Seq> sequences(const Workload& w);

/// Spec step 2: the block means of k for sequence `s` and kv head `kv_head`,
/// [blocks][D] row-major: the exact mean rounded to fp32, then to k's dtype.
std::vector<double> block_means(const Workload& w, const Seq& s, int64_t kv_head);

/// Spec step 3: the gate scores <q, kbar_j> of query `i` of `s` and query
/// head `head` for the past blocks 0 .. current-1 — summed over the heads of
/// the kv group when the workload uses gqa_shared_routing.
std::vector<double> gate_scores(const Workload& w, const Seq& s, int64_t i, int64_t head,
                                const std::vector<double>& means);

/// Spec step 4 written as a sort: the top_k - 1 best past blocks (higher
/// score, then lower index) plus the current block, ascending.
std::vector<int32_t> expected_selection(const std::vector<double>& past_scores, int64_t current,
                                        int64_t top_k);

/// Whether `row` (W entries) is an acceptable routing for a query whose
/// current block is `current`: exactly min(top_k, current + 1) ascending
/// blocks ending with `current`, then -1, and the same set as the expected
/// one except for swaps between blocks whose scores are within 1e-5 relative
/// (the spec's near-tie allowance). Counts such allowed swaps in
/// `near_ties` when given.
::testing::AssertionResult acceptable_selection(const int32_t* row, int64_t width,
                                                const std::vector<double>& past_scores,
                                                int64_t current, int64_t top_k,
                                                int64_t* near_ties = nullptr);

/// Spec step 5 for a given routing `selected` [total_q, Hq, W]: out
/// [total_q, Hq, D] and lse [Hq, total_q] in fp64.
void attention(const Workload& w, const Tensor& selected, std::vector<double>& out,
               std::vector<double>& lse);

/// Gradients of spec step 5 for a given routing, in fp64: dq like q, dk and
/// dv like k.
struct Gradients {
  std::vector<double> dq, dk, dv;
};
Gradients attention_backward(const Workload& w, const Tensor& selected, const Tensor& dout);

/// Which key rows of each kv head at least one query attends to under
/// `selected`: [total_k * Hkv], indexed row * Hkv + kv_head.
std::vector<bool> attended_keys(const Workload& w, const Tensor& selected);

// ---- Running the reference backend through the public API -----------------

ExecOptions reference_options();
/// routing() with width routing_width + `extra_width`, prefilled with 12345.
Tensor run_routing(const Workload& w, int64_t extra_width = 0);
/// forward() into poisoned out and lse.
void run_forward(const Workload& w, Tensor& out, Tensor& lse);
struct Grads {
  Tensor dq, dk, dv;
};
/// forward() then backward() with the given dout (poisoned gradients).
Grads run_backward(const Workload& w, const Tensor& dout);

/// Copies `rows` leading-dimension rows of `src` (from `src_row`) into `dst`
/// (at `dst_row`); both have the same dtype and row size.
void copy_rows(Tensor& dst, int64_t dst_row, const Tensor& src, int64_t src_row, int64_t rows);

/// A single-sequence workload holding sequence `b` of `w` (same values).
Workload slice(const Workload& w, size_t b);

// ---- Tolerances -----------------------------------------------------------

/// Spacing of `dtype` values around |x| (its ulp there).
double ulp(DType dtype, double x);
/// The error allowed for a value computed in fp64 and rounded once to
/// `dtype` (through fp32, as the backends store): half an ulp of each
/// rounding, plus fp64 noise relative to `scale` (the magnitude of the terms
/// that were summed).
double one_rounding(DType dtype, double expected, double scale = 1.0);

/// Checks every element of `actual` against `expected` within one_rounding;
/// reports the first few offenders.
::testing::AssertionResult within_one_rounding(const std::vector<double>& actual,
                                               const std::vector<double>& expected, DType dtype,
                                               double scale = 1.0);

/// Fills a tensor with values drawn by `draw`.
template <class Draw>
void fill(Tensor& t, Draw&& draw) {
  for (int64_t i = 0; i < t.numel(); ++i) t.set(i, static_cast<float>(draw()));
}

/// Bitwise equality of two tensors' bytes.
bool same_bytes(const Tensor& a, const Tensor& b);

}  // namespace moba::testing::spec
