// token_stats: per-row log-prob of the label, entropy and self-certainty of softmax(logits / tau) in one read
// of the logits (forward), and d loss / d logits in one read + one write (backward). See token_stats.h for
// the ABI and the math. Both kernels are memory bound: the design goal is to keep enough 16-byte loads in
// flight per SM and to spend at most a handful of ALU ops (one MUFU.EX2) per element.
#include "token_stats.h"

#include <limits.h>
#include <math.h>

#include "common.cuh"

namespace hotloop {
namespace {

constexpr int kFwdBlock = 256;
constexpr int kBwdBlock = 256;
constexpr int kMergeBlock = 128;        // one warp per row
constexpr int kUnroll = 4;              // independent 16-byte loads per thread before any use (latency hiding)
constexpr int kMaxSplits = 32;          // the merge kernel gives each split one lane
constexpr int kMinSplitElems = 4096;    // below this a split's fixed cost (reduction, partial store) dominates
constexpr int kBwdChunkVecs = kBwdBlock * kUnroll * 2;  // default vectors per backward CTA (16 KB..32 KB read)
constexpr int kMaxGridY = 65535;

// exp(x) underflows to 0 well before -200, so clamping a shifted logit there changes nothing where p > 0, but
// turns p * (z' - M) = 0 * (-inf) (masked vocabulary, -inf logits) into 0 * (-200) = 0 instead of NaN.
// fmaxf drops a NaN argument, which is fine: every clamped value is multiplied by an exp() of the same NaN.
constexpr float kShiftFloor = -200.f;

// __expf is ex2.approx(x * log2 e): a 2-ulp error near 0 where the terms that matter live, growing with |x|
// only for terms below e^-20 that cannot move a float32 sum. The accurate expf costs ~6 more ALU ops per
// element, which the forward cannot afford at full HBM bandwidth for 2-byte logits.
// Host-callable so the stats algebra can be unit-tested on a CPU-only machine.
__host__ __device__ __forceinline__ float fast_exp(float x) {
#ifdef __CUDA_ARCH__
  return __expf(x);
#else
  return expf(x);
#endif
}

// ----------------------------------------------------------------------------------------------- row helpers
template <typename T>
__device__ __forceinline__ const T* row_ptr(const void* base, int64_t row, int64_t n_t, int64_t sb, int64_t st) {
  const int64_t b = row / n_t;
  const int64_t t = row - b * n_t;
  return static_cast<const T*>(base) + b * sb + t * st;
}

template <typename T>
__device__ __forceinline__ T* row_ptr_mut(void* base, int64_t row, int64_t n_t, int64_t sb, int64_t st) {
  const int64_t b = row / n_t;
  const int64_t t = row - b * n_t;
  return static_cast<T*>(base) + b * sb + t * st;
}

// ------------------------------------------------------------------------------------ online softmax stats
// m: max of z' seen so far; s = sum exp(z' - m); a = sum exp(z' - m) * (z' - m); b = sum of RAW z (scaled by
// 1/tau once at the end). Keeping a relative to m (not sum p * z') avoids cancelling large logits against lse.
struct Stats {
  float m, s, a, b;
};

__host__ __device__ __forceinline__ Stats stats_identity() { return Stats{-INFINITY, 0.f, 0.f, 0.f}; }

// Exact for either side empty (m = -inf): its shift clamps to the floor, its weight exp(floor) flushes to 0,
// and 0 * (s * floor + a) stays 0, while NaN sums still propagate (NaN * 0 = NaN).
__host__ __device__ __forceinline__ Stats stats_merge(const Stats& x, const Stats& y) {
  const float m = fmaxf(x.m, y.m);
  const float dx = fmaxf(x.m - m, kShiftFloor);  // both empty: -inf - -inf = NaN, clamped to the floor too
  const float dy = fmaxf(y.m - m, kShiftFloor);
  const float cx = fast_exp(dx), cy = fast_exp(dy);
  Stats r;
  r.m = m;
  r.s = fmaf(x.s, cx, y.s * cy);
  r.a = fmaf(cx, fmaf(x.s, dx, x.a), cy * fmaf(y.s, dy, y.a));
  r.b = x.b + y.b;
  return r;
}

// Folds kCount raw logits into st. One max and (rarely) one rescale per group instead of per element.
template <int kCount>
__host__ __device__ __forceinline__ void stats_accumulate(Stats& st, const float* z, float inv_temp) {
  float zmax = z[0];
HOTLOOP_UNROLL
  for (int k = 1; k < kCount; ++k) zmax = fmaxf(zmax, z[k]);
  // 1/tau > 0 so the max commutes with the scaling; a group of NaNs gives NaN here, which fmaxf ignores
  const float m_new = fmaxf(st.m, zmax * inv_temp);
  if (m_new > st.m) {
    const float d = fmaxf(st.m - m_new, kShiftFloor);
    const float c = fast_exp(d);
    st.a = c * fmaf(st.s, d, st.a);
    st.s *= c;
    st.m = m_new;
  }
  // Nothing finite yet (all -inf / NaN so far): shift by 0 so exp(-inf - shift) = 0 rather than exp(NaN).
  const float shift = st.m == -INFINITY ? 0.f : st.m;
  float s = 0.f, a = 0.f, b = 0.f;
HOTLOOP_UNROLL
  for (int k = 0; k < kCount; ++k) {
    const float d = fmaf(z[k], inv_temp, -shift);
    const float e = fast_exp(d);
    s += e;
    a = fmaf(e, fmaxf(d, kShiftFloor), a);
    b += z[k];
  }
  st.s += s;
  st.a += a;
  st.b += b;
}

__device__ __forceinline__ Stats shfl_xor_stats(const Stats& v, int off) {
  return Stats{__shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.s, off),
               __shfl_xor_sync(0xffffffffu, v.a, off), __shfl_xor_sync(0xffffffffu, v.b, off)};
}

__device__ __forceinline__ Stats warp_merge(Stats v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v = stats_merge(v, shfl_xor_stats(v, off));
  return v;
}

// Result valid in thread 0 only.
template <int kBlock>
__device__ __forceinline__ Stats block_merge(Stats v) {
  constexpr int kWarps = kBlock / kWarpSize;
  __shared__ float4 partial[kWarps];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  v = warp_merge(v);
  if (lane == 0) partial[warp] = make_float4(v.m, v.s, v.a, v.b);
  __syncthreads();
  if (warp == 0) {
    if (lane < kWarps) {
      const float4 q = partial[lane];
      v = Stats{q.x, q.y, q.z, q.w};
    } else {
      v = stats_identity();
    }
    v = warp_merge(v);
  }
  return v;
}

// ------------------------------------------------------------------------------------------------- forward
struct FwdArgs {
  const void* logits;
  int64_t sb, st, n_t;
  int v;
  const void* labels;
  bool labels64;
  float inv_temp;
  int64_t ignore_index;
  float* logprobs;
  float* entropy;         // nullable
  float* self_certainty;  // nullable
  float* lse;
  float4* partials;       // [rows, splits] when splits > 1
  int splits;
  float log_v;
};

__host__ __device__ __forceinline__ void fwd_finalize(const FwdArgs& a, int64_t row, const Stats& st, int64_t y, float zy) {
  float lp, h, sc, lse;
  if (y == a.ignore_index) {
    lp = h = sc = lse = 0.f;
  } else if (y < 0 || y >= a.v) {
    lp = h = sc = lse = NAN;  // bad label: flagged rather than read
  } else {
    const float log_s = logf(st.s);
    lse = st.m + log_s;
    lp = fmaf(zy, a.inv_temp, -lse);
    h = log_s - st.a / st.s;
    sc = lse - (st.b * a.inv_temp) / static_cast<float>(a.v) - a.log_v;
  }
  a.logprobs[row] = lp;
  if (a.entropy != nullptr) a.entropy[row] = h;
  if (a.self_certainty != nullptr) a.self_certainty[row] = sc;
  a.lse[row] = lse;
}

// grid (rows, splits), kFwdBlock threads; CTA (r, k) folds the k-th slice of row r's 16-byte vectors.
template <typename T>
__global__ void __launch_bounds__(kFwdBlock, 4) token_stats_fwd_kernel(const FwdArgs a) {
  constexpr int kN = Pack<T>::kN;
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const int tid = threadIdx.x;
  const int v = a.v;
  const T* x = row_ptr<T>(a.logits, row, a.n_t, a.sb, a.st);

  // Unsplit rows finalize here; fetching the label and its logit first lets that latency overlap the stream.
  int64_t y = 0;
  float zy = 0.f;
  if (a.splits == 1 && tid == 0) {
    y = load_index(a.labels, a.labels64, row);
    if (y >= 0 && y < v) zy = to_float(x[y]);
  }

  // Scalar head up to the first 16-byte boundary, aligned vector body, scalar tail.
  const int head = align16_head(x, v);
  const int nvec = (v - head) / kN;
  const int tail_beg = head + nvec * kN;
  const int per_split = (nvec + a.splits - 1) / a.splits;
  const int vbeg = min(split * per_split, nvec);
  const int vend = min(vbeg + per_split, nvec);

  Stats st = stats_identity();
  if (split == 0 && tid < head) {
    const float z = to_float(x[tid]);
    stats_accumulate<1>(st, &z, a.inv_temp);
  }
  if (split == a.splits - 1 && tid < v - tail_beg) {
    const float z = to_float(x[tail_beg + tid]);
    stats_accumulate<1>(st, &z, a.inv_temp);
  }

  const char* body = reinterpret_cast<const char*>(x + head);
  int i = vbeg + tid;
  for (; i + (kUnroll - 1) * kFwdBlock < vend; i += kUnroll * kFwdBlock) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = ld_readonly16(body + static_cast<int64_t>(i + u * kFwdBlock) * 16);
    float z[kUnroll * kN];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) Pack<T>::unpack(raw[u], z + u * kN);
    stats_accumulate<kUnroll * kN>(st, z, a.inv_temp);
  }
  for (; i < vend; i += kFwdBlock) {
    const uint4 raw = ld_readonly16(body + static_cast<int64_t>(i) * 16);
    float z[kN];
    Pack<T>::unpack(raw, z);
    stats_accumulate<kN>(st, z, a.inv_temp);
  }

  st = block_merge<kFwdBlock>(st);
  if (tid == 0) {
    if (a.splits == 1) {
      fwd_finalize(a, row, st, y, zy);
    } else {
      a.partials[row * a.splits + split] = make_float4(st.m, st.s, st.a, st.b);
    }
  }
}

// Split rows only: one warp per row merges the row's partials (one per lane) and writes the outputs.
template <typename T>
__global__ void __launch_bounds__(kMergeBlock) token_stats_merge_kernel(const FwdArgs a, int64_t rows) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kMergeBlock / kWarpSize) + threadIdx.x / kWarpSize;
  if (row >= rows) return;  // warp-uniform, so the full-mask shuffles below stay legal
  int64_t y = 0;
  float zy = 0.f;
  if (lane == 0) {
    y = load_index(a.labels, a.labels64, row);
    if (y >= 0 && y < a.v) zy = to_float(row_ptr<T>(a.logits, row, a.n_t, a.sb, a.st)[y]);
  }
  Stats st = stats_identity();
  if (lane < a.splits) {
    const float4 q = a.partials[row * a.splits + lane];
    st = Stats{q.x, q.y, q.z, q.w};
  }
  st = warp_merge(st);
  if (lane == 0) fwd_finalize(a, row, st, y, zy);
}

// ------------------------------------------------------------------------------------------------ backward
struct BwdArgs {
  void* grad;
  int64_t gsb, gst;
  const void* logits;
  int64_t sb, st, n_t;
  int v;
  const void* labels;
  bool labels64;
  float inv_temp;
  int64_t ignore_index;
  const float* g_lp;  // nullable
  const float* g_h;   // nullable
  const float* g_sc;  // nullable
  const float* lse;
  const float* ent;   // non-null when g_h is
  int chunk_vecs;     // 16-byte vectors per CTA; a CTA's scalar fallback covers chunk_vecs * kN elements
};

// grad_j = p_j * (c0 + c1 * d_j) + c2 (+ lab at j == y), d_j = z_j / tau - lse, p_j = exp(d_j): docs/token_stats.md's
// formula with the row constants folded (c0 = -(g_lp - g_sc + g_h H) / tau, c1 = -g_h / tau,
// c2 = -g_sc / (tau V), lab = g_lp / tau).
struct BwdRow {
  float lse, c0, c1, c2, lab, inv_temp;
  __host__ __device__ __forceinline__ float grad(float z) const {
    const float d = fmaf(z, inv_temp, -lse);
    const float p = fast_exp(d);
    return fmaf(p, fmaf(c1, fmaxf(d, kShiftFloor), c0), c2);
  }
};

// grid (rows, chunks), kBwdBlock threads. logits and grad may be the same memory (in-place), hence no
// __restrict__ on them: every element is loaded and stored by one thread, the load first.
template <typename T>
__global__ void __launch_bounds__(kBwdBlock, 4) token_stats_bwd_kernel(const BwdArgs a) {
  constexpr int kN = Pack<T>::kN;
  const int64_t row = blockIdx.x;
  const int chunk = blockIdx.y;
  const int last_chunk = gridDim.y - 1;
  const int tid = threadIdx.x;
  const int v = a.v;
  const T* x = row_ptr<T>(a.logits, row, a.n_t, a.sb, a.st);
  T* g = row_ptr_mut<T>(a.grad, row, a.n_t, a.gsb, a.gst);
  const int64_t y = load_index(a.labels, a.labels64, row);
  // Row scalars are fetched before the label is known so both round trips overlap (every address is valid).
  const float lse_row = a.lse[row];
  const float glp = a.g_lp != nullptr ? a.g_lp[row] : 0.f;
  const float gh = a.g_h != nullptr ? a.g_h[row] : 0.f;
  const float gsc = a.g_sc != nullptr ? a.g_sc[row] : 0.f;
  const float h = a.g_h != nullptr ? a.ent[row] : 0.f;  // entropy is only needed (and only given) with g_h

  if (y == a.ignore_index) {  // zero row: nothing to read
    const int head = align16_head(g, v);
    const int nvec = (v - head) / kN;
    const int tail_beg = head + nvec * kN;
    if (chunk == 0 && tid < head) g[tid] = from_float<T>(0.f);
    if (chunk == last_chunk && tid < v - tail_beg) g[tail_beg + tid] = from_float<T>(0.f);
    const int vbeg = min(chunk * a.chunk_vecs, nvec);
    const int vend = min(vbeg + a.chunk_vecs, nvec);
    char* body = reinterpret_cast<char*>(g + head);
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    for (int i = vbeg + tid; i < vend; i += kBwdBlock) st_stream16(body + static_cast<int64_t>(i) * 16, zero);
    return;
  }

  BwdRow r;
  r.inv_temp = a.inv_temp;
  int y32 = -1;  // column that gets the one-hot term; -1 matches none
  if (y < 0 || y >= v) {
    // out-of-range label: NaN row (c2 = NaN poisons every element, even those with p = 0)
    r.lse = r.c0 = r.c1 = r.lab = 0.f;
    r.c2 = NAN;
  } else {
    y32 = static_cast<int>(y);
    const float it = a.inv_temp;
    r.lse = lse_row;
    r.c0 = -it * (glp - gsc + gh * h);
    r.c1 = -it * gh;
    r.c2 = -it * gsc / static_cast<float>(v);
    r.lab = it * glp;
  }

  // Vector path needs x and g to share their offset within 16 bytes (always true in place).
  const bool same_phase = ((reinterpret_cast<uintptr_t>(x) ^ reinterpret_cast<uintptr_t>(g)) & 15u) == 0;
  if (!same_phase) {
    const int64_t chunk_elems = static_cast<int64_t>(a.chunk_vecs) * kN;
    const int64_t beg64 = chunk * chunk_elems;  // in int64: the last chunk may reach past 2^31 for huge V
    if (beg64 >= v) return;
    const int beg = static_cast<int>(beg64);
    const int end = static_cast<int>(min(beg64 + chunk_elems, static_cast<int64_t>(v)));
#pragma unroll 4
    for (int j = beg + tid; j < end; j += kBwdBlock) {
      float gr = r.grad(to_float(x[j]));
      if (j == y32) gr += r.lab;
      g[j] = from_float<T>(gr);
    }
    return;
  }

  const int head = align16_head(x, v);
  const int nvec = (v - head) / kN;
  const int tail_beg = head + nvec * kN;
  if (chunk == 0 && tid < head) {
    float gr = r.grad(to_float(x[tid]));
    if (tid == y32) gr += r.lab;
    g[tid] = from_float<T>(gr);
  }
  if (chunk == last_chunk && tid < v - tail_beg) {
    const int j = tail_beg + tid;
    float gr = r.grad(to_float(x[j]));
    if (j == y32) gr += r.lab;
    g[j] = from_float<T>(gr);
  }

  const int vbeg = min(chunk * a.chunk_vecs, nvec);
  const int vend = min(vbeg + a.chunk_vecs, nvec);
  const char* xb = reinterpret_cast<const char*>(x + head);
  char* gb = reinterpret_cast<char*>(g + head);

  // One vector: gradient in fp32, one-hot added before the single rounding to T.
  auto emit = [&](const uint4& raw, int vi) {
    float f[kN];
    Pack<T>::unpack(raw, f);
#pragma unroll
    for (int k = 0; k < kN; ++k) f[k] = r.grad(f[k]);
    // Branch-free select: a data-dependent branch here kept all kN values live and cost register spills.
    const int rel = y32 - (head + vi * kN);
#pragma unroll
    for (int k = 0; k < kN; ++k) f[k] += k == rel ? r.lab : 0.f;
    st_stream16(gb + static_cast<int64_t>(vi) * 16, Pack<T>::pack(f));
  };

  int i = vbeg + tid;
  for (; i + (kUnroll - 1) * kBwdBlock < vend; i += kUnroll * kBwdBlock) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = ld_stream16(xb + static_cast<int64_t>(i + u * kBwdBlock) * 16);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) emit(raw[u], i + u * kBwdBlock);
  }
  for (; i < vend; i += kBwdBlock) emit(ld_stream16(xb + static_cast<int64_t>(i) * 16), i);
}

// ---------------------------------------------------------------------------------------------------- host
int elem_bytes(int32_t dtype) {
  switch (dtype) {
    case HOTLOOP_DTYPE_FLOAT32: return 4;
    case HOTLOOP_DTYPE_BFLOAT16: return 2;
    case HOTLOOP_DTYPE_FLOAT16: return 2;
    default: return 0;
  }
}

int sm_count(int32_t given) {
  if (given > 0) return given;
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 1;
  return n > 0 ? n : 1;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Shapes every launch accepts: V fits an int, rows fit grid.x, labels are int32/int64.
bool shape_ok(int64_t b, int64_t t, int64_t v, int32_t labels_dtype, int32_t logits_dtype) {
  if (b < 0 || t < 0 || v <= 0 || v > (int64_t{1} << 30)) return false;  // headroom: int column indices step past V
  if (t > 0 && b > INT_MAX / t) return false;
  if (labels_dtype != HOTLOOP_DTYPE_INT32 && labels_dtype != HOTLOOP_DTYPE_INT64) return false;
  return elem_bytes(logits_dtype) != 0;
}

bool temperature_ok(float tau) { return tau > 0.f && isfinite(tau); }

template <typename T>
cudaError_t launch_fwd(const FwdArgs& a, int64_t rows, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(a.splits));
  token_stats_fwd_kernel<T><<<grid, kFwdBlock, 0, stream>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || a.splits == 1) return err;
  constexpr int kRowsPerCta = kMergeBlock / kWarpSize;
  token_stats_merge_kernel<T><<<static_cast<unsigned>(ceil_div(rows, kRowsPerCta)), kMergeBlock, 0, stream>>>(a, rows);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const BwdArgs& a, int64_t rows, int chunks, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(chunks));
  token_stats_bwd_kernel<T><<<grid, kBwdBlock, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace
}  // namespace hotloop

using namespace hotloop;

extern "C" int32_t hotloop_token_stats_fwd_splits(const hotloop_token_stats_fwd_params* p) {
  if (p == nullptr || p->B <= 0 || p->T <= 0 || p->V <= 0) return 1;
  if (p->force_splits > 0) return p->force_splits < kMaxSplits ? p->force_splits : kMaxSplits;
  const int64_t rows = p->B * p->T;
  const int64_t sms = sm_count(p->num_sms);
  // Enough rows already give every SM two or more CTAs; splitting would only add the merge pass.
  if (rows >= 2 * sms) return 1;
  int64_t s = ceil_div(4 * sms, rows);  // aim at ~4 resident CTAs per SM
  const int64_t by_size = p->V / kMinSplitElems;
  if (s > by_size) s = by_size;
  if (s > kMaxSplits) s = kMaxSplits;
  return s > 1 ? static_cast<int32_t>(s) : 1;
}

extern "C" int64_t hotloop_token_stats_fwd_workspace_bytes(const hotloop_token_stats_fwd_params* p) {
  const int32_t splits = hotloop_token_stats_fwd_splits(p);
  if (splits <= 1) return 0;
  return p->B * p->T * splits * static_cast<int64_t>(sizeof(float4));
}

extern "C" cudaError_t hotloop_token_stats_fwd(const hotloop_token_stats_fwd_params* p, cudaStream_t stream) {
  if (p == nullptr || !shape_ok(p->B, p->T, p->V, p->labels_dtype, p->logits_dtype)) return cudaErrorInvalidValue;
  const int64_t rows = p->B * p->T;
  if (rows == 0) return cudaSuccess;
  if (p->logits == nullptr || p->labels == nullptr || p->logprobs == nullptr || p->lse == nullptr)
    return cudaErrorInvalidValue;
  if (!temperature_ok(p->temperature)) return cudaErrorInvalidValue;

  int splits = hotloop_token_stats_fwd_splits(p);
  if (splits > 1) {
    const int64_t need = rows * splits * static_cast<int64_t>(sizeof(float4));
    const bool ws_ok = p->workspace != nullptr && p->workspace_bytes >= need &&
                       (reinterpret_cast<uintptr_t>(p->workspace) & 15u) == 0;
    if (!ws_ok) splits = 1;
  }

  FwdArgs a;
  a.logits = p->logits;
  a.sb = p->logits_stride_b;
  a.st = p->logits_stride_t;
  a.n_t = p->T;
  a.v = static_cast<int>(p->V);
  a.labels = p->labels;
  a.labels64 = p->labels_dtype == HOTLOOP_DTYPE_INT64;
  a.inv_temp = static_cast<float>(1.0 / static_cast<double>(p->temperature));
  a.ignore_index = p->ignore_index;
  a.logprobs = p->logprobs;
  a.entropy = p->entropy;
  a.self_certainty = p->self_certainty;
  a.lse = p->lse;
  a.partials = splits > 1 ? static_cast<float4*>(p->workspace) : nullptr;
  a.splits = splits;
  a.log_v = static_cast<float>(log(static_cast<double>(p->V)));

  switch (p->logits_dtype) {
    case HOTLOOP_DTYPE_FLOAT32: return launch_fwd<float>(a, rows, stream);
    case HOTLOOP_DTYPE_BFLOAT16: return launch_fwd<__nv_bfloat16>(a, rows, stream);
    case HOTLOOP_DTYPE_FLOAT16: return launch_fwd<__half>(a, rows, stream);
    default: return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t hotloop_token_stats_bwd(const hotloop_token_stats_bwd_params* p, cudaStream_t stream) {
  if (p == nullptr || !shape_ok(p->B, p->T, p->V, p->labels_dtype, p->logits_dtype)) return cudaErrorInvalidValue;
  const int64_t rows = p->B * p->T;
  if (rows == 0) return cudaSuccess;
  if (p->grad_logits == nullptr || p->logits == nullptr || p->labels == nullptr || p->lse == nullptr)
    return cudaErrorInvalidValue;
  if (p->grad_entropy != nullptr && p->entropy == nullptr) return cudaErrorInvalidValue;
  if (!temperature_ok(p->temperature)) return cudaErrorInvalidValue;

  const int64_t vec_n = 16 / elem_bytes(p->logits_dtype);
  const int64_t nv = ceil_div(p->V, vec_n);
  int64_t chunk_vecs = kBwdChunkVecs;
  // Few rows: cut rows finer so ~4 CTAs per SM still exist, but keep >= one vector per thread per CTA.
  const int64_t want = ceil_div(4 * static_cast<int64_t>(sm_count(p->num_sms)), rows);
  if (want > 1) {
    int64_t cv = ceil_div(nv, want);
    if (cv < kBwdBlock) cv = kBwdBlock;
    if (cv < chunk_vecs) chunk_vecs = cv;
  }
  int64_t chunks = ceil_div(p->V, chunk_vecs * vec_n);
  while (chunks > kMaxGridY) {
    chunk_vecs *= 2;
    chunks = ceil_div(p->V, chunk_vecs * vec_n);
  }
  // Even out the chunks (the last one is otherwise a sliver).
  chunk_vecs = ceil_div(nv, chunks);
  chunks = ceil_div(p->V, chunk_vecs * vec_n);

  BwdArgs a;
  a.grad = p->grad_logits;
  a.gsb = p->grad_stride_b;
  a.gst = p->grad_stride_t;
  a.logits = p->logits;
  a.sb = p->logits_stride_b;
  a.st = p->logits_stride_t;
  a.n_t = p->T;
  a.v = static_cast<int>(p->V);
  a.labels = p->labels;
  a.labels64 = p->labels_dtype == HOTLOOP_DTYPE_INT64;
  a.inv_temp = static_cast<float>(1.0 / static_cast<double>(p->temperature));
  a.ignore_index = p->ignore_index;
  a.g_lp = p->grad_logprobs;
  a.g_h = p->grad_entropy;
  a.g_sc = p->grad_self_certainty;
  a.lse = p->lse;
  a.ent = p->entropy;
  a.chunk_vecs = static_cast<int>(chunk_vecs);

  const int nchunks = static_cast<int>(chunks);
  switch (p->logits_dtype) {
    case HOTLOOP_DTYPE_FLOAT32: return launch_bwd<float>(a, rows, nchunks, stream);
    case HOTLOOP_DTYPE_BFLOAT16: return launch_bwd<__nv_bfloat16>(a, rows, nchunks, stream);
    case HOTLOOP_DTYPE_FLOAT16: return launch_bwd<__half>(a, rows, nchunks, stream);
    default: return cudaErrorInvalidValue;
  }
}
