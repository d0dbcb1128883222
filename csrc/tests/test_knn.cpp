// ctest: the knn selection kernels (heaps fed tile by tile, then finalized) against a plain sort of every key's
// value, for each metric, k = 1 .. M, tiles that split rows and columns unevenly, excluded keys (fewer valid
// keys than k: -1 padding) and exact ties between duplicate keys (lower index first).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "cpu/knn.h"

using namespace hotloop::cpu;

namespace {

int failures = 0;
constexpr float kInf = std::numeric_limits<float>::infinity();

struct Problem {
  int64_t Q, M, d;
  std::vector<float> q, x;  // small integers: every dot and norm is exact in float
  std::vector<bool> valid;
};

Problem make(int64_t Q, int64_t M, int64_t d, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> val(-2, 2);
  Problem p{Q, M, d, {}, {}, {}};
  for (int64_t i = 0; i < Q * d; ++i) p.q.push_back(float(val(rng)));
  for (int64_t i = 0; i < M * d; ++i) p.x.push_back(float(val(rng)));
  for (int64_t j = M / 2; j < M; j += 3)  // duplicates of earlier keys: exact ties
    std::copy_n(p.x.begin() + (j - M / 2) * d, d, p.x.begin() + j * d);
  for (int64_t j = 0; j < M; ++j) p.valid.push_back(j % 7 != 3);
  return p;
}

float dot(const Problem& p, int64_t i, int64_t j) {
  float s = 0;
  for (int64_t c = 0; c < p.d; ++c) s += p.q[i * p.d + c] * p.x[j * p.d + c];
  return s;
}

void check(const Problem& p, KnnMetric metric, int64_t k, int64_t qb, int64_t kb, bool use_valid) {
  std::vector<float> bias(p.M), scale(p.M), qterm(p.Q);
  for (int64_t j = 0; j < p.M; ++j) {
    float n2 = 0;
    for (int64_t c = 0; c < p.d; ++c) n2 += p.x[j * p.d + c] * p.x[j * p.d + c];
    bias[j] = metric == KnnMetric::l2 ? n2 : 0.0f;
    scale[j] = metric == KnnMetric::l2 ? -2.0f : metric == KnnMetric::ip ? -1.0f : -1.0f / std::max(std::sqrt(n2), 1e-8f);
    if (use_valid && !p.valid[j]) bias[j] = kInf;
  }
  for (int64_t i = 0; i < p.Q; ++i) {
    float n2 = 0;
    for (int64_t c = 0; c < p.d; ++c) n2 += p.q[i * p.d + c] * p.q[i * p.d + c];
    qterm[i] = metric == KnnMetric::l2 ? n2 : 1.0f / std::max(std::sqrt(n2), 1e-8f);
  }
  std::vector<float> vals(p.Q * k);
  std::vector<int64_t> idx(p.Q * k);
  knn_heaps_init(vals.data(), idx.data(), p.Q, k, 2);
  std::vector<float> tile(qb * kb);
  for (int64_t i0 = 0; i0 < p.Q; i0 += qb) {
    for (int64_t j0 = 0; j0 < p.M; j0 += kb) {
      const int64_t nq = std::min(qb, p.Q - i0), nk = std::min(kb, p.M - j0);
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t j = 0; j < nk; ++j) tile[i * kb + j] = dot(p, i0 + i, j0 + j);
      KnnTileParams t;
      t.dots = tile.data(), t.dots_stride = kb, t.rows = nq, t.cols = nk, t.col0 = j0;
      // the kernel's fast paths: no bias array for ip / cosine without excluded keys, a scalar scale for l2 / ip
      t.bias = (metric == KnnMetric::l2 || use_valid) ? bias.data() + j0 : nullptr;
      t.scale = metric == KnnMetric::cosine ? scale.data() + j0 : nullptr;
      t.scale_value = metric == KnnMetric::l2 ? -2.0f : -1.0f;
      t.heap_vals = vals.data() + i0 * k, t.heap_idx = idx.data() + i0 * k, t.k = k;
      knn_select_tile(t);
    }
  }
  knn_finalize(vals.data(), idx.data(), p.Q, k, metric, metric == KnnMetric::ip ? nullptr : qterm.data(), 2);
  for (int64_t i = 0; i < p.Q; ++i) {
    // the same float values, sorted by (value, index): what the kernel must return
    std::vector<std::pair<float, int64_t>> all;
    for (int64_t j = 0; j < p.M; ++j)
      if (!use_valid || p.valid[j]) all.push_back({bias[j] + scale[j] * dot(p, i, j), j});
    std::sort(all.begin(), all.end());
    for (int64_t r = 0; r < k; ++r) {
      const int64_t want = r < int64_t(all.size()) ? all[r].second : -1;
      const int64_t got = idx[i * k + r];
      const float score = vals[i * k + r];
      const bool pad_ok = want >= 0 || score == (metric == KnnMetric::l2 ? kInf : -kInf);
      if (got != want || !pad_ok) {
        if (failures++ < 10)
          std::printf("FAIL metric=%d k=%lld tiles=%lldx%lld valid=%d query %lld rank %lld: index %lld, want %lld\n",
                      int(metric), (long long)k, (long long)qb, (long long)kb, int(use_valid), (long long)i,
                      (long long)r, (long long)got, (long long)want);
        return;
      }
    }
  }
}

}  // namespace

int main() {
  const Problem p = make(13, 301, 5, 7);
  for (KnnMetric metric : {KnnMetric::l2, KnnMetric::ip, KnnMetric::cosine})
    for (int64_t k : {1, 2, 16, 100, 300, 301})
      for (auto [qb, kb] : {std::pair<int64_t, int64_t>{13, 301}, {4, 64}, {5, 1}, {1, 129}})
        for (bool use_valid : {false, true}) check(p, metric, k, qb, kb, use_valid);
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
