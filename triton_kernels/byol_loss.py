"""Triton kernel for the BYOL / SPR prediction loss (docs/byol_loss.md): 2 - 2 cos(p, z) per row and d/dp in one program.

One program per row: a pass over D accumulating p.p, z.z and p.z (float32), the row's loss, then a second pass
writing d loss / d p = -(2 / N) (z / (|p| |z|) - cos p / |p|^2), norms clamped at 1e-12 as F.normalize does,
rounded once to p's dtype. The mean over rows is a torch reduction of the [N] row losses on device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK = 1024
_NORM_EPS = 1e-12


@triton.jit
def _byol_loss_fwd_kernel(
    p_ptr,  # [N, D] predictions, contiguous
    z_ptr,  # [N, D] targets (no gradient), contiguous
    g_ptr,  # [N, D] out: d loss / d p, p's dtype (unused without NEED_GRAD)
    row_ptr,  # [N] out: 2 - 2 cos, accumulation dtype
    D, inv_n, norm_eps,
    BLOCK: tl.constexpr, NEED_GRAD: tl.constexpr,
):
    acc = row_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    base = row * D
    pp = tl.zeros((BLOCK,), acc)
    zz = tl.zeros((BLOCK,), acc)
    pz = tl.zeros((BLOCK,), acc)
    for d0 in range(0, D, BLOCK):
        k = d0 + tl.arange(0, BLOCK)
        mask = k < D
        p = tl.load(p_ptr + base + k, mask=mask, other=0.0).to(acc)
        z = tl.load(z_ptr + base + k, mask=mask, other=0.0).to(acc)
        pp += p * p
        zz += z * z
        pz += p * z
    np_ = tl.maximum(tl.sqrt(tl.sum(pp, axis=0)), norm_eps)
    nz = tl.maximum(tl.sqrt(tl.sum(zz, axis=0)), norm_eps)
    cos = tl.sum(pz, axis=0) / (np_ * nz)
    tl.store(row_ptr + row, 2.0 - 2.0 * cos)
    if NEED_GRAD:
        a = -2.0 * inv_n / (np_ * nz)
        b = 2.0 * inv_n * cos / (np_ * np_)
        for d0 in range(0, D, BLOCK):
            k = d0 + tl.arange(0, BLOCK)
            mask = k < D
            p = tl.load(p_ptr + base + k, mask=mask, other=0.0).to(acc)
            z = tl.load(z_ptr + base + k, mask=mask, other=0.0).to(acc)
            tl.store(g_ptr + base + k, (a * z + b * p).to(g_ptr.dtype.element_ty), mask=mask)


def byol_loss_fwd_triton(p: Tensor, z: Tensor, need_grad: bool) -> tuple[Tensor, Tensor]:
    """p, z contiguous [N, D] (checked by hotloop.byol_loss) -> (loss [], d loss / d p [N, D] in p's dtype or [0])."""
    N, D = p.shape
    acc = torch.float64 if p.dtype == torch.float64 else torch.float32
    rows = torch.empty(N, dtype=acc, device=p.device)
    grad = torch.empty_like(p) if need_grad else p.new_empty(0)
    if N:
        _byol_loss_fwd_kernel[(N,)](p, z, grad if need_grad else p, rows, D, 1.0 / N, _NORM_EPS,
                                    BLOCK=min(_BLOCK, triton.next_power_of_2(max(D, 1))), NEED_GRAD=need_grad)
    return rows.mean(), grad
