"""Row layout shared by every kernel over logits: [..., V] seen as [B, T, V] with unit stride along V.

Kernels take the two leading strides, so `logits[:, :-1]` (row stride != V) runs without a copy.
"""
from __future__ import annotations

import torch
from torch import Tensor


def rows3d(t: Tensor) -> Tensor | None:
    """Return a [B, T, V] view of `t` ([..., V]) with stride(2) == 1, or None when no such view exists."""
    V = t.shape[-1]
    if t.stride(-1) != 1 and V > 1:
        return None
    groups: list[list[int]] = []  # [size, stride] of the leading dims after merging, outermost first
    for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
        if size == 1:
            continue
        if groups and groups[-1][1] == stride * size:
            groups[-1] = [groups[-1][0] * size, stride]
        else:
            groups.append([size, stride])
    if len(groups) > 2:
        return None
    while len(groups) < 2:
        groups.insert(0, [1, 0])
    (b, sb), (n, sn) = groups
    return t.as_strided((b, n, V), (sb, sn, 1), t.storage_offset())


def rows3d_or_copy(t: Tensor) -> Tensor:
    """Like rows3d, copying to contiguous memory only when the leading dims cannot be merged into two."""
    view = rows3d(t)
    return view if view is not None else rows3d(t.contiguous())
