"""BYOL / SPR prediction loss (SPEC §7): mean over rows of 2 - 2 cos(p, stopgrad(z)), loss and d/dp in one pass.

Layers, outermost first:
  byol_loss               public API: checks, backend choice; attaches the gradient computed in the forward to
                          the loss (hotloop::attach_grads)
  hotloop::byol_loss_fwd  custom op (fake kernel) -> (loss, d loss / d p)
  backends                "cpu": one float32 torch expression for the row norms / dot and the gradient (ATen's
                          vectorised kernels; no C++ kernel: the op is three row reductions), Triton (CUDA, or
                          CPU under the interpreter); reference.byol_loss is the spec
"""
from __future__ import annotations

import torch
from torch import Tensor

from hotloop._internal.dispatch import resolve_backend
from hotloop._internal.checks import FLOAT_DTYPES, check_same_device, check_tensor
from hotloop._internal.attach_grads import loss_with_grads
from hotloop.reference.byol_loss import byol_loss_ref

_OP = "byol_loss"
_BACKENDS = ("reference", "cpu", "triton")
_NORM_EPS = 1e-12  # F.normalize's clamp of the norms


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _byol_cpu(p: Tensor, z: Tensor, need_grad: bool) -> tuple[Tensor, Tensor]:
    acc = _acc(p)
    pf, zf = p.to(acc), z.to(acc)
    n = max(p.shape[0], 1)
    pn = torch.linalg.vector_norm(pf, dim=1).clamp_min(_NORM_EPS)
    zn = torch.linalg.vector_norm(zf, dim=1).clamp_min(_NORM_EPS)
    cos = (pf * zf).sum(dim=1) / (pn * zn)
    loss = (2 - 2 * cos).mean()
    if not need_grad:
        return loss, p.new_empty(0)
    # d cos / d p = z / (|p| |z|) - cos p / |p|^2, times -2 / N
    a = (-2.0 / n) / (pn * zn)
    b = (2.0 / n) * cos / (pn * pn)
    return loss, torch.addcmul(zf * a[:, None], pf, b[:, None]).to(p.dtype)


@torch.library.custom_op("hotloop::byol_loss_fwd", mutates_args=())
def byol_loss_fwd(p: Tensor, z: Tensor, need_grad: bool, backend: str) -> tuple[Tensor, Tensor]:
    """p, z contiguous [N, D] -> (loss [] float32 / float64, d loss / d p [N, D] in p's dtype, or [0])."""
    if backend == "cpu":
        return _byol_cpu(p, z, need_grad)
    from hotloop.triton_kernels.byol_loss import byol_loss_fwd_triton

    return byol_loss_fwd_triton(p, z, need_grad)


@byol_loss_fwd.register_fake
def _(p, z, need_grad, backend):
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
    backend = resolve_backend(_OP, p.device, _BACKENDS)
    if backend == "reference":
        return byol_loss_ref(p, z)
    D = p.shape[-1]
    need_grad = p.requires_grad and torch.is_grad_enabled()
    loss, grad = byol_loss_fwd(p.detach().reshape(-1, D).contiguous(), z.detach().reshape(-1, D).contiguous(),
                               need_grad, backend)
    return loss_with_grads(loss, [(p, grad.view(p.shape) if need_grad else grad)])
