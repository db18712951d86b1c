// The CPU routing entry point: the same unit routing the forward uses,
// written out.
#include <algorithm>
#include <vector>

#include "backends/backend.hpp"
#include "backends/cpu/parallel.hpp"
#include "backends/cpu/plan.hpp"

namespace moba::backends::cpu {

void routing(const core::Problem& p, const Selection& selection, int num_threads) {
  const int threads = resolve_threads(num_threads);
  const BlockMeans means = compute_block_means(p, threads);
  const std::vector<QueryUnit> units = query_units(p, threads);
  std::vector<UnitRouting> workspaces(static_cast<size_t>(threads));
  parallel_for(static_cast<int64_t>(units.size()), threads, [&](int worker, int64_t t) {
    const QueryUnit& u = units[static_cast<size_t>(t)];
    UnitRouting& r = workspaces[static_cast<size_t>(worker)];
    route_unit(p, means, u, r);
    const int64_t token0 = p.sequences[static_cast<size_t>(u.seq)].q_begin + u.q_begin;
    for (int64_t row = 0; row < r.rows; ++row) {
      int32_t* dst = selection.at(token0 + row / p.group, u.kv_head * p.group + row % p.group);
      const int32_t* src = r.selected.data() + row * r.width;
      std::copy(src, src + r.width, dst);
      std::fill(dst + r.width, dst + selection.width, -1);
    }
  });
}

}  // namespace moba::backends::cpu
