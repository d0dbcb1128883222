// torch glue for the CUDA token_stats kernels (csrc/cuda/token_stats.{h,cu}); compiled only in a CUDA build.
// Implements the schemas declared in ops.cpp: validates tensors, picks the device / stream, fills the C ABI
// params and turns a failed launch into a Python RuntimeError.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdlib>
#include <optional>
#include <tuple>

#include "../cuda/token_stats.h"
#include "cuda_device.h"
#include "module.h"

namespace {

constexpr int64_t kMaxV = int64_t{1} << 30;

int32_t logits_dtype_code(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return HOTLOOP_DTYPE_FLOAT32;
    case at::kBFloat16: return HOTLOOP_DTYPE_BFLOAT16;
    case at::kHalf: return HOTLOOP_DTYPE_FLOAT16;
    default: TORCH_CHECK(false, op, ": logits must be float32, bfloat16 or float16 on CUDA, got ", t.scalar_type());
  }
  return -1;
}

int32_t labels_dtype_code(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op,
              ": labels must be int32 or int64, got ", t.scalar_type());
  return t.scalar_type() == at::kLong ? HOTLOOP_DTYPE_INT64 : HOTLOOP_DTYPE_INT32;
}

// logits [B, T, V] with a unit-stride vocabulary; labels [B, T] contiguous on the same device.
void check_logits_labels(const at::Tensor& logits, const at::Tensor& labels, const char* op) {
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got device ", logits.device());
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be [B, T, V], got ", logits.sizes());
  TORCH_CHECK(logits.stride(2) == 1 || logits.size(2) <= 1, op,
              ": logits must have a unit stride along the vocabulary, got strides ", logits.strides());
  TORCH_CHECK(logits.size(2) > 0 && logits.size(2) <= kMaxV, op, ": vocabulary size must be in [1, 2^30], got ",
              logits.size(2));
  TORCH_CHECK(labels.device() == logits.device(), op, ": labels (", labels.device(), ") and logits (",
              logits.device(), ") must be on the same device");
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == logits.size(0) && labels.size(1) == logits.size(1), op,
              ": labels must be [B, T] = ", logits.sizes().slice(0, 2), ", got ", labels.sizes());
  TORCH_CHECK(labels.is_contiguous(), op, ": labels must be contiguous");
  TORCH_CHECK(logits.size(0) * logits.size(1) < (int64_t{1} << 31), op, ": B * T must be < 2^31, got ",
              logits.size(0) * logits.size(1));
}

// [B, T] float32 contiguous per-row tensor on logits' device (lse, entropy, upstream grads).
void check_row_tensor(const at::Tensor& t, const at::Tensor& logits, const char* op, const char* name) {
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " must be on ", logits.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(t.numel() == logits.size(0) * logits.size(1), op, ": ", name, " must have B * T = ",
              logits.size(0) * logits.size(1), " elements, got shape ", t.sizes());
}

void check_temperature(double temperature, const char* op) {
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), op, ": temperature must be finite and > 0, got ",
              temperature);
}

const float* optional_row_ptr(const std::optional<at::Tensor>& t, const at::Tensor& logits, const char* op,
                              const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_row_tensor(*t, logits, op, name);
  return t->data_ptr<float>();
}

// Test hook: HOTLOOP_TOKEN_STATS_SPLITS=k forces k vocabulary splits in the forward (0 / unset: automatic).
int32_t forced_splits() {
  const char* s = std::getenv("HOTLOOP_TOKEN_STATS_SPLITS");
  if (s == nullptr || *s == '\0') return 0;
  const long k = std::strtol(s, nullptr, 10);
  return k > 0 ? static_cast<int32_t>(k < 1024 ? k : 1024) : 0;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_stats_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& labels, double temperature, int64_t ignore_index, bool entropy,
    bool self_certainty) {
  constexpr const char* op = "token_stats_fwd_cuda";
  check_logits_labels(logits, labels, op);
  check_temperature(temperature, op);
  const int32_t ldt = logits_dtype_code(logits, op);
  const int32_t idt = labels_dtype_code(labels, op);

  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  const auto fopts = logits.options().dtype(at::kFloat);
  at::Tensor lp = at::empty({B, T}, fopts);
  at::Tensor lse = at::empty({B, T}, fopts);
  at::Tensor ent = entropy ? at::empty({B, T}, fopts) : at::empty({0}, fopts);
  at::Tensor sc = self_certainty ? at::empty({B, T}, fopts) : at::empty({0}, fopts);
  if (B * T == 0) return {lp, ent, sc, lse};

  hotloop_token_stats_fwd_params p{};
  p.B = B;
  p.T = T;
  p.V = V;
  p.logits = logits.data_ptr();
  p.logits_stride_b = logits.stride(0);
  p.logits_stride_t = logits.stride(1);
  p.logits_dtype = ldt;
  p.labels = labels.data_ptr();
  p.labels_dtype = idt;
  p.temperature = static_cast<float>(temperature);
  p.ignore_index = ignore_index;
  p.logprobs = lp.data_ptr<float>();
  p.entropy = entropy ? ent.data_ptr<float>() : nullptr;
  p.self_certainty = self_certainty ? sc.data_ptr<float>() : nullptr;
  p.lse = lse.data_ptr<float>();
  p.num_sms = hotloop::bind::current_sm_count();
  p.force_splits = forced_splits();

  // Stream-ordered caching-allocator block: freeing it when this function returns is safe, later users of the
  // block are ordered after the kernels on the same stream.
  at::Tensor workspace;
  const int64_t ws_bytes = hotloop_token_stats_fwd_workspace_bytes(&p);
  if (ws_bytes > 0) {
    workspace = at::empty({ws_bytes}, logits.options().dtype(at::kByte));
    p.workspace = workspace.data_ptr();
    p.workspace_bytes = ws_bytes;
  }

  const cudaError_t err = hotloop_token_stats_fwd(&p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err), " (B=", B,
              ", T=", T, ", V=", V, ", dtype=", logits.scalar_type(), ")");
  return {lp, ent, sc, lse};
}

void token_stats_bwd_cuda(const at::Tensor& grad_logits, const std::optional<at::Tensor>& grad_logprobs,
                          const std::optional<at::Tensor>& grad_entropy,
                          const std::optional<at::Tensor>& grad_self_certainty, const at::Tensor& logits,
                          const at::Tensor& labels, const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                          double temperature, int64_t ignore_index) {
  constexpr const char* op = "token_stats_bwd_cuda";
  check_logits_labels(logits, labels, op);
  check_temperature(temperature, op);
  const int32_t ldt = logits_dtype_code(logits, op);
  const int32_t idt = labels_dtype_code(labels, op);

  TORCH_CHECK(grad_logits.device() == logits.device(), op, ": grad_logits must be on ", logits.device(), ", got ",
              grad_logits.device());
  TORCH_CHECK(grad_logits.scalar_type() == logits.scalar_type(), op, ": grad_logits must have logits' dtype ",
              logits.scalar_type(), ", got ", grad_logits.scalar_type());
  TORCH_CHECK(grad_logits.sizes() == logits.sizes(), op, ": grad_logits must be ", logits.sizes(), ", got ",
              grad_logits.sizes());
  TORCH_CHECK(grad_logits.stride(2) == 1 || grad_logits.size(2) <= 1, op,
              ": grad_logits must have a unit stride along the vocabulary, got strides ", grad_logits.strides());
  TORCH_CHECK(at::has_internal_overlap(grad_logits) != at::MemOverlap::Yes, op,
              ": grad_logits must not have overlapping elements (e.g. expanded / stride-0 dims)");
  // In place means the very same elements; any other overlap would let one thread read what another wrote.
  if (grad_logits.data_ptr() == logits.data_ptr()) {
    TORCH_CHECK(grad_logits.strides() == logits.strides(), op,
                ": an in-place grad_logits must have logits' strides, got ", grad_logits.strides(), " vs ",
                logits.strides());
  } else {
    const auto status = at::get_overlap_status(grad_logits, logits);
    TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, op,
                ": grad_logits partially overlaps logits; pass the logits tensor itself for an in-place backward");
  }

  const c10::cuda::CUDAGuard guard(logits.device());
  check_row_tensor(lse, logits, op, "lse");
  const float* g_lp = optional_row_ptr(grad_logprobs, logits, op, "grad_logprobs");
  const float* g_h = optional_row_ptr(grad_entropy, logits, op, "grad_entropy");
  const float* g_sc = optional_row_ptr(grad_self_certainty, logits, op, "grad_self_certainty");
  const float* ent = nullptr;
  if (g_h != nullptr) {
    TORCH_CHECK(entropy.has_value() && entropy->defined(), op,
                ": grad_entropy needs the entropy saved by the forward (entropy=True)");
    ent = optional_row_ptr(entropy, logits, op, "entropy");
  }

  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  if (B * T == 0) return;

  hotloop_token_stats_bwd_params p{};
  p.B = B;
  p.T = T;
  p.V = V;
  p.grad_logits = grad_logits.data_ptr();
  p.grad_stride_b = grad_logits.stride(0);
  p.grad_stride_t = grad_logits.stride(1);
  p.logits = logits.data_ptr();
  p.logits_stride_b = logits.stride(0);
  p.logits_stride_t = logits.stride(1);
  p.logits_dtype = ldt;
  p.labels = labels.data_ptr();
  p.labels_dtype = idt;
  p.temperature = static_cast<float>(temperature);
  p.ignore_index = ignore_index;
  p.grad_logprobs = g_lp;
  p.grad_entropy = g_h;
  p.grad_self_certainty = g_sc;
  p.lse = lse.data_ptr<float>();
  p.entropy = ent;
  p.num_sms = hotloop::bind::current_sm_count();

  const cudaError_t err = hotloop_token_stats_bwd(&p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err), " (B=", B,
              ", T=", T, ", V=", V, ", dtype=", logits.scalar_type(), ")");
}

}  // namespace

const hotloop::bind::Kernels kernels("cuda", [](pybind11::module_& m) {
  using hotloop::bind::NoGil;
  m.def("token_stats_fwd", &token_stats_fwd_cuda, NoGil(),
        "token_stats_fwd(logits, labels, temperature, ignore_index, entropy, self_certainty): as "
        "hotloop._C.cpu.token_stats_fwd, float32 / bfloat16 / float16 logits on one CUDA device.");
  m.def("token_stats_bwd", &token_stats_bwd_cuda, NoGil(),
        "token_stats_bwd(grad_logits, grad_logprobs, grad_entropy, grad_self_certainty, logits, labels, lse, "
        "entropy, temperature, ignore_index): as hotloop._C.cpu.token_stats_bwd without vocabulary blocks.");
});
