#include "backends/cpu/plan.hpp"

#include <algorithm>
#include <limits>

#include "backends/cpu/kernels.hpp"
#include "backends/cpu/parallel.hpp"
#include "core/routing.hpp"

namespace moba::backends::cpu {

using core::Problem;

BlockMeans compute_block_means(const Problem& p, int threads) {
  BlockMeans m;
  m.heads_kv = p.heads_kv;
  m.head_dim = p.head_dim;
  int64_t total = 0;
  for (const auto& s : p.sequences) {
    m.first_block.push_back(total);
    total += core::num_blocks(s.len_k, p.block_size);
  }
  m.values.assign(static_cast<size_t>(total * p.heads_kv * p.head_dim), 0.0f);
  // One task per (sequence, block); every head of it at once.
  std::vector<std::pair<int32_t, int64_t>> tasks;
  tasks.reserve(static_cast<size_t>(total));
  for (size_t s = 0; s < p.sequences.size(); ++s)
    for (int64_t j = 0; j < core::num_blocks(p.sequences[s].len_k, p.block_size); ++j)
      tasks.emplace_back(static_cast<int32_t>(s), j);
  const int64_t d = p.head_dim;
  parallel_for(static_cast<int64_t>(tasks.size()), threads, [&](int, int64_t t) {
    const auto [s, j] = tasks[static_cast<size_t>(t)];
    const core::Sequence& seq = p.sequences[static_cast<size_t>(s)];
    const int64_t begin = j * p.block_size;
    const int64_t end = std::min(begin + p.block_size, seq.len_k);
    std::vector<float> row(static_cast<size_t>(d));
    for (int64_t h = 0; h < p.heads_kv; ++h) {
      auto* mean = const_cast<float*>(m.at(s, j, h));
      for (int64_t tok = begin; tok < end; ++tok) {
        load_rows(p.k, seq.k_begin + tok, h, 1, d, row.data());
        for (int64_t c = 0; c < d; ++c) mean[c] += row[static_cast<size_t>(c)];
      }
      const float inv = 1.0f / static_cast<float>(end - begin);
      for (int64_t c = 0; c < d; ++c) mean[c] = core::round_to(p.k.dtype, mean[c] * inv);
    }
  });
  return m;
}

std::vector<QueryUnit> query_units(const Problem& p, int threads) {
  // Split each block's queries into chunks of `chunk` while that adds units
  // a busy machine needs; chunks keep whole rows of a block together.
  int64_t units_per_chunk = 0;
  for (const auto& s : p.sequences)
    if (s.len_q > 0)
      units_per_chunk += core::num_blocks(s.len_k, p.block_size) - s.q_offset() / p.block_size;
  units_per_chunk *= p.heads_kv;
  int64_t chunk = p.block_size;
  while (chunk > 64 && units_per_chunk * ((p.block_size + chunk - 1) / chunk) < 4 * threads)
    chunk /= 2;

  std::vector<QueryUnit> units;
  for (size_t s = 0; s < p.sequences.size(); ++s) {
    const core::Sequence& seq = p.sequences[s];
    if (seq.len_q == 0) continue;
    const int64_t off = seq.q_offset();
    for (int64_t c = off / p.block_size; c * p.block_size < seq.len_k; ++c) {
      const int64_t first = std::max(c * p.block_size, off) - off;
      const int64_t last = std::min((c + 1) * p.block_size, seq.len_k) - off;
      for (int64_t q0 = first; q0 < last; q0 += chunk)
        for (int64_t h = 0; h < p.heads_kv; ++h)
          units.push_back(QueryUnit{static_cast<int32_t>(s), static_cast<int32_t>(h), c, q0,
                                    std::min(q0 + chunk, last)});
    }
  }
  // Later blocks have more past blocks to route over and to attend to: start them first.
  std::stable_sort(units.begin(), units.end(), [](const QueryUnit& a, const QueryUnit& b) {
    return a.block * (a.q_end - a.q_begin) > b.block * (b.q_end - b.q_begin);
  });
  return units;
}

void route_unit(const Problem& p, const BlockMeans& means, const QueryUnit& u, UnitRouting& r) {
  const core::Sequence& seq = p.sequences[static_cast<size_t>(u.seq)];
  const int64_t d = p.head_dim;
  const int64_t group = p.group;
  const int64_t c = u.block;
  r.rows = (u.q_end - u.q_begin) * group;
  r.width = core::num_selected(c, p.top_k);
  r.q.resize(static_cast<size_t>(r.rows * d));
  for (int64_t i = 0; i < u.q_end - u.q_begin; ++i)
    for (int64_t g = 0; g < group; ++g)
      load_rows(p.q, seq.q_begin + u.q_begin + i, u.kv_head * group + g, 1, d,
                r.q.data() + (i * group + g) * d);

  r.selected.resize(static_cast<size_t>(r.rows * r.width));
  if (r.width == c + 1) {  // every past block is selected: no scores needed
    for (int64_t row = 0; row < r.rows; ++row)
      for (int64_t j = 0; j <= c; ++j)
        r.selected[static_cast<size_t>(row * r.width + j)] = static_cast<int32_t>(j);
  } else {
    // scores[row, j] = <q_row, kbar_j> for the past blocks j < c.
    r.scores.resize(static_cast<size_t>(r.rows * c));
    gemm_nt(r.rows, c, d, r.q.data(), d, means.at(u.seq, 0, u.kv_head), means.block_stride(),
            r.scores.data(), c);
    if (p.gqa_shared_routing) {
      for (int64_t i = 0; i < r.rows; i += group) {
        float* sum = r.scores.data() + i * c;
        for (int64_t g = 1; g < group; ++g)
          for (int64_t j = 0; j < c; ++j) sum[j] += r.scores[static_cast<size_t>((i + g) * c + j)];
        int32_t* sel = r.selected.data() + i * r.width;
        core::select_blocks(sum, c, p.top_k, sel, r.width);
        for (int64_t g = 1; g < group; ++g) std::copy(sel, sel + r.width, sel + g * r.width);
      }
    } else {
      for (int64_t row = 0; row < r.rows; ++row)
        core::select_blocks(r.scores.data() + row * c, c, p.top_k,
                            r.selected.data() + row * r.width, r.width);
    }
  }

  // Inverse lists of the past blocks (counting sort by block).
  r.past_offset.assign(static_cast<size_t>(c + 1), 0);
  for (int64_t row = 0; row < r.rows; ++row)
    for (int64_t m = 0; m + 1 < r.width; ++m)
      ++r.past_offset[static_cast<size_t>(r.selected[static_cast<size_t>(row * r.width + m)] + 1)];
  for (int64_t j = 0; j < c; ++j)
    r.past_offset[static_cast<size_t>(j + 1)] += r.past_offset[static_cast<size_t>(j)];
  r.past_rows.resize(static_cast<size_t>(r.past_offset[static_cast<size_t>(c)]));
  std::vector<int32_t> fill(r.past_offset.begin(), r.past_offset.end() - 1);
  for (int64_t row = 0; row < r.rows; ++row)
    for (int64_t m = 0; m + 1 < r.width; ++m)
      r.past_rows[static_cast<size_t>(
          fill[static_cast<size_t>(r.selected[static_cast<size_t>(row * r.width + m)])]++)] =
          static_cast<int32_t>(row);
}

}  // namespace moba::backends::cpu
