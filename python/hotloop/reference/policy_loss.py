"""docs/policy_loss.md (PPO / GRPO-family policy loss) and docs/nft_loss.md (NFT) in plain torch: the spec in code.

Two levels, both readable:

* `policy_loss_ref` / `nft_loss_ref`: the whole loss, differentiable with autograd, from [B, T] (or packed [N])
  log-probs. The public ops' "reference" backend, and what the kernels' results are tested against.
* `policy_tokens_ref` / `nft_tokens_ref`: the per-token kernel contract every backend implements (C++, Triton).
  The public ops reduce the loss to it: the aggregation becomes a per-token weight w, sequence-level ratios
  become a per-token log-ratio lr (the row's mean), so the kernels are elementwise maps plus one sum.

Token rules shared by both levels:
* A token with mask m = 0 contributes nothing (selected, not multiplied: NaN or inf log-probs on padding cannot
  leak into the loss or the gradient).
* Gradients flow to `logp` only; old_logp, ref_logp, advantages, correctness and mask are constants.
"""
from __future__ import annotations

import torch
from torch import Tensor

from hotloop.contracts import (AGGS, IMPORTANCE, KL_IDS, KL_KINDS, LOG_RATIO_CLAMP, NFT_LOG_RATIO_MAX,  # noqa: F401
                               NFT_METRICS, NFT_RQ_RANGE, POLICY_METRICS)


# ------------------------------------------------------------------------------------------ per-token contract
def policy_tokens_ref(lr: Tensor, kld: Tensor | None, adv: Tensor, m: Tensor, w: Tensor, clip_low: float,
                      clip_high: float, dual_clip: float, kl: str | None, kl_coef: float
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """Kernel contract of the policy loss, all [N] float tensors (float32, or float64 for float64 input).

    lr   log-ratio of the token (logp - old_logp, or its row's masked mean for importance="sequence")
    kld  d = logp - ref_logp (None when kl is None)
    adv  advantage of the token;  m  mask (metric weight);  w  loss weight (aggregation, 0 where m = 0)
    dual_clip <= 0 means off; kl in (None, "k1", "k2", "k3").

    Per token with m != 0:  rho = exp(clamp(lr, -20, 20));  rho_c = clamp(rho, 1 - clip_low, 1 + clip_high)
        l = max(-adv * rho, -adv * rho_c);   dual clip: where adv < 0 and l > -c * adv, l = -c * adv
        k1 = d, k2 = d^2 / 2, k3 = exp(clamp(-d, -20, 20)) + d - 1
    Returns
        g_lr  [N]  w * dl/dlr                (0 where m = 0)
        g_kl  [N]  w * kl_coef * dk/dd       ([0] when kl is None)
        sums  [6]  (sum w*(l + kl_coef*k), sum m*[rho < 1-clip_low, adv < 0], sum m*[rho > 1+clip_high, adv > 0],
                    sum m*[dual clip active], sum m*rho, sum m*k)
    Gradients through clamps follow torch: d clamp(x)/dx = 1 inside the closed range, 0 outside.
    """
    on = m != 0
    lr_c = lr.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    rho = torch.exp(lr_c)
    d_rho = torch.where((lr >= -LOG_RATIO_CLAMP) & (lr <= LOG_RATIO_CLAMP), rho, 0.0)
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    rho_c = rho.clamp(lo, hi)
    d_rho_c = torch.where((rho >= lo) & (rho <= hi), d_rho, 0.0)
    pg1, pg2 = -adv * rho, -adv * rho_c
    use1 = pg1 >= pg2
    loss = torch.where(use1, pg1, pg2)
    grad = torch.where(use1, -adv * d_rho, -adv * d_rho_c)
    dual = torch.zeros_like(on)
    if dual_clip > 0:
        dual = (adv < 0) & (loss > -dual_clip * adv)
        loss = torch.where(dual, -dual_clip * adv, loss)
        grad = torch.where(dual, 0.0, grad)
    k = torch.zeros_like(lr)
    g_kl = lr.new_zeros(0)
    if kl is not None:
        k, dk = _kl_terms(kld, kl)
        g_kl = torch.where(on, w * kl_coef * dk, 0.0)
        loss = loss + kl_coef * k
    zero = lr.new_zeros(())
    sums = torch.stack([
        torch.where(on, w * loss, zero).sum(),
        torch.where(on & (rho < lo) & (adv < 0), m, zero).sum(),
        torch.where(on & (rho > hi) & (adv > 0), m, zero).sum(),
        torch.where(on & dual, m, zero).sum(),
        torch.where(on, m * rho, zero).sum(),
        torch.where(on, m * k, zero).sum(),
    ])
    return torch.where(on, w * grad, 0.0), g_kl, sums



def policy_tokens_kernel_ref(lr: Tensor, kld: Tensor | None, adv: Tensor, m: Tensor, w: Tensor, clip_low: float,
                             clip_high: float, dual_clip: float, kl_kind: int, kl_coef: float
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """policy_tokens_ref with the kernels' kl_kind id (hotloop.contracts.KL_IDS): the reference backend's
    kernel of hotloop::policy_tokens."""
    kl = next(name for name, i in KL_IDS.items() if i == kl_kind)
    return policy_tokens_ref(lr, kld, adv, m, w, clip_low, clip_high, dual_clip, kl, kl_coef)


def _kl_terms(d: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """(k, dk/dd) of docs/policy_loss.md's estimators of KL(policy || ref) from d = logp - ref_logp."""
    if kind == "k1":
        return d, torch.ones_like(d)
    if kind == "k2":
        return 0.5 * d * d, d
    e = torch.exp((-d).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    inside = (d >= -LOG_RATIO_CLAMP) & (d <= LOG_RATIO_CLAMP)
    return e + d - 1.0, 1.0 - torch.where(inside, e, 0.0)


def nft_tokens_ref(lr: Tensor, m: Tensor, w: Tensor, r: Tensor, c: Tensor, clamp_negative: float
                   ) -> tuple[Tensor, Tensor]:
    """Kernel contract of the NFT loss, all [N] float tensors.

    lr  log-ratio (token, or its row's masked mean for ratio="sequence");  m mask;  w loss weight (aggregation x
    prompt weight x neg_weight for negatives, 0 where m = 0);  r r_q of the token's group, in (0, 1);  c 1.0 for
    a correct response, 0.0 otherwise.
    Per token with m != 0:  R = exp(min(lr, 10))
        c = 1:  l = -min(lr, 10)
        c = 0:  x = (1 - r R) / (1 - r),  l = -log(max(x, clamp_negative)), gradient as if the max were not
                there (straight-through): dl/dlr = r R [lr <= 10] / ((1 - r) max(x, clamp_negative))
    Returns g_lr [N] = w * dl/dlr (0 where m = 0), sums [3] = (sum w*l, sum m*R, sum m*[c = 0, x < clamp_negative]).
    """
    on = m != 0
    below = lr <= NFT_LOG_RATIO_MAX
    lr_c = lr.clamp(max=NFT_LOG_RATIO_MAX)
    R = torch.exp(lr_c)
    pos = c > 0.5
    x = (1.0 - r * R) / (1.0 - r)
    y = x.clamp(min=clamp_negative)
    loss = torch.where(pos, -lr_c, -torch.log(y))
    grad = torch.where(below, torch.where(pos, -1.0, r * R / ((1.0 - r) * y)), 0.0)
    zero = lr.new_zeros(())
    sums = torch.stack([
        torch.where(on, w * loss, zero).sum(),
        torch.where(on, m * R, zero).sum(),
        torch.where(on & ~pos & (x < clamp_negative), m, zero).sum(),
    ])
    return torch.where(on, w * grad, 0.0), sums


# ------------------------------------------------------------------------------------------------ whole losses
def _rows(x: Tensor, cu_seqlens: Tensor | None) -> list[Tensor]:
    """The rows of a [B, T] tensor, or the sequences of a packed [N] one."""
    if cu_seqlens is None:
        return list(x.unbind(0))
    cu = cu_seqlens.tolist()
    return [x[cu[i]:cu[i + 1]] for i in range(len(cu) - 1)]


def _aggregate(loss: Tensor, mask: Tensor, cu_seqlens: Tensor | None, agg: str, max_length: int | None) -> Tensor:
    """docs/policy_loss.md aggregation of per-token losses (mask already a float weight; loss 0 where it is 0). Sequence means
    divide by B, empty rows included (they add 0), as TRL, Liger and verl do; an all-empty mask gives 0."""
    per_row = [(lr * mr).sum() for lr, mr in zip(_rows(loss, cu_seqlens), _rows(mask, cu_seqlens))]
    lengths = [mr.sum() for mr in _rows(mask, cu_seqlens)]
    B = len(per_row)
    if agg == "token-mean":
        total = sum(lengths, loss.new_zeros(()))
        return sum(per_row, loss.new_zeros(())) / total if total > 0 else loss.sum()  # all masked: 0, with a graph
    if agg in ("seq-mean-token-sum-norm", "dr_grpo"):
        return sum(per_row, loss.new_zeros(())) / (B * max_length)
    if agg == "seq-mean-token-mean":
        return sum((s / n if n > 0 else s for s, n in zip(per_row, lengths)), loss.new_zeros(())) / B
    return sum(per_row, loss.new_zeros(())) / B  # seq-mean-token-sum


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    total = mask.sum()
    return (torch.where(mask != 0, x * mask, 0.0).sum() / total) if total > 0 else x.new_zeros(())


def _per_row(values: Tensor, like: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    """Per-response values [B] broadcast to the tokens of `like` ([B, T] or packed [N])."""
    if cu_seqlens is None:
        return values[:, None].expand_as(like)
    return torch.repeat_interleave(values, cu_seqlens.diff())


def per_token_given(values: Tensor, like: Tensor, cu_seqlens: Tensor | None) -> bool:
    """Whether advantages hold one value per token: logp's shape; packed [N] only where N != B (else the
    values are read per response)."""
    B = like.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return values.shape == like.shape and (cu_seqlens is None or like.shape[0] != B)


def _per_token(values: Tensor, like: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    """Advantages per token: as given when per token, else broadcast from per response."""
    return values if per_token_given(values, like, cu_seqlens) else _per_row(values, like, cu_seqlens)


def _sequence_log_ratio(delta: Tensor, mask: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    """Each token gets its row's masked mean of delta (differentiable: GSPO's sequence-level ratio)."""
    means = []
    for d, mr in zip(_rows(delta, cu_seqlens), _rows(mask, cu_seqlens)):
        n = mr.sum()
        masked = torch.where(mr != 0, d * mr, 0.0).sum()
        means.append(masked / n if n > 0 else masked)  # an empty row: 0, with a graph
    return _per_row(torch.stack(means), delta, cu_seqlens)


def policy_loss_ref(logp: Tensor, old_logp: Tensor | None, advantages: Tensor, mask: Tensor, ref_logp: Tensor | None,
                    kl: str, kl_coef: float, clip_low: float, clip_high: float, dual_clip: float | None,
                    importance: str, agg: str, max_length: int | None, cu_seqlens: Tensor | None
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    """docs/policy_loss.md written out: -> (loss [] differentiable w.r.t. logp, metrics of POLICY_METRICS, each [])."""
    dt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    logp, m = logp.to(dt), mask.to(dt)
    old = logp.detach() if old_logp is None else old_logp.to(dt).detach()  # None: on-policy
    on = m != 0
    adv = torch.where(on, _per_token(advantages.to(dt).detach(), logp, cu_seqlens), 0.0)  # no NaN * 0
    delta = torch.where(on, logp - old, 0.0)
    if importance == "sequence":
        delta = _sequence_log_ratio(delta, m, cu_seqlens)
    rho = torch.exp(delta.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    loss = torch.maximum(-adv * rho, -adv * rho.clamp(lo, hi))
    dual = torch.zeros_like(on)
    if dual_clip is not None:
        dual = (adv < 0) & (loss > -dual_clip * adv)
        loss = torch.where(dual, -dual_clip * adv, loss)
    k = torch.zeros_like(loss)
    if ref_logp is not None:  # also with kl_coef 0: the kl_mean metric
        d = torch.where(on, logp - ref_logp.to(dt).detach(), 0.0)
        k = {"k1": lambda: d, "k2": lambda: 0.5 * d * d,
             "k3": lambda: torch.exp((-d).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) + d - 1.0}[kl]()
        loss = loss + kl_coef * k
    total = _aggregate(torch.where(on, loss, 0.0), m, cu_seqlens, agg, max_length)
    with torch.no_grad():
        metrics = {
            "clip_frac_low": _masked_mean(((rho < lo) & (adv < 0)).to(dt), m),
            "clip_frac_high": _masked_mean(((rho > hi) & (adv > 0)).to(dt), m),
            "clip_frac_dual": _masked_mean(dual.to(dt), m),
            "ratio_mean": _masked_mean(rho, m),
            "kl_mean": _masked_mean(k, m),
        }
    return total, {n: v.to(dt) for n, v in metrics.items()}


def nft_group_rate(correct: Tensor, group_size: int | None, group_index: Tensor | None) -> Tensor:
    """r_q per response: the fraction of correct responses in its group, clamped to [0.02, 0.98]."""
    c = correct.to(torch.float64)
    if group_index is None:
        rate = c.view(-1, group_size).mean(1).repeat_interleave(group_size)
    else:
        rate = torch.empty_like(c)
        for g in group_index.unique().tolist():
            members = group_index == g
            rate[members] = c[members].mean()
    return rate.clamp(*NFT_RQ_RANGE)


def nft_prompt_weight(rate: Tensor, normalize: int) -> Tensor:
    """docs/nft_loss.md per-prompt weight: 0 -> 1, 1 -> (1 - r_q), 2 -> sqrt((1 - r_q) / r_q)."""
    if normalize == 0:
        return torch.ones_like(rate)
    return 1.0 - rate if normalize == 1 else torch.sqrt((1.0 - rate) / rate)


def nft_loss_ref(logp: Tensor, old_logp: Tensor | None, correct: Tensor, mask: Tensor, group_size: int | None,
                 group_index: Tensor | None, clamp_negative: float, normalize: int, neg_weight: float, ratio: str,
                 agg: str, max_length: int | None, cu_seqlens: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
    """docs/nft_loss.md written out: -> (loss [] differentiable w.r.t. logp, metrics of NFT_METRICS, each [])."""
    dt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    logp, m = logp.to(dt), mask.to(dt)
    old = logp.detach() if old_logp is None else old_logp.to(dt).detach()  # None: on-policy
    rate = nft_group_rate(correct, group_size, group_index).to(dt)
    c = correct.to(dt)
    coef = nft_prompt_weight(rate, normalize) * torch.where(c > 0.5, 1.0, neg_weight)
    on = m != 0
    delta = torch.where(on, logp - old, 0.0)
    if ratio == "sequence":
        delta = _sequence_log_ratio(delta, m, cu_seqlens)
    log_R = delta.clamp(max=NFT_LOG_RATIO_MAX)
    R = torch.exp(log_R)
    r_t, c_t = _per_row(rate, logp, cu_seqlens), _per_row(c, logp, cu_seqlens)
    x = (1.0 - r_t * R) / (1.0 - r_t)
    x_st = x + (x.clamp(min=clamp_negative) - x).detach()  # max_ST: clamped value, unclamped gradient
    loss = torch.where(c_t > 0.5, -log_R, -torch.log(x_st)) * _per_row(coef, logp, cu_seqlens)
    total = _aggregate(torch.where(on, loss, 0.0), m, cu_seqlens, agg, max_length)
    with torch.no_grad():
        metrics = {"ratio_mean": _masked_mean(R, m),
                   "neg_clamped_frac": _masked_mean(((c_t < 0.5) & (x < clamp_negative)).to(dt), m)}
    return total, metrics



def with_entropy_bonus(loss: Tensor, metrics: dict[str, Tensor], entropy: Tensor, mask: Tensor, entropy_coef: float,
                       agg: str, max_length: int | None, cu_seqlens: Tensor | None
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """loss - entropy_coef * (entropy aggregated like the loss), and the entropy_mean metric."""
    m = mask.to(loss.dtype)
    ent = torch.where(m != 0, entropy.to(loss.dtype), 0.0)
    if entropy_coef != 0.0:
        loss = loss - entropy_coef * _aggregate(ent, m, cu_seqlens, agg, max_length)
    with torch.no_grad():
        metrics = {**metrics, "entropy_mean": _masked_mean(ent, m)}
    return loss, metrics
