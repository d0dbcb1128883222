"""docs/ema.md in plain torch: the EMA of a model's tensors, target <- d * target + (1 - d) * online.

One tensor at a time, float32 math (float64 for float64 tensors) with ATen's lerp (w = 1 - d), rounded once to
the target's dtype; `out_copy[i]`, when given, receives the new target rounded to its own dtype (an empty
out_copy[i] next to a non-empty target: no copy of that one). `decay` is a
float or a one-element tensor (used on device, never read to the host). Memory: one float32 temporary per tensor.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.no_grad()
def ema_update_ref(target: Sequence[Tensor], online: Sequence[Tensor], decay: float | Tensor,
                   out_copy: Sequence[Tensor] | None = None) -> None:
    """In place: target[i] <- lerp(target[i], online[i], 1 - decay); out_copy[i] <- the new target[i]."""
    for i, (t, s) in enumerate(zip(target, online)):
        acc = _acc(t)
        w = (1 - decay).to(device=t.device, dtype=acc).reshape(()) if isinstance(decay, Tensor) else 1.0 - decay
        new = torch.lerp(t.to(acc), s.to(acc), w)
        t.copy_(new)
        if out_copy is not None and (out_copy[i].numel() or not t.numel()):  # empty: no copy of this one
            out_copy[i].copy_(new)


def ema_update_kernel_ref(target: list[Tensor], online: list[Tensor], out_copy: list[Tensor], decay: float,
                          decay_tensor: Tensor | None) -> None:
    """The reference backend's kernel of hotloop::ema_update (out_copy empty: no copies; decay_tensor, when
    given, overrides decay)."""
    ema_update_ref(target, online, decay if decay_tensor is None else decay_tensor, out_copy or None)
