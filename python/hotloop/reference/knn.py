"""docs/knn.md in plain torch: brute-force k nearest neighbours (the spec of `hotloop.knn`, not a fast path).

For queries q_i [Q, d] and keys x_j [M, d], each metric gives a score per pair and an order:

    "l2"      ||q_i - x_j||^2, the SQUARED Euclidean distance (as FAISS IndexFlatL2), ascending
    "ip"      q_i . x_j, descending
    "cosine"  q_i . x_j / (max(||q_i||, EPS) * max(||x_j||, EPS)), descending (a zero vector scores 0)

Ties are broken by the lower key index. Keys with valid[j] == False are never returned. When fewer than k keys are
valid, the rows are padded with index -1 and score +inf ("l2") or -inf ("ip", "cosine").

Math in float64 on the host; returns (scores [Q, k] float32, indices [Q, k] int64) on the queries' device.
Memory: the full [Q, M] score matrix (that is what the kernels avoid).
"""
from __future__ import annotations

import torch
from torch import Tensor

from hotloop.contracts import KNN_COSINE_EPS as EPS
from hotloop.contracts import KNN_METRICS as METRICS  # noqa: F401


def knn_scores_ref(queries: Tensor, keys: Tensor, metric: str) -> Tensor:
    """-> [Q, M] float64 scores (squared distances for "l2")."""
    q, x = queries.detach().double().cpu(), keys.detach().double().cpu()
    if metric == "l2":
        return torch.cdist(q, x, compute_mode="donot_use_mm_for_euclid_dist").square()  # exact, no cancellation
    dots = q @ x.T
    if metric == "ip":
        return dots
    return dots / (q.norm(dim=1).clamp_min(EPS)[:, None] * x.norm(dim=1).clamp_min(EPS)[None, :])


def knn_ref(queries: Tensor, keys: Tensor, k: int, metric: str = "l2", valid: Tensor | None = None
            ) -> tuple[Tensor, Tensor]:
    """queries [Q, d], keys [M, d], 1 <= k <= M, optional valid [M] bool -> (scores [Q, k], indices [Q, k])."""
    scores = knn_scores_ref(queries, keys, metric)
    Q, M = scores.shape
    ascending = metric == "l2"
    pad = float("inf") if ascending else float("-inf")
    # order by (score, index): a stable sort on the score keeps the lower index first among equal scores
    order_key = scores if ascending else -scores
    if valid is not None:
        order_key = order_key.masked_fill(~valid.detach().cpu().bool()[None, :], float("inf"))
    idx = torch.sort(order_key, dim=1, stable=True).indices[:, :k]
    out = scores.gather(1, idx)
    if valid is not None:
        bad = ~valid.detach().cpu().bool()[idx]
        idx = idx.masked_fill(bad, -1)
        out = out.masked_fill(bad, pad)
    return out.float().to(queries.device), idx.to(queries.device)
