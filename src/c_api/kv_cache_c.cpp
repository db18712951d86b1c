// The KV-cache C API: converts C views to C++ ones and exceptions to status
// codes, as moba_c.cpp does for the prefill API.
#include "moba/kv_cache.h"


#include "c_api/conversions.hpp"
#include "moba/kv_cache.hpp"

namespace {

using namespace moba::c_api;  // NOLINT(google-build-using-namespace)

moba::KVCache to_cache(const moba_kv_cache* c) {
  require(c, "cache");
  moba::KVCache out;
  out.k = to_view(c->k, "cache.k");
  out.v = to_view(c->v, "cache.v");
  if (c->page_table.data != nullptr) out.page_table = to_view(c->page_table, "cache.page_table");
  out.seqlens = to_view(c->seqlens, "cache.seqlens");
  out.block_sums = to_view(c->block_sums, "cache.block_sums");
  out.block_size = c->block_size;
  return out;
}

}  // namespace

extern "C" {

moba_status moba_kv_cache_append(const moba_kv_cache* cache, const moba_tensor* k_new,
                                 const moba_tensor* v_new, const moba_tensor* cu_seqlens_new,
                                 const moba_options* options) {
  return guarded([&] {
    moba::kv_cache_append(to_cache(cache), to_view(k_new, "k_new"), to_view(v_new, "v_new"),
                          to_view(cu_seqlens_new, "cu_seqlens_new"), to_options(options));
  });
}

moba_status moba_kv_cache_decode(const moba_kv_cache* cache, const moba_tensor* q,
                                 const moba_tensor* cu_seqlens_q, const moba_config* config,
                                 const moba_tensor* out, const moba_tensor* lse,
                                 const moba_options* options) {
  return guarded([&] {
    moba::TensorView lse_view;
    if (lse != nullptr) lse_view = to_view(*lse, "lse");
    moba::kv_cache_decode(to_cache(cache), to_view(q, "q"), to_view(cu_seqlens_q, "cu_seqlens_q"),
                          to_config(config), to_view(out, "out"), lse_view, to_options(options));
  });
}

moba_status moba_kv_cache_routing(const moba_kv_cache* cache, const moba_tensor* q,
                                  const moba_tensor* cu_seqlens_q, const moba_config* config,
                                  const moba_tensor* selected, const moba_options* options) {
  return guarded([&] {
    moba::kv_cache_routing(to_cache(cache), to_view(q, "q"), to_view(cu_seqlens_q, "cu_seqlens_q"),
                           to_config(config), to_view(selected, "selected"), to_options(options));
  });
}

moba_status moba_kv_cache_bytes_read(const moba_kv_cache* cache, const moba_tensor* q,
                                     const moba_tensor* cu_seqlens_q, const moba_config* config,
                                     const moba_options* options, int64_t* bytes) {
  return guarded([&] {
    require(bytes, "bytes");
    *bytes = moba::kv_cache_bytes_read(to_cache(cache), to_view(q, "q"),
                                       to_view(cu_seqlens_q, "cu_seqlens_q"), to_config(config),
                                       to_options(options));
  });
}

}  // extern "C"
