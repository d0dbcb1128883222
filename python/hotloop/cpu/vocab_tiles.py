"""The tiles of the CPU tile engine (hotloop.cpu.tile_engine): logits in vocabulary tiles, the matmul shapes oneDNN
runs fastest; the exact merge of the token_stats kernel's per-tile statistics into whole-row ones; and one tile's
backward (its logits overwritten by their gradient, gradient filtering, the d_hidden / d_weight / d_bias products).

Why tiles: on the Intel Xeon (AMX) with 920 tokens x H=1024 x V=32000 in bf16 (min over runs, interleaved):
  - the logits as 8 products of [920, 4096] take 33-43 ms; one [920, 32000] product takes 148 ms;
  - a tile's d_weight G^T h takes 19 ms, h^T G (h^T made contiguous once) 10 ms plus 4.5 ms to transpose it
    into d_weight's rows with csrc/cpu/transpose.h (torch's strided copy: 13 ms);
  - for fewer tokens the transposed product loses: with G^T made contiguous first (the same transpose kernel),
    G^T h runs at ~800 GFLOPS for any token count. Per tile, bf16, same process: 524 tokens 3.7 ms against 5.1 ms
    for h^T G + transpose, 262 tokens 4.7 against 8.2; 1048 tokens 8.1 against 7.2; 2048 tokens 18.8 against 13.5.
float32 is compute bound and indifferent to both (~310 ms a vocabulary either way).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from hotloop._internal.extension import compiled_kernels
from hotloop.contracts import IGNORE_INDEX  # tiles hold kept rows only: no label equals it

TILE_COLS = 4096  # vocabulary columns of one matmul tile


def vocab_tiles(V: int, cols: int | None = None) -> list[tuple[int, int]]:
    """[(v0, v1)] covering 0..V in tiles of `cols` (default TILE_COLS) columns."""
    step = cols or TILE_COLS
    return [(v0, min(V, v0 + step)) for v0 in range(0, V, step)]


def matmul_into(out: Tensor, a: Tensor, b_t: Tensor, bias: Tensor | None) -> Tensor:
    """out = a @ b_t (+ bias): the logits of a tile written into the caller's reusable buffer."""
    if bias is None:
        return torch.mm(a, b_t, out=out)
    return torch.addmm(bias, a, b_t, out=out)


class RowStats:
    """Per-row statistics over the vocabulary, merged exactly from the token_stats_fwd_cpu outputs of each tile:
    lse = logaddexp over tiles, E[z'] (entropy = lse - E[z']) weighted by exp(lse_tile - lse), sum z' added up,
    z'[y] taken from the tile that holds y. Every label must be a valid column (drop ignored rows first)."""

    def __init__(self, labels: Tensor, acc: torch.dtype, entropy: bool, self_certainty: bool):
        n = labels.shape[0]
        self.labels = labels
        self.lse = labels.new_full((n,), float("-inf"), dtype=acc)
        self.mean_z = labels.new_zeros(n, dtype=acc) if entropy else None  # E[z'] under the tiles seen so far
        self.sum_z = labels.new_zeros(n, dtype=acc) if self_certainty else None
        self.z_label = labels.new_zeros(n, dtype=acc)

    def add_tile(self, z: Tensor, v0: int, temperature: float, rows: slice = slice(None)) -> None:
        """z [r, c]: the logits of vocabulary columns v0..v0+c for the rows `rows` of the labels."""
        cols = z.shape[1]
        labels = self.labels[rows]
        local = (labels - v0).clamp(0, cols - 1)  # any column will do where y is in another tile
        lp, ent, sc, lse_t = (t.reshape(-1) for t in compiled_kernels("cpu").token_stats_fwd(  # -1: local >= 0,
            z.unsqueeze(0), local.unsqueeze(0), temperature, -1, self.mean_z is not None,  # so no row is ignored
            self.sum_z is not None))
        lse = self.lse[rows]
        new_lse = torch.logaddexp(lse, lse_t)
        if self.mean_z is not None:
            w_old, w_tile = torch.exp(lse - new_lse), torch.exp(lse_t - new_lse)
            tile_mean = torch.where(w_tile > 0, w_tile * (lse_t - ent), 0.0)  # a tile of -inf adds nothing
            self.mean_z[rows] = torch.where(w_old > 0, w_old * self.mean_z[rows], 0.0) + tile_mean
        if self.sum_z is not None:  # the kernel's sc = lse_t - mean_t(z') - log(cols)
            self.sum_z[rows] += cols * (lse_t - sc - math.log(cols))
        in_tile = (labels >= v0) & (labels < v0 + cols)
        self.z_label[rows] = torch.where(in_tile, lp + lse_t, self.z_label[rows])
        self.lse[rows] = new_lse

    def outputs(self, V: int) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
        """-> (logprobs, entropy | None, self_certainty | None, lse), each [n]."""
        ent = None if self.mean_z is None else self.lse - self.mean_z
        sc = None if self.sum_z is None else self.lse - self.sum_z / V - math.log(V)
        return self.z_label - self.lse, ent, sc, self.lse


def transposed_for_grads(h: Tensor) -> Tensor | None:
    """h [r, H] -> h^T [H, r] contiguous for add_grad_products' h_t route (bf16 / fp16); None for float32 / 64."""
    return h.t().contiguous() if h.element_size() == 2 else None


def grad_scratch(rows: int, dtype: torch.dtype) -> Tensor | None:
    """A buffer for add_grad_products' g_t route: a gradient tile of `rows` tokens, transposed (bf16 / fp16);
    None for float32 / 64."""
    return torch.empty(rows * TILE_COLS, dtype=dtype) if dtype.itemsize == 2 else None


def add_grad_products(g: Tensor, h: Tensor, w_tile: Tensor, d_h: Tensor | None, d_w_rows: Tensor | None,
                      accumulate: bool, h_t: Tensor | None = None, g_t_buf: Tensor | None = None) -> None:
    """The products of a gradient tile g [r, c] (d loss / d logits of the vocabulary rows w_tile [c, H], for the
    tokens with hidden states h [r, H]):
        d_h [r, H] += g @ w_tile        (an accumulator of another dtype gets the product rounded to g's first)
        d_w_rows [c, H] (+)= g^T @ h    (the tile's d_weight rows; `accumulate` adds instead of overwriting)
    d_weight's route (bf16 / fp16 matmuls care which operand is transposed, see the module note):
      h_t = transposed_for_grads(h): (h_t @ g) [H, c] put through the tiled transpose kernel. Best for a tile of
        many tokens (r >= ~1000): the product is fast and g is not copied.
      g_t_buf = grad_scratch(r): g transposed into the buffer, then g^T @ h straight into d_weight's rows. Best
        for a chunk of a few hundred tokens, where the transposed product is slow and g is cheap to copy.
      neither: g.t() @ h (float32: compute bound, indifferent)."""
    if d_h is not None:
        if d_h.dtype == g.dtype:
            d_h.addmm_(g, w_tile)
        else:
            d_h += torch.mm(g, w_tile)
    if d_w_rows is None:
        return
    if h_t is not None:
        compiled_kernels("cpu").transpose_add(d_w_rows, torch.mm(h_t, g), accumulate)
        return
    g_t = g.t()
    if g_t_buf is not None:
        g_t = g_t_buf[: g.numel()].view(g.shape[1], g.shape[0])
        compiled_kernels("cpu").transpose_add(g_t, g, False)
    if not accumulate:
        torch.mm(g_t, h, out=d_w_rows)
    elif d_w_rows.dtype == g.dtype:
        d_w_rows.addmm_(g_t, h)
    else:
        d_w_rows += torch.mm(g_t, h)


def live_columns(z: Tensor, lse: Tensor, labels: Tensor, v0: int, temperature: float, filter_eps: float
                 ) -> Tensor | None:
    """Gradient filtering (cut-cross-entropy's trick, an approximation), decided on a tile of logits z [rows,
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


def _filtered_products(g: Tensor, live: Tensor, h: Tensor, w_tile: Tensor, d_h: Tensor | None,
                       d_w_rows: Tensor | None, accumulate: bool) -> None:
    """add_grad_products from the tile's live columns only."""
    g_live = g.index_select(1, live)
    if d_h is not None:
        d_h += torch.mm(g_live, w_tile.index_select(0, live)).to(d_h.dtype)
    if d_w_rows is not None:
        rows = torch.mm(g_live.t(), h).to(d_w_rows.dtype)
        if accumulate:
            d_w_rows.index_add_(0, live, rows)
        else:
            d_w_rows.zero_()
            d_w_rows.index_copy_(0, live, rows)


class TokenGrads:
    """What one tile's backward needs of its tokens: labels, lse and the incoming per-token gradients (d loss /
    d logp, d loss / d entropy with the forward's entropy, d loss / d self-certainty), each [rows] or None."""

    def __init__(self, labels: Tensor, lse: Tensor, g_logprobs: Tensor | None, g_entropy: Tensor | None = None,
                 entropy: Tensor | None = None, g_self_certainty: Tensor | None = None):
        self.labels, self.lse, self.entropy = labels, lse, entropy
        self.g_logprobs, self.g_entropy, self.g_self_certainty = g_logprobs, g_entropy, g_self_certainty

    def rows(self, i0: int, i1: int) -> "TokenGrads":
        cut = lambda t: None if t is None else t[i0:i1]  # noqa: E731
        return TokenGrads(self.labels[i0:i1], self.lse[i0:i1], cut(self.g_logprobs), cut(self.g_entropy),
                          cut(self.entropy), cut(self.g_self_certainty))


def backward_tile(z: Tensor, v0: int, V: int, tokens: TokenGrads, temperature: float, filter_eps: float,
                  h: Tensor, w_tile: Tensor, d_h: Tensor | None, d_w_rows: Tensor | None, d_b_rows: Tensor | None,
                  accumulate: bool, h_t: Tensor | None = None, g_t_buf: Tensor | None = None) -> None:
    """One tile's backward, the step every fused linear op shares: z [r, c], the logits of vocabulary columns
    v0..v0+c (of V) for the tokens with hidden states h [r, H], is overwritten by d loss / d z (the token_stats
    C++ kernel at the tile's column offset); then d_b_rows [c] += sum over tokens, and add_grad_products (or its
    filtered form, when gradient filtering drops columns) into d_h [r, H] and d_w_rows [c, H]."""
    live = live_columns(z, tokens.lse, tokens.labels, v0, temperature, filter_eps)
    z3 = z.unsqueeze(0)
    row = lambda t: None if t is None else t.unsqueeze(0)  # noqa: E731
    compiled_kernels("cpu").token_stats_bwd(
        z3, row(tokens.g_logprobs), row(tokens.g_entropy), row(tokens.g_self_certainty), z3,
        tokens.labels.unsqueeze(0), tokens.lse.unsqueeze(0), row(tokens.entropy), temperature, IGNORE_INDEX, v0, V)
    if d_b_rows is not None:
        d_b_rows += z.sum(0, dtype=d_b_rows.dtype)
    if live is not None:
        _filtered_products(z, live, h, w_tile, d_h, d_w_rows, accumulate)
    else:
        add_grad_products(z, h, w_tile, d_h, d_w_rows, accumulate, h_t=h_t, g_t_buf=g_t_buf)
