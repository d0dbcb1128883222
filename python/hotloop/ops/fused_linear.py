"""The driver every fused linear loss shares (linear_policy_loss, linear_nft_loss, linear_preference_loss): the
per-token log-probs (and entropy) of hidden @ W^T (+ b), the loss's gradient w.r.t. them, and the gradients of
hidden / weight / bias, without the [N, V] logits.

A loss plugs in as a strategy (FusedLoss): how to split its tokens into chunks a CPU one-pass can finish alone,
and its per-token gradient for a chunk or for all tokens. The backend's kernel of "fused_linear_loss" runs it:
  cpu        the tile engine's one pass when the strategy gives chunks (hotloop.cpu.linear_loss), else two_pass
  triton, reference   two_pass: the linear log-prob kernels' forward over every token, the strategy's gradient,
             then their backward with it (the logits recomputed)
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from hotloop._internal import dispatch
from hotloop.contracts import IGNORE_INDEX


class FusedLoss(Protocol):
    """A loss over per-token log-probs, seen by the fused linear driver. Labels are IGNORE_INDEX at every
    position that counts for nothing; the strategy gathers its value and metrics as its gradients are asked for.
    """

    entropy: bool  # whether the gradient reads the entropy (an entropy bonus)

    def chunks(self, labels: Tensor, V: int, H: int, elt: int) -> list[Tensor] | None:
        """Positions in chunks whose gradient needs only the chunk's own log-probs, sized for the CPU one pass
        (hotloop.cpu.tile_engine.chunk_rows), or None when the loss cannot be split so."""

    def chunk_grads(self, pos: Tensor, lp: Tensor, ent: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(d loss / d logp, d loss / d entropy | None) of the tokens at `pos` from their logp / entropy."""

    def token_grads(self, lp: Tensor, ent: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The same for every token at once ([N]; lp and ent are 0 at ignored positions)."""


def two_pass(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
             loss: FusedLoss, need_hidden: bool, need_weight: bool, need_bias: bool, filter_eps: float
             ) -> tuple[Tensor, Tensor, Tensor]:
    """hidden [N, H], weight [V, H], bias [V] | None, labels [N] -> (d_hidden [N, H] | [0], d_weight | [0],
    d_bias | [0]) through hotloop::linear_token_stats_fwd / _bwd (whatever backend serves them)."""
    lp, ent, _, lse = torch.ops.hotloop.linear_token_stats_fwd(hidden, weight, bias, labels, temperature,
                                                               IGNORE_INDEX, loss.entropy, False, 0.0)
    g_lp, g_ent = loss.token_grads(lp, ent if loss.entropy else None)
    return torch.ops.hotloop.linear_token_stats_bwd(
        g_lp, g_ent, None, hidden, weight, bias, labels, lse, None if g_ent is None else ent, temperature,
        IGNORE_INDEX, need_hidden, need_weight, need_bias and bias is not None, filter_eps)


def run(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float, loss: FusedLoss,
        need_hidden: bool, need_weight: bool, need_bias: bool, filter_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of `loss` w.r.t. hidden / weight / bias, by the backend serving hidden's device."""
    return dispatch.kernel("fused_linear_loss", hidden.device)(hidden, weight, bias, labels, temperature, loss,
                                                               need_hidden, need_weight, need_bias, filter_eps)


dispatch.register("fused_linear_loss", "reference", two_pass)
dispatch.register("fused_linear_loss", "cpu", "hotloop.cpu.linear_loss:fused_linear_loss_cpu")
dispatch.register("fused_linear_loss", "triton", two_pass)
