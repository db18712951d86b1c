// MoBA decode and chunked prefill against a KV cache, on the CPU.
//
// Three phases, each parallel:
//   1. route, per (sequence, kv head): block means from the running block
//      sums (O(blocks x D)), one product of the group's query rows with them,
//      the spec's selection per row; then, MoE-style, the distinct selected
//      blocks with the rows that chose each;
//   2. attend, per (sequence, kv head, range of those blocks): each selected
//      block is read once for the whole kv group (every query head of the
//      group and every query of a chunk that chose it), online softmax into a
//      partial result; several ranges per sequence (split-K) when the batch
//      alone would leave threads idle;
//   3. merge the partial results of each row by log-sum-exp.
#include "backends/cpu/decode.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "backends/cpu/kernels.hpp"
#include "backends/cpu/parallel.hpp"
#include "core/routing.hpp"

namespace moba::backends::cpu {
namespace {

using core::Cache;
using core::Decode;

constexpr int64_t kKeyTile = 256;  // keys per product
constexpr int64_t kRowTile = 128;  // gathered query rows per product

// The query rows of one (sequence, kv head) and their routing. Row r is
// query r / group of query head kv_head * group + r % group.
struct Unit {
  int64_t seq = 0, kv_head = 0, rows = 0, q_offset = 0, width = 0;
  std::vector<float> q;             // [rows, D] fp32
  std::vector<int32_t> selected;    // [rows, width], ascending, -1 padded
  std::vector<int32_t> blocks;      // distinct selected blocks, ascending
  std::vector<int32_t> row_offset;  // rows choosing blocks[i]:
  std::vector<int32_t> block_rows;  //   block_rows[row_offset[i] .. row_offset[i + 1])
  std::vector<int32_t> reach;       // per distinct block: last position that reads it + 1

  int64_t position(int64_t row, int64_t group) const noexcept { return q_offset + row / group; }
};

std::vector<Unit> make_units(const Decode& d, const Cache& c) {
  std::vector<Unit> units;
  for (int64_t b = 0; b < c.batch; ++b) {
    if (d.len_q(b) == 0) continue;
    for (int64_t h = 0; h < c.heads_kv; ++h) {
      Unit u;
      u.seq = b;
      u.kv_head = h;
      u.rows = d.len_q(b) * d.group;
      u.q_offset = d.len_k[static_cast<size_t>(b)] - d.len_q(b);
      units.push_back(std::move(u));
    }
  }
  return units;
}

// Phase 1 for one unit (spec steps 2-4).
void route(const Decode& d, const Cache& c, Unit& u, std::vector<float>& means,
           std::vector<float>& scores) {
  const int64_t dim = c.head_dim, group = d.group, bs = c.block_size;
  const int64_t len_k = d.len_k[static_cast<size_t>(u.seq)];
  const int64_t last = (len_k - 1) / bs;  // current block of the last query
  u.width = core::num_selected(last, d.top_k);
  u.q.resize(static_cast<size_t>(u.rows * dim));
  const int64_t q_begin = d.q_begin[static_cast<size_t>(u.seq)];
  for (int64_t r = 0; r < u.rows; ++r)
    load_rows(d.q, q_begin + r / group, u.kv_head * group + r % group, 1, dim,
              u.q.data() + r * dim);

  u.selected.assign(static_cast<size_t>(u.rows * u.width), -1);
  const int64_t first = u.q_offset / bs;  // current block of the first query
  const bool all_past = core::num_selected(last, d.top_k) == last + 1 &&
                        core::num_selected(first, d.top_k) == first + 1;
  if (all_past) {  // every row takes every block up to its own: no scores needed
    for (int64_t r = 0; r < u.rows; ++r) {
      const int64_t cur = u.position(r, group) / bs;
      for (int64_t j = 0; j <= cur; ++j)
        u.selected[static_cast<size_t>(r * u.width + j)] = static_cast<int32_t>(j);
    }
  } else {
    // Means of the past blocks 0 .. last - 1, all full: sum * (1 / count)
    // rounded to k's dtype, exactly as the prefill path computes them.
    means.resize(static_cast<size_t>(last * dim));
    const float inv = 1.0f / static_cast<float>(bs);
    for (int64_t j = 0; j < last; ++j) {
      const float* sum = c.block_sum(u.seq, j, u.kv_head);
      float* mean = means.data() + j * dim;
      for (int64_t x = 0; x < dim; ++x) mean[x] = core::round_to(c.dtype, sum[x] * inv);
    }
    scores.resize(static_cast<size_t>(u.rows * last));
    gemm_nt(u.rows, last, dim, u.q.data(), dim, means.data(), dim, scores.data(), last);
    for (int64_t r = 0; r < u.rows; r += d.gqa_shared_routing ? group : 1) {
      const int64_t cur = u.position(r, group) / bs;
      float* row_scores = scores.data() + r * last;
      if (d.gqa_shared_routing)  // the group's heads share one selection from summed scores
        for (int64_t g = 1; g < group; ++g)
          for (int64_t j = 0; j < cur; ++j)
            row_scores[j] += scores[static_cast<size_t>((r + g) * last + j)];
      int32_t* sel = u.selected.data() + r * u.width;
      core::select_blocks(row_scores, cur, d.top_k, sel, u.width);
      if (d.gqa_shared_routing)
        for (int64_t g = 1; g < group; ++g) std::copy(sel, sel + u.width, sel + g * u.width);
    }
  }

  // Inverse lists over the distinct selected blocks (counting sort).
  std::vector<int32_t> count(static_cast<size_t>(last + 1), 0);
  for (int32_t j : u.selected)
    if (j >= 0) ++count[static_cast<size_t>(j)];
  std::vector<int32_t> slot(static_cast<size_t>(last + 1), -1);
  u.blocks.clear();
  u.row_offset.assign(1, 0);
  for (int64_t j = 0; j <= last; ++j) {
    if (count[static_cast<size_t>(j)] == 0) continue;
    slot[static_cast<size_t>(j)] = static_cast<int32_t>(u.blocks.size());
    u.blocks.push_back(static_cast<int32_t>(j));
    u.row_offset.push_back(u.row_offset.back() + count[static_cast<size_t>(j)]);
  }
  u.block_rows.resize(static_cast<size_t>(u.row_offset.back()));
  u.reach.assign(u.blocks.size(), 0);
  std::vector<int32_t> fill(u.row_offset.begin(), u.row_offset.end() - 1);
  for (int64_t r = 0; r < u.rows; ++r)  // ascending rows, so positions ascend in each list
    for (int64_t m = 0; m < u.width; ++m) {
      const int32_t j = u.selected[static_cast<size_t>(r * u.width + m)];
      if (j < 0) continue;
      const auto i = static_cast<size_t>(slot[static_cast<size_t>(j)]);
      u.block_rows[static_cast<size_t>(fill[i]++)] = static_cast<int32_t>(r);
      u.reach[i] = static_cast<int32_t>(std::max<int64_t>(
          u.reach[i], std::min<int64_t>(u.position(r, group) + 1, std::min((j + 1) * bs, len_k))));
    }
}

std::vector<Unit> route_all(const Decode& d, const Cache& c, int threads) {
  std::vector<Unit> units = make_units(d, c);
  std::vector<std::vector<float>> means(static_cast<size_t>(threads)),
      scores(static_cast<size_t>(threads));
  parallel_for(static_cast<int64_t>(units.size()), threads, [&](int worker, int64_t t) {
    route(d, c, units[static_cast<size_t>(t)], means[static_cast<size_t>(worker)],
          scores[static_cast<size_t>(worker)]);
  });
  return units;
}

// Phase 2 work: blocks[first .. last) of one unit, with its partial result.
struct Item {
  int64_t unit = 0, first = 0, last = 0;
  std::vector<float> m, l, acc;  // per row (acc [rows, D]); l = 0: row untouched
};

std::vector<Item> split_items(const std::vector<Unit>& units, int threads) {
  int64_t total = 0;
  for (const Unit& u : units) total += static_cast<int64_t>(u.blocks.size());
  // Enough items for 4 per thread, never less than one block each.
  const int64_t per_item = std::max<int64_t>(1, total / (4 * static_cast<int64_t>(threads)));
  std::vector<Item> items;
  for (size_t i = 0; i < units.size(); ++i) {
    const auto n = static_cast<int64_t>(units[i].blocks.size());
    const int64_t pieces = std::max<int64_t>(1, (n + per_item - 1) / per_item);
    for (int64_t p = 0; p < pieces; ++p) {
      Item it;
      it.unit = static_cast<int64_t>(i);
      it.first = n * p / pieces;
      it.last = n * (p + 1) / pieces;
      items.push_back(std::move(it));
    }
  }
  return items;
}

struct Workspace {
  std::vector<float> kbuf, vbuf, qg, s, prod, alpha;
  std::vector<int32_t> rows, valid;
};

// Converts keys [k0, k0 + keys) of one kv head of a sequence to fp32 rows.
void gather_keys(const Cache& c, const core::CacheRows& src, int64_t seq, int64_t head, int64_t k0,
                 int64_t keys, float* dst) {
  const core::Rows rows{src.data, c.dtype, src.row_stride, src.head_stride};
  for (int64_t t = 0; t < keys;) {
    // A run of rows within one page is one strided copy.
    const int64_t token = k0 + t;
    const int64_t run = std::min(keys - t, c.page_size - token % c.page_size);
    const int64_t base = c.page_of(seq, token) * src.page_stride;
    const core::Rows page{static_cast<char*>(src.data) + base * dtype_size(c.dtype), c.dtype,
                          rows.token_stride, rows.head_stride};
    load_rows(page, token % c.page_size, head, run, c.head_dim, dst + t * c.head_dim);
    t += run;
  }
}

void attend_item(const Decode& d, const Cache& c, const Unit& u, Item& it, Workspace& w) {
  const int64_t dim = c.head_dim, bs = c.block_size, group = d.group;
  const float scale = d.softmax_scale;
  it.m.assign(static_cast<size_t>(u.rows), -std::numeric_limits<float>::infinity());
  it.l.assign(static_cast<size_t>(u.rows), 0.0f);
  it.acc.assign(static_cast<size_t>(u.rows * dim), 0.0f);
  w.kbuf.resize(static_cast<size_t>(kKeyTile * dim));
  w.vbuf.resize(static_cast<size_t>(kKeyTile * dim));
  w.qg.resize(static_cast<size_t>(kRowTile * dim));
  w.s.resize(static_cast<size_t>(kRowTile * kKeyTile));
  w.prod.resize(static_cast<size_t>(kRowTile * dim));
  w.alpha.resize(static_cast<size_t>(kRowTile));
  w.rows.resize(static_cast<size_t>(kRowTile));
  w.valid.resize(static_cast<size_t>(kRowTile));

  for (int64_t bi = it.first; bi < it.last; ++bi) {
    const int64_t j = u.blocks[static_cast<size_t>(bi)];
    const int32_t* chosen = u.block_rows.data() + u.row_offset[static_cast<size_t>(bi)];
    const int64_t count =
        u.row_offset[static_cast<size_t>(bi + 1)] - u.row_offset[static_cast<size_t>(bi)];
    const int64_t reach = u.reach[static_cast<size_t>(bi)];
    for (int64_t k0 = j * bs; k0 < reach; k0 += kKeyTile) {
      const int64_t keys = std::min(kKeyTile, reach - k0);
      gather_keys(c, c.k, u.seq, u.kv_head, k0, keys, w.kbuf.data());
      gather_keys(c, c.v, u.seq, u.kv_head, k0, keys, w.vbuf.data());
      // Rows in ascending position order: those before k0 see nothing here.
      int64_t i = 0;
      while (i < count && u.position(chosen[i], group) < k0) ++i;
      for (; i < count; i += kRowTile) {
        const int64_t n = std::min(kRowTile, count - i);
        for (int64_t r = 0; r < n; ++r) {
          const int32_t row = chosen[i + r];
          w.rows[static_cast<size_t>(r)] = row;
          w.valid[static_cast<size_t>(r)] =
              static_cast<int32_t>(std::min(keys, u.position(row, group) - k0 + 1));
          std::copy_n(u.q.data() + row * dim, dim, w.qg.data() + r * dim);
        }
        gemm_nt(n, keys, dim, w.qg.data(), dim, w.kbuf.data(), dim, w.s.data(), keys);
        for (int64_t r = 0; r < n; ++r) {  // online softmax, as the prefill path
          const auto row = static_cast<size_t>(w.rows[static_cast<size_t>(r)]);
          const int64_t valid = w.valid[static_cast<size_t>(r)];
          float* s = w.s.data() + r * keys;
          const float m_new = std::max(it.m[row], max_of(s, valid) * scale);
          const float sum = exp_scaled(s, valid, scale, m_new);
          std::fill(s + valid, s + keys, 0.0f);
          const float a = std::exp(it.m[row] - m_new);  // 0 on the first tile
          w.alpha[static_cast<size_t>(r)] = a;
          it.l[row] = it.l[row] * a + sum;
          it.m[row] = m_new;
        }
        gemm_nn(n, dim, keys, w.s.data(), keys, w.vbuf.data(), dim, w.prod.data(), dim);
        for (int64_t r = 0; r < n; ++r) {
          float* acc = it.acc.data() + w.rows[static_cast<size_t>(r)] * dim;
          const float a = w.alpha[static_cast<size_t>(r)];
          const float* o = w.prod.data() + r * dim;
          for (int64_t x = 0; x < dim; ++x) acc[x] = acc[x] * a + o[x];
        }
      }
    }
  }
}

}  // namespace

void kv_append(const Cache& c, const core::Append& a, int num_threads) {
  const int threads = resolve_threads(num_threads);
  const int64_t dim = c.head_dim, bs = c.block_size;
  const auto bytes = static_cast<size_t>(dim * dtype_size(c.dtype));
  std::vector<std::vector<float>> rows(static_cast<size_t>(threads),
                                       std::vector<float>(static_cast<size_t>(dim)));
  // One task per (sequence, kv head): rows of distinct tasks never meet.
  parallel_for(c.batch * c.heads_kv, threads, [&](int worker, int64_t t) {
    const int64_t b = t / c.heads_kv, h = t % c.heads_kv;
    const int64_t begin = a.begin[static_cast<size_t>(b)];
    const int64_t added = a.begin[static_cast<size_t>(b + 1)] - begin;
    const int64_t len = c.length(b);
    float* row = rows[static_cast<size_t>(worker)].data();
    const int64_t elem = dtype_size(c.dtype);
    for (int64_t i = 0; i < added; ++i) {
      const int64_t pos = len + i;
      std::memcpy(static_cast<char*>(c.k.data) + c.offset(c.k, b, pos, h) * elem,
                  static_cast<const char*>(a.k.data) + a.k.offset(begin + i, h) * elem, bytes);
      std::memcpy(static_cast<char*>(c.v.data) + c.offset(c.v, b, pos, h) * elem,
                  static_cast<const char*>(a.v.data) + a.v.offset(begin + i, h) * elem, bytes);
      // Running fp32 sum in token order: the same additions as a prefill's
      // block means, so both paths route identically.
      load_rows(a.k, begin + i, h, 1, dim, row);
      float* sum = c.block_sum(b, pos / bs, h);
      if (pos % bs == 0)
        std::copy_n(row, dim, sum);
      else
        for (int64_t x = 0; x < dim; ++x) sum[x] += row[x];
    }
  });
  for (int64_t b = 0; b < c.batch; ++b)
    c.seqlens[b * c.seqlens_stride] +=
        static_cast<int32_t>(a.begin[static_cast<size_t>(b + 1)] - a.begin[static_cast<size_t>(b)]);
}

void kv_decode(const Cache& c, const Decode& d, const core::Rows& out, const core::Lse& lse,
               int num_threads) {
  const int threads = resolve_threads(num_threads);
  const std::vector<Unit> units = route_all(d, c, threads);
  std::vector<Item> items = split_items(units, threads);
  std::vector<Workspace> workspaces(static_cast<size_t>(threads));
  parallel_for(static_cast<int64_t>(items.size()), threads, [&](int worker, int64_t t) {
    Item& it = items[static_cast<size_t>(t)];
    attend_item(d, c, units[static_cast<size_t>(it.unit)], it,
                workspaces[static_cast<size_t>(worker)]);
  });

  // Items of one unit are consecutive: merge them row by row.
  std::vector<int64_t> first_item(units.size() + 1, 0);
  for (const Item& it : items) ++first_item[static_cast<size_t>(it.unit + 1)];
  for (size_t i = 0; i < units.size(); ++i) first_item[i + 1] += first_item[i];
  const int64_t dim = c.head_dim;
  parallel_for(static_cast<int64_t>(units.size()), threads, [&](int, int64_t ui) {
    const Unit& u = units[static_cast<size_t>(ui)];
    std::vector<float> acc(static_cast<size_t>(dim));
    const int64_t i0 = first_item[static_cast<size_t>(ui)],
                  i1 = first_item[static_cast<size_t>(ui + 1)];
    for (int64_t r = 0; r < u.rows; ++r) {
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t i = i0; i < i1; ++i)
        if (items[static_cast<size_t>(i)].l[static_cast<size_t>(r)] > 0.0f)
          m = std::max(m, items[static_cast<size_t>(i)].m[static_cast<size_t>(r)]);
      float l = 0.0f;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t i = i0; i < i1; ++i) {
        const Item& it = items[static_cast<size_t>(i)];
        if (!(it.l[static_cast<size_t>(r)] > 0.0f)) continue;
        const float w = std::exp(it.m[static_cast<size_t>(r)] - m);
        l += it.l[static_cast<size_t>(r)] * w;
        const float* a = it.acc.data() + r * dim;
        for (int64_t x = 0; x < dim; ++x) acc[static_cast<size_t>(x)] += a[x] * w;
      }
      const float inv = 1.0f / l;
      for (float& x : acc) x *= inv;
      const int64_t token = d.q_begin[static_cast<size_t>(u.seq)] + r / d.group;
      const int64_t head = u.kv_head * d.group + r % d.group;
      store_row(out, out.offset(token, head), acc.data(), dim);
      if (lse.data != nullptr) lse.at(head, token) = m + std::log(l);
    }
  });
}

void kv_routing(const Cache& c, const Decode& d, const Selection& sel, int num_threads) {
  const int threads = resolve_threads(num_threads);
  const std::vector<Unit> units = route_all(d, c, threads);
  for (const Unit& u : units)
    for (int64_t r = 0; r < u.rows; ++r) {
      int32_t* dst = sel.at(d.q_begin[static_cast<size_t>(u.seq)] + r / d.group,
                            u.kv_head * d.group + r % d.group);
      const int32_t* src = u.selected.data() + r * u.width;
      std::copy_n(src, u.width, dst);
      std::fill(dst + u.width, dst + sel.width, -1);
    }
}

int64_t kv_bytes_read(const Cache& c, const Decode& d, int num_threads) {
  const std::vector<Unit> units = route_all(d, c, resolve_threads(num_threads));
  int64_t keys = 0;
  for (const Unit& u : units)
    for (size_t i = 0; i < u.blocks.size(); ++i) keys += u.reach[i] - u.blocks[i] * c.block_size;
  return keys * c.head_dim * dtype_size(c.dtype) * 2;  // K and V
}

}  // namespace moba::backends::cpu
