#include "core/problem.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <utility>

#include "core/routing.hpp"

namespace moba::core {

void fail(Status status, const std::string& message) {
  throw Error(status, "moba: " + message);
}

namespace {

std::string shape_string(const TensorView& t) {
  std::ostringstream s;
  s << '[';
  for (int i = 0; i < t.ndim; ++i) s << (i ? ", " : "") << t.shape[i];
  s << ']';
  return s.str();
}

std::string device_string(const Device& d) {
  return d.type == DeviceType::cpu ? std::string("cpu") : "cuda:" + std::to_string(d.index);
}

bool is_float(DType d) {
  return d == DType::float32 || d == DType::float16 || d == DType::bfloat16;
}

void check_present(const TensorView& t, const char* name) {
  if (t.data == nullptr && t.numel() != 0)
    fail(Status::invalid_argument, std::string(name) + ": null data pointer");
  if (t.ndim < 0 || t.ndim > kMaxDims)
    fail(Status::invalid_argument,
         std::string(name) + ": ndim " + std::to_string(t.ndim) + " out of range");
  for (int i = 0; i < t.ndim; ++i) {
    if (t.shape[i] < 0)
      fail(Status::invalid_argument,
           std::string(name) + ": negative size in shape " + shape_string(t));
    if (t.strides[i] < 0)
      fail(Status::unsupported, std::string(name) + ": negative strides are not supported");
  }
}

void check_ndim(const TensorView& t, const char* name, int ndim, const char* layout) {
  if (t.ndim != ndim)
    fail(Status::invalid_argument, std::string(name) + ": expected " + std::to_string(ndim) +
                                       " dimensions " + layout + ", got shape " + shape_string(t));
}

// Distinct elements of an output must not share memory.
void check_no_self_alias(const TensorView& t, const char* name) {
  if (t.numel() == 0) return;  // no elements, nothing to alias
  std::array<int, kMaxDims> order{};
  int n = 0;
  for (int i = 0; i < t.ndim; ++i)
    if (t.shape[i] > 1) order[n++] = i;
  for (int i = 1; i < n; ++i)  // insertion sort by stride: n <= 4
    for (int j = i; j > 0 && t.strides[order[j]] < t.strides[order[j - 1]]; --j)
      std::swap(order[j], order[j - 1]);
  int64_t span = 1;
  for (int i = 0; i < n; ++i) {
    const int dim = order[i];
    if (t.strides[dim] < span)
      fail(Status::invalid_argument,
           std::string(name) + ": strides make distinct elements overlap");
    span = t.strides[dim] * (t.shape[dim] - 1) + span;
  }
}

std::pair<uintptr_t, uintptr_t> byte_range(const TensorView& t) {
  int64_t last = 0;
  for (int i = 0; i < t.ndim; ++i) last += (t.shape[i] - 1) * t.strides[i];
  const auto begin = reinterpret_cast<uintptr_t>(t.data);
  return {begin, begin + static_cast<uintptr_t>((last + 1) * dtype_size(t.dtype))};
}

Rows rows_of(const TensorView& t) {
  return Rows{t.data, t.dtype, t.strides[0], t.strides[1]};
}

std::vector<Sequence> read_cu_seqlens(const TensorView& cq, const TensorView& ck, int64_t total_q,
                                      int64_t total_k) {
  const int64_t n = cq.shape[0];
  const auto* pq = static_cast<const int32_t*>(cq.data);
  const auto* pk = static_cast<const int32_t*>(ck.data);
  const auto at = [](const int32_t* p, const TensorView& t, int64_t i) {
    return static_cast<int64_t>(p[i * t.strides[0]]);
  };
  if (at(pq, cq, 0) != 0)
    fail(Status::invalid_argument,
         "cu_seqlens_q: must start at 0, got " + std::to_string(at(pq, cq, 0)));
  if (at(pk, ck, 0) != 0)
    fail(Status::invalid_argument,
         "cu_seqlens_k: must start at 0, got " + std::to_string(at(pk, ck, 0)));
  std::vector<Sequence> seqs;
  seqs.reserve(static_cast<size_t>(n - 1));
  for (int64_t b = 0; b + 1 < n; ++b) {
    const int64_t q0 = at(pq, cq, b), q1 = at(pq, cq, b + 1);
    const int64_t k0 = at(pk, ck, b), k1 = at(pk, ck, b + 1);
    if (q1 < q0)
      fail(Status::invalid_argument, "cu_seqlens_q: must be non-decreasing, but entry " +
                                         std::to_string(b + 1) + " (" + std::to_string(q1) +
                                         ") < entry " + std::to_string(b) + " (" +
                                         std::to_string(q0) + ")");
    if (k1 < k0)
      fail(Status::invalid_argument, "cu_seqlens_k: must be non-decreasing, but entry " +
                                         std::to_string(b + 1) + " (" + std::to_string(k1) +
                                         ") < entry " + std::to_string(b) + " (" +
                                         std::to_string(k0) + ")");
    if (q1 > total_q)
      fail(Status::invalid_argument,
           "cu_seqlens_q: entry " + std::to_string(b + 1) + " (" + std::to_string(q1) +
               ") exceeds total_q = q.shape[0] = " + std::to_string(total_q));
    if (k1 > total_k)
      fail(Status::invalid_argument,
           "cu_seqlens_k: entry " + std::to_string(b + 1) + " (" + std::to_string(k1) +
               ") exceeds total_k = k.shape[0] = " + std::to_string(total_k));
    if (q1 - q0 > k1 - k0)
      fail(Status::invalid_argument,
           "cu_seqlens_q: sequence " + std::to_string(b) + " has " + std::to_string(q1 - q0) +
               " queries but only " + std::to_string(k1 - k0) +
               " keys; expected len_q <= len_k (queries are the last positions)");
    seqs.push_back(Sequence{q0, k0, q1 - q0, k1 - k0});
  }
  if (at(pq, cq, n - 1) != total_q)
    fail(Status::invalid_argument,
         "cu_seqlens_q: last entry must equal total_q = " + std::to_string(total_q) + ", got " +
             std::to_string(at(pq, cq, n - 1)));
  if (at(pk, ck, n - 1) != total_k)
    fail(Status::invalid_argument,
         "cu_seqlens_k: last entry must equal total_k = " + std::to_string(total_k) + ", got " +
             std::to_string(at(pk, ck, n - 1)));
  return seqs;
}

}  // namespace

Problem make_problem(const Inputs& in, const Config& config) {
  check_present(in.q, "q");
  check_present(in.k, "k");
  check_present(in.v, "v");
  check_present(in.cu_seqlens_q, "cu_seqlens_q");
  check_present(in.cu_seqlens_k, "cu_seqlens_k");
  check_ndim(in.q, "q", 3, "[total_q, Hq, D]");
  check_ndim(in.k, "k", 3, "[total_k, Hkv, D]");
  check_ndim(in.v, "v", 3, "[total_k, Hkv, D]");
  check_ndim(in.cu_seqlens_q, "cu_seqlens_q", 1, "[batch + 1]");
  check_ndim(in.cu_seqlens_k, "cu_seqlens_k", 1, "[batch + 1]");

  if (!is_float(in.q.dtype))
    fail(Status::unsupported, std::string("q: unsupported dtype ") + dtype_name(in.q.dtype) +
                                  "; expected float32, float16 or bfloat16");
  if (in.k.dtype != in.q.dtype)
    fail(Status::invalid_argument, std::string("k: dtype ") + dtype_name(in.k.dtype) +
                                       " differs from q's " + dtype_name(in.q.dtype));
  if (in.v.dtype != in.q.dtype)
    fail(Status::invalid_argument, std::string("v: dtype ") + dtype_name(in.v.dtype) +
                                       " differs from q's " + dtype_name(in.q.dtype));
  for (const auto* c : {&in.cu_seqlens_q, &in.cu_seqlens_k})
    if (c->dtype != DType::int32)
      fail(Status::invalid_argument,
           std::string(c == &in.cu_seqlens_q ? "cu_seqlens_q" : "cu_seqlens_k") +
               ": expected dtype int32, got " + dtype_name(c->dtype));

  Problem p;
  p.total_q = in.q.shape[0];
  p.heads_q = in.q.shape[1];
  p.head_dim = in.q.shape[2];
  p.total_k = in.k.shape[0];
  p.heads_kv = in.k.shape[1];
  if (in.k.shape[2] != p.head_dim)
    fail(Status::invalid_argument, "k: head dim " + std::to_string(in.k.shape[2]) +
                                       " differs from q's " + std::to_string(p.head_dim));
  if (in.v.shape[0] != p.total_k || in.v.shape[1] != p.heads_kv || in.v.shape[2] != p.head_dim)
    fail(Status::invalid_argument,
         "v: expected shape " + shape_string(in.k) + " (that of k), got " + shape_string(in.v));
  if (p.heads_q < 1)
    fail(Status::invalid_argument, "q: expected at least 1 head, got " + std::to_string(p.heads_q));
  if (p.heads_kv < 1)
    fail(Status::invalid_argument,
         "k: expected at least 1 head, got " + std::to_string(p.heads_kv));
  if (p.heads_q % p.heads_kv != 0)
    fail(Status::invalid_argument, "q: heads (" + std::to_string(p.heads_q) +
                                       ") must be a multiple of k's heads (" +
                                       std::to_string(p.heads_kv) + ")");
  p.group = p.heads_q / p.heads_kv;
  if (p.head_dim < 8 || p.head_dim > 256 || p.head_dim % 8 != 0)
    fail(Status::unsupported, "q: unsupported head dim " + std::to_string(p.head_dim) +
                                  "; expected a multiple of 8 in [8, 256]");
  if (p.total_q > INT32_MAX || p.total_k > INT32_MAX)
    fail(Status::unsupported,
         "q/k: more than 2^31 - 1 tokens are not supported (cu_seqlens are int32)");
  for (const auto* t : {&in.q, &in.k, &in.v}) {
    if (t->strides[2] != 1 && p.head_dim > 1)
      fail(Status::unsupported,
           std::string(t == &in.q   ? "q"
                       : t == &in.k ? "k"
                                    : "v") +
               ": the last dimension must be contiguous (stride 1), got stride " +
               std::to_string(t->strides[2]));
  }

  if (config.block_size < 1)
    fail(Status::invalid_argument,
         "block_size: expected >= 1, got " + std::to_string(config.block_size));
  if (config.top_k < 1)
    fail(Status::invalid_argument, "top_k: expected >= 1, got " + std::to_string(config.top_k));
  // Lengths fit in int32, so clamping changes nothing of the semantics (a
  // block or top-k beyond every length means "one block" / "all blocks") and
  // keeps block arithmetic far from int64 overflow.
  constexpr int64_t kLimit = int64_t{1} << 31;
  p.block_size = std::min(config.block_size, kLimit);
  p.top_k = std::min(config.top_k, kLimit);
  p.softmax_scale = config.softmax_scale.value_or(1.0f / std::sqrt(static_cast<float>(p.head_dim)));
  if (!std::isfinite(p.softmax_scale) || p.softmax_scale <= 0.0f)
    fail(Status::invalid_argument,
         "softmax_scale: expected a finite value > 0, got " + std::to_string(p.softmax_scale));
  p.gqa_shared_routing = config.gqa_shared_routing;

  p.device = in.q.device;
  for (const auto& [t, name] : {std::pair{&in.k, "k"},
                                {&in.v, "v"},
                                {&in.cu_seqlens_q, "cu_seqlens_q"},
                                {&in.cu_seqlens_k, "cu_seqlens_k"}})
    if (!(t->device == p.device))
      fail(Status::invalid_argument, std::string(name) + ": on " + device_string(t->device) +
                                         ", expected " + device_string(p.device) + " like q");

  if (in.cu_seqlens_q.shape[0] < 1)
    fail(Status::invalid_argument, "cu_seqlens_q: expected batch + 1 >= 1 entries, got 0");
  if (in.cu_seqlens_k.shape[0] != in.cu_seqlens_q.shape[0])
    fail(Status::invalid_argument,
         "cu_seqlens_k: expected " + std::to_string(in.cu_seqlens_q.shape[0]) +
             " entries like cu_seqlens_q, got " + std::to_string(in.cu_seqlens_k.shape[0]));
  if (in.max_seqlen_q < 0 || in.max_seqlen_k < 0)
    fail(Status::invalid_argument, "max_seqlen_q/max_seqlen_k: expected >= 0 (0 = compute)");

  p.q = rows_of(in.q);
  p.k = rows_of(in.k);
  p.v = rows_of(in.v);
  p.cu_seqlens_q = static_cast<const int32_t*>(in.cu_seqlens_q.data);
  p.cu_seqlens_k = static_cast<const int32_t*>(in.cu_seqlens_k.data);
  p.cu_seqlens_q_stride = in.cu_seqlens_q.strides[0];
  p.cu_seqlens_k_stride = in.cu_seqlens_k.strides[0];
  p.batch = in.cu_seqlens_q.shape[0] - 1;

  if (p.device.type == DeviceType::cpu) {
    p.sequences = read_cu_seqlens(in.cu_seqlens_q, in.cu_seqlens_k, p.total_q, p.total_k);
    int64_t mq = 0, mk = 0;
    for (const auto& s : p.sequences) {
      mq = std::max(mq, s.len_q);
      mk = std::max(mk, s.len_k);
    }
    if (in.max_seqlen_q != 0 && in.max_seqlen_q < mq)
      fail(Status::invalid_argument, "max_seqlen_q: " + std::to_string(in.max_seqlen_q) +
                                         " is less than the longest query sequence (" +
                                         std::to_string(mq) + ")");
    if (in.max_seqlen_k != 0 && in.max_seqlen_k < mk)
      fail(Status::invalid_argument, "max_seqlen_k: " + std::to_string(in.max_seqlen_k) +
                                         " is less than the longest key sequence (" +
                                         std::to_string(mk) + ")");
    p.max_seqlen_q = mq;
    p.max_seqlen_k = mk;
  } else {
    if (in.max_seqlen_q == 0 || in.max_seqlen_k == 0)
      fail(Status::invalid_argument,
           "max_seqlen_q/max_seqlen_k: must be given (> 0) when cu_seqlens are on a CUDA device");
    p.max_seqlen_q = in.max_seqlen_q;
    p.max_seqlen_k = in.max_seqlen_k;
  }
  return p;
}

Rows check_rows(const Problem& p, const TensorView& t, const char* name, int64_t tokens,
                int64_t heads, DType dtype) {
  check_present(t, name);
  if (t.ndim != 3 || t.shape[0] != tokens || t.shape[1] != heads || t.shape[2] != p.head_dim)
    fail(Status::invalid_argument, std::string(name) + ": expected shape [" +
                                       std::to_string(tokens) + ", " + std::to_string(heads) +
                                       ", " + std::to_string(p.head_dim) + "], got " +
                                       shape_string(t));
  if (t.dtype != dtype)
    fail(Status::invalid_argument, std::string(name) + ": expected dtype " + dtype_name(dtype) +
                                       ", got " + dtype_name(t.dtype));
  if (!(t.device == p.device))
    fail(Status::invalid_argument, std::string(name) + ": on " + device_string(t.device) +
                                       ", expected " + device_string(p.device));
  if (t.strides[2] != 1 && p.head_dim > 1)
    fail(Status::unsupported,
         std::string(name) + ": the last dimension must be contiguous (stride 1), got stride " +
             std::to_string(t.strides[2]));
  return rows_of(t);
}

Lse check_lse(const Problem& p, const TensorView& t, const char* name) {
  check_present(t, name);
  if (t.ndim != 2 || t.shape[0] != p.heads_q || t.shape[1] != p.total_q)
    fail(Status::invalid_argument,
         std::string(name) + ": expected shape [" + std::to_string(p.heads_q) + ", " +
             std::to_string(p.total_q) + "] ([Hq, total_q]), got " + shape_string(t));
  if (t.dtype != DType::float32)
    fail(Status::invalid_argument,
         std::string(name) + ": expected dtype float32, got " + dtype_name(t.dtype));
  if (!(t.device == p.device))
    fail(Status::invalid_argument, std::string(name) + ": on " + device_string(t.device) +
                                       ", expected " + device_string(p.device));
  return Lse{static_cast<float*>(t.data), t.strides[0], t.strides[1]};
}

void check_no_overlap(const TensorView& out, const char* out_name,
                      std::initializer_list<std::pair<const TensorView*, const char*>> others) {
  check_no_self_alias(out, out_name);
  if (out.numel() == 0) return;
  const auto [b0, e0] = byte_range(out);
  for (const auto& [t, name] : others) {
    if (t == nullptr || t->data == nullptr || t->numel() == 0) continue;
    const auto [b1, e1] = byte_range(*t);
    if (b0 < e1 && b1 < e0)
      fail(Status::invalid_argument, std::string(out_name) + ": memory overlaps " + name +
                                         "; outputs must not alias other arguments");
  }
}

int64_t min_routing_width(const Problem& p) {
  return std::min(p.top_k, num_blocks(p.max_seqlen_k, p.block_size));
}

}  // namespace moba::core
