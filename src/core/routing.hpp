// The routing rule of MoBA (spec, steps 1 and 4), defined once for every
// backend: which blocks a query attends to, given its gate scores.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace moba::core {

/// Number of blocks of a sequence of `len` keys.
inline int64_t num_blocks(int64_t len, int64_t block_size) noexcept {
  return len == 0 ? 0 : 1 + (len - 1) / block_size;  // no overflow for huge blocks
}

/// Blocks the query at block `current` selects: min(top_k, current + 1).
inline int64_t num_selected(int64_t current, int64_t top_k) noexcept {
  return std::min(top_k, current + 1);
}

/// Whether past block `a` ranks above past block `b` by their scores: higher
/// score first, NaN lowest, ties toward the lower block index.
template <class Score>
inline bool ranks_above(const Score* scores, int32_t a, int32_t b) noexcept {
  const Score sa = scores[a];
  const Score sb = scores[b];
  const bool na = std::isnan(sa);
  const bool nb = std::isnan(sb);
  if (na != nb) return nb;
  if (!na && sa != sb) return sa > sb;
  return a < b;
}

/// Selects the blocks of a query whose current block is `current`:
/// `current` itself plus the top_k - 1 best past blocks 0 .. current - 1 by
/// `scores` (indexed by block; only the past entries are read). Writes the
/// selection in ascending order to out[0 .. count) and -1 to out[count ..
/// width), and returns count = num_selected(current, top_k). Requires
/// width >= count.
template <class Score>
int64_t select_blocks(const Score* scores, int64_t current, int64_t top_k, int32_t* out,
                      int64_t width) noexcept {
  const int64_t count = num_selected(current, top_k);
  const int64_t past = count - 1;
  if (past == current) {  // every past block fits
    for (int64_t j = 0; j < current; ++j) out[j] = static_cast<int32_t>(j);
  } else if (past > 0) {
    // out[0 .. past) is a heap whose top is the worst block kept so far.
    const auto worse_on_top = [scores](int32_t a, int32_t b) { return ranks_above(scores, a, b); };
    for (int64_t j = 0; j < past; ++j) out[j] = static_cast<int32_t>(j);
    std::make_heap(out, out + past, worse_on_top);
    for (int64_t j = past; j < current; ++j) {
      if (ranks_above(scores, static_cast<int32_t>(j), out[0])) {
        std::pop_heap(out, out + past, worse_on_top);
        out[past - 1] = static_cast<int32_t>(j);
        std::push_heap(out, out + past, worse_on_top);
      }
    }
    std::sort(out, out + past);
  }
  out[past] = static_cast<int32_t>(current);
  std::fill(out + count, out + width, -1);
  return count;
}

}  // namespace moba::core
