// How sparse a MoBA configuration is on a workload, counted exactly from the
// routing the backend itself produces.
#pragma once

#include <cstdint>
#include <functional>

#include "moba/moba.hpp"
#include "workload.hpp"

namespace moba::cli {

struct Sparsity {
  /// (query, head, key) triples attended: for each selected block, its keys,
  /// the current block's cut at the query's position.
  int64_t attended = 0;
  /// (query, head, key) triples of causal full attention: position + 1 each.
  int64_t causal = 0;
  /// moba::routing calls made (the workload is cut into chunks).
  int64_t calls = 0;

  /// Fraction of the causal pairs NOT attended; 0 for an empty workload.
  double fraction() const noexcept {
    return causal == 0 ? 0.0 : 1.0 - static_cast<double>(attended) / static_cast<double>(causal);
  }
};

/// Runs moba::routing on `placed` (the same backend and options as the timed
/// calls) in chunks of queries whose selection fits in `max_chunk_bytes`, so
/// memory stays bounded however long the sequences; a chunk of queries of one
/// sequence sees only the keys up to its last query, which leaves every
/// selection unchanged (a query never selects a block beyond its own).
/// Throws moba::Error if the backend returns an impossible selection.
/// `on_chunk(done, total)` reports progress.
Sparsity measure_sparsity(const Workload& workload, const PlacedWorkload& placed,
                          const Config& config, const ExecOptions& options,
                          int64_t max_chunk_bytes = int64_t{64} << 20,
                          const std::function<void(int64_t, int64_t)>& on_chunk = {});

}  // namespace moba::cli
