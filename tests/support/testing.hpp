// Shared test helpers: owned host tensors, random MoBA workloads and an
// independent dense causal attention (the oracle of the "top-k >= blocks"
// tests). Tests never use these to compute what they check against a backend
// except through the reference backend or the dense oracle below.
#pragma once

#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "moba/moba.hpp"

namespace moba::testing {

/// An owned, contiguous host tensor of any dtype.
class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, std::vector<int64_t> shape);

  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t numel() const;
  void* data() { return bytes_.data(); }
  const void* data() const { return bytes_.data(); }

  float get(int64_t i) const;
  void set(int64_t i, float x);
  /// Fills with N(0, stddev) values, rounded to the dtype.
  void randn(std::mt19937_64& rng, float stddev = 1.0f);
  /// Fills with a constant bit pattern so unwritten elements are detectable.
  void poison();
  std::vector<double> to_double() const;

  TensorView view();
  TensorView view() const;

 private:
  DType dtype_ = DType::float32;
  std::vector<int64_t> shape_;
  std::vector<unsigned char> bytes_;
};

/// The shape of one test problem.
struct Case {
  std::vector<int32_t> lens_q;  // per sequence; empty lens_k means lens_k == lens_q
  std::vector<int32_t> lens_k;
  int64_t heads_q = 2, heads_kv = 1, head_dim = 64;
  int64_t block_size = 16, top_k = 2;
  DType dtype = DType::float32;
  bool gqa_shared_routing = false;
  std::optional<float> softmax_scale;
  uint64_t seed = 1;
};

std::string describe(const Case& c);

/// A drawn workload: q, k, v filled from N(0, 1), cu_seqlens from the case.
struct Workload {
  Case c;
  Tensor q, k, v, cu_q, cu_k;
  int64_t total_q = 0, total_k = 0;

  Inputs inputs() const;
  Config config() const;
  Tensor new_out() const { return Tensor(c.dtype, {total_q, c.heads_q, c.head_dim}); }
  Tensor new_lse() const { return Tensor(DType::float32, {c.heads_q, total_q}); }
};

Workload make_workload(const Case& c);

/// Draws a random case: 1-4 sequences (some empty or of length 1), random
/// block size, top-k, GQA ratio from {1, 4, 8} and head dim from `head_dims`.
Case random_case(std::mt19937_64& rng, DType dtype,
                 const std::vector<int64_t>& head_dims = {64, 128}, int32_t max_len = 200);

/// Dense causal attention in fp64 computed directly from q, k, v (no MoBA
/// code involved): out [total_q, Hq, D] and lse [Hq, total_q].
void dense_causal_attention(const Workload& w, std::vector<double>& out, std::vector<double>& lse);

/// Error statistics of `actual` against `expected`.
struct ErrorStats {
  double max_abs = 0.0;
  double mean_abs = 0.0;
  double max_ref = 0.0;  // largest |expected|
  bool finite = true;
};
ErrorStats compare(const std::vector<double>& actual, const std::vector<double>& expected);

/// Absolute tolerance for outputs of unit-scale values computed in `dtype`.
double output_tolerance(DType dtype);

}  // namespace moba::testing
