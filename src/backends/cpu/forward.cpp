// Fast CPU forward: for each unit of queries sharing a current block, attend
// block by block with online softmax. Past blocks are processed MoE-style:
// the rows that selected a block are gathered into one dense tile, so no
// work is spent on blocks a row did not choose.
#include <cmath>
#include <limits>
#include <vector>

#include "backends/backend.hpp"
#include "backends/cpu/kernels.hpp"
#include "backends/cpu/parallel.hpp"
#include "backends/cpu/plan.hpp"

namespace moba::backends::cpu {
namespace {

using core::Problem;

constexpr int64_t kRowTile = 128;  // gathered rows per product
constexpr int64_t kKeyTile = 512;  // keys per product

struct Workspace {
  UnitRouting routing;
  std::vector<float> acc, m, l;  // per unit row: output accumulator, running max and sum
  std::vector<float> qg, s, o, kbuf, vbuf;
};

// One online-softmax step for `n` rows against a key tile: s[i, 0 .. valid(i))
// are raw scores; afterwards the probabilities relative to the new running
// max, and acc rows rescaled and increased by P V.
template <class RowOf, class ValidOf>
void attend_tile(const Problem& p, Workspace& w, int64_t n, int64_t keys, const Tile& v,
                 RowOf row_of, ValidOf valid_of) {
  const int64_t d = p.head_dim;
  const float scale = p.softmax_scale;
  std::vector<float>& alpha = w.o;  // reuse: alpha first, products after
  alpha.resize(static_cast<size_t>(n * d + n));
  float* prod = alpha.data() + n;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = row_of(i);
    const int64_t valid = valid_of(i);
    float* s = w.s.data() + i * keys;
    float& m = w.m[static_cast<size_t>(row)];
    float& l = w.l[static_cast<size_t>(row)];
    const float m_new = std::max(m, max_of(s, valid) * scale);
    const float sum = exp_scaled(s, valid, scale, m_new);
    std::fill(s + valid, s + keys, 0.0f);
    const float a = std::exp(m - m_new);  // 0 on the first tile (m = -inf)
    alpha[static_cast<size_t>(i)] = a;
    l = l * a + sum;
    m = m_new;
  }
  gemm_nn(n, d, keys, w.s.data(), keys, v.data, v.ld, prod, d);
  for (int64_t i = 0; i < n; ++i) {
    float* acc = w.acc.data() + row_of(i) * d;
    const float a = alpha[static_cast<size_t>(i)];
    const float* o = prod + i * d;
    for (int64_t c = 0; c < d; ++c) acc[c] = acc[c] * a + o[c];
  }
}

void forward_unit(const Problem& p, const BlockMeans& means, const QueryUnit& u, Workspace& w,
                  const core::Rows& out, const core::Lse& lse) {
  const core::Sequence& seq = p.sequences[static_cast<size_t>(u.seq)];
  const int64_t d = p.head_dim;
  const int64_t bs = p.block_size;
  route_unit(p, means, u, w.routing);
  const UnitRouting& r = w.routing;
  w.acc.assign(static_cast<size_t>(r.rows * d), 0.0f);
  w.m.assign(static_cast<size_t>(r.rows), -std::numeric_limits<float>::infinity());
  w.l.assign(static_cast<size_t>(r.rows), 0.0f);
  w.s.resize(static_cast<size_t>(kRowTile * kKeyTile));
  w.qg.resize(static_cast<size_t>(kRowTile * d));
  w.kbuf.resize(static_cast<size_t>(kKeyTile * d));
  w.vbuf.resize(static_cast<size_t>(kKeyTile * d));

  // Past blocks: gather the rows that chose each one.
  for (int64_t j = 0; j < u.block; ++j) {
    const int32_t* rows = r.past_rows.data() + r.past_offset[static_cast<size_t>(j)];
    const int64_t count =
        r.past_offset[static_cast<size_t>(j + 1)] - r.past_offset[static_cast<size_t>(j)];
    if (count == 0) continue;
    for (int64_t k0 = j * bs; k0 < (j + 1) * bs; k0 += kKeyTile) {
      const int64_t keys = std::min(kKeyTile, (j + 1) * bs - k0);
      const Tile k = key_tile(p.k, seq.k_begin + k0, u.kv_head, keys, d, w.kbuf.data());
      const Tile v = key_tile(p.v, seq.k_begin + k0, u.kv_head, keys, d, w.vbuf.data());
      for (int64_t i0 = 0; i0 < count; i0 += kRowTile) {
        const int64_t n = std::min(kRowTile, count - i0);
        for (int64_t i = 0; i < n; ++i)
          std::copy_n(r.q.data() + rows[i0 + i] * d, d, w.qg.data() + i * d);
        gemm_nt(n, keys, d, w.qg.data(), d, k.data, k.ld, w.s.data(), keys);
        attend_tile(
            p, w, n, keys, v, [&](int64_t i) { return rows[i0 + i]; },
            [&](int64_t) { return keys; });
      }
    }
  }

  // The current block, causally: every row, keys up to the row's position.
  const int64_t c0 = u.block * bs;
  const int64_t c1 = std::min(c0 + bs, seq.len_k);
  const int64_t last_pos = row_position(p, u, r.rows - 1);
  for (int64_t k0 = c0; k0 <= last_pos && k0 < c1; k0 += kKeyTile) {
    const int64_t keys = std::min(kKeyTile, c1 - k0);
    const Tile k = key_tile(p.k, seq.k_begin + k0, u.kv_head, keys, d, w.kbuf.data());
    const Tile v = key_tile(p.v, seq.k_begin + k0, u.kv_head, keys, d, w.vbuf.data());
    // Rows whose position is before k0 see no key of this tile.
    const int64_t first_row = std::max<int64_t>(0, (k0 - row_position(p, u, 0))) * p.group;
    for (int64_t i0 = first_row; i0 < r.rows; i0 += kRowTile) {
      const int64_t n = std::min(kRowTile, r.rows - i0);
      // Keys after the tile's last query are masked for all its rows: skip them.
      const int64_t width = std::min(keys, row_position(p, u, i0 + n - 1) - k0 + 1);
      gemm_nt(n, width, d, r.q.data() + i0 * d, d, k.data, k.ld, w.s.data(), width);
      attend_tile(
          p, w, n, width, v, [&](int64_t i) { return i0 + i; },
          [&](int64_t i) { return std::min(width, row_position(p, u, i0 + i) - k0 + 1); });
    }
  }

  for (int64_t row = 0; row < r.rows; ++row) {
    const int64_t token = seq.q_begin + u.q_begin + row / p.group;
    const int64_t head = u.kv_head * p.group + row % p.group;
    float* acc = w.acc.data() + row * d;
    const float inv = 1.0f / w.l[static_cast<size_t>(row)];
    for (int64_t c = 0; c < d; ++c) acc[c] *= inv;
    store_row(out, out.offset(token, head), acc, d);
    if (lse.data != nullptr)
      lse.at(head, token) = w.m[static_cast<size_t>(row)] + std::log(w.l[static_cast<size_t>(row)]);
  }
}

}  // namespace

void forward(const Problem& p, const core::Rows& out, const core::Lse& lse, int num_threads) {
  const int threads = resolve_threads(num_threads);
  const BlockMeans means = compute_block_means(p, threads);
  const std::vector<QueryUnit> units = query_units(p, threads);
  std::vector<Workspace> workspaces(static_cast<size_t>(threads));
  parallel_for(static_cast<int64_t>(units.size()), threads, [&](int worker, int64_t t) {
    forward_unit(p, means, units[static_cast<size_t>(t)], workspaces[static_cast<size_t>(worker)],
                 out, lse);
  });
}

}  // namespace moba::backends::cpu
