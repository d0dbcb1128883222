"""Sequence log-probs for preference losses (docs/preference_loss.md): s = Σ_t m_t log p(y_t), or its mean over the sequence's
tokens, per sequence of a padded [B, T] or packed [N] (cu_seqlens) batch, differentiable.

The per-token work is hotloop.token_logprobs / linear_token_logprobs (their C++ / Triton kernels, forward and
backward, no [N, V] logits for the linear form); masked-out tokens are passed to them as ignore_index, so they
cost nothing and carry no gradient. The per-sequence sum is a segment sum over rows (RowLayout).
"""
from __future__ import annotations

import torch
from torch import Tensor

from hotloop._internal.checks import LABEL_DTYPES, check_tensor
from hotloop.contracts import IGNORE_INDEX as IGNORE
from hotloop.ops.linear_token_stats import linear_token_logprobs
from hotloop._internal.loss_checks import MASK_DTYPES, check_like, check_token_layout, float_mask
from hotloop._internal.row_layout import RowLayout
from hotloop.ops.token_stats import token_logprobs


def _check(op: str, labels: Tensor, mask: Tensor, cu_seqlens: Tensor | None) -> None:
    check_tensor(op, "labels", labels, dtypes=LABEL_DTYPES)
    check_token_layout(op, labels.new_empty(labels.shape, dtype=torch.float32), cu_seqlens, "labels")
    check_like(op, "mask", mask, labels, dtypes=MASK_DTYPES)


def _reduce(op: str, logp: Tensor, mask: Tensor, average: bool, cu_seqlens: Tensor | None) -> Tensor:
    """Per-token log-probs (0 where masked) -> [B] masked sums or means (float32; an empty sequence gives 0)."""
    layout = RowLayout(logp.shape, cu_seqlens, logp.device)
    m = float_mask(op, mask, logp.dtype)
    sums = layout.row_sum(logp.reshape(-1) * m)
    if not average:
        return sums
    lengths = layout.row_sum(m)
    return sums / torch.where(lengths != 0, lengths, 1.0)


def sequence_logprobs(logits: Tensor, labels: Tensor, mask: Tensor, *, average: bool = False,
                      temperature: float = 1.0, cu_seqlens: Tensor | None = None) -> Tensor:
    """Per-sequence log-prob of the labels: Σ_t m_t log softmax(logits_t / temperature)[y_t] (mean with `average`).

    Args:
        logits: [B, T, V] (or packed [N, V] with cu_seqlens), float32 / bfloat16 / float16; any leading strides,
            so logits[:, :-1] is read in place.
        labels: [B, T] (or [N]) int32 / int64; positions with mask 0 may hold anything (padding ids).
        mask: labels' shape, bool / 0-1 integers / float weights >= 0.
        average: divide each sum by the sequence's mask total (IPO, SimPO, ORPO use means).
        cu_seqlens: [B + 1] boundaries of packed sequences.

    Returns:
        [B] float32 (float64 for float64 logits), differentiable w.r.t. logits.
    """
    _check("sequence_logprobs", labels, mask, cu_seqlens)
    labels_eff = torch.where(mask != 0, labels, IGNORE)
    logp = token_logprobs(logits, labels_eff, temperature=temperature, ignore_index=IGNORE)
    return _reduce("sequence_logprobs", logp, mask, average, cu_seqlens)


def linear_sequence_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor, *,
                             bias: Tensor | None = None, average: bool = False, temperature: float = 1.0,
                             cu_seqlens: Tensor | None = None) -> Tensor:
    """sequence_logprobs of the logits hidden @ weight.T (+ bias), never holding them.

    hidden [B, T, H] (or packed [N, H]), weight [V, H], bias [V]; labels, mask, average, temperature, cu_seqlens
    as in `sequence_logprobs`. -> [B] float32, differentiable w.r.t. hidden, weight and bias.
    """
    _check("linear_sequence_logprobs", labels, mask, cu_seqlens)
    labels_eff = torch.where(mask != 0, labels, IGNORE)
    logp = linear_token_logprobs(hidden, weight, labels_eff, bias=bias, temperature=temperature,
                                 ignore_index=IGNORE)
    return _reduce("linear_sequence_logprobs", logp, mask, average, cu_seqlens)
