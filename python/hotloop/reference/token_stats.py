"""docs/token_stats.md in plain torch: per-token log-prob, entropy and self-certainty over the vocabulary.

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


# ------------------------------------------------------------------ the reference backend's kernels (contract)
def token_stats_fwd_ref(logits: Tensor, labels: Tensor, temperature: float, ignore_index: int, entropy: bool,
                        self_certainty: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The kernel contract of hotloop::token_stats_fwd: logits [B, T, V], labels [B, T] -> (logprobs, entropy or
    [0], self_certainty or [0], lse), each [B, T] float32 (float64 for float64 logits)."""
    lp, ent, sc = token_stats_ref(logits, labels, temperature, ignore_index, entropy, self_certainty)
    acc = lp.dtype
    lse = torch.logsumexp(logits.to(acc) / temperature, dim=-1)
    none = logits.new_empty(0, dtype=acc)
    return lp, none if ent is None else ent, none.clone() if sc is None else sc, lse


def token_stats_bwd_ref(grad_logits: Tensor, grad_logprobs: Tensor | None, grad_entropy: Tensor | None,
                        grad_self_certainty: Tensor | None, logits: Tensor, labels: Tensor, lse: Tensor,
                        entropy: Tensor | None, temperature: float, ignore_index: int) -> None:
    """The kernel contract of hotloop::token_stats_bwd: writes d loss / d logits into grad_logits (which may be
    logits itself), by autograd through token_stats_ref."""
    from hotloop.reference._grads import vjp

    want_ent, want_sc = grad_entropy is not None, grad_self_certainty is not None
    (d,) = vjp(lambda x: token_stats_ref(x, labels, temperature, ignore_index, want_ent, want_sc), [logits],
               [grad_logprobs, grad_entropy, grad_self_certainty], [True])
    grad_logits.copy_(d)
