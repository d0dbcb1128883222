// CPU implementations of hotloop::policy_tokens_cpu / nft_tokens_cpu: tensor checks, then the plain C++ kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <array>
#include <tuple>

#include "../cpu/policy_loss.h"
#include "module.h"

namespace hotloop::bind {
namespace {

// `lr` fixes the dtype (float32 / float64) and N; every other token tensor must be a contiguous CPU [N] of it.
cpu::FloatType check_lr(const at::Tensor& lr, const char* op) {
  TORCH_CHECK_TYPE(lr.scalar_type() == at::kFloat || lr.scalar_type() == at::kDouble, op,
                   ": `lr` must be float32 or float64, got ", lr.scalar_type());
  TORCH_CHECK_VALUE(lr.device().is_cpu(), op, ": CPU kernel got `lr` on ", lr.device());
  TORCH_CHECK_VALUE(lr.dim() == 1 && lr.is_contiguous(), op, ": `lr` must be contiguous [N], got ", lr.sizes());
  return lr.scalar_type() == at::kDouble ? cpu::FloatType::f64 : cpu::FloatType::f32;
}

const void* token_data(const at::Tensor& t, const at::Tensor& lr, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == lr.scalar_type(), op, ": `", name, "` must be ", lr.scalar_type(),
                   " like `lr`, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": CPU kernel got `", name, "` on ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == lr.size(0), op, ": `", name, "` must be [N] = [", lr.size(0),
                    "] like `lr`, got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": `", name, "` must be contiguous");
  return t.data_ptr();
}

// Sums come back from the kernel in double; the op returns them in the input dtype.
template <size_t K> at::Tensor sums_tensor(const std::array<double, K>& s, const at::Tensor& lr) {
  return at::tensor(c10::ArrayRef<double>(s.data(), K), lr.options().dtype(at::kDouble)).to(lr.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_tokens_cpu(
    const at::Tensor& lr, const c10::optional<at::Tensor>& kld, const at::Tensor& adv, const at::Tensor& m,
    const at::Tensor& w, double clip_low, double clip_high, double dual_clip, int64_t kl_kind, double kl_coef) {
  constexpr const char* kOp = "hotloop.policy_tokens_cpu";
  TORCH_CHECK_VALUE(kl_kind >= 0 && kl_kind <= 3, kOp, ": `kl_kind` must be 0 (none), 1 (k1), 2 (k2) or 3 (k3), got ",
                    kl_kind);
  const bool has_kld = kld.has_value() && kld->defined();
  TORCH_CHECK_VALUE(has_kld == (kl_kind != 0), kOp, ": `kld` must be given exactly when kl_kind != 0; got kl_kind=",
                    kl_kind, has_kld ? " and a kld" : " and no kld");
  cpu::PolicyTokensParams p;
  p.dtype = check_lr(lr, kOp);
  p.N = lr.size(0);
  p.lr = lr.data_ptr();
  if (has_kld) p.kld = token_data(*kld, lr, kOp, "kld");
  p.adv = token_data(adv, lr, kOp, "adv");
  p.m = token_data(m, lr, kOp, "m");
  p.w = token_data(w, lr, kOp, "w");
  p.clip_low = clip_low, p.clip_high = clip_high, p.dual_clip = dual_clip;
  p.kl = static_cast<cpu::KlKind>(kl_kind);
  p.kl_coef = kl_coef;
  at::Tensor g_lr = at::empty({p.N}, lr.options());
  at::Tensor g_kl = at::empty({has_kld ? p.N : 0}, lr.options());
  p.g_lr = g_lr.data_ptr();
  p.g_kl = has_kld ? g_kl.data_ptr() : nullptr;
  p.num_threads = at::get_num_threads();
  return {g_lr, g_kl, sums_tensor(cpu::policy_tokens(p), lr)};
}

std::tuple<at::Tensor, at::Tensor> nft_tokens_cpu(const at::Tensor& lr, const at::Tensor& m, const at::Tensor& w,
                                                  const at::Tensor& r, const at::Tensor& c, double clamp_negative) {
  constexpr const char* kOp = "hotloop.nft_tokens_cpu";
  cpu::NftTokensParams p;
  p.dtype = check_lr(lr, kOp);
  p.N = lr.size(0);
  p.lr = lr.data_ptr();
  p.m = token_data(m, lr, kOp, "m");
  p.w = token_data(w, lr, kOp, "w");
  p.r = token_data(r, lr, kOp, "r");
  p.c = token_data(c, lr, kOp, "c");
  p.clamp_negative = clamp_negative;
  at::Tensor g_lr = at::empty({p.N}, lr.options());
  p.g_lr = g_lr.data_ptr();
  p.num_threads = at::get_num_threads();
  return {g_lr, sums_tensor(cpu::nft_tokens(p), lr)};
}

}  // namespace

const Kernels kernels("cpu", [](pybind11::module_& m) {
  m.def("policy_tokens", &policy_tokens_cpu, NoGil(),
        "policy_tokens(lr, kld, adv, m, w, clip_low, clip_high, dual_clip, kl_kind, kl_coef) -> (g_lr [N], g_kl "
        "[N] ([0] without kl), sums [6]: loss, clip_low count, clip_high count, dual count, ratio sum, kl sum, "
        "over tokens with m != 0). The per-token contract of the policy loss (reference.policy_loss."
        "policy_tokens_ref, docs/policy_loss.md): every tensor contiguous [N], all float32 or all float64. "
        "kl_kind: hotloop.contracts.KL_IDS (kld given exactly when != 0); dual_clip <= 0 is off.");
  m.def("nft_tokens", &nft_tokens_cpu, NoGil(),
        "nft_tokens(lr, m, w, r, c, clamp_negative) -> (g_lr [N], sums [3]: loss, ratio sum, clamped count). The "
        "per-token contract of the NFT loss (reference.policy_loss.nft_tokens_ref, docs/nft_loss.md); r: r_q of "
        "the token's group, c: 1 correct / 0 not.");
});

}  // namespace hotloop::bind
