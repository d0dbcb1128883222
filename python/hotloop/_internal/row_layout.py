"""Rows of a token batch, padded [B, T] or packed [N] with cu_seqlens, and the loss weights of docs/policy_loss.md's
aggregations. Everything stays on the tensors' device: no host synchronisation.

The policy and NFT losses are sums over tokens of w_t * l_t, where the per-token weight w_t carries the whole
aggregation (token-mean, sequence means, Dr. GRPO's constant); the kernels then only map tokens and add up.
"""
from __future__ import annotations

import torch
from torch import Tensor


class RowLayout:
    """Tokens flattened to [N]; row b holds a contiguous run of them (T each when padded, cu_seqlens when packed)."""

    def __init__(self, shape: torch.Size, cu_seqlens: Tensor | None, device: torch.device):
        self.packed = cu_seqlens is not None
        if self.packed:
            self.N, self.B = shape[0], cu_seqlens.shape[0] - 1
            lengths = cu_seqlens.diff()
            self.row_id = torch.repeat_interleave(torch.arange(self.B, device=device), lengths, output_size=self.N)
        else:
            self.B, self.T = shape
            self.N = self.B * self.T

    def row_sum(self, x: Tensor) -> Tensor:
        """[N] -> [B]: the sum over each row's tokens."""
        if not self.packed:
            return x.view(self.B, self.T).sum(1)
        return x.new_zeros(self.B).index_add_(0, self.row_id, x)

    def row_of(self, pos: Tensor) -> Tensor:
        """Flat token positions [k] -> the row each belongs to [k]."""
        return self.row_id.index_select(0, pos) if self.packed else torch.div(pos, self.T, rounding_mode="floor")

    def per_token(self, v: Tensor) -> Tensor:
        """[B] -> [N]: each token gets its row's value (contiguous)."""
        if not self.packed:
            return v[:, None].expand(self.B, self.T).contiguous().view(-1)  # B = 1 would stay a stride-0 view
        return v.index_select(0, self.row_id)

    def agg_weights(self, m: Tensor, agg: str, max_length: int | None) -> Tensor:
        """[N] loss weights w (0 where m = 0) with loss = sum_t w_t l_t equal to docs/policy_loss.md's aggregation of l.

        Sequence means divide by B, every row counted (an empty one adds 0), as TRL, Liger and verl do; an
        all-empty mask gives weights 0 (loss 0).
        """
        if agg == "token-mean":
            total = m.sum()
            return m / torch.where(total != 0, total, 1.0)
        if agg in ("seq-mean-token-sum-norm", "dr_grpo"):
            return m / float(self.B * max_length)
        if agg == "seq-mean-token-sum":
            return m / float(self.B)
        lengths = self.row_sum(m)  # seq-mean-token-mean
        return m / (self.per_token(torch.where(lengths != 0, lengths, 1.0)) * float(self.B))

    def sequence_log_ratio(self, delta: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
        """GSPO's sequence-level log-ratio: each token gets its row's masked mean of delta.
        -> (that mean per token [N], d mean / d delta_t per token [N] = m_t / L_row)."""
        lengths = self.per_token(self.row_sum(m))
        inv = m / torch.where(lengths != 0, lengths, 1.0)
        return self.per_token(self.row_sum(torch.where(m != 0, delta * inv, 0.0))), inv

    def chain_sequence(self, g_mean: Tensor, inv: Tensor) -> Tensor:
        """Gradient w.r.t. each token's delta from per-token gradients w.r.t. its row's mean."""
        return self.per_token(self.row_sum(g_mean)) * inv
