"""docs/group_advantages.md in plain torch: group-relative advantages, one score per response.

Groups are fixed (`group_size=G`: responses g*G .. g*G+G-1 form group g) or ragged (`group_index[i]` is the group
of response i: any order, any sizes). Each kind, with mean_g / std_g / n_g over response i's group (std unbiased):

    grpo                   (r - mean_g) / (s + eps), s = std_g (scale="group"), the batch std of r
                           (scale="batch") or no division at all (scale="none", = dr_grpo)
    dr_grpo                r - mean_g
    rloo                   n_g / (n_g - 1) * (r - mean_g)      (= r - mean of the others)
    reinforce_pp_baseline  x = r - mean_g, then whitened over the batch: (x - mean(x)) / (std(x) + eps)
    passk                  r_max - r_second_max for the group's best response (first index on ties), else 0

Singleton groups get r - mean_g = 0 for grpo (scale="group"), rloo and passk (their std / n-1 / runner-up do
not exist). Batch statistics (scale="batch", the whitening) use unbiased std and are 0 over fewer than 2 values.

NaN policy: a NaN reward makes every advantage of its own group NaN and nothing else: batch statistics skip
non-finite values. (+-inf follows IEEE arithmetic inside its group and is skipped by batch statistics too.)

Math in float64; the result is float32 (float64 for float64 rewards). Memory: a Python loop over the groups
(the spec, not a fast path).
"""
from __future__ import annotations

import torch
from torch import Tensor

from hotloop.contracts import ADVANTAGE_KINDS as KINDS  # noqa: F401
from hotloop.contracts import ADVANTAGE_SCALES as SCALES  # noqa: F401


def _finite_mean_std(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased std of the finite entries of x (mean 0 when none, std 0 under two)."""
    v = x[torch.isfinite(x)]
    mean = v.mean() if v.numel() > 0 else x.new_zeros(())
    std = v.std(correction=1) if v.numel() > 1 else x.new_zeros(())
    return mean, std


def _group_members(n: int, group_size: int | None, group_index: Tensor | None) -> list[Tensor]:
    if group_index is None:
        return [torch.arange(g, g + group_size) for g in range(0, n, group_size)]
    idx = group_index.detach().long().cpu()
    return [torch.nonzero(idx == g).flatten() for g in torch.unique(idx).tolist()]


def group_advantages_ref(rewards: Tensor, group_size: int | None = None, group_index: Tensor | None = None,
                         kind: str = "grpo", scale: str = "group", eps: float = 1e-6,
                         mask: Tensor | None = None) -> Tensor:
    """rewards [R] -> advantages [R] (or [R, T] = A[:, None] * mask when a [R, T] mask is given)."""
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.detach().to(torch.float64).cpu()
    adv = torch.zeros_like(r)
    batch_std = _finite_mean_std(r)[1] if (kind == "grpo" and scale == "batch") else None

    for idx in _group_members(r.numel(), group_size, group_index):
        rg = r[idx]
        n = rg.numel()
        d = rg - rg.mean()  # 0 for a singleton; NaN all over a group holding a NaN
        if kind == "grpo" and scale == "group":
            a = d / (rg.std(correction=1) + eps) if n > 1 else d
        elif kind == "grpo" and scale == "batch":
            a = d / (batch_std + eps)
        elif kind == "rloo":
            a = d * (n / (n - 1)) if n > 1 else d
        elif kind == "passk":
            a = torch.zeros_like(rg)
            if n > 1:
                best = int(torch.argmax(rg))  # first index of the max (NaN groups are overwritten below)
                runner_up = torch.cat([rg[:best], rg[best + 1:]]).max()
                a[best] = rg[best] - runner_up
            a = a + d * 0  # NaN in the group -> NaN for the whole group
        else:  # dr_grpo, grpo with scale="none", reinforce_pp_baseline (whitened below)
            a = d
        adv[idx] = a

    if kind == "reinforce_pp_baseline":
        mean, std = _finite_mean_std(adv)
        adv = (adv - mean) / (std + eps)

    adv = adv.to(device=rewards.device, dtype=out_dtype)
    if mask is not None:
        adv = adv[:, None] * mask.to(out_dtype)
    return adv


def group_advantages_kernel_ref(rewards: Tensor, group_index: Tensor | None, group_size: int, kind: str,
                                scale: str, eps: float) -> Tensor:
    """The reference backend's kernel of hotloop::group_advantages_fwd (group_size 0: ragged, by group_index)."""
    return group_advantages_ref(rewards, group_size or None, group_index, kind, scale, eps)
