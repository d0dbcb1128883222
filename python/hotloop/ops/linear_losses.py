"""RL losses straight from the last hidden states: log-probs (and entropy) from hidden @ lm_head inside, the loss,
and the gradients of hidden / weight / bias, without ever holding the [N, V] logits (docs/policy_loss.md and
docs/nft_loss.md, "fused linear form").

linear_policy_loss(hidden, weight, labels, ...) equals policy_loss(linear_token_logprobs(hidden, weight, labels),
...) (minus entropy_coef times the aggregated entropy), and linear_nft_loss likewise for nft_loss.

Layers, outermost first:
  linear_policy_loss / linear_nft_loss   public API: checks (PolicyOptions / NFTOptions), attaches the gradients
                              the op returns to the loss (hotloop::attach_grads)
  hotloop::linear_policy_loss_fwd / hotloop::linear_nft_loss_fwd   custom ops (fake kernels): the whole fused
                              loss, opaque to torch.compile (its CPU path splits tokens on the host)
  hotloop.ops.fused_linear    the driver: the loss (PolicyTerms / NFTTerms as a FusedLoss strategy) through the
                              backend's fused linear kernel (CPU one pass, or the two-pass linear log-prob ops)
Tokens whose mask is 0 are dropped from the matmuls (their labels may be anything, e.g. padding ids).
"""
from __future__ import annotations

import torch
from torch import Tensor

from hotloop._internal import dispatch
from hotloop._internal.attach_grads import loss_with_grads
from hotloop._internal.checks import check_label_range, check_positive, labels_checked_on_host
from hotloop._internal.loss_checks import check_real
from hotloop.contracts import IGNORE_INDEX, NFT_METRICS, POLICY_METRICS
from hotloop.cpu.tile_engine import chunk_rows
from hotloop.ops import fused_linear
from hotloop.ops.linear_token_stats import check_linear_args
from hotloop.ops.nft_loss import NFTOptions, NFTTerms, check_nft_args
from hotloop.ops.policy_loss import PolicyOptions, PolicyTerms, check_policy_args


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class TermsLoss:
    """A policy / NFT loss (PolicyTerms / NFTTerms) with an entropy bonus, as the fused driver's strategy
    (fused_linear.FusedLoss): each token's gradient needs only that token when the ratio is per token."""

    entropy = True

    def __init__(self, terms: PolicyTerms | NFTTerms, entropy_coef: float):
        self.terms, self.coef = terms, entropy_coef
        zero = terms.m.new_zeros(())
        self.value, self.entropy_sum, self.sums = zero, zero.clone(), terms.m.new_zeros(terms.num_sums)

    def chunks(self, labels: Tensor, V: int, H: int, elt: int) -> list[Tensor] | None:
        if not self.terms.token_local:
            return None
        kept = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        rows = chunk_rows(V, H, elt)
        return [kept[i:i + rows] for i in range(0, kept.numel(), rows)]

    def _bonus(self, w: Tensor) -> Tensor | None:
        return -self.coef * w if self.coef != 0.0 else None

    def chunk_grads(self, pos: Tensor, lp: Tensor, ent: Tensor | None) -> tuple[Tensor, Tensor | None]:
        g_lp, s = self.terms.grads_at(lp, pos)
        w = self.terms.w_agg.index_select(0, pos)  # the entropy bonus's weights
        self.value = self.value + s[0] - self.coef * (w * ent).sum()
        self.entropy_sum = self.entropy_sum + (self.terms.m.index_select(0, pos) * ent).sum()
        self.sums = self.sums + s
        return g_lp, self._bonus(w)

    def token_grads(self, lp: Tensor, ent: Tensor | None) -> tuple[Tensor, Tensor | None]:
        on = self.terms.m != 0
        ent = torch.where(on, ent, 0.0)  # dropped rows: their entropy is not part of any sum
        g_lp, self.sums = self.terms.grads(torch.where(on, lp, 0.0))
        self.value = self.sums[0] - self.coef * (self.terms.w_agg * ent).sum()
        self.entropy_sum = (self.terms.m * ent).sum()
        return g_lp, self._bonus(self.terms.w_agg)

    def metrics(self) -> Tensor:
        """The loss's metrics then entropy_mean (token mean under the mask), stacked."""
        total = self.terms.m.sum()
        entropy_mean = self.entropy_sum / torch.where(total != 0, total, 1.0)
        return torch.stack([*self.terms.metrics(self.sums).values(), entropy_mean])


def _run(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
         entropy_coef: float, grad_filter_eps: float, need: tuple[bool, bool, bool], make_terms
         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The custom ops' body: make_terms(a stand-in for the log-probs, labels' shape) -> PolicyTerms / NFTTerms."""
    loss = TermsLoss(make_terms(hidden.new_empty(labels.shape, dtype=_acc(hidden))), entropy_coef)
    d_h, d_w, d_b = fused_linear.run(hidden, weight, bias, labels.reshape(-1), temperature, loss, *need,
                                     grad_filter_eps)
    return loss.value.to(_acc(hidden)), loss.metrics(), d_h, d_w, d_b


def _fake(n_metrics: int):
    """The fake kernel of both ops (their first 15 arguments line up: need_hidden / _weight / _bias at 12-14)."""
    def fake(hidden, weight, bias, labels, mask, t5, t6, t7, t8, temperature, entropy_coef, eps, *need_and_options):
        return _fake_outputs(hidden, weight, bias, need_and_options[:3], n_metrics)

    return fake


def _fake_outputs(hidden, weight, bias, need, n_metrics):
    acc = _acc(hidden)
    return (hidden.new_empty((), dtype=acc), hidden.new_empty(n_metrics, dtype=acc),
            hidden.new_empty(hidden.shape if need[0] else 0), weight.new_empty(weight.shape if need[1] else 0),
            hidden.new_empty(bias.shape if need[2] else 0, dtype=bias.dtype if need[2] else hidden.dtype))


# ------------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("hotloop::linear_policy_loss_fwd", mutates_args=())
def linear_policy_loss_fwd(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, mask: Tensor,
                           old_logp: Tensor | None, advantages: Tensor, ref_logp: Tensor | None,
                           cu_seqlens: Tensor | None, temperature: float, entropy_coef: float,
                           grad_filter_eps: float, need_hidden: bool, need_weight: bool, need_bias: bool, kl: str,
                           kl_coef: float, clip_low: float, clip_high: float, dual_clip: float, importance: str,
                           agg: str, max_length: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """hidden [N, H] (unit stride along H), weight [V, H], labels / mask of the log-probs' shape (labels
    IGNORE_INDEX wherever the mask is 0), the rest as policy_loss (options: PolicyOptions.op_args) -> (loss [],
    metrics [6] (POLICY_METRICS, entropy_mean), d_hidden [N, H] | [0], d_weight | [0], d_bias | [0])."""
    opts = PolicyOptions.from_op_args(kl, kl_coef, clip_low, clip_high, dual_clip, importance, agg, max_length)
    return _run(hidden, weight, bias, labels, temperature, entropy_coef, grad_filter_eps, (need_hidden, need_weight,
                need_bias), lambda like: PolicyTerms(like, old_logp, advantages, mask, ref_logp, cu_seqlens, opts))


linear_policy_loss_fwd.register_fake(_fake(len(POLICY_METRICS) + 1))


@torch.library.custom_op("hotloop::linear_nft_loss_fwd", mutates_args=())
def linear_nft_loss_fwd(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, mask: Tensor,
                        old_logp: Tensor | None, correct: Tensor, group_index: Tensor | None,
                        cu_seqlens: Tensor | None, temperature: float, entropy_coef: float, grad_filter_eps: float,
                        need_hidden: bool, need_weight: bool, need_bias: bool, group_size: int,
                        clamp_negative: float, normalize: int, neg_weight: float, ratio: str, agg: str,
                        max_length: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """As linear_policy_loss_fwd for the NFT loss (options: NFTOptions.op_args) -> (loss [], metrics [3]
    (NFT_METRICS, entropy_mean), d_hidden, d_weight, d_bias)."""
    opts = NFTOptions.from_op_args(group_size, clamp_negative, normalize, neg_weight, ratio, agg, max_length)
    return _run(hidden, weight, bias, labels, temperature, entropy_coef, grad_filter_eps, (need_hidden, need_weight,
                need_bias), lambda like: NFTTerms(like, old_logp, correct, mask, group_index, cu_seqlens, opts))


linear_nft_loss_fwd.register_fake(_fake(len(NFT_METRICS) + 1))


# ------------------------------------------------------------------------------------------------ public API
def _prepare(op: str, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, mask: Tensor,
             temperature: float, entropy_coef: float, grad_filter_eps: float):
    """Checks shared by both losses -> (hidden [N, H], weight, bias, effective labels, mask, temperature,
    entropy_coef, grad_filter_eps, need)."""
    temperature = check_positive(op, "temperature", temperature)
    entropy_coef = check_real(op, "entropy_coef", entropy_coef)
    grad_filter_eps = check_real(op, "grad_filter_eps", grad_filter_eps, low=0.0)
    dispatch.backend("fused_linear_loss", hidden.device)  # a bad HOTLOOP_BACKEND fails here, before any work
    mask = torch.where(labels == IGNORE_INDEX, 0, mask)  # a label of -100 masks its token out (every path alike)
    labels_eff = torch.where(mask != 0, labels, IGNORE_INDEX)  # masked positions may hold anything (padding ids)
    if labels_checked_on_host(labels.device):
        check_label_range(op, labels_eff, weight.shape[0], IGNORE_INDEX)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if h2.stride(1) != 1:
        h2 = h2.contiguous()
    grad_on = torch.is_grad_enabled()
    need = tuple(grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias))
    return (h2.detach(), weight.detach().contiguous(), None if bias is None else bias.detach().contiguous(),
            labels_eff, mask, temperature, entropy_coef, grad_filter_eps, need)


def _finish(outputs, hidden: Tensor, weight: Tensor, bias: Tensor | None, need, names: tuple[str, ...]
            ) -> tuple[Tensor, dict[str, Tensor]]:
    value, metrics, d_h, d_w, d_b = outputs
    loss = loss_with_grads(value, [(hidden, d_h.view(hidden.shape) if need[0] else d_h), (weight, d_w),
                                   (bias, d_b)])
    return loss, dict(zip(names, metrics.unbind()))


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
    op = "linear_policy_loss"
    check_linear_args(hidden, weight, bias, labels, op=op)
    opts = check_policy_args(op, _like(labels), old_logp, advantages, mask, ref_logp, kl, kl_coef, clip_low,
                             clip_high, dual_clip, importance, agg, max_length, cu_seqlens, logp_name="labels")
    h2, w, b, labels_eff, mask, temperature, entropy_coef, grad_filter_eps, need = _prepare(
        op, hidden, weight, bias, labels, mask, temperature, entropy_coef, grad_filter_eps)
    outputs = torch.ops.hotloop.linear_policy_loss_fwd(
        h2, w, b, labels_eff, mask, _detached(old_logp), advantages.detach(), _detached(ref_logp), cu_seqlens,
        temperature, entropy_coef, grad_filter_eps, *need, *opts.op_args())
    return _finish(outputs, hidden, weight, bias, need, POLICY_METRICS + ("entropy_mean",))


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
    op = "linear_nft_loss"
    check_linear_args(hidden, weight, bias, labels, op=op)
    opts = check_nft_args(op, _like(labels), old_logp, correct, mask, group_size, group_index, clamp_negative,
                          normalize, neg_weight, ratio, agg, max_length, cu_seqlens, logp_name="labels")
    h2, w, b, labels_eff, mask, temperature, entropy_coef, grad_filter_eps, need = _prepare(
        op, hidden, weight, bias, labels, mask, temperature, entropy_coef, grad_filter_eps)
    outputs = torch.ops.hotloop.linear_nft_loss_fwd(
        h2, w, b, labels_eff, mask, _detached(old_logp), correct.detach(), group_index, cu_seqlens, temperature,
        entropy_coef, grad_filter_eps, *need, *opts.op_args())
    return _finish(outputs, hidden, weight, bias, need, NFT_METRICS + ("entropy_mean",))


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _like(labels: Tensor) -> Tensor:
    """The log-probs' stand-in for the argument checks: a float tensor of the labels' shape."""
    return labels.new_empty(labels.shape, dtype=torch.float32)
