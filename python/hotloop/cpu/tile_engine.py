"""The CPU tile engine of every fused linear op (linear_token_stats, the linear policy / NFT losses,
linear_preference_loss): the logits hidden @ W^T (+ b) in vocabulary tiles of a reusable buffer, never [N, V].

Two loop orders, because the ops know their per-token gradients at different times:
  vocabulary-major (stats_by_vocab / grads_by_vocab; linear_token_stats' forward and backward): vocabulary
      tiles outermost, all tokens inside (token chunks when [N, tile] passes BLOCK_BYTES). Each weight tile is
      packed by the matmul once, and each d_weight tile is final in one matmul: a bf16 weight gradient is
      rounded once, as in the materialised path.
  token-major, one pass (one_pass; the fused losses): chunks of tokens outermost, every vocabulary tile of a
      chunk kept in the buffer while the loss's strategy turns the chunk's log-probs into their gradient, then
      the chunk's backward from the same logits: three matmuls per tile where forward + recomputing backward
      need four. d_weight accumulates across chunks in the weight's dtype (as Liger's chunked losses do).
Both share the tiles (hotloop.cpu.vocab_tiles): the BLAS into the buffer, the exact merge of per-tile
statistics, and one tile's backward (gradient filtering, the d_weight routes).
bf16 / fp16 logits are rounded to the input dtype by the matmul, exactly as `F.linear` does in the materialised
path; float32 input is float32 throughout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from hotloop.cpu import vocab_tiles
from hotloop.cpu.vocab_tiles import RowStats, TokenGrads, backward_tile, grad_scratch, matmul_into, \
    transposed_for_grads


def _l3_bytes() -> int | None:
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "3":
                size = (index / "size").read_text().strip().upper()
                scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
                return int(size.rstrip("KM")) * scale
        except (OSError, ValueError):
            return None
    return None


# vocabulary-major: the logits buffer is about the last-level cache, so a block is still in cache when the
# kernel and the gradient matmuls read it back (32 MiB on the benchmark machine); bounded for odd cache reports
BLOCK_BYTES = min(64 << 20, max(8 << 20, _l3_bytes() or (32 << 20)))

# token-major: tokens per chunk, at least CHUNK_ROWS, and CHUNK_HIDDEN / H for a narrow model. A chunk's matmuls
# re-pack the weight tiles, so fewer rows cost more per token; more rows cost memory and, for bf16, speed (the
# gradient tile outgrows the cache). Measured on the Xeon, GRPO from hidden states, V = 32000, same process (min
# of 8-16 interleaved rounds):
#   H = 1024, 8 x 256 tokens: bf16 512 rows 390 ms, 1024 rows 435 ms, 256 rows 472 ms; fp32 512 rows 1.92 s,
#   256 rows 2.09 s;
#   H = 512, 16 x 256 ragged (2800 tokens), bf16: 1024 rows 361 ms, 512 rows 417 ms.
CHUNK_ROWS = 512
CHUNK_HIDDEN = 512 * 1024
# the most logits one chunk may hold: a large vocabulary gets fewer rows (V = 128256 in bf16: 261)
CHUNK_BYTES = 64 << 20

# (positions of the chunk's tokens, their logp [n], their entropy [n] | None) -> (d loss / d logp [n],
# d loss / d entropy [n] | None): a loss's strategy, which also gathers what its value and metrics need
ChunkGrads = Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor | None]]


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# -------------------------------------------------------------------------------------------- vocabulary-major
def _block_shape(N: int, V: int, elt: int) -> tuple[int, int]:
    """(token rows, vocabulary columns) of one logits block: a vocabulary tile (or less, when [N, tile] would
    pass BLOCK_BYTES), all tokens when they fit. A block's weight rows are then packed by the matmul once in
    all, where token chunks would re-pack the whole [V, H] weight for each chunk (the cost that dominates skinny
    matmuls on CPU). Blocks stay at least 256 columns wide; very many tokens are chunked instead."""
    cols = min(V, vocab_tiles.TILE_COLS, max(256, BLOCK_BYTES // max(1, N * elt)))
    rows = max(1, min(N, BLOCK_BYTES // (cols * elt)))
    return rows, cols


def stats_by_vocab(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
                   entropy: bool, self_certainty: bool) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """hidden [N, H], weight [V, H], labels [N] (all valid) -> (logprobs, entropy | None, sc | None, lse) [N]."""
    N, V = hidden.shape[0], weight.shape[0]
    rows, cols = _block_shape(N, V, hidden.element_size())
    buf = hidden.new_empty(rows * cols)
    stats = RowStats(labels, _acc(hidden), entropy, self_certainty)
    for v0, v1 in vocab_tiles.vocab_tiles(V, cols):
        w_t, b_blk = weight[v0:v1].t(), None if bias is None else bias[v0:v1]
        for i0 in range(0, N, rows):
            i1 = min(N, i0 + rows)
            z = matmul_into(buf[: (i1 - i0) * (v1 - v0)].view(i1 - i0, v1 - v0), hidden[i0:i1], w_t, b_blk)
            stats.add_tile(z, v0, temperature, slice(i0, i1))
    return stats.outputs(V)


def grads_by_vocab(tokens: TokenGrads, hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float,
                   need_hidden: bool, need_weight: bool, need_bias: bool, filter_eps: float
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of stats_by_vocab for the incoming per-token gradients `tokens` (labels all valid) ->
    (d_hidden [N, H] | [0], d_weight [V, H] | [0], d_bias [V] | [0]) in the inputs' dtypes."""
    N, H = hidden.shape
    V = weight.shape[0]
    acc = _acc(hidden)
    rows, cols = _block_shape(N, V, hidden.element_size())
    buf = hidden.new_empty(rows * cols)
    d_h = hidden.new_zeros((N, H), dtype=acc) if need_hidden else hidden.new_empty(0)
    d_w = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    d_b = hidden.new_zeros(V, dtype=acc) if need_bias else hidden.new_empty(0)
    d_w_block = weight.new_zeros((cols, H), dtype=acc) if need_weight and rows < N else None
    h_t = transposed_for_grads(hidden) if need_weight else None
    for v0, v1 in vocab_tiles.vocab_tiles(V, cols):
        w_blk, b_blk = weight[v0:v1], None if bias is None else bias[v0:v1]
        if d_w_block is not None:
            d_w_block.zero_()
        for i0 in range(0, N, rows):
            i1 = min(N, i0 + rows)
            h_c = hidden[i0:i1]
            z = matmul_into(buf[: (i1 - i0) * (v1 - v0)].view(i1 - i0, v1 - v0), h_c, w_blk.t(), b_blk)
            d_w_rows = (d_w[v0:v1] if d_w_block is None else d_w_block[: v1 - v0]) if need_weight else None
            backward_tile(z, v0, V, tokens.rows(i0, i1), temperature, filter_eps, h_c, w_blk,
                          d_h[i0:i1] if need_hidden else None, d_w_rows, d_b[v0:v1] if need_bias else None,
                          accumulate=d_w_block is not None, h_t=None if h_t is None else h_t[:, i0:i1])
        if d_w_block is not None:
            d_w[v0:v1] = d_w_block[: v1 - v0]
    return (d_h.to(hidden.dtype) if need_hidden else d_h, d_w,
            d_b.to(bias.dtype) if need_bias else d_b)


# ------------------------------------------------------------------------------------------- token-major, one pass
def max_chunk_rows(V: int, elt: int) -> int:
    """The most tokens a chunk can have: as many [V] logit rows as CHUNK_BYTES holds (at least one)."""
    return max(1, CHUNK_BYTES // (V * elt))


def chunk_rows(V: int, H: int, elt: int) -> int:
    """Tokens per chunk: max(CHUNK_ROWS, CHUNK_HIDDEN / H), or fewer where their logits would pass CHUNK_BYTES."""
    return min(max(CHUNK_ROWS, CHUNK_HIDDEN // max(1, H)), max_chunk_rows(V, elt))


def one_pass(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
             chunks: list[Tensor], chunk_grads: ChunkGrads, entropy: bool, need_hidden: bool, need_weight: bool,
             need_bias: bool, filter_eps: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """hidden [N, H], weight [V, H], bias [V] | None, labels [N] (valid ids at every chunk position), chunks of
    positions (disjoint; the rows outside them get zero gradient) -> (d_hidden [N, H] | [0], d_weight [V, H] | [0],
    d_bias [V] | [0]) in the inputs' dtypes; chunk_grads is called once per chunk, in order."""
    N, H = hidden.shape
    V = weight.shape[0]
    acc = _acc(hidden)
    tiles = vocab_tiles.vocab_tiles(V)
    rows = max((c.numel() for c in chunks), default=0)
    buf = hidden.new_empty(rows * V)
    # d_weight's route (vocab_tiles.add_grad_products): transpose the smaller of G [rows, c] and d_W's tile [c, H]
    g_t_buf = grad_scratch(rows, hidden.dtype) if need_weight and rows < H else None
    filtering = filter_eps > 0
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
        tokens = TokenGrads(lab, lse, g_lp, g_ent, None if g_ent is None else ent)
        d_h_c = hidden.new_zeros((n, H), dtype=acc) if need_hidden else None
        for (v0, v1), z in zip(tiles, zs):
            backward_tile(z, v0, V, tokens, temperature, filter_eps, h_c, weight[v0:v1], d_h_c,
                          d_w[v0:v1] if need_weight else None, d_b[v0:v1] if need_bias else None,
                          accumulate=filtering or k > 0, h_t=h_t, g_t_buf=g_t_buf)
        if need_hidden:
            d_h.index_copy_(0, pos, d_h_c.to(d_h.dtype))
    return d_h, d_w, d_b.to(bias.dtype) if need_bias else d_b
