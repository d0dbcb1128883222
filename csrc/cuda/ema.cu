// Multi-tensor EMA (see ema.h for the ABI): one launch for every tensor of a model, whatever their dtypes.
// Memory bound: per element one read of target and online, one write of target (and of the copy), so the goal is
// full 16-byte transactions and enough of them in flight; the per-chunk table lookup is a few cached loads.
#include "ema.h"

#include <type_traits>

#include "common.cuh"

namespace hotloop {
namespace {

constexpr int kBlock = 256;
constexpr int64_t kChunk = 16384;    // elements per CTA work item: 64 KiB of float32 target
constexpr int kBlocksPerSm = 8;

struct NoCopy {};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// ATen's lerp with w = 1 - d: exact at d = 1 (w = 0) and d = 0 (w = 1).
__device__ __forceinline__ float lerp(float t, float s, float w) {
  return w < 0.5f ? fmaf(w, s - t, t) : fmaf(-(1.f - w), s - t, s);
}

template <typename C>
__device__ __forceinline__ void store_copy(C* c, int64_t i, float r) {
  if constexpr (!std::is_same<C, NoCopy>::value) c[i] = from_float<C>(r);
}

// Elements [lo, hi) of one tensor, 16 bytes of target per vector.
template <typename T, typename S, typename C>
__device__ void lerp_chunk(T* __restrict__ t, const S* __restrict__ s, C* __restrict__ c, int64_t lo, int64_t hi,
                           float w) {
  constexpr int kN = 16 / sizeof(T);
  using VT = Vec<T, kN>;
  using VS = Vec<S, kN>;
  const bool aligned = (reinterpret_cast<uintptr_t>(t + lo) % sizeof(VT)) == 0 &&
                       (reinterpret_cast<uintptr_t>(s + lo) % sizeof(VS)) == 0 &&
                       (std::is_same<C, NoCopy>::value ||
                        (reinterpret_cast<uintptr_t>(c + lo) % (sizeof(C) * kN)) == 0);
  int64_t i = lo;
  if (aligned) {
    const int64_t nvec = (hi - lo) / kN;
    // unrolled so each thread has several independent 16-byte loads in flight (the kernel is latency bound
    // on loads otherwise)
#pragma unroll 4
    for (int64_t v = threadIdx.x; v < nvec; v += kBlock) {
      const int64_t j = lo + v * kN;
      VT tv = *reinterpret_cast<const VT*>(t + j);
      const VS sv = *reinterpret_cast<const VS*>(s + j);
      float r[kN];
      HOTLOOP_UNROLL
      for (int k = 0; k < kN; ++k) {
        r[k] = lerp(to_float(tv.v[k]), to_float(sv.v[k]), w);
        tv.v[k] = from_float<T>(r[k]);
      }
      *reinterpret_cast<VT*>(t + j) = tv;
      if constexpr (!std::is_same<C, NoCopy>::value) {
        Vec<C, kN> cv;
        HOTLOOP_UNROLL
        for (int k = 0; k < kN; ++k) cv.v[k] = from_float<C>(r[k]);
        *reinterpret_cast<Vec<C, kN>*>(c + j) = cv;
      }
    }
    i = lo + nvec * kN;
  }
  for (int64_t j = i + threadIdx.x; j < hi; j += kBlock) {
    const float r = lerp(to_float(t[j]), to_float(s[j]), w);
    t[j] = from_float<T>(r);
    store_copy(c, j, r);
  }
}

template <typename T, typename S>
__device__ void dispatch_copy(const hotloop_ema_tensor& e, int64_t lo, int64_t hi, float w) {
  T* t = reinterpret_cast<T*>(e.target);
  const S* s = reinterpret_cast<const S*>(e.online);
  if (e.copy == 0) return lerp_chunk(t, s, static_cast<NoCopy*>(nullptr), lo, hi, w);
  switch ((e.dtypes >> 16) & 0xff) {
    case HOTLOOP_DTYPE_BFLOAT16: return lerp_chunk(t, s, reinterpret_cast<__nv_bfloat16*>(e.copy), lo, hi, w);
    case HOTLOOP_DTYPE_FLOAT16: return lerp_chunk(t, s, reinterpret_cast<__half*>(e.copy), lo, hi, w);
    default: return lerp_chunk(t, s, reinterpret_cast<float*>(e.copy), lo, hi, w);
  }
}

__global__ void __launch_bounds__(kBlock) ema_kernel(hotloop_ema_params p) {
  const int64_t* starts = reinterpret_cast<const int64_t*>(p.table + p.count);
  const float d = p.decay_ptr != nullptr ? *p.decay_ptr : p.decay;
  const float w = 1.f - d;
  for (int64_t chunk = blockIdx.x; chunk < p.total_chunks; chunk += gridDim.x) {
    // the tensor holding this chunk: last i with starts[i] <= chunk (empty tensors have no chunks)
    int64_t a = 0, b = p.count - 1;
    while (a < b) {
      const int64_t m = (a + b + 1) / 2;
      if (starts[m] <= chunk) a = m;
      else b = m - 1;
    }
    const hotloop_ema_tensor e = p.table[a];
    const int64_t lo = (chunk - starts[a]) * p.chunk;
    const int64_t hi = lo + p.chunk < e.n ? lo + p.chunk : e.n;
    const int tdt = static_cast<int>(e.dtypes & 0xff), sdt = static_cast<int>((e.dtypes >> 8) & 0xff);
    if (tdt == HOTLOOP_DTYPE_FLOAT32) {
      if (sdt == HOTLOOP_DTYPE_BFLOAT16) dispatch_copy<float, __nv_bfloat16>(e, lo, hi, w);
      else if (sdt == HOTLOOP_DTYPE_FLOAT16) dispatch_copy<float, __half>(e, lo, hi, w);
      else dispatch_copy<float, float>(e, lo, hi, w);
    } else if (tdt == HOTLOOP_DTYPE_BFLOAT16) {
      dispatch_copy<__nv_bfloat16, __nv_bfloat16>(e, lo, hi, w);
    } else {
      dispatch_copy<__half, __half>(e, lo, hi, w);
    }
  }
}

}  // namespace
}  // namespace hotloop

extern "C" int64_t hotloop_ema_chunk_elems(void) { return hotloop::kChunk; }

extern "C" cudaError_t hotloop_ema_update(const hotloop_ema_params* p, cudaStream_t stream) {
  if (p == nullptr || p->count < 0 || p->total_chunks < 0 || p->chunk != hotloop::kChunk) return cudaErrorInvalidValue;
  if (p->count == 0 || p->total_chunks == 0) return cudaSuccess;
  if (p->table == nullptr) return cudaErrorInvalidValue;
  int sms = p->num_sms;
  if (sms <= 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  }
  const int64_t cap = static_cast<int64_t>(sms > 0 ? sms : 1) * hotloop::kBlocksPerSm;
  const unsigned grid = static_cast<unsigned>(p->total_chunks < cap ? p->total_chunks : cap);
  hotloop::ema_kernel<<<grid, hotloop::kBlock, 0, stream>>>(*p);
  return cudaGetLastError();
}
