// torch glue for the CUDA knn kernels (csrc/cuda/knn.{h,cu}); compiled only in a CUDA build. Implements the
// knn_cuda schema declared in ops.cpp: validates tensors, picks the device / stream, fills the C ABI params.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "../cuda/knn.h"
#include "cuda_device.h"
#include "module.h"

namespace {

constexpr const char* kOp = "knn_cuda";

int32_t dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return HOTLOOP_DTYPE_FLOAT32;
    case at::kBFloat16: return HOTLOOP_DTYPE_BFLOAT16;
    case at::kHalf: return HOTLOOP_DTYPE_FLOAT16;
    default: TORCH_CHECK_TYPE(false, kOp, ": keys must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return -1;
}

int32_t metric_code(const std::string& metric) {
  if (metric == "l2") return HOTLOOP_KNN_L2;
  if (metric == "ip") return HOTLOOP_KNN_IP;
  if (metric == "cosine") return HOTLOOP_KNN_COSINE;
  TORCH_CHECK_VALUE(false, kOp, ": metric must be one of l2, ip, cosine; got '", metric, "'");
  return -1;
}

// Test hook: HOTLOOP_KNN_SPLITS=s forces s key splits (0 / unset: automatic).
int32_t forced_splits() {
  const char* s = std::getenv("HOTLOOP_KNN_SPLITS");
  if (s == nullptr || *s == '\0') return 0;
  const long v = std::strtol(s, nullptr, 10);
  return v > 0 ? static_cast<int32_t>(v < 4096 ? v : 4096) : 0;
}

// query_block / key_block are CPU tiling knobs; the CUDA kernel has fixed tiles and ignores them.
std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& queries, const at::Tensor& keys, int64_t k,
                                            c10::string_view metric, const std::optional<at::Tensor>& valid,
                                            int64_t /*query_block*/, int64_t /*key_block*/) {
  TORCH_CHECK_VALUE(queries.is_cuda() && keys.device() == queries.device(), kOp,
                    ": queries and keys must be on one CUDA device, got ", queries.device(), " and ", keys.device());
  TORCH_CHECK_VALUE(queries.dim() == 2 && keys.dim() == 2 && queries.size(1) == keys.size(1), kOp,
                    ": queries must be [Q, d] and keys [M, d], got ", queries.sizes(), " and ", keys.sizes());
  TORCH_CHECK_TYPE(queries.scalar_type() == keys.scalar_type(), kOp, ": queries and keys must share a dtype");
  const int64_t Q = queries.size(0), M = keys.size(0), d = keys.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= M, kOp, ": k must lie in [1, M] = [1, ", M, "], got ", k);
  TORCH_CHECK_VALUE(d >= 1, kOp, ": d must be >= 1");
  const c10::cuda::CUDAGuard guard(queries.device());
  const at::Tensor q = queries.contiguous(), x = keys.contiguous();
  at::Tensor v;
  if (valid.has_value() && valid->defined()) {
    TORCH_CHECK_VALUE(valid->scalar_type() == at::kBool && valid->dim() == 1 && valid->size(0) == M &&
                          valid->device() == queries.device(), kOp, ": valid must be a bool [M] tensor on ",
                      queries.device());
    v = valid->contiguous();
  }
  at::Tensor scores = at::empty({Q, k}, q.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({Q, k}, q.options().dtype(at::kLong));
  if (Q == 0) return {scores, indices};

  hotloop_knn_params p{};
  p.Q = Q, p.M = M, p.d = d, p.k = k;
  p.queries = q.data_ptr();
  p.keys = x.data_ptr();
  p.dtype = dtype_code(x);
  p.metric = metric_code(std::string(metric));
  p.valid = v.defined() ? reinterpret_cast<const uint8_t*>(v.data_ptr<bool>()) : nullptr;
  p.scores = scores.data_ptr<float>();
  p.indices = indices.data_ptr<int64_t>();
  p.num_sms = hotloop::bind::current_sm_count();
  p.force_splits = forced_splits();
  // stream-ordered caching-allocator block: freeing it on return is safe, later users are ordered after us
  const int64_t ws_bytes = hotloop_knn_workspace_bytes(&p);
  at::Tensor workspace = at::empty({ws_bytes}, q.options().dtype(at::kByte));
  p.workspace = workspace.data_ptr();
  p.workspace_bytes = ws_bytes;
  const cudaError_t err = hotloop_knn(&p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, kOp, ": CUDA kernel launch failed: ", cudaGetErrorString(err), " (Q=", Q, ", M=", M,
              ", d=", d, ", k=", k, ")");
  return {scores, indices};
}

}  // namespace

const hotloop::bind::Kernels kernels("cuda", [](pybind11::module_& m) {
  namespace py = pybind11;
  m.def("knn", &knn_cuda, hotloop::bind::NoGil(), py::arg("queries"), py::arg("keys"), py::arg("k"),
        py::arg("metric"), py::arg("valid"), py::arg("query_block") = 0, py::arg("key_block") = 0,
        "knn(queries, keys, k, metric, valid, query_block=0, key_block=0): as hotloop._C.cpu.knn on CUDA.");
});
