/* moba — MoBA decode with a KV cache: the C API.
 *
 * The C face of moba/kv_cache.hpp (see it for the layouts and semantics):
 * caller-owned K/V (contiguous [batch, capacity, Hkv, D], or a paged pool
 * [num_pages, page_size, Hkv, D] with a [batch, max_pages] int32 page table),
 * per-sequence lengths [batch] int32 advanced by append, and running block
 * sums [batch, max_blocks, Hkv, D] float32 that make routing O(blocks x D).
 *
 * Conventions are those of moba/moba.h: every function returns a
 * moba_status, options may be NULL, and on failure the message naming the
 * offending argument is available from moba_last_error(), shared with the
 * prefill API (the calling thread's most recent call; "" after a success).
 *
 * A cache in host memory runs on the cpu backend, one on a CUDA device on the
 * cuda backend (on options->stream, without host synchronization; values in
 * device memory are checked on the device: see moba/kv_cache.hpp for what a
 * violation does to the outputs and the cache).
 */
#ifndef MOBA_KV_CACHE_H_
#define MOBA_KV_CACHE_H_

#include <stdint.h>

#include "moba/moba.h"

#ifdef __cplusplus
extern "C" {
#endif

/* page_table.data == NULL selects the contiguous layout. block_size is the
 * MoBA block size of every call; in the paged layout a multiple of the page
 * size. max_blocks >= ceil(capacity / block_size). */
typedef struct moba_kv_cache {
  moba_tensor k, v;
  moba_tensor page_table;
  moba_tensor seqlens;
  moba_tensor block_sums;
  int64_t block_size;
} moba_kv_cache;

/* Appends k_new / v_new [total_new, Hkv, D] (rows cu_seqlens_new[b] ..
 * cu_seqlens_new[b + 1] to sequence b), updating seqlens and the block sums.
 * Nothing is written when it fails (a device cache: the sequences whose device
 * values break the contract are skipped, see moba/kv_cache.hpp). */
moba_status moba_kv_cache_append(const moba_kv_cache* cache, const moba_tensor* k_new,
                                 const moba_tensor* v_new, const moba_tensor* cu_seqlens_new,
                                 const moba_options* options);

/* MoBA attention of q [total_q, Hq, D] against the cache: sequence b's
 * queries are its last cu_seqlens_q[b + 1] - cu_seqlens_q[b] positions
 * (their keys already appended). out [total_q, Hq, D]; lse [Hq, total_q]
 * float32 or NULL. config->block_size must equal cache->block_size. */
moba_status moba_kv_cache_decode(const moba_kv_cache* cache, const moba_tensor* q,
                                 const moba_tensor* cu_seqlens_q, const moba_config* config,
                                 const moba_tensor* out, const moba_tensor* lse,
                                 const moba_options* options);

/* The blocks each query of a decode selects: selected [total_q, Hq, W] int32,
 * W >= moba_routing_width(max(seqlens), config); ascending, -1 padded (a device
 * cache: rows that do not fit W come back all -1). */
moba_status moba_kv_cache_routing(const moba_kv_cache* cache, const moba_tensor* q,
                                  const moba_tensor* cu_seqlens_q, const moba_config* config,
                                  const moba_tensor* selected, const moba_options* options);

/* Bytes of K and V that moba_kv_cache_decode reads for these queries, in
 * *bytes (for bandwidth figures; synchronizes the stream of a device cache). */
moba_status moba_kv_cache_bytes_read(const moba_kv_cache* cache, const moba_tensor* q,
                                     const moba_tensor* cu_seqlens_q, const moba_config* config,
                                     const moba_options* options, int64_t* bytes);

#ifdef __cplusplus
}
#endif

#endif /* MOBA_KV_CACHE_H_ */
