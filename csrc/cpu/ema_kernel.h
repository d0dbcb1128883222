// Body of the EMA CPU kernel: the lerp over one slice of one tensor triple. Included once per ISA by
// ema_{avx512,avx2,base}.cpp (see isa.h); ema.cpp splits the work and picks the ISA. With FMA (avx2, avx512)
// GCC contracts the lerp into fused multiply-adds as ATen's vectorised lerp does, so float32 results equal
// torch._foreach_lerp_'s bit for bit; the base ISA rounds the product separately (within 1 ulp).
#include <cstdint>
#include <type_traits>

#include "ema.h"
#include "isa.h"
#include "simd_math.h"

#if HOTLOOP_ISA_COMPILED
HOTLOOP_ISA_BEGIN

namespace hotloop::cpu::HOTLOOP_ISA {
namespace {

struct NoCopy {};

template <class T, class S, class C>
void lerp_range(T* __restrict t, const S* __restrict s, C* __restrict c, int64_t n, double decay) {
  using Acc = typename acc_type<T>::type;
  constexpr bool kCopy = !std::is_same_v<C, NoCopy>;
  const Acc w = Acc(1.0 - decay);
  if (w < Acc(0.5)) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const Acc tv = to_float(t[i]), sv = Acc(to_float(s[i]));
      const Acc r = tv + w * (sv - tv);
      store(t + i, r);
      if constexpr (kCopy) store(c + i, float(r));
    }
  } else {
    const Acc omw = Acc(1) - w;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const Acc tv = to_float(t[i]), sv = Acc(to_float(s[i]));
      const Acc r = sv - (sv - tv) * omw;
      store(t + i, r);
      if constexpr (kCopy) store(c + i, float(r));
    }
  }
}

template <class T, class S>
void lerp_copy(const EmaTensor& e, int64_t off, int64_t n, double decay) {
  T* t = static_cast<T*>(e.target) + off;
  const S* s = static_cast<const S*>(e.online) + off;
  if (e.copy == nullptr) return lerp_range(t, s, static_cast<NoCopy*>(nullptr), n, decay);
  if constexpr (std::is_same_v<T, double>) {
    return;  // no copy for float64 (rejected by ema_update before any work)
  } else {
    switch (e.copy_dtype) {
      case FloatType::bf16: return lerp_range(t, s, static_cast<bf16*>(e.copy) + off, n, decay);
      case FloatType::f16: return lerp_range(t, s, static_cast<f16*>(e.copy) + off, n, decay);
      default: return lerp_range(t, s, static_cast<float*>(e.copy) + off, n, decay);
    }
  }
}

}  // namespace

// Elements [off, off + n) of one tensor triple.
void ema_slice(const EmaTensor& e, int64_t off, int64_t n, double decay) {
  switch (e.target_dtype) {
    case FloatType::f32:
      switch (e.online_dtype) {
        case FloatType::bf16: return lerp_copy<float, bf16>(e, off, n, decay);
        case FloatType::f16: return lerp_copy<float, f16>(e, off, n, decay);
        default: return lerp_copy<float, float>(e, off, n, decay);
      }
    case FloatType::bf16: return lerp_copy<bf16, bf16>(e, off, n, decay);
    case FloatType::f16: return lerp_copy<f16, f16>(e, off, n, decay);
    case FloatType::f64: return lerp_copy<double, double>(e, off, n, decay);
  }
}

}  // namespace hotloop::cpu::HOTLOOP_ISA

HOTLOOP_ISA_END
#endif
