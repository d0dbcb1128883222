// Body of the token_stats CPU kernels. Included once per ISA by token_stats_{avx512,avx2,base}.cpp (see isa.h).
//
// Forward, per row: the row streams through an L1-sized block buffer. Each block gets its max and sum of z'
// (one vectorised loop), then exp(z' - block max) and its moment (a second loop over the buffer, still in L1),
// and the block's partial (max, Σe, Σe·d, Σz') is merged into the row's. Memory sees each logit once.
// Rows are split across threads; when there are fewer rows than threads the vocabulary is split too and the
// partials merged, so one long row still uses every core.
//
// Backward, per row: d_j = z'_j - lse, p_j = exp(d_j), one streaming loop writes
// (1/T)·(g_lp·[j = y] - p_j·(g_lp - g_sc + g_h·(d_j + H)) - g_sc/V).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "isa.h"
#include "simd_math.h"
#include "token_stats.h"

#if HOTLOOP_ISA_COMPILED
HOTLOOP_ISA_BEGIN

namespace hotloop::cpu::HOTLOOP_ISA {
namespace {

constexpr int64_t kBlock = 512;         // logits staged in L1 between the two loops of a block (2 KiB as float)
constexpr int64_t kMinSplit = 8192;     // smallest vocabulary chunk worth a thread of its own

template <class Acc> constexpr Acc kLowShift = Acc(-200);   // exp() of it is exactly 0 in float...
template <> constexpr double kLowShift<double> = -800.0;     // ...and in double

template <class Acc> constexpr Acc kInf = std::numeric_limits<Acc>::infinity();
template <class Acc> constexpr Acc kNaN = std::numeric_limits<Acc>::quiet_NaN();

// Partial statistics of a set of z' values, shifted by their max m for accuracy. A NaN in `b` poisons the row.
template <class Acc> struct Partial {
  Acc m = -kInf<Acc>;  // max z'
  Acc s = 0;           // Σ exp(z' - m)
  Acc a = 0;           // Σ exp(z' - m)·(z' - m)
  Acc b = 0;           // Σ z'
};

// Merge q into p (disjoint sets). Sets that saw only -inf (m = -inf, s = 0) add nothing but their sum.
template <class Acc> HOTLOOP_INLINE void combine(Partial<Acc>& p, const Partial<Acc>& q) {
  p.b += q.b;
  if (!(q.m > -kInf<Acc>)) return;
  if (!(p.m > -kInf<Acc>)) {
    p.m = q.m, p.s = q.s, p.a = q.a;
  } else if (q.m > p.m) {
    const Acc delta = p.m - q.m, c = exp_acc(delta);
    p.a = c * (p.a + p.s * delta) + q.a;
    p.s = c * p.s + q.s;
    p.m = q.m;
  } else {
    const Acc delta = q.m - p.m, c = exp_acc(delta);
    p.a += c * (q.a + q.s * delta);
    p.s += c * q.s;
  }
}

template <class In, class Acc = typename acc_type<In>::type>
Partial<Acc> row_partial(const In* __restrict z, int64_t n, Acc inv_t) {
  Partial<Acc> row;
  alignas(64) Acc buf[kBlock];
  for (int64_t base = 0; base < n; base += kBlock) {
    const int64_t len = std::min(kBlock, n - base);
    const In* zb = z + base;
    Acc bmax = -kInf<Acc>, bsum = 0;
#pragma omp simd reduction(max : bmax) reduction(+ : bsum)
    for (int64_t i = 0; i < len; ++i) {
      const Acc v = static_cast<Acc>(to_float(zb[i])) * inv_t;
      buf[i] = v;
      bmax = v > bmax ? v : bmax;
      bsum += v;
    }
    Partial<Acc> blk;
    blk.b = bsum;
    if (bsum != bsum || bmax == kInf<Acc>) {  // NaN or +inf logit: the row's statistics are undefined
      row.b = kNaN<Acc>;
      continue;
    }
    if (bmax > -kInf<Acc>) {  // else the block is all -inf (masked vocabulary) and adds only its sum
      Acc s = 0, a = 0;
#pragma omp simd reduction(+ : s, a)
      for (int64_t i = 0; i < len; ++i) {
        Acc d = buf[i] - bmax;
        d = d < kLowShift<Acc> ? kLowShift<Acc> : d;  // -inf -> finite, so e·d is 0·finite, not 0·inf
        const Acc e = exp_acc(d);
        s += e;
        a += e * d;
      }
      blk.m = bmax, blk.s = s, blk.a = a;
    }
    combine(row, blk);
  }
  return row;
}

template <class In, class Acc> HOTLOOP_INLINE Acc load_acc(const In* p) { return static_cast<Acc>(to_float(*p)); }

HOTLOOP_INLINE int64_t label_at(const void* labels, bool is64, int64_t row) {
  return is64 ? static_cast<const int64_t*>(labels)[row] : static_cast<const int32_t*>(labels)[row];
}

// Writes row r's outputs from its statistics; returns false when its label is out of range.
template <class In, class Acc>
bool finalize(const TokenStatsFwdParams& P, int64_t r, const Partial<Acc>& st, Acc inv_t) {
  const int64_t V = P.layout.V;
  const int64_t y = label_at(P.labels, P.labels_int64, r);
  Acc* lp = static_cast<Acc*>(P.logprobs);
  Acc* ent = static_cast<Acc*>(P.entropy);
  Acc* sc = static_cast<Acc*>(P.self_certainty);
  Acc* lse_out = static_cast<Acc*>(P.lse);
  if (y == P.ignore_index) {
    lp[r] = 0, lse_out[r] = 0;
    if (ent) ent[r] = 0;
    if (sc) sc[r] = 0;
    return true;
  }
  const bool in_range = y >= 0 && y < V;
  const bool poisoned = st.b != st.b || !in_range;
  const Acc log_s = std::log(st.s);
  const Acc lse = poisoned ? kNaN<Acc> : st.m + log_s;
  const In* row = static_cast<const In*>(P.logits) + P.layout.offset(r);
  lp[r] = in_range ? load_acc<In, Acc>(row + y) * inv_t - lse : kNaN<Acc>;
  lse_out[r] = lse;
  if (ent) ent[r] = poisoned ? kNaN<Acc> : log_s - st.a / st.s;
  if (sc) sc[r] = lse - st.b / static_cast<Acc>(V) - std::log(static_cast<Acc>(V));
  return in_range;
}

// Chunks per row so that few long rows still occupy every thread.
int64_t vocab_splits(int64_t rows, int64_t V, int threads) {
  if (rows >= threads) return 1;
  const int64_t want = (threads + rows - 1) / rows;
  return std::max<int64_t>(1, std::min<int64_t>(want, V / kMinSplit));
}

template <class In>
int64_t fwd(const TokenStatsFwdParams& P) {
  using Acc = typename acc_type<In>::type;
  const RowLayout& L = P.layout;
  const int64_t rows = L.rows(), V = L.V;
  const Acc inv_t = Acc(1) / static_cast<Acc>(P.temperature);
  const In* logits = static_cast<const In*>(P.logits);
  const int nt = std::max(1, P.num_threads);
  int64_t first_bad = rows;

  const int64_t splits = vocab_splits(rows, V, nt);
  if (splits == 1) {
#pragma omp parallel for num_threads(nt) if (nt > 1 && rows > 1) schedule(static) reduction(min : first_bad)
    for (int64_t r = 0; r < rows; ++r) {
      // ignored rows (padding) are never read: finalize writes their zeros
      const Partial<Acc> st = label_at(P.labels, P.labels_int64, r) == P.ignore_index
                                  ? Partial<Acc>{}
                                  : row_partial(logits + L.offset(r), V, inv_t);
      if (!finalize<In, Acc>(P, r, st, inv_t)) first_bad = std::min(first_bad, r);
    }
  } else {
    const int64_t chunk = (V + splits - 1) / splits;
    std::vector<Partial<Acc>> parts(static_cast<size_t>(rows * splits));
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t task = 0; task < rows * splits; ++task) {
      const int64_t r = task / splits, v0 = (task % splits) * chunk;
      const int64_t n = std::max<int64_t>(0, std::min(chunk, V - v0));
      const bool ignored = label_at(P.labels, P.labels_int64, r) == P.ignore_index;
      parts[task] = ignored ? Partial<Acc>{} : row_partial(logits + L.offset(r) + v0, n, inv_t);
    }
    for (int64_t r = 0; r < rows; ++r) {
      Partial<Acc> st = parts[r * splits];
      for (int64_t k = 1; k < splits; ++k) combine(st, parts[r * splits + k]);
      if (!finalize<In, Acc>(P, r, st, inv_t)) first_bad = std::min(first_bad, r);
    }
  }
  return first_bad == rows ? -1 : first_bad;
}

template <class In>
void bwd(const TokenStatsBwdParams& P) {
  using Acc = typename acc_type<In>::type;
  const RowLayout& L = P.layout;
  const int64_t rows = L.rows(), V = L.V;
  const int64_t v_total = P.vocab_total > 0 ? P.vocab_total : V;
  const Acc inv_t = Acc(1) / static_cast<Acc>(P.temperature);
  const Acc inv_v = Acc(1) / static_cast<Acc>(v_total);
  const In* logits = static_cast<const In*>(P.logits);
  In* grad = static_cast<In*>(P.grad_logits);
  const Acc* g_lp = static_cast<const Acc*>(P.grad_logprobs);
  const Acc* g_ent = static_cast<const Acc*>(P.grad_entropy);
  const Acc* g_sc = static_cast<const Acc*>(P.grad_self_certainty);
  const Acc* lse_in = static_cast<const Acc*>(P.lse);
  const Acc* ent_in = static_cast<const Acc*>(P.entropy);
  const int nt = std::max(1, P.num_threads);
  const int64_t splits = vocab_splits(rows, V, nt);
  const int64_t chunk = (V + splits - 1) / splits;

#pragma omp parallel for num_threads(nt) if (nt > 1 && rows * splits > 1) schedule(static)
  for (int64_t task = 0; task < rows * splits; ++task) {
    const int64_t r = task / splits, v0 = (task % splits) * chunk, v1 = std::min(V, v0 + chunk);
    const In* z = logits + L.offset(r);
    In* g = grad + P.grad_layout.offset(r);
    const int64_t y = label_at(P.labels, P.labels_int64, r);
    if (y == P.ignore_index || !(y >= 0 && y < v_total)) {
      const Acc fill = y == P.ignore_index ? Acc(0) : kNaN<Acc>;
      for (int64_t j = v0; j < v1; ++j) store(g + j, fill);
      continue;
    }
    const Acc glp = g_lp ? g_lp[r] : Acc(0);
    const Acc gh = g_ent ? g_ent[r] : Acc(0);
    const Acc gsc = g_sc ? g_sc[r] : Acc(0);
    const Acc lse = lse_in[r];
    // grad_j = inv_t·(c - p_j·(k + gh·d_j)) (+ inv_t·glp at the label)
    const Acc k = glp - gsc + (g_ent ? gh * ent_in[r] : Acc(0));
    const Acc c = -gsc * inv_v;
    const int64_t y_local = y - P.vocab_offset;  // the label's column in this block of the vocabulary
    const bool has_label = y_local >= v0 && y_local < v1;
    const Acc z_label = has_label ? load_acc<In, Acc>(z + y_local) * inv_t : Acc(0);  // read before g overwrites it
#pragma omp simd
    for (int64_t j = v0; j < v1; ++j) {
      Acc d = static_cast<Acc>(to_float(z[j])) * inv_t - lse;
      d = d < kLowShift<Acc> ? kLowShift<Acc> : d;
      const Acc p = exp_acc(d);
      store(g + j, inv_t * (c - p * (k + gh * d)));
    }
    if (has_label) {
      Acc d = z_label - lse;
      d = d < kLowShift<Acc> ? kLowShift<Acc> : d;
      store(g + y_local, inv_t * (c - exp_acc(d) * (k + gh * d) + glp));
    }
  }
}

}  // namespace

int64_t token_stats_fwd(const TokenStatsFwdParams& p) {
  switch (p.dtype) {
    case FloatType::f64: return fwd<double>(p);
    case FloatType::bf16: return fwd<bf16>(p);
    case FloatType::f16: return fwd<f16>(p);
    default: return fwd<float>(p);
  }
}

void token_stats_bwd(const TokenStatsBwdParams& p) {
  switch (p.dtype) {
    case FloatType::f64: return bwd<double>(p);
    case FloatType::bf16: return bwd<bf16>(p);
    case FloatType::f16: return bwd<f16>(p);
    default: return bwd<float>(p);
  }
}

}  // namespace hotloop::cpu::HOTLOOP_ISA

HOTLOOP_ISA_END
#endif
