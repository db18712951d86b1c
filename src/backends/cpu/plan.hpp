// How the CPU backend cuts a problem into work: block means, units of
// queries that share a current block, and each unit's routing with the
// inverse lists (for every key block, the rows that selected it).
#pragma once

#include <cstdint>
#include <vector>

#include "core/problem.hpp"

namespace moba::backends::cpu {

/// Mean keys kbar_j (spec step 2) of every block of every sequence and kv
/// head, fp32 values rounded to k's dtype: [sum of blocks, Hkv, D].
struct BlockMeans {
  std::vector<float> values;
  std::vector<int64_t> first_block;  // per sequence: index of its block 0
  int64_t heads_kv = 0, head_dim = 0;

  const float* at(int64_t seq, int64_t block, int64_t kv_head) const noexcept {
    return values.data() +
           ((first_block[static_cast<size_t>(seq)] + block) * heads_kv + kv_head) * head_dim;
  }
  /// Leading dimension between consecutive blocks of one head.
  int64_t block_stride() const noexcept { return heads_kv * head_dim; }
};

BlockMeans compute_block_means(const core::Problem& p, int threads);

/// Queries of one sequence whose current block is `block`, for one kv head.
/// Rows are (query, head of the group) pairs: row r is query q_begin + r /
/// group of query head kv_head * group + r % group.
struct QueryUnit {
  int32_t seq = 0;
  int32_t kv_head = 0;
  int64_t block = 0;
  int64_t q_begin = 0, q_end = 0;  // query indices within the sequence
};

/// Units covering every query of every sequence and kv head, largest first.
/// Blocks are split into query chunks when there would be too few units to
/// keep `threads` workers busy.
std::vector<QueryUnit> query_units(const core::Problem& p, int threads);

/// A unit's queries and routing. Every row of a unit has the same current
/// block, so each selects `width` = num_selected(block, top_k) blocks.
struct UnitRouting {
  int64_t rows = 0, width = 0;
  std::vector<float> q;              // [rows, D] fp32
  std::vector<int32_t> selected;     // [rows, width], ascending, last = current block
  std::vector<int32_t> past_offset;  // [block + 1]: rows of past block j are
  std::vector<int32_t> past_rows;    //   past_rows[past_offset[j] .. past_offset[j+1])
  std::vector<float> scores;         // scratch
};

/// Loads the unit's queries and routes them (spec steps 3-4).
void route_unit(const core::Problem& p, const BlockMeans& means, const QueryUnit& unit,
                UnitRouting& r);

/// Position of row `row` of `unit` within its sequence.
inline int64_t row_position(const core::Problem& p, const QueryUnit& u, int64_t row) noexcept {
  return p.sequences[static_cast<size_t>(u.seq)].q_offset() + u.q_begin + row / p.group;
}

}  // namespace moba::backends::cpu
