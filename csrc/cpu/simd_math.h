// Scalar math written so GCC auto-vectorises it inside `#pragma omp simd` loops: no branches, no libm calls,
// bit casts instead of unions. Each ISA translation unit (see isa.h) inlines these and vectorises them with its
// own instruction set.
#pragma once
#include <cmath>
#include <cstdint>

namespace hotloop::cpu {

#define HOTLOOP_INLINE inline __attribute__((always_inline))

// 16-bit storage types. _Float16 does not vectorise in GCC 12 without AVX512-FP16, so both are raw bits.
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

HOTLOOP_INLINE float bits_to_float(uint32_t u) { return __builtin_bit_cast(float, u); }
HOTLOOP_INLINE uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

// exp(x) for x <= 88: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-7 polynomial (Cephes expf
// coefficients), 2^n put in the exponent field. ~1 ulp. Returns exactly 0 below -87.3, where float underflows,
// and NaN for NaN (the bit arithmetic alone would turn NaN into a finite value).
HOTLOOP_INLINE float exp_f32(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits
  const float t = x * 1.44269504088896341f + kRound;
  const int32_t n_bits = static_cast<int32_t>(float_to_bits(t)) - static_cast<int32_t>(float_to_bits(kRound));
  const float n = t - kRound;
  float r = x - n * 0.693359375f;  // ln2 split in two so n*ln2_hi is exact
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const float scaled = bits_to_float(float_to_bits(y) + (static_cast<uint32_t>(n_bits) << 23));
  return x != x ? x : (x < -87.3f ? 0.0f : scaled);
}

// Widening loads to the accumulation type.
HOTLOOP_INLINE float to_float(float v) { return v; }
HOTLOOP_INLINE double to_float(double v) { return v; }
HOTLOOP_INLINE float to_float(bf16 v) { return bits_to_float(static_cast<uint32_t>(v.bits) << 16); }
HOTLOOP_INLINE float to_float(f16 v) {
  // Move exponent+mantissa into float position and rebias by multiplying with 2^112: exact for normals and
  // subnormals alike. Inf/NaN (exponent all ones) get the float's all-ones exponent instead.
  const uint32_t em = static_cast<uint32_t>(v.bits & 0x7fffu) << 13;
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const float finite = bits_to_float(em) * 0x1p112f;
  const uint32_t mag = em >= (0x7c00u << 13) ? (em | 0x7f800000u) : float_to_bits(finite);
  return bits_to_float(mag | sign);
}

// Narrowing stores, round to nearest even; NaN stays NaN.
HOTLOOP_INLINE void store(float* p, float v) { *p = v; }
HOTLOOP_INLINE void store(double* p, double v) { *p = v; }
HOTLOOP_INLINE void store(bf16* p, float v) {
  const uint32_t u = float_to_bits(v);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  p->bits = static_cast<uint16_t>(v != v ? 0x7fc0u : rounded);
}
HOTLOOP_INLINE void store(f16* p, float v) {
  // Not vectorised (needs F16C intrinsics); fp16 gradients are rare next to bf16.
  const _Float16 h = static_cast<_Float16>(v);
  p->bits = __builtin_bit_cast(uint16_t, h);
}

template <class T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };

// exp in the accumulation type: the polynomial for float, libm for double (the float64 path is for tests).
HOTLOOP_INLINE float exp_acc(float x) { return exp_f32(x); }
HOTLOOP_INLINE double exp_acc(double x) { return std::exp(x); }

}  // namespace hotloop::cpu
