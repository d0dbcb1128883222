// CPU implementation of hotloop::token_stats_{fwd,bwd}_cpu: tensor checks, then the plain C++ kernel.
#include <ATen/Parallel.h>

#include "../cpu/token_stats.h"
#include "tensor_checks.h"
#include "module.h"

namespace hotloop::bind {
namespace {

constexpr const char* kOp = "hotloop.token_stats";

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_stats_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& labels, double temperature, int64_t ignore_index, bool entropy,
    bool self_certainty) {
  TORCH_CHECK_VALUE(logits.device().is_cpu() && labels.device().is_cpu(), kOp, ": CPU kernel got ",
                    logits.device(), " / ", labels.device(), " tensors");
  TORCH_CHECK_VALUE(temperature > 0, kOp, ": `temperature` must be > 0, got ", temperature);
  cpu::TokenStatsFwdParams p;
  p.layout = row_layout(logits, kOp, "logits");
  TORCH_CHECK_VALUE(p.layout.V >= 1, kOp, ": `logits` has an empty vocabulary dim");
  check_labels(labels, p.layout, kOp);
  p.dtype = float_type(logits, kOp, "logits");
  const auto out_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = logits.options().dtype(out_dtype);
  const std::vector<int64_t> shape{p.layout.B, p.layout.T};
  at::Tensor lp = at::empty(shape, opts), lse = at::empty(shape, opts);
  at::Tensor ent = entropy ? at::empty(shape, opts) : at::empty({0}, opts);
  at::Tensor sc = self_certainty ? at::empty(shape, opts) : at::empty({0}, opts);
  if (p.layout.rows() == 0) return {lp, ent, sc, lse};
  p.logits = logits.data_ptr();
  p.labels = labels.data_ptr();
  p.labels_int64 = labels.scalar_type() == at::kLong;
  p.temperature = temperature;
  p.ignore_index = ignore_index;
  p.logprobs = lp.data_ptr();
  p.entropy = entropy ? ent.data_ptr() : nullptr;
  p.self_certainty = self_certainty ? sc.data_ptr() : nullptr;
  p.lse = lse.data_ptr();
  p.num_threads = at::get_num_threads();
  const int64_t bad = cpu::token_stats_fwd(p);
  if (bad >= 0) {
    const int64_t value = p.labels_int64 ? labels.data_ptr<int64_t>()[bad] : labels.data_ptr<int32_t>()[bad];
    TORCH_CHECK_VALUE(false, kOp, ": `labels` must lie in [0, ", p.layout.V, ") or equal ignore_index=",
                      ignore_index, "; found ", value, " at flat position ", bad);
  }
  return {lp, ent, sc, lse};
}

void token_stats_bwd_cpu(const at::Tensor& grad_logits, const c10::optional<at::Tensor>& grad_logprobs,
                         const c10::optional<at::Tensor>& grad_entropy,
                         const c10::optional<at::Tensor>& grad_self_certainty, const at::Tensor& logits,
                         const at::Tensor& labels, const at::Tensor& lse, const c10::optional<at::Tensor>& entropy,
                         double temperature, int64_t ignore_index, int64_t vocab_offset, int64_t vocab_total) {
  TORCH_CHECK_VALUE(logits.device().is_cpu() && grad_logits.device().is_cpu(), kOp, ": CPU kernel got ",
                    logits.device(), " tensors");
  TORCH_CHECK_VALUE(temperature > 0, kOp, ": `temperature` must be > 0, got ", temperature);
  cpu::TokenStatsBwdParams p;
  p.layout = row_layout(logits, kOp, "logits");
  p.grad_layout = row_layout(grad_logits, kOp, "grad_logits");
  TORCH_CHECK_VALUE(grad_logits.sizes() == logits.sizes() && grad_logits.scalar_type() == logits.scalar_type(),
                    kOp, ": `grad_logits` must match `logits` in shape and dtype");
  check_labels(labels, p.layout, kOp);
  p.dtype = float_type(logits, kOp, "logits");
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_rows(lse, p.layout, acc, kOp, "lse");
  p.grad_logprobs = optional_rows(grad_logprobs, p.layout, acc, kOp, "grad_logprobs");
  p.grad_entropy = optional_rows(grad_entropy, p.layout, acc, kOp, "grad_entropy");
  p.grad_self_certainty = optional_rows(grad_self_certainty, p.layout, acc, kOp, "grad_self_certainty");
  p.entropy = optional_rows(entropy, p.layout, acc, kOp, "entropy");
  TORCH_CHECK_VALUE(p.grad_entropy == nullptr || p.entropy != nullptr, kOp,
                    ": a gradient for the entropy needs the forward's entropy");
  TORCH_CHECK_VALUE(vocab_offset >= 0 && (vocab_total == 0 || vocab_total >= vocab_offset + p.layout.V), kOp,
                    ": the block [vocab_offset, vocab_offset + V) = [", vocab_offset, ", ", vocab_offset + p.layout.V,
                    ") must lie inside vocab_total = ", vocab_total);
  p.vocab_offset = vocab_offset;
  p.vocab_total = vocab_total;
  if (p.layout.rows() == 0) return;
  p.grad_logits = grad_logits.data_ptr();
  p.logits = logits.data_ptr();
  p.labels = labels.data_ptr();
  p.labels_int64 = labels.scalar_type() == at::kLong;
  p.temperature = temperature;
  p.ignore_index = ignore_index;
  p.lse = lse.data_ptr();
  p.num_threads = at::get_num_threads();
  cpu::token_stats_bwd(p);
}

}  // namespace

const Kernels kernels("cpu", [](pybind11::module_& m) {
  namespace py = pybind11;
  m.def("token_stats_fwd", &token_stats_fwd_cpu, NoGil(),
        "token_stats_fwd(logits, labels, temperature, ignore_index, entropy, self_certainty) -> (logprobs, "
        "entropy or [0], self_certainty or [0], lse). logits [B, T, V] (stride(2) == 1, any leading strides), "
        "labels [B, T] contiguous int32/int64; outputs [B, T] float32 (float64 for float64 logits).");
  m.def("token_stats_bwd", &token_stats_bwd_cpu, NoGil(), py::arg("grad_logits"), py::arg("grad_logprobs"),
        py::arg("grad_entropy"), py::arg("grad_self_certainty"), py::arg("logits"), py::arg("labels"),
        py::arg("lse"), py::arg("entropy"), py::arg("temperature"), py::arg("ignore_index"),
        py::arg("vocab_offset") = 0, py::arg("vocab_total") = 0,
        "Writes d loss / d logits into grad_logits [B, T, V] (stride(2) == 1; may be logits itself). grad_* "
        "[B, T] contiguous in the forward's output dtype, None when absent. The logits may be a block of "
        "vocabulary columns [vocab_offset, vocab_offset + V) of vocab_total (0 = V): the fused linear path's "
        "tiles.");
});

}  // namespace hotloop::bind
