// CPU implementation of hotloop::ema_update_cpu: tensor-list checks, then the plain C++ kernel (one OpenMP
// region over every tensor).
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "../cpu/ema.h"
#include "tensor_checks.h"
#include "module.h"

namespace hotloop::bind {
namespace {

constexpr const char* kOp = "hotloop.ema_update_";

// A 0-dim float tensor decay on CPU is read here (no device sync involved); otherwise the float argument.
double cpu_decay(double decay, const c10::optional<at::Tensor>& decay_tensor) {
  if (!decay_tensor.has_value() || !decay_tensor->defined()) return decay;
  const at::Tensor& d = *decay_tensor;
  TORCH_CHECK_VALUE(d.device().is_cpu() && d.numel() == 1, kOp, ": `decay` tensor must be a one-element CPU ",
                    "tensor for the CPU kernel, got ", d.sizes(), " on ", d.device());
  return d.item<double>();
}

void ema_update_cpu(at::TensorList target, at::TensorList online, at::TensorList copy, double decay,
                    const c10::optional<at::Tensor>& decay_tensor) {
  TORCH_CHECK_VALUE(target.size() == online.size(), kOp, ": `target` and `online` must have the same length, got ",
                    target.size(), " and ", online.size());
  TORCH_CHECK_VALUE(copy.empty() || copy.size() == target.size(), kOp, ": `out_copy` must be empty or as long as ",
                    "`target` (", target.size(), "), got ", copy.size());
  const double d = cpu_decay(decay, decay_tensor);
  TORCH_CHECK_VALUE(d >= 0.0 && d <= 1.0, kOp, ": `decay` must lie in [0, 1], got ", d);
  std::vector<cpu::EmaTensor> items(target.size());
  for (size_t i = 0; i < target.size(); ++i) {
    const at::Tensor& t = target[i];
    const at::Tensor& s = online[i];
    TORCH_CHECK_VALUE(t.device().is_cpu() && s.device().is_cpu(), kOp, ": CPU kernel got tensors on ", t.device(),
                      " / ", s.device(), " at index ", i);
    TORCH_CHECK_VALUE(t.is_contiguous() && s.is_contiguous() && t.numel() == s.numel(), kOp,
                      ": target and online tensors must be contiguous with equal sizes, got ", t.sizes(), " and ",
                      s.sizes(), " at index ", i);
    cpu::EmaTensor& e = items[i];
    e.target = t.data_ptr();
    e.online = s.data_ptr();
    e.n = t.numel();
    e.target_dtype = float_type(t, kOp, "target");
    e.online_dtype = float_type(s, kOp, "online");
    TORCH_CHECK_TYPE(cpu::ema_supported(e.target_dtype, e.online_dtype), kOp, ": unsupported dtype pair (target ",
                     t.scalar_type(), ", online ", s.scalar_type(), ") at index ", i);
    if (!copy.empty() && !(copy[i].numel() == 0 && t.numel() != 0)) {  // an empty copy tensor: no copy here
      const at::Tensor& c = copy[i];
      TORCH_CHECK_VALUE(c.device().is_cpu() && c.is_contiguous() && c.numel() == t.numel(), kOp,
                        ": out_copy tensors must be contiguous CPU tensors sized like target, got ", c.sizes(),
                        " at index ", i);
      e.copy = c.data_ptr();
      e.copy_dtype = float_type(c, kOp, "out_copy");
      TORCH_CHECK_TYPE(e.copy_dtype != cpu::FloatType::f64 && e.target_dtype != cpu::FloatType::f64, kOp,
                       ": out_copy must be float32 / bfloat16 / float16 next to a non-float64 target, at index ",
                       i);
    }
  }
  cpu::EmaParams p;
  p.tensors = items.data();
  p.count = static_cast<int64_t>(items.size());
  p.decay = d;
  p.num_threads = at::get_num_threads();
  TORCH_CHECK_TYPE(cpu::ema_update(p), kOp, ": unsupported dtype combination");
}

}  // namespace

const Kernels kernels("cpu", [](pybind11::module_& m) {
  m.def("ema_update",
        [](const std::vector<at::Tensor>& target, const std::vector<at::Tensor>& online,
           const std::vector<at::Tensor>& copy, double decay, const c10::optional<at::Tensor>& decay_tensor) {
          ema_update_cpu(target, online, copy, decay, decay_tensor);
        },
        NoGil(),
        "ema_update(target, online, copy, decay, decay_tensor): target[i] <- d * target[i] + (1 - d) * "
        "online[i] for every i in one OpenMP region (docs/ema.md); copy (empty, or one per target) receives the "
        "new target in its own dtype. Contiguous tensors; (target, online) dtypes (f32, f32|bf16|f16), (bf16, "
        "bf16), (f16, f16), (f64, f64). decay_tensor (one float32 element) overrides decay.");
});

}  // namespace hotloop::bind
