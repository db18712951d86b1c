// `moba run --decode`: times generation steps against a KV cache on the CPU.
// A cache of --tokens context per sequence is built by appending random keys
// in chunks; each timed step appends one new token per sequence and decodes
// it with MoBA, then the same step is decoded densely (top-k = blocks, the
// same kernel reading every block) for the comparison.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "array.hpp"
#include "commands.hpp"
#include "common.hpp"
#include "device.hpp"
#include "errors.hpp"
#include "moba/kv_cache.hpp"
#include "progress.hpp"
#include "workload.hpp"

namespace moba::cli {

using json = nlohmann::ordered_json;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

TensorView view_of(Array& a, DType dtype) {
  TensorView t;
  t.data = a.data();
  t.dtype = dtype;
  t.ndim = static_cast<int>(a.shape.size());
  int64_t stride = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    t.shape[static_cast<size_t>(d)] = a.shape[static_cast<size_t>(d)];
    t.strides[static_cast<size_t>(d)] = stride;
    stride *= a.shape[static_cast<size_t>(d)];
  }
  return t;
}

TensorView ints_view(std::vector<int32_t>& v, std::initializer_list<int64_t> shape) {
  return TensorView::contiguous(v.data(), DType::int32, shape);
}

}  // namespace

int run_decode_command(const RunOptions& o, std::ostream& out) {
  const WorkloadOptions& wo = o.workload;
  if (!wo.q_path.empty() || !wo.safetensors_path.empty() || !wo.cu_seqlens.empty())
    throw UsageError("--decode: generates its own cache; file inputs are not supported");
  if (o.decode_steps < 1)
    throw UsageError("--decode-steps: expected >= 1, got " + std::to_string(o.decode_steps));
  if (o.repeats < 1) throw UsageError("--repeats: expected >= 1, got " + std::to_string(o.repeats));
  const Backend backend = resolve_backend(o.attention.backend);
  if (backend != Backend::cpu)
    throw Error(Status::backend_unavailable,
                std::string("moba: --decode: KV-cache decode runs on the cpu backend only so far "
                            "(got backend ") +
                    backend_name(backend) + ")");
  const Config config = make_config(o.attention);
  const ExecOptions exec = make_exec_options(o.attention, backend);
  const DType dtype = wo.dtype.empty() ? DType::float32 : parse_dtype(wo.dtype);
  std::vector<int64_t> lens = wo.seqlens;
  if (lens.empty()) lens.assign(static_cast<size_t>(wo.batch), wo.tokens);
  const auto batch = static_cast<int64_t>(lens.size());
  const int64_t hq = wo.heads_q, hkv = wo.heads_kv, d = wo.head_dim;
  if (batch < 1) throw UsageError("--decode: expected at least one sequence");
  for (int64_t l : lens)
    if (l < 0) throw UsageError("--seqlens: lengths must be >= 0");
  const int64_t steps = o.warmup + o.decode_steps;
  const int64_t longest = *std::max_element(lens.begin(), lens.end());
  const int64_t capacity = longest + steps;
  const int64_t max_blocks = (capacity + config.block_size - 1) / config.block_size;
  const int64_t chunk = 4096;  // context tokens appended per call and sequence
  const int gen_threads = effective_threads(o.attention.threads);

  Progress progress(o.progress, 2 + (longest + chunk - 1) / chunk + steps);
  progress.step("allocating the cache");
  const ElementType et = element_type(dtype);
  Array k(et, {batch, capacity, hkv, d}), v(et, {batch, capacity, hkv, d});
  Array sums(ElementType::float32, {batch, max_blocks, hkv, d});
  std::vector<int32_t> seqlens(static_cast<size_t>(batch), 0);
  KVCache cache;
  cache.k = view_of(k, dtype);
  cache.v = view_of(v, dtype);
  cache.seqlens = ints_view(seqlens, {batch});
  cache.block_sums = view_of(sums, DType::float32);
  cache.block_size = config.block_size;

  // Context: random keys and values, appended chunk by chunk.
  std::vector<int32_t> cu(static_cast<size_t>(batch + 1));
  for (int64_t at = 0, round = 0; at < longest; at += chunk, ++round) {
    progress.step("building the context: " + std::to_string(at) + "/" + std::to_string(longest));
    cu[0] = 0;
    for (int64_t b = 0; b < batch; ++b)
      cu[static_cast<size_t>(b + 1)] =
          cu[static_cast<size_t>(b)] +
          static_cast<int32_t>(std::clamp<int64_t>(lens[static_cast<size_t>(b)] - at, 0, chunk));
    const int64_t rows = cu[static_cast<size_t>(batch)];
    Array kn(et, {rows, hkv, d}), vn(et, {rows, hkv, d});
    fill_normal(kn, wo.seed, 100 + 2 * static_cast<uint64_t>(round), gen_threads);
    fill_normal(vn, wo.seed, 101 + 2 * static_cast<uint64_t>(round), gen_threads);
    kv_cache_append(cache, view_of(kn, dtype), view_of(vn, dtype), ints_view(cu, {batch + 1}),
                    exec);
  }

  // Every sequence decodes one token per step (empty ones too: their first).
  Array q(et, {batch, hq, d}), kn(et, {batch, hkv, d}), vn(et, {batch, hkv, d});
  Array step_out(et, {batch, hq, d});
  std::vector<int32_t> cu_step(static_cast<size_t>(batch + 1));
  for (int64_t b = 0; b <= batch; ++b) cu_step[static_cast<size_t>(b)] = static_cast<int32_t>(b);
  Config dense = config;
  dense.top_k = std::max<int64_t>(1, max_blocks);  // every block: exactly causal attention
  std::vector<double> append_ms, moba_ms, dense_ms;
  int64_t moba_bytes = 0, dense_bytes = 0;
  const Placement host = Placement::host;
  for (int64_t s = 0; s < steps; ++s) {
    progress.step("decode step " + std::to_string(s + 1) + "/" + std::to_string(steps));
    fill_normal(q, wo.seed, 1000000 + 3 * static_cast<uint64_t>(s), gen_threads);
    fill_normal(kn, wo.seed, 1000001 + 3 * static_cast<uint64_t>(s), gen_threads);
    fill_normal(vn, wo.seed, 1000002 + 3 * static_cast<uint64_t>(s), gen_threads);
    const TensorView qv = view_of(q, dtype), ov = view_of(step_out, dtype);
    const TensorView cuv = ints_view(cu_step, {batch + 1});
    const double a = time_call_ms(
        host, [&] { kv_cache_append(cache, view_of(kn, dtype), view_of(vn, dtype), cuv, exec); });
    const double m =
        time_call_ms(host, [&] { kv_cache_decode(cache, qv, cuv, config, ov, {}, exec); });
    const double f =
        o.dense ? time_call_ms(host, [&] { kv_cache_decode(cache, qv, cuv, dense, ov, {}, exec); })
                : 0.0;
    if (s < o.warmup) continue;
    append_ms.push_back(a);
    moba_ms.push_back(m);
    dense_ms.push_back(f);
    if (s + 1 == steps) {
      moba_bytes = kv_cache_bytes_read(cache, qv, cuv, config, exec);
      dense_bytes = kv_cache_bytes_read(cache, qv, cuv, dense, exec);
    }
  }
  progress.finish();

  const double t_append = median(append_ms), t_moba = median(moba_ms), t_dense = median(dense_ms);
  const auto gbps = [](int64_t bytes, double ms) {
    return ms > 0.0 ? static_cast<double>(bytes) / (ms * 1e6) : 0.0;
  };
  const int threads = effective_threads(o.attention.threads);
  if (o.json) {
    json report = {
        {"command", "run --decode"},
        {"version", version()},
        {"backend", backend_name(backend)},
        {"threads", threads},
        {"config",
         {{"batch", batch},
          {"context", lens},
          {"heads_q", hq},
          {"heads_kv", hkv},
          {"head_dim", d},
          {"dtype", dtype_name(dtype)},
          {"block_size", config.block_size},
          {"top_k", config.top_k},
          {"dense_top_k", dense.top_k},
          {"shared_routing", config.gqa_shared_routing},
          {"decode_steps", o.decode_steps},
          {"warmup", o.warmup}}},
        {"append_ms", t_append},
        {"moba_decode_ms", t_moba},
        {"moba_step_ms", t_append + t_moba},
        {"moba_bytes_read", moba_bytes},
        {"moba_gb_per_s", gbps(moba_bytes, t_moba)},
        {"dense_decode_ms", o.dense ? json(t_dense) : json(nullptr)},
        {"dense_step_ms", o.dense ? json(t_append + t_dense) : json(nullptr)},
        {"dense_bytes_read", dense_bytes},
        {"dense_gb_per_s", o.dense ? json(gbps(dense_bytes, t_dense)) : json(nullptr)},
        {"speedup", o.dense && t_moba > 0.0 ? json((t_append + t_dense) / (t_append + t_moba))
                                            : json(nullptr)}};
    out << report.dump(2) << '\n';
    return 0;
  }
  char line[256];
  out << "moba " << version() << " run --decode: backend cpu (" << threads << " threads)\n";
  std::snprintf(line, sizeof line,
                "cache     %lld sequences, context up to %lld tokens, Hq %lld, Hkv %lld, D %lld, "
                "%s, block %lld, top-k %lld\n",
                static_cast<long long>(batch), static_cast<long long>(longest),
                static_cast<long long>(hq), static_cast<long long>(hkv), static_cast<long long>(d),
                dtype_name(dtype), static_cast<long long>(config.block_size),
                static_cast<long long>(config.top_k));
  out << line;
  std::snprintf(line, sizeof line,
                "moba      %s per step (append %s + decode %s), K/V read %.1f MB, %.2f GB/s\n",
                format_ms(t_append + t_moba).c_str(), format_ms(t_append).c_str(),
                format_ms(t_moba).c_str(), static_cast<double>(moba_bytes) / 1e6,
                gbps(moba_bytes, t_moba));
  out << line;
  if (o.dense) {
    std::snprintf(line, sizeof line,
                  "dense     %s per step (decode %s), K/V read %.1f MB, %.2f GB/s\n",
                  format_ms(t_append + t_dense).c_str(), format_ms(t_dense).c_str(),
                  static_cast<double>(dense_bytes) / 1e6, gbps(dense_bytes, t_dense));
    out << line;
    std::snprintf(line, sizeof line, "          speedup %.2fx over dense (median of %lld steps)\n",
                  (t_append + t_dense) / (t_append + t_moba),
                  static_cast<long long>(o.decode_steps));
    out << line;
  }
  return 0;
}

}  // namespace moba::cli
