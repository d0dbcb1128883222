"""Group-relative advantages for RL post-training: GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline, pass@k
(docs/group_advantages.md).

Layers, outermost first:
  group_advantages             public API: checks, the optional broadcast to tokens
  hotloop::group_advantages_fwd  torch.library custom op (fake kernel; no autograd: rewards carry no gradient)
  kernels                      dispatch.kernel: reference.group_advantages (torch), hotloop._C.cpu (C++),
                               triton_kernels.group_advantages (CUDA; CPU under the interpreter); there is no
                               CUDA C++ kernel, so on GPU the op runs on Triton

Kernel contract (every backend): rewards [R] contiguous; exactly one of group_size > 0 (fixed groups of adjacent
responses, R % group_size == 0) and group_index [R] int32/int64 with values in [0, R) (ragged); the result is
[R] float32 (float64 for float64 rewards). The GPU path never synchronises with the host, ragged groups included;
the only host read is the optional group_index range check (see `group_advantages`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from hotloop._internal import dispatch
from hotloop._internal.checks import (FLOAT_DTYPES, LABEL_DTYPES, check_positive, check_same_device, check_tensor,
                             labels_checked_on_host)
from hotloop.contracts import ADVANTAGE_KINDS as KINDS
from hotloop.contracts import ADVANTAGE_SCALES as SCALES
from hotloop.reference.group_advantages import group_advantages_kernel_ref

_OP = "group_advantages"
dispatch.register("group_advantages_fwd", "reference", group_advantages_kernel_ref)
dispatch.register("group_advantages_fwd", "cpu", dispatch.extension("cpu", "group_advantages"))
dispatch.register("group_advantages_fwd", "triton",
                  "hotloop.triton_kernels.group_advantages:group_advantages_fwd_triton")
_MASK_DTYPES = (torch.bool, torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _out_dtype(rewards: Tensor) -> torch.dtype:
    return torch.float64 if rewards.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------- forward op
@torch.library.custom_op("hotloop::group_advantages_fwd", mutates_args=())
def group_advantages_fwd(rewards: Tensor, group_index: Tensor | None, group_size: int, kind: str, scale: str,
                         eps: float) -> Tensor:
    """-> advantages [R], float32 (float64 for float64 rewards). group_size 0 means ragged (group_index)."""
    r = rewards.contiguous()
    gi = None if group_index is None else group_index.contiguous()
    return dispatch.kernel("group_advantages_fwd", r.device)(r, gi, group_size, kind, scale, eps)


@group_advantages_fwd.register_fake
def _(rewards, group_index, group_size, kind, scale, eps):
    torch._check(rewards.dim() == 1)
    return rewards.new_empty(rewards.shape, dtype=_out_dtype(rewards))


# ---------------------------------------------------------------------------------------------------- checks
def _check_groups(rewards: Tensor, group_size, group_index) -> int:
    """-> group_size as an int (0 for ragged groups); raises naming the argument."""
    R = rewards.shape[0]
    if (group_size is None) == (group_index is None):
        raise ValueError(f"hotloop.{_OP}: give exactly one of `group_size` (fixed groups) and `group_index` "
                         f"(ragged groups), got {'both' if group_size is not None else 'neither'}")
    if group_index is not None:
        check_tensor(_OP, "group_index", group_index, dtypes=LABEL_DTYPES)
        if tuple(group_index.shape) != (R,):
            raise ValueError(f"hotloop.{_OP}: `group_index` must have shape [R] = [{R}] like `rewards`, "
                             f"got {tuple(group_index.shape)}")
        check_same_device(_OP, rewards=rewards, group_index=group_index)
        return 0
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"hotloop.{_OP}: `group_size` must be a Python int, got {type(group_size).__name__}")
    if group_size <= 0:
        raise ValueError(f"hotloop.{_OP}: `group_size` must be >= 1, got {group_size}")
    if R % group_size:
        raise ValueError(f"hotloop.{_OP}: `group_size`={group_size} must divide the number of rewards R={R}")
    return group_size


def _check_group_index_range(group_index: Tensor, R: int) -> None:
    """Raise if a group id lies outside [0, R) (one device -> host read)."""
    bad = (group_index < 0) | (group_index >= R)
    if bool(bad.any()):
        first = int(bad.to(torch.uint8).argmax())
        raise ValueError(f"hotloop.{_OP}: `group_index` values must lie in [0, R) = [0, {R}); found "
                         f"{int(group_index[first])} at position {first} ({int(bad.sum())} out of range)")


def _check_mask(rewards: Tensor, mask: Tensor) -> None:
    check_tensor(_OP, "mask", mask, dtypes=_MASK_DTYPES)
    if mask.dim() != 2 or mask.shape[0] != rewards.shape[0]:
        raise ValueError(f"hotloop.{_OP}: `mask` must be [R, T] with R = {rewards.shape[0]}, "
                         f"got {tuple(mask.shape)}")
    check_same_device(_OP, rewards=rewards, mask=mask)


# -------------------------------------------------------------------------------------------------- public API
def group_advantages(rewards: Tensor, *, group_size: int | None = None, group_index: Tensor | None = None,
                     kind: str = "grpo", scale: str = "group", eps: float = 1e-6,
                     mask: Tensor | None = None) -> Tensor:
    """Advantages of each response relative to its group (the responses to one prompt).

    Args:
        rewards: [R] float32 / bfloat16 / float16 (float64 on CPU), one scalar reward per response.
        group_size: G: responses g*G .. g*G+G-1 form group g (TRL's layout); R % G == 0.
        group_index: [R] int64 / int32, the group id of each response (verl's `index`), ragged: any order, any
            sizes; ids lie in [0, R) and need not be contiguous or all used. Give exactly one of the two.
        kind: with mean_g, std_g (unbiased) and n over the response's group,
            "grpo"                   (r - mean_g) / (std + eps), std per `scale`
            "dr_grpo"                r - mean_g
            "rloo"                   n / (n - 1) * (r - mean_g), the reward minus the mean of the others
            "reinforce_pp_baseline"  r - mean_g, then whitened over the batch: (x - mean x) / (std x + eps)
            "passk"                  r_max - r_second_max for the group's best response (first on ties), else 0
            Singleton groups give 0 for grpo (scale "group"), rloo and passk.
        scale: grpo only (ignored by other kinds): "group" per-group std, "batch" the std of all rewards,
            "none" no division (= dr_grpo). A zero-variance group gets 0 (0 / (0 + eps)).
        eps: > 0, added to the std before dividing.
        mask: optional [R, T] bool / float response mask: the result is A[:, None] * mask, [R, T].

    Returns:
        [R] (or [R, T] with `mask`) float32, float64 for float64 rewards; no gradient.

    NaN rewards: every advantage of the group holding one is NaN, and no other group is affected (batch
    statistics, for scale="batch" and the whitening, skip non-finite values). With `mask`, a NaN advantage stays
    NaN on its masked-out tokens (NaN * 0).

    Group ids are range-checked with one host read on CPU, and on GPU unless HOTLOOP_CHECK_LABELS=0 (never
    under torch.compile); unchecked on GPU, an out-of-range id gives a NaN advantage, never a wild write. Apart
    from that check nothing synchronises with the host.
    """
    check_tensor(_OP, "rewards", rewards, dtypes=FLOAT_DTYPES)
    if rewards.dim() != 1:
        raise ValueError(f"hotloop.{_OP}: `rewards` must be [R] (one reward per response), "
                         f"got shape {tuple(rewards.shape)}")
    if rewards.dtype == torch.float64 and rewards.device.type != "cpu":
        raise TypeError(f"hotloop.{_OP}: float64 `rewards` are supported on CPU only")
    if kind not in KINDS:
        raise ValueError(f"hotloop.{_OP}: `kind` must be one of {KINDS}, got {kind!r}")
    if scale not in SCALES:
        raise ValueError(f"hotloop.{_OP}: `scale` must be one of {SCALES}, got {scale!r}")
    eps = check_positive(_OP, "eps", eps)
    G = _check_groups(rewards, group_size, group_index)
    if mask is not None:
        _check_mask(rewards, mask)
    rewards = rewards.detach()
    dispatch.backend("group_advantages_fwd", rewards.device)  # a bad HOTLOOP_BACKEND fails here, before any work
    if group_index is not None and labels_checked_on_host(group_index.device):
        _check_group_index_range(group_index, rewards.shape[0])
    adv = torch.ops.hotloop.group_advantages_fwd(rewards, group_index, G, kind, scale, eps)
    if mask is not None:
        adv = adv[:, None] * mask.to(adv.dtype)
    return adv
