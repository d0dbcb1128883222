// Body of knn_select_tile. Included once per ISA by knn_{avx512,avx2,base}.cpp (see isa.h).
//
// Per row of the tile: the row's heap top (its worst kept value) is the threshold. A chunk of kChunk columns
// is turned into values v = bias + scale * dot in a small buffer while a vectorised OR records whether any
// beat the threshold; only such (rare, once the heap has filled) chunks are walked again to insert. The buffer
// also guarantees that the pre-pass and the insertion compare the very same rounded values.
#include <algorithm>
#include <cstdint>

#include "isa.h"
#include "knn.h"
#include "simd_math.h"

#if HOTLOOP_ISA_COMPILED
HOTLOOP_ISA_BEGIN

namespace hotloop::cpu::HOTLOOP_ISA {
namespace {

constexpr int64_t kChunk = 128;  // columns per pre-pass: 512 B of values, stays in L1

// Replace the worst pair (slot 0) of a max-heap on (value, index) by (v, j) and restore the heap.
HOTLOOP_INLINE void heap_replace_top(float* vals, int64_t* idx, int64_t k, float v, int64_t j) {
  int64_t pos = 0;
  for (;;) {
    int64_t child = 2 * pos + 1;
    if (child >= k) break;
    if (child + 1 < k && (vals[child + 1] > vals[child] || (vals[child + 1] == vals[child] && idx[child + 1] > idx[child])))
      ++child;
    if (vals[child] < v || (vals[child] == v && idx[child] < j)) break;
    vals[pos] = vals[child], idx[pos] = idx[child];
    pos = child;
  }
  vals[pos] = v, idx[pos] = j;
}

// kBias / kScales: whether bias / scale are per-key arrays (else bias is 0 and scale the scalar `s`): the
// common l2 and ip cases then stream one or two arrays through the pre-pass instead of three.
template <bool kBias, bool kScales>
void select_row(const float* __restrict dots, const float* __restrict bias, const float* __restrict scale, float s,
                int64_t cols, int64_t col0, float* vals, int64_t* idx, int64_t k) {
  alignas(64) float buf[kChunk];
  float thr = vals[0];
  for (int64_t j0 = 0; j0 < cols; j0 += kChunk) {
    const int64_t n = std::min(kChunk, cols - j0);
    int hit = 0;
    for (int64_t j = 0; j < n; ++j) {
      const float sd = (kScales ? scale[j0 + j] : s) * dots[j0 + j];
      const float v = kBias ? bias[j0 + j] + sd : sd;
      buf[j] = v;
      hit |= v < thr;
    }
    if (!hit) continue;
    for (int64_t j = 0; j < n; ++j) {
      // keys arrive in increasing index order, so an equal value never displaces a kept one (lower index wins)
      if (buf[j] < thr) {
        heap_replace_top(vals, idx, k, buf[j], col0 + j0 + j);
        thr = vals[0];
      }
    }
  }
}

template <bool kBias, bool kScales> void select_rows(const KnnTileParams& p) {
  for (int64_t i = 0; i < p.rows; ++i)
    select_row<kBias, kScales>(p.dots + i * p.dots_stride, p.bias, p.scale, p.scale_value, p.cols, p.col0,
                               p.heap_vals + i * p.k, p.heap_idx + i * p.k, p.k);
}

}  // namespace

void knn_select_tile(const KnnTileParams& p) {
  if (p.bias != nullptr) return p.scale != nullptr ? select_rows<true, true>(p) : select_rows<true, false>(p);
  return p.scale != nullptr ? select_rows<false, true>(p) : select_rows<false, false>(p);
}

}  // namespace hotloop::cpu::HOTLOOP_ISA

HOTLOOP_ISA_END
#endif
