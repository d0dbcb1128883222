"""Fused linear log-probs on CPU: BLAS over cache-sized blocks of logits + the token_stats C++ kernels.

The [N, V] logits never exist; one reusable buffer of about CHUNK_BYTES does.
Both passes go over vocabulary tiles (hotloop.cpu.vocab_tiles: at most TILE_COLS columns, the matmul shape oneDNN
runs fastest), all tokens at once when [N, tile] fits the buffer (token chunks inside otherwise), so the matmul
packs each weight tile once.
Forward: per block, logits = h @ W[block]^T (+ b) into the buffer (oneDNN / BLAS), token_stats_fwd_cpu on it,
  and the block's (lse, entropy, mean) merged into the rows' running totals.
Backward: per block: recompute logits, overwrite them with their gradient G (token_stats_bwd_cpu with the
  block's column offset), then d_W[block] = G^T h (one matmul, one rounding; see vocab_tiles.add_grad_products),
  d_h += G W[block] (float32 accumulator), d_b[block] = sum G. Going block by block over the vocabulary makes each
  d_W block final in one matmul, so a bf16 weight gradient is rounded once, as in the materialised path.
bf16 / fp16 logits are rounded to the input dtype by the matmul, exactly as `F.linear` does in the materialised
path; float32 input is float32 throughout.
Rows whose label is ignore_index are dropped before any matmul: padding (often a third of an RL batch) costs
nothing, and a non-finite hidden state there cannot reach d_weight through 0 * NaN.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from hotloop.cpu import vocab_tiles
from hotloop.cpu.vocab_tiles import RowStats, add_grad_products, matmul_into, transposed_for_grads


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


# The logits buffer: about the last-level cache, so a block is still in cache when the kernel and the gradient
# matmuls read it back (32 MiB on the benchmark machine); bounded for odd or missing cache reports.
CHUNK_BYTES = min(64 << 20, max(8 << 20, _l3_bytes() or (32 << 20)))


def _kept_rows(labels: Tensor, ignore_index: int) -> Tensor | None:
    """Indices of the rows that count, or None when all of them do."""
    keep = labels != ignore_index
    return None if bool(keep.all()) else keep.nonzero().squeeze(1)


def _scatter_rows(values: Tensor, idx: Tensor, n: int) -> Tensor:
    """[k, ...] values of rows idx -> [n, ...] with zeros elsewhere."""
    full = values.new_zeros((n, *values.shape[1:]))
    full[idx] = values
    return full


def _take_rows(t: Tensor | None, idx: Tensor) -> Tensor | None:
    return None if t is None else t.index_select(0, idx)


def linear_token_stats_fwd_cpu(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                               temperature: float, ignore_index: int, entropy: bool, self_certainty: bool
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """hidden [N, H], weight [V, H], bias [V] | None, labels [N] -> (logprobs, entropy | [0], sc | [0], lse) [N]."""
    idx = _kept_rows(labels, ignore_index)
    if idx is None:
        return _fwd(hidden, weight, bias, labels, temperature, ignore_index, entropy, self_certainty)
    lp, ent, sc, lse = _fwd(hidden.index_select(0, idx), weight, bias, labels.index_select(0, idx), temperature,
                            ignore_index, entropy, self_certainty)
    n = hidden.shape[0]
    return (_scatter_rows(lp, idx, n), _scatter_rows(ent, idx, n) if entropy else ent,
            _scatter_rows(sc, idx, n) if self_certainty else sc, _scatter_rows(lse, idx, n))


def _block_shape(N: int, V: int, elt: int) -> tuple[int, int]:
    """(token rows, vocabulary columns) of one logits block: a vocabulary tile (or less, when [N, tile] would
    pass CHUNK_BYTES), all tokens when they fit. A block's weight rows are then packed by the matmul once in
    all, where token chunks would re-pack the whole [V, H] weight for each chunk (the cost that dominates skinny
    matmuls on CPU). Blocks stay at least 256 columns wide; very many tokens are chunked instead."""
    cols = min(V, vocab_tiles.TILE_COLS, max(256, CHUNK_BYTES // max(1, N * elt)))
    rows = max(1, min(N, CHUNK_BYTES // (cols * elt)))
    return rows, cols


def _fwd(hidden, weight, bias, labels, temperature, ignore_index, entropy, self_certainty):
    """Vocabulary tiles outermost; the C++ kernel's statistics of each tile merged exactly (RowStats)."""
    N, V = hidden.shape[0], weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    rows, cols = _block_shape(N, V, hidden.element_size())
    buf = hidden.new_empty(rows * cols)
    stats = RowStats(labels, acc, entropy, self_certainty)
    for v0, v1 in vocab_tiles.vocab_tiles(V, cols):
        w_t, b_blk = weight[v0:v1].t(), None if bias is None else bias[v0:v1]
        for i0 in range(0, N, rows):
            i1 = min(N, i0 + rows)
            z = matmul_into(buf[: (i1 - i0) * (v1 - v0)].view(i1 - i0, v1 - v0), hidden[i0:i1], w_t, b_blk)
            stats.add_tile(z, v0, temperature, slice(i0, i1))
    lp, ent, sc, lse = stats.outputs(V)
    empty = lambda: hidden.new_empty(0, dtype=acc)  # noqa: E731  (outputs of a custom op may not alias)
    return lp, empty() if ent is None else ent, empty() if sc is None else sc, lse


def _rows(t: Tensor | None, i0: int, i1: int) -> Tensor | None:
    return None if t is None else t[i0:i1].unsqueeze(0)


def linear_token_stats_bwd_cpu(grad_logprobs: Tensor | None, grad_entropy: Tensor | None,
                               grad_self_certainty: Tensor | None, hidden: Tensor, weight: Tensor,
                               bias: Tensor | None, labels: Tensor, lse: Tensor, entropy: Tensor | None,
                               temperature: float, ignore_index: int, need_hidden: bool, need_weight: bool,
                               need_bias: bool, filter_eps: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """-> (d_hidden [N, H] | [0], d_weight [V, H] | [0], d_bias [V] | [0]) in the inputs' dtypes.
    filter_eps > 0: gradient filtering (see _live_columns)."""
    idx = _kept_rows(labels, ignore_index)
    if idx is not None and idx.numel() == 0:  # every row ignored: no gradient anywhere
        return (torch.zeros_like(hidden) if need_hidden else hidden.new_empty(0),
                torch.zeros_like(weight) if need_weight else weight.new_empty(0),
                torch.zeros_like(bias) if need_bias else hidden.new_empty(0))
    if idx is None:
        return _bwd(grad_logprobs, grad_entropy, grad_self_certainty, hidden, weight, bias, labels, lse, entropy,
                    temperature, ignore_index, need_hidden, need_weight, need_bias, filter_eps)
    d_h, d_w, d_b = _bwd(_take_rows(grad_logprobs, idx), _take_rows(grad_entropy, idx),
                         _take_rows(grad_self_certainty, idx), hidden.index_select(0, idx), weight, bias,
                         labels.index_select(0, idx), lse.index_select(0, idx), _take_rows(entropy, idx),
                         temperature, ignore_index, need_hidden, need_weight, need_bias, filter_eps)
    return (_scatter_rows(d_h, idx, hidden.shape[0]) if need_hidden else d_h), d_w, d_b


def _live_columns(z: Tensor, lse: Tensor, labels: Tensor, v0: int, temperature: float, filter_eps: float
                  ) -> Tensor | None:
    """Gradient filtering (cut-cross-entropy's trick, an approximation), decided on a block of logits z [rows,
    cols] (vocabulary columns v0..) before its gradient overwrites it: the columns where some token's softmax
    probability reaches filter_eps, or that hold some token's label. None = keep every column (no filtering,
    also whenever a row's statistics are NaN). A dropped column loses its d_hidden terms and its d_weight row
    (left 0); they are each below filter_eps times the token's incoming gradient scale."""
    if filter_eps <= 0 or bool(lse.isnan().any()):
        return None
    threshold = temperature * (lse + math.log(filter_eps))  # z >= threshold  <=>  p >= filter_eps
    live = torch.ge(z, threshold[:, None]).any(0)
    local = labels - v0
    live[local[(local >= 0) & (local < z.shape[1])]] = True
    idx = live.nonzero().squeeze(1)
    # gathering the live columns is a copy: worth it only when it removes a good part of the matmuls
    return None if idx.numel() > 0.75 * z.shape[1] else idx


def _bwd(grad_logprobs, grad_entropy, grad_self_certainty, hidden, weight, bias, labels, lse, entropy, temperature,
         ignore_index, need_hidden, need_weight, need_bias, filter_eps=0.0):
    N, H = hidden.shape
    V = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    rows, cols = _block_shape(N, V, hidden.element_size())
    buf = hidden.new_empty(rows * cols)

    d_h = hidden.new_zeros((N, H), dtype=acc) if need_hidden else hidden.new_empty(0)
    d_w = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    d_b = hidden.new_zeros(V, dtype=acc) if need_bias else hidden.new_empty(0)
    d_w_block = weight.new_zeros((cols, H), dtype=acc) if need_weight and rows < N else None
    h_t = transposed_for_grads(hidden) if need_weight else None

    for v0, v1 in vocab_tiles.vocab_tiles(V, cols):
        w_blk = weight[v0:v1]
        b_blk = None if bias is None else bias[v0:v1]
        if d_w_block is not None:
            d_w_block.zero_()
        for i0 in range(0, N, rows):
            i1 = min(N, i0 + rows)
            h_c = hidden[i0:i1]
            g = matmul_into(buf[: (i1 - i0) * (v1 - v0)].view(i1 - i0, v1 - v0), h_c, w_blk.t(), b_blk)
            g3 = g.unsqueeze(0)
            live = _live_columns(g, lse[i0:i1], labels[i0:i1], v0, temperature, filter_eps)
            torch.ops.hotloop.token_stats_bwd_cpu(
                g3, _rows(grad_logprobs, i0, i1), _rows(grad_entropy, i0, i1), _rows(grad_self_certainty, i0, i1),
                g3, labels[i0:i1].unsqueeze(0), lse[i0:i1].unsqueeze(0), _rows(entropy, i0, i1), temperature,
                ignore_index, v0, V)
            if need_bias:
                d_b[v0:v1] += g.sum(0, dtype=acc)
            d_w_rows = (d_w[v0:v1] if d_w_block is None else d_w_block[: v1 - v0]) if need_weight else None
            if live is not None:
                _filtered_block(g, live, h_c, w_blk, d_h[i0:i1] if need_hidden else None, d_w_rows,
                                accumulate=d_w_block is not None)
                continue
            # d_h: a partial over this block's columns, summed in float32
            add_grad_products(g, h_c, w_blk, d_h[i0:i1] if need_hidden else None, d_w_rows,
                              accumulate=d_w_block is not None, h_t=None if h_t is None else h_t[:, i0:i1])
        if d_w_block is not None:
            d_w[v0:v1] = d_w_block[: v1 - v0]
    return (d_h.to(hidden.dtype) if need_hidden else d_h, d_w,
            d_b.to(bias.dtype) if need_bias else d_b)


def _filtered_block(g: Tensor, live: Tensor, h_c: Tensor, w_blk: Tensor, d_h: Tensor | None, d_w: Tensor | None,
                    accumulate: bool) -> None:
    """The block's d_hidden / d_weight contributions from its live columns only."""
    g_live = g.index_select(1, live)
    if d_h is not None:
        d_h += torch.mm(g_live, w_blk.index_select(0, live)).to(d_h.dtype)
    if d_w is not None:
        rows = torch.mm(g_live.t(), h_c).to(d_w.dtype)
        if accumulate:
            d_w.index_add_(0, live, rows)
        else:
            d_w.zero_()
            d_w.index_copy_(0, live, rows)
