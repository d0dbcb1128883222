"""Per-token log-probs, entropy and self-certainty from logits in one pass over the vocabulary
(docs/token_stats.md).

Layers, outermost first:
  token_stats / token_logprobs   public API: checks, TokenStats
  hotloop::token_stats_fwd/_bwd  torch.library custom ops (fake kernels + autograd), traced by torch.compile;
                                 each runs dispatch.kernel(op, device): the backend is picked per call
  kernels                        reference.token_stats (torch), hotloop._C.cpu (C++),
                                 triton_kernels.token_stats (Triton), hotloop._C.cuda (CUDA C++)

Kernel contract (every backend): logits [B, T, V] with stride(2) == 1 and any leading strides; labels [B, T]
contiguous; outputs [B, T] float32 (float64 for float64 logits), entropy / self-certainty as [0] when not
asked for; backward writes d logits into a [B, T, V] tensor that may be the logits themselves.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from hotloop._internal import dispatch
from hotloop._internal.checks import (check_index, check_label_range, check_logits_labels, check_positive,
                             labels_checked_on_host)
from hotloop._internal.layout import rows3d, rows3d_or_copy
from hotloop._internal.memory import empty_large
from hotloop.reference.token_stats import token_stats_bwd_ref, token_stats_fwd_ref

_OP = "token_stats"


class TokenStats(NamedTuple):
    """Per-token statistics, each of the labels' shape, float32 (float64 for float64 logits); None if not asked."""

    logprobs: Tensor
    entropy: Tensor | None
    self_certainty: Tensor | None


for _op, _triton in (("token_stats_fwd", "token_stats_fwd_triton"), ("token_stats_bwd", "token_stats_bwd_triton")):
    dispatch.register(_op, "cpu", dispatch.extension("cpu", _op))
    dispatch.register(_op, "triton", f"hotloop.triton_kernels.token_stats:{_triton}")
    dispatch.register(_op, "cuda", dispatch.extension("cuda", _op))
dispatch.register("token_stats_fwd", "reference", token_stats_fwd_ref)
dispatch.register("token_stats_bwd", "reference", token_stats_bwd_ref)


def _out_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------- forward op
@torch.library.custom_op("hotloop::token_stats_fwd", mutates_args=())
def token_stats_fwd(logits: Tensor, labels: Tensor, temperature: float, ignore_index: int, entropy: bool,
                    self_certainty: bool, inplace_backward: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (logprobs, entropy or [0], self_certainty or [0], lse); lse = logsumexp(logits / T), kept for backward."""
    x = rows3d_or_copy(logits)
    lab = labels.reshape(x.shape[:2]).contiguous()
    if lab.numel() == 0:
        empty = logits.new_empty(labels.shape, dtype=_out_dtype(logits))
        none = logits.new_empty(0, dtype=_out_dtype(logits))
        return empty, (empty.clone() if entropy else none), (empty.clone() if self_certainty else none.clone()), \
            empty.clone()
    lp, ent, sc, lse = dispatch.kernel("token_stats_fwd", x.device)(x, lab, temperature, ignore_index, entropy,
                                                                      self_certainty)
    shape = labels.shape
    return lp.view(shape), (ent.view(shape) if entropy else ent), (sc.view(shape) if self_certainty else sc), \
        lse.view(shape)


@token_stats_fwd.register_fake
def _(logits, labels, temperature, ignore_index, entropy, self_certainty, inplace_backward):
    dtype = _out_dtype(logits)
    full = lambda: logits.new_empty(labels.shape, dtype=dtype)  # noqa: E731
    none = lambda: logits.new_empty(0, dtype=dtype)  # noqa: E731
    return full(), (full() if entropy else none()), (full() if self_certainty else none()), full()


# ---------------------------------------------------------------------------------------------- backward ops
def _grad_rows(g: Tensor | None, shape: torch.Size, dtype: torch.dtype) -> Tensor | None:
    # upstream grads may be broadcast views (stride 0, e.g. from .sum()); kernels read them contiguous
    return None if g is None else g.to(dtype).reshape(shape).contiguous()


def _run_bwd(grad: Tensor, grad_logprobs, grad_entropy, grad_self_certainty, logits, labels, lse, entropy,
             temperature, ignore_index) -> None:
    """Write d loss / d logits into `grad`: a fresh contiguous tensor of logits' shape, or logits itself."""
    x = rows3d_or_copy(logits)
    rows = x.shape[:2]
    if x.shape[0] * x.shape[1] == 0:
        return
    out = x if grad is logits else grad.view(x.shape)
    dt = _out_dtype(logits)
    dispatch.kernel("token_stats_bwd", x.device)(
        out, _grad_rows(grad_logprobs, rows, dt), _grad_rows(grad_entropy, rows, dt),
        _grad_rows(grad_self_certainty, rows, dt), x, labels.reshape(rows).contiguous(),
        lse.reshape(rows).contiguous(), None if entropy is None else entropy.reshape(rows).contiguous(),
        temperature, ignore_index,
    )


@torch.library.custom_op("hotloop::token_stats_bwd", mutates_args=())
def token_stats_bwd(grad_logprobs: Tensor | None, grad_entropy: Tensor | None, grad_self_certainty: Tensor | None,
                    logits: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor | None, temperature: float,
                    ignore_index: int) -> Tensor:
    """d loss / d logits, in logits' dtype and shape (contiguous)."""
    grad = empty_large(logits.shape, logits.dtype, logits.device)
    _run_bwd(grad, grad_logprobs, grad_entropy, grad_self_certainty, logits, labels, lse, entropy, temperature,
             ignore_index)
    return grad


@token_stats_bwd.register_fake
def _(grad_logprobs, grad_entropy, grad_self_certainty, logits, labels, lse, entropy, temperature, ignore_index):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("hotloop::token_stats_bwd_inplace", mutates_args=("logits",))
def token_stats_bwd_inplace(grad_logprobs: Tensor | None, grad_entropy: Tensor | None,
                            grad_self_certainty: Tensor | None, logits: Tensor, labels: Tensor, lse: Tensor,
                            entropy: Tensor | None, temperature: float, ignore_index: int) -> None:
    """Overwrites `logits` with d loss / d logits (saves the [N, V] gradient buffer)."""
    if rows3d(logits) is None:  # leading dims not viewable as two strides: compute aside, copy into the storage
        logits.copy_(token_stats_bwd(grad_logprobs, grad_entropy, grad_self_certainty, logits, labels, lse, entropy,
                                     temperature, ignore_index))
        return
    _run_bwd(logits, grad_logprobs, grad_entropy, grad_self_certainty, logits, labels, lse, entropy, temperature,
             ignore_index)


@token_stats_bwd_inplace.register_fake
def _(grad_logprobs, grad_entropy, grad_self_certainty, logits, labels, lse, entropy, temperature, ignore_index):
    return None


# ---------------------------------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, entropy, self_certainty, inplace_backward = inputs
    _, ent, _, lse = output
    ctx.save_for_backward(logits, labels, lse, ent if entropy else None)
    ctx.cfg = (temperature, ignore_index, entropy, self_certainty, inplace_backward)


def _backward(ctx, g_logprobs, g_entropy, g_self_certainty, g_lse):
    logits, labels, lse, ent = ctx.saved_tensors
    temperature, ignore_index, entropy, self_certainty, inplace = ctx.cfg
    g_entropy = g_entropy if entropy else None
    g_self_certainty = g_self_certainty if self_certainty else None
    args = (g_logprobs, g_entropy, g_self_certainty, logits, labels, lse, ent, temperature, ignore_index)
    # rows that share memory (expanded / stride-0 logits) would all write one storage: compute those out of place
    if inplace and torch._debug_has_internal_overlap(logits) != 1:  # 1 = overlap; 2 = "too hard", e.g. a slice
        torch.ops.hotloop.token_stats_bwd_inplace(*args)
        grad = logits
    else:
        grad = torch.ops.hotloop.token_stats_bwd(*args)
    return grad, None, None, None, None, None, None


token_stats_fwd.register_autograd(_backward, setup_context=_setup_context)


# -------------------------------------------------------------------------------------------------- public API
def token_stats(logits: Tensor, labels: Tensor, *, temperature: float = 1.0, ignore_index: int = -100,
                entropy: bool = True, self_certainty: bool = False, inplace_backward: bool = False) -> TokenStats:
    """Per-token log-prob of `labels`, entropy and self-certainty of softmax(logits / temperature), in one pass.

    Args:
        logits: [..., V] float32 / bfloat16 / float16 (float64 on CPU). Any leading strides: `logits[:, :-1]`
            is read in place. The vocabulary dim must have unit stride (else it is copied).
        labels: [...] int32 / int64, the leading shape of `logits`; `ignore_index` marks positions to skip.
        temperature: divides the logits (sampling temperature), > 0.
        ignore_index: label value whose outputs are 0 and get no gradient (-100 as in torch / TRL).
        entropy: also return the entropy H(p) = -sum_v p_v log p_v.
        self_certainty: also return KL(U || p) = -mean_v log p_v - log V (Kang et al. 2025).
        inplace_backward: the backward writes d logits into `logits`' own storage (saves an [N, V] buffer;
            `logits` is overwritten, so nothing else may need it afterwards).

    Returns:
        TokenStats(logprobs, entropy, self_certainty), each [...] float32 (float64 for float64 logits) or None
        when not asked for. Differentiable w.r.t. `logits` through all three; the gradient has logits' dtype.
    """
    check_logits_labels(_OP, logits, labels)
    temperature = check_positive(_OP, "temperature", temperature)
    ignore_index = check_index(_OP, "ignore_index", ignore_index)
    dispatch.backend("token_stats_fwd", logits.device)  # a bad HOTLOOP_BACKEND fails here, before any work
    if labels_checked_on_host(labels.device):
        check_label_range(_OP, labels, logits.shape[-1], ignore_index)
    lp, ent, sc, _ = torch.ops.hotloop.token_stats_fwd(
        logits, labels, temperature, ignore_index, entropy, self_certainty, inplace_backward)
    return TokenStats(lp, ent if entropy else None, sc if self_certainty else None)


def token_logprobs(logits: Tensor, labels: Tensor, *, temperature: float = 1.0, ignore_index: int = -100,
                   inplace_backward: bool = False) -> Tensor:
    """log softmax(logits / temperature)[label] per position: [..., V], [...] -> [...] float32.

    A drop-in for TRL's `selective_log_softmax(logits / T, labels)` (plus ignore_index); see `token_stats`.
    """
    return token_stats(logits, labels, temperature=temperature, ignore_index=ignore_index, entropy=False,
                       inplace_backward=inplace_backward).logprobs
