// CPU implementations of hotloop::preference_pairs_cpu / kto_items_cpu: tensor checks, then the plain C++ kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <tuple>

#include "../cpu/preference_loss.h"
#include "module.h"

namespace hotloop::bind {
namespace {

// `x` fixes the dtype (float32 / float64) and B; every other per-pair tensor must be a contiguous CPU [B] of it.
cpu::FloatType check_first(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": `", name,
                   "` must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": CPU kernel got `", name, "` on ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 1 && x.is_contiguous(), op, ": `", name, "` must be contiguous [B], got ", x.sizes());
  return x.scalar_type() == at::kDouble ? cpu::FloatType::f64 : cpu::FloatType::f32;
}

const void* pair_data(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": `", name, "` must be ", x.scalar_type(), ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": CPU kernel got `", name, "` on ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(0) && t.is_contiguous(), op, ": `", name,
                    "` must be contiguous [B] = [", x.size(0), "], got ", t.sizes());
  return t.data_ptr();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> preference_pairs_cpu(
    const at::Tensor& x_w, const at::Tensor& x_l, const at::Tensor& r_w, const at::Tensor& r_l,
    const at::Tensor& len_w, const at::Tensor& len_l, const at::Tensor& c, const at::Tensor& nll, int64_t kind,
    double beta, double label_smoothing, double gamma) {
  constexpr const char* kOp = "hotloop.preference_pairs_cpu";
  TORCH_CHECK_VALUE(kind >= 0 && kind < cpu::kNumPreferenceKinds, kOp, ": `kind` must be in [0, ",
                    cpu::kNumPreferenceKinds, "), got ", kind);
  cpu::PreferencePairsParams p;
  p.dtype = check_first(x_w, kOp, "x_w");
  p.B = x_w.size(0);
  p.x_w = x_w.data_ptr();
  p.x_l = pair_data(x_l, x_w, kOp, "x_l");
  p.r_w = pair_data(r_w, x_w, kOp, "r_w");
  p.r_l = pair_data(r_l, x_w, kOp, "r_l");
  p.len_w = pair_data(len_w, x_w, kOp, "len_w");
  p.len_l = pair_data(len_l, x_w, kOp, "len_l");
  p.c = pair_data(c, x_w, kOp, "c");
  p.nll = pair_data(nll, x_w, kOp, "nll");
  p.kind = static_cast<cpu::PreferenceKind>(kind);
  p.beta = beta, p.label_smoothing = label_smoothing, p.gamma = gamma;
  at::Tensor loss = at::empty({p.B}, x_w.options()), g_w = at::empty({p.B}, x_w.options());
  at::Tensor g_l = at::empty({p.B}, x_w.options()), g_nll = at::empty({p.B}, x_w.options());
  p.loss = loss.data_ptr(), p.g_w = g_w.data_ptr(), p.g_l = g_l.data_ptr(), p.g_nll = g_nll.data_ptr();
  p.num_threads = at::get_num_threads();
  cpu::preference_pairs(p);
  return {loss, g_w, g_l, g_nll};
}

std::tuple<at::Tensor, at::Tensor> kto_items_cpu(const at::Tensor& x, const at::Tensor& r, const at::Tensor& d,
                                                 const at::Tensor& kl, double beta, double desirable_weight,
                                                 double undesirable_weight) {
  constexpr const char* kOp = "hotloop.kto_items_cpu";
  cpu::KtoItemsParams p;
  p.dtype = check_first(x, kOp, "x");
  p.B = x.size(0);
  p.x = x.data_ptr();
  p.r = pair_data(r, x, kOp, "r");
  p.d = pair_data(d, x, kOp, "d");
  TORCH_CHECK_VALUE(kl.numel() == 1 && kl.device().is_cpu(), kOp, ": `kl` must be a one-element CPU tensor, got ",
                    kl.sizes(), " on ", kl.device());
  p.kl = kl.to(at::kDouble).item<double>();
  p.beta = beta, p.desirable_weight = desirable_weight, p.undesirable_weight = undesirable_weight;
  at::Tensor loss = at::empty({p.B}, x.options()), g = at::empty({p.B}, x.options());
  p.loss = loss.data_ptr(), p.g = g.data_ptr();
  p.num_threads = at::get_num_threads();
  cpu::kto_items(p);
  return {loss, g};
}

}  // namespace

const Kernels kernels("cpu", [](pybind11::module_& m) {
  m.def("preference_pairs", &preference_pairs_cpu, NoGil(),
        "preference_pairs(x_w, x_l, r_w, r_l, len_w, len_l, c, nll, kind, beta, label_smoothing, gamma) -> "
        "(per-pair loss, d loss / d x_w, d loss / d x_l, d loss / d nll), each [B]. The per-pair contract of "
        "the preference losses (reference.preference_loss.preference_pairs_ref, docs/preference_loss.md): every "
        "tensor contiguous [B], all float32 or all float64; kind: hotloop.contracts.PREFERENCE_KIND_IDS; "
        "lengths already >= 1.");
  m.def("kto_items", &kto_items_cpu, NoGil(),
        "kto_items(x, r, d, kl, beta, desirable_weight, undesirable_weight) -> (per-item loss, d loss / d x), "
        "[B]. d: 1 desirable / 0 undesirable; kl: one element, already clamped >= 0 (reference.preference_loss."
        "kto_items_ref).");
});

}  // namespace hotloop::bind
