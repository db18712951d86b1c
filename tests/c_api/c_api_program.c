/* A plain C11 program over the C API: it proves that moba/moba.h is valid
 * ISO C (built with -std=c11 -pedantic-errors) and that a C caller gets the
 * MoBA result. It builds a small problem, computes MoBA attention and
 * routing itself (a few loops written from the spec, in double), and checks
 * moba_forward / moba_routing / moba_backward against them on the reference
 * and cpu backends; then it checks that bad calls return status codes with a
 * message instead of crashing. Exit status 0 means every check passed. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "moba/moba.h"

enum { LEN = 11, HQ = 2, HKV = 1, D = 8, BLOCK = 3, TOP_K = 2, BLOCKS = (LEN + BLOCK - 1) / BLOCK };

static int failures = 0;

#define CHECK(cond, ...)                                                       \
  do {                                                                         \
    if (!(cond)) {                                                             \
      ++failures;                                                              \
      fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond); \
      fprintf(stderr, __VA_ARGS__);                                            \
      fprintf(stderr, " (last error: '%s')\n", moba_last_error());             \
    }                                                                          \
  } while (0)

static float q[LEN][HQ][D], k[LEN][HKV][D], v[LEN][HKV][D], dout[LEN][HQ][D];
static int32_t cu_seqlens[2] = {0, LEN};

/* Deterministic values in [-1, 1) from a linear congruential generator. */
static float next_value(uint32_t* state) {
  *state = *state * 1664525u + 1013904223u;
  return (float)((double)(*state >> 8) / (double)(1u << 24) * 2.0 - 1.0);
}

/* The blocks query `p` of head `h` attends to (spec steps 2-4), ascending,
 * padded with -1. Returns 0 if two candidate scores are too close to call
 * (the spec lets backends differ there); the fixed data has none. */
static int expected_selection(int p, int h, int32_t selected[TOP_K]) {
  double kbar[BLOCKS][D], score[BLOCKS];
  const int current = p / BLOCK;
  int j, t, x, best = -1;
  for (j = 0; j < BLOCKS; ++j)
    for (x = 0; x < D; ++x) {
      const int end = (j + 1) * BLOCK < LEN ? (j + 1) * BLOCK : LEN;
      double sum = 0.0;
      for (t = j * BLOCK; t < end; ++t) sum += k[t][0][x];
      kbar[j][x] = (float)(sum / (end - j * BLOCK)); /* the mean is rounded to k's dtype */
    }
  for (j = 0; j < current; ++j) {
    score[j] = 0.0;
    for (x = 0; x < D; ++x) score[j] += q[p][h][x] * kbar[j][x];
    if (best < 0 || score[j] > score[best]) best = j;
  }
  for (j = 0; j < current; ++j)
    if (j != best && fabs(score[j] - score[best]) < 1e-4 * (1.0 + fabs(score[best]))) return 0;
  /* TOP_K = 2: the current block and the best past one. */
  selected[0] = best < 0 ? current : best;
  selected[1] = best < 0 ? -1 : current;
  return 1;
}

/* MoBA attention of query p, head h over its selected blocks (spec step 5). */
static void expected_attention(int p, int h, const int32_t selected[TOP_K], double out[D],
                               double* lse) {
  const double scale = 1.0 / sqrt((double)D);
  double logit[LEN], max = -INFINITY, sum = 0.0;
  int used[LEN], n = 0, m, t, x;
  for (m = 0; m < TOP_K; ++m) {
    if (selected[m] < 0) continue;
    for (t = selected[m] * BLOCK; t < (selected[m] + 1) * BLOCK && t < LEN && t <= p; ++t) {
      double dot = 0.0;
      for (x = 0; x < D; ++x) dot += (double)q[p][h][x] * k[t][0][x];
      used[n] = t;
      logit[n] = scale * dot;
      if (logit[n] > max) max = logit[n];
      ++n;
    }
  }
  for (m = 0; m < n; ++m) sum += exp(logit[m] - max);
  *lse = max + log(sum);
  for (x = 0; x < D; ++x) out[x] = 0.0;
  for (m = 0; m < n; ++m)
    for (x = 0; x < D; ++x) out[x] += exp(logit[m] - *lse) * v[used[m]][0][x];
}

static moba_inputs make_inputs(void) {
  const int64_t q_shape[3] = {LEN, HQ, D}, kv_shape[3] = {LEN, HKV, D}, cu_shape[1] = {2};
  moba_inputs in;
  in.q = moba_tensor_contiguous(q, MOBA_FLOAT32, 3, q_shape);
  in.k = moba_tensor_contiguous(k, MOBA_FLOAT32, 3, kv_shape);
  in.v = moba_tensor_contiguous(v, MOBA_FLOAT32, 3, kv_shape);
  in.cu_seqlens_q = moba_tensor_contiguous(cu_seqlens, MOBA_INT32, 1, cu_shape);
  in.cu_seqlens_k = in.cu_seqlens_q;
  in.max_seqlen_q = 0; /* computed from the host cu_seqlens */
  in.max_seqlen_k = 0;
  return in;
}

static void check_backend(moba_backend backend) {
  static float out[LEN][HQ][D], lse[HQ][LEN], dq[LEN][HQ][D], dk[LEN][HKV][D], dv[LEN][HKV][D];
  static int32_t selected[LEN][HQ][TOP_K];
  const int64_t out_shape[3] = {LEN, HQ, D}, lse_shape[2] = {HQ, LEN}, kv_shape[3] = {LEN, HKV, D};
  const int64_t sel_shape[3] = {LEN, HQ, TOP_K};
  const moba_inputs in = make_inputs();
  const moba_config config = {BLOCK, TOP_K, 0.0f /* default 1/sqrt(D) */, 0};
  moba_options options = moba_default_options();
  const moba_tensor out_t = moba_tensor_contiguous(out, MOBA_FLOAT32, 3, out_shape);
  const moba_tensor lse_t = moba_tensor_contiguous(lse, MOBA_FLOAT32, 2, lse_shape);
  const moba_tensor dout_t = moba_tensor_contiguous(dout, MOBA_FLOAT32, 3, out_shape);
  const moba_tensor dq_t = moba_tensor_contiguous(dq, MOBA_FLOAT32, 3, out_shape);
  const moba_tensor dk_t = moba_tensor_contiguous(dk, MOBA_FLOAT32, 3, kv_shape);
  const moba_tensor dv_t = moba_tensor_contiguous(dv, MOBA_FLOAT32, 3, kv_shape);
  const moba_tensor sel_t = moba_tensor_contiguous(selected, MOBA_INT32, 3, sel_shape);
  double dv_sum[D] = {0}, dout_sum[D] = {0}, dk_sum[D] = {0}, dk_scale = 0.0;
  int p, h, x, m, checked = 0;
  int64_t width = 0;

  options.backend = backend;
  options.num_threads = 2;
  CHECK(moba_routing_width(LEN, &config, &width) == MOBA_OK && width == TOP_K, "routing width %ld",
        (long)width);
  CHECK(moba_forward(&in, &config, &out_t, &lse_t, &options) == MOBA_OK, "forward, backend %d",
        (int)backend);
  CHECK(moba_routing(&in, &config, &sel_t, &options) == MOBA_OK, "routing, backend %d",
        (int)backend);
  CHECK(moba_backward(&in, &config, &out_t, &dout_t, &lse_t, &dq_t, &dk_t, &dv_t, &options) ==
            MOBA_OK,
        "backward, backend %d", (int)backend);
  CHECK(strcmp(moba_last_error(), "") == 0, "no error after successful calls");

  for (p = 0; p < LEN; ++p)
    for (h = 0; h < HQ; ++h) {
      int32_t want[TOP_K];
      double o[D], l;
      if (!expected_selection(p, h, want)) continue;
      ++checked;
      for (m = 0; m < TOP_K; ++m)
        CHECK(selected[p][h][m] == want[m],
              "backend %d query %d head %d slot %d: selected %d, expected %d", (int)backend, p, h,
              m, (int)selected[p][h][m], (int)want[m]);
      expected_attention(p, h, want, o, &l);
      CHECK(fabs(lse[h][p] - l) < 1e-5, "backend %d query %d head %d: lse %g, expected %g",
            (int)backend, p, h, (double)lse[h][p], l);
      for (x = 0; x < D; ++x)
        CHECK(fabs(out[p][h][x] - o[x]) < 1e-5,
              "backend %d query %d head %d dim %d: out %g, expected %g", (int)backend, p, h, x,
              (double)out[p][h][x], o[x]);
    }
  CHECK(checked == LEN * HQ, "only %d of %d queries had a clear routing", checked, LEN * HQ);

  /* Gradient invariants: each query's attention weights sum to 1, so the dv
   * rows add up to the sum of dout over queries and heads; the softmax
   * gradient of each query sums to 0 over its keys, so the dk rows add up to 0. */
  for (p = 0; p < LEN; ++p)
    for (x = 0; x < D; ++x) {
      dv_sum[x] += dv[p][0][x];
      dk_sum[x] += dk[p][0][x];
      dk_scale += fabs(dk[p][0][x]);
      for (h = 0; h < HQ; ++h) dout_sum[x] += dout[p][h][x];
    }
  CHECK(dk_scale > 0.0, "dk is all zeros");
  for (x = 0; x < D; ++x) {
    CHECK(fabs(dv_sum[x] - dout_sum[x]) < 1e-4, "dim %d: sum of dv %g, sum of dout %g", x,
          dv_sum[x], dout_sum[x]);
    CHECK(fabs(dk_sum[x]) < 1e-4 * (1.0 + dk_scale), "dim %d: sum of dk %g, expected 0", x,
          dk_sum[x]);
  }
}

/* Starts with "moba: " and contains `word`. */
static int clear_error(const char* word) {
  const char* message = moba_last_error();
  return strncmp(message, "moba: ", 6) == 0 && strstr(message, word) != NULL;
}

static void check_errors(void) {
  static float out[LEN][HQ][D];
  const int64_t out_shape[3] = {LEN, HQ, D};
  const moba_inputs good = make_inputs();
  moba_inputs bad = good;
  moba_config config = {BLOCK, TOP_K, 0.0f, 0};
  moba_options options = moba_default_options();
  const moba_tensor out_t = moba_tensor_contiguous(out, MOBA_FLOAT32, 3, out_shape);
  int64_t width = 0;

  CHECK(moba_forward(NULL, &config, &out_t, NULL, NULL) == MOBA_ERROR_INVALID_ARGUMENT,
        "NULL inputs");
  CHECK(clear_error("inputs"), "message for NULL inputs");
  CHECK(moba_forward(&good, NULL, &out_t, NULL, NULL) == MOBA_ERROR_INVALID_ARGUMENT,
        "NULL config");
  CHECK(clear_error("config"), "message for NULL config");
  CHECK(moba_forward(&good, &config, NULL, NULL, NULL) == MOBA_ERROR_INVALID_ARGUMENT, "NULL out");
  CHECK(clear_error("out"), "message for NULL out");
  CHECK(moba_routing_width(LEN, &config, NULL) == MOBA_ERROR_INVALID_ARGUMENT, "NULL width");

  bad.q.dtype = (moba_dtype)7;
  CHECK(moba_forward(&bad, &config, &out_t, NULL, NULL) == MOBA_ERROR_INVALID_ARGUMENT, "dtype 7");
  CHECK(clear_error("q"), "message for dtype 7");
  bad = good;
  bad.q.ndim = 2;
  CHECK(moba_forward(&bad, &config, &out_t, NULL, NULL) == MOBA_ERROR_INVALID_ARGUMENT,
        "q of rank 2");
  bad = good;
  bad.k.shape[2] = 16;
  bad.v.shape[2] = 16;
  CHECK(moba_forward(&bad, &config, &out_t, NULL, NULL) == MOBA_ERROR_INVALID_ARGUMENT,
        "head dims differ");
  bad = good;
  bad.q.shape[2] = bad.k.shape[2] = bad.v.shape[2] = 12;
  CHECK(moba_forward(&bad, &config, &out_t, NULL, NULL) == MOBA_ERROR_UNSUPPORTED, "head dim 12");

  options.backend = (moba_backend)9;
  CHECK(moba_forward(&good, &config, &out_t, NULL, &options) == MOBA_ERROR_INVALID_ARGUMENT,
        "backend 9");
  CHECK(clear_error("backend"), "message for backend 9");
  options = moba_default_options();
  options.num_threads = -1;
  CHECK(moba_forward(&good, &config, &out_t, NULL, &options) == MOBA_ERROR_INVALID_ARGUMENT,
        "num_threads -1");
  options = moba_default_options();
  options.backend = MOBA_BACKEND_CUDA;
  if (!moba_backend_available(MOBA_BACKEND_CUDA))
    CHECK(moba_forward(&good, &config, &out_t, NULL, &options) == MOBA_ERROR_BACKEND_UNAVAILABLE,
          "cuda backend");

  config.block_size = 0;
  CHECK(moba_forward(&good, &config, &out_t, NULL, NULL) == MOBA_ERROR_INVALID_ARGUMENT,
        "block_size 0");
  CHECK(clear_error("block_size"), "message for block_size 0");
  config.block_size = BLOCK;
  config.top_k = 0;
  CHECK(moba_routing_width(LEN, &config, &width) == MOBA_ERROR_INVALID_ARGUMENT, "top_k 0");
  CHECK(clear_error("top_k"), "message for top_k 0");
  config.top_k = TOP_K;

  /* A valid call after the failures succeeds and clears the message. */
  CHECK(moba_forward(&good, &config, &out_t, NULL, NULL) == MOBA_OK, "valid call after failures");
  CHECK(strcmp(moba_last_error(), "") == 0, "message cleared by a successful call");
}

int main(void) {
  uint32_t state = 12345u;
  int p, h, x;
  for (p = 0; p < LEN; ++p)
    for (x = 0; x < D; ++x) {
      for (h = 0; h < HQ; ++h) {
        q[p][h][x] = 2.0f * next_value(&state);
        dout[p][h][x] = next_value(&state);
      }
      k[p][0][x] = next_value(&state);
      v[p][0][x] = next_value(&state);
    }

  CHECK(moba_version() != NULL && strlen(moba_version()) > 0, "version");
  CHECK(strcmp(moba_status_string(MOBA_OK), "ok") == 0, "status string of MOBA_OK");
  CHECK(moba_backend_available(MOBA_BACKEND_REFERENCE) == 1, "reference backend available");
  CHECK(moba_backend_available(MOBA_BACKEND_CPU) == 1, "cpu backend available");
  check_backend(MOBA_BACKEND_REFERENCE);
  check_backend(MOBA_BACKEND_CPU);
  check_errors();

  if (failures == 0) printf("c_api_program: all checks passed (moba %s)\n", moba_version());
  return failures == 0 ? 0 : 1;
}
