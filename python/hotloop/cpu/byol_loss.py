"""The BYOL loss on CPU: one float32 torch expression for the row norms / dot and the gradient (ATen's vectorised
kernels; no C++ kernel: the op is three row reductions). The kernel contract is hotloop::byol_loss_fwd's."""
from __future__ import annotations

import torch
from torch import Tensor

_NORM_EPS = 1e-12  # F.normalize's clamp of the norms


def byol_loss_fwd_cpu(p: Tensor, z: Tensor, need_grad: bool) -> tuple[Tensor, Tensor]:
    """p, z contiguous [N, D] -> (loss [] float32 / float64, d loss / d p [N, D] in p's dtype, or [0])."""
    acc = torch.float64 if p.dtype == torch.float64 else torch.float32
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
