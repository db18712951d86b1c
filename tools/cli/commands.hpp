// The subcommands of `moba`. Each takes its parsed options, writes its report
// to `out` (human-readable or one JSON object) and returns the exit status;
// errors are thrown (see errors.hpp) and reported by main().
#pragma once

#include <cstdint>
#include <ostream>
#include <string>

#include "common.hpp"
#include "progress.hpp"
#include "workload.hpp"

namespace moba::cli {

struct RunOptions {
  WorkloadOptions workload;
  AttentionOptions attention;
  int repeats = 5;
  int warmup = 1;
  bool dense = true;      // also time dense causal attention (top_k >= blocks)
  bool backward = false;  // also time the backward pass
  bool decode = false;    // time KV-cache decode steps instead (moba run --decode)
  int decode_steps = 16;  // timed decode steps (after `warmup` untimed ones)
  bool json = false;
  std::string out_path;  // .npy, or .safetensors for out and lse
  Progress::Mode progress = Progress::Mode::automatic;
};

/// `moba run`: times MoBA (and dense attention) on one workload.
int run_command(const RunOptions& options, std::ostream& out);

/// `moba run --decode`: times KV-cache decode steps (cpu), MoBA against dense.
int run_decode_command(const RunOptions& options, std::ostream& out);

struct RoutingOptions {
  WorkloadOptions workload;
  AttentionOptions attention;
  bool json = false;
};

/// `moba routing`: prints the blocks every query and head selects.
int routing_command(const RoutingOptions& options, std::ostream& out);

struct InfoOptions {
  bool json = false;
};

/// `moba info`: version, backends, threads.
int info_command(const InfoOptions& options, std::ostream& out);

}  // namespace moba::cli
