"""PPO / GRPO-family clipped policy loss with KL to a reference policy (docs/policy_loss.md): GRPO, DAPO (clip_high 0.28),
Dr. GRPO (agg="dr_grpo"), GSPO (importance="sequence"), dual-clip PPO, REINFORCE++ / RLOO advantages.

Layers, outermost first:
  policy_loss             public API: checks; turns the aggregation into per-token weights and a
                          sequence-level ratio into a per-token log-ratio (PolicyTerms), so the kernel is
                          elementwise; attaches the gradient it returns to the loss (hotloop::attach_grads)
  hotloop::policy_tokens  custom op (fake kernel), one pass over the tokens: d loss / d log-ratio, d loss / d kl
                          input, and the loss + metric sums; runs dispatch.kernel("policy_tokens", device)
  kernels                 reference.policy_loss.policy_tokens_ref (the spec), hotloop._C.cpu.policy_tokens (C++),
                          triton_kernels.policy_loss.policy_tokens_triton (CUDA, or CPU under the interpreter)

The loss and its gradient come out of one pass; backward is a scalar multiply. PolicyTerms is shared with the
fused linear path (hotloop.linear_policy_loss), which feeds it log-probs computed from hidden states block by block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hotloop._internal import dispatch
from hotloop._internal.attach_grads import loss_with_grads
from hotloop._internal.loss_checks import (MASK_DTYPES, check_choice, check_like, check_per_row, check_real,
                                     check_token_layout, float_mask, resolve_max_length)
from hotloop._internal.row_layout import RowLayout
from hotloop._internal.token_terms import TokenTerms
from hotloop.contracts import IMPORTANCE, KL_IDS, KL_KINDS, POLICY_METRICS
from hotloop.reference.policy_loss import per_token_given, policy_tokens_kernel_ref

_OP = "policy_loss"
dispatch.register("policy_tokens", "reference", policy_tokens_kernel_ref)
dispatch.register("policy_tokens", "cpu", dispatch.extension("cpu", "policy_tokens"))
dispatch.register("policy_tokens", "triton", "hotloop.triton_kernels.policy_loss:policy_tokens_triton")


@torch.library.custom_op("hotloop::policy_tokens", mutates_args=())
def policy_tokens(lr: Tensor, kld: Tensor | None, adv: Tensor, m: Tensor, w: Tensor, clip_low: float,
                  clip_high: float, dual_clip: float, kl_kind: int, kl_coef: float
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """[N] inputs -> (g_lr [N], g_kl [N] | [0], sums [6]); see reference.policy_loss.policy_tokens_ref."""
    return dispatch.kernel("policy_tokens", lr.device)(lr, kld, adv, m, w, clip_low, clip_high, dual_clip, kl_kind,
                                                        kl_coef)


@policy_tokens.register_fake
def _(lr, kld, adv, m, w, clip_low, clip_high, dual_clip, kl_kind, kl_coef):
    return lr.new_empty(lr.shape), lr.new_empty(lr.shape if kl_kind else (0,)), lr.new_empty(6)


@dataclass(frozen=True)
class PolicyOptions:
    """The options of one policy-loss call, validated (check_policy_args builds it). dual_clip None = off;
    max_length resolved (None only where the aggregation does not read it)."""

    kl: str = "k3"
    kl_coef: float = 0.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    importance: str = "token"
    agg: str = "token-mean"
    max_length: int | None = None

    def op_args(self) -> tuple:
        """The options as custom-op arguments (schemas take no Python objects): dual_clip -1 and max_length 0
        stand for None; PolicyOptions.from_op_args inverts it."""
        return (self.kl, self.kl_coef, self.clip_low, self.clip_high,
                -1.0 if self.dual_clip is None else self.dual_clip, self.importance, self.agg, self.max_length or 0)

    @staticmethod
    def from_op_args(kl: str, kl_coef: float, clip_low: float, clip_high: float, dual_clip: float,
                     importance: str, agg: str, max_length: int) -> "PolicyOptions":
        return PolicyOptions(kl, kl_coef, clip_low, clip_high, None if dual_clip <= 0 else dual_clip, importance,
                             agg, max_length or None)


class PolicyTerms(TokenTerms):
    """One policy-loss call reduced to per-token data: weights, advantages, old / ref log-probs, options.

    grads(logp) gives (d loss / d logp [N], sums [6]) for all tokens; token_local says whether grads can also be
    taken block by block (token-level ratio: each token's gradient needs only that token), which lets the fused
    linear path finish a block of tokens while its logits are still in cache.
    """

    METRICS = POLICY_METRICS

    def __init__(self, logp: Tensor, old_logp: Tensor | None, advantages: Tensor, mask: Tensor,
                 ref_logp: Tensor | None, cu_seqlens: Tensor | None, opts: PolicyOptions):
        # float64 math for float64 input (CPU only; the Triton kernels take it in float32)
        self.dt = torch.float64 if logp.dtype == torch.float64 else torch.float32
        self.layout = RowLayout(logp.shape, cu_seqlens, logp.device)
        self.m = float_mask(_OP, mask, self.dt)
        self.w = self.w_agg = self.layout.agg_weights(self.m, opts.agg, opts.max_length)
        adv = advantages.detach().to(self.dt)
        per_token = per_token_given(adv, logp, cu_seqlens)
        self.adv = adv.reshape(-1).contiguous() if per_token else self.layout.per_token(adv)
        self.old = None if old_logp is None else old_logp.detach().reshape(-1).to(self.dt)
        self.ref = None if ref_logp is None else ref_logp.detach().reshape(-1).to(self.dt)
        self.kl_kind = KL_IDS[opts.kl] if self.ref is not None else 0
        self.cfg = (opts.clip_low, opts.clip_high, -1.0 if opts.dual_clip is None else opts.dual_clip)
        self.kl_coef = opts.kl_coef
        self.num_sums = 6
        self.token_local = opts.importance == "token"

    def _tokens(self, logp: Tensor, sel: slice | Tensor) -> tuple[Tensor, Tensor]:
        delta = torch.zeros_like(logp) if self.old is None else logp - self.old[sel]  # None: on-policy
        inv = None
        if not self.token_local:  # whole rows only: sel is slice(None)
            delta, inv = self.layout.sequence_log_ratio(torch.where(self.m != 0, delta, 0.0), self.m)
        kld = None if self.kl_kind == 0 else (logp - self.ref[sel]).contiguous()
        g_lr, g_kl, sums = torch.ops.hotloop.policy_tokens(
            delta.contiguous(), kld, self.adv[sel], self.m[sel], self.w[sel], *self.cfg, self.kl_kind, self.kl_coef)
        g = g_lr if inv is None else self.layout.chain_sequence(g_lr, inv)
        return (g if self.kl_kind == 0 else g + g_kl), sums



def check_policy_args(op: str, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                      ref_logp: Tensor | None, kl: str, kl_coef: float, clip_low: float, clip_high: float,
                      dual_clip: float | None, importance: str, agg: str, max_length: int | None,
                      cu_seqlens: Tensor | None,
                      logp_name: str = "logp") -> PolicyOptions:
    """-> the validated options; raises naming the argument."""
    check_token_layout(op, logp, cu_seqlens, logp_name)
    check_like(op, "old_logp", old_logp, logp)
    check_like(op, "ref_logp", ref_logp, logp)
    check_like(op, "mask", mask, logp, dtypes=MASK_DTYPES)
    B = logp.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    check_per_row(op, "advantages", advantages, logp, B)
    check_choice(op, "kl", kl, KL_KINDS)
    check_choice(op, "importance", importance, IMPORTANCE)
    kl_coef = check_real(op, "kl_coef", kl_coef)
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError(f"hotloop.{op}: `kl_coef`={kl_coef} needs `ref_logp` (the reference policy's log-probs)")
    clip_low = check_real(op, "clip_low", clip_low, low=0.0, high=1.0)
    clip_high = check_real(op, "clip_high", clip_high, low=0.0)
    if dual_clip is not None:
        dual_clip = check_real(op, "dual_clip", dual_clip, low=1.0, low_open=True)
    max_length = resolve_max_length(op, agg, max_length, logp, cu_seqlens)
    return PolicyOptions(kl, kl_coef, clip_low, clip_high, dual_clip, importance, agg, max_length)


def policy_loss(logp: Tensor, old_logp: Tensor | None, advantages: Tensor, mask: Tensor, *,
                ref_logp: Tensor | None = None, kl: str = "k3", kl_coef: float = 0.0, clip_low: float = 0.2,
                clip_high: float = 0.2, dual_clip: float | None = None, importance: str = "token",
                agg: str = "token-mean", max_length: int | None = None, cu_seqlens: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped policy-gradient loss with optional KL penalty, aggregated over tokens (docs/policy_loss.md).

    Per token with Δ = logp - old_logp, ρ = exp(clamp(Δ, -20, 20)) and advantage A:
        l = max(-A ρ, -A clip(ρ, 1 - clip_low, 1 + clip_high))       (dual clip c: min(l, -c A) where A < 0)
          + kl_coef * KL(logp, ref_logp),  KL in k1 = d, k2 = d²/2, k3 = exp(-d) + d - 1 with d = logp - ref_logp
    importance="sequence" (GSPO) uses ρ = exp(mean over the row's tokens of Δ) for every token of the row.

    Args:
        logp: [B, T] log-probs of the sampled tokens under the policy being trained (float32; bf16 / fp16 / fp64
            accepted), or packed [N] with `cu_seqlens`. The only input that receives a gradient.
        old_logp: log-probs under the policy that sampled (logp's shape); None = on-policy (ρ = 1, the gradient
            of one GRPO iteration, as TRL's old = logp.detach()).
        advantages: [B] per response (broadcast to its tokens) or per token (logp's shape; packed [N] is read per
            response when N == B).
        mask: logp's shape, bool or float weights >= 0; tokens with mask 0 contribute nothing (NaN there is fine).
        ref_logp: log-probs under the reference policy; needed when kl_coef != 0 (then also the `kl_mean` metric).
        kl, kl_coef: KL estimator and its weight β (TRL's and verl's default β is 0.0).
        clip_low, clip_high: ε_low, ε_high (0.2 / 0.2; DAPO: 0.2 / 0.28).
        dual_clip: c > 1 of dual-clip PPO (verl's clip_ratio_c, e.g. 3.0), None = off.
        importance: "token" (PPO / GRPO) or "sequence" (GSPO).
        agg: "token-mean" Σ l m / Σ m; "seq-mean-token-mean" mean over rows of each row's token mean;
            "seq-mean-token-sum" mean over rows of each row's token sum (both divide by B, as TRL / verl);
            "seq-mean-token-sum-norm" and "dr_grpo": Σ l m / (B * max_length).
        max_length: L_max of the last two (default T; required with packed input).
        cu_seqlens: [B + 1] int32 / int64 sequence boundaries of packed input.

    Returns:
        (loss, metrics): loss [] float32 (float64 for float64 logp), differentiable w.r.t. logp; metrics, each []
        and detached, token means under the mask: clip_frac_low (ρ < 1 - ε_low with A < 0), clip_frac_high
        (ρ > 1 + ε_high with A > 0), clip_frac_dual, ratio_mean, kl_mean (0 without ref_logp).
    An all-empty mask gives loss 0 and gradient 0. The gradient is computed in the forward: one backward per
    call (no retain_graph, no double backward). No host synchronisation on GPU beyond the optional cu_seqlens /
    mask checks (off with HOTLOOP_CHECK_LABELS=0).
    """
    opts = check_policy_args(
        _OP, logp, old_logp, advantages, mask, ref_logp, kl, kl_coef, clip_low, clip_high, dual_clip, importance,
        agg, max_length, cu_seqlens)
    dispatch.backend("policy_tokens", logp.device)  # a bad HOTLOOP_BACKEND fails here, before any work
    terms = PolicyTerms(logp, old_logp, advantages, mask, ref_logp, cu_seqlens, opts)
    with torch.no_grad():
        g, sums = terms.grads(logp.detach().reshape(-1).to(terms.dt))
    loss = loss_with_grads(sums[0], [(logp, g.view(logp.shape))])
    return loss, terms.metrics(sums)
