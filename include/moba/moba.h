/* moba — Mixture of Block Attention: the C API.
 *
 * A plain C interface over the C++ library for other languages and inference
 * engines. Every function returns a moba_status; on failure the message of
 * the last error of the calling thread is available from moba_last_error().
 * Output tensors must not overlap any other argument's address range (an
 * interleaved packed dq/dk/dv buffer is refused: pass separate buffers).
 * Tensors are described by non-owning moba_tensor views; see moba/moba.hpp
 * and shared/MOBA_SPEC.md for the shapes and semantics.
 */
#ifndef MOBA_MOBA_H_
#define MOBA_MOBA_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum moba_status {
  MOBA_OK = 0,
  MOBA_ERROR_INVALID_ARGUMENT = 1, /* a bad shape, dtype, value or pointer */
  MOBA_ERROR_UNSUPPORTED = 2,      /* valid but not supported (head dim, layout) */
  MOBA_ERROR_BACKEND_UNAVAILABLE = 3,
  MOBA_ERROR_OUT_OF_MEMORY = 4,
  MOBA_ERROR_INTERNAL = 5
} moba_status;

typedef enum moba_dtype {
  MOBA_FLOAT32 = 0,
  MOBA_FLOAT16 = 1,
  MOBA_BFLOAT16 = 2,
  MOBA_INT32 = 3
} moba_dtype;

typedef enum moba_device_type { MOBA_DEVICE_CPU = 0, MOBA_DEVICE_CUDA = 1 } moba_device_type;

typedef enum moba_backend {
  MOBA_BACKEND_AUTO = 0,
  MOBA_BACKEND_REFERENCE = 1,
  MOBA_BACKEND_CPU = 2,
  MOBA_BACKEND_CUDA = 3
} moba_backend;

#define MOBA_MAX_DIMS 4

/* A non-owning strided view; strides are in elements. data == NULL marks an
 * absent optional tensor. */
typedef struct moba_tensor {
  void* data;
  moba_dtype dtype;
  int32_t ndim;
  int64_t shape[MOBA_MAX_DIMS];
  int64_t strides[MOBA_MAX_DIMS];
  moba_device_type device_type;
  int32_t device_index;
} moba_tensor;

/* The attention inputs: q [total_q, Hq, D], k and v [total_k, Hkv, D],
 * cu_seqlens_q and cu_seqlens_k [batch + 1] int32. max_seqlen_* = 0 means
 * "compute from cu_seqlens" (host tensors only). */
typedef struct moba_inputs {
  moba_tensor q, k, v;
  moba_tensor cu_seqlens_q, cu_seqlens_k;
  int64_t max_seqlen_q, max_seqlen_k;
} moba_inputs;

/* block_size >= 1; top_k >= 1 counting the current block; softmax_scale <= 0
 * means 1/sqrt(D); gqa_shared_routing != 0 shares one selection per kv group. */
typedef struct moba_config {
  int64_t block_size;
  int64_t top_k;
  float softmax_scale;
  int32_t gqa_shared_routing;
} moba_config;

/* backend: which implementation runs; num_threads: 0 = all (cpu backend);
 * stream: a cudaStream_t or NULL; deterministic: bitwise reproducible
 * gradients. */
typedef struct moba_options {
  moba_backend backend;
  int32_t num_threads;
  void* stream;
  int32_t deterministic;
} moba_options;

/* Fills a contiguous row-major view of `shape` (ndim <= 4) on the host. */
moba_tensor moba_tensor_contiguous(void* data, moba_dtype dtype, int32_t ndim,
                                   const int64_t* shape);

/* Default options: automatic backend, all threads, default stream. */
moba_options moba_default_options(void);

/* Forward: out [total_q, Hq, D] (dtype of q); lse [Hq, total_q] float32 or
 * NULL. options may be NULL. */
moba_status moba_forward(const moba_inputs* inputs, const moba_config* config,
                         const moba_tensor* out, const moba_tensor* lse,
                         const moba_options* options);

/* Backward: writes dq [total_q, Hq, D], dk and dv [total_k, Hkv, D] from
 * out, dout and lse (as written by moba_forward). options may be NULL. */
moba_status moba_backward(const moba_inputs* inputs, const moba_config* config,
                          const moba_tensor* out, const moba_tensor* dout, const moba_tensor* lse,
                          const moba_tensor* dq, const moba_tensor* dk, const moba_tensor* dv,
                          const moba_options* options);

/* Routing: selected [total_q, Hq, W] int32, W >= moba_routing_width(...);
 * ascending block indices, padded with -1. options may be NULL. */
moba_status moba_routing(const moba_inputs* inputs, const moba_config* config,
                         const moba_tensor* selected, const moba_options* options);

/* The smallest routing width W for the longest key sequence, in *width. */
moba_status moba_routing_width(int64_t max_seqlen_k, const moba_config* config, int64_t* width);

/* 1 if the backend can run here, else 0. */
int moba_backend_available(moba_backend backend);

/* The message of the calling thread's most recent status-returning call, or
 * "" if it succeeded (each such call clears it first). Valid until the
 * thread's next call into the library. */
const char* moba_last_error(void);

/* A static description of a status code. */
const char* moba_status_string(moba_status status);

/* "MAJOR.MINOR.PATCH" */
const char* moba_version(void);

#ifdef __cplusplus
}
#endif

#endif /* MOBA_MOBA_H_ */
