"""NFT: Negative-aware Fine-Tuning (Chen et al. 2025, docs/nft_loss.md): supervised learning on correct responses plus an
implicit negative policy on the incorrect ones; its on-policy gradient equals GRPO's with binary rewards.

Layers as in hotloop.ops.policy_loss: nft_loss (checks, group rates r_q, prompt weights and aggregation as
per-token weights: NFTTerms) -> hotloop::nft_tokens (custom op, one pass over the tokens, spec:
reference.policy_loss.nft_tokens_ref) -> C++ / Triton kernels; the gradient rides on the loss (attach_grads).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hotloop._internal import dispatch
from hotloop._internal.checks import LABEL_DTYPES, check_same_device, check_tensor, labels_checked_on_host
from hotloop._internal.attach_grads import loss_with_grads
from hotloop._internal.loss_checks import (MASK_DTYPES, check_choice, check_like, check_per_row, check_real,
                                     check_token_layout, float_mask, resolve_max_length)
from hotloop._internal.row_layout import RowLayout
from hotloop._internal.token_terms import TokenTerms
from hotloop.contracts import IMPORTANCE, NFT_METRICS, NFT_RQ_RANGE
from hotloop.reference.policy_loss import nft_tokens_ref

_OP = "nft_loss"
dispatch.register("nft_tokens", "reference", nft_tokens_ref)
dispatch.register("nft_tokens", "cpu", dispatch.extension("cpu", "nft_tokens"))
dispatch.register("nft_tokens", "triton", "hotloop.triton_kernels.policy_loss:nft_tokens_triton")
_CORRECT_DTYPES = (torch.bool, torch.int32, torch.int64, torch.float32, torch.float64, torch.bfloat16, torch.float16)


@torch.library.custom_op("hotloop::nft_tokens", mutates_args=())
def nft_tokens(lr: Tensor, m: Tensor, w: Tensor, r: Tensor, c: Tensor, clamp_negative: float
               ) -> tuple[Tensor, Tensor]:
    """[N] inputs -> (g_lr [N], sums [3]); see reference.policy_loss.nft_tokens_ref."""
    return dispatch.kernel("nft_tokens", lr.device)(lr, m, w, r, c, clamp_negative)


@nft_tokens.register_fake
def _(lr, m, w, r, c, clamp_negative):
    return lr.new_empty(lr.shape), lr.new_empty(3)


def group_rate(correct: Tensor, group_size: int | None, group_index: Tensor | None) -> Tensor:
    """r_q per response [B]: the fraction correct in its group, clamped to [0.02, 0.98]; on device, no sync."""
    if group_index is None:
        G = group_size
        rate = correct.view(-1, G).mean(1).repeat_interleave(G)
    else:
        B = correct.shape[0]
        hits = correct.new_zeros(B).index_add_(0, group_index, correct)
        sizes = correct.new_zeros(B).index_add_(0, group_index, torch.ones_like(correct))
        rate = (hits / sizes.clamp(min=1)).index_select(0, group_index)
    return rate.clamp(*NFT_RQ_RANGE)


def prompt_weight(rate: Tensor, normalize: int) -> Tensor:
    if normalize == 0:
        return torch.ones_like(rate)
    return 1.0 - rate if normalize == 1 else torch.sqrt((1.0 - rate) / rate)


@dataclass(frozen=True)
class NFTOptions:
    """The options of one NFT call, validated (check_nft_args builds it); group_size None = ragged groups
    (group_index), max_length resolved."""

    group_size: int | None = None
    clamp_negative: float = 1.0
    normalize: int = 1
    neg_weight: float = 1.0
    ratio: str = "token"
    agg: str = "token-mean"
    max_length: int | None = None

    def op_args(self) -> tuple:
        """As custom-op arguments: group_size 0 and max_length 0 stand for None (NFTOptions.from_op_args)."""
        return (self.group_size or 0, self.clamp_negative, self.normalize, self.neg_weight, self.ratio, self.agg,
                self.max_length or 0)

    @staticmethod
    def from_op_args(group_size: int, clamp_negative: float, normalize: int, neg_weight: float, ratio: str,
                     agg: str, max_length: int) -> "NFTOptions":
        return NFTOptions(group_size or None, clamp_negative, normalize, neg_weight, ratio, agg, max_length or None)


class NFTTerms(TokenTerms):
    """One NFT call reduced to per-token data (see PolicyTerms, same interface)."""

    METRICS = NFT_METRICS

    def __init__(self, logp: Tensor, old_logp: Tensor | None, correct: Tensor, mask: Tensor,
                 group_index: Tensor | None, cu_seqlens: Tensor | None, opts: NFTOptions):
        # float64 math for float64 input (CPU only; the Triton kernels take it in float32)
        self.dt = torch.float64 if logp.dtype == torch.float64 else torch.float32
        self.layout = RowLayout(logp.shape, cu_seqlens, logp.device)
        self.m = float_mask(_OP, mask, self.dt)
        c = correct.detach().to(self.dt)
        rate = group_rate(c, opts.group_size, group_index)
        coef = prompt_weight(rate, opts.normalize) * torch.where(c > 0.5, 1.0, opts.neg_weight)
        self.w_agg = self.layout.agg_weights(self.m, opts.agg, opts.max_length)  # the entropy bonus is weighted by this
        self.w = self.w_agg * self.layout.per_token(coef)
        self.r, self.c = self.layout.per_token(rate), self.layout.per_token(c)
        self.old = None if old_logp is None else old_logp.detach().reshape(-1).to(self.dt)
        self.clamp_negative = opts.clamp_negative
        self.num_sums = 3
        self.token_local = opts.ratio == "token"

    def _tokens(self, logp: Tensor, sel: slice | Tensor) -> tuple[Tensor, Tensor]:
        delta = torch.zeros_like(logp) if self.old is None else logp - self.old[sel]  # None: on-policy
        inv = None
        if not self.token_local:  # whole rows only: sel is slice(None)
            delta, inv = self.layout.sequence_log_ratio(torch.where(self.m != 0, delta, 0.0), self.m)
        g_lr, sums = torch.ops.hotloop.nft_tokens(delta.contiguous(), self.m[sel], self.w[sel], self.r[sel],
                                                  self.c[sel], self.clamp_negative)
        return (g_lr if inv is None else self.layout.chain_sequence(g_lr, inv)), sums



def _check_groups(op: str, correct: Tensor, group_size: int | None, group_index: Tensor | None) -> None:
    B = correct.shape[0]
    if (group_size is None) == (group_index is None):
        raise ValueError(f"hotloop.{op}: give exactly one of `group_size` (fixed groups) and `group_index` "
                         f"(ragged groups), got {'both' if group_size is not None else 'neither'}")
    if group_index is None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or B % group_size:
            raise ValueError(f"hotloop.{op}: `group_size` must be an int >= 1 dividing B = {B}, got {group_size!r}")
        return
    check_tensor(op, "group_index", group_index, dtypes=LABEL_DTYPES)
    if tuple(group_index.shape) != (B,):
        raise ValueError(f"hotloop.{op}: `group_index` must be [B] = [{B}], got {tuple(group_index.shape)}")
    check_same_device(op, correct=correct, group_index=group_index)
    if labels_checked_on_host(group_index.device) and bool(((group_index < 0) | (group_index >= B)).any()):
        raise ValueError(f"hotloop.{op}: `group_index` values must lie in [0, B) = [0, {B})")


def check_nft_args(op: str, logp: Tensor, old_logp: Tensor, correct: Tensor, mask: Tensor, group_size: int | None,
                   group_index: Tensor | None, clamp_negative: float, normalize: int, neg_weight: float, ratio: str,
                   agg: str, max_length: int | None, cu_seqlens: Tensor | None,
                   logp_name: str = "logp") -> NFTOptions:
    """-> the validated options; raises naming the argument."""
    check_token_layout(op, logp, cu_seqlens, logp_name)
    check_like(op, "old_logp", old_logp, logp)
    check_like(op, "mask", mask, logp, dtypes=MASK_DTYPES)
    B = logp.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    check_per_row(op, "correct", correct, logp, B, dtypes=_CORRECT_DTYPES, per_token=False)
    if labels_checked_on_host(correct.device) and not bool(((correct == 0) | (correct == 1)).all()):
        raise ValueError(f"hotloop.{op}: `correct` must hold 0 / 1 (or False / True) per response")
    _check_groups(op, correct, group_size, group_index)
    clamp_negative = check_real(op, "clamp_negative", clamp_negative, low=0.0, low_open=True)
    if normalize not in (0, 1, 2) or isinstance(normalize, bool):
        raise ValueError(f"hotloop.{op}: `normalize` must be 0 (none), 1 (1 - r_q) or 2 (sqrt((1 - r_q) / r_q)), "
                         f"got {normalize!r}")
    neg_weight = check_real(op, "neg_weight", neg_weight, low=0.0)
    check_choice(op, "ratio", ratio, IMPORTANCE)
    max_length = resolve_max_length(op, agg, max_length, logp, cu_seqlens)
    return NFTOptions(group_size, clamp_negative, normalize, neg_weight, ratio, agg, max_length)


def nft_loss(logp: Tensor, old_logp: Tensor | None, correct: Tensor, mask: Tensor, *, group_size: int | None = None,
             group_index: Tensor | None = None, clamp_negative: float = 1.0, normalize: int = 1,
             neg_weight: float = 1.0, ratio: str = "token", agg: str = "token-mean", max_length: int | None = None,
             cu_seqlens: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """NFT loss (docs/nft_loss.md) over the responses of a batch of prompts.

    r_q = fraction of correct responses in the response's group, clamped to [0.02, 0.98]; R = exp(min(Δ, 10)),
    Δ = logp - old_logp per token (ratio="token") or the row's mean Δ (ratio="sequence"). Per token:
        correct:    l = -log R
        incorrect:  l = -log(max_ST((1 - r_q R) / (1 - r_q), clamp_negative))   (value clamped, gradient not)
    times the prompt weight (normalize 0: 1, 1: 1 - r_q, 2: sqrt((1 - r_q) / r_q)) and, for incorrect responses,
    neg_weight (0 = rejection-sampling fine-tuning); aggregated like `policy_loss`.

    Args:
        logp, old_logp, mask: [B, T] (or packed [N] with cu_seqlens); mask bool or float weights >= 0.
        correct: [B] 0 / 1 (bool, int or float) per response.
        group_size / group_index: the prompt groups, fixed (adjacent) or ragged ([B] ids in [0, B)); exactly one.
        clamp_negative, normalize, neg_weight, ratio, agg, max_length, cu_seqlens: as above / as `policy_loss`.

    Returns:
        (loss [] float32 (float64 for float64 logp), differentiable w.r.t. logp, one backward per call;
        metrics, each [] detached, as fractions of all masked-in tokens: ratio_mean, neg_clamped_frac (tokens of
        incorrect responses whose negative ratio was clamped)). `correct` and `group_index` are checked with a
        host read unless HOTLOOP_CHECK_LABELS=0.
    """
    opts = check_nft_args(
        _OP, logp, old_logp, correct, mask, group_size, group_index, clamp_negative, normalize, neg_weight, ratio,
        agg, max_length, cu_seqlens)
    dispatch.backend("nft_tokens", logp.device)  # a bad HOTLOOP_BACKEND fails here, before any work
    terms = NFTTerms(logp, old_logp, correct, mask, group_index, cu_seqlens, opts)
    with torch.no_grad():
        g, sums = terms.grads(logp.detach().reshape(-1).to(terms.dt))
    loss = loss_with_grads(sums[0], [(logp, g.view(logp.shape))])
    return loss, terms.metrics(sums)
