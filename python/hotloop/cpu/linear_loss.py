"""Fused linear losses on CPU in one pass over the logits: forward, loss gradient and backward per chunk of tokens.

When a loss's gradient for a chunk of tokens needs only that chunk (a token-local policy / NFT loss; the pairs of a
DPO-family loss, chunked pair by pair), the chunk is finished while its logits are in the buffer:
    z = h_chunk @ W^T (+ b)        per vocabulary tile (hotloop.cpu.vocab_tiles) into a reusable [rows, V] buffer
    token_stats_fwd_cpu(z)         C++ kernel per tile, statistics merged exactly -> logp, entropy, lse
    chunk_grads(logp, entropy)     the loss's d loss / d logp (and d loss / d entropy) for the chunk's tokens
    token_stats_bwd_cpu(z)         C++ kernel per tile: d loss / d logits, in place
    d_h[chunk] = G W;  d_W += G^T h_chunk;  d_b += sum G
Three matmuls per tile where a forward + recomputing backward needs four. The [N, V] logits never exist; the
buffer holds one chunk of them (chunk_rows). Rows whose mask is 0 are dropped before any matmul.
d_W is accumulated in the weight's dtype across chunks (as Liger's chunked losses do): exact to float32 for float32
weights; a bf16 / fp16 weight gradient is rounded once per chunk (4 roundings for 2048 tokens at
H = 1024; the error is measured in the tests).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from hotloop.cpu import vocab_tiles
from hotloop.cpu.linear_token_stats import _filtered_block, _live_columns
from hotloop.cpu.vocab_tiles import (RowStats, add_grad_products, grad_scratch, matmul_into,
                                     transposed_for_grads)

IGNORE = -100
# Tokens per chunk: at least CHUNK_ROWS, and CHUNK_HIDDEN / H for a narrow model. A chunk's matmuls re-pack the
# weight tiles, so fewer rows cost more per token; more rows cost memory and, for bf16, speed (the gradient tile
# outgrows the cache: see vocab_tiles). Measured on the Xeon, GRPO from hidden states, V = 32000, same process
# (min of 8-16 interleaved rounds):
#   H = 1024, 8 x 256 tokens: bf16 512 rows 390 ms, 1024 rows 435 ms, 256 rows 472 ms; fp32 512 rows 1.92 s,
#   256 rows 2.09 s;
#   H = 512, 16 x 256 ragged (2800 tokens), bf16: 1024 rows 361 ms, 512 rows 417 ms.
CHUNK_ROWS = 512
CHUNK_HIDDEN = 512 * 1024
# The most logits one chunk may hold: a large vocabulary gets fewer rows (V = 128256 in bf16: 261).
CHUNK_BYTES = 64 << 20

# (positions of the chunk's tokens, their logp [n], their entropy [n] | None) -> (d loss / d logp [n],
# d loss / d entropy [n] | None); the callback also gathers whatever its loss needs for the value and metrics.
ChunkGrads = Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor | None]]


def max_chunk_rows(V: int, elt: int) -> int:
    """The most tokens a chunk can have: as many [V] logit rows as CHUNK_BYTES holds (at least one)."""
    return max(1, CHUNK_BYTES // (V * elt))


def chunk_rows(V: int, H: int, elt: int) -> int:
    """Tokens per chunk: max(CHUNK_ROWS, CHUNK_HIDDEN / H), or fewer where their logits would pass CHUNK_BYTES."""
    return min(max(CHUNK_ROWS, CHUNK_HIDDEN // max(1, H)), max_chunk_rows(V, elt))


def token_chunks(kept: Tensor, rows: int) -> list[Tensor]:
    """The kept positions in consecutive chunks of at most `rows` (token-local losses: any split will do)."""
    return [kept[i:i + rows] for i in range(0, kept.numel(), rows)]


def one_pass_linear_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
                         chunks: list[Tensor], chunk_grads: ChunkGrads, entropy: bool, need_hidden: bool,
                         need_weight: bool, need_bias: bool, grad_filter_eps: float = 0.0
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """hidden [N, H], weight [V, H], bias [V] | None, labels [N] (valid ids at every chunk position), chunks of
    positions (disjoint; the rows outside them get zero gradient) -> (d_hidden [N, H] | [0], d_weight [V, H] | [0],
    d_bias [V] | [0]) in the inputs' dtypes. grad_filter_eps > 0: see linear_token_stats._live_columns."""
    N, H = hidden.shape
    V = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    tiles = vocab_tiles.vocab_tiles(V)
    rows = max((c.numel() for c in chunks), default=0)
    buf = hidden.new_empty(rows * V)
    # d_weight's route (vocab_tiles.add_grad_products): transpose the smaller of G [rows, c] and d_W's tile [c, H]
    g_t_buf = grad_scratch(rows, hidden.dtype) if need_weight and rows < H else None
    filtering = grad_filter_eps > 0
    d_h = hidden.new_zeros((N, H)) if need_hidden else hidden.new_empty(0)
    d_w = (torch.zeros_like(weight) if filtering or not chunks else torch.empty_like(weight)) if need_weight \
        else weight.new_empty(0)
    d_b = hidden.new_zeros(V, dtype=acc) if need_bias else hidden.new_empty(0)
    for k, pos in enumerate(chunks):
        n = pos.numel()
        h_c, lab = hidden.index_select(0, pos), labels.index_select(0, pos)
        h_t = transposed_for_grads(h_c) if need_weight and g_t_buf is None else None
        stats = RowStats(lab, acc, entropy, False)
        zs = []
        for v0, v1 in tiles:  # tile t of the chunk's logits: buf[n*v0 : n*v1] as [n, v1 - v0]
            z = matmul_into(buf[n * v0: n * v1].view(n, v1 - v0), h_c, weight[v0:v1].t(),
                            None if bias is None else bias[v0:v1])
            stats.add_tile(z, v0, temperature)
            zs.append(z)
        lp, ent, _, lse = stats.outputs(V)
        g_lp, g_ent = chunk_grads(pos, lp, ent)
        d_h_c = hidden.new_zeros((n, H), dtype=acc) if need_hidden else None
        for (v0, v1), z in zip(tiles, zs):
            z3 = z.unsqueeze(0)
            live = _live_columns(z, lse, lab, v0, temperature, grad_filter_eps)
            torch.ops.hotloop.token_stats_bwd_cpu(
                z3, g_lp.unsqueeze(0), None if g_ent is None else g_ent.unsqueeze(0), None, z3, lab.unsqueeze(0),
                lse.unsqueeze(0), None if g_ent is None else ent.unsqueeze(0), temperature, IGNORE, v0, V)
            if need_bias:
                d_b[v0:v1] += z.sum(0, dtype=acc)
            d_w_rows = d_w[v0:v1] if need_weight else None
            if live is not None:
                _filtered_block(z, live, h_c, weight[v0:v1], d_h_c, d_w_rows, accumulate=True)
            else:
                add_grad_products(z, h_c, weight[v0:v1], d_h_c, d_w_rows, accumulate=filtering or k > 0,
                                  h_t=h_t, g_t_buf=g_t_buf)
        if need_hidden:
            d_h.index_copy_(0, pos, d_h_c.to(d_h.dtype))
    return d_h, d_w, d_b.to(bias.dtype) if need_bias else d_b


def fused_linear_loss_cpu(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
                          terms, entropy_coef: float, need_hidden: bool, need_weight: bool, need_bias: bool,
                          grad_filter_eps: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A token-local policy / NFT loss (PolicyTerms / NFTTerms) with an entropy bonus.
    hidden [N, H], labels [N] (IGNORE where the mask is 0) -> (loss [], sums, entropy sum under the mask [],
    d_hidden [N, H] | [0], d_weight [V, H] | [0], d_bias [V] | [0])."""
    acc = terms.dt
    kept = (labels != IGNORE).nonzero().squeeze(1)
    totals = {"loss": hidden.new_zeros((), dtype=acc), "ent": hidden.new_zeros((), dtype=acc),
              "sums": hidden.new_zeros(terms.num_sums, dtype=acc)}

    def chunk_grads(pos: Tensor, lp: Tensor, ent: Tensor | None) -> tuple[Tensor, Tensor | None]:
        g_lp, s = terms.grads_at(lp, pos)
        w = terms.w_agg.index_select(0, pos)  # the entropy bonus's weights
        totals["loss"] += s[0] - entropy_coef * (w * ent).sum()
        totals["ent"] += (terms.m.index_select(0, pos) * ent).sum()
        totals["sums"] += s
        return g_lp, (-entropy_coef * w if entropy_coef != 0.0 else None)

    chunks = token_chunks(kept, chunk_rows(*weight.shape, hidden.element_size()))
    d_h, d_w, d_b = one_pass_linear_loss(hidden, weight, bias, labels, temperature, chunks, chunk_grads, True,
                                         need_hidden, need_weight, need_bias, grad_filter_eps)
    return totals["loss"], totals["sums"], totals["ent"], d_h, d_w, d_b
