// torch glue for the multi-tensor CUDA EMA kernel (csrc/cuda/ema.{h,cu}); compiled only in a CUDA build.
// Implements hotloop::ema_update_cuda (schema in ops.cpp): validates the lists, builds the pointer table in
// pinned host memory, copies it to the device on the current stream and launches once for every tensor.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <cstring>
#include <optional>

#include "../cuda/ema.h"
#include "cuda_device.h"
#include "module.h"

namespace {

constexpr const char* kOp = "ema_update_cuda";
constexpr int64_t kWords = sizeof(hotloop_ema_tensor) / sizeof(int64_t);  // table entry size in int64 words

int64_t dtype_code(const at::Tensor& t, const char* name, size_t i) {
  switch (t.scalar_type()) {
    case at::kFloat: return HOTLOOP_DTYPE_FLOAT32;
    case at::kBFloat16: return HOTLOOP_DTYPE_BFLOAT16;
    case at::kHalf: return HOTLOOP_DTYPE_FLOAT16;
    default: TORCH_CHECK_TYPE(false, kOp, ": ", name, "[", i, "] must be float32 / bfloat16 / float16 on CUDA, got ",
                              t.scalar_type());
  }
  return -1;
}

void ema_update_cuda(at::TensorList target, at::TensorList online, at::TensorList copy, double decay,
                     const std::optional<at::Tensor>& decay_tensor) {
  TORCH_CHECK_VALUE(target.size() == online.size(), kOp, ": target and online lengths differ (", target.size(),
                    " vs ", online.size(), ")");
  TORCH_CHECK_VALUE(copy.empty() || copy.size() == target.size(), kOp, ": copy must be empty or one per target");
  if (target.empty()) return;
  const at::Device dev = target[0].device();
  TORCH_CHECK_VALUE(dev.is_cuda(), kOp, ": tensors must be on a CUDA device, got ", dev);
  const c10::cuda::CUDAGuard guard(dev);
  const int64_t count = static_cast<int64_t>(target.size());
  const int64_t chunk = hotloop_ema_chunk_elems();

  // table: count entries of kWords int64, then count + 1 chunk starts
  at::Tensor host = at::empty({count * kWords + count + 1}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* words = host.data_ptr<int64_t>();
  int64_t* starts = words + count * kWords;
  starts[0] = 0;
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& t = target[i];
    const at::Tensor& s = online[i];
    TORCH_CHECK_VALUE(t.device() == dev && s.device() == dev, kOp, ": every tensor must be on ", dev,
                      " (index ", i, ")");
    TORCH_CHECK_VALUE(t.is_contiguous() && s.is_contiguous() && t.numel() == s.numel(), kOp,
                      ": target and online tensors must be contiguous with equal sizes (index ", i, ")");
    const int64_t tdt = dtype_code(t, "target", i), sdt = dtype_code(s, "online", i);
    TORCH_CHECK_TYPE(tdt == HOTLOOP_DTYPE_FLOAT32 || tdt == sdt, kOp, ": unsupported dtype pair (target ",
                     t.scalar_type(), ", online ", s.scalar_type(), ") at index ", i);
    hotloop_ema_tensor e{};
    e.target = reinterpret_cast<uint64_t>(t.data_ptr());
    e.online = reinterpret_cast<uint64_t>(s.data_ptr());
    e.n = t.numel();
    int64_t cdt = 0;
    if (!copy.empty() && !(copy[i].numel() == 0 && t.numel() != 0)) {  // an empty copy tensor: no copy here
      const at::Tensor& c = copy[i];
      TORCH_CHECK_VALUE(c.device() == dev && c.is_contiguous() && c.numel() == t.numel(), kOp,
                        ": copy tensors must be contiguous, on ", dev, ", sized like target (index ", i, ")");
      cdt = dtype_code(c, "copy", i);
      e.copy = reinterpret_cast<uint64_t>(c.data_ptr());
    }
    e.dtypes = tdt | (sdt << 8) | (cdt << 16);
    std::memcpy(words + i * kWords, &e, sizeof(e));
    starts[i + 1] = starts[i] + (e.n + chunk - 1) / chunk;
  }

  hotloop_ema_params p{};
  p.count = count;
  p.total_chunks = starts[count];
  p.chunk = chunk;
  p.decay = static_cast<float>(decay);
  at::Tensor d;
  if (decay_tensor.has_value() && decay_tensor->defined()) {
    d = decay_tensor->to(dev, at::kFloat).contiguous();
    TORCH_CHECK_VALUE(d.numel() == 1, kOp, ": decay_tensor must have one element, got ", d.sizes());
    p.decay_ptr = d.data_ptr<float>();
  } else {
    TORCH_CHECK_VALUE(decay >= 0.0 && decay <= 1.0, kOp, ": decay must lie in [0, 1], got ", decay);
  }
  if (p.total_chunks == 0) return;
  // stream-ordered: the pinned buffer is released to the caching host allocator only after this copy completes,
  // and the device table's memory is reused only by work ordered after the kernel on this stream
  at::Tensor table = host.to(dev, /*non_blocking=*/true);
  p.table = reinterpret_cast<const hotloop_ema_tensor*>(table.data_ptr<int64_t>());
  p.num_sms = hotloop::bind::current_sm_count();
  const cudaError_t err = hotloop_ema_update(&p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, kOp, ": CUDA kernel launch failed: ", cudaGetErrorString(err), " (", count,
              " tensors)");
}

}  // namespace

const hotloop::bind::Kernels kernels("cuda", [](pybind11::module_& m) {
  m.def("ema_update",
        [](const std::vector<at::Tensor>& target, const std::vector<at::Tensor>& online,
           const std::vector<at::Tensor>& copy, double decay, const c10::optional<at::Tensor>& decay_tensor) {
          ema_update_cuda(target, online, copy, decay, decay_tensor);
        },
        hotloop::bind::NoGil(),
        "ema_update(target, online, copy, decay, decay_tensor): as hotloop._C.cpu.ema_update in one launch; "
        "decay_tensor is read on the device.");
});
