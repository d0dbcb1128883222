"""k nearest neighbours: fused distance + top-k that never holds the [Q, M] score matrix (docs/knn.md).

Layers, outermost first:
  knn                   public API: checks (shapes, dtypes, devices, k, finite values)
  hotloop::knn_fwd      torch.library custom op with a fake kernel; no autograd: the selection is not
                        differentiable (gather the returned indices and recompute the scores for a gradient)
  kernels               dispatch.kernel: reference.knn (torch), hotloop._C.cpu.knn (blocked BLAS tiles +
                        per-query heaps), hotloop._C.cuda.knn (fused distance tiles + shared-memory select +
                        merge); there is no Triton kernel, so CUDA tensors run the CUDA C++ one

Kernel contract (every backend): queries [Q, d] and keys [M, d] of one dtype (float32 / bfloat16 / float16),
1 <= k <= M, valid None or [M] bool -> (scores [Q, k] float32, indices [Q, k] int64), best first, ties to the
lower index, -1 / +-inf padding where fewer than k keys are valid; see hotloop.reference.knn for the spec.
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor

from hotloop._internal import dispatch
from hotloop._internal.checks import check_same_device, check_tensor, labels_checked_on_host
from hotloop.contracts import KNN_METRICS as METRICS
from hotloop.reference.knn import knn_ref

_OP = "knn"
dispatch.register("knn_fwd", "reference", knn_ref)
dispatch.register("knn_fwd", "cpu", dispatch.extension("cpu", "knn"))
dispatch.register("knn_fwd", "cuda", dispatch.extension("cuda", "knn"))
KNN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------- forward op
@torch.library.custom_op("hotloop::knn_fwd", mutates_args=())
def knn_fwd(queries: Tensor, keys: Tensor, k: int, metric: str, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """-> (scores [Q, k] float32, indices [Q, k] int64)."""
    q, x = queries.contiguous(), keys.contiguous()
    v = None if valid is None else valid.contiguous()
    return dispatch.kernel("knn_fwd", q.device)(q, x, k, metric, v)


@knn_fwd.register_fake
def _(queries, keys, k, metric, valid):
    torch._check(queries.dim() == 2 and keys.dim() == 2)
    Q = queries.shape[0]
    return queries.new_empty((Q, k), dtype=torch.float32), queries.new_empty((Q, k), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------- checks
def check_finite(op: str, name: str, t: Tensor) -> None:
    """Raise a ValueError if `t` holds NaN or +-inf: on CPU always; on GPU it is a host sync, skipped with
    HOTLOOP_CHECK_LABELS=0 and under torch.compile (unchecked, a NaN key simply never wins: v < worst is false)."""
    if t.numel() == 0 or not labels_checked_on_host(t.device):
        return
    # the max |x| is NaN / inf exactly when some element is, and unlike isfinite(t).all() it needs no [t]-sized
    # temporaries (those cost 85 MiB at 100k x 128)
    if not bool(torch.isfinite(torch.linalg.vector_norm(t, float("inf")))):
        bad = int((~torch.isfinite(t)).flatten().to(torch.uint8).argmax())
        row = bad // t.shape[-1] if t.dim() > 1 else bad
        raise ValueError(f"hotloop.{op}: `{name}` must be finite; found {t.flatten()[bad].item()} in row {row}")


def check_k(op: str, k: object, M: int) -> int:
    if isinstance(k, bool):
        raise TypeError(f"hotloop.{op}: `k` must be an int, got bool")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"hotloop.{op}: `k` must be an int, got {type(k).__name__}") from None
    if not 1 <= k <= M:
        raise ValueError(f"hotloop.{op}: `k` must lie in [1, M] = [1, {M}] (M keys), got {k}")
    return k


def check_knn_inputs(op: str, queries: Tensor, keys: Tensor, metric: str, valid: Tensor | None) -> None:
    check_tensor(op, "queries", queries, dtypes=KNN_DTYPES)
    check_tensor(op, "keys", keys, dtypes=KNN_DTYPES)
    if queries.dim() != 2 or keys.dim() != 2:
        raise ValueError(f"hotloop.{op}: `queries` must be [Q, d] and `keys` [M, d], got shapes "
                         f"{tuple(queries.shape)} and {tuple(keys.shape)}")
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(f"hotloop.{op}: `queries` have dim d = {queries.shape[1]} but `keys` have "
                         f"d = {keys.shape[1]}")
    if queries.dtype != keys.dtype:
        raise TypeError(f"hotloop.{op}: `queries` ({queries.dtype}) and `keys` ({keys.dtype}) must have the "
                        f"same dtype")
    if metric not in METRICS:
        raise ValueError(f"hotloop.{op}: `metric` must be one of {METRICS}, got {metric!r}")
    check_same_device(op, queries=queries, keys=keys, valid=valid)
    if valid is not None:
        check_tensor(op, "valid", valid, dtypes=(torch.bool,))
        if tuple(valid.shape) != (keys.shape[0],):
            raise ValueError(f"hotloop.{op}: `valid` must be [M] = [{keys.shape[0]}] like `keys`, "
                             f"got {tuple(valid.shape)}")


# -------------------------------------------------------------------------------------------------- public API
def knn_unchecked_keys(queries: Tensor, keys: Tensor, k: int, metric: str, valid: Tensor | None
                       ) -> tuple[Tensor, Tensor]:
    """`knn` without the finiteness check of `keys` (EpisodicMemory checked them when they were added)."""
    check_knn_inputs(_OP, queries, keys, metric, valid)
    k = check_k(_OP, k, keys.shape[0])
    check_finite(_OP, "queries", queries)
    queries, keys = queries.detach(), keys.detach()
    dispatch.backend("knn_fwd", queries.device)  # a bad HOTLOOP_BACKEND fails here, before any work
    return torch.ops.hotloop.knn_fwd(queries, keys, k, metric, valid)


def knn(queries: Tensor, keys: Tensor, k: int, *, metric: str = "l2", valid: Tensor | None = None
        ) -> tuple[Tensor, Tensor]:
    """The k best keys for each query, by exact brute force, without the [Q, M] score matrix.

    Args:
        queries: [Q, d] float32 / bfloat16 / float16.
        keys: [M, d], same dtype and device as `queries`.
        k: 1 <= k <= M (any size: k > 2048 too).
        metric: "l2": SQUARED Euclidean distance, ascending (as FAISS IndexFlatL2), computed in float32 as
            ||q||^2 + ||x||^2 - 2 q.x and clamped at 0; "ip": inner product, descending; "cosine": cosine
            similarity, descending, with norms clamped at 1e-8 (a zero vector scores 0).
        valid: optional [M] bool; keys with False (unused memory slots) are never returned.

    Returns:
        (scores [Q, k] float32, indices [Q, k] int64), best first; equal scores are ordered by the lower index.
        Where fewer than k keys are valid, the tail is padded with index -1 and score +inf ("l2") or -inf.
        Not differentiable: to train through the neighbours, gather keys[indices] and recompute the scores.

    NaN / inf in `queries` or `keys` raise a ValueError: always on CPU; on GPU the check is one host sync,
    skipped with HOTLOOP_CHECK_LABELS=0 and under torch.compile. bfloat16 / float16 inputs are upcast to
    float32 tile by tile; all arithmetic is float32.
    """
    check_knn_inputs(_OP, queries, keys, metric, valid)
    check_finite(_OP, "keys", keys)
    return knn_unchecked_keys(queries, keys, k, metric, valid)
