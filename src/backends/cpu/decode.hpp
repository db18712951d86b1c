// The CPU backend's KV-cache operations (include/moba/kv_cache.hpp). The
// dispatch layer validates every argument (core/kv_cache.hpp) first.
#pragma once

#include <cstdint>

#include "backends/backend.hpp"
#include "core/kv_cache.hpp"

namespace moba::backends::cpu {

void kv_append(const core::Cache& cache, const core::Append& append, int num_threads);

void kv_decode(const core::Cache& cache, const core::Decode& decode, const core::Rows& out,
               const core::Lse& lse, int num_threads);

void kv_routing(const core::Cache& cache, const core::Decode& decode, const Selection& selection,
                int num_threads);

int64_t kv_bytes_read(const core::Cache& cache, const core::Decode& decode, int num_threads);

}  // namespace moba::backends::cpu
