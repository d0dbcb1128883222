// Per-token contracts of the policy loss (docs/policy_loss.md) and the NFT loss (docs/nft_loss.md), CPU kernels: elementwise maps
// to a gradient per token plus a few sums. The contract, in plain torch, is policy_tokens_ref / nft_tokens_ref
// in python/hotloop/reference/policy_loss.py. Plain C++ (no torch headers) so CMake builds and ctest-checks it.
#pragma once
#include <array>
#include <cstdint>

#include "token_stats.h"  // FloatType

namespace hotloop::cpu {

enum class KlKind : int { none = 0, k1 = 1, k2 = 2, k3 = 3 };

// Every array is [N] contiguous in `dtype` (f32 or f64). A token with m == 0 contributes nothing: its outputs
// are selected to 0, so NaN / inf inputs on padding never reach a gradient or a sum.
struct PolicyTokensParams {
  FloatType dtype = FloatType::f32;
  int64_t N = 0;
  const void* lr = nullptr;   // log-ratio
  const void* kld = nullptr;  // d = logp - ref_logp; read only when kl != none
  const void* adv = nullptr;
  const void* m = nullptr;    // mask (metric weight)
  const void* w = nullptr;    // loss weight
  double clip_low = 0.2, clip_high = 0.2;
  double dual_clip = 0.0;     // <= 0: off
  KlKind kl = KlKind::none;
  double kl_coef = 0.0;
  void* g_lr = nullptr;       // out: w * dl/dlr
  void* g_kl = nullptr;       // out: w * kl_coef * dk/dd; written only when kl != none
  int num_threads = 1;
};

// (sum w*l, sum m*[clipped low], sum m*[clipped high], sum m*[dual clip], sum m*rho, sum m*k)
using PolicySums = std::array<double, 6>;
PolicySums policy_tokens(const PolicyTokensParams& p);

struct NftTokensParams {
  FloatType dtype = FloatType::f32;
  int64_t N = 0;
  const void* lr = nullptr;
  const void* m = nullptr;
  const void* w = nullptr;
  const void* r = nullptr;  // r_q of the token's group, in (0, 1)
  const void* c = nullptr;  // 1 for a correct response, 0 otherwise
  double clamp_negative = 1.0;
  void* g_lr = nullptr;     // out: w * dl/dlr
  int num_threads = 1;
};

// (sum w*l, sum m*R, sum m*[negative token clamped])
using NftSums = std::array<double, 3>;
NftSums nft_tokens(const NftTokensParams& p);

}  // namespace hotloop::cpu
