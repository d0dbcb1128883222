"""DINO loss (docs/dino_loss.md): teacher softmax((t - c) / tau_t) against student log_softmax(s / tau_s) over K
prototypes, every (teacher crop, other student crop) pair, fused per row, with its gradient; and the centre update.

Layers, outermost first:
  dino_loss               public API: checks; attaches the gradient the kernel computed in the
                          forward to the loss (hotloop::attach_grads), so backward is one scalar multiply
  hotloop::dino_loss_fwd  custom op (fake kernel) -> (loss, d loss / d student)
  kernels                 dispatch.kernel: reference.dino_loss (the spec), hotloop._C.cpu.dino_loss (OpenMP
                          over images, vectorised exp), triton_kernels.dino_loss (CUDA, or CPU under the
                          interpreter)

Per image, each student row is streamed with an online log-sum-exp and one dot product with the sum of the
teacher softmaxes it is paired with (m_v lse - r_v . s'); its gradient (m_v softmax(s') - r_v) / tau_s is
written in the same call. Memory: the gradient (student's shape and dtype) plus, on GPU, the teacher softmaxes.
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from hotloop._internal import dispatch
from hotloop._internal.checks import FLOAT_DTYPES, check_positive, check_same_device, check_tensor
from hotloop._internal.attach_grads import loss_with_grads
from hotloop.reference.dino_loss import dino_loss_fwd_ref, update_center_ref

_OP = "dino_loss"
dispatch.register("dino_loss_fwd", "reference", dino_loss_fwd_ref)
dispatch.register("dino_loss_fwd", "cpu", dispatch.extension("cpu", "dino_loss"))
dispatch.register("dino_loss_fwd", "triton", "hotloop.triton_kernels.dino_loss:dino_loss_fwd_triton")


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.custom_op("hotloop::dino_loss_fwd", mutates_args=())
def dino_loss_fwd(student: Tensor, teacher: Tensor, center: Tensor, n_global: int, tau_s: float, tau_t: float,
                  need_grad: bool) -> tuple[Tensor, Tensor]:
    """student [n_crops*B, K], teacher [n_global*B, K], center [K] (accumulation dtype), contiguous ->
    (loss [] float32 / float64, d loss / d student in student's shape and dtype, or [0] without need_grad)."""
    return dispatch.kernel("dino_loss_fwd", student.device)(student, teacher, center, n_global, tau_s, tau_t,
                                                            need_grad)


@dino_loss_fwd.register_fake
def _(student, teacher, center, n_global, tau_s, tau_t, need_grad):
    loss = student.new_empty((), dtype=_acc(student))
    return loss, student.new_empty(student.shape if need_grad else (0,))


def _check(student_out: Tensor, teacher_out: Tensor, center: Tensor, n_global: object) -> tuple[int, int]:
    """-> (B, n_crops); raises naming the argument."""
    check_tensor(_OP, "student_out", student_out, dtypes=FLOAT_DTYPES)
    check_tensor(_OP, "teacher_out", teacher_out, dtypes=FLOAT_DTYPES)
    check_tensor(_OP, "center", center, dtypes=FLOAT_DTYPES)
    check_same_device(_OP, student_out=student_out, teacher_out=teacher_out, center=center)
    if isinstance(n_global, bool) or not isinstance(n_global, numbers.Integral) or n_global < 1:
        raise ValueError(f"hotloop.{_OP}: `n_global` must be an int >= 1, got {n_global!r}")
    if student_out.dim() != 2 or teacher_out.dim() != 2:
        raise ValueError(f"hotloop.{_OP}: `student_out` [n_crops * B, K] and `teacher_out` [n_global * B, K] must be "
                         f"2-D, got {tuple(student_out.shape)} and {tuple(teacher_out.shape)}")
    K = student_out.shape[1]
    if teacher_out.shape[1] != K or center.numel() != K or K == 0:
        raise ValueError(f"hotloop.{_OP}: K must agree: `student_out` {tuple(student_out.shape)}, `teacher_out` "
                         f"{tuple(teacher_out.shape)}, `center` {tuple(center.shape)} (K >= 1)")
    if teacher_out.shape[0] % n_global or teacher_out.shape[0] == 0:
        raise ValueError(f"hotloop.{_OP}: `teacher_out` rows ({teacher_out.shape[0]}) must be n_global * B with "
                         f"n_global={n_global}, B >= 1")
    B = teacher_out.shape[0] // n_global
    n_crops = student_out.shape[0] // B
    if student_out.shape[0] % B or n_crops < n_global or n_crops < 2:
        raise ValueError(f"hotloop.{_OP}: `student_out` rows ({student_out.shape[0]}) must be n_crops * B with "
                         f"B={B} and n_crops >= max(n_global, 2) (the first n_global crops are the global ones)")
    if student_out.dtype != teacher_out.dtype:
        raise TypeError(f"hotloop.{_OP}: `teacher_out` dtype {teacher_out.dtype} differs from `student_out` dtype "
                        f"{student_out.dtype}")
    if student_out.dtype == torch.float64 and student_out.device.type != "cpu":
        raise TypeError(f"hotloop.{_OP}: float64 inputs are supported on CPU only")
    return B, n_crops


def dino_loss(student_out: Tensor, teacher_out: Tensor, center: Tensor, *, n_global: int = 2, tau_s: float = 0.1,
              tau_t: float = 0.04) -> Tensor:
    """DINO's cross-entropy between the centred, sharpened teacher and the student, over every pair of a teacher
    crop and a different student crop, averaged as DINO's code does (total / n_loss_terms).

    Args:
        student_out: [n_crops * B, K] float32 / bfloat16 / float16 (float64 on CPU), crop-major (rows v*B .. v*B+B-1
            are crop v; the first n_global crops are the global views the teacher also saw). Gets a gradient.
        teacher_out: [n_global * B, K], same dtype, crop-major; no gradient flows into it.
        center: [K] (or [1, K]) running centre of the teacher outputs (see update_center_); no gradient.
        n_global: number of teacher (global) crops; tau_s, tau_t: temperatures > 0 (DINO: 0.1, 0.04..0.07).

    Returns:
        0-dim float32 loss (float64 for float64 inputs). Its gradient w.r.t. student_out, computed in the same
        pass, has student_out's dtype; one backward per call.
    """
    _check(student_out, teacher_out, center, n_global)
    tau_s = check_positive(_OP, "tau_s", tau_s)
    tau_t = check_positive(_OP, "tau_t", tau_t)
    dispatch.backend("dino_loss_fwd", student_out.device)  # a bad HOTLOOP_BACKEND fails here, before any work
    need_grad = student_out.requires_grad and torch.is_grad_enabled()
    c = center.detach().reshape(-1).to(_acc(student_out)).contiguous()
    loss, grad = dino_loss_fwd(student_out.detach().contiguous(), teacher_out.detach().contiguous(), c,
                               int(n_global), tau_s, tau_t, need_grad)
    return loss_with_grads(loss, [(student_out, grad)])


def update_center_(center: Tensor, teacher_out: Tensor, momentum: float = 0.9) -> Tensor:
    """DINO's centre update in place: c <- m c + (1 - m) mean_rows(teacher_out); returns center.

    center: [K] or [1, K] float; teacher_out: [rows, K]. When torch.distributed is initialised the row sums and
    counts are all-reduced, so every rank gets the mean over all ranks' rows (as DINO does; ranks may hold
    different numbers of rows). No rows on any rank leaves the centre unchanged.
    momentum in [0, 1]. No host sync; teacher_out carries no gradient here.
    """
    check_tensor(_OP, "center", center, dtypes=FLOAT_DTYPES)
    check_tensor(_OP, "teacher_out", teacher_out, dtypes=FLOAT_DTYPES)
    check_same_device(_OP, center=center, teacher_out=teacher_out)
    if teacher_out.dim() != 2 or center.numel() != teacher_out.shape[1]:
        raise ValueError(f"hotloop.update_center_: `teacher_out` must be [rows, K] with K = center.numel() = "
                         f"{center.numel()}, got {tuple(teacher_out.shape)}")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"hotloop.update_center_: `momentum` must be a number in [0, 1], got {momentum!r}")
    return update_center_ref(center, teacher_out.detach(), float(momentum))
