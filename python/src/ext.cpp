// moba._native: the public C++ API of moba (include/moba/moba.hpp) exposed to
// Python through nanobind. Tensors cross the boundary as DLPack views, so the
// module links against no framework: the torch layer (python/moba/_ops.py)
// hands over torch tensors, but any DLPack producer works.
//
// Every function takes its outputs preallocated by the caller (the torch layer
// owns all memory, as its allocator and streams must be used), validates
// nothing the library does not already validate, and releases the GIL while
// the library computes.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <optional>
#include <string>

#include "moba/kv_cache.hpp"
#include "moba/moba.hpp"

namespace nb = nanobind;

namespace {

using Array = nb::ndarray<nb::ro>;
using MutableArray = nb::ndarray<>;

[[noreturn]] void invalid(const std::string& message) {
  throw moba::Error(moba::Status::invalid_argument, "moba: " + message);
}

// A DLPack dtype spelled as torch and NumPy do ("float64", "int64", "bool").
std::string dlpack_name(const nb::dlpack::dtype& dtype) {
  using Code = nb::dlpack::dtype_code;
  std::string kind;
  switch (static_cast<Code>(dtype.code)) {
    case Code::Int:
      kind = "int";
      break;
    case Code::UInt:
      kind = "uint";
      break;
    case Code::Float:
      kind = "float";
      break;
    case Code::Bfloat:
      kind = "bfloat";
      break;
    case Code::Complex:
      kind = "complex";
      break;
    case Code::Bool:
      return "bool";
    default:
      kind = "dlpack_code" + std::to_string(dtype.code) + "_";
      break;
  }
  std::string name = kind + std::to_string(dtype.bits);
  if (dtype.lanes != 1) name += "x" + std::to_string(dtype.lanes);
  return name;
}

moba::DType dtype_of(const nb::dlpack::dtype& dtype, const char* name) {
  using Code = nb::dlpack::dtype_code;
  if (dtype.lanes == 1) {
    if (dtype.code == static_cast<uint8_t>(Code::Float) && dtype.bits == 32)
      return moba::DType::float32;
    if (dtype.code == static_cast<uint8_t>(Code::Float) && dtype.bits == 16)
      return moba::DType::float16;
    if (dtype.code == static_cast<uint8_t>(Code::Bfloat) && dtype.bits == 16)
      return moba::DType::bfloat16;
    if (dtype.code == static_cast<uint8_t>(Code::Int) && dtype.bits == 32)
      return moba::DType::int32;
  }
  throw moba::Error(moba::Status::unsupported,
                    std::string("moba: ") + name + ": unsupported dtype " + dlpack_name(dtype) +
                        "; expected float32, float16, bfloat16 or int32");
}

moba::Device device_of(int device_type, int device_id, const char* name) {
  switch (device_type) {
    case nb::device::cpu::value:
    // Pinned host memory is ordinary host memory to the CPU backends.
    case nb::device::cuda_host::value:
      return {moba::DeviceType::cpu, 0};
    case nb::device::cuda::value:
      return {moba::DeviceType::cuda, device_id};
    default:
      throw moba::Error(moba::Status::unsupported,
                        std::string("moba: ") + name + ": unsupported DLPack device type " +
                            std::to_string(device_type) + "; expected a CPU or CUDA tensor");
  }
}

template <class A>
moba::TensorView view_of(const A& array, const char* name) {
  const auto ndim = static_cast<int>(array.ndim());
  if (ndim > moba::kMaxDims)
    invalid(std::string(name) + ": expected at most " + std::to_string(moba::kMaxDims) +
            " dimensions, got " + std::to_string(ndim));
  moba::TensorView view;
  view.data = const_cast<void*>(static_cast<const void*>(array.data()));
  view.dtype = dtype_of(array.dtype(), name);
  view.ndim = ndim;
  view.device = device_of(array.device_type(), array.device_id(), name);
  // DLPack before 1.0 allowed null strides for row-major tensors.
  int64_t stride = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    const auto i = static_cast<size_t>(d);
    view.shape[i] = static_cast<int64_t>(array.shape(i));
    view.strides[i] = array.stride_ptr() != nullptr ? array.stride(i) : stride;
    stride *= view.shape[i];
  }
  return view;
}

moba::Inputs inputs_of(const Array& q, const Array& k, const Array& v, const Array& cu_seqlens_q,
                       const Array& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  moba::Inputs inputs;
  inputs.q = view_of(q, "q");
  inputs.k = view_of(k, "k");
  inputs.v = view_of(v, "v");
  inputs.cu_seqlens_q = view_of(cu_seqlens_q, "cu_seqlens_q");
  inputs.cu_seqlens_k = view_of(cu_seqlens_k, "cu_seqlens_k");
  inputs.max_seqlen_q = max_seqlen_q;
  inputs.max_seqlen_k = max_seqlen_k;
  return inputs;
}

moba::Config config_of(int64_t block_size, int64_t top_k, std::optional<float> softmax_scale,
                       bool gqa_shared_routing) {
  moba::Config config;
  config.block_size = block_size;
  config.top_k = top_k;
  config.softmax_scale = softmax_scale;
  config.gqa_shared_routing = gqa_shared_routing;
  return config;
}

moba::ExecOptions options_of(const std::string& backend, int num_threads, uintptr_t stream,
                             bool deterministic) {
  moba::ExecOptions options;
  options.backend = moba::parse_backend(backend);
  if (num_threads < 0) invalid("num_threads: expected >= 0, got " + std::to_string(num_threads));
  options.num_threads = num_threads;
  options.stream = reinterpret_cast<void*>(stream);
  options.deterministic = deterministic;
  return options;
}

void forward(const Array& q, const Array& k, const Array& v, const Array& cu_seqlens_q,
             const Array& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
             const MutableArray& out, const std::optional<MutableArray>& lse, int64_t block_size,
             int64_t top_k, std::optional<float> softmax_scale, bool gqa_shared_routing,
             const std::string& backend, int num_threads, uintptr_t stream) {
  const moba::Inputs inputs =
      inputs_of(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const moba::Config config = config_of(block_size, top_k, softmax_scale, gqa_shared_routing);
  const moba::ExecOptions options = options_of(backend, num_threads, stream, false);
  const moba::TensorView out_view = view_of(out, "out");
  const moba::TensorView lse_view = lse ? view_of(*lse, "lse") : moba::TensorView{};
  nb::gil_scoped_release release;
  moba::forward(inputs, config, out_view, lse_view, options);
}

void backward(const Array& q, const Array& k, const Array& v, const Array& cu_seqlens_q,
              const Array& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
              const Array& out, const Array& dout, const Array& lse, const MutableArray& dq,
              const MutableArray& dk, const MutableArray& dv, int64_t block_size, int64_t top_k,
              std::optional<float> softmax_scale, bool gqa_shared_routing,
              const std::string& backend, int num_threads, uintptr_t stream, bool deterministic) {
  const moba::Inputs inputs =
      inputs_of(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const moba::Config config = config_of(block_size, top_k, softmax_scale, gqa_shared_routing);
  const moba::ExecOptions options = options_of(backend, num_threads, stream, deterministic);
  const moba::TensorView out_view = view_of(out, "out");
  const moba::TensorView dout_view = view_of(dout, "dout");
  const moba::TensorView lse_view = view_of(lse, "lse");
  const moba::TensorView dq_view = view_of(dq, "dq");
  const moba::TensorView dk_view = view_of(dk, "dk");
  const moba::TensorView dv_view = view_of(dv, "dv");
  nb::gil_scoped_release release;
  moba::backward(inputs, config, out_view, dout_view, lse_view, dq_view, dk_view, dv_view, options);
}

void routing(const Array& q, const Array& k, const Array& cu_seqlens_q, const Array& cu_seqlens_k,
             int64_t max_seqlen_q, int64_t max_seqlen_k, const MutableArray& selected,
             int64_t block_size, int64_t top_k, bool gqa_shared_routing, const std::string& backend,
             int num_threads, uintptr_t stream) {
  // Routing reads no values; k stands in for v, which the API validates like k.
  const moba::Inputs inputs =
      inputs_of(q, k, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const moba::Config config = config_of(block_size, top_k, std::nullopt, gqa_shared_routing);
  const moba::ExecOptions options = options_of(backend, num_threads, stream, false);
  const moba::TensorView selected_view = view_of(selected, "selected");
  nb::gil_scoped_release release;
  moba::routing(inputs, config, selected_view, options);
}

int64_t routing_width(int64_t max_seqlen_k, int64_t block_size, int64_t top_k) {
  return moba::routing_width(max_seqlen_k, config_of(block_size, top_k, std::nullopt, false));
}

bool backend_available(const std::string& name) {
  return moba::backend_available(moba::parse_backend(name));
}

// The KV cache (include/moba/kv_cache.hpp): all memory is the caller's.
moba::KVCache cache_of(const MutableArray& k, const MutableArray& v,
                       const std::optional<Array>& page_table, const MutableArray& seqlens,
                       const MutableArray& block_sums, int64_t block_size) {
  moba::KVCache cache;
  cache.k = view_of(k, "cache.k");
  cache.v = view_of(v, "cache.v");
  if (page_table) cache.page_table = view_of(*page_table, "cache.page_table");
  cache.seqlens = view_of(seqlens, "cache.seqlens");
  cache.block_sums = view_of(block_sums, "cache.block_sums");
  cache.block_size = block_size;
  return cache;
}

void kv_cache_append(const MutableArray& k, const MutableArray& v,
                     const std::optional<Array>& page_table, const MutableArray& seqlens,
                     const MutableArray& block_sums, int64_t block_size, const Array& k_new,
                     const Array& v_new, const Array& cu_seqlens_new, int num_threads,
                     uintptr_t stream) {
  const moba::KVCache cache = cache_of(k, v, page_table, seqlens, block_sums, block_size);
  const moba::TensorView kn = view_of(k_new, "k_new"), vn = view_of(v_new, "v_new");
  const moba::TensorView cu = view_of(cu_seqlens_new, "cu_seqlens_new");
  const moba::ExecOptions options = options_of("auto", num_threads, stream, false);
  nb::gil_scoped_release release;
  moba::kv_cache_append(cache, kn, vn, cu, options);
}

void kv_cache_decode(const MutableArray& k, const MutableArray& v,
                     const std::optional<Array>& page_table, const MutableArray& seqlens,
                     const MutableArray& block_sums, int64_t block_size, const Array& q,
                     const Array& cu_seqlens_q, const MutableArray& out,
                     const std::optional<MutableArray>& lse, int64_t top_k,
                     std::optional<float> softmax_scale, bool gqa_shared_routing, int num_threads,
                     uintptr_t stream) {
  const moba::KVCache cache = cache_of(k, v, page_table, seqlens, block_sums, block_size);
  const moba::TensorView qv = view_of(q, "q"), cu = view_of(cu_seqlens_q, "cu_seqlens_q");
  const moba::Config config = config_of(block_size, top_k, softmax_scale, gqa_shared_routing);
  const moba::TensorView out_view = view_of(out, "out");
  const moba::TensorView lse_view = lse ? view_of(*lse, "lse") : moba::TensorView{};
  const moba::ExecOptions options = options_of("auto", num_threads, stream, false);
  nb::gil_scoped_release release;
  moba::kv_cache_decode(cache, qv, cu, config, out_view, lse_view, options);
}

void kv_cache_routing(const MutableArray& k, const MutableArray& v,
                      const std::optional<Array>& page_table, const MutableArray& seqlens,
                      const MutableArray& block_sums, int64_t block_size, const Array& q,
                      const Array& cu_seqlens_q, const MutableArray& selected, int64_t top_k,
                      bool gqa_shared_routing, int num_threads, uintptr_t stream) {
  const moba::KVCache cache = cache_of(k, v, page_table, seqlens, block_sums, block_size);
  const moba::TensorView qv = view_of(q, "q"), cu = view_of(cu_seqlens_q, "cu_seqlens_q");
  const moba::Config config = config_of(block_size, top_k, std::nullopt, gqa_shared_routing);
  const moba::TensorView sel = view_of(selected, "selected");
  const moba::ExecOptions options = options_of("auto", num_threads, stream, false);
  nb::gil_scoped_release release;
  moba::kv_cache_routing(cache, qv, cu, config, sel, options);
}

int64_t kv_cache_bytes_read(const MutableArray& k, const MutableArray& v,
                            const std::optional<Array>& page_table, const MutableArray& seqlens,
                            const MutableArray& block_sums, int64_t block_size, const Array& q,
                            const Array& cu_seqlens_q, int64_t top_k, bool gqa_shared_routing,
                            int num_threads, uintptr_t stream) {
  const moba::KVCache cache = cache_of(k, v, page_table, seqlens, block_sums, block_size);
  const moba::TensorView qv = view_of(q, "q"), cu = view_of(cu_seqlens_q, "cu_seqlens_q");
  const moba::Config config = config_of(block_size, top_k, std::nullopt, gqa_shared_routing);
  const moba::ExecOptions options = options_of("auto", num_threads, stream, false);
  nb::gil_scoped_release release;
  return moba::kv_cache_bytes_read(cache, qv, cu, config, options);
}

}  // namespace

NB_MODULE(_native, m) {
  m.doc() = "Native MoBA kernels (the moba C++ library) over DLPack tensors.";

  // moba::Error carries a category: bad arguments and unsupported inputs are
  // the caller's to fix (ValueError); the rest are failures to run.
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const moba::Error& e) {
      switch (e.status()) {
        case moba::Status::invalid_argument:
        case moba::Status::unsupported:
          PyErr_SetString(PyExc_ValueError, e.what());
          break;
        default:
          PyErr_SetString(PyExc_RuntimeError, e.what());
          break;
      }
    }
  });

  m.def("forward", &forward, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("cu_seqlens_q"),
        nb::arg("cu_seqlens_k"), nb::arg("max_seqlen_q"), nb::arg("max_seqlen_k"), nb::arg("out"),
        nb::arg("lse").none(), nb::arg("block_size"), nb::arg("top_k"),
        nb::arg("softmax_scale").none(), nb::arg("gqa_shared_routing"), nb::arg("backend"),
        nb::arg("num_threads"), nb::arg("stream"),
        "MoBA forward into preallocated out [total_q, Hq, D] and lse [Hq, total_q] (optional).");
  m.def("backward", &backward, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("cu_seqlens_q"),
        nb::arg("cu_seqlens_k"), nb::arg("max_seqlen_q"), nb::arg("max_seqlen_k"), nb::arg("out"),
        nb::arg("dout"), nb::arg("lse"), nb::arg("dq"), nb::arg("dk"), nb::arg("dv"),
        nb::arg("block_size"), nb::arg("top_k"), nb::arg("softmax_scale").none(),
        nb::arg("gqa_shared_routing"), nb::arg("backend"), nb::arg("num_threads"),
        nb::arg("stream"), nb::arg("deterministic"), "MoBA backward into preallocated dq, dk, dv.");
  m.def("routing", &routing, nb::arg("q"), nb::arg("k"), nb::arg("cu_seqlens_q"),
        nb::arg("cu_seqlens_k"), nb::arg("max_seqlen_q"), nb::arg("max_seqlen_k"),
        nb::arg("selected"), nb::arg("block_size"), nb::arg("top_k"), nb::arg("gqa_shared_routing"),
        nb::arg("backend"), nb::arg("num_threads"), nb::arg("stream"),
        "The selected blocks into preallocated selected [total_q, Hq, W] int32.");
  m.def("routing_width", &routing_width, nb::arg("max_seqlen_k"), nb::arg("block_size"),
        nb::arg("top_k"), "The smallest W accepted by routing().");
  m.def("backend_available", &backend_available, nb::arg("name"),
        "Whether the backend ('auto', 'reference', 'cpu' or 'cuda') can run here.");
  m.def("kv_cache_append", &kv_cache_append, nb::arg("k"), nb::arg("v"),
        nb::arg("page_table").none(), nb::arg("seqlens"), nb::arg("block_sums"),
        nb::arg("block_size"), nb::arg("k_new"), nb::arg("v_new"), nb::arg("cu_seqlens_new"),
        nb::arg("num_threads"), nb::arg("stream"),
        "Appends rows to a KV cache, updating seqlens and block sums.");
  m.def("kv_cache_decode", &kv_cache_decode, nb::arg("k"), nb::arg("v"),
        nb::arg("page_table").none(), nb::arg("seqlens"), nb::arg("block_sums"),
        nb::arg("block_size"), nb::arg("q"), nb::arg("cu_seqlens_q"), nb::arg("out"),
        nb::arg("lse").none(), nb::arg("top_k"), nb::arg("softmax_scale").none(),
        nb::arg("gqa_shared_routing"), nb::arg("num_threads"), nb::arg("stream"),
        "MoBA attention of the last positions of each sequence against a KV cache.");
  m.def("kv_cache_routing", &kv_cache_routing, nb::arg("k"), nb::arg("v"),
        nb::arg("page_table").none(), nb::arg("seqlens"), nb::arg("block_sums"),
        nb::arg("block_size"), nb::arg("q"), nb::arg("cu_seqlens_q"), nb::arg("selected"),
        nb::arg("top_k"), nb::arg("gqa_shared_routing"), nb::arg("num_threads"), nb::arg("stream"),
        "The blocks kv_cache_decode selects, into selected [total_q, Hq, W] int32.");
  m.def("kv_cache_bytes_read", &kv_cache_bytes_read, nb::arg("k"), nb::arg("v"),
        nb::arg("page_table").none(), nb::arg("seqlens"), nb::arg("block_sums"),
        nb::arg("block_size"), nb::arg("q"), nb::arg("cu_seqlens_q"), nb::arg("top_k"),
        nb::arg("gqa_shared_routing"), nb::arg("num_threads"), nb::arg("stream"),
        "Bytes of K and V kv_cache_decode reads for these queries (synchronizes a CUDA stream).");
  m.def("version", &moba::version, "Version of the moba C++ library.");
#ifdef MOBA_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
