/* The KV-cache C API in plain C: proves moba/kv_cache.h is ISO C11, builds a
 * paged cache token by token (two sequences, shuffled pages), decodes the
 * last token of each and compares with moba_forward on the same keys, then
 * checks that bad arguments return the right status and message. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moba/kv_cache.h"
#include "moba/moba.h"

enum { BATCH = 2, HQ = 4, HKV = 2, D = 16, PAGE = 4, BLOCK = 8, MAX_PAGES = 6, POOL = 12 };
enum { LEN0 = 21, LEN1 = 13 };

static int failures = 0;

static void check(int ok, const char* what) {
  if (!ok) {
    fprintf(stderr, "FAILED: %s\n", what);
    ++failures;
  }
}

static float k_all[LEN0 + LEN1][HKV][D], v_all[LEN0 + LEN1][HKV][D];
static float k_pool[POOL][PAGE][HKV][D], v_pool[POOL][PAGE][HKV][D];
static float sums[BATCH][MAX_PAGES * PAGE / BLOCK][HKV][D];
static int32_t table[BATCH][MAX_PAGES] = {{7, 2, 10, 0, 5, 3}, {1, 11, 4, 9, -1, -1}};
static int32_t seqlens[BATCH];

static float uniform(unsigned* state) {
  *state = *state * 1664525u + 1013904223u;
  return (float)((*state >> 8) & 0xffff) / 32768.0f - 1.0f;
}

int main(void) {
  unsigned seed = 12345u;
  for (int t = 0; t < LEN0 + LEN1; ++t)
    for (int h = 0; h < HKV; ++h)
      for (int c = 0; c < D; ++c) {
        k_all[t][h][c] = uniform(&seed);
        v_all[t][h][c] = uniform(&seed);
      }

  moba_kv_cache cache;
  memset(&cache, 0, sizeof cache);
  const int64_t pool_shape[4] = {POOL, PAGE, HKV, D};
  const int64_t table_shape[2] = {BATCH, MAX_PAGES};
  const int64_t len_shape[1] = {BATCH};
  const int64_t sums_shape[4] = {BATCH, MAX_PAGES * PAGE / BLOCK, HKV, D};
  cache.k = moba_tensor_contiguous(k_pool, MOBA_FLOAT32, 4, pool_shape);
  cache.v = moba_tensor_contiguous(v_pool, MOBA_FLOAT32, 4, pool_shape);
  cache.page_table = moba_tensor_contiguous(table, MOBA_INT32, 2, table_shape);
  cache.seqlens = moba_tensor_contiguous(seqlens, MOBA_INT32, 1, len_shape);
  cache.block_sums = moba_tensor_contiguous(sums, MOBA_FLOAT32, 4, sums_shape);
  cache.block_size = BLOCK;

  /* Token by token: sequence 1 stops early (0 new rows for it then). */
  float k_new[BATCH][HKV][D], v_new[BATCH][HKV][D];
  for (int step = 0; step < LEN0; ++step) {
    int32_t cu[BATCH + 1] = {0, 1, step < LEN1 ? 2 : 1};
    memcpy(k_new[0], k_all[step], sizeof k_new[0]);
    memcpy(v_new[0], v_all[step], sizeof v_new[0]);
    if (step < LEN1) {
      memcpy(k_new[1], k_all[LEN0 + step], sizeof k_new[1]);
      memcpy(v_new[1], v_all[LEN0 + step], sizeof v_new[1]);
    }
    const int64_t new_shape[3] = {cu[BATCH], HKV, D};
    const int64_t cu_shape[1] = {BATCH + 1};
    moba_tensor kt = moba_tensor_contiguous(k_new, MOBA_FLOAT32, 3, new_shape);
    moba_tensor vt = moba_tensor_contiguous(v_new, MOBA_FLOAT32, 3, new_shape);
    moba_tensor cut = moba_tensor_contiguous(cu, MOBA_INT32, 1, cu_shape);
    if (moba_kv_cache_append(&cache, &kt, &vt, &cut, NULL) != MOBA_OK) {
      fprintf(stderr, "append: %s\n", moba_last_error());
      return 1;
    }
  }
  check(seqlens[0] == LEN0 && seqlens[1] == LEN1, "seqlens advanced by append");
  check(k_pool[table[0][5 / PAGE]][5 % PAGE][1][3] == k_all[5][1][3], "key 5 on its page");

  /* Decode the last token of each sequence. */
  float q[BATCH][HQ][D], out[BATCH][HQ][D], lse[HQ][BATCH];
  for (int t = 0; t < BATCH; ++t)
    for (int h = 0; h < HQ; ++h)
      for (int c = 0; c < D; ++c) q[t][h][c] = uniform(&seed);
  int32_t cu_q[BATCH + 1] = {0, 1, 2}, cu_k[BATCH + 1] = {0, LEN0, LEN0 + LEN1};
  const int64_t q_shape[3] = {BATCH, HQ, D}, lse_shape[2] = {HQ, BATCH}, cu_shape[1] = {BATCH + 1};
  moba_tensor qt = moba_tensor_contiguous(q, MOBA_FLOAT32, 3, q_shape);
  moba_tensor outt = moba_tensor_contiguous(out, MOBA_FLOAT32, 3, q_shape);
  moba_tensor lset = moba_tensor_contiguous(lse, MOBA_FLOAT32, 2, lse_shape);
  moba_tensor cuq = moba_tensor_contiguous(cu_q, MOBA_INT32, 1, cu_shape);
  moba_config cfg = {BLOCK, 2, 0.0f, 0};
  check(moba_kv_cache_decode(&cache, &qt, &cuq, &cfg, &outt, &lset, NULL) == MOBA_OK,
        "decode succeeds");

  float ref_out[BATCH][HQ][D], ref_lse[HQ][BATCH];
  const int64_t kv_shape[3] = {LEN0 + LEN1, HKV, D};
  moba_inputs in;
  in.q = qt;
  in.k = moba_tensor_contiguous(k_all, MOBA_FLOAT32, 3, kv_shape);
  in.v = moba_tensor_contiguous(v_all, MOBA_FLOAT32, 3, kv_shape);
  in.cu_seqlens_q = cuq;
  in.cu_seqlens_k = moba_tensor_contiguous(cu_k, MOBA_INT32, 1, cu_shape);
  in.max_seqlen_q = 0;
  in.max_seqlen_k = 0;
  moba_tensor ref_outt = moba_tensor_contiguous(ref_out, MOBA_FLOAT32, 3, q_shape);
  moba_tensor ref_lset = moba_tensor_contiguous(ref_lse, MOBA_FLOAT32, 2, lse_shape);
  check(moba_forward(&in, &cfg, &ref_outt, &ref_lset, NULL) == MOBA_OK, "prefill forward");
  double worst = 0.0;
  for (int t = 0; t < BATCH; ++t)
    for (int h = 0; h < HQ; ++h) {
      for (int c = 0; c < D; ++c) worst = fmax(worst, fabs(out[t][h][c] - ref_out[t][h][c]));
      worst = fmax(worst, fabs(lse[h][t] - ref_lse[h][t]));
    }
  check(worst < 1e-5, "decode equals the prefill path");

  int32_t selected[BATCH][HQ][2];
  const int64_t sel_shape[3] = {BATCH, HQ, 2};
  moba_tensor selt = moba_tensor_contiguous(selected, MOBA_INT32, 3, sel_shape);
  check(moba_kv_cache_routing(&cache, &qt, &cuq, &cfg, &selt, NULL) == MOBA_OK, "routing");
  check(selected[0][0][1] == (LEN0 - 1) / BLOCK, "current block selected last");
  int64_t bytes = 0;
  check(moba_kv_cache_bytes_read(&cache, &qt, &cuq, &cfg, NULL, &bytes) == MOBA_OK && bytes > 0 &&
            bytes <= (int64_t)sizeof(float) * 2 * D * HKV * (LEN0 + LEN1),
        "bytes read within the cache");

  /* Errors: status and message. */
  moba_config bad_cfg = {BLOCK * 2, 2, 0.0f, 0};
  check(moba_kv_cache_decode(&cache, &qt, &cuq, &bad_cfg, &outt, NULL, NULL) ==
            MOBA_ERROR_INVALID_ARGUMENT,
        "block size mismatch refused");
  check(strstr(moba_last_error(), "differs from cache.block_size") != NULL,
        "block size message");
  check(moba_kv_cache_decode(NULL, &qt, &cuq, &cfg, &outt, NULL, NULL) ==
                MOBA_ERROR_INVALID_ARGUMENT &&
            strcmp(moba_last_error(), "moba: cache: null pointer") == 0,
        "null cache");
  moba_kv_cache odd = cache;
  odd.block_size = 6;
  check(moba_kv_cache_decode(&odd, &qt, &cuq, &cfg, &outt, NULL, NULL) ==
                MOBA_ERROR_INVALID_ARGUMENT &&
            strstr(moba_last_error(), "must be a multiple of the page size 4") != NULL,
        "block size not a multiple of the page size");
  moba_kv_cache gpu = cache;
  gpu.k.device_type = MOBA_DEVICE_CUDA;
  check(moba_kv_cache_decode(&gpu, &qt, &cuq, &cfg, &outt, NULL, NULL) ==
            MOBA_ERROR_BACKEND_UNAVAILABLE,
        "cuda cache refused");
  check(moba_kv_cache_bytes_read(&cache, &qt, &cuq, &cfg, NULL, NULL) ==
                MOBA_ERROR_INVALID_ARGUMENT &&
            strstr(moba_last_error(), "bytes: null pointer") != NULL,
        "null bytes");
  check(moba_kv_cache_decode(&cache, &qt, &cuq, &cfg, &outt, NULL, NULL) == MOBA_OK &&
            moba_last_error()[0] == '\0',
        "success clears the message");

  if (failures == 0) printf("kv cache C API: all checks passed (max diff %.2e)\n", worst);
  return failures == 0 ? 0 : 1;
}
