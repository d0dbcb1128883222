"""docs/linear_token_stats.md in plain torch: the logits hidden @ weight.T (+ bias) materialised, then
docs/token_stats.md.

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


# ------------------------------------------------------------------ the reference backend's kernels (contract)
def linear_token_stats_fwd_ref(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                               temperature: float, ignore_index: int, entropy: bool, self_certainty: bool
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The kernel contract of hotloop::linear_token_stats_fwd: hidden [N, H], labels [N] -> (logprobs, entropy or
    [0], self_certainty or [0], lse), each [N] float32 (float64 for float64 input)."""
    lp, ent, sc = linear_token_stats_ref(hidden, weight, labels, bias, temperature, ignore_index, entropy,
                                         self_certainty)
    acc = lp.dtype
    keep = (labels != ignore_index).unsqueeze(-1)
    logits = torch.nn.functional.linear(torch.where(keep, hidden.to(acc), 0.0), weight.to(acc),
                                        None if bias is None else bias.to(acc))
    lse = torch.logsumexp(logits / temperature, dim=-1)
    none = hidden.new_empty(0, dtype=acc)
    return lp, none if ent is None else ent, none.clone() if sc is None else sc, lse


def linear_token_stats_bwd_ref(grad_logprobs: Tensor | None, grad_entropy: Tensor | None,
                               grad_self_certainty: Tensor | None, hidden: Tensor, weight: Tensor,
                               bias: Tensor | None, labels: Tensor, lse: Tensor, entropy: Tensor | None,
                               temperature: float, ignore_index: int, need_hidden: bool, need_weight: bool,
                               need_bias: bool, filter_eps: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel contract of hotloop::linear_token_stats_bwd, by autograd through linear_token_stats_ref ->
    (d_hidden, d_weight, d_bias), each [0] when not asked for. Exact: filter_eps (an approximation) is not
    applied."""
    from hotloop.reference._grads import vjp

    want_ent, want_sc = grad_entropy is not None, grad_self_certainty is not None
    d = vjp(lambda h, w, b: linear_token_stats_ref(h, w, labels, b, temperature, ignore_index, want_ent, want_sc),
            [hidden, weight, bias], [grad_logprobs, grad_entropy, grad_self_certainty],
            [need_hidden, need_weight, need_bias and bias is not None])
    return tuple(hidden.new_empty(0) if g is None else g.to(x.dtype) for g, x in zip(d, (hidden, weight, bias)))
