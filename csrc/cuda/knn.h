/* hotloop knn: plain C ABI of the CUDA k-nearest-neighbour kernels (no torch headers; the torch glue lives in
 * csrc/bindings/knn_cuda.cpp). Spec: python/hotloop/reference/knn.py (docs/knn.md).
 *
 * For queries q_i [Q, d] and keys x_j [M, d] every metric is reduced to "smallest value wins":
 *     v_ij = bias_j + scale_j * (q_i . x_j)
 *   l2: bias = ||x_j||^2, scale = -2;  ip: bias = 0, scale = -1;  cosine: bias = 0, scale = -1 / max(||x_j||, 1e-8)
 * (bias = +inf for keys with valid[j] == 0). Outputs, best first, lower index first among equal values:
 *   l2: max(||q_i||^2 + v, 0) (squared distance); ip: -v; cosine: -v / max(||q_i||, 1e-8);
 *   index -1 and score +inf (l2) / -inf (ip, cosine) where fewer than k keys are valid.
 *
 * Scheme: a CTA takes QB queries and one split of the keys (grid = query blocks x key splits). Per tile of KT
 * keys it computes the QB x KT dot products from shared-memory tiles (fp32 FMA), turns them into values, and
 * queues the ones below each query's threshold (the k-th best value so far) in shared memory. A warp then sorts
 * a query's queue (bitonic, in shared memory) and merges it into the query's sorted list of k candidates in
 * global memory (a rank merge: every element's new position is its own rank plus a binary search in the other
 * list), which also yields the new threshold. The list lives in global memory, so k is bounded only by M; once
 * the list is full, almost every candidate is rejected by one compare. With several key splits, a second
 * kernel merges the splits' sorted lists per query.
 *
 * Conventions: sizes in elements (int64); queries and keys contiguous, row-major, one dtype; every pointer is a
 * device pointer on the current device. hotloop_knn only enqueues work on `stream` and returns the launch status
 * (cudaGetLastError) or cudaErrorInvalidValue for inconsistent parameters.
 */
#ifndef HOTLOOP_KNN_H_
#define HOTLOOP_KNN_H_

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime.h>

#include "dtype_codes.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { HOTLOOP_KNN_L2 = 0, HOTLOOP_KNN_IP = 1, HOTLOOP_KNN_COSINE = 2 };

typedef struct hotloop_knn_params {
  int64_t Q, M, d, k;            /* 1 <= k <= M, d >= 1; Q == 0 enqueues nothing */
  const void* queries;           /* [Q, d] contiguous, element type `dtype` */
  const void* keys;              /* [M, d] contiguous, element type `dtype` */
  int32_t dtype;                 /* HOTLOOP_DTYPE_FLOAT32 / _BFLOAT16 / _FLOAT16 */
  int32_t metric;                /* HOTLOOP_KNN_L2 / _IP / _COSINE */
  const uint8_t* valid;          /* [M] bytes (0 = never return the key), or NULL: every key is valid */
  float* scores;                 /* [Q, k] float32 output */
  int64_t* indices;              /* [Q, k] int64 output */
  /* Scratch of hotloop_knn_workspace_bytes bytes (16-byte aligned, no initialisation needed, only used by the
   * kernels this call enqueues, so a stream-ordered allocation may be freed right after). */
  void* workspace;
  int64_t workspace_bytes;
  int32_t num_sms;               /* multiprocessor count; <= 0: queried with cudaDeviceGetAttribute */
  int32_t force_splits;          /* 0: automatic; > 0: this many key splits (tests) */
} hotloop_knn_params;

/* Number of key splits the search will use (1 = the scan writes the outputs directly). */
int32_t hotloop_knn_splits(const hotloop_knn_params* p);

/* Bytes of workspace needed for these parameters. */
int64_t hotloop_knn_workspace_bytes(const hotloop_knn_params* p);

cudaError_t hotloop_knn(const hotloop_knn_params* p, cudaStream_t stream);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif /* HOTLOOP_KNN_H_ */
