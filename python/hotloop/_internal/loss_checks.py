"""Argument checks shared by the token-level RL losses (policy_loss, nft_loss and their fused-linear forms).

Every error names the argument and what was expected.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from hotloop._internal.checks import FLOAT_DTYPES, LABEL_DTYPES, check_same_device, check_tensor, labels_checked_on_host
from hotloop.contracts import AGGS

# bool, float weights, or TRL's integer 0 / 1 completion masks
MASK_DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.bfloat16, torch.float16,
               torch.float64)


def check_real(op: str, name: str, value: object, *, low: float | None = None, high: float | None = None,
               low_open: bool = False) -> float:
    """A finite real number within [low, high] ((low, high] with low_open)."""
    if isinstance(value, (Tensor, bool)) or not isinstance(value, numbers.Real):
        raise TypeError(f"hotloop.{op}: `{name}` must be a real number, got {type(value).__name__}")
    value = float(value)
    bad_low = low is not None and (value <= low if low_open else value < low)
    if not math.isfinite(value) or bad_low or (high is not None and value > high):
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"hotloop.{op}: `{name}` must be a finite number in {'(' if low_open else '['}{lo}, "
                         f"{hi}], got {value}")
    return value


def check_choice(op: str, name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"hotloop.{op}: `{name}` must be one of {choices}, got {value!r}")


def check_token_layout(op: str, logp: Tensor, cu_seqlens: Tensor | None, name: str = "logp") -> None:
    """logp (called `name`) is [B, T], or packed [N] with cu_seqlens [B + 1] (0 = cu[0] <= ... <= cu[B] = N)."""
    check_tensor(op, name, logp, dtypes=FLOAT_DTYPES)
    if cu_seqlens is None:
        if logp.dim() != 2:
            raise ValueError(f"hotloop.{op}: `{name}` must be [B, T] (or packed [N] with `cu_seqlens`), "
                             f"got shape {tuple(logp.shape)}")
    else:
        check_tensor(op, "cu_seqlens", cu_seqlens, dtypes=LABEL_DTYPES)
        if logp.dim() != 1:
            raise ValueError(f"hotloop.{op}: with `cu_seqlens`, `{name}` must be packed [N], got {tuple(logp.shape)}")
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(f"hotloop.{op}: `cu_seqlens` must be [B + 1] with B >= 1, got {tuple(cu_seqlens.shape)}")
        check_same_device(op, logp=logp, cu_seqlens=cu_seqlens)
        if labels_checked_on_host(cu_seqlens.device):
            N = logp.shape[0]
            if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != N or bool((cu_seqlens.diff() < 0).any()):
                raise ValueError(f"hotloop.{op}: `cu_seqlens` must start at 0, end at N = {N} and never decrease, "
                                 f"got {cu_seqlens.tolist() if cu_seqlens.numel() <= 16 else 'other values'}")
    if logp.dtype == torch.float64 and logp.device.type != "cpu":
        raise TypeError(f"hotloop.{op}: float64 `{name}` is supported on CPU only")


def check_like(op: str, name: str, t: Tensor | None, like: Tensor, dtypes=FLOAT_DTYPES) -> None:
    """t (when given) has like's shape and device."""
    if t is None:
        return
    check_tensor(op, name, t, dtypes=dtypes)
    if t.shape != like.shape:
        raise ValueError(f"hotloop.{op}: `{name}` must have the shape of the log-probs {tuple(like.shape)}, "
                         f"got {tuple(t.shape)}")
    check_same_device(op, logp=like, **{name: t})


def check_per_row(op: str, name: str, t: Tensor, like: Tensor, B: int, *, dtypes=FLOAT_DTYPES,
                  per_token: bool = True) -> None:
    """t is [B] (one value per response) or, when per_token, the log-probs' shape."""
    check_tensor(op, name, t, dtypes=dtypes)
    if tuple(t.shape) != (B,) and not (per_token and t.shape == like.shape):
        also = f" or {tuple(like.shape)}" if per_token else ""
        raise ValueError(f"hotloop.{op}: `{name}` must be [B] = [{B}]{also}, got {tuple(t.shape)}")
    check_same_device(op, logp=like, **{name: t})


def resolve_max_length(op: str, agg: str, max_length: int | None, logp: Tensor, cu_seqlens: Tensor | None
                       ) -> int | None:
    """The L_max of the constant-normaliser aggregations: `max_length`, else T for padded input."""
    check_choice(op, "agg", agg, AGGS)
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"hotloop.{op}: `max_length` must be an int >= 1, got {max_length!r}")
        return max_length
    if agg in ("seq-mean-token-sum-norm", "dr_grpo"):
        if cu_seqlens is not None:
            raise ValueError(f"hotloop.{op}: agg={agg!r} on packed input needs `max_length` (the generation budget)")
        return logp.shape[1]
    return None


def float_mask(op: str, mask: Tensor, dt: torch.dtype) -> Tensor:
    """The mask as a [N] float weight; negative or non-finite weights are refused."""
    m = mask.reshape(-1).to(dt).contiguous()
    if mask.dtype != torch.bool and labels_checked_on_host(mask.device) and not bool(
            (torch.isfinite(m) & (m >= 0)).all()):
        raise ValueError(f"hotloop.{op}: `mask` must be bool, or 0 / 1 integers, or finite weights >= 0")
    return m
