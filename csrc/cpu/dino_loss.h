// DINO loss (docs/dino_loss.md), CPU kernel: cross-entropy between centred, sharpened teacher softmaxes and the student's
// log-softmaxes over K prototypes, every (teacher crop, other student crop) pair, loss and d loss / d student.
// Plain C++ (no torch headers) so CMake builds and ctest-checks it without torch.
#pragma once
#include <cstdint>

#include "token_stats.h"  // FloatType

namespace hotloop::cpu {

struct DinoLossParams {
  // Rows are crop-major: row v * B + b is crop v of image b. All contiguous, one dtype (`dtype`).
  const void* student = nullptr;  // [n_crops * B, K]
  const void* teacher = nullptr;  // [n_global * B, K]
  const void* center = nullptr;   // [K], float32 (double for f64)
  FloatType dtype = FloatType::f32;
  int64_t B = 0, K = 0, n_crops = 0, n_global = 0;  // n_global <= n_crops; some pair exists
  double tau_s = 0.1, tau_t = 0.04;
  void* loss = nullptr;           // [1], float (double for f64)
  void* grad_student = nullptr;   // [n_crops * B, K] in `dtype`, or null (no gradient)
  int num_threads = 1;
};

// loss = sum_b sum_{i < n_global} sum_{v != i} -q_{i,b} . log_softmax(s_{v,b} / tau_s) / (n_terms * B),
// q_{i,b} = softmax((t_{i,b} - center) / tau_t), n_terms = n_global * n_crops - n_global (DINO's averaging).
void dino_loss(const DinoLossParams& p);

}  // namespace hotloop::cpu
