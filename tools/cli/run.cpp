// `moba run`: MoBA forward (and backward) timed against dense causal
// attention computed by the same backend in the same process.
#include <cmath>
#include <functional>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "errors.hpp"
#include "npy.hpp"
#include "safetensors.hpp"
#include "sparsity.hpp"

namespace moba::cli {
namespace {

using json = nlohmann::ordered_json;

struct PhaseTimings {
  Timing moba;
  std::optional<Timing> dense;
};

json timing_json(const Timing& t, int64_t tokens) {
  const double median = t.median_ms();
  return {{"median_ms", median},
          {"min_ms", t.min_ms()},
          {"max_ms", t.max_ms()},
          {"samples_ms", t.samples_ms},
          {"tokens_per_s", median > 0.0 ? static_cast<double>(tokens) / (median / 1000.0) : 0.0}};
}

std::optional<double> speedup(const PhaseTimings& p) {
  if (!p.dense || p.moba.median_ms() <= 0.0) return std::nullopt;
  return p.dense->median_ms() / p.moba.median_ms();
}

json phase_json(const PhaseTimings& p, int64_t tokens) {
  const std::optional<double> s = speedup(p);
  return {{"moba", timing_json(p.moba, tokens)},
          {"dense", p.dense ? timing_json(*p.dense, tokens) : json(nullptr)},
          {"speedup", s ? json(*s) : json(nullptr)}};
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string describe_inputs(const Workload& w, const RunOptions& o) {
  std::string s = w.source == "random"
                      ? "random normal (seed " + std::to_string(o.workload.seed) + ")"
                      : w.source + " files";
  const std::vector<int64_t> lens_q = w.lens_q(), lens_k = w.lens_k();
  s += ": " + std::to_string(w.batch()) + (w.batch() == 1 ? " sequence, " : " sequences, ") +
       std::to_string(w.total_q) + " tokens";
  if (w.batch() > 1 && w.batch() <= 8) s += " (lengths " + join(lens_q, ", ") + ")";
  if (lens_k != lens_q) s += ", " + std::to_string(w.total_k) + " keys";
  char tail[160];
  std::snprintf(tail, sizeof tail, ", Hq %lld, Hkv %lld, D %lld, %s",
                static_cast<long long>(w.heads_q), static_cast<long long>(w.heads_kv),
                static_cast<long long>(w.head_dim), dtype_name(w.dtype));
  return s + tail;
}

void write_output(const std::string& path, const Workload& w, const Config& config,
                  const PlacedTensor& out, const PlacedTensor& lse) {
  Array out_array = download(out, element_type(w.dtype), w.out_shape);
  if (ends_with(path, ".safetensors")) {
    const Array lse_array = download(lse, ElementType::float32, {w.heads_q, w.total_q});
    write_safetensors(path, {{"out", &out_array}, {"lse", &lse_array}},
                      {{"block_size", std::to_string(config.block_size)},
                       {"top_k", std::to_string(config.top_k)},
                       {"moba_version", version()}});
  } else {
    write_npy(path, out_array);
  }
}

}  // namespace

int run_command(const RunOptions& o, std::ostream& out) {
  if (o.decode) return run_decode_command(o, out);
  if (o.repeats < 1) throw UsageError("--repeats: expected >= 1, got " + std::to_string(o.repeats));
  if (o.warmup < 0) throw UsageError("--warmup: expected >= 0, got " + std::to_string(o.warmup));
  const Backend backend = resolve_backend(o.attention.backend);
  const Placement placement = placement_for(backend);
  const ExecOptions exec = make_exec_options(o.attention, backend);
  const Config config = make_config(o.attention);

  const int64_t calls_per_phase = o.warmup + o.repeats;
  const int64_t phases = (o.dense ? 2 : 1) * (o.backward ? 2 : 1);
  Progress progress(o.progress, 2 + phases * calls_per_phase);

  progress.step("preparing inputs");
  const WorkloadOptions workload_options =
      workload_options_for(o.workload, backend, o.attention.threads);
  const Workload w = make_workload(workload_options);
  Config dense_config = config;
  dense_config.top_k = dense_top_k(w, config);
  const PlacedWorkload placed = place(w, placement);

  progress.step("routing (sparsity)");
  const Sparsity sparsity = measure_sparsity(
      w, placed, config, exec, int64_t{64} << 20, [&](int64_t done, int64_t total) {
        if (done < total)
          progress.relabel("routing (sparsity): chunk " + std::to_string(done + 1) + "/" +
                           std::to_string(total));
      });

  const auto time_phase = [&](const std::string& name, const std::function<void()>& call) {
    Timing t;
    for (int i = 0; i < o.warmup; ++i) {
      progress.step(name + ": warmup " + std::to_string(i + 1) + "/" + std::to_string(o.warmup));
      call();
      synchronize(placement);
    }
    for (int i = 0; i < o.repeats; ++i) {
      progress.step(name + ": repeat " + std::to_string(i + 1) + "/" + std::to_string(o.repeats));
      t.samples_ms.push_back(time_call_ms(placement, call));
    }
    return t;
  };

  const int64_t tq = w.total_q, tk = w.total_k, hq = w.heads_q, hkv = w.heads_kv, d = w.head_dim;
  const PlacedTensor moba_out = make_tensor(placement, w.dtype, {tq, hq, d});
  const PlacedTensor moba_lse = make_tensor(placement, DType::float32, {hq, tq});
  PhaseTimings fwd;
  fwd.moba = time_phase(
      "moba forward", [&] { forward(placed.inputs, config, moba_out.view, moba_lse.view, exec); });
  std::optional<PlacedTensor> dense_out, dense_lse;
  if (o.dense) {
    dense_out = make_tensor(placement, w.dtype, {tq, hq, d});
    dense_lse = make_tensor(placement, DType::float32, {hq, tq});
    fwd.dense = time_phase("dense forward", [&] {
      forward(placed.inputs, dense_config, dense_out->view, dense_lse->view, exec);
    });
  }

  std::optional<PhaseTimings> bwd;
  if (o.backward) {
    Array dout_host(element_type(w.dtype), {tq, hq, d});
    fill_normal(dout_host, o.workload.seed, 3, workload_options.threads);
    const PlacedTensor dout = place_array(placement, dout_host, w.dtype, {tq, hq, d});
    const PlacedTensor dq = make_tensor(placement, w.dtype, {tq, hq, d});
    const PlacedTensor dk = make_tensor(placement, w.dtype, {tk, hkv, d});
    const PlacedTensor dv = make_tensor(placement, w.dtype, {tk, hkv, d});
    bwd.emplace();
    bwd->moba = time_phase("moba backward", [&] {
      backward(placed.inputs, config, moba_out.view, dout.view, moba_lse.view, dq.view, dk.view,
               dv.view, exec);
    });
    if (o.dense)
      bwd->dense = time_phase("dense backward", [&] {
        backward(placed.inputs, dense_config, dense_out->view, dout.view, dense_lse->view, dq.view,
                 dk.view, dv.view, exec);
      });
  }
  progress.finish();

  if (!o.out_path.empty()) write_output(o.out_path, w, config, moba_out, moba_lse);

  const float scale =
      config.softmax_scale.value_or(1.0f / std::sqrt(static_cast<float>(w.head_dim)));
  const std::string device = describe_device(placement);
  // Only the cpu backend has worker threads; 0 means "not applicable".
  const int threads = backend == Backend::cpu ? effective_threads(o.attention.threads) : 0;
  if (o.json) {
    json config_json = {{"source", w.source},
                        {"batch", w.batch()},
                        {"total_q", tq},
                        {"total_k", tk},
                        {"max_seqlen_q", w.max_len_q},
                        {"max_seqlen_k", w.max_len_k},
                        {"heads_q", hq},
                        {"heads_kv", hkv},
                        {"head_dim", d},
                        {"dtype", dtype_name(w.dtype)},
                        {"block_size", config.block_size},
                        {"top_k", config.top_k},
                        {"dense_top_k", dense_config.top_k},
                        {"softmax_scale", scale},
                        {"shared_routing", config.gqa_shared_routing},
                        {"repeats", o.repeats},
                        {"warmup", o.warmup}};
    if (w.source == "random") config_json["seed"] = o.workload.seed;
    // Long batches would swamp the report; their totals are above.
    if (w.batch() <= 4096) {
      config_json["seqlens_q"] = w.lens_q();
      config_json["seqlens_k"] = w.lens_k();
    }
    json timings = {{"forward", phase_json(fwd, tq)}};
    if (bwd) timings["backward"] = phase_json(*bwd, tq);
    json report = {{"command", "run"},
                   {"version", version()},
                   {"backend", backend_name(backend)},
                   {"device", device},
                   {"threads", threads > 0 ? json(threads) : json(nullptr)},
                   {"config", config_json},
                   {"sparsity", sparsity.fraction()},
                   {"attended_pairs", sparsity.attended},
                   {"causal_pairs", sparsity.causal},
                   {"timings", timings},
                   {"out_file", o.out_path.empty() ? json(nullptr) : json(o.out_path)}};
    out << report.dump(2) << '\n';
    return 0;
  }

  char line[256];
  out << "moba " << version() << " run: backend " << backend_name(backend);
  if (threads > 0) out << " (" << threads << (threads == 1 ? " thread)" : " threads)");
  out << " on " << device << '\n';
  out << "inputs    " << describe_inputs(w, o) << '\n';
  std::snprintf(line, sizeof line,
                "moba      block %lld, top-k %lld, softmax scale %.4g, shared routing %s\n",
                static_cast<long long>(config.block_size), static_cast<long long>(config.top_k),
                scale, config.gqa_shared_routing ? "on" : "off");
  out << line;
  std::snprintf(line, sizeof line, "sparsity  %.2f%% of causal (query, key) pairs skipped\n",
                100.0 * sparsity.fraction());
  out << line;
  const auto print_phase = [&](const char* title, const PhaseTimings& p) {
    const auto row = [&](const char* name, const Timing& t, bool first) {
      const double median = t.median_ms();
      const double rate = median > 0.0 ? static_cast<double>(tq) / (median / 1000.0) : 0.0;
      out << (first ? title : "          ") << name << format_ms(median) << " (median of "
          << t.samples_ms.size() << ", min " << format_ms(t.min_ms()) << "), " << format_count(rate)
          << " tokens/s\n";
    };
    row("moba   ", p.moba, true);
    if (p.dense) row("dense  ", *p.dense, false);
    if (const auto s = speedup(p)) {
      std::snprintf(line, sizeof line, "          speedup %.2fx over dense\n", *s);
      out << line;
    }
  };
  print_phase("forward   ", fwd);
  if (bwd) print_phase("backward  ", *bwd);
  if (!o.out_path.empty()) out << "output    written to " << o.out_path << '\n';
  return 0;
}

}  // namespace moba::cli
