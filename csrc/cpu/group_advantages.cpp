// Group-relative advantages (docs/group_advantages.md), CPU kernel. One translation unit for every ISA: the op reads R rewards
// and writes R advantages, a few passes over O(R) memory with no transcendental math, so SIMD dispatch buys
// nothing here.
//
// Fixed groups (G adjacent responses): threads split the groups; each group, in cache, gets its sum, max and
// first argmax, then its squared deviations and runner-up, then its outputs.
// Ragged groups (group_index): [R]-sized per-group accumulators indexed by group id: a scatter pass for
// count / sum / max / first argmax (checking each id), a second for squared deviations about the group mean and
// the runner-up, then a parallel elementwise pass. The scatter passes are sequential (in index order, which
// also makes "first index on ties" and the sums deterministic).
// Batch statistics (grpo scale="batch", reinforce_pp_baseline's whitening) are two-pass float64 reductions
// over the finite values only, so a NaN reward reaches no group but its own.
#include "group_advantages.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "simd_math.h"

namespace hotloop::cpu {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int64_t kParallelMin = 1 << 15;  // below this many responses threads cost more than they save

struct GroupStats {
  double mean = 0, ss = 0;  // mean, sum of squared deviations
  int64_t n = 0;
  double max1 = -kInf, max2 = -kInf;
  int64_t best = -1;  // first index of max1 (-1: no non-NaN value above -inf)
};

struct BatchStats {
  double mean = 0, std = 0;
};

// Every kind but passk is a = (r - mean_g) * mul_g: the factor of a group with statistics s. (Singletons have
// r - mean_g = 0, so their factor is irrelevant; a NaN in a group makes r - mean_g NaN across it.)
// reinforce_pp_baseline's whitening is a separate pass.
double group_factor(const GroupAdvantagesParams& p, const GroupStats& s, double batch_std) {
  switch (p.kind) {
    case AdvantageKind::grpo:
      if (p.scale == AdvantageScale::group) return s.n > 1 ? 1.0 / (std::sqrt(s.ss / double(s.n - 1)) + p.eps) : 1.0;
      if (p.scale == AdvantageScale::batch) return 1.0 / (batch_std + p.eps);
      return 1.0;
    case AdvantageKind::rloo: return s.n > 1 ? double(s.n) / double(s.n - 1) : 1.0;
    default: return 1.0;  // dr_grpo, reinforce_pp_baseline
  }
}

// passk: the group's best response (first index of the max) gets max - runner-up, the others 0; `+ d * 0`
// makes the whole group NaN when it holds a NaN.
HOTLOOP_INLINE double passk_advantage(double r, int64_t i, const GroupStats& s) {
  return ((s.n > 1 && i == s.best) ? s.max1 - s.max2 : 0.0) + (r - s.mean) * 0.0;
}

template <class T> HOTLOOP_INLINE double load(const T* x, int64_t i) { return double(to_float(x[i])); }

// Mean and unbiased std of the finite values of x[0, n) (mean 0 with none, std 0 under two).
template <class T> BatchStats finite_stats(const T* x, int64_t n, int nt) {
  double sum = 0;
  int64_t cnt = 0;
#pragma omp parallel for num_threads(nt) if (nt > 1 && n >= kParallelMin) reduction(+ : sum, cnt)
  for (int64_t i = 0; i < n; ++i) {
    const double v = load(x, i);
    if (std::isfinite(v)) sum += v, ++cnt;
  }
  BatchStats b;
  if (cnt == 0) return b;
  b.mean = sum / double(cnt);
  if (cnt < 2) return b;
  double ss = 0;
#pragma omp parallel for num_threads(nt) if (nt > 1 && n >= kParallelMin) reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) {
    const double v = load(x, i);
    if (std::isfinite(v)) ss += (v - b.mean) * (v - b.mean);
  }
  b.std = std::sqrt(ss / double(cnt - 1));
  return b;
}

template <class T, class Out> void fixed_groups(const GroupAdvantagesParams& p, const T* r, Out* out,
                                                double batch_std, int nt) {
  const int64_t G = p.group_size, groups = p.R / G;
  const bool passk = p.kind == AdvantageKind::passk;
#pragma omp parallel for num_threads(nt) if (nt > 1 && p.R >= kParallelMin) schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t lo = g * G;
    GroupStats s;
    s.n = G;
    double sum = 0;
    for (int64_t i = lo; i < lo + G; ++i) {
      const double v = load(r, i);
      sum += v;
      if (passk && v > s.max1) s.max1 = v, s.best = i;
    }
    s.mean = sum / double(G);
    for (int64_t i = lo; i < lo + G; ++i) {
      const double v = load(r, i);
      s.ss += (v - s.mean) * (v - s.mean);
      if (passk && i != s.best && v > s.max2) s.max2 = v;
    }
    if (passk) {
      for (int64_t i = lo; i < lo + G; ++i) out[i] = Out(passk_advantage(load(r, i), i, s));
    } else {
      const double mul = group_factor(p, s, batch_std);
#pragma omp simd
      for (int64_t i = lo; i < lo + G; ++i) out[i] = Out((load(r, i) - s.mean) * mul);
    }
  }
}

template <class T, class I, class Out> int64_t ragged_groups(const GroupAdvantagesParams& p, const T* r,
                                                             const I* idx, Out* out, double batch_std, int nt) {
  const int64_t R = p.R;
  const bool passk = p.kind == AdvantageKind::passk;
  std::vector<double> sum(R, 0.0), ss(R, 0.0);
  std::vector<int64_t> cnt(R, 0);
  std::vector<double> max1, max2;
  std::vector<int64_t> best;
  if (passk) max1.assign(R, -kInf), max2.assign(R, -kInf), best.assign(R, -1);
  for (int64_t i = 0; i < R; ++i) {
    const int64_t g = int64_t(idx[i]);
    if (g < 0 || g >= R) return i;
    const double v = load(r, i);
    sum[g] += v;
    ++cnt[g];
    if (passk && v > max1[g]) max1[g] = v, best[g] = i;
  }
  // sum[] becomes the group mean
#pragma omp parallel for num_threads(nt) if (nt > 1 && R >= kParallelMin) schedule(static)
  for (int64_t g = 0; g < R; ++g) sum[g] = cnt[g] > 0 ? sum[g] / double(cnt[g]) : 0.0;
  for (int64_t i = 0; i < R; ++i) {
    const int64_t g = int64_t(idx[i]);
    const double d = load(r, i) - sum[g];
    ss[g] += d * d;
    if (passk && i != best[g] && load(r, i) > max2[g]) max2[g] = load(r, i);
  }
  if (passk) {
#pragma omp parallel for num_threads(nt) if (nt > 1 && R >= kParallelMin) schedule(static)
    for (int64_t i = 0; i < R; ++i) {
      const int64_t g = int64_t(idx[i]);
      GroupStats s;
      s.mean = sum[g], s.n = cnt[g], s.max1 = max1[g], s.max2 = max2[g], s.best = best[g];
      out[i] = Out(passk_advantage(load(r, i), i, s));
    }
    return -1;
  }
  // ss[] becomes the group's factor, then a = (r - mean_g) * factor_g
#pragma omp parallel for num_threads(nt) if (nt > 1 && R >= kParallelMin) schedule(static)
  for (int64_t g = 0; g < R; ++g) {
    GroupStats s;
    s.ss = ss[g], s.n = cnt[g];
    ss[g] = group_factor(p, s, batch_std);
  }
#pragma omp parallel for num_threads(nt) if (nt > 1 && R >= kParallelMin) schedule(static)
  for (int64_t i = 0; i < R; ++i) {
    const int64_t g = int64_t(idx[i]);
    out[i] = Out((load(r, i) - sum[g]) * ss[g]);
  }
  return -1;
}

template <class T, class Out> int64_t run(const GroupAdvantagesParams& p) {
  const T* r = static_cast<const T*>(p.rewards);
  Out* out = static_cast<Out*>(p.out);
  const int nt = p.num_threads > 0 ? p.num_threads : 1;
  double batch_std = 0;
  if (p.kind == AdvantageKind::grpo && p.scale == AdvantageScale::batch) batch_std = finite_stats(r, p.R, nt).std;
  int64_t bad = -1;
  if (p.group_size > 0) {
    fixed_groups(p, r, out, batch_std, nt);
  } else if (p.index_int64) {
    bad = ragged_groups(p, r, static_cast<const int64_t*>(p.group_index), out, batch_std, nt);
  } else {
    bad = ragged_groups(p, r, static_cast<const int32_t*>(p.group_index), out, batch_std, nt);
  }
  if (bad >= 0 || p.kind != AdvantageKind::reinforce_pp_baseline) return bad;
  // whiten x = r - mean_g over the batch, in place
  const BatchStats b = finite_stats(static_cast<const Out*>(out), p.R, nt);
  const double denom = b.std + p.eps;
#pragma omp parallel for num_threads(nt) if (nt > 1 && p.R >= kParallelMin) schedule(static)
  for (int64_t i = 0; i < p.R; ++i) out[i] = Out((double(out[i]) - b.mean) / denom);
  return -1;
}

}  // namespace

int64_t group_advantages(const GroupAdvantagesParams& p) {
  if (p.R == 0) return -1;
  switch (p.dtype) {
    case FloatType::f64: return run<double, double>(p);
    case FloatType::bf16: return run<bf16, float>(p);
    case FloatType::f16: return run<f16, float>(p);
    default: return run<float, float>(p);
  }
}

}  // namespace hotloop::cpu
