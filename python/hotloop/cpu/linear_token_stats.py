"""The CPU kernels of hotloop::linear_token_stats_fwd / _bwd: the tile engine's vocabulary-major passes
(hotloop.cpu.tile_engine) over the rows that count.

Rows whose label is ignore_index are dropped before any matmul: padding (often a third of an RL batch) costs
nothing, and a non-finite hidden state there cannot reach d_weight through 0 * NaN.
"""
from __future__ import annotations

import torch
from torch import Tensor

from hotloop.cpu.tile_engine import grads_by_vocab, stats_by_vocab
from hotloop.cpu.vocab_tiles import TokenGrads


def _kept_rows(labels: Tensor, ignore_index: int) -> Tensor | None:
    """Indices of the rows that count, or None when all of them do."""
    keep = labels != ignore_index
    return None if bool(keep.all()) else keep.nonzero().squeeze(1)


def _scatter_rows(values: Tensor, idx: Tensor, n: int) -> Tensor:
    """[k, ...] values of rows idx -> [n, ...] with zeros elsewhere."""
    full = values.new_zeros((n, *values.shape[1:]))
    full[idx] = values
    return full


def _take_rows(t: Tensor | None, idx: Tensor | None) -> Tensor | None:
    return t if t is None or idx is None else t.index_select(0, idx)


def linear_token_stats_fwd_cpu(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                               temperature: float, ignore_index: int, entropy: bool, self_certainty: bool
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """hidden [N, H], weight [V, H], bias [V] | None, labels [N] -> (logprobs, entropy | [0], sc | [0], lse) [N]."""
    idx = _kept_rows(labels, ignore_index)
    outs = stats_by_vocab(_take_rows(hidden, idx), weight, bias, _take_rows(labels, idx), temperature, entropy,
                          self_certainty)
    n, empty = hidden.shape[0], hidden.new_empty(0, dtype=outs[0].dtype)
    # outputs of a custom op may not alias: each absent one is its own empty tensor
    return tuple(empty.clone() if t is None else t if idx is None else _scatter_rows(t, idx, n) for t in outs)


def linear_token_stats_bwd_cpu(grad_logprobs: Tensor | None, grad_entropy: Tensor | None,
                               grad_self_certainty: Tensor | None, hidden: Tensor, weight: Tensor,
                               bias: Tensor | None, labels: Tensor, lse: Tensor, entropy: Tensor | None,
                               temperature: float, ignore_index: int, need_hidden: bool, need_weight: bool,
                               need_bias: bool, filter_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> (d_hidden [N, H] | [0], d_weight [V, H] | [0], d_bias [V] | [0]) in the inputs' dtypes.
    filter_eps > 0: gradient filtering (vocab_tiles.live_columns)."""
    idx = _kept_rows(labels, ignore_index)
    if idx is not None and idx.numel() == 0:  # every row ignored: no gradient anywhere
        return (torch.zeros_like(hidden) if need_hidden else hidden.new_empty(0),
                torch.zeros_like(weight) if need_weight else weight.new_empty(0),
                torch.zeros_like(bias) if need_bias else hidden.new_empty(0))
    tokens = TokenGrads(_take_rows(labels, idx), _take_rows(lse, idx), _take_rows(grad_logprobs, idx),
                        _take_rows(grad_entropy, idx), _take_rows(entropy, idx), _take_rows(grad_self_certainty, idx))
    d_h, d_w, d_b = grads_by_vocab(tokens, _take_rows(hidden, idx), weight, bias, temperature, need_hidden,
                                   need_weight, need_bias, filter_eps)
    return (_scatter_rows(d_h, idx, hidden.shape[0]) if need_hidden and idx is not None else d_h), d_w, d_b
