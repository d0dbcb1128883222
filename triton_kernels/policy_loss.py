"""Triton kernels for the per-token contracts of the policy loss (docs/policy_loss.md) and the NFT loss (docs/nft_loss.md).

The public ops reduce both losses to elementwise maps plus a few sums: per token a gradient w.r.t. the log-ratio
lr (and, for the policy loss, w.r.t. the KL difference d), per batch the loss sum and the metric sums. The math,
outputs and conventions are those of policy_tokens_ref / nft_tokens_ref in hotloop.reference.policy_loss.

One 1-D grid over blocks of BLOCK tokens. Each program writes its tokens' gradients and its partial sums to row
pid of a [programs, K] float32 buffer, which the launcher adds up with torch: the reduction order is fixed (no
atomics, so the sums are the same bits on every run) and nothing is read back on the host. The KL kind and the
dual clip are compile-time switches. Token offsets are int64, so N may exceed 2^31.

A token with m = 0 is selected away with tl.where, never multiplied by 0: padding may hold NaN or inf log-probs,
and 0 * inf is NaN. Clamps behave like torch.clamp: NaN passes through, the derivative is 1 inside the closed
range and 0 outside. Inputs and outputs are float32 (callers convert), the math is float32.
Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (how the tests run it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hotloop.contracts import KL_IDS, LOG_RATIO_CLAMP, NFT_LOG_RATIO_MAX
from hotloop.triton_kernels._common import check_row_vector, float32_math

_BLOCK = 1024  # tokens per program
_POLICY_SUMS = 6
_NFT_SUMS = 3
_LR_CLAMP = tl.constexpr(LOG_RATIO_CLAMP)
_NFT_LR_MAX = tl.constexpr(NFT_LOG_RATIO_MAX)


# ------------------------------------------------------------------------------------------------ jit helpers
@triton.jit
def _clamp(x, lo, hi):
    # comparisons with NaN are false, so NaN comes out unchanged, as from torch.clamp
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _kl_terms(d, KL: tl.constexpr):
    """(k, dk/dd) of the KL estimator KL (1 k1, 2 k2, 3 k3) at d = logp - ref_logp."""
    if KL == 1:
        k = d
        dk = tl.zeros_like(d) + 1.0
    elif KL == 2:
        k = 0.5 * d * d
        dk = d
    else:
        e = tl.exp(_clamp(-d, -_LR_CLAMP, _LR_CLAMP))
        k = e + d - 1.0
        dk = 1.0 - tl.where((d >= -_LR_CLAMP) & (d <= _LR_CLAMP), e, 0.0)
    return k, dk


@triton.jit
def _load_block(ptr, i, inb):
    # the tail loads 0; its m = 0 then drops it like any masked token
    return tl.load(ptr + i, mask=inb, other=0.0)


# ---------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _policy_tokens_kernel(
    lr_ptr, kld_ptr, adv_ptr, m_ptr, w_ptr,  # [N] float32 inputs; kld read only when KL > 0
    g_lr_ptr, g_kl_ptr,  # [N] float32 out; g_kl written only when KL > 0
    part_ptr,  # [programs, 6] float32 out: this program's partial sums, in the order of policy_tokens_ref
    N, lo, hi, dual_clip, kl_coef,  # lo = 1 - clip_low, hi = 1 + clip_high
    BLOCK: tl.constexpr, KL: tl.constexpr, DUAL: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    inb = i < N
    lr = _load_block(lr_ptr, i, inb)
    adv = _load_block(adv_ptr, i, inb)
    m = _load_block(m_ptr, i, inb)
    w = _load_block(w_ptr, i, inb)
    on = m != 0

    rho = tl.exp(_clamp(lr, -_LR_CLAMP, _LR_CLAMP))
    d_rho = tl.where((lr >= -_LR_CLAMP) & (lr <= _LR_CLAMP), rho, 0.0)
    rho_c = _clamp(rho, lo, hi)
    d_rho_c = tl.where((rho >= lo) & (rho <= hi), d_rho, 0.0)
    pg1 = -adv * rho
    pg2 = -adv * rho_c
    use1 = pg1 >= pg2
    loss = tl.where(use1, pg1, pg2)
    grad = tl.where(use1, -adv * d_rho, -adv * d_rho_c)
    n_dual = 0.0
    if DUAL:
        dual = (adv < 0) & (loss > -dual_clip * adv)
        loss = tl.where(dual, -dual_clip * adv, loss)
        grad = tl.where(dual, 0.0, grad)
        n_dual = tl.sum(tl.where(on & dual, m, 0.0), axis=0)
    kl_sum = 0.0
    if KL > 0:
        k, dk = _kl_terms(_load_block(kld_ptr, i, inb), KL)
        tl.store(g_kl_ptr + i, tl.where(on, w * kl_coef * dk, 0.0), mask=inb)
        loss += kl_coef * k
        kl_sum = tl.sum(tl.where(on, m * k, 0.0), axis=0)
    tl.store(g_lr_ptr + i, tl.where(on, w * grad, 0.0), mask=inb)

    row = part_ptr + pid * 6
    tl.store(row + 0, tl.sum(tl.where(on, w * loss, 0.0), axis=0))
    tl.store(row + 1, tl.sum(tl.where(on & (rho < lo) & (adv < 0), m, 0.0), axis=0))
    tl.store(row + 2, tl.sum(tl.where(on & (rho > hi) & (adv > 0), m, 0.0), axis=0))
    tl.store(row + 3, n_dual)
    tl.store(row + 4, tl.sum(tl.where(on, m * rho, 0.0), axis=0))
    tl.store(row + 5, kl_sum)


@triton.jit
def _nft_tokens_kernel(
    lr_ptr, m_ptr, w_ptr, r_ptr, c_ptr,  # [N] float32 inputs
    g_lr_ptr,  # [N] float32 out
    part_ptr,  # [programs, 3] float32 out: this program's partial sums, in the order of nft_tokens_ref
    N, clamp_negative,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    inb = i < N
    lr = _load_block(lr_ptr, i, inb)
    m = _load_block(m_ptr, i, inb)
    w = _load_block(w_ptr, i, inb)
    r = _load_block(r_ptr, i, inb)
    c = _load_block(c_ptr, i, inb)
    on = m != 0

    lr_c = tl.where(lr > _NFT_LR_MAX, _NFT_LR_MAX, lr)  # NaN-preserving min(lr, 10)
    R = tl.exp(lr_c)
    pos = c > 0.5
    x = (1.0 - r * R) / (1.0 - r)
    clamped = x < clamp_negative
    y = tl.where(clamped, clamp_negative, x)
    loss = tl.where(pos, -lr_c, -tl.log(y))
    # straight-through max: the gradient of -log(x) taken at the clamped value y
    grad = tl.where(lr <= _NFT_LR_MAX, tl.where(pos, -1.0, r * R / ((1.0 - r) * y)), 0.0)
    tl.store(g_lr_ptr + i, tl.where(on, w * grad, 0.0), mask=inb)

    row = part_ptr + pid * 3
    tl.store(row + 0, tl.sum(tl.where(on, w * loss, 0.0), axis=0))
    tl.store(row + 1, tl.sum(tl.where(on, m * R, 0.0), axis=0))
    tl.store(row + 2, tl.sum(tl.where(on & ~pos & clamped, m, 0.0), axis=0))


# ---------------------------------------------------------------------------------------------------- launchers
def _check_inputs(N: int, device: torch.device, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        check_row_vector(name, t, (N,), device)


@float32_math
def policy_tokens_triton(lr: Tensor, kld: Tensor | None, adv: Tensor, m: Tensor, w: Tensor, clip_low: float,
                         clip_high: float, dual_clip: float, kl_kind: int, kl_coef: float
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """policy_tokens_ref on contiguous float32 [N] tensors -> (g_lr [N], g_kl [N] ([0] when kl_kind is 0),
    sums [6]), all float32. kl_kind: 0 none, 1 k1, 2 k2, 3 k3 (KL_IDS); kld is None iff kl_kind is 0;
    dual_clip <= 0 turns the dual clip off. Asynchronous: launches only, no device -> host copies."""
    if kl_kind not in KL_IDS.values():
        raise ValueError(f"kl_kind must be one of {sorted(KL_IDS.values())}, got {kl_kind!r}")
    if (kld is None) != (kl_kind == 0):
        raise ValueError(f"kld must be given exactly when kl_kind != 0 (kl_kind={kl_kind})")
    N, dev = lr.numel(), lr.device
    _check_inputs(N, dev, lr=lr, kld=kld, adv=adv, m=m, w=w)
    g_lr = torch.empty(N, dtype=torch.float32, device=dev)
    g_kl = torch.empty(N if kl_kind else 0, dtype=torch.float32, device=dev)
    if N == 0:
        return g_lr, g_kl, torch.zeros(_POLICY_SUMS, dtype=torch.float32, device=dev)
    grid = (triton.cdiv(N, _BLOCK),)
    part = torch.empty(grid[0], _POLICY_SUMS, dtype=torch.float32, device=dev)
    # without KL, lr and g_lr stand in for kld and g_kl: the kernel never touches them
    _policy_tokens_kernel[grid](
        lr, kld if kl_kind else lr, adv, m, w, g_lr, g_kl if kl_kind else g_lr, part,
        N, 1.0 - float(clip_low), 1.0 + float(clip_high), float(dual_clip), float(kl_coef),
        BLOCK=_BLOCK, KL=kl_kind, DUAL=dual_clip > 0)
    return g_lr, g_kl, part.sum(0)


@float32_math
def nft_tokens_triton(lr: Tensor, m: Tensor, w: Tensor, r: Tensor, c: Tensor, clamp_negative: float
                      ) -> tuple[Tensor, Tensor]:
    """nft_tokens_ref on contiguous float32 [N] tensors -> (g_lr [N], sums [3]), float32.
    Asynchronous: launches only, no device -> host copies."""
    N, dev = lr.numel(), lr.device
    _check_inputs(N, dev, lr=lr, m=m, w=w, r=r, c=c)
    g_lr = torch.empty(N, dtype=torch.float32, device=dev)
    if N == 0:
        return g_lr, torch.zeros(_NFT_SUMS, dtype=torch.float32, device=dev)
    grid = (triton.cdiv(N, _BLOCK),)
    part = torch.empty(grid[0], _NFT_SUMS, dtype=torch.float32, device=dev)
    _nft_tokens_kernel[grid](lr, m, w, r, c, g_lr, part, N, float(clamp_negative), BLOCK=_BLOCK)
    return g_lr, part.sum(0)
