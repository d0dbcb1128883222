"""docs/preference_loss.md (DPO-family preference losses) and KTO in plain torch: the spec in code.

Two levels, both readable:

* `preference_loss_ref` / `kto_loss_ref`: the whole loss, differentiable with autograd, written the way TRL writes
  it (DPOTrainer, CPOTrainer for simpo, ORPOTrainer for orpo, KTOTrainer). The public ops' "reference" backend.
* `preference_pairs_ref` / `kto_items_ref`: the per-pair kernel contract every backend implements (C++, Triton):
  per pair the loss and its derivatives w.r.t. the policy's sequence log-probs (and the chosen NLL for orpo),
  written out by hand. The public ops average the per-pair losses and attach the per-pair gradients / B.

Inputs are per-sequence log-prob SUMS s (one per response); the length-normalised kinds (ipo's log-ratios,
simpo's and orpo's log-probs) divide by the completion length, clamped to >= 1 as TRL clamps its mask sums.
With h = s - s_ref, Δ = h_w - h_l, z = βΔ and sp(t) = softplus(t) = -logσ(-t):

  sigmoid / cdpo  (1-ε) sp(-z) + ε sp(z)             (ε = label_smoothing; ε = 0 is DPO)
  robust          [(1-ε) sp(-z) - ε sp(z)] / (1-2ε)
  hinge           relu(1 - z)
  ipo             (Δ̄ - 1/(2β))²,  Δ̄ = h_w/len_w - h_l/len_l
  bco_pair        sp(-βh_w) + sp(βh_l)               (TRL 1.16's stateless form: no running-mean shift δ, i.e. δ = 0)
  sppo_hard       (h_w - 1/(2β))² + (h_l + 1/(2β))²
  apo_zero        1 - σ(βh_w) + σ(βh_l)
  apo_down        σ(βh_w) + 1 - σ(z)
  simpo           (1-ε) sp(-t) + ε sp(t),  t = β(s̄_w - s̄_l) - γ   (no reference; s̄ = s / len; CPOTrainer's
                  label smoothing, ε = 0 is the paper's -logσ(t))
  orpo            nll_w + β sp(-lo),  lo = (s̄_w - s̄_l) - (log1mexp(s̄_w) - log1mexp(s̄_l))
  cream           C sp(-z) + (1-C) sp(z)             (C = 1: DPO; C = 0: DPO on the swapped pair)

Differences from TRL 1.16 (docs/preference_loss.md wins): TRL's DPO "sigmoid" ignores label_smoothing, here "sigmoid" and "cdpo" both
apply it (docs/preference_loss.md's cDPO; with ε = 0 they are TRL's sigmoid). ORPO's NLL is per pair here (`chosen_nll` [B]; the
mean over pairs is TRL's batch NLL when every pair has the same number of chosen tokens).
Metrics (TRL's names): rewards/chosen = mean βh_w, rewards/rejected = mean βh_l, rewards/accuracies =
mean[h_w > h_l], rewards/margins = mean β(h_w - h_l), logps/chosen, logps/rejected = means of the inputs. For
the reference-based kinds h is the un-normalised log-ratio (TRL logs IPO's rewards un-normalised too); for simpo
and orpo (reference-free) h is the length-normalised log-prob s̄, as CPOTrainer / ORPOTrainer log it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hotloop.contracts import (KTO_METRICS, LENGTH_NORMALISED, LN2, PREFERENCE_METRICS,  # noqa: F401
                               REFERENCE_FREE)
from hotloop.contracts import PREFERENCE_KIND_IDS as KIND_IDS  # noqa: F401
from hotloop.contracts import PREFERENCE_KINDS as KINDS


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -ln 2 (Mächler 2012): log(-expm1(x)) near 0, where
    1 - exp(x) cancels, and log1p(-exp(x)) below, where exp(x) is small."""
    return torch.where(x > -LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# ------------------------------------------------------------------------------------------ per-pair contract
def preference_pairs_ref(x_w: Tensor, x_l: Tensor, r_w: Tensor, r_l: Tensor, len_w: Tensor, len_l: Tensor, c: Tensor,
                         nll: Tensor, kind: str, beta: float, label_smoothing: float, gamma: float
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Kernel contract of the preference losses, all [B] float tensors of one dtype (float32, or float64).

    x_w, x_l  the policy's sequence log-prob sums (chosen, rejected)
    r_w, r_l  the reference's (ignored by simpo / orpo)
    len_w, len_l  completion lengths, already clamped to >= 1 (read by ipo, simpo, orpo only)
    c         CREAM consistency weight (read by cream only);  nll  chosen NLL (read by orpo only)
    Returns (loss [B], dloss/dx_w [B], dloss/dx_l [B], dloss/dnll [B]) per pair (not averaged).
    """
    b, eps = beta, label_smoothing
    one = torch.ones_like(x_w)
    inv_w, inv_l = one, one
    if kind in LENGTH_NORMALISED:
        inv_w, inv_l = 1.0 / len_w, 1.0 / len_l
    if kind in REFERENCE_FREE:
        u, v = x_w * inv_w, x_l * inv_l
    else:
        u, v = (x_w - r_w) * inv_w, (x_l - r_l) * inv_l
    z = b * (u - v)
    sp, sig = F.softplus, torch.sigmoid
    g_nll = torch.zeros_like(x_w)

    def smoothed(t: Tensor, w_pos: Tensor | float, w_neg: Tensor | float) -> tuple[Tensor, Tensor]:
        """w_pos sp(-t) + w_neg sp(t) and its derivative in t."""
        return w_pos * sp(-t) + w_neg * sp(t), -w_pos * sig(-t) + w_neg * sig(t)

    if kind in ("sigmoid", "cdpo"):
        loss, dz = smoothed(z, 1.0 - eps, eps)
        du, dv = b * dz, -b * dz
    elif kind == "robust":
        loss = ((1.0 - eps) * sp(-z) - eps * sp(z)) / (1.0 - 2.0 * eps)
        dz = (-(1.0 - eps) * sig(-z) - eps * sig(z)) / (1.0 - 2.0 * eps)
        du, dv = b * dz, -b * dz
    elif kind == "hinge":
        loss = torch.relu(1.0 - z)
        dz = torch.where(1.0 - z > 0, -1.0, 0.0).to(z.dtype)
        du, dv = b * dz, -b * dz
    elif kind == "ipo":
        e = u - v - 1.0 / (2.0 * b)
        loss, du, dv = e * e, 2.0 * e, -2.0 * e
    elif kind == "bco_pair":
        loss = sp(-b * u) + sp(b * v)
        du, dv = -b * sig(-b * u), b * sig(b * v)
    elif kind == "sppo_hard":
        ew, el = u - 0.5 / b, v + 0.5 / b
        loss, du, dv = ew * ew + el * el, 2.0 * ew, 2.0 * el
    elif kind == "apo_zero":
        sw, sl = sig(b * u), sig(b * v)
        loss, du, dv = 1.0 - sw + sl, -b * sw * (1.0 - sw), b * sl * (1.0 - sl)
    elif kind == "apo_down":
        sw, sz = sig(b * u), sig(z)
        loss = sw + 1.0 - sz
        du, dv = b * sw * (1.0 - sw) - b * sz * (1.0 - sz), b * sz * (1.0 - sz)
    elif kind == "simpo":
        loss, dt = smoothed(z - gamma, 1.0 - eps, eps)
        du, dv = b * dt, -b * dt
    elif kind == "orpo":
        lo = (u - v) - (log1mexp(u) - log1mexp(v))
        loss = nll + b * sp(-lo)
        dlo = -b * sig(-lo)
        # d lo / du = 1 + e^u / (1 - e^u) = -1 / expm1(u)
        du, dv = -dlo / torch.expm1(u), dlo / torch.expm1(v)
        g_nll = torch.ones_like(x_w)
    elif kind == "cream":
        loss, dz = smoothed(z, c, 1.0 - c)
        du, dv = b * dz, -b * dz
    else:
        raise ValueError(f"unknown preference kind {kind!r}")
    return loss, du * inv_w, dv * inv_l, g_nll


def preference_pairs_kernel_ref(x_w: Tensor, x_l: Tensor, r_w: Tensor, r_l: Tensor, len_w: Tensor, len_l: Tensor,
                                c: Tensor, nll: Tensor, kind: int, beta: float, label_smoothing: float, gamma: float
                                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """preference_pairs_ref with the kernels' kind id (hotloop.contracts.PREFERENCE_KIND_IDS): the reference
    backend's kernel of hotloop::preference_pairs."""
    return preference_pairs_ref(x_w, x_l, r_w, r_l, len_w, len_l, c, nll, KINDS[kind], beta, label_smoothing, gamma)


def kto_items_ref(x: Tensor, r: Tensor, d: Tensor, kl: Tensor, beta: float, desirable_weight: float,
                  undesirable_weight: float) -> tuple[Tensor, Tensor]:
    """Kernel contract of KTO, [B] float tensors (d: 1.0 desirable, 0.0 undesirable) and kl [1] (already detached
    and clamped >= 0). Per item with h = x - r:
        desirable    l = w_d (1 - σ(β(h - kl))),   undesirable  l = w_u (1 - σ(β(kl - h)))
    Returns (loss [B], dloss/dx [B]) per item (not averaged)."""
    h = x - r
    des = d > 0.5
    t = torch.where(des, beta * (h - kl), beta * (kl - h))
    s = torch.sigmoid(t)
    w = torch.where(des, desirable_weight, undesirable_weight).to(x.dtype)
    sign = torch.where(des, 1.0, -1.0).to(x.dtype)
    return w * (1.0 - s), -w * s * (1.0 - s) * beta * sign


# ------------------------------------------------------------------------------------------------ whole losses
def compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def preference_rewards(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor | None, ref_rejected: Tensor | None,
                       kind: str, len_w: Tensor | None, len_l: Tensor | None) -> tuple[Tensor, Tensor]:
    """(h_w, h_l) as TRL logs them (before β): log-ratios, or s̄ for the reference-free kinds."""
    if kind in REFERENCE_FREE:
        return chosen / len_w, rejected / len_l
    return chosen - ref_chosen, rejected - ref_rejected


def preference_metrics(h_w: Tensor, h_l: Tensor, chosen: Tensor, rejected: Tensor, beta: float
                       ) -> dict[str, Tensor]:
    with torch.no_grad():
        rw, rl = beta * h_w, beta * h_l
        return {"rewards/chosen": rw.mean(), "rewards/rejected": rl.mean(),
                "rewards/accuracies": (h_w > h_l).to(h_w.dtype).mean(), "rewards/margins": (rw - rl).mean(),
                "logps/chosen": chosen.mean(), "logps/rejected": rejected.mean()}


def clamped_lengths(lengths: Tensor | None, dt: torch.dtype) -> Tensor | None:
    return None if lengths is None else lengths.detach().to(dt).clamp(min=1.0)


def preference_loss_ref(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor | None,
                        ref_rejected_logps: Tensor | None, kind: str, beta: float, label_smoothing: float,
                        gamma: float, consistency: Tensor | None, chosen_lengths: Tensor | None,
                        rejected_lengths: Tensor | None, chosen_nll: Tensor | None
                        ) -> tuple[Tensor, dict[str, Tensor]]:
    """docs/preference_loss.md written out TRL's way, with autograd: -> (loss [], metrics of PREFERENCE_METRICS, each [])."""
    dt = compute_dtype(chosen_logps)
    sw, sl = chosen_logps.to(dt), rejected_logps.to(dt)
    rw = None if ref_chosen_logps is None else ref_chosen_logps.detach().to(dt)
    rl = None if ref_rejected_logps is None else ref_rejected_logps.detach().to(dt)
    lw, ll = clamped_lengths(chosen_lengths, dt), clamped_lengths(rejected_lengths, dt)
    eps, b = label_smoothing, beta
    if kind in REFERENCE_FREE:
        mw, ml = sw / lw, sl / ll
        if kind == "simpo":
            logits = (mw - ml) - gamma / b
            losses = -F.logsigmoid(b * logits) * (1 - eps) - F.logsigmoid(-b * logits) * eps
        else:  # orpo
            log_odds = (mw - ml) - (log1mexp(mw) - log1mexp(ml))
            losses = chosen_nll.to(dt) - b * F.logsigmoid(log_odds)
    else:
        hw, hl = sw - rw, sl - rl
        z = b * (hw - hl)
        if kind in ("sigmoid", "cdpo"):
            losses = -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps
        elif kind == "robust":
            losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        elif kind == "hinge":
            losses = torch.relu(1 - z)
        elif kind == "ipo":
            losses = (hw / lw - hl / ll - 1 / (2 * b)) ** 2
        elif kind == "bco_pair":
            losses = -F.logsigmoid(b * hw) - F.logsigmoid(-b * hl)
        elif kind == "sppo_hard":
            losses = (hw - 0.5 / b) ** 2 + (hl + 0.5 / b) ** 2
        elif kind == "apo_zero":
            losses = (1 - torch.sigmoid(b * hw)) + torch.sigmoid(b * hl)
        elif kind == "apo_down":
            losses = torch.sigmoid(b * hw) + (1 - torch.sigmoid(z))
        elif kind == "cream":
            c = consistency.detach().to(dt)
            losses = -c * F.logsigmoid(z) - (1 - c) * F.logsigmoid(-z)
        else:
            raise ValueError(f"unknown preference kind {kind!r}")
    h_w, h_l = preference_rewards(sw.detach(), sl.detach(), rw, rl, kind, lw, ll)
    return losses.mean(), preference_metrics(h_w, h_l, sw.detach(), sl.detach(), b)


def kto_kl(kl: Tensor | float | None, like: Tensor) -> Tensor:
    """The KL term as a detached [1] tensor of like's dtype and device, clamped at 0 as TRL does (None: 0)."""
    if kl is None:
        return like.new_zeros(1)
    if not isinstance(kl, Tensor):
        kl = torch.tensor(float(kl))
    return kl.detach().reshape(1).to(device=like.device, dtype=like.dtype).clamp(min=0.0)


def kto_metrics(h: Tensor, x: Tensor, des: Tensor, kl: Tensor, beta: float) -> dict[str, Tensor]:
    """TRL's KTO metrics; a side with no items gives 0 (TRL skips logging it)."""
    with torch.no_grad():
        d = des.to(h.dtype)
        n_d, n_u = d.sum(), (1.0 - d).sum()
        mean_d = lambda t: torch.where(n_d > 0, (t * d).sum() / n_d.clamp(min=1.0), 0.0)  # noqa: E731
        mean_u = lambda t: torch.where(n_u > 0, (t * (1.0 - d)).sum() / n_u.clamp(min=1.0), 0.0)  # noqa: E731
        rc, rr = mean_d(beta * h), mean_u(beta * h)
        return {"rewards/chosen": rc, "rewards/rejected": rr, "rewards/margins": rc - rr,
                "logps/chosen": mean_d(x), "logps/rejected": mean_u(x), "kl": kl.reshape(())}


def kto_loss_ref(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, kl: Tensor | float | None, beta: float,
                 desirable_weight: float, undesirable_weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    """TRL's KTO loss ("kto" loss_type) with autograd: -> (loss [], metrics of KTO_METRICS)."""
    dt = compute_dtype(policy_logps)
    x, r = policy_logps.to(dt), ref_logps.detach().to(dt)
    k = kto_kl(kl, x)
    h = x - r
    des = desirable.to(torch.bool)
    losses = torch.where(des, desirable_weight * (1 - torch.sigmoid(beta * (h - k))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (k - h))))
    return losses.mean(), kto_metrics(h.detach(), x.detach(), des, k, beta)
