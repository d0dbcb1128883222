"""docs/byol_loss.md in plain torch: the BYOL / SPR prediction loss, 2 - 2 cos(p, stopgrad(z)) per row, mean over rows.

As BYOL's code: both sides L2-normalised with F.normalize (norms clamped at 1e-12). Float32 math (float64 for
float64 inputs). Memory: the normalised copies of p and z.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def byol_loss_ref(p: Tensor, z: Tensor) -> Tensor:
    """p, z [..., D] -> 0-dim mean over rows of 2 - 2 cos(p, z); differentiable w.r.t. p only."""
    acc = torch.float64 if p.dtype == torch.float64 else torch.float32
    pn = F.normalize(p.to(acc), dim=-1)
    zn = F.normalize(z.detach().to(acc), dim=-1)
    return (2 - 2 * (pn * zn).sum(dim=-1)).mean()


def byol_loss_fwd_ref(p: Tensor, z: Tensor, need_grad: bool) -> tuple[Tensor, Tensor]:
    """The reference backend's kernel of hotloop::byol_loss_fwd: (loss, d loss / d p or [0])."""
    from hotloop.reference._grads import value_and_grad

    return value_and_grad(lambda x: byol_loss_ref(x, z), p, need_grad)
