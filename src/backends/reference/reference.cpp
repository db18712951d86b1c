// The reference backend: the spec written as plain loops in fp64. Slow on
// purpose and obviously correct; it is the oracle of every test.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "backends/backend.hpp"
#include "core/dtype.hpp"
#include "core/routing.hpp"

namespace moba::backends::reference {
namespace {

using core::load;
using core::Problem;
using core::Rows;
using core::Sequence;

// Block means of k for one sequence and kv head (spec step 2): summed, divided
// by the tokens present, rounded to fp32 and then to k's dtype.
std::vector<double> block_means(const Problem& p, const Sequence& s, int64_t kv_head) {
  const int64_t n = core::num_blocks(s.len_k, p.block_size);
  const int64_t d = p.head_dim;
  std::vector<double> means(static_cast<size_t>(n * d), 0.0);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t begin = j * p.block_size;
    const int64_t end = std::min(begin + p.block_size, s.len_k);
    for (int64_t c = 0; c < d; ++c) {
      double sum = 0.0;
      for (int64_t t = begin; t < end; ++t)
        sum += load(p.k.data, p.k.dtype, p.k.offset(s.k_begin + t, kv_head) + c);
      const float mean = static_cast<float>(sum / static_cast<double>(end - begin));
      means[static_cast<size_t>(j * d + c)] = core::round_to(p.k.dtype, mean);
    }
  }
  return means;
}

// Gate scores <q, kbar_j> of query `row` and head `head` for blocks 0..count-1, added to `scores`.
void add_scores(const Problem& p, int64_t row, int64_t head, const std::vector<double>& means,
                int64_t count, std::vector<double>& scores) {
  for (int64_t j = 0; j < count; ++j) {
    double dot = 0.0;
    for (int64_t c = 0; c < p.head_dim; ++c)
      dot += static_cast<double>(load(p.q.data, p.q.dtype, p.q.offset(row, head) + c)) *
             means[static_cast<size_t>(j * p.head_dim + c)];
    scores[static_cast<size_t>(j)] += dot;
  }
}

// Calls fn(sequence, query index i, absolute position, head, selection, count)
// for every query and head, with the routing of the spec.
template <class Fn>
void for_each_routed_query(const Problem& p, Fn&& fn) {
  std::vector<int32_t> selected;  // sized per sequence below
  for (const Sequence& s : p.sequences) {
    if (s.len_q == 0) continue;
    const int64_t n = core::num_blocks(s.len_k, p.block_size);
    const int64_t width = std::min(p.top_k, n);
    selected.resize(static_cast<size_t>(width));
    std::vector<double> scores(static_cast<size_t>(n));
    for (int64_t kvh = 0; kvh < p.heads_kv; ++kvh) {
      const std::vector<double> means = block_means(p, s, kvh);
      for (int64_t i = 0; i < s.len_q; ++i) {
        const int64_t pos = s.q_offset() + i;
        const int64_t current = pos / p.block_size;
        if (p.gqa_shared_routing) {
          std::fill(scores.begin(), scores.end(), 0.0);
          for (int64_t g = 0; g < p.group; ++g)
            add_scores(p, s.q_begin + i, kvh * p.group + g, means, current, scores);
          const int64_t count =
              core::select_blocks(scores.data(), current, p.top_k, selected.data(), width);
          for (int64_t g = 0; g < p.group; ++g)
            fn(s, i, pos, kvh * p.group + g, selected.data(), count);
        } else {
          for (int64_t g = 0; g < p.group; ++g) {
            const int64_t head = kvh * p.group + g;
            std::fill(scores.begin(), scores.end(), 0.0);
            add_scores(p, s.q_begin + i, head, means, current, scores);
            const int64_t count =
                core::select_blocks(scores.data(), current, p.top_k, selected.data(), width);
            fn(s, i, pos, head, selected.data(), count);
          }
        }
      }
    }
  }
}

// The keys a query attends to: every key of its selected past blocks and the
// keys of its current block up to its own position.
template <class Fn>
void for_each_key(const Problem& p, const Sequence& s, int64_t pos, const int32_t* selected,
                  int64_t count, Fn&& fn) {
  for (int64_t m = 0; m < count; ++m) {
    const int64_t begin = selected[m] * p.block_size;
    const int64_t end = std::min({begin + p.block_size, s.len_k, pos + 1});
    for (int64_t t = begin; t < end; ++t) fn(t);
  }
}

double dot_rows(const Problem& p, const Rows& a, int64_t ra, int64_t ha, const Rows& b, int64_t rb,
                int64_t hb) {
  double dot = 0.0;
  for (int64_t c = 0; c < p.head_dim; ++c)
    dot += static_cast<double>(load(a.data, a.dtype, a.offset(ra, ha) + c)) *
           static_cast<double>(load(b.data, b.dtype, b.offset(rb, hb) + c));
  return dot;
}

// Softmax probabilities of one query over its keys, in the order for_each_key visits them.
struct Attention {
  std::vector<int64_t> keys;  // key positions within the sequence
  std::vector<double> probs;
  double lse = 0.0;
};

Attention attend(const Problem& p, const Sequence& s, int64_t i, int64_t pos, int64_t head,
                 const int32_t* selected, int64_t count) {
  Attention a;
  const int64_t kvh = p.kv_head(head);
  std::vector<double> logits;
  for_each_key(p, s, pos, selected, count, [&](int64_t t) {
    a.keys.push_back(t);
    logits.push_back(p.softmax_scale *
                     dot_rows(p, p.q, s.q_begin + i, head, p.k, s.k_begin + t, kvh));
  });
  const double max = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (double x : logits) sum += std::exp(x - max);
  a.lse = max + std::log(sum);
  a.probs.resize(logits.size());
  for (size_t m = 0; m < logits.size(); ++m) a.probs[m] = std::exp(logits[m] - a.lse);
  return a;
}

}  // namespace

void routing(const Problem& p, const Selection& sel) {
  for_each_routed_query(p, [&](const Sequence& s, int64_t i, int64_t, int64_t head,
                               const int32_t* selected, int64_t count) {
    int32_t* dst = sel.at(s.q_begin + i, head);
    std::copy(selected, selected + count, dst);
    std::fill(dst + count, dst + sel.width, -1);
  });
}

void forward(const Problem& p, const Rows& out, const core::Lse& lse) {
  std::vector<double> acc(static_cast<size_t>(p.head_dim));
  for_each_routed_query(p, [&](const Sequence& s, int64_t i, int64_t pos, int64_t head,
                               const int32_t* selected, int64_t count) {
    const Attention a = attend(p, s, i, pos, head, selected, count);
    const int64_t kvh = p.kv_head(head);
    std::fill(acc.begin(), acc.end(), 0.0);
    for (size_t m = 0; m < a.keys.size(); ++m)
      for (int64_t c = 0; c < p.head_dim; ++c)
        acc[static_cast<size_t>(c)] +=
            a.probs[m] * load(p.v.data, p.v.dtype, p.v.offset(s.k_begin + a.keys[m], kvh) + c);
    for (int64_t c = 0; c < p.head_dim; ++c)
      core::store(out.data, out.dtype, out.offset(s.q_begin + i, head) + c,
                  static_cast<float>(acc[static_cast<size_t>(c)]));
    if (lse.data != nullptr) lse.at(head, s.q_begin + i) = static_cast<float>(a.lse);
  });
}

void backward(const Problem& p, const Rows& dout, const Gradients& g) {
  const int64_t d = p.head_dim;
  std::vector<double> dq(static_cast<size_t>(p.total_q * p.heads_q * d), 0.0);
  std::vector<double> dk(static_cast<size_t>(p.total_k * p.heads_kv * d), 0.0);
  std::vector<double> dv(static_cast<size_t>(p.total_k * p.heads_kv * d), 0.0);
  const auto q_index = [&](int64_t row, int64_t head) {
    return static_cast<size_t>((row * p.heads_q + head) * d);
  };
  const auto k_index = [&](int64_t row, int64_t head) {
    return static_cast<size_t>((row * p.heads_kv + head) * d);
  };

  for_each_routed_query(p, [&](const Sequence& s, int64_t i, int64_t pos, int64_t head,
                               const int32_t* selected, int64_t count) {
    const Attention a = attend(p, s, i, pos, head, selected, count);
    const int64_t kvh = p.kv_head(head);
    const int64_t row = s.q_begin + i;
    // dP_m = dO . v_m ; delta = sum_m P_m dP_m ; dS_m = P_m (dP_m - delta)
    std::vector<double> dp(a.keys.size());
    double delta = 0.0;
    for (size_t m = 0; m < a.keys.size(); ++m) {
      dp[m] = dot_rows(p, dout, row, head, p.v, s.k_begin + a.keys[m], kvh);
      delta += a.probs[m] * dp[m];
    }
    for (size_t m = 0; m < a.keys.size(); ++m) {
      const int64_t key_row = s.k_begin + a.keys[m];
      const double ds = a.probs[m] * (dp[m] - delta) * p.softmax_scale;
      for (int64_t c = 0; c < d; ++c) {
        const double qc = load(p.q.data, p.q.dtype, p.q.offset(row, head) + c);
        const double kc = load(p.k.data, p.k.dtype, p.k.offset(key_row, kvh) + c);
        const double doc = load(dout.data, dout.dtype, dout.offset(row, head) + c);
        dq[q_index(row, head) + static_cast<size_t>(c)] += ds * kc;
        dk[k_index(key_row, kvh) + static_cast<size_t>(c)] += ds * qc;
        dv[k_index(key_row, kvh) + static_cast<size_t>(c)] += a.probs[m] * doc;
      }
    }
  });

  for (int64_t t = 0; t < p.total_q; ++t)
    for (int64_t h = 0; h < p.heads_q; ++h)
      for (int64_t c = 0; c < d; ++c)
        core::store(g.dq.data, g.dq.dtype, g.dq.offset(t, h) + c,
                    static_cast<float>(dq[q_index(t, h) + static_cast<size_t>(c)]));
  for (int64_t t = 0; t < p.total_k; ++t)
    for (int64_t h = 0; h < p.heads_kv; ++h)
      for (int64_t c = 0; c < d; ++c) {
        core::store(g.dk.data, g.dk.dtype, g.dk.offset(t, h) + c,
                    static_cast<float>(dk[k_index(t, h) + static_cast<size_t>(c)]));
        core::store(g.dv.data, g.dv.dtype, g.dv.offset(t, h) + c,
                    static_cast<float>(dv[k_index(t, h) + static_cast<size_t>(c)]));
      }
}

}  // namespace moba::backends::reference
