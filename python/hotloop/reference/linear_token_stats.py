"""SPEC §2 in plain torch: the logits hidden @ weight.T (+ bias) materialised, then SPEC §1.

Memory: holds the [N, V] logits in float32 and the temporaries of token_stats_ref — what the fused ops avoid.
"""
from __future__ import annotations

import torch
from torch import Tensor

from hotloop.reference.token_stats import token_stats_ref


def linear_token_stats_ref(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None,
                           temperature: float = 1.0, ignore_index: int = -100, entropy: bool = True,
                           self_certainty: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """hidden [..., H], weight [V, H], bias [V] | None, labels [...] -> (logprobs, entropy, self_certainty) [...]."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    # ignored rows are never read: zeroed first, so a non-finite padding state cannot reach d_weight via 0 * NaN
    hidden = torch.where((labels != ignore_index).unsqueeze(-1), hidden.to(acc), 0.0)
    logits = torch.nn.functional.linear(hidden, weight.to(acc), None if bias is None else bias.to(acc))
    return token_stats_ref(logits, labels, temperature, ignore_index, entropy, self_certainty)
