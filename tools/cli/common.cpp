#include "common.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <thread>

#include "core/routing.hpp"
#include "errors.hpp"

namespace moba::cli {

Backend resolve_backend(const std::string& name) {
  Backend backend;
  try {
    backend = parse_backend(name);
  } catch (const Error&) {
    throw UsageError("--backend: unknown backend '" + name +
                     "'; expected auto, reference, cpu or cuda");
  }
  if (backend == Backend::automatic)
    return backend_available(Backend::cuda) ? Backend::cuda : Backend::cpu;
  if (!backend_available(backend))
    throw Error(Status::backend_unavailable, std::string("moba: backend ") + backend_name(backend) +
                                                 " is not available here (a build without CUDA, or "
                                                 "no CUDA device); `moba info` lists the backends");
  return backend;
}

Config make_config(const AttentionOptions& o) {
  Config config;
  config.block_size = o.block_size;
  config.top_k = o.top_k;
  if (o.softmax_scale) config.softmax_scale = static_cast<float>(*o.softmax_scale);
  config.gqa_shared_routing = o.shared_routing;
  routing_width(0, config);  // throws moba::Error naming block_size / top_k
  if (config.softmax_scale &&
      !(std::isfinite(*config.softmax_scale) && *config.softmax_scale > 0.0f))
    throw UsageError("--softmax-scale: expected a finite value > 0, got " +
                     std::to_string(*o.softmax_scale));
  return config;
}

ExecOptions make_exec_options(const AttentionOptions& o, Backend backend) {
  if (o.threads < 0)
    throw UsageError("--threads: expected >= 0 (0 = all hardware threads), got " +
                     std::to_string(o.threads));
  ExecOptions e;
  e.backend = backend;
  e.num_threads = o.threads;
  return e;
}

WorkloadOptions workload_options_for(const WorkloadOptions& options, Backend backend, int threads) {
  WorkloadOptions w = options;
  const bool generated =
      w.q_path.empty() && w.k_path.empty() && w.v_path.empty() && w.safetensors_path.empty();
  if (generated && w.dtype.empty()) w.dtype = backend == Backend::cuda ? "bfloat16" : "float32";
  if (w.threads == 0) w.threads = threads;
  return w;
}

int64_t dense_top_k(const Workload& w, const Config& config) {
  return std::max<int64_t>(1, core::num_blocks(w.max_len_k, config.block_size));
}

namespace {
std::vector<double> sorted(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v;
}
}  // namespace

double Timing::median_ms() const {
  if (samples_ms.empty()) return 0.0;
  const std::vector<double> s = sorted(samples_ms);
  const size_t n = s.size();
  return n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
}

double Timing::min_ms() const {
  return samples_ms.empty() ? 0.0 : *std::min_element(samples_ms.begin(), samples_ms.end());
}
double Timing::max_ms() const {
  return samples_ms.empty() ? 0.0 : *std::max_element(samples_ms.begin(), samples_ms.end());
}

int effective_threads(int requested) {
  return requested > 0 ? requested
                       : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

std::string format_ms(double ms) {
  char buf[64];
  if (ms >= 1000.0)
    std::snprintf(buf, sizeof buf, "%.3g s", ms / 1000.0);
  else if (ms >= 1.0)
    std::snprintf(buf, sizeof buf, "%.3g ms", ms);
  else
    std::snprintf(buf, sizeof buf, "%.3g us", ms * 1000.0);
  return buf;
}

std::string format_count(double value) {
  char buf[64];
  if (value >= 1e9)
    std::snprintf(buf, sizeof buf, "%.3gG", value / 1e9);
  else if (value >= 1e6)
    std::snprintf(buf, sizeof buf, "%.3gM", value / 1e6);
  else if (value >= 1e3)
    std::snprintf(buf, sizeof buf, "%.3gK", value / 1e3);
  else
    std::snprintf(buf, sizeof buf, "%.3g", value);
  return buf;
}

}  // namespace moba::cli
