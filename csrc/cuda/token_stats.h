/* hotloop token_stats: plain C ABI of the CUDA kernels (no torch headers; the torch glue lives in
 * csrc/bindings/token_stats_cuda.cpp).
 *
 * Per row r = b*T + t of V logits z (temperature tau, label y), with z' = z / tau:
 *   lse            = log sum_j exp(z'_j)
 *   logprob        = z'_y - lse
 *   entropy        = -sum_j p_j log p_j,              p_j = exp(z'_j - lse)
 *   self_certainty = lse - mean_j z'_j - log V        (= KL(U || p))
 * Rows whose label equals ignore_index give 0 outputs and a zero gradient row; a label outside [0, V) that is
 * not ignore_index gives NaN outputs and a NaN gradient row (nothing is read out of bounds).
 *
 * Conventions for every struct below:
 *   - sizes and strides are int64 and counted in ELEMENTS, not bytes;
 *   - the vocabulary dimension always has unit stride, the two leading strides are arbitrary (a slice such as
 *     logits[:, :-1] is fine, a row start need not be 16-byte aligned);
 *   - [B, T] tensors (labels, per-row outputs and upstream grads) are contiguous: row r lives at index r;
 *   - V must be in [1, 2^30]; B * T must be < 2^31 (one CTA row index per grid.x);
 *   - every pointer is a device pointer on the device current for the calling thread.
 * Both entry points only enqueue work on `stream` (no synchronisation) and return the launch status
 * (cudaGetLastError) or cudaErrorInvalidValue for inconsistent parameters. B * T == 0 enqueues nothing.
 */
#ifndef HOTLOOP_TOKEN_STATS_H_
#define HOTLOOP_TOKEN_STATS_H_

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime.h>

#include "dtype_codes.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Forward: one read of the logits, four (or fewer) float32 [B, T] outputs. */
typedef struct hotloop_token_stats_fwd_params {
  int64_t B, T, V;              /* logits shape [B, T, V]; rows = B * T */

  const void* logits;           /* [B, T, V], element type `logits_dtype` */
  int64_t logits_stride_b;      /* element stride between b and b+1 (any value, 0 included) */
  int64_t logits_stride_t;      /* element stride between t and t+1 (any value, 0 included) */
  int32_t logits_dtype;         /* HOTLOOP_DTYPE_FLOAT32 / _BFLOAT16 / _FLOAT16 */

  const void* labels;           /* [B, T] contiguous */
  int32_t labels_dtype;         /* HOTLOOP_DTYPE_INT32 or HOTLOOP_DTYPE_INT64 */

  float temperature;            /* > 0 and finite; logits are multiplied by 1 / temperature */
  int64_t ignore_index;         /* label value of rows to skip (outputs 0) */

  float* logprobs;              /* [B, T] float32, required */
  float* entropy;               /* [B, T] float32, or NULL to skip */
  float* self_certainty;        /* [B, T] float32, or NULL to skip */
  float* lse;                   /* [B, T] float32, required (saved for the backward) */

  /* Vocabulary splitting (few rows, large V): each row is cut into `splits` CTAs whose partial statistics go
   * to `workspace` (hotloop_token_stats_fwd_workspace_bytes bytes, 16-byte aligned, no initialisation needed,
   * only used by the kernels enqueued by this call, so a stream-ordered allocation may be freed right after).
   * When workspace is NULL or workspace_bytes is too small, the forward runs unsplit (correct, just slower). */
  void* workspace;
  int64_t workspace_bytes;      /* size of `workspace` in bytes */
  int32_t num_sms;              /* multiprocessor count of the device; <= 0: queried with cudaDeviceGetAttribute */
  int32_t force_splits;         /* 0: automatic; > 0: use this many splits (clamped to [1, 32]; for tests) */
} hotloop_token_stats_fwd_params;

/* Backward: reads the logits once, writes d loss / d logits once. */
typedef struct hotloop_token_stats_bwd_params {
  int64_t B, T, V;

  /* d/d logits, same dtype as logits, [B, T, V] with unit vocab stride. MAY equal `logits` (same pointer and
   * strides) for an in-place backward: each element is read by the thread that later overwrites it, and by
   * no other thread. Any other overlap between grad_logits and logits is not allowed. */
  void* grad_logits;
  int64_t grad_stride_b, grad_stride_t;

  const void* logits;           /* as in the forward */
  int64_t logits_stride_b, logits_stride_t;
  int32_t logits_dtype;         /* also the dtype of grad_logits */

  const void* labels;           /* [B, T] contiguous */
  int32_t labels_dtype;         /* HOTLOOP_DTYPE_INT32 or HOTLOOP_DTYPE_INT64 */

  float temperature;
  int64_t ignore_index;

  const float* grad_logprobs;        /* [B, T] float32, or NULL (= zeros) */
  const float* grad_entropy;         /* [B, T] float32, or NULL (= zeros); needs `entropy` */
  const float* grad_self_certainty;  /* [B, T] float32, or NULL (= zeros) */
  const float* lse;                  /* [B, T] float32 from the forward, required */
  const float* entropy;              /* [B, T] float32 from the forward; required iff grad_entropy != NULL */

  int32_t num_sms;              /* as in the forward; sizes the vocab chunks when rows are few */
} hotloop_token_stats_bwd_params;

/* Number of vocabulary splits the forward will use for these parameters (1 = unsplit). Depends only on
 * B, T, V, logits_dtype, num_sms and force_splits (not on workspace). */
int32_t hotloop_token_stats_fwd_splits(const hotloop_token_stats_fwd_params* p);

/* Bytes of workspace the forward wants for these parameters (0 when it runs unsplit). */
int64_t hotloop_token_stats_fwd_workspace_bytes(const hotloop_token_stats_fwd_params* p);

cudaError_t hotloop_token_stats_fwd(const hotloop_token_stats_fwd_params* p, cudaStream_t stream);
cudaError_t hotloop_token_stats_bwd(const hotloop_token_stats_bwd_params* p, cudaStream_t stream);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif /* HOTLOOP_TOKEN_STATS_H_ */
