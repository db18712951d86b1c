#include "workload.hpp"

#include <algorithm>
#include <climits>
#include <cmath>
#include <numbers>
#include <thread>

#include "errors.hpp"
#include "npy.hpp"
#include "safetensors.hpp"

namespace moba::cli {
namespace {

// splitmix64: a tiny, well-mixed generator. Random inputs only need to be
// reproducible and normal-looking, and this one can be seeded per chunk.
struct SplitMix64 {
  uint64_t state;
  uint64_t next() noexcept {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in (0, 1]: never 0, so log() below stays finite.
  double uniform() noexcept { return static_cast<double>((next() >> 11) + 1) * 0x1.0p-53; }
};

int resolve_threads(int threads) {
  if (threads > 0) return threads;
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

std::vector<int32_t> cumulative(const std::vector<int64_t>& lens, const char* what) {
  std::vector<int32_t> cu{0};
  int64_t total = 0;
  for (int64_t len : lens) {
    if (len < 0)
      throw UsageError(std::string(what) + ": sequence lengths must be >= 0, got " +
                       std::to_string(len));
    total += len;
    if (total > INT32_MAX)
      throw UsageError(std::string(what) + ": more than 2^31 - 1 tokens in total");
    cu.push_back(static_cast<int32_t>(total));
  }
  return cu;
}

std::vector<int64_t> differences(const std::vector<int32_t>& cu) {
  std::vector<int64_t> lens;
  for (size_t i = 1; i < cu.size(); ++i) lens.push_back(cu[i] - cu[i - 1]);
  return lens;
}

void finish_geometry(Workload& w) {
  w.total_q = w.cu_q.back();
  w.total_k = w.cu_k.back();
  w.max_len_q = w.max_len_k = 0;
  for (int64_t l : w.lens_q()) w.max_len_q = std::max(w.max_len_q, l);
  for (int64_t l : w.lens_k()) w.max_len_k = std::max(w.max_len_k, l);
}

// cu_seqlens given on the command line for loaded [tokens, heads, dim] data.
std::vector<int32_t> checked_cu_seqlens(const std::vector<int64_t>& cu, int64_t total,
                                        const std::string& option, const std::string& tensor) {
  if (cu.size() < 2)
    throw UsageError(option + ": expected at least 2 entries (0 and the total), got " +
                     std::to_string(cu.size()));
  if (cu.front() != 0)
    throw UsageError(option + ": must start at 0, got " + std::to_string(cu.front()));
  std::vector<int32_t> out;
  for (size_t i = 0; i < cu.size(); ++i) {
    if (i > 0 && cu[i] < cu[i - 1])
      throw UsageError(option + ": must be non-decreasing, but entry " + std::to_string(i) + " (" +
                       std::to_string(cu[i]) + ") < entry " + std::to_string(i - 1) + " (" +
                       std::to_string(cu[i - 1]) + ")");
    if (cu[i] > INT32_MAX) throw UsageError(option + ": entries must fit in int32");
    out.push_back(static_cast<int32_t>(cu[i]));
  }
  if (cu.back() != total)
    throw UsageError(option + ": last entry must equal the " + std::to_string(total) +
                     " tokens of " + tensor + ", got " + std::to_string(cu.back()));
  return out;
}

// Loaded q, k, v in either layout, converted to the run's dtype and packed.
Workload from_arrays(Array q, Array k, Array v, const std::string& q_label,
                     const std::string& k_label, const std::string& v_label,
                     const WorkloadOptions& o, const std::string& source) {
  const std::string layouts = "[tokens, heads, head_dim] or [batch, tokens, heads, head_dim]";
  if (q.shape.size() != 3 && q.shape.size() != 4)
    throw UsageError(q_label + ": expected shape " + layouts + ", got " + shape_string(q.shape));
  for (const auto& [a, label] : {std::pair{&k, &k_label}, std::pair{&v, &v_label}}) {
    if (a->shape.size() != q.shape.size())
      throw UsageError(*label + ": expected " + std::to_string(q.shape.size()) +
                       " dimensions like " + q_label + ", got shape " + shape_string(a->shape));
  }
  if (v.shape != k.shape)
    throw UsageError(v_label + ": expected shape " + shape_string(k.shape) + " (that of " +
                     k_label + "), got " + shape_string(v.shape));
  if (q.shape.back() != k.shape.back())
    throw UsageError(k_label + ": head_dim " + std::to_string(k.shape.back()) + " differs from " +
                     q_label + "'s " + std::to_string(q.shape.back()));

  Workload w;
  w.source = source;
  w.dtype = !o.dtype.empty()
                ? parse_dtype(o.dtype)
                : (q.type == ElementType::float64 ? DType::float32 : library_dtype(q.type));
  w.out_shape = q.shape;
  const bool batched = q.shape.size() == 4;
  if (batched) {
    if (!o.cu_seqlens.empty() || !o.cu_seqlens_k.empty())
      throw UsageError(
          "--cu-seqlens: only for [tokens, heads, head_dim] inputs; 4-D inputs are a batch of "
          "equal lengths");
    if (k.shape[0] != q.shape[0])
      throw UsageError(k_label + ": batch " + std::to_string(k.shape[0]) + " differs from " +
                       q_label + "'s " + std::to_string(q.shape[0]));
    w.cu_q = cumulative(std::vector<int64_t>(static_cast<size_t>(q.shape[0]), q.shape[1]),
                        q_label.c_str());
    w.cu_k = cumulative(std::vector<int64_t>(static_cast<size_t>(k.shape[0]), k.shape[1]),
                        k_label.c_str());
    // Merge batch and tokens: the bytes are already in packed order.
    q.shape = {q.shape[0] * q.shape[1], q.shape[2], q.shape[3]};
    k.shape = {k.shape[0] * k.shape[1], k.shape[2], k.shape[3]};
    v.shape = k.shape;
  } else {
    if (o.cu_seqlens.empty()) {
      if (!o.cu_seqlens_k.empty()) throw UsageError("--cu-seqlens-k: needs --cu-seqlens");
      w.cu_q = cumulative({q.shape[0]}, q_label.c_str());
      w.cu_k = cumulative({k.shape[0]}, k_label.c_str());
    } else {
      w.cu_q = checked_cu_seqlens(o.cu_seqlens, q.shape[0], "--cu-seqlens", q_label);
      if (o.cu_seqlens_k.empty() && k.shape[0] != q.shape[0])
        throw UsageError("--cu-seqlens: " + k_label + " has " + std::to_string(k.shape[0]) +
                         " tokens but " + q_label + " has " + std::to_string(q.shape[0]) +
                         "; pass --cu-seqlens-k for the keys");
      w.cu_k = o.cu_seqlens_k.empty()
                   ? w.cu_q
                   : checked_cu_seqlens(o.cu_seqlens_k, k.shape[0], "--cu-seqlens-k", k_label);
      if (w.cu_k.size() != w.cu_q.size())
        throw UsageError("--cu-seqlens-k: expected " + std::to_string(w.cu_q.size()) +
                         " entries like --cu-seqlens, got " + std::to_string(w.cu_k.size()));
    }
  }
  const ElementType type = element_type(w.dtype);
  w.q = convert(q, type);
  w.k = convert(k, type);
  w.v = convert(v, type);
  w.heads_q = w.q.shape[1];
  w.heads_kv = w.k.shape[1];
  w.head_dim = w.q.shape[2];
  finish_geometry(w);
  return w;
}

}  // namespace

DType parse_dtype(const std::string& name, const std::string& option) {
  if (name == "float32" || name == "fp32") return DType::float32;
  if (name == "float16" || name == "fp16") return DType::float16;
  if (name == "bfloat16" || name == "bf16") return DType::bfloat16;
  throw UsageError(option + ": unknown dtype '" + name +
                   "'; expected float32, float16 or bfloat16");
}

std::vector<int64_t> Workload::lens_q() const {
  return differences(cu_q);
}
std::vector<int64_t> Workload::lens_k() const {
  return differences(cu_k);
}

void fill_normal(Array& array, uint64_t seed, uint64_t stream, int threads, double stddev) {
  // Fixed-size chunks, each with its own generator, make the values
  // independent of how chunks are spread over threads.
  constexpr int64_t kChunk = 1 << 16;
  const int64_t n = array.numel();
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const auto fill_chunk = [&](int64_t c) {
    SplitMix64 rng{seed * 0x9e3779b97f4a7c15ull ^ (stream + 1) * 0xd1b54a32d192ed03ull ^
                   static_cast<uint64_t>(c) * 0xa0761d6478bd642full};
    rng.next();
    const int64_t end = std::min(n, (c + 1) * kChunk);
    for (int64_t i = c * kChunk; i < end; i += 2) {
      // Box-Muller: two independent normals per pair of uniforms.
      const double r = stddev * std::sqrt(-2.0 * std::log(rng.uniform()));
      const double t = 2.0 * std::numbers::pi * rng.uniform();
      array.set(i, r * std::cos(t));
      if (i + 1 < end) array.set(i + 1, r * std::sin(t));
    }
  };
  const int workers = static_cast<int>(std::min<int64_t>(resolve_threads(threads), chunks));
  if (workers <= 1) {
    for (int64_t c = 0; c < chunks; ++c) fill_chunk(c);
    return;
  }
  std::vector<std::jthread> pool;
  for (int t = 0; t < workers; ++t)
    pool.emplace_back([&, t] {
      for (int64_t c = t; c < chunks; c += workers) fill_chunk(c);
    });
}

Workload generate_workload(const std::vector<int64_t>& lens_q, const std::vector<int64_t>& lens_k,
                           int64_t heads_q, int64_t heads_kv, int64_t head_dim, DType dtype,
                           uint64_t seed, int threads) {
  if (heads_q < 1) throw UsageError("--heads-q: expected >= 1, got " + std::to_string(heads_q));
  if (heads_kv < 1) throw UsageError("--heads-kv: expected >= 1, got " + std::to_string(heads_kv));
  if (head_dim < 1) throw UsageError("--head-dim: expected >= 1, got " + std::to_string(head_dim));
  if (!lens_k.empty() && lens_k.size() != lens_q.size())
    throw UsageError("lens_k: expected one length per sequence");
  Workload w;
  w.dtype = dtype;
  w.source = "random";
  w.heads_q = heads_q;
  w.heads_kv = heads_kv;
  w.head_dim = head_dim;
  w.cu_q = cumulative(lens_q, "--seqlens");
  w.cu_k = lens_k.empty() ? w.cu_q : cumulative(lens_k, "lens_k");
  finish_geometry(w);
  w.out_shape = {w.total_q, heads_q, head_dim};
  const ElementType type = element_type(dtype);
  w.q = Array(type, {w.total_q, heads_q, head_dim});
  w.k = Array(type, {w.total_k, heads_kv, head_dim});
  w.v = Array(type, {w.total_k, heads_kv, head_dim});
  fill_normal(w.q, seed, 0, threads);
  fill_normal(w.k, seed, 1, threads);
  fill_normal(w.v, seed, 2, threads);
  return w;
}

Workload make_workload(const WorkloadOptions& o) {
  const bool npy = !o.q_path.empty() || !o.k_path.empty() || !o.v_path.empty();
  if (npy && !o.safetensors_path.empty())
    throw UsageError("--safetensors: cannot be combined with --q/--k/--v");
  if (npy) {
    if (o.q_path.empty() || o.k_path.empty() || o.v_path.empty())
      throw UsageError("--q/--k/--v: all three .npy files are needed");
    // One at a time, so that errors name the first bad file.
    Array q = read_npy(o.q_path);
    Array k = read_npy(o.k_path);
    Array v = read_npy(o.v_path);
    return from_arrays(std::move(q), std::move(k), std::move(v), o.q_path, o.k_path, o.v_path, o,
                       "npy");
  }
  if (!o.safetensors_path.empty()) {
    auto tensors = read_safetensors(o.safetensors_path, {o.q_name, o.k_name, o.v_name});
    const auto label = [&](const std::string& name) {
      return o.safetensors_path + " tensor '" + name + "'";
    };
    return from_arrays(tensors[o.q_name], tensors[o.k_name], tensors[o.v_name], label(o.q_name),
                       label(o.k_name), label(o.v_name), o, "safetensors");
  }
  if (!o.cu_seqlens.empty() || !o.cu_seqlens_k.empty())
    throw UsageError("--cu-seqlens: only for loaded inputs; use --seqlens for generated ones");
  std::vector<int64_t> lens = o.seqlens;
  if (lens.empty()) {
    if (o.tokens < 0) throw UsageError("--tokens: expected >= 0, got " + std::to_string(o.tokens));
    if (o.batch < 1) throw UsageError("--batch: expected >= 1, got " + std::to_string(o.batch));
    lens.assign(static_cast<size_t>(o.batch), o.tokens);
  }
  const DType dtype = !o.dtype.empty() ? parse_dtype(o.dtype) : DType::float32;
  return generate_workload(lens, {}, o.heads_q, o.heads_kv, o.head_dim, dtype, o.seed, o.threads);
}

PlacedTensor make_tensor(Placement placement, DType dtype, std::initializer_list<int64_t> shape) {
  int64_t numel = 1;
  for (int64_t s : shape) numel *= s;
  PlacedTensor t{Buffer(placement, static_cast<size_t>(numel * dtype_size(dtype))), {}};
  t.view = TensorView::contiguous(t.buffer.data(), dtype, shape, device_of(placement));
  return t;
}

PlacedTensor place_array(Placement placement, const Array& array, DType dtype,
                         std::initializer_list<int64_t> shape) {
  PlacedTensor t = make_tensor(placement, dtype, shape);
  if (array.bytes.size() != t.buffer.size())
    throw Error(Status::internal, "moba: place_array: " + std::to_string(array.bytes.size()) +
                                      " bytes for a " + std::to_string(t.buffer.size()) +
                                      "-byte tensor");
  t.buffer.upload(array.data(), array.bytes.size());
  return t;
}

Array download(const PlacedTensor& tensor, ElementType type, std::vector<int64_t> shape) {
  Array a(type, std::move(shape));
  if (a.bytes.size() != tensor.buffer.size())
    throw Error(Status::internal, "moba: download: size mismatch");
  tensor.buffer.download(a.data(), a.bytes.size());
  return a;
}

PlacedWorkload place(const Workload& w, Placement placement) {
  PlacedWorkload p;
  p.placement = placement;
  const Device device = device_of(placement);
  const auto put = [&](const void* data, size_t bytes) {
    Buffer b(placement, bytes);
    b.upload(data, bytes);
    return b;
  };
  p.q = put(w.q.data(), w.q.bytes.size());
  p.k = put(w.k.data(), w.k.bytes.size());
  p.v = put(w.v.data(), w.v.bytes.size());
  p.cu_q = put(w.cu_q.data(), w.cu_q.size() * sizeof(int32_t));
  p.cu_k = put(w.cu_k.data(), w.cu_k.size() * sizeof(int32_t));
  const int64_t n = static_cast<int64_t>(w.cu_q.size());
  p.inputs.q =
      TensorView::contiguous(p.q.data(), w.dtype, {w.total_q, w.heads_q, w.head_dim}, device);
  p.inputs.k =
      TensorView::contiguous(p.k.data(), w.dtype, {w.total_k, w.heads_kv, w.head_dim}, device);
  p.inputs.v =
      TensorView::contiguous(p.v.data(), w.dtype, {w.total_k, w.heads_kv, w.head_dim}, device);
  p.inputs.cu_seqlens_q = TensorView::contiguous(p.cu_q.data(), DType::int32, {n}, device);
  p.inputs.cu_seqlens_k = TensorView::contiguous(p.cu_k.data(), DType::int32, {n}, device);
  // Device-resident cu_seqlens cannot be read by the library; pass the bounds.
  p.inputs.max_seqlen_q = std::max<int64_t>(w.max_len_q, 1);
  p.inputs.max_seqlen_k = std::max<int64_t>(w.max_len_k, 1);
  return p;
}

}  // namespace moba::cli
