// Fast CPU backward, in two deterministic passes that never race:
//   1. query-major: for each unit of queries, dQ over its selected blocks
//      (rows gathered per past block, as in the forward), recording the
//      routing it used;
//   2. key-major: for each tile of keys of one block, dK and dV from every
//      row that attended to it (the rows of later blocks that selected it,
//      and the block's own queries causally).
// Probabilities are recomputed from the saved log-sum-exp; delta_i =
// <dO_i, O_i> as in FlashAttention.
#include <algorithm>
#include <cmath>
#include <vector>

#include "backends/backend.hpp"
#include "backends/cpu/kernels.hpp"
#include "backends/cpu/parallel.hpp"
#include "backends/cpu/plan.hpp"
#include "core/routing.hpp"

namespace moba::backends::cpu {
namespace {

using core::Problem;

constexpr int64_t kRowTile = 128;
constexpr int64_t kKeyTile = 256;

/// A (token, query head) pair.
struct RowRef {
  int32_t token;
  int32_t head;
};

struct Context {
  const Problem& p;
  const core::Rows& dout;
  const core::Lse& lse;
  std::vector<float> delta;  // [total_q, Hq]

  float delta_at(int64_t token, int64_t head) const {
    return delta[static_cast<size_t>(token * p.heads_q + head)];
  }
};

// Gradient products of one tile of n gathered rows against `keys` keys:
// given q, dO, lse and delta of the rows and the number of valid keys of each
// row, leaves dS (already multiplied by the softmax scale) in `ds` and P in
// `prob`.
struct TileBuffers {
  std::vector<float> q, dout, lse, delta, prob, ds;
  std::vector<int64_t> valid;

  void reserve(int64_t d) {
    q.resize(static_cast<size_t>(kRowTile * d));
    dout.resize(static_cast<size_t>(kRowTile * d));
    lse.resize(static_cast<size_t>(kRowTile));
    delta.resize(static_cast<size_t>(kRowTile));
    valid.resize(static_cast<size_t>(kRowTile));
    prob.resize(static_cast<size_t>(kRowTile * kKeyTile));
    ds.resize(static_cast<size_t>(kRowTile * kKeyTile));
  }

  void load(const Context& c, int64_t i, RowRef row) {
    const int64_t d = c.p.head_dim;
    load_rows(c.p.q, row.token, row.head, 1, d, q.data() + i * d);
    load_rows(c.dout, row.token, row.head, 1, d, dout.data() + i * d);
    lse[static_cast<size_t>(i)] = c.lse.at(row.head, row.token);
    delta[static_cast<size_t>(i)] = c.delta_at(row.token, row.head);
  }
};

void softmax_grad_tile(const Problem& p, TileBuffers& b, int64_t n, int64_t keys, const Tile& k,
                       const Tile& v) {
  const int64_t d = p.head_dim;
  const float scale = p.softmax_scale;
  gemm_nt(n, keys, d, b.q.data(), d, k.data, k.ld, b.prob.data(), keys);   // S
  gemm_nt(n, keys, d, b.dout.data(), d, v.data, v.ld, b.ds.data(), keys);  // dP
  for (int64_t i = 0; i < n; ++i) {
    float* prob = b.prob.data() + i * keys;
    float* ds = b.ds.data() + i * keys;
    const int64_t valid = b.valid[static_cast<size_t>(i)];
    exp_scaled(prob, valid, scale, b.lse[static_cast<size_t>(i)]);
    std::fill(prob + valid, prob + keys, 0.0f);
    const float delta = b.delta[static_cast<size_t>(i)];
#pragma omp simd
    for (int64_t x = 0; x < keys; ++x) ds[x] = prob[x] * (ds[x] - delta) * scale;
  }
}

struct QueryWorkspace {
  UnitRouting routing;
  TileBuffers tile;
  std::vector<float> dq, dq_tile, kbuf, vbuf;
};

// Pass 1 for one unit: dQ of its rows; stores its past selections into
// `past` ([total_q, Hq, top_k - 1]) when the unit routes (top_k <= block).
void dq_unit(const Context& c, const BlockMeans& means, const QueryUnit& u, QueryWorkspace& w,
             const core::Rows& dq_out, std::vector<int32_t>& past) {
  const Problem& p = c.p;
  const core::Sequence& seq = p.sequences[static_cast<size_t>(u.seq)];
  const int64_t d = p.head_dim, bs = p.block_size, group = p.group;
  route_unit(p, means, u, w.routing);
  const UnitRouting& r = w.routing;
  const auto ref_of = [&](int64_t row) {
    return RowRef{static_cast<int32_t>(seq.q_begin + u.q_begin + row / group),
                  static_cast<int32_t>(u.kv_head * group + row % group)};
  };
  if (r.width < u.block + 1) {  // explicit routing: remember it for pass 2
    for (int64_t row = 0; row < r.rows; ++row) {
      const RowRef ref = ref_of(row);
      std::copy_n(
          r.selected.data() + row * r.width, r.width - 1,
          past.data() + (static_cast<int64_t>(ref.token) * p.heads_q + ref.head) * (p.top_k - 1));
    }
  }
  w.dq.assign(static_cast<size_t>(r.rows * d), 0.0f);
  w.dq_tile.resize(static_cast<size_t>(kRowTile * d));
  w.kbuf.resize(static_cast<size_t>(kKeyTile * d));
  w.vbuf.resize(static_cast<size_t>(kKeyTile * d));
  w.tile.reserve(d);

  // Rows `rows[0 .. count)` of the unit against keys [k0, k1) of the sequence.
  const auto process = [&](const int32_t* rows, int64_t count, int64_t k0, int64_t k1,
                           bool causal) {
    for (int64_t t0 = k0; t0 < k1; t0 += kKeyTile) {
      const int64_t keys = std::min(kKeyTile, k1 - t0);
      const Tile k = key_tile(p.k, seq.k_begin + t0, u.kv_head, keys, d, w.kbuf.data());
      const Tile v = key_tile(p.v, seq.k_begin + t0, u.kv_head, keys, d, w.vbuf.data());
      for (int64_t i0 = 0; i0 < count; i0 += kRowTile) {
        const int64_t n = std::min(kRowTile, count - i0);
        // Causal rows ascend: keys after the tile's last query are masked for all of them.
        const int64_t width =
            causal ? std::min(keys, row_position(p, u, rows[i0 + n - 1]) - t0 + 1) : keys;
        int64_t live = 0;  // rows with at least one visible key, packed first
        for (int64_t i = 0; i < n; ++i) {
          const int64_t row = rows[i0 + i];
          const int64_t valid = causal ? std::min(width, row_position(p, u, row) - t0 + 1) : keys;
          if (valid <= 0) continue;
          w.tile.load(c, live, ref_of(row));
          w.tile.valid[static_cast<size_t>(live)] = valid;
          ++live;
        }
        if (live == 0) continue;
        softmax_grad_tile(p, w.tile, live, width, k, v);
        gemm_nn(live, d, width, w.tile.ds.data(), width, k.data, k.ld, w.dq_tile.data(), d);
        int64_t slot = 0;
        for (int64_t i = 0; i < n; ++i) {
          const int64_t row = rows[i0 + i];
          if (causal && row_position(p, u, row) < t0) continue;
          float* acc = w.dq.data() + row * d;
          const float* add = w.dq_tile.data() + slot * d;
          for (int64_t x = 0; x < d; ++x) acc[x] += add[x];
          ++slot;
        }
      }
    }
  };

  for (int64_t j = 0; j < u.block; ++j) {
    const int64_t begin = r.past_offset[static_cast<size_t>(j)];
    const int64_t count = r.past_offset[static_cast<size_t>(j + 1)] - begin;
    if (count > 0) process(r.past_rows.data() + begin, count, j * bs, (j + 1) * bs, false);
  }
  std::vector<int32_t> all(static_cast<size_t>(r.rows));
  for (int64_t row = 0; row < r.rows; ++row)
    all[static_cast<size_t>(row)] = static_cast<int32_t>(row);
  process(all.data(), r.rows, u.block * bs, std::min((u.block + 1) * bs, seq.len_k), true);

  for (int64_t row = 0; row < r.rows; ++row) {
    const RowRef ref = ref_of(row);
    store_row(dq_out, dq_out.offset(ref.token, ref.head), w.dq.data() + row * d, d);
  }
}

/// A tile of keys [k0, k1) of block `block` of one sequence and kv head.
struct KeyUnit {
  int32_t seq, kv_head;
  int64_t block, k0, k1;
};

struct KeyWorkspace {
  TileBuffers tile;
  std::vector<RowRef> rows;
  std::vector<float> dk, dv, kbuf, vbuf;
};

// Pass 2 for one key tile: dK and dV from every row that attended to it.
void dkv_unit(const Context& c, const KeyUnit& u, const std::vector<int64_t>& bucket_offset,
              const std::vector<RowRef>& bucket_rows, int64_t bucket, KeyWorkspace& w,
              const Gradients& g) {
  const Problem& p = c.p;
  const core::Sequence& seq = p.sequences[static_cast<size_t>(u.seq)];
  const int64_t d = p.head_dim, bs = p.block_size, group = p.group, off = seq.q_offset();
  const int64_t keys = u.k1 - u.k0;

  // Rows that attended to this block: explicit selections of routed queries,
  // every query of the blocks that select all their past blocks (those before
  // block top_k), and the block's own queries (causally).
  w.rows.assign(bucket_rows.begin() + bucket_offset[static_cast<size_t>(bucket)],
                bucket_rows.begin() + bucket_offset[static_cast<size_t>(bucket + 1)]);
  const auto add_positions = [&](int64_t pos_begin, int64_t pos_end) {
    for (int64_t pos = std::max(pos_begin, off); pos < std::min(pos_end, seq.len_k); ++pos)
      for (int64_t h = 0; h < group; ++h)
        w.rows.push_back(RowRef{static_cast<int32_t>(seq.q_begin + pos - off),
                                static_cast<int32_t>(u.kv_head * group + h)});
  };
  add_positions((u.block + 1) * bs,
                std::min<int64_t>(p.top_k, core::num_blocks(seq.len_k, bs)) * bs);
  const int64_t causal_from = static_cast<int64_t>(w.rows.size());
  add_positions(std::max(u.block * bs, u.k0),
                (u.block + 1) * bs);  // queries before k0 see none of these keys

  w.tile.reserve(d);
  w.kbuf.resize(static_cast<size_t>(kKeyTile * d));
  w.vbuf.resize(static_cast<size_t>(kKeyTile * d));
  w.dk.assign(static_cast<size_t>(keys * d), 0.0f);
  w.dv.assign(static_cast<size_t>(keys * d), 0.0f);
  const Tile k = key_tile(p.k, seq.k_begin + u.k0, u.kv_head, keys, d, w.kbuf.data());
  const Tile v = key_tile(p.v, seq.k_begin + u.k0, u.kv_head, keys, d, w.vbuf.data());
  const int64_t count = static_cast<int64_t>(w.rows.size());
  // Rows [begin, end) in tiles; the block's own queries (from causal_from on,
  // ascending) see only keys up to their position, so their tiles stop at the
  // last row's position.
  const auto run_tiles = [&](int64_t begin, int64_t end, bool causal) {
    for (int64_t i0 = begin; i0 < end; i0 += kRowTile) {
      const int64_t n = std::min(kRowTile, end - i0);
      const auto pos_of = [&](int64_t i) {
        return off + w.rows[static_cast<size_t>(i0 + i)].token - seq.q_begin;
      };
      const int64_t width = causal ? std::min(keys, pos_of(n - 1) - u.k0 + 1) : keys;
      for (int64_t i = 0; i < n; ++i) {
        w.tile.load(c, i, w.rows[static_cast<size_t>(i0 + i)]);
        w.tile.valid[static_cast<size_t>(i)] =
            causal ? std::min(width, pos_of(i) - u.k0 + 1) : keys;
      }
      softmax_grad_tile(p, w.tile, n, width, k, v);
      gemm_tn(width, d, n, w.tile.prob.data(), width, w.tile.dout.data(), d, w.dv.data(), d,
              1.0f);  // dV += P^T dO
      gemm_tn(width, d, n, w.tile.ds.data(), width, w.tile.q.data(), d, w.dk.data(), d,
              1.0f);  // dK += dS^T Q
    }
  };
  run_tiles(0, causal_from, false);
  run_tiles(causal_from, count, true);
  for (int64_t t = 0; t < keys; ++t) {
    store_row(g.dk, g.dk.offset(seq.k_begin + u.k0 + t, u.kv_head), w.dk.data() + t * d, d);
    store_row(g.dv, g.dv.offset(seq.k_begin + u.k0 + t, u.kv_head), w.dv.data() + t * d, d);
  }
}

}  // namespace

void backward(const Problem& p, const core::Rows& out, const core::Rows& dout, const core::Lse& lse,
              const Gradients& g, int num_threads) {
  const int threads = resolve_threads(num_threads);
  const int64_t d = p.head_dim;
  Context c{p, dout, lse, std::vector<float>(static_cast<size_t>(p.total_q * p.heads_q), 0.0f)};
  parallel_for(p.total_q, threads, [&](int, int64_t t) {
    std::vector<float> o(static_cast<size_t>(d)), dO(static_cast<size_t>(d));
    for (int64_t h = 0; h < p.heads_q; ++h) {
      load_rows(out, t, h, 1, d, o.data());
      load_rows(dout, t, h, 1, d, dO.data());
      float sum = 0.0f;
      for (int64_t x = 0; x < d; ++x) sum += o[static_cast<size_t>(x)] * dO[static_cast<size_t>(x)];
      c.delta[static_cast<size_t>(t * p.heads_q + h)] = sum;
    }
  });

  // Pass 1: dQ, and the routing of routed queries.
  const BlockMeans means = compute_block_means(p, threads);
  const std::vector<QueryUnit> units = query_units(p, threads);
  int64_t max_blocks = 0;
  for (const auto& s : p.sequences)
    max_blocks = std::max(max_blocks, core::num_blocks(s.len_k, p.block_size));
  const bool routed = p.top_k < max_blocks;  // else every query selects all its past blocks
  std::vector<int32_t> past(routed ? static_cast<size_t>(p.total_q * p.heads_q * (p.top_k - 1)) : 0,
                            -1);
  {
    std::vector<QueryWorkspace> ws(static_cast<size_t>(threads));
    parallel_for(static_cast<int64_t>(units.size()), threads, [&](int worker, int64_t t) {
      dq_unit(c, means, units[static_cast<size_t>(t)], ws[static_cast<size_t>(worker)], g.dq, past);
    });
  }

  // Inverse index of the explicit selections: per (block of a sequence, kv
  // head), the rows that chose it.
  const int64_t buckets = static_cast<int64_t>(means.values.size()) / std::max<int64_t>(1, d);
  std::vector<int64_t> bucket_offset(static_cast<size_t>(buckets + 1), 0);
  std::vector<RowRef> bucket_rows;
  if (routed && p.top_k > 1) {
    const auto for_each_choice = [&](auto&& fn) {
      for (size_t s = 0; s < p.sequences.size(); ++s) {
        const core::Sequence& seq = p.sequences[s];
        for (int64_t i = 0; i < seq.len_q; ++i) {
          if ((seq.q_offset() + i) / p.block_size < p.top_k) continue;  // not routed
          const int64_t token = seq.q_begin + i;
          for (int64_t h = 0; h < p.heads_q; ++h) {
            const int32_t* sel = past.data() + (token * p.heads_q + h) * (p.top_k - 1);
            for (int64_t m = 0; m + 1 < p.top_k; ++m)
              fn((means.first_block[s] + sel[m]) * p.heads_kv + p.kv_head(h),
                 RowRef{static_cast<int32_t>(token), static_cast<int32_t>(h)});
          }
        }
      }
    };
    for_each_choice([&](int64_t b, RowRef) { ++bucket_offset[static_cast<size_t>(b + 1)]; });
    for (int64_t b = 0; b < buckets; ++b)
      bucket_offset[static_cast<size_t>(b + 1)] += bucket_offset[static_cast<size_t>(b)];
    bucket_rows.resize(static_cast<size_t>(bucket_offset[static_cast<size_t>(buckets)]));
    std::vector<int64_t> fill(bucket_offset.begin(), bucket_offset.end() - 1);
    for_each_choice([&](int64_t b, RowRef r) {
      bucket_rows[static_cast<size_t>(fill[static_cast<size_t>(b)]++)] = r;
    });
  }

  // Pass 2: dK and dV per key tile.
  std::vector<KeyUnit> key_units;
  for (size_t s = 0; s < p.sequences.size(); ++s) {
    const core::Sequence& seq = p.sequences[s];
    for (int64_t j = 0; j < core::num_blocks(seq.len_k, p.block_size); ++j)
      for (int64_t k0 = j * p.block_size; k0 < std::min((j + 1) * p.block_size, seq.len_k);
           k0 += kKeyTile)
        for (int64_t h = 0; h < p.heads_kv; ++h)
          key_units.push_back(
              KeyUnit{static_cast<int32_t>(s), static_cast<int32_t>(h), j, k0,
                      std::min({k0 + kKeyTile, (j + 1) * p.block_size, seq.len_k})});
  }
  std::vector<KeyWorkspace> ws(static_cast<size_t>(threads));
  parallel_for(static_cast<int64_t>(key_units.size()), threads, [&](int worker, int64_t t) {
    const KeyUnit& u = key_units[static_cast<size_t>(t)];
    const int64_t bucket =
        (means.first_block[static_cast<size_t>(u.seq)] + u.block) * p.heads_kv + u.kv_head;
    dkv_unit(c, u, bucket_offset, bucket_rows, bucket, ws[static_cast<size_t>(worker)], g);
  });
}

}  // namespace moba::backends::cpu
