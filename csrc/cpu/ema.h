// EMA of a whole model's tensors in one pass (docs/ema.md): target <- d * target + (1 - d) * online, CPU kernel.
// Plain C++ (no torch headers) so CMake builds and ctest-checks it without torch.
#pragma once
#include <cstdint>

#include "token_stats.h"  // FloatType

namespace hotloop::cpu {

// One (target, online[, copy]) triple of n contiguous elements. Supported dtype pairs (target, online):
// (f32, f32 | bf16 | f16), (bf16, bf16), (f16, f16), (f64, f64); the math is float32 (float64 for f64) and the
// result is rounded once. `copy`, when set, receives the new target rounded to copy_dtype (f32 / bf16 / f16):
// the low-precision teacher next to a float32 shadow, written in the same pass.
struct EmaTensor {
  void* target = nullptr;
  const void* online = nullptr;
  void* copy = nullptr;
  int64_t n = 0;
  FloatType target_dtype = FloatType::f32;
  FloatType online_dtype = FloatType::f32;
  FloatType copy_dtype = FloatType::bf16;
};

struct EmaParams {
  const EmaTensor* tensors = nullptr;
  int64_t count = 0;
  double decay = 0.0;  // d in [0, 1]: 1 keeps the target bit for bit, 0 makes it the online value exactly
  int num_threads = 1;
};

// Returns false (writing nothing) when a tensor has an unsupported dtype pair.
bool ema_update(const EmaParams& p);

// Whether the kernel takes this (target, online) dtype pair.
bool ema_supported(FloatType target, FloatType online);

}  // namespace hotloop::cpu
