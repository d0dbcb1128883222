// hotloop knn CUDA kernels: fused distance tiles + shared-memory candidate queues + rank merges (see knn.h).
#include "knn.h"

#include <stdint.h>

#include "common.cuh"

namespace hotloop {
namespace {

constexpr int kThreads = 128;            // scan CTA: one key per thread per tile
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kQB = 16;                  // queries per scan CTA (16 fp32 accumulators per thread)
constexpr int kKT = kThreads;            // keys per tile; also the queue capacity (a tile adds <= kKT per query)
constexpr int kDC = 32;                  // dimensions per shared-memory chunk
constexpr int kRanksPerLane = kKT / kWarpSize;
constexpr int64_t kNoIndex = INT64_MAX;  // sentinel index: (+inf, kNoIndex) follows every real candidate
constexpr float kCosEps = 1e-8f;         // python/hotloop/reference/knn.py: EPS
constexpr int64_t kMaxSplitBytes = int64_t{4} << 30;  // workspace cap for per-split candidate lists

__device__ __forceinline__ float inf_f() { return __int_as_float(0x7f800000); }

// (va, ia) strictly precedes (vb, ib): smaller value, or the same value and a lower index.
__device__ __forceinline__ bool precedes(float va, int64_t ia, float vb, int64_t ib) {
  return va < vb || (va == vb && ia < ib);
}

// Number of entries of the sorted list (v, ix)[0, n) that precede (bv, bi): a binary search.
__device__ __forceinline__ int64_t count_before(const float* v, const int64_t* ix, int64_t n, float bv, int64_t bi) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (precedes(v[mid], ix[mid], bv, bi)) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// ------------------------------------------------------------------------------------------- per-row terms
// One warp per key: bias_j and scale_j of knn.h.
template <typename T>
__global__ void key_terms_kernel(const T* __restrict__ keys, int64_t M, int64_t d, int metric,
                                 const uint8_t* __restrict__ valid, float* __restrict__ bias,
                                 float* __restrict__ scale) {
  const int64_t j = (int64_t)blockIdx.x * kWarps + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (j >= M) return;
  float ss = 0.f;
  for (int64_t p = lane; p < d; p += kWarpSize) {
    const float x = to_float(keys[j * d + p]);
    ss = fmaf(x, x, ss);
  }
  ss = warp_sum(ss);
  if (lane != 0) return;
  float b = 0.f, s = -1.f;
  if (metric == HOTLOOP_KNN_L2) b = ss, s = -2.f;
  if (metric == HOTLOOP_KNN_COSINE) s = -1.f / fmaxf(sqrtf(ss), kCosEps);
  if (valid != nullptr && valid[j] == 0) b = inf_f();
  bias[j] = b;
  scale[j] = s;
}

// One warp per query: ||q||^2 (l2) or 1 / max(||q||, eps) (cosine), applied by finalize_kernel.
template <typename T>
__global__ void query_terms_kernel(const T* __restrict__ queries, int64_t Q, int64_t d, int metric,
                                   float* __restrict__ term) {
  const int64_t i = (int64_t)blockIdx.x * kWarps + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (i >= Q) return;
  float ss = 0.f;
  for (int64_t p = lane; p < d; p += kWarpSize) {
    const float x = to_float(queries[i * d + p]);
    ss = fmaf(x, x, ss);
  }
  ss = warp_sum(ss);
  if (lane == 0) term[i] = metric == HOTLOOP_KNN_COSINE ? 1.f / fmaxf(sqrtf(ss), kCosEps) : ss;
}

__global__ void init_lists_kernel(float* __restrict__ v, int64_t* __restrict__ ix, int64_t n) {
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    v[e] = inf_f();
    ix[e] = kNoIndex;
  }
}

// ----------------------------------------------------------------------------------------------- the merge
// One warp merges a query's queue (bv, bi)[0, n) (shared memory, n <= kKT, unsorted) into its sorted list
// (lv, li)[0, k) (global memory), keeping the k first. Queue entries have higher key indices than any list
// entry of the same value only within one CTA's scan, so the (value, index) order is used throughout.
__device__ void warp_merge(float* bv, int64_t* bi, int n, float* lv, int64_t* li, int64_t k, int lane) {
  // 1. bitonic sort of the queue, padded to kKT entries with sentinels
  for (int i = lane; i < kKT; i += kWarpSize) {
    if (i >= n) bv[i] = inf_f(), bi[i] = kNoIndex;
  }
  __syncwarp();
  for (int size = 2; size <= kKT; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = lane; i < kKT; i += kWarpSize) {
        const int p = i ^ stride;
        if (p <= i) continue;
        const bool up = (i & size) == 0;
        const bool swap = up ? precedes(bv[p], bi[p], bv[i], bi[i]) : precedes(bv[i], bi[i], bv[p], bi[p]);
        if (swap) {
          const float tv = bv[i];
          const int64_t ti = bi[i];
          bv[i] = bv[p], bi[i] = bi[p];
          bv[p] = tv, bi[p] = ti;
        }
      }
      __syncwarp();
    }
  }
  // 2. final slot of each queue entry: its queue rank plus the list entries before it (reads the old list)
  int64_t rank[kRanksPerLane];
#pragma unroll
  for (int r = 0; r < kRanksPerLane; ++r) {
    const int i = lane + r * kWarpSize;
    rank[r] = i < n ? i + count_before(lv, li, k, bv[i], bi[i]) : k;
  }
  const int64_t first = count_before(lv, li, k, bv[0], bi[0]);  // list entries before it do not move
  __syncwarp();
  // 3. list entries move right by the number of queue entries before them; back to front, so every entry is
  //    read (this chunk, before the __syncwarp) before any write can land on it
  for (int64_t end = k; end > first; end -= kWarpSize) {
    const int64_t j = end - kWarpSize + lane;
    float v = 0.f;
    int64_t ix = 0, dest = k;
    if (j >= first) {
      v = lv[j], ix = li[j];
      dest = j + count_before(bv, bi, n, v, ix);
    }
    __syncwarp();
    if (dest < k) lv[dest] = v, li[dest] = ix;
    __syncwarp();
  }
  // 4. queue entries into the slots left free
#pragma unroll
  for (int r = 0; r < kRanksPerLane; ++r) {
    const int i = lane + r * kWarpSize;
    if (rank[r] < k) lv[rank[r]] = bv[i], li[rank[r]] = bi[i];
  }
  __syncwarp();
}

// --------------------------------------------------------------------------------------------------- scan
// grid (ceil(Q / kQB), splits). CTA (x, s) scans keys [s * split_len, (s + 1) * split_len) for queries
// [x * kQB, x * kQB + kQB) and keeps each query's k best in lists + (s * Q + q) * k.
template <typename T>
__global__ void __launch_bounds__(kThreads) scan_kernel(const T* __restrict__ queries, const T* __restrict__ keys,
                                                         int64_t Q, int64_t M, int64_t d, int64_t k,
                                                         int64_t split_len, const float* __restrict__ bias,
                                                         const float* __restrict__ scale, float* lists_v,
                                                         int64_t* lists_i) {
  __shared__ float qs[kDC][kQB];
  __shared__ float ks[kDC][kKT + 1];  // +1: the transposing stores hit distinct banks
  __shared__ float queue_v[kQB][kKT];
  __shared__ int64_t queue_i[kQB][kKT];
  __shared__ int queue_n[kQB];
  __shared__ float thr[kQB];

  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int64_t q0 = (int64_t)blockIdx.x * kQB;
  const int64_t split = blockIdx.y;
  const int64_t j_begin = split * split_len;
  const int64_t j_end = j_begin + split_len < M ? j_begin + split_len : M;
  if (tid < kQB) {
    const int64_t q = q0 + tid;
    queue_n[tid] = 0;
    // the k-th value kept so far; a query past Q accepts nothing
    thr[tid] = q < Q ? lists_v[(split * Q + q) * k + k - 1] : -inf_f();
  }
  for (int64_t t0 = j_begin; t0 < j_end; t0 += kKT) {
    float acc[kQB];
#pragma unroll
    for (int qi = 0; qi < kQB; ++qi) acc[qi] = 0.f;
    for (int64_t p0 = 0; p0 < d; p0 += kDC) {
      __syncthreads();  // previous chunk consumed (and, on a new tile, the merges' thr / queue_n written)
      for (int e = tid; e < kQB * kDC; e += kThreads) {
        const int qi = e / kDC, c = e % kDC;
        const int64_t q = q0 + qi, p = p0 + c;
        qs[c][qi] = (q < Q && p < d) ? to_float(queries[q * d + p]) : 0.f;
      }
      for (int e = tid; e < kKT * kDC; e += kThreads) {  // a warp reads 32 consecutive dims of one key
        const int r = e / kDC, c = e % kDC;
        const int64_t j = t0 + r, p = p0 + c;
        ks[c][r] = (j < j_end && p < d) ? to_float(keys[j * d + p]) : 0.f;
      }
      __syncthreads();
#pragma unroll 4
      for (int c = 0; c < kDC; ++c) {
        const float kv = ks[c][tid];
#pragma unroll
        for (int qi = 0; qi < kQB; ++qi) acc[qi] = fmaf(qs[c][qi], kv, acc[qi]);
      }
    }
    const int64_t j = t0 + tid;
    if (j < j_end) {
      const float b = bias[j], s = scale[j];
#pragma unroll
      for (int qi = 0; qi < kQB; ++qi) {
        const float v = fmaf(s, acc[qi], b);
        if (v < thr[qi]) {  // equal values lose: every kept entry has a lower index (ascending scan)
          const int pos = atomicAdd(&queue_n[qi], 1);
          queue_v[qi][pos] = v;
          queue_i[qi][pos] = j;
        }
      }
    }
    __syncthreads();
    for (int qi = warp; qi < kQB; qi += kWarps) {
      const int n = queue_n[qi];
      if (n == 0) continue;
      const int64_t base = (split * Q + q0 + qi) * k;
      warp_merge(queue_v[qi], queue_i[qi], n, lists_v + base, lists_i + base, k, lane);
      if (lane == 0) {
        thr[qi] = lists_v[base + k - 1];
        queue_n[qi] = 0;
      }
    }
  }
}

// ------------------------------------------------------------------------------------- splits and output
// One warp per query: out = the k first of two sorted lists (out-of-place rank merge; the lists hold distinct
// keys, and sentinel collisions write identical entries).
__device__ void warp_merge_lists(const float* av, const int64_t* ai, const float* bv, const int64_t* bi, int64_t k,
                                 float* ov, int64_t* oi, int lane) {
  for (int64_t j = lane; j < k; j += kWarpSize) {
    const int64_t da = j + count_before(bv, bi, k, av[j], ai[j]);
    if (da < k) ov[da] = av[j], oi[da] = ai[j];
    const int64_t db = j + count_before(av, ai, k, bv[j], bi[j]);
    if (db < k) ov[db] = bv[j], oi[db] = bi[j];
  }
  __syncwarp();
}

__global__ void merge_splits_kernel(float* lists_v, int64_t* lists_i, int64_t Q, int64_t k, int splits,
                                    float* out_v, int64_t* out_i) {
  const int64_t q = (int64_t)blockIdx.x * kWarps + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (q >= Q) return;
  float* l0v = lists_v + q * k;
  int64_t* l0i = lists_i + q * k;
  const float* cv = l0v;
  const int64_t* ci = l0i;
  for (int s = 1; s < splits; ++s) {
    // ping-pong: odd passes write the output, even ones list 0 (already merged into the output)
    float* dv = (s % 2 == 1) ? out_v + q * k : l0v;
    int64_t* di = (s % 2 == 1) ? out_i + q * k : l0i;
    const int64_t off = ((int64_t)s * Q + q) * k;
    warp_merge_lists(cv, ci, lists_v + off, lists_i + off, k, dv, di, lane);
    cv = dv, ci = di;
  }
  if (cv != out_v + q * k) {
    for (int64_t j = lane; j < k; j += kWarpSize) out_v[q * k + j] = cv[j], out_i[q * k + j] = ci[j];
  }
}

// Values -> scores in place (knn.h); sentinels -> index -1 and +inf (l2) / -inf.
__global__ void finalize_kernel(float* __restrict__ v, int64_t* __restrict__ ix, int64_t Q, int64_t k, int metric,
                                const float* __restrict__ qterm) {
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < Q * k; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t q = e / k;
    if (ix[e] == kNoIndex) {
      ix[e] = -1;
      v[e] = metric == HOTLOOP_KNN_L2 ? inf_f() : -inf_f();
    } else if (metric == HOTLOOP_KNN_L2) {
      v[e] = fmaxf(qterm[q] + v[e], 0.f);
    } else if (metric == HOTLOOP_KNN_IP) {
      v[e] = -v[e];
    } else {
      v[e] = -v[e] * qterm[q];
    }
  }
}

// ------------------------------------------------------------------------------------------------- host
int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

bool valid_params(const hotloop_knn_params* p) {
  return p != nullptr && p->Q >= 0 && p->M >= 1 && p->d >= 1 && p->k >= 1 && p->k <= p->M &&
         (p->dtype == HOTLOOP_DTYPE_FLOAT32 || p->dtype == HOTLOOP_DTYPE_BFLOAT16 ||
          p->dtype == HOTLOOP_DTYPE_FLOAT16) &&
         (p->metric == HOTLOOP_KNN_L2 || p->metric == HOTLOOP_KNN_IP || p->metric == HOTLOOP_KNN_COSINE);
}

int grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return (int)(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

template <typename T>
cudaError_t launch(const hotloop_knn_params* p, cudaStream_t stream) {
  const int64_t Q = p->Q, M = p->M, d = p->d, k = p->k;
  const int splits = hotloop_knn_splits(p);
  char* ws = static_cast<char*>(p->workspace);
  float* bias = reinterpret_cast<float*>(ws);
  ws += align16(M * 4);
  float* scale = reinterpret_cast<float*>(ws);
  ws += align16(M * 4);
  float* qterm = reinterpret_cast<float*>(ws);
  ws += align16(Q * 4);
  float* lists_v = p->scores;  // one split: the scan's lists are the outputs
  int64_t* lists_i = p->indices;
  if (splits > 1) {
    lists_v = reinterpret_cast<float*>(ws);
    ws += align16((int64_t)splits * Q * k * 4);
    lists_i = reinterpret_cast<int64_t*>(ws);
  }
  const T* queries = static_cast<const T*>(p->queries);
  const T* keys = static_cast<const T*>(p->keys);

  key_terms_kernel<T><<<(unsigned)((M + kWarps - 1) / kWarps), kThreads, 0, stream>>>(keys, M, d, p->metric, p->valid,
                                                                                   bias, scale);
  query_terms_kernel<T><<<(unsigned)((Q + kWarps - 1) / kWarps), kThreads, 0, stream>>>(queries, Q, d, p->metric,
                                                                                     qterm);
  const int64_t n_lists = (int64_t)splits * Q * k;
  init_lists_kernel<<<grid_for(n_lists, 256), 256, 0, stream>>>(lists_v, lists_i, n_lists);
  const int64_t split_len = ((M + splits - 1) / splits + kKT - 1) / kKT * kKT;
  const dim3 grid((unsigned)((Q + kQB - 1) / kQB), (unsigned)splits);
  scan_kernel<T><<<grid, kThreads, 0, stream>>>(queries, keys, Q, M, d, k, split_len, bias, scale, lists_v, lists_i);
  if (splits > 1) {
    merge_splits_kernel<<<(unsigned)((Q + kWarps - 1) / kWarps), kThreads, 0, stream>>>(lists_v, lists_i, Q, k, splits,
                                                                                    p->scores, p->indices);
  }
  finalize_kernel<<<grid_for(Q * k, 256), 256, 0, stream>>>(p->scores, p->indices, Q, k, p->metric, qterm);
  return cudaGetLastError();
}

}  // namespace
}  // namespace hotloop

extern "C" int32_t hotloop_knn_splits(const hotloop_knn_params* p) {
  using namespace hotloop;
  if (!valid_params(p) || p->Q == 0) return 1;
  const int64_t qblocks = (p->Q + kQB - 1) / kQB;
  int64_t splits = p->force_splits;
  if (splits <= 0) {
    int sms = p->num_sms;
    if (sms <= 0) {
      int dev = 0;
      if (cudaGetDevice(&dev) != cudaSuccess ||
          cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0)
        sms = 1;
    }
    splits = (2 * (int64_t)sms + qblocks - 1) / qblocks;                 // about two CTAs per SM
    const int64_t tiles = (p->M + kKT - 1) / kKT;
    splits = splits < (tiles + 3) / 4 ? splits : (tiles + 3) / 4;        // at least four tiles per split
  }
  const int64_t by_bytes = kMaxSplitBytes / (p->Q * p->k * 12);
  if (splits > by_bytes) splits = by_bytes;
  if (splits > 65535) splits = 65535;
  return (int32_t)(splits > 1 ? splits : 1);
}

extern "C" int64_t hotloop_knn_workspace_bytes(const hotloop_knn_params* p) {
  using namespace hotloop;
  if (!valid_params(p)) return 0;
  int64_t bytes = 2 * align16(p->M * 4) + align16(p->Q * 4);
  const int32_t splits = hotloop_knn_splits(p);
  if (splits > 1) bytes += align16((int64_t)splits * p->Q * p->k * 4) + (int64_t)splits * p->Q * p->k * 8;
  return bytes;
}

extern "C" cudaError_t hotloop_knn(const hotloop_knn_params* p, cudaStream_t stream) {
  using namespace hotloop;
  if (!valid_params(p) || p->queries == nullptr || p->keys == nullptr || p->scores == nullptr ||
      p->indices == nullptr)
    return cudaErrorInvalidValue;
  if (p->Q == 0) return cudaSuccess;
  if (p->workspace == nullptr || p->workspace_bytes < hotloop_knn_workspace_bytes(p)) return cudaErrorInvalidValue;
  switch (p->dtype) {
    case HOTLOOP_DTYPE_BFLOAT16: return launch<__nv_bfloat16>(p, stream);
    case HOTLOOP_DTYPE_FLOAT16: return launch<__half>(p, stream);
    default: return launch<float>(p, stream);
  }
}
