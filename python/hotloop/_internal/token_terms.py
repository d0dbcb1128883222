"""What the per-token losses (PolicyTerms, NFTTerms) share: a loss reduced to per-token data whose kernel gives
(d loss / d logp, sums) for all tokens or a subset, and metrics as the sums' token means under the mask."""
from __future__ import annotations

import torch
from torch import Tensor


class TokenTerms:
    """Subclasses set self.m (the float mask [N]), METRICS (the names of sums[1:]) and _tokens(logp, sel)."""

    METRICS: tuple[str, ...] = ()
    m: Tensor

    def _tokens(self, logp: Tensor, sel: slice | Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def grads(self, logp: Tensor) -> tuple[Tensor, Tensor]:
        """logp [N] (detached, self.dt) -> (d loss / d logp [N], sums)."""
        return self._tokens(logp, slice(None))

    def grads_at(self, logp: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """The same for the tokens at positions `pos` only (token_local losses)."""
        return self._tokens(logp, pos)

    def metrics(self, sums: Tensor) -> dict[str, Tensor]:
        total = self.m.sum()
        denom = torch.where(total != 0, total, 1.0)
        return {name: sums[i + 1] / denom for i, name in enumerate(self.METRICS)}
