// EMA over every tensor of a model in one OpenMP region (docs/ema.md), CPU kernel.
//
// The op is memory bound: each element is read twice (target, online) and written once (twice with a copy).
// So the kernel makes exactly that one pass: the tensors are laid end to end as one flat index space and each
// thread takes one contiguous slice of it (cut on 64-element boundaries, so no two threads share a cache
// line of a tensor), walking tensor by tensor. One parallel region for the whole model, no per-tensor fork /
// join, and the hardware prefetchers see long sequential streams. The inner loops are plain `omp simd` loops
// over widened values that GCC vectorises.
//
// The lerp is ATen's (torch.lerp / torch._foreach_lerp_): with w = 1 - d,
//   w < 0.5:  t + w * (s - t)        else:  s - (s - t) * (1 - w)
// so d = 1 leaves t bit for bit and d = 0 gives s exactly (see ema_kernel.h for the per-ISA loops).
#include "ema.h"

#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "isa.h"

namespace hotloop::cpu {

// Per-ISA slice kernels (ema_kernel.h).
HOTLOOP_ISA_DECLARE(void ema_slice(const EmaTensor& e, int64_t off, int64_t n, double decay))

namespace {

constexpr int64_t kAlign = 64;             // thread slices start on multiples of this many elements
constexpr int64_t kParallelMin = 1 << 16;  // below this many elements in total one thread is faster

}  // namespace

bool ema_supported(FloatType target, FloatType online) {
  if (target == FloatType::f32) return online != FloatType::f64;
  return online == target;
}

bool ema_update(const EmaParams& p) {
  std::vector<int64_t> start(p.count + 1, 0);  // flat index of each tensor's first element
  for (int64_t i = 0; i < p.count; ++i) {
    const EmaTensor& e = p.tensors[i];
    if (!ema_supported(e.target_dtype, e.online_dtype)) return false;
    if (e.copy != nullptr && (e.target_dtype == FloatType::f64 || e.copy_dtype == FloatType::f64)) return false;
    start[i + 1] = start[i] + e.n;
  }
  const int64_t total = start[p.count];
  const auto slice = HOTLOOP_ISA_PICK(ema_slice);  // once per update, not per slice
  const int nt = total >= kParallelMin ? std::max(p.num_threads, 1) : 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int tid = 0, nth = 1;
#ifdef _OPENMP
    tid = omp_get_thread_num();
    nth = omp_get_num_threads();
#endif
    auto cut = [&](int k) { return k == nth ? total : (total / kAlign) * k / nth * kAlign; };
    const int64_t lo = cut(tid), hi = cut(tid + 1);
    // first tensor holding element lo, then tensor by tensor up to hi
    int64_t i = std::upper_bound(start.begin(), start.end(), lo) - start.begin() - 1;
    for (int64_t pos = lo; pos < hi && i < p.count; ++i) {
      const int64_t end = std::min(hi, start[i + 1]);
      if (end > pos) slice(p.tensors[i], pos - start[i], end - pos, p.decay);
      pos = std::max(pos, end);
    }
  }
  return true;
}

}  // namespace hotloop::cpu
