/* hotloop ema: plain C ABI of the multi-tensor EMA kernel (no torch headers; the torch glue lives in
 * csrc/bindings/ema_cuda.cpp).
 *
 * For every tensor i of a list, in ONE launch:  target_i <- lerp(target_i, online_i, 1 - d)  (ATen's lerp, float32
 * math, rounded once), and copy_i <- the new target_i in copy_i's dtype when copy_i is not NULL.
 * Supported (target, online) dtypes: (f32, f32 | bf16 | f16), (bf16, bf16), (f16, f16); copy: f32 / bf16 / f16.
 *
 * The tensors are described by a pointer table in DEVICE memory (built on the host, copied with the launch's
 * stream): `count` hotloop_ema_tensor entries followed by `count + 1` int64 chunk starts (the prefix sum of
 * ceil(n_i / chunk)). Each CTA takes whole chunks of one tensor (grid-stride over all chunks), finds its tensor
 * by binary search over the chunk starts, and moves 16 bytes of target per thread and load when the chunk's
 * pointers are aligned (scalar otherwise). Tensors are contiguous; n_i may be 0.
 * hotloop_ema_update only enqueues work on `stream` and returns the launch status (cudaGetLastError), or
 * cudaErrorInvalidValue for inconsistent parameters.
 */
#ifndef HOTLOOP_EMA_H_
#define HOTLOOP_EMA_H_

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime.h>

#include "dtype_codes.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One table entry: five 64-bit words, so the host can fill the table as an int64 tensor. */
typedef struct hotloop_ema_tensor {
  uint64_t target;   /* device pointer, updated in place */
  uint64_t online;   /* device pointer, read only; must not overlap any target or copy */
  uint64_t copy;     /* device pointer or 0 */
  int64_t n;         /* elements */
  int64_t dtypes;    /* target | online << 8 | copy << 16 (HOTLOOP_DTYPE_* codes) */
} hotloop_ema_tensor;

typedef struct hotloop_ema_params {
  const hotloop_ema_tensor* table;  /* device: `count` entries, then `count + 1` int64 chunk starts */
  int64_t count;                    /* tensors in the table */
  int64_t total_chunks;             /* chunk starts[count] */
  int64_t chunk;                    /* elements per chunk: hotloop_ema_chunk_elems() */
  float decay;                      /* d in [0, 1], used when decay_ptr is NULL */
  const float* decay_ptr;           /* device pointer to one float32 d, or NULL (read on device: no host sync) */
  int32_t num_sms;                  /* multiprocessor count; <= 0: queried */
} hotloop_ema_params;

/* Elements per chunk (a multiple of every vector width); the host uses it to build the chunk starts. */
int64_t hotloop_ema_chunk_elems(void);

cudaError_t hotloop_ema_update(const hotloop_ema_params* p, cudaStream_t stream);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif /* HOTLOOP_EMA_H_ */
