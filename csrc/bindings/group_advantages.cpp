// CPU implementation of hotloop::group_advantages_cpu: tensor checks, then the plain C++ kernel.
#include <ATen/Parallel.h>

#include <cmath>
#include <string>

#include "../cpu/group_advantages.h"
#include "tensor_checks.h"
#include "module.h"

namespace hotloop::bind {
namespace {

constexpr const char* kOp = "hotloop.group_advantages";

cpu::AdvantageKind parse_kind(const std::string& kind) {
  if (kind == "grpo") return cpu::AdvantageKind::grpo;
  if (kind == "dr_grpo") return cpu::AdvantageKind::dr_grpo;
  if (kind == "rloo") return cpu::AdvantageKind::rloo;
  if (kind == "reinforce_pp_baseline") return cpu::AdvantageKind::reinforce_pp_baseline;
  if (kind == "passk") return cpu::AdvantageKind::passk;
  TORCH_CHECK_VALUE(false, kOp, ": `kind` must be one of grpo, dr_grpo, rloo, reinforce_pp_baseline, passk; got '",
                    kind, "'");
}

cpu::AdvantageScale parse_scale(const std::string& scale) {
  if (scale == "group") return cpu::AdvantageScale::group;
  if (scale == "batch") return cpu::AdvantageScale::batch;
  if (scale == "none") return cpu::AdvantageScale::none;
  TORCH_CHECK_VALUE(false, kOp, ": `scale` must be one of group, batch, none; got '", scale, "'");
}

at::Tensor group_advantages_cpu(const at::Tensor& rewards, const c10::optional<at::Tensor>& group_index,
                                int64_t group_size, c10::string_view kind, c10::string_view scale, double eps) {
  TORCH_CHECK_VALUE(rewards.device().is_cpu(), kOp, ": CPU kernel got ", rewards.device(), " rewards");
  TORCH_CHECK_VALUE(rewards.dim() == 1 && rewards.is_contiguous(), kOp, ": `rewards` must be contiguous [R], got ",
                    rewards.sizes());
  TORCH_CHECK_VALUE(eps > 0 && std::isfinite(eps), kOp, ": `eps` must be a finite number > 0, got ", eps);
  cpu::GroupAdvantagesParams p;
  p.dtype = float_type(rewards, kOp, "rewards");
  p.R = rewards.size(0);
  p.kind = parse_kind(std::string(kind));
  p.scale = parse_scale(std::string(scale));
  p.eps = eps;
  const bool ragged = group_index.has_value() && group_index->defined();
  TORCH_CHECK_VALUE(ragged != (group_size > 0), kOp,
                    ": give exactly one of `group_size` (> 0) and `group_index`; got group_size=", group_size,
                    ragged ? " and a group_index" : " and no group_index");
  if (ragged) {
    const at::Tensor& idx = *group_index;
    TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, kOp,
                     ": `group_index` must be int64 or int32, got ", idx.scalar_type());
    TORCH_CHECK_VALUE(idx.device().is_cpu() && idx.dim() == 1 && idx.size(0) == p.R && idx.is_contiguous(), kOp,
                      ": `group_index` must be a contiguous CPU [R] = [", p.R, "] tensor, got ", idx.sizes(),
                      " on ", idx.device());
    p.group_index = idx.data_ptr();
    p.index_int64 = idx.scalar_type() == at::kLong;
  } else {
    TORCH_CHECK_VALUE(p.R % group_size == 0, kOp, ": `group_size`=", group_size, " must divide the number of ",
                      "rewards R=", p.R);
    p.group_size = group_size;
  }
  at::Tensor out = at::empty({p.R}, rewards.options().dtype(rewards.scalar_type() == at::kDouble ? at::kDouble
                                                                                                  : at::kFloat));
  p.rewards = rewards.data_ptr();
  p.out = out.data_ptr();
  p.num_threads = at::get_num_threads();
  const int64_t bad = cpu::group_advantages(p);
  if (bad >= 0) {
    const int64_t value = p.index_int64 ? group_index->data_ptr<int64_t>()[bad] : group_index->data_ptr<int32_t>()[bad];
    TORCH_CHECK_VALUE(false, kOp, ": `group_index` values must lie in [0, R) = [0, ", p.R, "); found ", value,
                      " at position ", bad);
  }
  return out;
}

}  // namespace

const Kernels kernels("cpu", [](pybind11::module_& m) {
  m.def("group_advantages", &group_advantages_cpu, NoGil(),
        "group_advantages(rewards, group_index, group_size, kind, scale, eps) -> advantages [R] float32 (float64 "
        "for float64 rewards). rewards [R] contiguous float; exactly one of group_size > 0 (fixed groups of "
        "adjacent responses, R % group_size == 0) and group_index [R] int32/int64 in [0, R) (ragged). kind and "
        "scale: hotloop.contracts.ADVANTAGE_KINDS / ADVANTAGE_SCALES (docs/group_advantages.md).");
});

}  // namespace hotloop::bind
