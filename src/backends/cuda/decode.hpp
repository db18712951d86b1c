// The CUDA KV-cache kernels (append, decode / chunked prefill, routing),
// declared apart from backend.hpp because they take the cache types of
// core/kv_cache.hpp. docs/cuda_decode.md describes the design.
#pragma once

#include <cstdint>

#include "backends/backend.hpp"
#include "core/kv_cache.hpp"

namespace moba::backends::cuda {

/// Appends a.k / a.v to the device cache and updates seqlens and the block
/// sums. The cu_seqlens_new and seqlens values are checked on the device; a
/// sequence that breaks the contract is left untouched (nothing written).
void kv_append(const core::Cache& c, const core::Append& a, void* stream);

/// MoBA decode / chunked prefill from the device cache into out and lse
/// (lse.data may be null). Rows of sequences whose device values break the
/// contract are filled with NaN.
void kv_decode(const core::Cache& c, const core::Decode& d, const core::Rows& out,
               const core::Lse& lse, void* stream);

/// The selection kv_decode uses, into `selection` (rows of invalid sequences,
/// or rows with more blocks than selection.width, are all -1).
void kv_routing(const core::Cache& c, const core::Decode& d, const Selection& selection,
                void* stream);

/// Bytes of K and V kv_decode reads for these queries. Synchronizes `stream`
/// (the count is copied to the host): a benchmark utility.
int64_t kv_bytes_read(const core::Cache& c, const core::Decode& d, void* stream);

}  // namespace moba::backends::cuda
