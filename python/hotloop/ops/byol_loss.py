"""BYOL / SPR prediction loss (docs/byol_loss.md): mean over rows of 2 - 2 cos(p, stopgrad(z)), loss and d/dp in one pass.

Layers, outermost first:
  byol_loss               public API: checks; attaches the gradient computed in the forward to
                          the loss (hotloop::attach_grads)
  hotloop::byol_loss_fwd  custom op (fake kernel) -> (loss, d loss / d p)
  kernels                 dispatch.kernel: reference.byol_loss (the spec), cpu.byol_loss (a torch expression:
                          the op is three row reductions), triton_kernels.byol_loss (CUDA, or CPU under the
                          interpreter)
"""
from __future__ import annotations

import torch
from torch import Tensor

from hotloop._internal import dispatch
from hotloop._internal.checks import FLOAT_DTYPES, check_same_device, check_tensor
from hotloop._internal.attach_grads import loss_with_grads
from hotloop.cpu.byol_loss import byol_loss_fwd_cpu
from hotloop.reference.byol_loss import byol_loss_fwd_ref

_OP = "byol_loss"
dispatch.register("byol_loss_fwd", "reference", byol_loss_fwd_ref)
dispatch.register("byol_loss_fwd", "cpu", byol_loss_fwd_cpu)
dispatch.register("byol_loss_fwd", "triton", "hotloop.triton_kernels.byol_loss:byol_loss_fwd_triton")


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.custom_op("hotloop::byol_loss_fwd", mutates_args=())
def byol_loss_fwd(p: Tensor, z: Tensor, need_grad: bool) -> tuple[Tensor, Tensor]:
    """p, z contiguous [N, D] -> (loss [] float32 / float64, d loss / d p [N, D] in p's dtype, or [0])."""
    return dispatch.kernel("byol_loss_fwd", p.device)(p, z, need_grad)


@byol_loss_fwd.register_fake
def _(p, z, need_grad):
    return p.new_empty((), dtype=_acc(p)), p.new_empty(p.shape if need_grad else (0,))


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's regression loss: mean over rows of 2 - 2 cos(p, z) = ||p/|p| - z/|z|||^2, z detached.

    Args:
        p: [..., D] online predictions, float32 / bfloat16 / float16 (float64 on CPU); gets a gradient.
        z: [..., D] target projections (the EMA teacher's), same shape; no gradient flows into it.
    Returns:
        0-dim float32 loss (float64 for float64 p). Norms are clamped at 1e-12 as F.normalize does.
    """
    check_tensor(_OP, "p", p, dtypes=FLOAT_DTYPES, min_dim=1)
    check_tensor(_OP, "z", z, dtypes=FLOAT_DTYPES, min_dim=1)
    check_same_device(_OP, p=p, z=z)
    if p.shape != z.shape:
        raise ValueError(f"hotloop.{_OP}: `p` and `z` must have the same shape, got {tuple(p.shape)} and "
                         f"{tuple(z.shape)}")
    if p.shape[-1] == 0:
        raise ValueError(f"hotloop.{_OP}: the feature dim D must be >= 1, got shape {tuple(p.shape)}")
    if p.dtype == torch.float64 and p.device.type != "cpu":
        raise TypeError(f"hotloop.{_OP}: float64 inputs are supported on CPU only")
    dispatch.backend("byol_loss_fwd", p.device)  # a bad HOTLOOP_BACKEND fails here, before any work
    D = p.shape[-1]
    need_grad = p.requires_grad and torch.is_grad_enabled()
    loss, grad = byol_loss_fwd(p.detach().reshape(-1, D).contiguous(), z.detach().reshape(-1, D).contiguous(),
                               need_grad)
    return loss_with_grads(loss, [(p, grad.view(p.shape) if need_grad else grad)])
