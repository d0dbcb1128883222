/* Element type codes shared by hotloop's CUDA C ABIs (token_stats.h, ema.h, knn.h): plain C, no torch headers.
   The torch bindings map ScalarType to these. */
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

enum {
  HOTLOOP_DTYPE_FLOAT32 = 0,
  HOTLOOP_DTYPE_BFLOAT16 = 1,
  HOTLOOP_DTYPE_FLOAT16 = 2,
  HOTLOOP_DTYPE_INT32 = 3,
  HOTLOOP_DTYPE_INT64 = 4
};

#ifdef __cplusplus
}
#endif
