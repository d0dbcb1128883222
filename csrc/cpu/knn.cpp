// k-nearest-neighbour selection (docs/knn.md), CPU: heap setup, the per-ISA tile selection, and the final sort.
#include "knn.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "isa.h"

namespace hotloop::cpu {

HOTLOOP_ISA_DECLARE(void knn_select_tile(const KnnTileParams& p))

namespace {
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kParallelMinElems = 1 << 14;  // below this many heap slots threads cost more than they save
}  // namespace

void knn_heaps_init(float* vals, int64_t* idx, int64_t rows, int64_t k, int num_threads) {
  const int64_t n = rows * k;
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1 && n >= kParallelMinElems)
  for (int64_t i = 0; i < n; ++i) vals[i] = kInf, idx[i] = -1;
}

void knn_select_tile(const KnnTileParams& p) { HOTLOOP_ISA_PICK(knn_select_tile)(p); }

const char* knn_isa() { return isa_name(runtime_isa()); }

void knn_finalize(float* vals, int64_t* idx, int64_t rows, int64_t k, KnnMetric metric, const float* query_term,
                  int num_threads) {
  const float pad = metric == KnnMetric::l2 ? kInf : -kInf;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && rows * k >= kParallelMinElems)
  {
    std::vector<std::pair<float, int64_t>> row(static_cast<size_t>(k));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      float* v = vals + r * k;
      int64_t* ix = idx + r * k;
      for (int64_t j = 0; j < k; ++j) row[j] = {v[j], ix[j]};
      // pairs compare by value, then index: best first, lower index first among equal values; the (+inf, -1)
      // sentinels all sort last (every kept value is finite)
      std::sort(row.begin(), row.end());
      const float t = query_term != nullptr ? query_term[r] : 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        const auto [val, key] = row[j];
        ix[j] = key;
        if (key < 0) {
          v[j] = pad;
        } else if (metric == KnnMetric::l2) {
          v[j] = std::max(t + val, 0.0f);  // ||q||^2 + ||x||^2 - 2 q.x can round below 0 for near-duplicates
        } else if (metric == KnnMetric::ip) {
          v[j] = -val;
        } else {
          v[j] = -val * t;
        }
      }
    }
  }
}

}  // namespace hotloop::cpu
