// The public API: validates every argument once (core), then hands the
// problem to the chosen backend.
#include <string>

#include "backends/backend.hpp"
#include "core/problem.hpp"
#include "core/routing.hpp"
#include "moba/moba.hpp"

#ifndef MOBA_VERSION
#define MOBA_VERSION "0.0.0"
#endif

namespace moba {

using core::fail;

int dtype_size(DType dtype) noexcept {
  switch (dtype) {
    case DType::float16:
    case DType::bfloat16:
      return 2;
    case DType::float32:
    case DType::int32:
      return 4;
  }
  return 0;
}

const char* dtype_name(DType dtype) noexcept {
  switch (dtype) {
    case DType::float32:
      return "float32";
    case DType::float16:
      return "float16";
    case DType::bfloat16:
      return "bfloat16";
    case DType::int32:
      return "int32";
  }
  return "unknown";
}

TensorView TensorView::contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape,
                                  Device device) {
  TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.ndim = static_cast<int>(shape.size());
  if (t.ndim > kMaxDims)
    fail(Status::invalid_argument, "TensorView::contiguous: at most 4 dimensions");
  int i = 0;
  for (int64_t s : shape) t.shape[static_cast<size_t>(i++)] = s;
  int64_t stride = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    t.strides[static_cast<size_t>(d)] = stride;
    stride *= t.shape[static_cast<size_t>(d)];
  }
  return t;
}

int64_t TensorView::numel() const noexcept {
  int64_t n = 1;
  for (int i = 0; i < ndim && i < kMaxDims; ++i) n *= shape[static_cast<size_t>(i)];
  return n;
}

const char* backend_name(Backend backend) noexcept {
  switch (backend) {
    case Backend::automatic:
      return "auto";
    case Backend::reference:
      return "reference";
    case Backend::cpu:
      return "cpu";
    case Backend::cuda:
      return "cuda";
  }
  return "unknown";
}

Backend parse_backend(const std::string& name) {
  for (Backend b : {Backend::automatic, Backend::reference, Backend::cpu, Backend::cuda})
    if (name == backend_name(b)) return b;
  fail(Status::invalid_argument,
       "backend: unknown name '" + name + "'; expected auto, reference, cpu or cuda");
}

bool backend_available(Backend backend) noexcept {
  switch (backend) {
    case Backend::automatic:
    case Backend::reference:
    case Backend::cpu:
      return true;
    case Backend::cuda:
#ifdef MOBA_WITH_CUDA
      return backends::cuda::device_available();
#else
      return false;
#endif
  }
  return false;
}

const char* version() noexcept {
  return MOBA_VERSION;
}

int64_t routing_width(int64_t max_seqlen_k, const Config& config) {
  if (config.block_size < 1)
    fail(Status::invalid_argument,
         "block_size: expected >= 1, got " + std::to_string(config.block_size));
  if (config.top_k < 1)
    fail(Status::invalid_argument, "top_k: expected >= 1, got " + std::to_string(config.top_k));
  if (max_seqlen_k < 0) fail(Status::invalid_argument, "max_seqlen_k: expected >= 0");
  return std::min(config.top_k, core::num_blocks(max_seqlen_k, config.block_size));
}

namespace {

void check_options(const ExecOptions& o) {
  if (o.num_threads < 0)
    fail(Status::invalid_argument, "num_threads: expected >= 0 (0 = all hardware threads), got " +
                                       std::to_string(o.num_threads));
}

// The backend that will run `p`, after checking it can.
Backend resolve(const core::Problem& p, Backend requested) {
  if (requested != Backend::automatic && requested != Backend::reference &&
      requested != Backend::cpu && requested != Backend::cuda)
    fail(Status::invalid_argument, "backend: unknown value " +
                                       std::to_string(static_cast<int>(requested)) +
                                       "; expected automatic, reference, cpu or cuda");
  const bool on_gpu = p.device.type == DeviceType::cuda;
  Backend b = requested;
  if (b == Backend::automatic) b = on_gpu ? Backend::cuda : Backend::cpu;
  if (b == Backend::cuda) {
#ifdef MOBA_WITH_CUDA
    if (!backends::cuda::device_available())
      fail(Status::backend_unavailable, "backend cuda: no CUDA device is available");
    if (!on_gpu)
      fail(Status::invalid_argument,
           "backend cuda: expects tensors on a CUDA device, got host tensors");
    return b;
#else
    fail(Status::backend_unavailable, "backend cuda: this build of moba has no CUDA backend");
#endif
  }
  if (on_gpu)
    fail(Status::invalid_argument, std::string("backend ") + backend_name(b) +
                                       ": expects host tensors, got tensors on a CUDA device");
  return b;
}

}  // namespace

void forward(const Inputs& inputs, const Config& config, const TensorView& out,
             const TensorView& lse, const ExecOptions& options) {
  const core::Problem p = core::make_problem(inputs, config);
  check_options(options);
  const core::Rows out_rows = core::check_rows(p, out, "out", p.total_q, p.heads_q, inputs.q.dtype);
  core::check_no_overlap(out, "out",
                         {{&inputs.q, "q"},
                          {&inputs.k, "k"},
                          {&inputs.v, "v"},
                          {&lse, "lse"},
                          {&inputs.cu_seqlens_q, "cu_seqlens_q"},
                          {&inputs.cu_seqlens_k, "cu_seqlens_k"}});
  core::Lse lse_view{};
  if (lse.present()) {
    lse_view = core::check_lse(p, lse, "lse");
    core::check_no_overlap(lse, "lse",
                           {{&inputs.q, "q"},
                            {&inputs.k, "k"},
                            {&inputs.v, "v"},
                            {&inputs.cu_seqlens_q, "cu_seqlens_q"},
                            {&inputs.cu_seqlens_k, "cu_seqlens_k"}});
  }
  switch (resolve(p, options.backend)) {
    case Backend::reference:
      backends::reference::forward(p, out_rows, lse_view);
      return;
    case Backend::cpu:
      backends::cpu::forward(p, out_rows, lse_view, options.num_threads);
      return;
#ifdef MOBA_WITH_CUDA
    case Backend::cuda:
      backends::cuda::forward(p, out_rows, lse_view, options.stream);
      return;
#endif
    default:
      fail(Status::internal, "forward: no backend resolved");
  }
}

void backward(const Inputs& inputs, const Config& config, const TensorView& out,
              const TensorView& dout, const TensorView& lse, const TensorView& dq,
              const TensorView& dk, const TensorView& dv, const ExecOptions& options) {
  const core::Problem p = core::make_problem(inputs, config);
  check_options(options);
  const DType dt = inputs.q.dtype;
  const core::Rows out_rows = core::check_rows(p, out, "out", p.total_q, p.heads_q, dt);
  const core::Rows dout_rows = core::check_rows(p, dout, "dout", p.total_q, p.heads_q, dt);
  const core::Lse lse_view = core::check_lse(p, lse, "lse");
  const backends::Gradients grads{core::check_rows(p, dq, "dq", p.total_q, p.heads_q, dt),
                                  core::check_rows(p, dk, "dk", p.total_k, p.heads_kv, dt),
                                  core::check_rows(p, dv, "dv", p.total_k, p.heads_kv, dt)};
  for (const auto& [g, name] : {std::pair{&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}})
    core::check_no_overlap(*g, name,
                           {{&inputs.q, "q"},
                            {&inputs.k, "k"},
                            {&inputs.v, "v"},
                            {&out, "out"},
                            {&dout, "dout"},
                            {&lse, "lse"},
                            {&inputs.cu_seqlens_q, "cu_seqlens_q"},
                            {&inputs.cu_seqlens_k, "cu_seqlens_k"},
                            {g == &dq ? nullptr : &dq, "dq"},
                            {g == &dk ? nullptr : &dk, "dk"},
                            {g == &dv ? nullptr : &dv, "dv"}});
  switch (resolve(p, options.backend)) {
    case Backend::reference:
      backends::reference::backward(p, dout_rows, grads);
      return;
    case Backend::cpu:
      backends::cpu::backward(p, out_rows, dout_rows, lse_view, grads, options.num_threads);
      return;
#ifdef MOBA_WITH_CUDA
    case Backend::cuda:
      backends::cuda::backward(p, out_rows, dout_rows, lse_view, grads, options.stream,
                               options.deterministic);
      return;
#endif
    default:
      fail(Status::internal, "backward: no backend resolved");
  }
}

void routing(const Inputs& inputs, const Config& config, const TensorView& selected,
             const ExecOptions& options) {
  const core::Problem p = core::make_problem(inputs, config);
  check_options(options);
  const int64_t width = core::min_routing_width(p);
  if (!selected.present() && selected.numel() != 0)
    fail(Status::invalid_argument, "selected: null data pointer");
  if (selected.ndim != 3 || selected.shape[0] != p.total_q || selected.shape[1] != p.heads_q ||
      selected.shape[2] < width)
    fail(Status::invalid_argument, "selected: expected shape [" + std::to_string(p.total_q) + ", " +
                                       std::to_string(p.heads_q) +
                                       ", W] with W >= " + std::to_string(width));
  if (selected.dtype != DType::int32)
    fail(Status::invalid_argument,
         std::string("selected: expected dtype int32, got ") + dtype_name(selected.dtype));
  if (!(selected.device == p.device))
    fail(Status::invalid_argument, "selected: must be on the same device as q");
  if (selected.strides[2] != 1 && selected.shape[2] > 1)
    fail(Status::unsupported, "selected: the last dimension must be contiguous (stride 1)");
  core::check_no_overlap(selected, "selected",
                         {{&inputs.q, "q"},
                          {&inputs.k, "k"},
                          {&inputs.v, "v"},
                          {&inputs.cu_seqlens_q, "cu_seqlens_q"},
                          {&inputs.cu_seqlens_k, "cu_seqlens_k"}});
  const backends::Selection sel{static_cast<int32_t*>(selected.data), selected.strides[0],
                                selected.strides[1], selected.shape[2]};
  switch (resolve(p, options.backend)) {
    case Backend::reference:
      backends::reference::routing(p, sel);
      return;
    case Backend::cpu:
      backends::cpu::routing(p, sel, options.num_threads);
      return;
#ifdef MOBA_WITH_CUDA
    case Backend::cuda:
      backends::cuda::routing(p, sel, options.stream);
      return;
#endif
    default:
      fail(Status::internal, "routing: no backend resolved");
  }
}

}  // namespace moba
