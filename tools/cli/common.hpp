// Pieces shared by the commands: backend choice, the MoBA configuration from
// the command line, timing statistics and number formatting.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "moba/moba.hpp"
#include "workload.hpp"

namespace moba::cli {

/// The MoBA options every command that runs attention takes.
struct AttentionOptions {
  int64_t block_size = 512;
  int64_t top_k = 3;
  std::optional<double> softmax_scale;
  bool shared_routing = false;
  std::string backend = "auto";
  int threads = 0;  // cpu backend workers; 0 = all hardware threads
};

/// Resolves a backend name: "auto" becomes cuda when a CUDA device is usable,
/// else cpu. Throws UsageError for an unknown name and moba::Error
/// (backend_unavailable) for a backend this build or machine cannot run.
Backend resolve_backend(const std::string& name);

/// The library configuration, validated before any input is built (so that
/// --block-size 0 fails at once, with the library's message naming block_size).
Config make_config(const AttentionOptions& options);

ExecOptions make_exec_options(const AttentionOptions& options, Backend backend);

/// Workload options completed for `backend`: generated inputs without
/// --dtype are bfloat16 on cuda (its kernels take 16-bit inputs) and float32
/// elsewhere; loaded ones keep their file's dtype. --threads also sets the
/// threads that generate random inputs.
WorkloadOptions workload_options_for(const WorkloadOptions& options, Backend backend, int threads);

/// Blocks of the longest key sequence (at least 1): a top_k this large makes
/// MoBA exactly causal full attention (the spec's "seamless switch").
int64_t dense_top_k(const Workload& workload, const Config& config);

/// Summary of repeated timings in milliseconds.
struct Timing {
  std::vector<double> samples_ms;
  double median_ms() const;
  double min_ms() const;
  double max_ms() const;
};

/// Threads the cpu backend will use for `requested` (0 = all).
int effective_threads(int requested);

/// "12.3 ms", "1.23 s", "456 us".
std::string format_ms(double ms);
/// "1.23M", "456.0K", "12".
std::string format_count(double value);

}  // namespace moba::cli
