// CPU implementation of hotloop::dino_loss_cpu: tensor checks, then the plain C++ kernel.
#include <ATen/Parallel.h>

#include <cmath>
#include <tuple>

#include "../cpu/dino_loss.h"
#include "tensor_checks.h"
#include "module.h"

namespace hotloop::bind {
namespace {

constexpr const char* kOp = "hotloop.dino_loss";

std::tuple<at::Tensor, at::Tensor> dino_loss_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                 const at::Tensor& center, int64_t n_global, double tau_s,
                                                 double tau_t, bool need_grad) {
  TORCH_CHECK_VALUE(student.device().is_cpu() && teacher.device().is_cpu() && center.device().is_cpu(), kOp,
                    ": CPU kernel got tensors on another device");
  TORCH_CHECK_VALUE(student.dim() == 2 && teacher.dim() == 2 && student.is_contiguous() && teacher.is_contiguous(),
                    kOp, ": `student_out` / `teacher_out` must be contiguous 2-D, got ", student.sizes(), " and ",
                    teacher.sizes());
  const int64_t K = student.size(1);
  TORCH_CHECK_VALUE(teacher.size(1) == K && center.numel() == K && center.is_contiguous(), kOp,
                    ": K differs: student ", student.sizes(), ", teacher ", teacher.sizes(), ", center ",
                    center.sizes());
  TORCH_CHECK_VALUE(n_global >= 1 && teacher.size(0) % n_global == 0, kOp, ": `n_global`=", n_global,
                    " must divide the teacher rows ", teacher.size(0));
  const int64_t B = teacher.size(0) / n_global;
  TORCH_CHECK_VALUE(B >= 1 && student.size(0) % B == 0 && student.size(0) / B >= n_global && K >= 1, kOp,
                    ": student rows ", student.size(0), " must be n_crops * B with B = ", B,
                    " and n_crops >= n_global");
  const int64_t n_crops = student.size(0) / B;
  TORCH_CHECK_VALUE(n_global * n_crops - n_global >= 1, kOp, ": no (teacher crop, other student crop) pair");
  TORCH_CHECK_VALUE(tau_s > 0 && std::isfinite(tau_s) && tau_t > 0 && std::isfinite(tau_t), kOp,
                    ": temperatures must be finite and > 0");
  TORCH_CHECK_TYPE(teacher.scalar_type() == student.scalar_type(), kOp, ": teacher dtype ", teacher.scalar_type(),
                   " differs from student dtype ", student.scalar_type());
  const bool f64 = student.scalar_type() == at::kDouble;
  TORCH_CHECK_TYPE(center.scalar_type() == (f64 ? at::kDouble : at::kFloat), kOp, ": `center` must be ",
                   f64 ? "float64" : "float32", ", got ", center.scalar_type());
  cpu::DinoLossParams p;
  p.dtype = float_type(student, kOp, "student_out");
  p.student = student.data_ptr();
  p.teacher = teacher.data_ptr();
  p.center = center.data_ptr();
  p.B = B, p.K = K, p.n_crops = n_crops, p.n_global = n_global;
  p.tau_s = tau_s, p.tau_t = tau_t;
  at::Tensor loss = at::empty({}, student.options().dtype(f64 ? at::kDouble : at::kFloat));
  at::Tensor grad = need_grad ? at::empty_like(student) : at::empty({0}, student.options());
  p.loss = loss.data_ptr();
  p.grad_student = need_grad ? grad.data_ptr() : nullptr;
  p.num_threads = at::get_num_threads();
  cpu::dino_loss(p);
  return {loss, grad};
}

}  // namespace

const Kernels kernels("cpu", [](pybind11::module_& m) {
  m.def("dino_loss", &dino_loss_cpu, NoGil(),
        "dino_loss(student, teacher, center, n_global, tau_s, tau_t, need_grad) -> (loss [] float32 (float64 for "
        "float64), d loss / d student (student's shape and dtype; [0] when need_grad is false)). student "
        "[n_crops * B, K], teacher [n_global * B, K] (crop-major rows), center [K] float32, all contiguous "
        "(docs/dino_loss.md).");
});

}  // namespace hotloop::bind
