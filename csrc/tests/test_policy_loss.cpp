// ctest: the per-token policy / NFT loss kernels against the contract computed token by token in double, for
// float and double inputs, every KL estimator, dual clip on and off, clamp edges, NaN / inf on masked tokens,
// sizes across the kernels' token blocks, one and two threads (which must give bit-identical results).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/policy_loss.h"

using namespace hotloop::cpu;

namespace {

int failures = 0;

// |got - want| relative to max(scale, |want|)
void expect_close(double got, double want, double scale, double tol, const char* what, int64_t i) {
  const double err = std::fabs(got - want) / std::max(scale, std::fabs(want));
  if (!(err <= tol)) {
    std::printf("FAIL %s [%lld]: got %.12g want %.12g\n", what, static_cast<long long>(i), got, want);
    ++failures;
  }
}

double clamp(double x, double lo, double hi) { return std::min(std::max(x, lo), hi); }

struct Inputs {
  std::vector<double> lr, kld, adv, m, w, r, c;  // already rounded to the kernel's input type
};

// Random tokens: every fifth one masked with NaN / inf inputs; planted edge values (+-20 and beyond for the
// policy, 10 and beyond for NFT) on live tokens with a tiny weight so their huge ratios do not swamp the sums,
// and lr = 0 (rho = 1, on the clip edges when a clip is 0) with full weight.
template <class T> Inputs make_inputs(int64_t N, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  const double poison[] = {NAN, INFINITY, -INFINITY};
  const double edges[] = {20.0, -20.0, 20.5, -20.5, 35.0, -300.0, 0.0, 10.0, 10.5, 12.0};
  auto round = [](double v) { return static_cast<double>(static_cast<T>(v)); };
  Inputs in;
  for (int64_t i = 0; i < N; ++i) {
    double lr = 0.4 * normal(gen), kld = 2.0 * normal(gen), adv = normal(gen);
    double m = unit(gen) < 0.2 ? 0.5 : 1.0, w = unit(gen);
    if (i % 37 == 11) {
      lr = edges[(i / 37) % 10], kld = edges[(i / 37 + 3) % 10];
      m = w = std::ldexp(1.0, -30);
    } else if (i % 37 == 23) {
      lr = 0.0;
    } else if (i % 5 == 3) {
      lr = poison[i % 3], kld = poison[(i + 1) % 3], adv = poison[(i + 2) % 3];
      m = w = 0.0;
    }
    in.lr.push_back(round(lr)), in.kld.push_back(round(kld)), in.adv.push_back(round(adv));
    in.m.push_back(round(m)), in.w.push_back(round(w));
    in.r.push_back(round(0.02 + 0.96 * unit(gen))), in.c.push_back(unit(gen) < 0.5 ? 1.0 : 0.0);
  }
  return in;
}

struct PolicyConfig {
  double clip_low, clip_high, dual_clip;
  KlKind kl;
  double kl_coef;
};

// One token of the policy contract, straight from its definition: (g_lr, g_kl, contributions to the 6 sums).
struct PolicyToken {
  double g_lr = 0, g_kl = 0;
  std::array<double, 6> sums{};
};

PolicyToken policy_token(double lr, double d, double adv, double m, double w, const PolicyConfig& cfg) {
  PolicyToken t;
  if (m == 0) return t;
  const double lo = 1.0 - cfg.clip_low, hi = 1.0 + cfg.clip_high;
  const double rho = std::exp(clamp(lr, -20.0, 20.0));
  const double drho = std::fabs(lr) <= 20.0 ? rho : 0.0;
  const double unclipped = -adv * rho, clipped = -adv * clamp(rho, lo, hi);
  double loss, grad;
  if (unclipped >= clipped) {
    loss = unclipped, grad = -adv * drho;
  } else {
    loss = clipped, grad = (rho >= lo && rho <= hi) ? -adv * drho : 0.0;
  }
  const bool dual = cfg.dual_clip > 0 && adv < 0 && loss > -cfg.dual_clip * adv;
  if (dual) loss = -cfg.dual_clip * adv, grad = 0.0;
  double k = 0, dk = 0;
  if (cfg.kl == KlKind::k1) k = d, dk = 1.0;
  if (cfg.kl == KlKind::k2) k = 0.5 * d * d, dk = d;
  if (cfg.kl == KlKind::k3) {
    const double e = std::exp(clamp(-d, -20.0, 20.0));
    k = e + d - 1.0, dk = std::fabs(d) <= 20.0 ? 1.0 - e : 1.0;
  }
  loss += cfg.kl_coef * k;
  t.g_lr = w * grad, t.g_kl = w * cfg.kl_coef * dk;
  t.sums = {w * loss, (rho < lo && adv < 0) ? m : 0.0, (rho > hi && adv > 0) ? m : 0.0, dual ? m : 0.0, m * rho,
            m * k};
  return t;
}

// One token of the NFT contract: (g_lr, contributions to the 3 sums, and the condition number of g_lr: for an
// unclamped negative, 1 - r R cancels, so rounding in the kernel's input type is amplified by
// (1 + r R) / (1 - r R)).
struct NftToken {
  double g_lr = 0;
  std::array<double, 3> sums{};
  double cond = 1;
};

NftToken nft_token(double lr, double m, double w, double r, double c, double clamp_negative) {
  NftToken t;
  if (m == 0) return t;
  const double lr_c = std::min(lr, 10.0), R = std::exp(lr_c);
  const double x = (1.0 - r * R) / (1.0 - r), y = std::max(x, clamp_negative);
  const bool correct = c > 0.5;
  const double loss = correct ? -lr_c : -std::log(y);
  const double grad = lr > 10.0 ? 0.0 : correct ? -1.0 : r * R / ((1.0 - r) * y);
  t.g_lr = w * grad;
  t.sums = {w * loss, m * R, (!correct && x < clamp_negative) ? m : 0.0};
  if (!correct && x >= clamp_negative) t.cond = (1.0 + r * R) / ((1.0 - r) * x);
  return t;
}

template <class T> std::vector<T> as(const std::vector<double>& v) { return std::vector<T>(v.begin(), v.end()); }

template <class T> void check_policy(FloatType type, int64_t N, const PolicyConfig& cfg, double tol) {
  const Inputs in = make_inputs<T>(N, static_cast<unsigned>(N * 7 + static_cast<int>(cfg.kl)));
  const std::vector<T> lr = as<T>(in.lr), kld = as<T>(in.kld), adv = as<T>(in.adv), m = as<T>(in.m), w = as<T>(in.w);
  std::vector<T> g_lr[2], g_kl[2];
  PolicySums sums[2];
  for (int threads : {1, 2}) {
    g_lr[threads - 1].assign(N, T(NAN)), g_kl[threads - 1].assign(N, T(NAN));
    PolicyTokensParams p;
    p.dtype = type, p.N = N;
    p.lr = lr.data(), p.kld = cfg.kl == KlKind::none ? nullptr : kld.data();
    p.adv = adv.data(), p.m = m.data(), p.w = w.data();
    p.clip_low = cfg.clip_low, p.clip_high = cfg.clip_high, p.dual_clip = cfg.dual_clip;
    p.kl = cfg.kl, p.kl_coef = cfg.kl_coef;
    p.g_lr = g_lr[threads - 1].data(), p.g_kl = cfg.kl == KlKind::none ? nullptr : g_kl[threads - 1].data();
    p.num_threads = threads;
    sums[threads - 1] = policy_tokens(p);
  }
  std::array<double, 6> want{}, scale{};
  for (int64_t i = 0; i < N; ++i) {
    const PolicyToken t = policy_token(in.lr[i], in.kld[i], in.adv[i], in.m[i], in.w[i], cfg);
    expect_close(g_lr[0][i], t.g_lr, 1.0, tol, "policy g_lr", i);
    if (cfg.kl != KlKind::none) expect_close(g_kl[0][i], t.g_kl, 1.0, tol, "policy g_kl", i);
    for (int k = 0; k < 6; ++k) want[k] += t.sums[k], scale[k] += std::fabs(t.sums[k]);
  }
  for (int k = 0; k < 6; ++k) expect_close(sums[0][k], want[k], std::max(1.0, scale[k]), tol, "policy sum", k);
  if (sums[0] != sums[1] || g_lr[0] != g_lr[1] || (cfg.kl != KlKind::none && g_kl[0] != g_kl[1])) {
    std::printf("FAIL policy N=%lld: 1 and 2 threads differ\n", static_cast<long long>(N));
    ++failures;
  }
}

template <class T> void check_nft(FloatType type, int64_t N, double clamp_negative, double tol) {
  const Inputs in = make_inputs<T>(N, static_cast<unsigned>(N * 13 + 1));
  const std::vector<T> lr = as<T>(in.lr), m = as<T>(in.m), w = as<T>(in.w), r = as<T>(in.r), c = as<T>(in.c);
  std::vector<T> g_lr[2];
  NftSums sums[2];
  for (int threads : {1, 2}) {
    g_lr[threads - 1].assign(N, T(NAN));
    NftTokensParams p;
    p.dtype = type, p.N = N;
    p.lr = lr.data(), p.m = m.data(), p.w = w.data(), p.r = r.data(), p.c = c.data();
    p.clamp_negative = clamp_negative;
    p.g_lr = g_lr[threads - 1].data();
    p.num_threads = threads;
    sums[threads - 1] = nft_tokens(p);
  }
  std::array<double, 3> want{}, scale{};
  for (int64_t i = 0; i < N; ++i) {
    const NftToken t = nft_token(in.lr[i], in.m[i], in.w[i], in.r[i], in.c[i], clamp_negative);
    expect_close(g_lr[0][i], t.g_lr, std::max(1.0, std::fabs(t.g_lr) * t.cond), tol, "nft g_lr", i);
    for (int k = 0; k < 3; ++k) want[k] += t.sums[k], scale[k] += std::fabs(t.sums[k]);
  }
  for (int k = 0; k < 3; ++k) expect_close(sums[0][k], want[k], std::max(1.0, scale[k]), tol, "nft sum", k);
  if (sums[0] != sums[1] || g_lr[0] != g_lr[1]) {
    std::printf("FAIL nft N=%lld: 1 and 2 threads differ\n", static_cast<long long>(N));
    ++failures;
  }
}

}  // namespace

int main() {
  // 0, one token, less than a block, several blocks with a partial last one
  for (int64_t N : {0, 1, 100, 3 * 4096 + 17}) {
    for (KlKind kl : {KlKind::none, KlKind::k1, KlKind::k2, KlKind::k3}) {
      for (double dual : {0.0, 3.0}) {
        for (auto clips : {std::array<double, 2>{0.2, 0.2}, std::array<double, 2>{0.2, 0.28},
                           std::array<double, 2>{0.0, 0.0}}) {
          const PolicyConfig cfg{clips[0], clips[1], dual, kl, 0.1};
          check_policy<float>(FloatType::f32, N, cfg, 1e-5);
          check_policy<double>(FloatType::f64, N, cfg, 1e-12);
        }
      }
    }
    for (double clamp_negative : {1.0, 0.1}) {
      check_nft<float>(FloatType::f32, N, clamp_negative, 1e-5);
      check_nft<double>(FloatType::f64, N, clamp_negative, 1e-12);
    }
  }
  std::printf(failures == 0 ? "all policy_loss checks passed\n" : "%d policy_loss checks FAILED\n", failures);
  return failures == 0 ? 0 : 1;
}
