// The KV-cache API: validates (core/kv_cache), then runs the backend. Only
// the cpu backend implements decode so far; CUDA views are refused.
#include <string>

#include "backends/cpu/decode.hpp"
#include "core/kv_cache.hpp"
#include "core/routing.hpp"
#include "moba/kv_cache.hpp"

namespace moba {

using core::fail;

namespace {

// Validates the cache and checks the requested backend can run it.
core::Cache resolve_cache(const KVCache& cache, const ExecOptions& options, const char* op) {
  if (options.num_threads < 0)
    fail(Status::invalid_argument, "num_threads: expected >= 0 (0 = all hardware threads), got " +
                                       std::to_string(options.num_threads));
  const Backend b = options.backend;
  if (b != Backend::automatic && b != Backend::reference && b != Backend::cpu && b != Backend::cuda)
    fail(Status::invalid_argument, "backend: unknown value " + std::to_string(static_cast<int>(b)) +
                                       "; expected automatic, reference, cpu or cuda");
  if (cache.k.device.type == DeviceType::cuda || b == Backend::cuda)
    fail(Status::backend_unavailable,
         std::string(op) +
             ": KV-cache decode has no CUDA kernel yet; use host tensors and the "
             "cpu backend");
  // The reference backend has no cache path; its oracle role is served by
  // moba::forward on the cached K/V (which the tests compare with).
  if (b == Backend::reference)
    fail(Status::unsupported, std::string(op) +
                                  ": the reference backend has no KV-cache path; use cpu (or "
                                  "moba::forward on the cached keys as the oracle)");
  return core::make_cache(cache);
}

}  // namespace

void kv_cache_append(const KVCache& cache, const TensorView& k_new, const TensorView& v_new,
                     const TensorView& cu_seqlens_new, const ExecOptions& options) {
  const core::Cache c = resolve_cache(cache, options, "kv_cache_append");
  const core::Append a = core::make_append(c, k_new, v_new, cu_seqlens_new);
  for (const auto& [t, name] : {std::pair{&k_new, "k_new"}, {&v_new, "v_new"}})
    core::check_no_overlap(*t, name,
                           {{&cache.k, "cache.k"},
                            {&cache.v, "cache.v"},
                            {&cache.block_sums, "cache.block_sums"},
                            {&cache.seqlens, "cache.seqlens"}});
  backends::cpu::kv_append(c, a, options.num_threads);
}

void kv_cache_decode(const KVCache& cache, const TensorView& q, const TensorView& cu_seqlens_q,
                     const Config& config, const TensorView& out, const TensorView& lse,
                     const ExecOptions& options) {
  const core::Cache c = resolve_cache(cache, options, "kv_cache_decode");
  const core::Decode d = core::make_decode(c, q, cu_seqlens_q, config);
  const core::Problem shape = core::output_problem(c, d);
  const core::Rows out_rows = core::check_rows(shape, out, "out", d.total_q, d.heads_q, c.dtype);
  const std::initializer_list<std::pair<const TensorView*, const char*>> inputs = {
      {&q, "q"},
      {&cu_seqlens_q, "cu_seqlens_q"},
      {&cache.k, "cache.k"},
      {&cache.v, "cache.v"},
      {&cache.block_sums, "cache.block_sums"},
      {&cache.seqlens, "cache.seqlens"},
      {&cache.page_table, "cache.page_table"}};
  core::check_no_overlap(out, "out", inputs);
  core::Lse lse_view{};
  if (lse.present()) {
    lse_view = core::check_lse(shape, lse, "lse");
    core::check_no_overlap(lse, "lse", inputs);
    core::check_no_overlap(out, "out", {{&lse, "lse"}});
  }
  backends::cpu::kv_decode(c, d, out_rows, lse_view, options.num_threads);
}

void kv_cache_routing(const KVCache& cache, const TensorView& q, const TensorView& cu_seqlens_q,
                      const Config& config, const TensorView& selected,
                      const ExecOptions& options) {
  const core::Cache c = resolve_cache(cache, options, "kv_cache_routing");
  const core::Decode d = core::make_decode(c, q, cu_seqlens_q, config);
  const int64_t width = std::min(d.top_k, core::num_blocks(d.max_len_k, c.block_size));
  if (!selected.present() && selected.numel() != 0)
    fail(Status::invalid_argument, "selected: null data pointer");
  if (selected.ndim != 3 || selected.shape[0] != d.total_q || selected.shape[1] != d.heads_q ||
      selected.shape[2] < width)
    fail(Status::invalid_argument, "selected: expected shape [" + std::to_string(d.total_q) + ", " +
                                       std::to_string(d.heads_q) +
                                       ", W] with W >= " + std::to_string(width));
  if (selected.dtype != DType::int32)
    fail(Status::invalid_argument,
         std::string("selected: expected dtype int32, got ") + dtype_name(selected.dtype));
  if (!(selected.device == c.device))
    fail(Status::invalid_argument, "selected: must be on the same device as q");
  if (selected.strides[2] != 1 && selected.shape[2] > 1)
    fail(Status::unsupported, "selected: the last dimension must be contiguous (stride 1)");
  core::check_no_overlap(selected, "selected",
                         {{&q, "q"},
                          {&cu_seqlens_q, "cu_seqlens_q"},
                          {&cache.block_sums, "cache.block_sums"},
                          {&cache.seqlens, "cache.seqlens"},
                          {&cache.page_table, "cache.page_table"}});
  const backends::Selection sel{static_cast<int32_t*>(selected.data), selected.strides[0],
                                selected.strides[1], selected.shape[2]};
  backends::cpu::kv_routing(c, d, sel, options.num_threads);
}

int64_t kv_cache_bytes_read(const KVCache& cache, const TensorView& q,
                            const TensorView& cu_seqlens_q, const Config& config,
                            const ExecOptions& options) {
  const core::Cache c = resolve_cache(cache, options, "kv_cache_bytes_read");
  const core::Decode d = core::make_decode(c, q, cu_seqlens_q, config);
  return backends::cpu::kv_bytes_read(c, d, options.num_threads);
}

}  // namespace moba
