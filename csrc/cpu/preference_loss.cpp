// Per-pair preference-loss (docs/preference_loss.md) and KTO contracts, CPU kernels. B is a batch of pairs (small), so this is a
// plain scalar loop with a switch on the kind hoisted out of it; math in the input type (float or double), with
// libm's numerically careful log1p / expm1.
#include "preference_loss.h"

#include <algorithm>
#include <cmath>

namespace hotloop::cpu {
namespace {

constexpr double kLn2 = 0.69314718055994530942;

// softplus(t) = log(1 + e^t) without overflow
template <class T> inline T softplus(T t) { return std::max(t, T(0)) + std::log1p(std::exp(-std::fabs(t))); }
// σ(t), accurate for both signs (σ(-t) is computed as sigmoid(-t), never 1 - σ(t))
template <class T> inline T sigmoid(T t) {
  if (t >= T(0)) return T(1) / (T(1) + std::exp(-t));
  const T e = std::exp(t);
  return e / (T(1) + e);
}
// log(1 - e^x), x <= 0: log(-expm1(x)) near 0, log1p(-exp(x)) below -ln 2
template <class T> inline T log1mexp(T x) {
  return x > T(-kLn2) ? std::log(-std::expm1(x)) : std::log1p(-std::exp(x));
}



// w_pos softplus(-t) + w_neg softplus(t) and its derivative in t
template <class T> inline void smoothed(T t, T w_pos, T w_neg, T& loss, T& dt) {
  loss = w_pos * softplus(-t) + w_neg * softplus(t);
  dt = -w_pos * sigmoid(-t) + w_neg * sigmoid(t);
}

template <class T, PreferenceKind K> void pairs_run(const PreferencePairsParams& p) {
  const T* x_w = static_cast<const T*>(p.x_w);
  const T* x_l = static_cast<const T*>(p.x_l);
  const T* r_w = static_cast<const T*>(p.r_w);
  const T* r_l = static_cast<const T*>(p.r_l);
  const T* len_w = static_cast<const T*>(p.len_w);
  const T* len_l = static_cast<const T*>(p.len_l);
  const T* cw = static_cast<const T*>(p.c);
  const T* nll = static_cast<const T*>(p.nll);
  T* out_loss = static_cast<T*>(p.loss);
  T* out_w = static_cast<T*>(p.g_w);
  T* out_l = static_cast<T*>(p.g_l);
  T* out_nll = static_cast<T*>(p.g_nll);
  const T b = T(p.beta), eps = T(p.label_smoothing), gamma = T(p.gamma);
  constexpr bool normalised = K == PreferenceKind::ipo || K == PreferenceKind::simpo || K == PreferenceKind::orpo;
  constexpr bool ref_free = K == PreferenceKind::simpo || K == PreferenceKind::orpo;
  const int nt = std::max(1, p.num_threads);
#pragma omp parallel for num_threads(nt) if (nt > 1 && p.B > 4096) schedule(static)
  for (int64_t i = 0; i < p.B; ++i) {
    const T inv_w = normalised ? T(1) / len_w[i] : T(1), inv_l = normalised ? T(1) / len_l[i] : T(1);
    const T u = (ref_free ? x_w[i] : x_w[i] - r_w[i]) * inv_w;
    const T v = (ref_free ? x_l[i] : x_l[i] - r_l[i]) * inv_l;
    const T z = b * (u - v);
    T loss = 0, du = 0, dv = 0, dz = 0, g_nll = 0;
    if constexpr (K == PreferenceKind::sigmoid || K == PreferenceKind::cdpo) {
      smoothed(z, T(1) - eps, eps, loss, dz);
      du = b * dz, dv = -b * dz;
    } else if constexpr (K == PreferenceKind::robust) {
      const T k = T(1) / (T(1) - T(2) * eps);
      loss = ((T(1) - eps) * softplus(-z) - eps * softplus(z)) * k;
      dz = (-(T(1) - eps) * sigmoid(-z) - eps * sigmoid(z)) * k;
      du = b * dz, dv = -b * dz;
    } else if constexpr (K == PreferenceKind::hinge) {
      const T m = T(1) - z;
      loss = m > T(0) ? m : T(0);
      dz = m > T(0) ? T(-1) : T(0);
      du = b * dz, dv = -b * dz;
    } else if constexpr (K == PreferenceKind::ipo) {
      const T e = u - v - T(1) / (T(2) * b);
      loss = e * e, du = T(2) * e, dv = T(-2) * e;
    } else if constexpr (K == PreferenceKind::bco_pair) {
      loss = softplus(-b * u) + softplus(b * v);
      du = -b * sigmoid(-b * u), dv = b * sigmoid(b * v);
    } else if constexpr (K == PreferenceKind::sppo_hard) {
      const T ew = u - T(0.5) / b, el = v + T(0.5) / b;
      loss = ew * ew + el * el, du = T(2) * ew, dv = T(2) * el;
    } else if constexpr (K == PreferenceKind::apo_zero) {
      const T sw = sigmoid(b * u), sl = sigmoid(b * v);
      loss = T(1) - sw + sl, du = -b * sw * (T(1) - sw), dv = b * sl * (T(1) - sl);
    } else if constexpr (K == PreferenceKind::apo_down) {
      const T sw = sigmoid(b * u), sz = sigmoid(z);
      loss = sw + T(1) - sz;
      dv = b * sz * (T(1) - sz);
      du = b * sw * (T(1) - sw) - dv;
    } else if constexpr (K == PreferenceKind::simpo) {
      smoothed(z - gamma, T(1) - eps, eps, loss, dz);
      du = b * dz, dv = -b * dz;
    } else if constexpr (K == PreferenceKind::orpo) {
      const T lo = (u - v) - (log1mexp(u) - log1mexp(v));
      loss = nll[i] + b * softplus(-lo);
      const T dlo = -b * sigmoid(-lo);
      du = -dlo / std::expm1(u), dv = dlo / std::expm1(v);  // d lo / du = -1 / expm1(u)
      g_nll = T(1);
    } else {  // cream
      const T c = cw[i];
      smoothed(z, c, T(1) - c, loss, dz);
      du = b * dz, dv = -b * dz;
    }
    out_loss[i] = loss;
    out_w[i] = du * inv_w;
    out_l[i] = dv * inv_l;
    out_nll[i] = g_nll;
  }
}

template <class T> void pairs_dispatch(const PreferencePairsParams& p) {
  switch (p.kind) {
    case PreferenceKind::sigmoid: return pairs_run<T, PreferenceKind::sigmoid>(p);
    case PreferenceKind::cdpo: return pairs_run<T, PreferenceKind::cdpo>(p);
    case PreferenceKind::robust: return pairs_run<T, PreferenceKind::robust>(p);
    case PreferenceKind::hinge: return pairs_run<T, PreferenceKind::hinge>(p);
    case PreferenceKind::ipo: return pairs_run<T, PreferenceKind::ipo>(p);
    case PreferenceKind::bco_pair: return pairs_run<T, PreferenceKind::bco_pair>(p);
    case PreferenceKind::sppo_hard: return pairs_run<T, PreferenceKind::sppo_hard>(p);
    case PreferenceKind::apo_zero: return pairs_run<T, PreferenceKind::apo_zero>(p);
    case PreferenceKind::apo_down: return pairs_run<T, PreferenceKind::apo_down>(p);
    case PreferenceKind::simpo: return pairs_run<T, PreferenceKind::simpo>(p);
    case PreferenceKind::orpo: return pairs_run<T, PreferenceKind::orpo>(p);
    case PreferenceKind::cream: return pairs_run<T, PreferenceKind::cream>(p);
  }
}

template <class T> void kto_run(const KtoItemsParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* r = static_cast<const T*>(p.r);
  const T* d = static_cast<const T*>(p.d);
  T* out_loss = static_cast<T*>(p.loss);
  T* out_g = static_cast<T*>(p.g);
  const T b = T(p.beta), kl = T(p.kl), wd = T(p.desirable_weight), wu = T(p.undesirable_weight);
  const int nt = std::max(1, p.num_threads);
#pragma omp parallel for num_threads(nt) if (nt > 1 && p.B > 4096) schedule(static)
  for (int64_t i = 0; i < p.B; ++i) {
    const T h = x[i] - r[i];
    const bool des = d[i] > T(0.5);
    const T t = des ? b * (h - kl) : b * (kl - h);
    const T s = sigmoid(t), w = des ? wd : wu;
    out_loss[i] = w * (T(1) - s);
    out_g[i] = -w * s * (T(1) - s) * b * (des ? T(1) : T(-1));
  }
}

}  // namespace

void preference_pairs(const PreferencePairsParams& p) {
  if (p.dtype == FloatType::f64) pairs_dispatch<double>(p);
  else pairs_dispatch<float>(p);
}

void kto_items(const KtoItemsParams& p) {
  if (p.dtype == FloatType::f64) kto_run<double>(p);
  else kto_run<float>(p);
}

}  // namespace hotloop::cpu
