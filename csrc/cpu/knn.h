// k-nearest-neighbour selection (docs/knn.md), CPU kernels. Plain C++ (no torch headers) so CMake builds and
// ctest-checks them without torch.
//
// The distance work is a matrix product: the caller (csrc/bindings/knn.cpp) computes tiles of dot products
// q_i . x_j with BLAS, a cache-sized block of queries x keys at a time, and hands each tile to
// `knn_select_tile`, which turns dots into per-key values and keeps each query's k best in a bounded heap.
// Every metric is reduced to "smallest value wins" with two per-key terms:
//     v_ij = bias_j + scale_j * (q_i . x_j)
//   l2:      bias_j = ||x_j||^2, scale_j = -2            (||q_i||^2 is added back in knn_finalize)
//   ip:      bias_j = 0,         scale_j = -1
//   cosine:  bias_j = 0,         scale_j = -1 / max(||x_j||, eps)  (1 / max(||q_i||, eps) applied in knn_finalize)
// and bias_j = +inf for keys that must never be returned (unused memory slots).
#pragma once
#include <cstdint>

namespace hotloop::cpu {

enum class KnnMetric : int { l2 = 0, ip = 1, cosine = 2 };

// Per-query candidate heaps, stored in place in the op's outputs: row r holds k (value, index) pairs at
// vals + r * k and idx + r * k, as a max-heap on (value, index), so the worst kept candidate is at slot 0.
// Fresh heaps hold (+inf, -1) sentinels: a row that never gets k candidates keeps them (the padding).
void knn_heaps_init(float* vals, int64_t* idx, int64_t rows, int64_t k, int num_threads);

struct KnnTileParams {
  const float* dots = nullptr;   // [rows, cols] q_i . x_j, row i at dots + i * dots_stride
  int64_t dots_stride = 0;
  int64_t rows = 0, cols = 0;
  int64_t col0 = 0;              // index of the tile's first key (what the heaps record)
  const float* bias = nullptr;   // [cols] per-key bias_j (see above), +inf for excluded keys; null: all 0
  const float* scale = nullptr;  // [cols] per-key scale_j; null: all equal to scale_value
  float scale_value = -1.0f;
  float* heap_vals = nullptr;    // heaps of the tile's rows: row i at heap_vals + i * k
  int64_t* heap_idx = nullptr;
  int64_t k = 0;
};

// Offer every (row, column) of the tile to its row's heap. Single-threaded (the caller splits rows across
// threads). Columns must come in increasing key order across calls for a row, which makes "lower index wins
// ties" a plain `v < worst` test. Most candidates are rejected by one compare in a vectorised pre-pass.
void knn_select_tile(const KnnTileParams& p);

// Sort each heap into best-first order and turn values into the op's scores, in place:
//   l2: max(query_term_i + v, 0) with query_term_i = ||q_i||^2;  ip: -v;  cosine: -v * query_term_i with
//   query_term_i = 1 / max(||q_i||, eps).  Sentinel slots get index -1 and score +inf (l2) or -inf (ip, cosine).
// query_term may be null for ip.
void knn_finalize(float* vals, int64_t* idx, int64_t rows, int64_t k, KnnMetric metric, const float* query_term,
                  int num_threads);

// Name of the instruction set knn_select_tile runs with (for benchmark records).
const char* knn_isa();

}  // namespace hotloop::cpu
