"""docs/dino_loss.md in plain torch: the DINO loss and its centre update, as the DINO paper's code computes them.

Rows are crop-major: student_out [n_crops * B, K] is n_crops chunks of B rows (the first n_global are the
global crops), teacher_out [n_global * B, K] n_global chunks. With q_i = softmax((t_i - c) / tau_t) (no
gradient) and every pair (teacher crop i, student crop v != i):
    loss = sum_{i, v != i} mean_b[-q_i . log_softmax(s_v / tau_s)] / n_terms,   n_terms = n_global * (n_crops - 1)
(DINO's total_loss / n_loss_terms). Float32 math (float64 for float64 inputs). Memory: a softmax and a
log-softmax of every row, plus per-pair products (the eager cost the fused kernels avoid).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def dino_loss_ref(student_out: Tensor, teacher_out: Tensor, center: Tensor, n_global: int = 2, tau_s: float = 0.1,
                  tau_t: float = 0.04) -> Tensor:
    """-> 0-dim loss (float32, float64 for float64 inputs), differentiable w.r.t. student_out."""
    acc = _acc(student_out)
    B = teacher_out.shape[0] // n_global
    n_crops = student_out.shape[0] // B
    s = (student_out.to(acc) / tau_s).chunk(n_crops)
    q = F.softmax((teacher_out.detach().to(acc) - center.detach().to(acc).reshape(1, -1)) / tau_t, dim=-1)
    q = q.chunk(n_global)
    total, n_terms = 0.0, 0
    for i, qi in enumerate(q):
        for v in range(n_crops):
            if v == i:
                continue
            total = total + torch.sum(-qi * F.log_softmax(s[v], dim=-1), dim=-1).mean()
            n_terms += 1
    return total / n_terms


@torch.no_grad()
def update_center_ref(center: Tensor, teacher_out: Tensor, momentum: float = 0.9) -> Tensor:
    """c <- m c + (1 - m) mean_rows(teacher_out), the mean over every rank's rows when torch.distributed is
    initialised (row sums and row counts all-reduced together, so ranks may hold different numbers of rows).
    No rows at all (on every rank) leaves the centre as it is: there is no mean to move towards. In place, no
    host sync; returns center."""
    acc = _acc(center)
    rows = teacher_out.new_full((1,), teacher_out.shape[0], dtype=acc)
    packed = torch.cat([teacher_out.to(acc).sum(dim=0), rows])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(packed)
    total = packed[-1]
    mean = (packed[:-1] / total.clamp(min=1)).reshape(center.shape)
    moved = center.to(acc) * momentum + mean * (1.0 - momentum)
    return center.copy_(torch.where(total > 0, moved, center.to(acc)))


def dino_loss_fwd_ref(student: Tensor, teacher: Tensor, center: Tensor, n_global: int, tau_s: float, tau_t: float,
                      need_grad: bool) -> tuple[Tensor, Tensor]:
    """The reference backend's kernel of hotloop::dino_loss_fwd: (loss, d loss / d student or [0])."""
    from hotloop.reference._grads import value_and_grad

    return value_and_grad(lambda s: dino_loss_ref(s, teacher, center, n_global, tau_s, tau_t), student, need_grad)
