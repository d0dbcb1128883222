"""DPO-family preference losses (docs/preference_loss.md) and KTO over per-sequence log-prob sums.

Layers, outermost first:
  preference_loss / kto_loss  public API: checks; fills the per-pair inputs a kind does not read
                              with constants, averages the per-pair losses, attaches the per-pair gradients / B
                              (hotloop::attach_grads) and computes the metrics with torch
  hotloop::preference_pairs   custom ops (fake kernels), one pass over the pairs: loss and gradients per pair
  hotloop::kto_items          (reference.preference_loss.preference_pairs_ref / kto_items_ref are their specs)
  kernels                     dispatch.kernel(op, device): the reference functions, hotloop._C.cpu (C++),
                              triton_kernels.preference_loss (CUDA, or CPU under the interpreter)

The loss and its gradients come out of one pass; backward is a scalar multiply. No host synchronisation on GPU
beyond the optional consistency range check (off with HOTLOOP_CHECK_LABELS=0).
"""
from __future__ import annotations

import torch
from torch import Tensor

from hotloop._internal import dispatch
from hotloop._internal.checks import FLOAT_DTYPES, check_same_device, check_tensor, labels_checked_on_host
from hotloop._internal.attach_grads import loss_with_grads
from hotloop._internal.loss_checks import check_choice, check_real
from hotloop.contracts import LENGTH_NORMALISED, REFERENCE_FREE
from hotloop.contracts import PREFERENCE_KIND_IDS as KIND_IDS
from hotloop.contracts import PREFERENCE_KINDS as KINDS
from hotloop.reference.preference_loss import (clamped_lengths, kto_items_ref, kto_kl, kto_metrics,
                                               preference_metrics, preference_pairs_kernel_ref, preference_rewards)

_OP = "preference_loss"
_KTO_OP = "kto_loss"
for _op, _ref in (("preference_pairs", preference_pairs_kernel_ref), ("kto_items", kto_items_ref)):
    dispatch.register(_op, "reference", _ref)
    dispatch.register(_op, "cpu", dispatch.extension("cpu", _op))
    dispatch.register(_op, "triton", f"hotloop.triton_kernels.preference_loss:{_op}_triton")
LENGTH_DTYPES = (torch.int32, torch.int64) + FLOAT_DTYPES


@torch.library.custom_op("hotloop::preference_pairs", mutates_args=())
def preference_pairs(x_w: Tensor, x_l: Tensor, r_w: Tensor, r_l: Tensor, len_w: Tensor, len_l: Tensor, c: Tensor,
                     nll: Tensor, kind: int, beta: float, label_smoothing: float, gamma: float
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """[B] inputs -> (loss, g_w, g_l, g_nll), each [B]; see reference.preference_loss.preference_pairs_ref."""
    return dispatch.kernel("preference_pairs", x_w.device)(x_w, x_l, r_w, r_l, len_w, len_l, c, nll, kind, beta,
                                                            label_smoothing, gamma)


@preference_pairs.register_fake
def _(x_w, x_l, r_w, r_l, len_w, len_l, c, nll, kind, beta, label_smoothing, gamma):
    return tuple(x_w.new_empty(x_w.shape) for _ in range(4))


@torch.library.custom_op("hotloop::kto_items", mutates_args=())
def kto_items(x: Tensor, r: Tensor, d: Tensor, kl: Tensor, beta: float, desirable_weight: float,
              undesirable_weight: float) -> tuple[Tensor, Tensor]:
    """[B] inputs, kl [1] -> (loss [B], g [B]); see reference.preference_loss.kto_items_ref."""
    return dispatch.kernel("kto_items", x.device)(x, r, d, kl, beta, desirable_weight, undesirable_weight)


@kto_items.register_fake
def _(x, r, d, kl, beta, desirable_weight, undesirable_weight):
    return x.new_empty(x.shape), x.new_empty(x.shape)


# ------------------------------------------------------------------------------------------------------ checks
def _check_pair(op: str, name: str, t: Tensor | None, like: Tensor, dtypes=FLOAT_DTYPES,
                like_name: str = "chosen_logps") -> None:
    """t (when given) is [B] like `like`, on its device, of one of `dtypes`."""
    if t is None:
        return
    check_tensor(op, name, t, dtypes=dtypes)
    if tuple(t.shape) != tuple(like.shape):
        raise ValueError(f"hotloop.{op}: `{name}` must be [B] = {tuple(like.shape)} like the policy log-probs, "
                         f"got {tuple(t.shape)}")
    check_same_device(op, **{like_name: like, name: t})


def _check_logps(op: str, name: str, t: Tensor) -> None:
    check_tensor(op, name, t, dtypes=FLOAT_DTYPES)
    if t.dim() != 1 or t.shape[0] == 0:
        raise ValueError(f"hotloop.{op}: `{name}` must be [B] with B >= 1 (one sequence log-prob sum per "
                         f"response), got shape {tuple(t.shape)}")
    if t.dtype == torch.float64 and t.device.type != "cpu":
        raise TypeError(f"hotloop.{op}: float64 `{name}` is supported on CPU only")


def check_preference_args(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, kind, beta,
                          label_smoothing, gamma, consistency, chosen_lengths, rejected_lengths, chosen_nll
                          ) -> tuple[float, float, float]:
    """-> (beta, label_smoothing, gamma) validated; raises naming the argument."""
    op = _OP
    check_choice(op, "kind", kind, KINDS)
    _check_logps(op, "chosen_logps", chosen_logps)
    _check_pair(op, "rejected_logps", rejected_logps, chosen_logps)
    _check_pair(op, "ref_chosen_logps", ref_chosen_logps, chosen_logps)
    _check_pair(op, "ref_rejected_logps", ref_rejected_logps, chosen_logps)
    _check_pair(op, "chosen_lengths", chosen_lengths, chosen_logps, LENGTH_DTYPES)
    _check_pair(op, "rejected_lengths", rejected_lengths, chosen_logps, LENGTH_DTYPES)
    _check_pair(op, "consistency", consistency, chosen_logps)
    _check_pair(op, "chosen_nll", chosen_nll, chosen_logps)
    beta = check_real(op, "beta", beta, low=0.0, low_open=True)
    label_smoothing = check_real(op, "label_smoothing", label_smoothing, low=0.0)
    if label_smoothing >= 0.5:
        raise ValueError(f"hotloop.{op}: `label_smoothing` must be in [0, 0.5), got {label_smoothing}")
    gamma = check_real(op, "gamma", gamma)
    if kind not in REFERENCE_FREE:
        for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            if t is None:
                raise ValueError(f"hotloop.{op}: kind={kind!r} needs `{name}` (the reference policy's sequence "
                                 f"log-probs); only {REFERENCE_FREE} are reference-free")
    if kind in LENGTH_NORMALISED:
        for name, t in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
            if t is None:
                raise ValueError(f"hotloop.{op}: kind={kind!r} is length-normalised and needs `{name}` "
                                 f"(completion token counts, [B])")
    if kind == "orpo" and chosen_nll is None:
        raise ValueError(f"hotloop.{op}: kind='orpo' needs `chosen_nll` ([B], the chosen responses' NLL)")
    if kind == "cream":
        if consistency is None:
            raise ValueError(f"hotloop.{op}: kind='cream' needs `consistency` ([B] weights C in [0, 1])")
        if labels_checked_on_host(consistency.device) and not bool(((consistency >= 0) & (consistency <= 1)).all()):
            raise ValueError(f"hotloop.{op}: `consistency` must lie in [0, 1] (NaN refused)")
    return beta, label_smoothing, gamma


# ------------------------------------------------------------------------------------------------------ public
def preference_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
                    ref_rejected_logps: Tensor | None = None, *, kind: str = "sigmoid", beta: float = 0.1,
                    label_smoothing: float = 0.0, gamma: float = 0.5, consistency: Tensor | None = None,
                    chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
                    chosen_nll: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO-family pairwise preference loss, averaged over pairs (docs/preference_loss.md; TRL's DPOTrainer / CPOTrainer /
    ORPOTrainer formulas, see hotloop.reference.preference_loss for each kind written out).

    With h = s - s_ref (the policy's minus the reference's sequence log-prob sum) and z = β(h_w - h_l):
      sigmoid / cdpo: -(1-ε)logσ(z) - ε logσ(-z);  robust: [-(1-ε)logσ(z) + ε logσ(-z)] / (1-2ε);
      hinge: relu(1 - z);  ipo: (h_w/len_w - h_l/len_l - 1/(2β))²;  bco_pair: -logσ(βh_w) - logσ(-βh_l);
      sppo_hard: (h_w - 1/(2β))² + (h_l + 1/(2β))²;  apo_zero: 1 - σ(βh_w) + σ(βh_l);
      apo_down: σ(βh_w) + 1 - σ(z);  cream: -C logσ(z) - (1-C) logσ(-z);
      simpo (no reference): -(1-ε)logσ(t) - ε logσ(-t), t = β(s_w/len_w - s_l/len_l) - γ;
      orpo (no reference): nll_w - β logσ(lo), lo = (s̄_w - s̄_l) - (log(1 - e^s̄_w) - log(1 - e^s̄_l)), s̄ = s/len.

    Args:
        chosen_logps, rejected_logps: [B] sequence log-prob sums of the chosen / rejected responses under the
            policy (float32; bf16 / fp16; fp64 on CPU). Receive gradients.
        ref_chosen_logps, ref_rejected_logps: [B] the reference policy's; required except for simpo / orpo.
        kind: one of hotloop.reference.preference_loss.KINDS.
        beta: β > 0.  label_smoothing: ε in [0, 0.5) (sigmoid, cdpo, robust, simpo).  gamma: SimPO's margin γ.
        consistency: [B] CREAM weights C in [0, 1] (cream only).
        chosen_lengths, rejected_lengths: [B] completion token counts (int or float; clamped to >= 1 as TRL),
            required by ipo, simpo, orpo.
        chosen_nll: [B] the chosen responses' NLL (orpo only; receives a gradient of 1/B).

    Returns:
        (loss, metrics): loss [] float32 (float64 for float64 input); metrics, each [] and detached:
        rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected.
    The gradients are computed in the forward: one backward per call (no retain_graph, no double backward).
    """
    value, metrics, g_w, g_l, g_nll = preference_value_and_grads(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, kind, beta, label_smoothing, gamma,
        consistency, chosen_lengths, rejected_lengths, chosen_nll)
    pairs = [(chosen_logps, g_w), (rejected_logps, g_l)] + ([(chosen_nll, g_nll)] if g_nll is not None else [])
    return loss_with_grads(value, pairs), metrics


def preference_value_and_grads(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor | None,
                               ref_rejected_logps: Tensor | None, kind: str, beta: float, label_smoothing: float,
                               gamma: float, consistency: Tensor | None, chosen_lengths: Tensor | None,
                               rejected_lengths: Tensor | None, chosen_nll: Tensor | None
                               ) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor, Tensor | None]:
    """preference_loss's value and metrics with its gradients as tensors (no autograd): (loss [], metrics,
    d loss / d chosen_logps [B], d loss / d rejected_logps [B], d loss / d chosen_nll [B] (orpo) | None), in the
    math dtype. For callers that chain them by hand (the fused linear form, inside its custom op)."""
    beta, label_smoothing, gamma = check_preference_args(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, kind, beta, label_smoothing, gamma,
        consistency, chosen_lengths, rejected_lengths, chosen_nll)
    dispatch.backend("preference_pairs", chosen_logps.device)  # a bad HOTLOOP_BACKEND fails here, before any work
    # float64 math for float64 input (CPU only; the Triton kernels take it in float32)
    dt = torch.float64 if chosen_logps.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        x_w, x_l = chosen_logps.detach().to(dt).contiguous(), rejected_logps.detach().to(dt).contiguous()
        zeros, ones = torch.zeros_like(x_w), torch.ones_like(x_w)
        filled = lambda t: zeros if t is None else t.detach().to(dt).contiguous()  # noqa: E731
        r_w, r_l = filled(ref_chosen_logps), filled(ref_rejected_logps)
        len_w = ones if chosen_lengths is None else clamped_lengths(chosen_lengths, dt).contiguous()
        len_l = ones if rejected_lengths is None else clamped_lengths(rejected_lengths, dt).contiguous()
        c = ones if consistency is None else consistency.detach().to(dt).contiguous()
        nll = filled(chosen_nll)
        losses, g_w, g_l, g_nll = preference_pairs(x_w, x_l, r_w, r_l, len_w, len_l, c, nll, KIND_IDS[kind], beta,
                                                   label_smoothing, gamma)
        inv_b = 1.0 / chosen_logps.shape[0]
        h_w, h_l = preference_rewards(x_w, x_l, r_w, r_l, kind, len_w, len_l)
        metrics = preference_metrics(h_w, h_l, x_w, x_l, beta)
    return (losses.sum() * inv_b, metrics, g_w * inv_b, g_l * inv_b,
            g_nll * inv_b if kind == "orpo" else None)


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0, kl: Tensor | float | None = None
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO loss (TRL's KTOTrainer, loss_type="kto"), averaged over the B items.

    With h = policy_logps - ref_logps and z0 = max(kl, 0) (detached):
        desirable:    desirable_weight * (1 - σ(β(h - z0)));   undesirable:  undesirable_weight * (1 - σ(β(z0 - h)))

    Args:
        policy_logps, ref_logps: [B] sequence log-prob sums (float32; bf16 / fp16; fp64 on CPU); only
            policy_logps receives a gradient.
        desirable: [B] bool labels.
        beta > 0; desirable_weight, undesirable_weight >= 0.
        kl: the batch KL estimate z0 (a one-element tensor or a number; None = 0); clamped at 0, no gradient.

    Returns:
        (loss [], metrics): rewards/chosen (mean βh over desirable items, 0 when none), rewards/rejected (over the
        undesirable ones), rewards/margins, logps/chosen, logps/rejected, kl (the clamped z0).
    """
    op = _KTO_OP
    _check_logps(op, "policy_logps", policy_logps)
    _check_pair(op, "ref_logps", ref_logps, policy_logps, like_name="policy_logps")
    if ref_logps is None:
        raise TypeError(f"hotloop.{op}: `ref_logps` must be a torch.Tensor, got None")
    _check_pair(op, "desirable", desirable, policy_logps, (torch.bool,), like_name="policy_logps")
    if desirable is None:
        raise TypeError(f"hotloop.{op}: `desirable` must be a bool torch.Tensor, got None")
    if kl is not None:
        if isinstance(kl, Tensor):
            check_tensor(op, "kl", kl, dtypes=FLOAT_DTYPES)
            if kl.numel() != 1:
                raise ValueError(f"hotloop.{op}: `kl` must be a scalar (one element), got shape {tuple(kl.shape)}")
            check_same_device(op, policy_logps=policy_logps, kl=kl)
        else:
            kl = check_real(op, "kl", kl)
    beta = check_real(op, "beta", beta, low=0.0, low_open=True)
    desirable_weight = check_real(op, "desirable_weight", desirable_weight, low=0.0)
    undesirable_weight = check_real(op, "undesirable_weight", undesirable_weight, low=0.0)
    dispatch.backend("kto_items", policy_logps.device)  # a bad HOTLOOP_BACKEND fails here, before any work
    dt = torch.float64 if policy_logps.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        x = policy_logps.detach().to(dt).contiguous()
        r = ref_logps.detach().to(dt).contiguous()
        d = desirable.to(dt).contiguous()
        k = kto_kl(kl, x).contiguous()
        losses, g = kto_items(x, r, d, k, beta, desirable_weight, undesirable_weight)
        inv_b = 1.0 / x.shape[0]
        value = losses.sum() * inv_b
        metrics = kto_metrics(x - r, x, desirable, k, beta)
    return loss_with_grads(value, [(policy_logps, g * inv_b)]), metrics
