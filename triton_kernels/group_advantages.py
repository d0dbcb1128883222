"""Triton kernels for group-relative advantages (docs/group_advantages.md): no host synchronisation, fixed or ragged groups.

Fixed groups (G adjacent responses, G <= 8192): one program per block of BLOCK_G groups loads a
[BLOCK_G, next_pow2(G)] tile and reduces its rows: mean, squared deviations about the mean (two-pass, exact
for zero-variance groups), and for passk the max, its first index and the runner-up; then writes the advantages.
Larger G runs the ragged path with group_index = arange(R) // G.

Ragged groups (group_index [R], any order): per-group statistics go to [R]-sized buffers (one slot per possible
group id) by atomics, one launch per dependency level:
    1. _ga_scatter_kernel   count, sum (atomic_add); passk: max (atomic_max)
    2. _ga_moment_kernel    squared deviations about sum / count (atomic_add); passk: first argmax (atomic_min)
    3. _ga_runner_up_kernel passk only: max over the group without its best response (atomic_max)
    4. _ga_ragged_out_kernel  elementwise advantages from the buffers
Atomic float sums are unordered, so ragged results may differ between runs in the last bits.
Group ids outside [0, R) are never used as addresses: they give NaN advantages (the host check, when on,
raises first).

Batch statistics (grpo scale="batch", reinforce_pp_baseline's whitening) are device-side torch reductions over
the finite values, read by the kernels through a pointer: nothing is copied to the host.
Math in float32 (float64 for float64 rewards: the CPU interpreter only). Runs on CUDA tensors, or on CPU
tensors under TRITON_INTERPRET=1 (how the tests run it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

KIND_IDS = {"grpo": 0, "dr_grpo": 1, "rloo": 2, "reinforce_pp_baseline": 3, "passk": 4}
SCALE_IDS = {"group": 0, "batch": 1, "none": 2}
_MAX_FIXED_G = 8192   # a fixed group's row must fit one tile
_TILE = 4096          # elements per fixed-groups program
_BLOCK = 1024         # responses per ragged program


# ------------------------------------------------------------------------------------------------ jit helpers
@triton.jit
def _advantage(r, mean, ss, n, is_best, max1, max2, batch_std, eps, KIND: tl.constexpr, SCALE: tl.constexpr):
    """Advantage of r in a group of n with mean `mean` and squared-deviation sum `ss` (all broadcastable)."""
    d = r - mean  # 0 for singletons; NaN across a group holding a NaN
    many = n > 1
    nm1 = tl.where(many, n - 1, 1).to(r.dtype)
    if KIND == 0:  # grpo
        if SCALE == 0:
            a = tl.where(many, d / (tl.sqrt(ss / nm1) + eps), d)
        elif SCALE == 1:
            a = d / (batch_std + eps)
        else:
            a = d
    elif KIND == 2:  # rloo
        a = tl.where(many, d * (n.to(r.dtype) / nm1), d)
    elif KIND == 4:  # passk: the best response gets max - runner-up; a NaN in the group makes all NaN
        sel = many & is_best  # select before subtracting: no -inf - -inf in the other lanes
        a = tl.where(sel, max1, 0.0) - tl.where(sel, max2, 0.0) + d * 0.0
    else:  # dr_grpo, reinforce_pp_baseline (whitened afterwards)
        a = d
    return a


# ---------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _ga_fixed_kernel(
    r_ptr,  # [R] rewards, fp32/bf16/fp16 (fp64 in the interpreter), contiguous
    out_ptr,  # [R] out: advantages, the accumulation dtype (fp32, or fp64 for fp64 rewards)
    bstd_ptr,  # [1] batch std of the finite rewards (read when KIND grpo and SCALE batch; else a dummy)
    num_groups, G,  # R = num_groups * G
    eps,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, KIND: tl.constexpr, SCALE: tl.constexpr,
):
    acc = out_ptr.dtype.element_ty
    grp = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    col = tl.arange(0, BLOCK_N)
    mask = (grp[:, None] < num_groups) & (col[None, :] < G)
    offs = grp[:, None] * G + col[None, :]
    x = tl.load(r_ptr + offs, mask=mask, other=0.0).to(acc)
    n = tl.zeros((BLOCK_G,), tl.int32) + G
    mean = tl.sum(x, axis=1) / G
    dev = tl.where(mask, x - mean[:, None], 0.0)
    ss = tl.sum(dev * dev, axis=1)
    batch_std = 0.0
    if SCALE == 1:
        batch_std = tl.load(bstd_ptr)
    if KIND == 4:
        xm = tl.where(mask & (x == x), x, float("-inf"))
        max1 = tl.max(xm, axis=1)
        best = tl.min(tl.where(xm == max1[:, None], col[None, :], BLOCK_N), axis=1)
        is_best = col[None, :] == best[:, None]
        max2 = tl.max(tl.where(is_best, float("-inf"), xm), axis=1)
        a = _advantage(x, mean[:, None], ss[:, None], n[:, None], is_best, max1[:, None], max2[:, None],
                       batch_std, eps, KIND, SCALE)
    else:
        a = _advantage(x, mean[:, None], ss[:, None], n[:, None], False, 0.0, 0.0, batch_std, eps, KIND, SCALE)
    tl.store(out_ptr + offs, a.to(acc), mask=mask)


@triton.jit
def _load_ragged(r_ptr, g_ptr, R, BLOCK: tl.constexpr, ACC: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = i < R
    g = tl.load(g_ptr + i, mask=inb, other=0).to(tl.int64)
    ok = inb & (g >= 0) & (g < R)  # a bad id is never an address
    g = tl.where(ok, g, 0)
    r = tl.load(r_ptr + i, mask=inb, other=0.0).to(ACC)
    return i, g, r, ok


@triton.jit
def _ga_scatter_kernel(
    r_ptr,  # [R] rewards, contiguous
    g_ptr,  # [R] group ids, int32/int64, contiguous
    sum_ptr,  # [R] acc dtype, zeroed: per-group sum of rewards (out)
    cnt_ptr,  # [R] int32, zeroed: per-group count (out)
    max_ptr,  # [R] acc dtype, -inf: per-group max of the non-NaN rewards (out; passk only)
    R,
    BLOCK: tl.constexpr, PASSK: tl.constexpr,
):
    acc = sum_ptr.dtype.element_ty
    i, g, r, ok = _load_ragged(r_ptr, g_ptr, R, BLOCK, acc)
    tl.atomic_add(sum_ptr + g, r, mask=ok)
    tl.atomic_add(cnt_ptr + g, tl.full((BLOCK,), 1, tl.int32), mask=ok)
    if PASSK:
        tl.atomic_max(max_ptr + g, r, mask=ok & (r == r))


@triton.jit
def _ga_moment_kernel(
    r_ptr,  # [R] rewards
    g_ptr,  # [R] group ids
    sum_ptr,  # [R] per-group sums (in)
    cnt_ptr,  # [R] per-group counts (in)
    ss_ptr,  # [R] acc dtype, zeroed: per-group sum of squared deviations (out)
    max_ptr,  # [R] per-group max (in; passk only)
    best_ptr,  # [R] int64, R: per-group first index of the max (out; passk only)
    R,
    BLOCK: tl.constexpr, PASSK: tl.constexpr,
):
    acc = sum_ptr.dtype.element_ty
    i, g, r, ok = _load_ragged(r_ptr, g_ptr, R, BLOCK, acc)
    n = tl.load(cnt_ptr + g, mask=ok, other=1)
    mean = tl.load(sum_ptr + g, mask=ok, other=0.0) / n.to(acc)
    d = r - mean
    tl.atomic_add(ss_ptr + g, d * d, mask=ok)
    if PASSK:
        m = tl.load(max_ptr + g, mask=ok, other=0.0)
        tl.atomic_min(best_ptr + g, i, mask=ok & (r == m))


@triton.jit
def _ga_runner_up_kernel(
    r_ptr,  # [R] rewards
    g_ptr,  # [R] group ids
    best_ptr,  # [R] per-group first index of the max (in)
    max2_ptr,  # [R] acc dtype, -inf: per-group max without the best response (out)
    R,
    BLOCK: tl.constexpr,
):
    acc = max2_ptr.dtype.element_ty
    i, g, r, ok = _load_ragged(r_ptr, g_ptr, R, BLOCK, acc)
    best = tl.load(best_ptr + g, mask=ok, other=0)
    tl.atomic_max(max2_ptr + g, r, mask=ok & (r == r) & (i != best))


@triton.jit
def _ga_ragged_out_kernel(
    r_ptr,  # [R] rewards
    g_ptr,  # [R] group ids
    out_ptr,  # [R] out: advantages, acc dtype (NaN where the group id is out of range)
    sum_ptr, cnt_ptr, ss_ptr,  # [R] per-group sum, count, squared deviations (in)
    max_ptr, best_ptr, max2_ptr,  # [R] per-group max, its first index, runner-up (in; passk only)
    bstd_ptr,  # [1] batch std of the finite rewards (grpo, scale batch only)
    R, eps,
    BLOCK: tl.constexpr, KIND: tl.constexpr, SCALE: tl.constexpr,
):
    acc = out_ptr.dtype.element_ty
    i, g, r, ok = _load_ragged(r_ptr, g_ptr, R, BLOCK, acc)
    n = tl.load(cnt_ptr + g, mask=ok, other=1)
    mean = tl.load(sum_ptr + g, mask=ok, other=0.0) / n.to(acc)
    ss = tl.load(ss_ptr + g, mask=ok, other=0.0)
    batch_std = 0.0
    if SCALE == 1:
        batch_std = tl.load(bstd_ptr)
    if KIND == 4:
        max1 = tl.load(max_ptr + g, mask=ok, other=0.0)
        max2 = tl.load(max2_ptr + g, mask=ok, other=0.0)
        is_best = tl.load(best_ptr + g, mask=ok, other=-1) == i
        a = _advantage(r, mean, ss, n, is_best, max1, max2, batch_std, eps, KIND, SCALE)
    else:
        a = _advantage(r, mean, ss, n, False, 0.0, 0.0, batch_std, eps, KIND, SCALE)
    a = tl.where(ok, a, float("nan"))
    tl.store(out_ptr + i, a.to(acc), mask=i < R)


# ---------------------------------------------------------------------------------------------------- launchers
def _finite_mean_std(x: Tensor) -> tuple[Tensor, Tensor]:
    """Device-side mean and unbiased std of x's finite values (mean 0 with none, std 0 under two); no sync."""
    fin = torch.isfinite(x)
    n = fin.sum().to(x.dtype)
    mean = torch.where(fin, x, 0.0).sum() / n.clamp(min=1)
    var = torch.where(fin, x - mean, 0.0).square().sum() / (n - 1).clamp(min=1)
    return mean, torch.where(n > 1, var.sqrt(), 0.0)


def _fixed(r: Tensor, out: Tensor, bstd: Tensor, G: int, eps: float, kind: int, scale: int) -> None:
    num_groups = r.numel() // G
    block_n = triton.next_power_of_2(G)
    block_g = max(1, min(_TILE // block_n, triton.next_power_of_2(num_groups)))
    grid = (triton.cdiv(num_groups, block_g),)
    _ga_fixed_kernel[grid](r, out, bstd, num_groups, G, eps, BLOCK_G=block_g, BLOCK_N=block_n, KIND=kind,
                           SCALE=scale, num_warps=4 if block_g * block_n >= 1024 else 1)


def _ragged(r: Tensor, gi: Tensor, out: Tensor, bstd: Tensor, eps: float, kind: int, scale: int) -> None:
    R, dev, acc = r.numel(), r.device, out.dtype
    passk = kind == KIND_IDS["passk"]
    sums = torch.zeros(R, dtype=acc, device=dev)
    ss = torch.zeros(R, dtype=acc, device=dev)
    cnt = torch.zeros(R, dtype=torch.int32, device=dev)
    if passk:
        max1 = torch.full((R,), float("-inf"), dtype=acc, device=dev)
        max2 = torch.full((R,), float("-inf"), dtype=acc, device=dev)
        best = torch.full((R,), R, dtype=torch.int64, device=dev)
    else:
        max1 = max2 = sums
        best = cnt
    grid = (triton.cdiv(R, _BLOCK),)
    # 8 warps: 4 responses a thread with their int64 ids and addresses (4 warps spilled on sm_80 with passk)
    warps = 8
    _ga_scatter_kernel[grid](r, gi, sums, cnt, max1, R, BLOCK=_BLOCK, PASSK=passk, num_warps=warps)
    _ga_moment_kernel[grid](r, gi, sums, cnt, ss, max1, best, R, BLOCK=_BLOCK, PASSK=passk, num_warps=warps)
    if passk:
        _ga_runner_up_kernel[grid](r, gi, best, max2, R, BLOCK=_BLOCK, num_warps=warps)
    _ga_ragged_out_kernel[grid](r, gi, out, sums, cnt, ss, max1, best, max2, bstd, R, eps, BLOCK=_BLOCK,
                                KIND=kind, SCALE=scale, num_warps=warps)


def group_advantages_fwd_triton(rewards: Tensor, group_index: Tensor | None, group_size: int, kind: str,
                                scale: str, eps: float) -> Tensor:
    """rewards [R] -> advantages [R] float32 (float64 for float64 rewards); exactly one of group_size > 0 and
    group_index [R] int32/int64 (ragged). Asynchronous: launches only, no device -> host copies."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [R], got {tuple(rewards.shape)}")
    if kind not in KIND_IDS or scale not in SCALE_IDS:
        raise ValueError(f"unknown kind {kind!r} or scale {scale!r}")
    if (group_index is None) == (group_size <= 0):
        raise ValueError("give exactly one of group_size > 0 and group_index")
    R = rewards.numel()
    acc = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    out = torch.empty(R, dtype=acc, device=rewards.device)
    if R == 0:
        return out
    r = rewards.contiguous()
    k, s = KIND_IDS[kind], SCALE_IDS[scale]
    bstd = _finite_mean_std(r.to(acc))[1].reshape(1) if (kind == "grpo" and scale == "batch") else out
    if group_index is None and group_size <= _MAX_FIXED_G:
        if R % group_size:
            raise ValueError(f"group_size={group_size} must divide R={R}")
        _fixed(r, out, bstd, group_size, eps, k, s)
    else:
        if group_index is None:
            if R % group_size:
                raise ValueError(f"group_size={group_size} must divide R={R}")
            group_index = torch.arange(R, device=r.device) // group_size
        if group_index.shape != (R,) or group_index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"group_index must be int32/int64 [R] = [{R}], got {group_index.dtype} "
                             f"{tuple(group_index.shape)}")
        _ragged(r, group_index.contiguous(), out, bstd, eps, k, s)
    if kind == "reinforce_pp_baseline":  # whiten over the batch, on the device
        mean, std = _finite_mean_std(out)
        out.sub_(mean).div_(std + eps)
    return out
