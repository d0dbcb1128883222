"""SPEC §1 in plain torch: per-token log-prob, entropy and self-certainty over the vocabulary.

Memory: reads N·V logits and materialises several [N, V] float32 temporaries (log_softmax, probs): this
is what the fused kernels avoid.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def token_stats_ref(logits: Tensor, labels: Tensor, temperature: float = 1.0, ignore_index: int = -100,
                    entropy: bool = True, self_certainty: bool = False
                    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """logits [..., V], labels [...] -> (logprobs, entropy | None, self_certainty | None), each [...].

    Math in float32 (float64 when logits are float64); ignored positions give 0 and no gradient.
    """
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    valid = labels != ignore_index
    # ignored rows are never read: zeroed first, so whatever they hold (NaN padding) reaches no value or gradient
    z = torch.where(valid.unsqueeze(-1), logits.to(acc), 0.0) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logprobs = logp_all.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=acc, device=logits.device)
    logprobs = torch.where(valid, logprobs, zero)

    ent = None
    if entropy:
        p = logp_all.exp()
        # p·log p is 0 where p is 0 (vocab masked with -inf), not 0·(-inf) = NaN, in value and in gradient;
        # a NaN p stays NaN
        plogp = p * torch.where(p == 0, zero, logp_all)
        ent = torch.where(valid, -plogp.sum(-1), zero)

    sc = None
    if self_certainty:
        V = logits.shape[-1]
        # KL(U || p) = -mean_v log p_v - log V
        sc = torch.where(valid, -logp_all.mean(-1) - math.log(V), zero)
    return logprobs, ent, sc
