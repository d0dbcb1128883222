"""Fused linear RL losses on CPU in one pass over the logits: forward, loss gradient and backward per token block.

For a token-local loss (policy / NFT loss with a per-token ratio) each token's d loss / d logp needs only that
token, so a block of tokens is finished while its logits are in the buffer:
    z = h_blk @ W^T (+ b)                         one matmul (oneDNN / BLAS) into a reusable [rows, V] buffer
    token_stats_fwd_cpu(z) -> logp, entropy, lse  C++ kernel, one pass over the rows
    terms.grads_at(logp) -> d loss / d logp       the loss kernel on the block's tokens
    token_stats_bwd_cpu(z) -> G in place          C++ kernel: d loss / d logits
    d_h[blk] = G W;  d_W += G^T h_blk;  d_b += sum G
Three matmuls per block where a forward + recomputing backward needs four. The [N, V] logits never exist; the
buffer holds about CHUNK_BYTES of them. Rows whose mask is 0 are dropped before any matmul.
d_W is accumulated in the weight's dtype across blocks (as Liger's chunked losses do): exact to float32 for float32
weights; a bf16 / fp16 weight gradient is rounded once per block (blocks are as large as the buffer allows, so a
few roundings: the error is measured in the tests).
"""
from __future__ import annotations

import torch
from torch import Tensor

from hotloop.cpu.linear_token_stats import CHUNK_BYTES, _live_columns, _matmul_into

IGNORE = -100


def fused_linear_loss_cpu(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
                          terms, entropy_coef: float, need_hidden: bool, need_weight: bool, need_bias: bool,
                          grad_filter_eps: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """hidden [N, H], labels [N] (IGNORE where the mask is 0) -> (loss [], sums, entropy sum under the mask [],
    d_hidden [N, H] | [0], d_weight [V, H] | [0], d_bias [V] | [0]). grad_filter_eps > 0: vocabulary columns where no
    token of the block has softmax probability >= it (nor its label) skip the gradient matmuls (approximation)."""
    N, H = hidden.shape
    V = weight.shape[0]
    acc = terms.dt
    kept = (labels != IGNORE).nonzero().squeeze(1)
    rows = max(1, min(kept.numel(), CHUNK_BYTES // (V * hidden.element_size())))
    buf = hidden.new_empty(rows * V)
    w_t = weight.t()
    d_h = hidden.new_zeros((N, H)) if need_hidden else hidden.new_empty(0)
    d_w = torch.zeros_like(weight) if need_weight else weight.new_empty(0)
    d_b = hidden.new_zeros(V, dtype=acc) if need_bias else hidden.new_empty(0)
    loss = hidden.new_zeros((), dtype=acc)
    ent_sum = hidden.new_zeros((), dtype=acc)
    sums = None
    for i0 in range(0, kept.numel(), rows):
        pos = kept[i0:i0 + rows]
        h_blk, lab = hidden.index_select(0, pos), labels.index_select(0, pos)
        z = _matmul_into(buf[: pos.numel() * V].view(pos.numel(), V), h_blk, w_t, bias)
        z3 = z.unsqueeze(0)
        lp, ent, _, lse = torch.ops.hotloop.token_stats_fwd_cpu(z3, lab.unsqueeze(0), temperature, IGNORE,
                                                                True, False)
        g_lp, s = terms.grads_at(lp.reshape(-1), pos)
        w_blk = terms.w_agg.index_select(0, pos)  # the entropy bonus's weights
        ent = ent.reshape(-1)
        loss = loss + s[0] - entropy_coef * (w_blk * ent).sum()
        ent_sum = ent_sum + (terms.m.index_select(0, pos) * ent).sum()
        sums = s if sums is None else sums + s
        g_ent = (-entropy_coef * w_blk).unsqueeze(0) if entropy_coef != 0.0 else None
        live = _live_columns(z, lse.reshape(-1), lab, 0, temperature, grad_filter_eps)
        torch.ops.hotloop.token_stats_bwd_cpu(z3, g_lp.unsqueeze(0), g_ent, None, z3, lab.unsqueeze(0), lse,
                                              ent.unsqueeze(0), temperature, IGNORE)
        if need_bias:
            d_b += z.sum(0, dtype=acc)
        g_blk, w_blk = (z, weight) if live is None else (z.index_select(1, live), weight.index_select(0, live))
        if need_hidden:
            d_h.index_copy_(0, pos, torch.mm(g_blk, w_blk))
        if need_weight:
            if live is None:
                d_w.addmm_(z.t(), h_blk)
            else:
                d_w.index_add_(0, live, torch.mm(g_blk.t(), h_blk))
    if sums is None:  # every token masked out
        sums = hidden.new_zeros(terms.num_sums, dtype=acc)
    return (loss, sums, ent_sum, d_h, d_w, d_b.to(bias.dtype) if need_bias else d_b)
