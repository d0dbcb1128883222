// dst = src^T (or dst += src^T) for 2-D matrices in cache-sized tiles, CPU.
// The fused linear paths get a vocabulary tile's weight gradient as (h^T G) [H, cols] because oneDNN computes that
// product ~2.5x faster than G^T h in bf16; this writes it into the [cols, H] rows of d_weight. torch's own strided
// copy does the same at ~0.6 GB/s (13 ms for one 4096 x 1024 bf16 tile); tiles keep both sides in cache.
// Plain C++ (no torch headers) so CMake builds and ctest-checks it without torch.
#pragma once
#include <cstdint>

#include "token_stats.h"  // FloatType

namespace hotloop::cpu {

struct TransposeAddParams {
  void* dst = nullptr;        // [rows, cols], row stride ld_dst elements
  const void* src = nullptr;  // [cols, rows], row stride ld_src elements
  FloatType dst_type = FloatType::f32;
  FloatType src_type = FloatType::f32;  // == dst_type, or bf16 / f16 into an f32 dst
  int64_t rows = 0, cols = 0;
  int64_t ld_dst = 0, ld_src = 0;
  bool accumulate = false;  // dst += src^T (summed in float / double, rounded once) instead of dst = src^T
  int num_threads = 1;
};

// Returns false for an unsupported dtype pair (nothing written).
bool transpose_add(const TransposeAddParams& p);

}  // namespace hotloop::cpu
