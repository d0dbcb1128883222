"""RL losses straight from the last hidden states: log-probs (and entropy) from hidden @ lm_head inside, the loss,
and the gradients of hidden / weight / bias, without ever holding the [N, V] logits (SPEC §2 + §4 / §5).

linear_policy_loss(hidden, weight, labels, ...) equals policy_loss(linear_token_logprobs(hidden, weight, labels),
...) (minus entropy_coef times the aggregated entropy), and linear_nft_loss likewise for nft_loss; both produce
their gradients in the forward (the loss is known there) and attach them to the loss (hotloop::attach_grads).

Paths:
  CPU, token-level ratio   one pass (hotloop.cpu.linear_loss): per token block, logits -> log-probs -> loss
                           gradient -> logits gradient -> d_hidden, d_weight; three matmuls per block
  otherwise (GPU Triton; sequence-level ratio)   the fused linear log-prob kernels' forward over all tokens, the loss
                           kernel, then their backward with the loss gradient (the logits are recomputed)
Tokens whose mask is 0 are dropped from the matmuls (their labels may be anything, e.g. padding ids).
"""
from __future__ import annotations

import torch
from torch import Tensor

from hotloop._internal.dispatch import resolve_backend
from hotloop._internal.checks import check_label_range, check_positive, labels_checked_on_host
from hotloop._internal.attach_grads import loss_with_grads
from hotloop.ops.linear_token_stats import check_linear_args
from hotloop._internal.loss_checks import check_real
from hotloop.ops.nft_loss import NFTTerms, check_nft_args
from hotloop.ops.policy_loss import PolicyTerms, check_policy_args

_BACKENDS = ("reference", "cpu", "triton")
IGNORE = -100


def _fused(op: str, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, mask: Tensor,
           temperature: float, entropy_coef: float, grad_filter_eps: float, make_terms, ref_loss
           ) -> tuple[Tensor, dict[str, Tensor]]:
    """Shared driver: make_terms(logp_like, mask, backend) builds the loss's PolicyTerms / NFTTerms;
    ref_loss(logp, entropy, mask) is the composition used by the reference backend."""
    temperature = check_positive(op, "temperature", temperature)
    entropy_coef = check_real(op, "entropy_coef", entropy_coef)
    grad_filter_eps = check_real(op, "grad_filter_eps", grad_filter_eps, low=0.0)
    backend = resolve_backend(op, hidden.device, _BACKENDS)
    H = hidden.shape[-1]
    mask = torch.where(labels == IGNORE, 0, mask)  # a label of -100 masks its token out (every path alike)
    labels_eff = torch.where(mask != 0, labels, IGNORE)  # masked positions may hold anything (padding ids)
    if labels_checked_on_host(labels.device):
        check_label_range(op, labels_eff, weight.shape[0], IGNORE)
    if backend == "reference":
        from hotloop.reference.linear_token_stats import linear_token_stats_ref

        lp, ent, _ = linear_token_stats_ref(hidden, weight, labels_eff, bias, temperature, IGNORE, True, False)
        return ref_loss(lp, ent, mask)
    like = hidden.new_empty(labels.shape, dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    terms = make_terms(like, mask, backend)
    labels_eff = labels_eff.reshape(-1)
    h2 = hidden.reshape(-1, H)
    if h2.stride(1) != 1:
        h2 = h2.contiguous()
    w, b = weight.contiguous(), None if bias is None else bias.contiguous()
    grad_on = torch.is_grad_enabled()
    need = [grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    with torch.no_grad():
        if backend == "cpu" and terms.token_local:
            from hotloop.cpu.linear_loss import fused_linear_loss_cpu

            loss, sums, ent_sum, d_h, d_w, d_b = fused_linear_loss_cpu(
                h2.detach(), w.detach(), None if b is None else b.detach(), labels_eff, temperature, terms,
                entropy_coef, *need, grad_filter_eps)
        else:
            loss, sums, ent_sum, d_h, d_w, d_b = _two_pass(h2, w, b, labels_eff, temperature, terms, entropy_coef,
                                                           need, grad_filter_eps, backend)
    loss = loss_with_grads(loss.to(like.dtype), [(hidden, d_h.view(hidden.shape) if need[0] else d_h),
                                                 (weight, d_w), (bias, d_b)])
    metrics = terms.metrics(sums)
    total = terms.m.sum()
    metrics["entropy_mean"] = ent_sum / torch.where(total != 0, total, 1.0)
    return loss, metrics


def _two_pass(h2, w, b, labels, temperature, terms, entropy_coef, need, grad_filter_eps, backend):
    """Forward of the fused linear log-prob kernels, the loss kernel, then their backward with its gradient."""
    lp, ent, _, lse = torch.ops.hotloop.linear_token_stats_fwd(h2.detach(), w.detach(),
                                                               None if b is None else b.detach(), labels,
                                                               temperature, IGNORE, True, False, 0.0, backend)
    on = terms.m != 0
    ent = torch.where(on, ent, 0.0)  # dropped rows: their entropy is not part of any sum
    g_lp, sums = terms.grads(torch.where(on, lp, 0.0))
    loss = sums[0] - entropy_coef * (terms.w_agg * ent).sum()
    g_ent = -entropy_coef * terms.w_agg if entropy_coef != 0.0 else None
    d_h, d_w, d_b = torch.ops.hotloop.linear_token_stats_bwd(
        g_lp, g_ent, None, h2.detach(), w.detach(), None if b is None else b.detach(), labels, lse, ent,
        temperature, IGNORE, need[0], need[1], need[2] and b is not None, grad_filter_eps, backend)
    return loss, sums, (terms.m * ent).sum(), d_h, d_w, d_b


def linear_policy_loss(hidden: Tensor, weight: Tensor, labels: Tensor, old_logp: Tensor | None, advantages: Tensor,
                       mask: Tensor, *, ref_logp: Tensor | None = None, bias: Tensor | None = None,
                       entropy_coef: float = 0.0, temperature: float = 1.0, kl: str = "k3", kl_coef: float = 0.0,
                       clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None,
                       importance: str = "token", agg: str = "token-mean", max_length: int | None = None,
                       cu_seqlens: Tensor | None = None, grad_filter_eps: float = 0.0
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """hotloop.policy_loss on log-probs computed inside from hidden @ weight.T (+ bias), / temperature.

    Args:
        hidden: [B, T, H] (or packed [N, H] with cu_seqlens) last hidden states, float32 / bfloat16 / float16.
        weight: [V, H] lm_head weight, hidden's dtype;  bias: optional [V].
        labels: [B, T] (or [N]) int32 / int64 sampled token ids; positions with mask 0 may hold anything, and a
            label of -100 masks its token out.
        old_logp, advantages, mask, ref_logp, kl, kl_coef, clip_low, clip_high, dual_clip, importance, agg,
            max_length, cu_seqlens: as in `hotloop.policy_loss` (log-probs shaped like labels).
        entropy_coef: weight of an entropy bonus: loss -= entropy_coef * aggregated entropy (0 = none).
        temperature: the sampling temperature the logits are divided by (TRL / verl do the same).
        grad_filter_eps: 0 = exact (default); > 0 = gradient filtering as in `hotloop.linear_token_stats`.

    Returns:
        (loss [] float32, metrics): gradients flow to hidden, weight and bias; metrics as `policy_loss` plus
        entropy_mean (token mean under the mask). Never allocates [N, V].
    """
    check_linear_args(hidden, weight, bias, labels, op="linear_policy_loss")
    kl_coef, clip_low, clip_high, dual_clip, max_length = check_policy_args(
        "linear_policy_loss", _like(labels), old_logp, advantages, mask, ref_logp, kl, kl_coef, clip_low,
        clip_high, dual_clip, importance, agg, max_length, cu_seqlens, logp_name="labels")

    def make_terms(like, mask, backend):
        return PolicyTerms(like, old_logp, advantages, mask, ref_logp, kl, kl_coef, clip_low, clip_high, dual_clip,
                           importance, agg, max_length, cu_seqlens, backend)

    def ref_loss(lp, ent, mask):
        from hotloop.reference.policy_loss import policy_loss_ref, with_entropy_bonus

        loss, metrics = policy_loss_ref(lp, old_logp, advantages, mask, ref_logp, kl, kl_coef, clip_low, clip_high,
                                        dual_clip, importance, agg, max_length, cu_seqlens)
        return with_entropy_bonus(loss, metrics, ent, mask, entropy_coef, agg, max_length, cu_seqlens)

    return _fused("linear_policy_loss", hidden, weight, bias, labels, mask, temperature, entropy_coef,
                  grad_filter_eps, make_terms, ref_loss)


def linear_nft_loss(hidden: Tensor, weight: Tensor, labels: Tensor, old_logp: Tensor | None, correct: Tensor,
                    mask: Tensor, *, bias: Tensor | None = None, group_size: int | None = None,
                    group_index: Tensor | None = None, entropy_coef: float = 0.0, temperature: float = 1.0,
                    clamp_negative: float = 1.0, normalize: int = 1, neg_weight: float = 1.0, ratio: str = "token",
                    agg: str = "token-mean", max_length: int | None = None, cu_seqlens: Tensor | None = None,
                    grad_filter_eps: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """hotloop.nft_loss on log-probs computed inside from hidden @ weight.T (+ bias), / temperature.

    Shapes and arguments as `linear_policy_loss` (hidden, weight, bias, labels, entropy_coef, temperature,
    grad_filter_eps) and
    `hotloop.nft_loss` (old_logp, correct, mask, group_size / group_index, clamp_negative, normalize, neg_weight,
    ratio, agg, max_length, cu_seqlens). Returns (loss [] float32, metrics of nft_loss + entropy_mean).
    """
    check_linear_args(hidden, weight, bias, labels, op="linear_nft_loss")
    clamp_negative, neg_weight, max_length = check_nft_args(
        "linear_nft_loss", _like(labels), old_logp, correct, mask, group_size, group_index,
        clamp_negative, normalize, neg_weight, ratio, agg, max_length, cu_seqlens, logp_name="labels")

    def make_terms(like, mask, backend):
        return NFTTerms(like, old_logp, correct, mask, group_size, group_index, clamp_negative, normalize,
                        neg_weight, ratio, agg, max_length, cu_seqlens, backend)

    def ref_loss(lp, ent, mask):
        from hotloop.reference.policy_loss import nft_loss_ref, with_entropy_bonus

        loss, metrics = nft_loss_ref(lp, old_logp, correct, mask, group_size, group_index, clamp_negative,
                                     normalize, neg_weight, ratio, agg, max_length, cu_seqlens)
        return with_entropy_bonus(loss, metrics, ent, mask, entropy_coef, agg, max_length, cu_seqlens)

    return _fused("linear_nft_loss", hidden, weight, bias, labels, mask, temperature, entropy_coef, grad_filter_eps,
                  make_terms, ref_loss)


def _like(labels: Tensor) -> Tensor:
    """The log-probs' stand-in for the argument checks: a float tensor of the labels' shape."""
    return labels.new_empty(labels.shape, dtype=torch.float32)
