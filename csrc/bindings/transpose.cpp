// CPU implementation of hotloop::transpose_add_cpu: tensor checks, then the plain C++ kernel (cpu/transpose.h).
#include <ATen/Parallel.h>

#include "../cpu/transpose.h"
#include "tensor_checks.h"
#include "module.h"

namespace hotloop::bind {
namespace {

constexpr const char* kOp = "hotloop.transpose_add";

void transpose_add_cpu(const at::Tensor& dst, const at::Tensor& src, bool accumulate) {
  TORCH_CHECK_VALUE(dst.device().is_cpu() && src.device().is_cpu(), kOp, ": CPU kernel got ", dst.device(), " / ",
                    src.device(), " tensors");
  TORCH_CHECK_VALUE(dst.dim() == 2 && src.dim() == 2 && dst.size(0) == src.size(1) && dst.size(1) == src.size(0),
                    kOp, ": `dst` [r, c] and `src` [c, r] expected, got ", dst.sizes(), " and ", src.sizes());
  TORCH_CHECK_VALUE((dst.size(1) <= 1 || dst.stride(1) == 1) && (src.size(1) <= 1 || src.stride(1) == 1), kOp,
                    ": `dst` and `src` must have unit stride along their last dim");
  cpu::TransposeAddParams p;
  p.dst_type = float_type(dst, kOp, "dst");
  p.src_type = float_type(src, kOp, "src");
  p.rows = dst.size(0), p.cols = dst.size(1);
  p.ld_dst = dst.stride(0), p.ld_src = src.stride(0);
  p.dst = dst.data_ptr();
  p.src = src.data_ptr();
  p.accumulate = accumulate;
  p.num_threads = at::get_num_threads();
  TORCH_CHECK_TYPE(cpu::transpose_add(p), kOp, ": `src` must have `dst`'s dtype (or be bfloat16 / float16 into a "
                   "float32 `dst`), got ", src.scalar_type(), " into ", dst.scalar_type());
}

}  // namespace

const Kernels kernels("cpu", [](pybind11::module_& m) {
  m.def("transpose_add", &transpose_add_cpu, NoGil(),
        "transpose_add(dst, src, accumulate): dst [r, c] = src^T (accumulate: dst += src^T), src [c, r]; unit "
        "stride along the last dims. dtypes equal, or bfloat16 / float16 src into a float32 dst. The fused "
        "linear paths' d_weight tiles (cpu/transpose.h).");
});

}  // namespace hotloop::bind
