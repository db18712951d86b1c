#include "spec_oracle.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <sstream>

namespace moba::testing::spec {
namespace {

// Rounds like the storage dtypes do, without library code: fp32 by a cast,
// fp16/bf16 by storing into a one-element tensor of that dtype (the Tensor
// helper's own conversion, tested exhaustively in tests/core).
double round_to_dtype(DType dtype, double x) {
  const auto f = static_cast<float>(x);
  if (dtype == DType::float32) return f;
  Tensor t(dtype, {1});
  t.set(0, f);
  return t.get(0);
}

int64_t routing_width_of(const Tensor& selected) {
  return selected.shape()[2];
}

double scale_of(const Workload& w) {
  return w.c.softmax_scale ? static_cast<double>(*w.c.softmax_scale)
                           : 1.0 / std::sqrt(static_cast<double>(w.c.head_dim));
}

// Element offsets into q/out ([total_q, Hq, D]) and k/v ([total_k, Hkv, D]).
int64_t q_at(const Workload& w, int64_t row, int64_t head) {
  return (row * w.c.heads_q + head) * w.c.head_dim;
}
int64_t k_at(const Workload& w, int64_t row, int64_t kv_head) {
  return (row * w.c.heads_kv + kv_head) * w.c.head_dim;
}

// The keys (positions within the sequence) query position `pos` attends to
// under the blocks in `row`: all of every selected past block, and its
// current block up to itself.
std::vector<int64_t> attended(const Workload& w, const Seq& s, int64_t pos, const int32_t* row,
                              int64_t width) {
  std::vector<int64_t> keys;
  for (int64_t m = 0; m < width && row[m] >= 0; ++m) {
    for (int64_t t = row[m] * w.c.block_size; t < (row[m] + 1) * w.c.block_size; ++t)
      if (t < s.len_k && t <= pos) keys.push_back(t);
  }
  return keys;
}

struct Softmax {
  std::vector<int64_t> keys;
  std::vector<double> probs;
  double lse = 0.0;
};

Softmax softmax(const Workload& w, const Seq& s, int64_t i, int64_t head, const Tensor& selected) {
  const int64_t d = w.c.head_dim;
  const int64_t kv = head / (w.c.heads_q / w.c.heads_kv);
  const int64_t width = routing_width_of(selected);
  const auto* row =
      static_cast<const int32_t*>(selected.data()) + ((s.q_begin + i) * w.c.heads_q + head) * width;
  Softmax sm;
  sm.keys = attended(w, s, s.position(i), row, width);
  std::vector<double> logits;
  for (int64_t t : sm.keys) {
    double dot = 0.0;
    for (int64_t c = 0; c < d; ++c)
      dot += static_cast<double>(w.q.get(q_at(w, s.q_begin + i, head) + c)) *
             w.k.get(k_at(w, s.k_begin + t, kv) + c);
    logits.push_back(scale_of(w) * dot);
  }
  const double mx = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (double l : logits) sum += std::exp(l - mx);
  sm.lse = mx + std::log(sum);
  for (double l : logits) sm.probs.push_back(std::exp(l - sm.lse));
  return sm;
}

}  // namespace

std::vector<Seq> sequences(const Workload& w) {
  const auto* cq = static_cast<const int32_t*>(w.cu_q.data());
  const auto* ck = static_cast<const int32_t*>(w.cu_k.data());
  std::vector<Seq> seqs;
  for (size_t b = 0; b < w.c.lens_q.size(); ++b)
    seqs.push_back(Seq{cq[b], ck[b], cq[b + 1] - cq[b], ck[b + 1] - ck[b]});
  return seqs;
}

std::vector<double> block_means(const Workload& w, const Seq& s, int64_t kv_head) {
  const int64_t d = w.c.head_dim, bs = w.c.block_size;
  const int64_t n = (s.len_k + bs - 1) / bs;
  std::vector<double> means(static_cast<size_t>(n * d));
  for (int64_t j = 0; j < n; ++j) {
    const int64_t end = std::min((j + 1) * bs, s.len_k);
    for (int64_t c = 0; c < d; ++c) {
      double sum = 0.0;
      for (int64_t t = j * bs; t < end; ++t) sum += w.k.get(k_at(w, s.k_begin + t, kv_head) + c);
      means[static_cast<size_t>(j * d + c)] =
          round_to_dtype(w.c.dtype, sum / static_cast<double>(end - j * bs));
    }
  }
  return means;
}

std::vector<double> gate_scores(const Workload& w, const Seq& s, int64_t i, int64_t head,
                                const std::vector<double>& means) {
  const int64_t d = w.c.head_dim;
  const int64_t group = w.c.heads_q / w.c.heads_kv;
  const int64_t current = s.position(i) / w.c.block_size;
  // With shared routing every head of the group scores with the group's sum.
  const int64_t first = w.c.gqa_shared_routing ? head / group * group : head;
  const int64_t last = w.c.gqa_shared_routing ? first + group : head + 1;
  std::vector<double> scores(static_cast<size_t>(current), 0.0);
  for (int64_t h = first; h < last; ++h)
    for (int64_t j = 0; j < current; ++j) {
      double dot = 0.0;
      for (int64_t c = 0; c < d; ++c)
        dot += static_cast<double>(w.q.get(q_at(w, s.q_begin + i, h) + c)) *
               means[static_cast<size_t>(j * d + c)];
      scores[static_cast<size_t>(j)] += dot;
    }
  return scores;
}

std::vector<int32_t> expected_selection(const std::vector<double>& past_scores, int64_t current,
                                        int64_t top_k) {
  std::vector<int32_t> order(static_cast<size_t>(current));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return past_scores[static_cast<size_t>(a)] > past_scores[static_cast<size_t>(b)];
  });
  order.resize(static_cast<size_t>(std::min<int64_t>(top_k - 1, current)));
  order.push_back(static_cast<int32_t>(current));
  std::sort(order.begin(), order.end());
  return order;
}

::testing::AssertionResult acceptable_selection(const int32_t* row, int64_t width,
                                                const std::vector<double>& past_scores,
                                                int64_t current, int64_t top_k,
                                                int64_t* near_ties) {
  std::ostringstream got;
  for (int64_t m = 0; m < width; ++m) got << (m ? "," : "[") << row[m];
  got << "]";
  const int64_t count = std::min(top_k, current + 1);
  for (int64_t m = 0; m < width; ++m) {
    if (m < count && (row[m] < 0 || row[m] > current || (m > 0 && row[m] <= row[m - 1])))
      return ::testing::AssertionFailure() << "selection " << got.str() << " is not " << count
                                           << " ascending blocks in 0.." << current;
    if (m >= count && row[m] != -1)
      return ::testing::AssertionFailure()
             << "selection " << got.str() << " is not padded with -1 after " << count << " entries";
  }
  if (row[count - 1] != current)
    return ::testing::AssertionFailure()
           << "selection " << got.str() << " misses the current block " << current;
  const std::vector<int32_t> want = expected_selection(past_scores, current, top_k);
  std::vector<int32_t> extra, missing;  // past blocks chosen but not expected, and vice versa
  std::set_difference(row, row + count, want.begin(), want.end(), std::back_inserter(extra));
  std::set_difference(want.begin(), want.end(), row, row + count, std::back_inserter(missing));
  for (int32_t a : extra)
    for (int32_t b : missing) {
      const double sa = past_scores[static_cast<size_t>(a)],
                   sb = past_scores[static_cast<size_t>(b)];
      if (std::abs(sa - sb) > 1e-5 * std::max(std::abs(sa), std::abs(sb)))
        return ::testing::AssertionFailure()
               << "selection " << got.str() << " picks block " << a << " (score " << sa
               << ") over block " << b << " (score " << sb << "); current block " << current
               << ", top_k " << top_k;
    }
  if (near_ties != nullptr) *near_ties += static_cast<int64_t>(extra.size());
  return ::testing::AssertionSuccess();
}

void attention(const Workload& w, const Tensor& selected, std::vector<double>& out,
               std::vector<double>& lse) {
  const int64_t d = w.c.head_dim;
  const int64_t group = w.c.heads_q / w.c.heads_kv;
  out.assign(static_cast<size_t>(w.total_q * w.c.heads_q * d), 0.0);
  lse.assign(static_cast<size_t>(w.c.heads_q * w.total_q), 0.0);
  for (const Seq& s : sequences(w))
    for (int64_t i = 0; i < s.len_q; ++i)
      for (int64_t h = 0; h < w.c.heads_q; ++h) {
        const Softmax sm = softmax(w, s, i, h, selected);
        lse[static_cast<size_t>(h * w.total_q + s.q_begin + i)] = sm.lse;
        for (size_t m = 0; m < sm.keys.size(); ++m)
          for (int64_t c = 0; c < d; ++c)
            out[static_cast<size_t>(q_at(w, s.q_begin + i, h) + c)] +=
                sm.probs[m] * w.v.get(k_at(w, s.k_begin + sm.keys[m], h / group) + c);
      }
}

Gradients attention_backward(const Workload& w, const Tensor& selected, const Tensor& dout) {
  const int64_t d = w.c.head_dim;
  const int64_t group = w.c.heads_q / w.c.heads_kv;
  const double scale = scale_of(w);
  Gradients g;
  g.dq.assign(static_cast<size_t>(w.q.numel()), 0.0);
  g.dk.assign(static_cast<size_t>(w.k.numel()), 0.0);
  g.dv.assign(static_cast<size_t>(w.v.numel()), 0.0);
  for (const Seq& s : sequences(w))
    for (int64_t i = 0; i < s.len_q; ++i)
      for (int64_t h = 0; h < w.c.heads_q; ++h) {
        const Softmax sm = softmax(w, s, i, h, selected);
        const int64_t qrow = q_at(w, s.q_begin + i, h);
        // With o = sum_m p_m v_m and p = softmax(scale * q.k):
        //   dL/dv_m = p_m dout;  dL/dlogit_m = p_m (dout.v_m - dout.o).
        std::vector<double> dot_v(sm.keys.size());
        double dot_o = 0.0;
        for (size_t m = 0; m < sm.keys.size(); ++m) {
          const int64_t krow = k_at(w, s.k_begin + sm.keys[m], h / group);
          for (int64_t c = 0; c < d; ++c)
            dot_v[m] += static_cast<double>(dout.get(qrow + c)) * w.v.get(krow + c);
          dot_o += sm.probs[m] * dot_v[m];
        }
        for (size_t m = 0; m < sm.keys.size(); ++m) {
          const int64_t krow = k_at(w, s.k_begin + sm.keys[m], h / group);
          const double dlogit = sm.probs[m] * (dot_v[m] - dot_o) * scale;
          for (int64_t c = 0; c < d; ++c) {
            g.dq[static_cast<size_t>(qrow + c)] += dlogit * w.k.get(krow + c);
            g.dk[static_cast<size_t>(krow + c)] += dlogit * w.q.get(qrow + c);
            g.dv[static_cast<size_t>(krow + c)] += sm.probs[m] * dout.get(qrow + c);
          }
        }
      }
  return g;
}

std::vector<bool> attended_keys(const Workload& w, const Tensor& selected) {
  const int64_t group = w.c.heads_q / w.c.heads_kv;
  const int64_t width = routing_width_of(selected);
  std::vector<bool> used(static_cast<size_t>(w.total_k * w.c.heads_kv), false);
  for (const Seq& s : sequences(w))
    for (int64_t i = 0; i < s.len_q; ++i)
      for (int64_t h = 0; h < w.c.heads_q; ++h) {
        const auto* row = static_cast<const int32_t*>(selected.data()) +
                          ((s.q_begin + i) * w.c.heads_q + h) * width;
        for (int64_t t : attended(w, s, s.position(i), row, width))
          used[static_cast<size_t>((s.k_begin + t) * w.c.heads_kv + h / group)] = true;
      }
  return used;
}

ExecOptions reference_options() {
  ExecOptions options;
  options.backend = Backend::reference;
  return options;
}

Tensor run_routing(const Workload& w, int64_t extra_width) {
  int64_t max_k = 0;
  for (const Seq& s : sequences(w)) max_k = std::max(max_k, s.len_k);
  const int64_t width = std::max<int64_t>(1, routing_width(max_k, w.config()) + extra_width);
  Tensor selected(DType::int32, {w.total_q, w.c.heads_q, width});
  // Not poison(): its all-ones bytes read as -1, the padding value itself.
  spec::fill(selected, [] { return 12345; });
  routing(w.inputs(), w.config(), selected.view(), reference_options());
  return selected;
}

void run_forward(const Workload& w, Tensor& out, Tensor& lse) {
  out = w.new_out();
  lse = w.new_lse();
  out.poison();
  lse.poison();
  forward(w.inputs(), w.config(), out.view(), lse.view(), reference_options());
}

Grads run_backward(const Workload& w, const Tensor& dout) {
  Tensor out, lse;
  run_forward(w, out, lse);
  Grads g{Tensor(w.c.dtype, w.q.shape()), Tensor(w.c.dtype, w.k.shape()),
          Tensor(w.c.dtype, w.v.shape())};
  g.dq.poison();
  g.dk.poison();
  g.dv.poison();
  backward(w.inputs(), w.config(), out.view(), dout.view(), lse.view(), g.dq.view(), g.dk.view(),
           g.dv.view(), reference_options());
  return g;
}

void copy_rows(Tensor& dst, int64_t dst_row, const Tensor& src, int64_t src_row, int64_t rows) {
  if (rows == 0) return;  // an empty tensor's data() may be null: memcpy must not see it
  const int64_t row_bytes = src.numel() / src.shape()[0] * dtype_size(src.dtype());
  std::memcpy(static_cast<char*>(dst.data()) + dst_row * row_bytes,
              static_cast<const char*>(src.data()) + src_row * row_bytes,
              static_cast<size_t>(rows * row_bytes));
}

Workload slice(const Workload& w, size_t b) {
  const Seq s = sequences(w)[b];
  Case c = w.c;
  c.lens_q = {static_cast<int32_t>(s.len_q)};
  c.lens_k = {static_cast<int32_t>(s.len_k)};
  Workload one = make_workload(c);
  copy_rows(one.q, 0, w.q, s.q_begin, s.len_q);
  copy_rows(one.k, 0, w.k, s.k_begin, s.len_k);
  copy_rows(one.v, 0, w.v, s.k_begin, s.len_k);
  return one;
}

double ulp(DType dtype, double x) {
  const int mantissa = dtype == DType::float16 ? 10 : dtype == DType::bfloat16 ? 7 : 23;
  const int min_exponent = dtype == DType::float16 ? -14 : -126;
  int e;
  std::frexp(std::abs(x), &e);
  return std::ldexp(1.0, std::max(e - 1, min_exponent) - mantissa);
}

double one_rounding(DType dtype, double expected, double scale) {
  double tol = 0.5 * ulp(DType::float32, expected) + 1e-12 * scale;
  if (dtype != DType::float32) tol += 0.5 * ulp(dtype, expected);
  return tol;
}

::testing::AssertionResult within_one_rounding(const std::vector<double>& actual,
                                               const std::vector<double>& expected, DType dtype,
                                               double scale) {
  if (actual.size() != expected.size())
    return ::testing::AssertionFailure() << "size " << actual.size() << " != " << expected.size();
  int bad = 0;
  auto failure = ::testing::AssertionFailure();
  for (size_t i = 0; i < actual.size(); ++i) {
    const double err = std::abs(actual[i] - expected[i]);
    if (!(err <= one_rounding(dtype, expected[i], scale))) {
      if (bad < 5)
        failure << "\n  [" << i << "] got " << actual[i] << ", expected " << expected[i]
                << " (error " << err << " > " << one_rounding(dtype, expected[i], scale) << ")";
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return failure << "\n  " << bad << " of " << actual.size() << " elements off by more than one "
                 << dtype_name(dtype) << " rounding";
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  if (a.dtype() != b.dtype() || a.shape() != b.shape()) return false;
  if (a.numel() == 0) return true;  // data() may be null: memcmp must not see it
  return std::memcmp(a.data(), b.data(), static_cast<size_t>(a.numel() * dtype_size(a.dtype()))) ==
         0;
}

}  // namespace moba::testing::spec
