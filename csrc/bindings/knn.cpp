// CPU implementation of hotloop::knn_cpu: blocked BLAS dot products + the C++ heap selection (csrc/cpu/knn.h).
//
// Loop order: query blocks outside (one per thread at a time), key blocks inside. A thread multiplies its query
// block by a key block into its own tile buffer (one single-threaded sgemm, sized to stay in L2) and at once
// feeds the tile to the selection kernel, so the [Q, M] score matrix never exists: the extra memory is one tile
// (and, for bf16 / fp16, one upcast key block) per thread plus two floats per key. The per-query heaps live in
// the outputs themselves. The keys (51 MB at 100k x 128) are re-read once per query block, from L3 or memory.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <string>
#include <tuple>

#include "../cpu/knn.h"
#include "module.h"

namespace hotloop::bind {
namespace {

constexpr const char* kOp = "hotloop.knn";
constexpr double kCosEps = 1e-8;  // python/hotloop/reference/knn.py: EPS
constexpr int64_t kQueryBlock = 256;  // tile = 256 x 1024 fp32 = 1 MiB: sgemm output and selection input in L2
constexpr int64_t kKeyBlock = 1024;

cpu::KnnMetric parse_metric(const std::string& metric) {
  if (metric == "l2") return cpu::KnnMetric::l2;
  if (metric == "ip") return cpu::KnnMetric::ip;
  if (metric == "cosine") return cpu::KnnMetric::cosine;
  TORCH_CHECK_VALUE(false, kOp, ": `metric` must be one of l2, ip, cosine; got '", metric, "'");
}

// Squared norms of the rows of x [n, d] in float32, a few thousand rows at a time (no [n, d] temporary). A plain
// sum of squares: exact for small integers, so equal distances stay equal (ties).
at::Tensor row_sq_norms(const at::Tensor& x) {
  constexpr int64_t kRows = 4096;
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  for (int64_t r0 = 0; r0 < x.size(0); r0 += kRows) {
    const int64_t n = std::min(kRows, x.size(0) - r0);
    out.narrow(0, r0, n).copy_(x.narrow(0, r0, n).to(at::kFloat).square().sum(1));
  }
  return out;
}

// Per-key terms (csrc/cpu/knn.h): bias (undefined = all 0), scale (undefined = all equal to scale_value).
struct KeyTerms {
  at::Tensor bias, scale;
  float scale_value = -1.0f;
};

KeyTerms key_terms(const at::Tensor& keys, cpu::KnnMetric metric, const c10::optional<at::Tensor>& valid) {
  KeyTerms t;
  if (metric == cpu::KnnMetric::l2) {
    t.bias = row_sq_norms(keys);
    t.scale_value = -2.0f;
  } else if (metric == cpu::KnnMetric::cosine) {
    t.scale = row_sq_norms(keys).sqrt_().clamp_min_(kCosEps).reciprocal_().neg_();
  }
  if (valid.has_value()) {
    if (!t.bias.defined()) t.bias = at::zeros({keys.size(0)}, keys.options().dtype(at::kFloat));
    t.bias.masked_fill_(valid->logical_not(), std::numeric_limits<float>::infinity());
  }
  return t;
}

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& queries, const at::Tensor& keys, int64_t k,
                                           c10::string_view metric_name, const c10::optional<at::Tensor>& valid,
                                           int64_t query_block, int64_t key_block) {
  TORCH_CHECK_VALUE(queries.device().is_cpu() && keys.device().is_cpu(), kOp, ": CPU kernel got ",
                    queries.device(), " queries and ", keys.device(), " keys");
  TORCH_CHECK_VALUE(queries.dim() == 2 && keys.dim() == 2 && queries.size(1) == keys.size(1), kOp,
                    ": `queries` must be [Q, d] and `keys` [M, d], got ", queries.sizes(), " and ", keys.sizes());
  TORCH_CHECK_TYPE(queries.scalar_type() == keys.scalar_type(), kOp, ": `queries` (", queries.scalar_type(),
                   ") and `keys` (", keys.scalar_type(), ") must have the same dtype");
  const auto st = keys.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, kOp,
                   ": `keys` must be float32, bfloat16 or float16, got ", st);
  const int64_t Q = queries.size(0), M = keys.size(0);
  TORCH_CHECK_VALUE(k >= 1 && k <= M, kOp, ": `k` must lie in [1, M] = [1, ", M, "], got ", k);
  if (valid.has_value()) {
    TORCH_CHECK_VALUE(valid->scalar_type() == at::kBool && valid->dim() == 1 && valid->size(0) == M &&
                          valid->device().is_cpu(), kOp, ": `valid` must be a CPU bool [M] = [", M, "] tensor");
  }
  const cpu::KnnMetric metric = parse_metric(std::string(metric_name));
  const int64_t qb_size = query_block > 0 ? query_block : kQueryBlock;
  const int64_t kb_size = key_block > 0 ? key_block : kKeyBlock;
  const int nt = at::get_num_threads();

  at::Tensor scores = at::empty({Q, k}, queries.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({Q, k}, queries.options().dtype(at::kLong));
  if (Q == 0) return {scores, indices};
  float* vals = scores.data_ptr<float>();
  int64_t* idx = indices.data_ptr<int64_t>();
  cpu::knn_heaps_init(vals, idx, Q, k, nt);

  const at::Tensor q = queries.to(at::kFloat).contiguous();  // [Q, d] fp32 (a copy only for bf16 / fp16)
  at::Tensor query_term;
  if (metric == cpu::KnnMetric::l2) query_term = row_sq_norms(q);
  if (metric == cpu::KnnMetric::cosine) query_term = row_sq_norms(q).sqrt_().clamp_min_(kCosEps).reciprocal_();
  const at::Tensor kc = keys.contiguous();
  const bool upcast = st != at::kFloat;
  const KeyTerms terms = key_terms(kc, metric, valid);  // for all keys at once: at most 2 * M floats
  const float* bias = terms.bias.defined() ? terms.bias.data_ptr<float>() : nullptr;
  const float* scale = terms.scale.defined() ? terms.scale.data_ptr<float>() : nullptr;

  // Every thread owns whole query blocks (so its heaps are private) and walks all key blocks for each; blocks
  // are handed out through a shared counter, so a thread slowed down by other load does not hold the rest back.
  // One parallel region in all: on a busy machine each fork / join can cost a scheduler quantum.
  const int64_t qb = std::max<int64_t>(1, std::min(qb_size, (Q + nt - 1) / nt));
  const int64_t n_qblocks = (Q + qb - 1) / qb;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(nt, n_qblocks), 1, [&](int64_t, int64_t) {
    const at::Tensor tile = at::empty({qb, kb_size}, q.options());
    const at::Tensor kbuf = upcast ? at::empty({kb_size, kc.size(1)}, q.options()) : at::Tensor();
    for (int64_t b = next++; b < n_qblocks; b = next++) {
      const int64_t i0 = b * qb, nq = std::min(qb, Q - i0);
      const at::Tensor qblock = q.narrow(0, i0, nq);
      for (int64_t j0 = 0; j0 < M; j0 += kb_size) {
        const int64_t nk = std::min(kb_size, M - j0);
        at::Tensor kb = kc.narrow(0, j0, nk);
        if (upcast) kb = kbuf.narrow(0, 0, nk).copy_(kb);  // bf16 / fp16 -> fp32, one key block at a time
        at::Tensor t = tile.narrow(0, 0, nq).narrow(1, 0, nk);
        at::mm_out(t, qblock, kb.t());  // single-threaded inside the parallel region
        cpu::KnnTileParams p;
        p.dots = t.data_ptr<float>();
        p.dots_stride = t.stride(0);
        p.rows = nq, p.cols = nk, p.col0 = j0;
        p.bias = bias != nullptr ? bias + j0 : nullptr;
        p.scale = scale != nullptr ? scale + j0 : nullptr;
        p.scale_value = terms.scale_value;
        p.heap_vals = vals + i0 * k;
        p.heap_idx = idx + i0 * k;
        p.k = k;
        cpu::knn_select_tile(p);
      }
    }
  });
  cpu::knn_finalize(vals, idx, Q, k, metric, query_term.defined() ? query_term.data_ptr<float>() : nullptr, nt);
  return {scores, indices};
}

}  // namespace

const Kernels kernels("cpu", [](pybind11::module_& m) {
  namespace py = pybind11;
  m.def("knn", &knn_cpu, NoGil(), py::arg("queries"), py::arg("keys"), py::arg("k"), py::arg("metric"),
        py::arg("valid"), py::arg("query_block") = 0, py::arg("key_block") = 0,
        "knn(queries, keys, k, metric, valid, query_block=0, key_block=0) -> (scores [Q, k] float32: squared L2 "
        "ascending, or inner product / cosine descending; indices [Q, k] int64, -1 padding when fewer than k "
        "keys are valid). queries [Q, d], keys [M, d], one dtype (f32 | bf16 | f16), 1 <= k <= M, metric "
        "hotloop.contracts.KNN_METRICS, valid [M] bool or None. query_block / key_block: tile sizes (0 = "
        "automatic), for tests that need many tiles at small shapes (docs/knn.md).");
});

}  // namespace hotloop::bind
