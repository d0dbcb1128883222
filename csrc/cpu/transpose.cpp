// Tiled transpose(-add), see transpose.h. Each thread takes whole tile rows of dst; inside a kTile x kTile tile the
// source rows are read contiguously and the destination rows written contiguously from an L1 staging array.
#include "transpose.h"

#include <algorithm>

#include "simd_math.h"

namespace hotloop::cpu {
namespace {

constexpr int64_t kTile = 64;  // 64 x 64 floats = 16 KiB staged: fits L1 next to the rows being read

template <class D, class S>
void run(const TransposeAddParams& p) {
  using Acc = typename acc_type<D>::type;
  D* dst = static_cast<D*>(p.dst);
  const S* src = static_cast<const S*>(p.src);
  const int64_t row_tiles = (p.rows + kTile - 1) / kTile;
#pragma omp parallel for num_threads(p.num_threads) if (p.num_threads > 1 && row_tiles > 1) schedule(static)
  for (int64_t rt = 0; rt < row_tiles; ++rt) {
    const int64_t r0 = rt * kTile, r1 = std::min(p.rows, r0 + kTile);
    Acc stage[kTile][kTile];  // stage[r - r0][c - c0]
    for (int64_t c0 = 0; c0 < p.cols; c0 += kTile) {
      const int64_t c1 = std::min(p.cols, c0 + kTile);
      for (int64_t c = c0; c < c1; ++c) {  // src row c holds dst column c: contiguous over r
        const S* s = src + c * p.ld_src;
        for (int64_t r = r0; r < r1; ++r) stage[r - r0][c - c0] = static_cast<Acc>(to_float(s[r]));
      }
      for (int64_t r = r0; r < r1; ++r) {
        D* d = dst + r * p.ld_dst;
        const Acc* st = stage[r - r0];
        if (p.accumulate) {
          for (int64_t c = c0; c < c1; ++c) store(d + c, static_cast<Acc>(to_float(d[c])) + st[c - c0]);
        } else {
          for (int64_t c = c0; c < c1; ++c) store(d + c, st[c - c0]);
        }
      }
    }
  }
}

}  // namespace

bool transpose_add(const TransposeAddParams& p) {
  if (p.rows <= 0 || p.cols <= 0) return true;
  using F = FloatType;
  if (p.dst_type == p.src_type) {
    switch (p.dst_type) {
      case F::f32: run<float, float>(p); return true;
      case F::f64: run<double, double>(p); return true;
      case F::bf16: run<bf16, bf16>(p); return true;
      case F::f16: run<f16, f16>(p); return true;
    }
  }
  if (p.dst_type == F::f32 && p.src_type == F::bf16) return run<float, bf16>(p), true;
  if (p.dst_type == F::f32 && p.src_type == F::f16) return run<float, f16>(p), true;
  return false;
}

}  // namespace hotloop::cpu
