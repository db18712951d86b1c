// The KV-cache API: validates (core/kv_cache), then runs the backend: cpu
// for host memory, cuda for device memory (backend automatic or cuda).
#include <string>

#include "backends/cpu/decode.hpp"
#include "core/kv_cache.hpp"
#include "core/routing.hpp"
#include "moba/kv_cache.hpp"
#ifdef MOBA_WITH_CUDA
#include "backends/cuda/decode.hpp"
#endif

namespace moba {

using core::fail;

namespace {

// The validated cache and the backend that runs the call (cpu or cuda).
struct Resolved {
  core::Cache cache;
  bool cuda = false;
};

// Picks the backend from the cache's device and the request, checks it can
// run here, then validates the cache.
Resolved resolve_cache(const KVCache& cache, const ExecOptions& options, const char* op) {
  if (options.num_threads < 0)
    fail(Status::invalid_argument, "num_threads: expected >= 0 (0 = all hardware threads), got " +
                                       std::to_string(options.num_threads));
  const Backend b = options.backend;
  if (b != Backend::automatic && b != Backend::reference && b != Backend::cpu && b != Backend::cuda)
    fail(Status::invalid_argument, "backend: unknown value " + std::to_string(static_cast<int>(b)) +
                                       "; expected automatic, reference, cpu or cuda");
  const bool on_gpu = cache.k.device.type == DeviceType::cuda;
  const std::string name(op);
  // The reference backend has no cache path; its oracle role is served by
  // moba::forward on the cached K/V (which the tests compare with).
  if (b == Backend::reference)
    fail(Status::unsupported, name +
                                  ": the reference backend has no KV-cache path; use cpu (or "
                                  "moba::forward on the cached keys as the oracle)");
  Resolved r;
  r.cuda = b == Backend::cuda || (b == Backend::automatic && on_gpu);
  if (r.cuda) {
#ifdef MOBA_WITH_CUDA
    if (!backends::cuda::device_available())
      fail(Status::backend_unavailable, name + ": backend cuda: no CUDA device is available");
    if (!on_gpu)
      fail(Status::invalid_argument,
           name + ": backend cuda expects the cache on a CUDA device, got host tensors");
#else
    fail(Status::backend_unavailable,
         name +
             ": the cache is on a CUDA device (or backend cuda was requested), but this build "
             "of moba has no CUDA backend (configure with -DMOBA_CUDA=ON)");
#endif
  } else if (on_gpu) {
    fail(Status::invalid_argument,
         name + ": backend cpu expects host tensors, got a cache on a CUDA device");
  }
  r.cache = core::make_cache(cache);
  return r;
}

}  // namespace

void kv_cache_append(const KVCache& cache, const TensorView& k_new, const TensorView& v_new,
                     const TensorView& cu_seqlens_new, const ExecOptions& options) {
  const Resolved r = resolve_cache(cache, options, "kv_cache_append");
  const core::Cache& c = r.cache;
  const core::Append a = core::make_append(c, k_new, v_new, cu_seqlens_new);
  for (const auto& [t, name] : {std::pair{&k_new, "k_new"}, {&v_new, "v_new"}})
    core::check_no_overlap(*t, name,
                           {{&cache.k, "cache.k"},
                            {&cache.v, "cache.v"},
                            {&cache.block_sums, "cache.block_sums"},
                            {&cache.seqlens, "cache.seqlens"}});
#ifdef MOBA_WITH_CUDA
  if (r.cuda) return backends::cuda::kv_append(c, a, options.stream);
#endif
  backends::cpu::kv_append(c, a, options.num_threads);
}

void kv_cache_decode(const KVCache& cache, const TensorView& q, const TensorView& cu_seqlens_q,
                     const Config& config, const TensorView& out, const TensorView& lse,
                     const ExecOptions& options) {
  const Resolved r = resolve_cache(cache, options, "kv_cache_decode");
  const core::Cache& c = r.cache;
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
#ifdef MOBA_WITH_CUDA
  if (r.cuda) return backends::cuda::kv_decode(c, d, out_rows, lse_view, options.stream);
#endif
  backends::cpu::kv_decode(c, d, out_rows, lse_view, options.num_threads);
}

void kv_cache_routing(const KVCache& cache, const TensorView& q, const TensorView& cu_seqlens_q,
                      const Config& config, const TensorView& selected,
                      const ExecOptions& options) {
  const Resolved r = resolve_cache(cache, options, "kv_cache_routing");
  const core::Cache& c = r.cache;
  const core::Decode d = core::make_decode(c, q, cu_seqlens_q, config);
  // The longest sequence is known on the host for a host cache only; on the
  // device a row whose selection does not fit W comes back all -1.
  const int64_t width = r.cuda ? (d.total_q * d.heads_q > 0 ? 1 : 0)
                               : std::min(d.top_k, core::num_blocks(d.max_len_k, c.block_size));
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
#ifdef MOBA_WITH_CUDA
  if (r.cuda) return backends::cuda::kv_routing(c, d, sel, options.stream);
#endif
  backends::cpu::kv_routing(c, d, sel, options.num_threads);
}

int64_t kv_cache_bytes_read(const KVCache& cache, const TensorView& q,
                            const TensorView& cu_seqlens_q, const Config& config,
                            const ExecOptions& options) {
  const Resolved r = resolve_cache(cache, options, "kv_cache_bytes_read");
  const core::Cache& c = r.cache;
  const core::Decode d = core::make_decode(c, q, cu_seqlens_q, config);
#ifdef MOBA_WITH_CUDA
  if (r.cuda) return backends::cuda::kv_bytes_read(c, d, options.stream);
#endif
  return backends::cpu::kv_bytes_read(c, d, options.num_threads);
}

}  // namespace moba
