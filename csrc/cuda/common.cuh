// Small device helpers shared by hotloop's CUDA kernels: element <-> float conversion, 16-byte packs,
// cache-hinted vector loads / stores, warp and block reductions. Header-only; everything is inline.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

// `#pragma unroll` for __host__ __device__ code: the host compiler would warn about the unknown pragma.
#if defined(__CUDA_ARCH__)
#define HOTLOOP_UNROLL _Pragma("unroll")
#else
#define HOTLOOP_UNROLL
#endif

namespace hotloop {

constexpr int kWarpSize = 32;

// ------------------------------------------------------------------------------------------ scalar elements
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// --------------------------------------------------------------------------------------------- 16-byte packs
// Pack<T>::kN elements of T travel as one uint4 (one 128-bit memory transaction per thread); unpack / pack
// take pointers to kN floats so callers can slice a larger unrolled register array. Element k sits at
// the k-th lowest address, i.e. the low half of a 32-bit word holds the lower-addressed 16-bit element.
template <typename T>
struct Pack;

template <>
struct Pack<float> {
  static constexpr int kN = 4;
  static __device__ __forceinline__ void unpack(const uint4& v, float* f) {
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
  }
  static __device__ __forceinline__ uint4 pack(const float* f) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
};

template <>
struct Pack<__nv_bfloat16> {
  static constexpr int kN = 8;
  // bf16 -> fp32 is exact and is just the top half of the fp32 bit pattern.
  static __device__ __forceinline__ void unpack_word(uint32_t w, float& lo, float& hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  }
  static __device__ __forceinline__ uint32_t pack_word(float lo, float hi) {
    const __nv_bfloat162_raw r = __floats2bfloat162_rn(lo, hi);
    return static_cast<uint32_t>(r.x) | (static_cast<uint32_t>(r.y) << 16);
  }
  static __device__ __forceinline__ void unpack(const uint4& v, float* f) {
    unpack_word(v.x, f[0], f[1]);
    unpack_word(v.y, f[2], f[3]);
    unpack_word(v.z, f[4], f[5]);
    unpack_word(v.w, f[6], f[7]);
  }
  static __device__ __forceinline__ uint4 pack(const float* f) {
    return make_uint4(pack_word(f[0], f[1]), pack_word(f[2], f[3]), pack_word(f[4], f[5]), pack_word(f[6], f[7]));
  }
};

template <>
struct Pack<__half> {
  static constexpr int kN = 8;
  static __device__ __forceinline__ void unpack_word(uint32_t w, float& lo, float& hi) {
    lo = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
    hi = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
  static __device__ __forceinline__ uint32_t pack_word(float lo, float hi) {
    const __half2_raw r = __floats2half2_rn(lo, hi);
    return static_cast<uint32_t>(r.x) | (static_cast<uint32_t>(r.y) << 16);
  }
  static __device__ __forceinline__ void unpack(const uint4& v, float* f) {
    unpack_word(v.x, f[0], f[1]);
    unpack_word(v.y, f[2], f[3]);
    unpack_word(v.z, f[4], f[5]);
    unpack_word(v.w, f[6], f[7]);
  }
  static __device__ __forceinline__ uint4 pack(const float* f) {
    return make_uint4(pack_word(f[0], f[1]), pack_word(f[2], f[3]), pack_word(f[4], f[5]), pack_word(f[6], f[7]));
  }
};

// Number of leading elements of a row to handle one by one so that the rest starts on a 16-byte boundary
// (a sliced row may start anywhere that is a multiple of sizeof(T)). Capped at n.
template <typename T>
__device__ __forceinline__ int align16_head(const T* p, int n) {
  const int mis = static_cast<int>(reinterpret_cast<uintptr_t>(p) & 15u);
  const int head = ((16 - mis) & 15) / static_cast<int>(sizeof(T));
  return head < n ? head : n;
}

// ------------------------------------------------------------------------------- cache-hinted 16-byte access
// Read-only for the whole kernel (never written by anyone while the kernel runs): non-coherent path.
__device__ __forceinline__ uint4 ld_readonly16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
// Streamed once, possibly overwritten later by the same thread (in-place): coherent, evict-first.
__device__ __forceinline__ uint4 ld_stream16(const void* p) { return __ldcs(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ void st_stream16(void* p, const uint4& v) { __stcs(reinterpret_cast<uint4*>(p), v); }

// --------------------------------------------------------------------------------------------- reductions
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Sum over a block of kBlock threads (a multiple of 32); every thread gets the result. `smem` holds at least
// kBlock / 32 floats; the leading __syncthreads lets callers reuse the same scratch back to back.
template <int kBlock>
__device__ __forceinline__ float block_sum(float v, float* smem) {
  static_assert(kBlock % kWarpSize == 0 && kBlock <= 1024, "block must be whole warps");
  constexpr int kWarps = kBlock / kWarpSize;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < kWarps ? smem[lane] : 0.f;
  return warp_sum(v);
}

template <int kBlock>
__device__ __forceinline__ float block_max(float v, float* smem) {
  static_assert(kBlock % kWarpSize == 0 && kBlock <= 1024, "block must be whole warps");
  constexpr int kWarps = kBlock / kWarpSize;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < kWarps ? smem[lane] : -INFINITY;
  return warp_max(v);
}

// Label (or any index) stored as int32 or int64, widened.
__device__ __forceinline__ int64_t load_index(const void* p, bool is64, int64_t i) {
  return is64 ? __ldg(static_cast<const long long*>(p) + i)
              : static_cast<int64_t>(__ldg(static_cast<const int*>(p) + i));
}

}  // namespace hotloop
