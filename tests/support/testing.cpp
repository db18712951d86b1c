#include "support/testing.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

#include "core/dtype.hpp"

namespace moba::testing {

Tensor::Tensor(DType dtype, std::vector<int64_t> shape) : dtype_(dtype), shape_(std::move(shape)) {
  bytes_.assign(static_cast<size_t>(numel() * dtype_size(dtype_)), 0);
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t s : shape_) n *= s;
  return n;
}

float Tensor::get(int64_t i) const {
  return core::load(bytes_.data(), dtype_, i);
}
void Tensor::set(int64_t i, float x) {
  core::store(bytes_.data(), dtype_, i, x);
}

void Tensor::randn(std::mt19937_64& rng, float stddev) {
  std::normal_distribution<float> dist(0.0f, stddev);
  for (int64_t i = 0; i < numel(); ++i) set(i, dist(rng));
}

void Tensor::poison() {
  std::fill(bytes_.begin(), bytes_.end(), static_cast<unsigned char>(0xff));
}

std::vector<double> Tensor::to_double() const {
  std::vector<double> out(static_cast<size_t>(numel()));
  for (int64_t i = 0; i < numel(); ++i) out[static_cast<size_t>(i)] = get(i);
  return out;
}

TensorView Tensor::view() {
  TensorView t;
  t.data = bytes_.empty() ? nullptr : bytes_.data();
  t.dtype = dtype_;
  t.ndim = static_cast<int>(shape_.size());
  int64_t stride = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    t.shape[static_cast<size_t>(d)] = shape_[static_cast<size_t>(d)];
    t.strides[static_cast<size_t>(d)] = stride;
    stride *= shape_[static_cast<size_t>(d)];
  }
  return t;
}

TensorView Tensor::view() const {
  return const_cast<Tensor*>(this)->view();
}

std::string describe(const Case& c) {
  std::ostringstream s;
  s << "lens_q=[";
  for (size_t i = 0; i < c.lens_q.size(); ++i) s << (i ? "," : "") << c.lens_q[i];
  s << "]";
  if (!c.lens_k.empty()) {
    s << " lens_k=[";
    for (size_t i = 0; i < c.lens_k.size(); ++i) s << (i ? "," : "") << c.lens_k[i];
    s << "]";
  }
  s << " Hq=" << c.heads_q << " Hkv=" << c.heads_kv << " D=" << c.head_dim << " B=" << c.block_size
    << " K=" << c.top_k << " dtype=" << dtype_name(c.dtype) << " shared=" << c.gqa_shared_routing
    << " seed=" << c.seed;
  return s.str();
}

Inputs Workload::inputs() const {
  Inputs in;
  in.q = q.view();
  in.k = k.view();
  in.v = v.view();
  in.cu_seqlens_q = cu_q.view();
  in.cu_seqlens_k = cu_k.view();
  return in;
}

Config Workload::config() const {
  Config cfg;
  cfg.block_size = c.block_size;
  cfg.top_k = c.top_k;
  cfg.softmax_scale = c.softmax_scale;
  cfg.gqa_shared_routing = c.gqa_shared_routing;
  return cfg;
}

Workload make_workload(const Case& c) {
  Workload w;
  w.c = c;
  const std::vector<int32_t>& lens_k = c.lens_k.empty() ? c.lens_q : c.lens_k;
  const int64_t batch = static_cast<int64_t>(c.lens_q.size());
  w.cu_q = Tensor(DType::int32, {batch + 1});
  w.cu_k = Tensor(DType::int32, {batch + 1});
  auto* cq = static_cast<int32_t*>(w.cu_q.data());
  auto* ck = static_cast<int32_t*>(w.cu_k.data());
  cq[0] = ck[0] = 0;
  for (int64_t b = 0; b < batch; ++b) {
    cq[b + 1] = cq[b] + c.lens_q[static_cast<size_t>(b)];
    ck[b + 1] = ck[b] + lens_k[static_cast<size_t>(b)];
  }
  w.total_q = cq[batch];
  w.total_k = ck[batch];
  std::mt19937_64 rng(c.seed);
  w.q = Tensor(c.dtype, {w.total_q, c.heads_q, c.head_dim});
  w.k = Tensor(c.dtype, {w.total_k, c.heads_kv, c.head_dim});
  w.v = Tensor(c.dtype, {w.total_k, c.heads_kv, c.head_dim});
  w.q.randn(rng);
  w.k.randn(rng);
  w.v.randn(rng);
  return w;
}

Case random_case(std::mt19937_64& rng, DType dtype, const std::vector<int64_t>& head_dims,
                 int32_t max_len) {
  auto pick = [&](auto... xs) {
    const int64_t values[] = {static_cast<int64_t>(xs)...};
    return values[std::uniform_int_distribution<size_t>(0, sizeof...(xs) - 1)(rng)];
  };
  Case c;
  c.dtype = dtype;
  c.seed = rng();
  const int64_t batch = std::uniform_int_distribution<int64_t>(1, 4)(rng);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t kind = std::uniform_int_distribution<int64_t>(0, 9)(rng);
    int32_t len = kind == 0   ? 0
                  : kind == 1 ? 1
                              : std::uniform_int_distribution<int32_t>(2, max_len)(rng);
    c.lens_q.push_back(len);
  }
  // A third of the cases are decode / chunked prefill: fewer queries than keys.
  if (std::uniform_int_distribution<int>(0, 2)(rng) == 0) {
    c.lens_k = c.lens_q;
    for (auto& l : c.lens_q) l = std::uniform_int_distribution<int32_t>(0, l)(rng);
  }
  c.heads_kv = pick(1, 2);
  c.heads_q = c.heads_kv * pick(1, 4, 8);
  c.head_dim = head_dims[std::uniform_int_distribution<size_t>(0, head_dims.size() - 1)(rng)];
  c.block_size = pick(1, 3, 8, 16, 32, 64, 256);
  c.top_k = pick(1, 2, 3, 5, 1000);
  c.gqa_shared_routing = std::uniform_int_distribution<int>(0, 3)(rng) == 0;
  return c;
}

void dense_causal_attention(const Workload& w, std::vector<double>& out, std::vector<double>& lse) {
  const Case& c = w.c;
  const int64_t d = c.head_dim;
  const double scale = c.softmax_scale ? *c.softmax_scale : 1.0 / std::sqrt(static_cast<double>(d));
  out.assign(static_cast<size_t>(w.total_q * c.heads_q * d), 0.0);
  lse.assign(static_cast<size_t>(c.heads_q * w.total_q), 0.0);
  const auto* cq = static_cast<const int32_t*>(w.cu_q.data());
  const auto* ck = static_cast<const int32_t*>(w.cu_k.data());
  const int64_t group = c.heads_q / c.heads_kv;
  for (size_t b = 0; b < c.lens_q.size(); ++b) {
    const int64_t q0 = cq[b], lq = cq[b + 1] - cq[b], k0 = ck[b], lk = ck[b + 1] - ck[b];
    for (int64_t h = 0; h < c.heads_q; ++h) {
      const int64_t kh = h / group;
      for (int64_t i = 0; i < lq; ++i) {
        const int64_t pos = lk - lq + i;
        std::vector<double> logits(static_cast<size_t>(pos + 1));
        for (int64_t t = 0; t <= pos; ++t) {
          double dot = 0.0;
          for (int64_t x = 0; x < d; ++x)
            dot += static_cast<double>(w.q.get(((q0 + i) * c.heads_q + h) * d + x)) *
                   w.k.get(((k0 + t) * c.heads_kv + kh) * d + x);
          logits[static_cast<size_t>(t)] = scale * dot;
        }
        const double mx = *std::max_element(logits.begin(), logits.end());
        double sum = 0.0;
        for (double l : logits) sum += std::exp(l - mx);
        const double l = mx + std::log(sum);
        lse[static_cast<size_t>(h * w.total_q + q0 + i)] = l;
        for (int64_t t = 0; t <= pos; ++t) {
          const double pr = std::exp(logits[static_cast<size_t>(t)] - l);
          for (int64_t x = 0; x < d; ++x)
            out[static_cast<size_t>(((q0 + i) * c.heads_q + h) * d + x)] +=
                pr * w.v.get(((k0 + t) * c.heads_kv + kh) * d + x);
        }
      }
    }
  }
}

ErrorStats compare(const std::vector<double>& actual, const std::vector<double>& expected) {
  ErrorStats s;
  const size_t n = std::min(actual.size(), expected.size());
  double sum = 0.0;
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(actual[i])) s.finite = false;
    const double e = std::abs(actual[i] - expected[i]);
    s.max_abs = std::max(s.max_abs, e);
    s.max_ref = std::max(s.max_ref, std::abs(expected[i]));
    sum += e;
  }
  if (actual.size() != expected.size()) s.finite = false;
  s.mean_abs = n ? sum / static_cast<double>(n) : 0.0;
  return s;
}

double output_tolerance(DType dtype) {
  switch (dtype) {
    case DType::float32:
      return 2e-5;
    case DType::float16:
      return 4e-3;
    case DType::bfloat16:
      return 3e-2;
    default:
      return 0.0;
  }
}

}  // namespace moba::testing
