"""The CPU kernel of the fused linear losses (hotloop.ops.fused_linear): the tile engine's one pass over the
loss's chunks (hotloop.cpu.tile_engine.one_pass), each chunk finished while its logits are in the buffer:
    z = h_chunk @ W^T (+ b)        per vocabulary tile into a reusable [rows, V] buffer
    token_stats_fwd (C++)          per tile, statistics merged exactly -> logp, entropy, lse
    loss.chunk_grads(logp, ent)    the loss's d loss / d logp (and d loss / d entropy) for the chunk's tokens
    token_stats_bwd (C++)          per tile: d loss / d logits, in place
    d_h[chunk] = G W;  d_W += G^T h_chunk;  d_b += sum G
A loss that cannot be split into such chunks (a sequence-level ratio, a pair longer than the buffer) goes
through the two-pass driver instead.
d_W is accumulated in the weight's dtype across chunks: exact to float32 for float32 weights; a bf16 / fp16
weight gradient is rounded once per chunk (4 roundings for 2048 tokens at H = 1024; the error is measured in the
tests).
"""
from __future__ import annotations

from torch import Tensor

from hotloop.cpu.tile_engine import one_pass


def fused_linear_loss_cpu(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
                          loss, need_hidden: bool, need_weight: bool, need_bias: bool, filter_eps: float
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """fused_linear.run's CPU kernel: (d_hidden [N, H] | [0], d_weight [V, H] | [0], d_bias [V] | [0])."""
    chunks = loss.chunks(labels, *weight.shape, hidden.element_size())
    if chunks is None:
        from hotloop.ops.fused_linear import two_pass  # (the driver is the ops layer's; it calls back down)

        return two_pass(hidden, weight, bias, labels, temperature, loss, need_hidden, need_weight, need_bias,
                        filter_eps)
    return one_pass(hidden, weight, bias, labels, temperature, chunks, loss.chunk_grads, loss.entropy, need_hidden,
                    need_weight, need_bias and bias is not None, filter_eps)
