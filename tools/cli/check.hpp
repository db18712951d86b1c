// `moba check`: a backend against the reference backend on a sweep of small
// random problems, forward (out, lse, routing) and optionally backward.
//
// Tolerances (absolute, scaled by max(1, largest |reference value|) of the
// tensor compared, for inputs drawn from N(0, 1)):
//
//   tensor      float32   float16   bfloat16
//   out         2e-5      4e-3      3e-2       about 1 ulp of the 16-bit formats
//   lse         2e-5      1e-4      1e-4       fp32 statistics either way
//   dq, dk, dv  4e-5      8e-3      6e-2       longer sums than the output
//
// Routing: for every (query, head) the two selections must be equal, except
// on near ties: the candidate's selection may differ only if every block it
// chose scores within 1e-5 * sum_c |q_c * kbar_c| (the accumulation error
// bound the spec allows) of every past block it left out. Rows with such a
// tie are excluded from the out / lse / dq comparison (their outputs
// legitimately differ), and dk / dv are then reported but not enforced.
#pragma once

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "array.hpp"
#include "progress.hpp"
#include "workload.hpp"

namespace moba::cli {

struct CheckOptions {
  std::string backend = "cpu";
  int cases = 24;  // the built-in sweep; more adds random shapes
  uint64_t seed = 0;
  bool backward = false;
  bool json = false;
  int threads = 0;
  Progress::Mode progress = Progress::Mode::automatic;
};

/// One problem of the sweep.
struct CheckCase {
  std::vector<int64_t> lens_q;
  std::vector<int64_t> lens_k;  // empty: equal to lens_q
  int64_t heads_q = 2, heads_kv = 1, head_dim = 64;
  int64_t block_size = 16, top_k = 2;
  DType dtype = DType::float32;
  bool shared_routing = false;
  std::optional<float> softmax_scale;
};

/// The number of hand-picked cases of the built-in sweep.
int builtin_case_count();
/// The first `count` cases: the built-in ones, then random shapes from `seed`.
std::vector<CheckCase> check_cases(int count, uint64_t seed);
std::string describe(const CheckCase& c);

struct Tolerances {
  double out, lse, grad;
};
Tolerances tolerances(DType dtype);

/// What one backend computed for one case.
struct BackendResult {
  Array out;                      // [total_q, Hq, D] of the case's dtype
  std::vector<float> lse;         // [Hq, total_q]
  std::vector<int32_t> selected;  // [total_q, Hq, width], -1 padded
  int64_t width = 0;
  std::optional<Array> dq, dk, dv;
};

/// Runs forward, routing and (when `dout` is given) backward of `c` on `w`.
BackendResult run_backend(const CheckCase& c, const Workload& w, const Array* dout, Backend backend,
                          int threads);

struct TensorError {
  double max_abs = 0.0;
  double mean_abs = 0.0;
  double max_ref = 0.0;
  double tolerance = 0.0;
  int64_t compared = 0;
  bool finite = true;
  bool enforced = true;
  bool ok() const { return !enforced || (finite && max_abs <= tolerance); }
};

struct SelectionStats {
  int64_t compared = 0;    // (query, head) pairs
  int64_t agree = 0;       // identical selections
  int64_t near_ties = 0;   // different, but only among near-tied blocks
  int64_t mismatches = 0;  // different otherwise: a failure
  double agreement() const {
    return compared == 0 ? 1.0 : static_cast<double>(agree) / static_cast<double>(compared);
  }
};

struct CaseReport {
  TensorError out, lse;
  std::optional<TensorError> dq, dk, dv;
  SelectionStats selection;
  bool ok() const;
};

/// Compares `candidate` against `reference` for case `c` on workload `w`.
CaseReport judge(const CheckCase& c, const Workload& w, const BackendResult& reference,
                 const BackendResult& candidate);

/// Runs the sweep; returns 0 when every case passes, 1 otherwise.
int check_command(const CheckOptions& options, std::ostream& out);

}  // namespace moba::cli
