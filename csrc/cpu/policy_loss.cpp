// Per-token policy / NFT loss contracts (docs/policy_loss.md, docs/nft_loss.md), CPU kernels. Each is an elementwise map plus a few sums,
// so the work is one pass over N tokens: branch-free loop bodies (selects, not branches) that GCC vectorises.
//
// Sums are deterministic whatever the thread count: tokens are cut into fixed blocks of kBlock, each block is
// summed in double into its own slot, and the slots are added in block order afterwards.
//
// Per-token math runs in the input type (float or double), as the torch contract does; clamps are written as
// comparisons that let NaN through, like torch.clamp, and masked tokens are selected out at the very end.
// The float path vectorises; the double path (for tests) calls libm's exp.

// Built with -fno-trapping-math (setup.py, CMakeLists.txt): without it GCC turns the selects into branches and
// keeps these loops scalar.
#include "policy_loss.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "simd_math.h"

namespace hotloop::cpu {
namespace {

constexpr int64_t kBlock = 4096;  // tokens per partial sum: fixed, so sums do not depend on the threads
constexpr double kLogRatioClamp = 20.0;  // docs/policy_loss.md: rho = exp(clamp(lr, -20, 20)); k3 clamps -d the same way
constexpr double kNftLogRatioMax = 10.0;  // docs/nft_loss.md: R = exp(min(lr, 10))

// torch.clamp: min(max(x, lo), hi), NaN in -> NaN out
template <class T> HOTLOOP_INLINE T clamp(T x, T lo, T hi) {
  const T t = x < lo ? lo : x;
  return t > hi ? hi : t;
}

// Sums of K quantities over [0, N): block(begin, end) sums one block; blocks run in parallel, their partials
// are added in block order.
template <size_t K, class Block> std::array<double, K> blocked_sums(int64_t N, int num_threads, const Block& block) {
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  const int nt = std::max(1, num_threads);
  std::vector<std::array<double, K>> parts(static_cast<size_t>(blocks));
#pragma omp parallel for num_threads(nt) if (nt > 1 && blocks > 1) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) parts[b] = block(b * kBlock, std::min(N, (b + 1) * kBlock));
  std::array<double, K> total{};
  for (const auto& part : parts)
    for (size_t k = 0; k < K; ++k) total[k] += part[k];
  return total;
}

// k and dk/dd of the KL estimator K (not none) from d = logp - ref_logp
template <KlKind K, class T> HOTLOOP_INLINE void kl_terms(T d, T& k, T& dk) {
  if constexpr (K == KlKind::k1) {
    k = d, dk = T(1);
  } else if constexpr (K == KlKind::k2) {
    k = T(0.5) * d * d, dk = d;
  } else {
    const T c = T(kLogRatioClamp);
    const T e = exp_acc(clamp(-d, -c, c));
    k = e + d - T(1);
    dk = T(1) - (((d >= -c) & (d <= c)) ? e : T(0));
  }
}

// Tokens [begin, end) of the policy contract: writes their gradients, returns their sums.
template <class T, KlKind K> PolicySums policy_block(const PolicyTokensParams& p, int64_t begin, int64_t end) {
  const T* lr = static_cast<const T*>(p.lr);
  const T* kld = static_cast<const T*>(p.kld);
  const T* adv = static_cast<const T*>(p.adv);
  const T* m = static_cast<const T*>(p.m);
  const T* w = static_cast<const T*>(p.w);
  T* g_lr = static_cast<T*>(p.g_lr);
  T* g_kl = static_cast<T*>(p.g_kl);
  // scalars rounded to T once, as torch does with Python floats against a tensor
  const T lo = T(1.0 - p.clip_low), hi = T(1.0 + p.clip_high), neg_dual = T(-p.dual_clip), coef = T(p.kl_coef);
  const T c = T(kLogRatioClamp);
  const bool dual_on = p.dual_clip > 0;
  double s_loss = 0, s_low = 0, s_high = 0, s_dual = 0, s_rho = 0, s_kl = 0;
#pragma omp simd reduction(+ : s_loss, s_low, s_high, s_dual, s_rho, s_kl)
  for (int64_t i = begin; i < end; ++i) {
    const T x = lr[i], a = adv[i], mi = m[i], wi = w[i];
    const bool on = mi != T(0);
    const T rho = exp_acc(clamp(x, -c, c));
    const T d_rho = ((x >= -c) & (x <= c)) ? rho : T(0);  // d clamp / dx = 1 on the closed range, 0 outside
    const T rho_c = clamp(rho, lo, hi);
    const T d_rho_c = ((rho >= lo) & (rho <= hi)) ? d_rho : T(0);
    const T pg1 = -a * rho, pg2 = -a * rho_c, g1 = -a * d_rho, g2 = -a * d_rho_c;
    const bool use1 = pg1 >= pg2;
    const T dual_loss = neg_dual * a;
    const T loss1 = use1 ? pg1 : pg2;
    const bool dual = dual_on & (a < T(0)) & (loss1 > dual_loss);
    T loss = dual ? dual_loss : loss1;
    const T grad = dual ? T(0) : (use1 ? g1 : g2);
    T k = T(0);
    if constexpr (K != KlKind::none) {
      T dk;
      kl_terms<K>(kld[i], k, dk);
      const T gk = wi * coef * dk;
      g_kl[i] = on ? gk : T(0);
      loss = loss + coef * k;
    }
    const T gl = wi * grad, wl = wi * loss, mr = mi * rho, mk = mi * k;
    g_lr[i] = on ? gl : T(0);
    s_loss += on ? double(wl) : 0.0;
    s_low += (on & (rho < lo) & (a < T(0))) ? double(mi) : 0.0;
    s_high += (on & (rho > hi) & (a > T(0))) ? double(mi) : 0.0;
    s_dual += (on & dual) ? double(mi) : 0.0;
    s_rho += on ? double(mr) : 0.0;
    s_kl += on ? double(mk) : 0.0;
  }
  return PolicySums{s_loss, s_low, s_high, s_dual, s_rho, s_kl};
}

template <class T, KlKind K> PolicySums policy_run(const PolicyTokensParams& p) {
  return blocked_sums<6>(p.N, p.num_threads,
                         [&p](int64_t begin, int64_t end) { return policy_block<T, K>(p, begin, end); });
}

template <class T> PolicySums policy_dispatch_kl(const PolicyTokensParams& p) {
  switch (p.kl) {
    case KlKind::k1: return policy_run<T, KlKind::k1>(p);
    case KlKind::k2: return policy_run<T, KlKind::k2>(p);
    case KlKind::k3: return policy_run<T, KlKind::k3>(p);
    default: return policy_run<T, KlKind::none>(p);
  }
}

// Tokens [begin, end) of the NFT contract: writes their gradients, returns their sums.
template <class T> NftSums nft_block(const NftTokensParams& p, int64_t begin, int64_t end) {
  const T* lr = static_cast<const T*>(p.lr);
  const T* m = static_cast<const T*>(p.m);
  const T* w = static_cast<const T*>(p.w);
  const T* r = static_cast<const T*>(p.r);
  const T* cor = static_cast<const T*>(p.c);
  T* g_lr = static_cast<T*>(p.g_lr);
  const T cn = T(p.clamp_negative), cap = T(kNftLogRatioMax);
  // log has no vectorised form here: the vectorised pass leaves the negatives' y in `ys` and a scalar pass
  // adds their -log(y) to the loss
  T ys[kBlock];
  double s_loss = 0, s_ratio = 0, s_clamped = 0;
#pragma omp simd reduction(+ : s_loss, s_ratio, s_clamped)
  for (int64_t i = begin; i < end; ++i) {
    const T x = lr[i], mi = m[i], wi = w[i], ri = r[i];
    const bool on = mi != T(0), pos = cor[i] > T(0.5);
    const T lc = x > cap ? cap : x;  // min(lr, 10), NaN stays NaN
    const T R = exp_acc(lc);
    const T q = (T(1) - ri * R) / (T(1) - ri);
    const T y = q < cn ? cn : q;
    ys[i - begin] = y;
    // straight-through max: the loss sees y, the gradient is that of -log(q) evaluated at y
    const T g_neg = ri * R / ((T(1) - ri) * y);
    const T grad = x <= cap ? (pos ? T(-1) : g_neg) : T(0);
    const T gl = wi * grad, wl = wi * -lc, mr = mi * R;
    g_lr[i] = on ? gl : T(0);
    s_loss += (on & pos) ? double(wl) : 0.0;
    s_ratio += on ? double(mr) : 0.0;
    s_clamped += (on & !pos & (q < cn)) ? double(mi) : 0.0;
  }
  for (int64_t i = begin; i < end; ++i)
    if (m[i] != T(0) && !(cor[i] > T(0.5))) s_loss += double(w[i] * -std::log(ys[i - begin]));
  return NftSums{s_loss, s_ratio, s_clamped};
}

template <class T> NftSums nft_run(const NftTokensParams& p) {
  return blocked_sums<3>(p.N, p.num_threads,
                         [&p](int64_t begin, int64_t end) { return nft_block<T>(p, begin, end); });
}

}  // namespace

PolicySums policy_tokens(const PolicyTokensParams& p) {
  return p.dtype == FloatType::f64 ? policy_dispatch_kl<double>(p) : policy_dispatch_kl<float>(p);
}

NftSums nft_tokens(const NftTokensParams& p) {
  return p.dtype == FloatType::f64 ? nft_run<double>(p) : nft_run<float>(p);
}

}  // namespace hotloop::cpu
