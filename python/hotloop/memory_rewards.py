"""Rewards from an EpisodicMemory (docs/knn.md): NGU episodic novelty and Memory-R style exploit / explore rewards.

Both are [Q] float32 tensors on the memory's device, computed without host syncs (beyond hotloop.knn's optional
finiteness check of the queries), ready to add to per-response GRPO rewards. Their running statistics live in
`memory.stats` (saved with the memory, reset by `memory.clear()`). Neither function adds the queries to the memory:
call `memory.add` afterwards, as NGU does after computing the reward.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from hotloop._internal.checks import check_positive
from hotloop.memory import EpisodicMemory
from hotloop.ops.knn import knn_unchecked_keys

_TINY = 1e-30


def _check_memory(op: str, memory: object) -> EpisodicMemory:
    if not isinstance(memory, EpisodicMemory):
        raise TypeError(f"hotloop.{op}: `memory` must be a hotloop.EpisodicMemory, got {type(memory).__name__}")
    return memory


def novelty_reward(memory: EpisodicMemory, queries: Tensor, *, k: int = 10, xi: float = 0.008, eps: float = 1e-3,
                   c: float = 1e-3, s_max: float = 8.0) -> Tensor:
    """NGU's episodic novelty of each query: [Q, dim] -> [Q] float32 (docs/knn.md; Badia et al. 2020, Alg. 1).

    With d_j^2 the squared L2 distances to the k nearest entries (memory metric must be "l2") and d_m^2 the
    running mean of all such squared distances seen so far (kept in memory.stats, updated with this batch's
    first):
        d_n = max(d_j^2 / d_m^2 - xi, 0),  K_j = eps / (d_n + eps),  s = sqrt(sum_j K_j) + c,
        reward = 1 / s, or 0 when s > s_max.
    While the memory holds fewer than k entries only the existing neighbours count; an empty memory gives 1 / c.
    """
    op = "novelty_reward"
    memory = _check_memory(op, memory)
    if memory.metric != "l2":
        raise ValueError(f"hotloop.{op}: needs a memory with metric 'l2', got {memory.metric!r}")
    if isinstance(xi, bool) or not isinstance(xi, (int, float)) or not 0.0 <= xi < float("inf"):
        raise ValueError(f"hotloop.{op}: `xi` must be a finite number >= 0, got {xi!r}")
    eps, c, s_max = (check_positive(op, n, v) for n, v in (("eps", eps), ("c", c), ("s_max", s_max)))
    scores, slots = memory.search(queries, k)
    found = slots >= 0
    d2 = torch.where(found, scores, torch.zeros_like(scores)).double()
    total = memory.stats.setdefault("ngu_sum", torch.zeros((), dtype=torch.float64, device=memory.device))
    count = memory.stats.setdefault("ngu_count", torch.zeros((), dtype=torch.float64, device=memory.device))
    total.add_(d2.sum())
    count.add_(found.sum())
    mean = total / count.clamp_min(1.0)
    d_n = (d2 / mean.clamp_min(_TINY) - xi).clamp_min(0.0)
    kern = torch.where(found, eps / (d_n + eps), torch.zeros_like(d_n))
    s = kern.sum(dim=1).sqrt() + c
    return torch.where(s > s_max, torch.zeros_like(s), 1.0 / s).float()


class MemoryRewards(NamedTuple):
    exploit: Tensor  # [Q] float32 in [0, 1]
    explore: Tensor  # [Q] float32 in [0, 1]


def _rolling_minmax_norm(memory: EpisodicMemory, name: str, x: Tensor, window: int) -> Tensor:
    """Append x [Q] (float64) to the rolling window `name` (the last `window` values, NaN = empty slot), then
    min-max normalise x over the window: (x - min) / (max - min), 0 when max == min, clamped to [0, 1]."""
    dev = memory.device
    buf = memory.stats.get(name)
    if buf is None or buf.numel() != window:
        buf = memory.stats[name] = torch.full((window,), float("nan"), dtype=torch.float64, device=dev)
    ptr = memory.stats.setdefault(name + "_ptr", torch.zeros((), dtype=torch.int64, device=dev))
    n = x.numel()
    slots = (ptr + torch.arange(n, device=dev)) % window
    keep = slice(max(0, n - window), n)
    # NaN rows (no neighbour: every row at once, the memory being empty) keep the window as it was
    fresh = ~torch.isnan(x)
    buf.index_copy_(0, slots[keep], torch.where(fresh, x, buf[slots])[keep])
    ptr.copy_((ptr + n * fresh.any()) % window)
    present = ~torch.isnan(buf)
    lo = torch.where(present, buf, torch.full_like(buf, float("inf"))).amin()
    hi = torch.where(present, buf, torch.full_like(buf, float("-inf"))).amax()
    span = hi - lo
    normed = torch.where(span > 0, (x - lo) / span.clamp_min(_TINY), torch.zeros_like(x))
    return normed.clamp(0.0, 1.0)


def memory_rewards(memory: EpisodicMemory, embeddings: Tensor, *, k: int = 8, window: int = 1024) -> MemoryRewards:
    """Memory-R style exploit / explore rewards of embeddings [Q, dim] against a memory (docs/knn.md).

    With e an embedding, its k nearest keys (the memory's metric) and their values v_j (the keys themselves in
    a key-only memory; the value width must equal dim):
        exploit = 1 - norm(||e - mean_j v_j||)            close to what the memory holds: reward it
        explore = norm(1 - max_i cos(e, v_i))             the max over every stored value (a fused cosine kNN)
    where norm is a min-max normalisation over a rolling window of the last `window` raw values of that term
    (this batch included; kept in memory.stats), 0 when the window's values are all equal. Use one memory per
    outcome (e.g. past correct vs incorrect reasoning) and combine the rewards as the method prescribes.
    With an empty memory every row gets exploit 0 and explore 1, and the windows record nothing.
    Returns MemoryRewards(exploit [Q], explore [Q]), float32.
    """
    op = "memory_rewards"
    memory = _check_memory(op, memory)
    table = memory.keys if memory.values is None else memory.values
    if table.shape[1] != memory.dim:
        raise ValueError(f"hotloop.{op}: value_dim ({table.shape[1]}) must equal the key dim ({memory.dim}): "
                         "the exploit term compares embeddings with the neighbours' values")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"hotloop.{op}: `window` must be an int >= 1, got {window!r}")
    _, slots = memory.search(embeddings, k)
    found = slots >= 0
    any_found = found.any(dim=1)
    rows = table[slots.clamp_min(0)].double() * found[..., None]
    centroid = rows.sum(dim=1) / found.sum(dim=1, keepdim=True).clamp_min(1)
    dist = torch.linalg.vector_norm(embeddings.double() - centroid, dim=1)
    best_cos, _ = knn_unchecked_keys(embeddings, table, 1, "cosine", memory.valid_mask())
    novelty = 1.0 - best_cos[:, 0].double()
    nan = torch.full_like(dist, float("nan"))  # rows without neighbours leave the windows untouched
    exploit = 1.0 - _rolling_minmax_norm(memory, "exploit_window", torch.where(any_found, dist, nan), window)
    explore = _rolling_minmax_norm(memory, "explore_window", torch.where(any_found, novelty, nan), window)
    exploit = torch.where(any_found, exploit, torch.zeros_like(exploit))
    explore = torch.where(any_found, explore, torch.ones_like(explore))
    return MemoryRewards(exploit.float(), explore.float())
