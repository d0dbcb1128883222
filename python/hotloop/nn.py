"""Module forms of the fused linear RL and preference losses, for drop-in use where a trainer holds a loss module.

GRPOLoss takes the main constructor and forward arguments of Liger's LigerFusedLinearGRPOLoss (TRL's names:
beta, epsilon_low / high, loss_type, max_completion_length, importance_sampling_level, temperature; compiled and
chunk_size are accepted and have nothing to tune here) and runs hotloop.linear_policy_loss; NFTLoss runs
hotloop.linear_nft_loss. Both return (loss, metrics dict) where Liger returns (loss, metrics tuple); the reference
model's log-probs come precomputed (ref_per_token_logps), not as ref_input / ref_weight.
DPOLoss / SimPOLoss / ORPOLoss take the arguments of Liger's LigerFusedLinear{DPO,SimPO,ORPO}Loss and run
hotloop.linear_preference_loss. hotloop.peer_names maps Liger's option names and values to the ops'.
"""
from __future__ import annotations

import torch
from torch import Tensor

from hotloop.ops.linear_losses import linear_nft_loss, linear_policy_loss
from hotloop.ops.linear_preference_loss import linear_preference_loss
from hotloop.ops.sequence_logprobs import linear_sequence_logprobs
from hotloop.peer_names import LOSS_TYPES, policy_options


class GRPOLoss(torch.nn.Module):
    """Clipped GRPO-family loss from hidden states and the lm_head weight (see hotloop.linear_policy_loss).

    Args:
        beta: KL coefficient (TRL default 0.0); needs ref_logp in forward when != 0.
        epsilon_low, epsilon_high: clip range (DAPO: 0.2 / 0.28).
        loss_type: "grpo" (seq-mean-token-mean), "bnpo" / "dapo" (token-mean), "dr_grpo" (Σ / (B·L_max)).
        max_completion_length: L_max for dr_grpo (default: the batch's T).
        importance_sampling_level: "token" or "sequence" (GSPO).
        temperature: logits are divided by it. kl: k1 / k2 / k3. dual_clip: c > 1 or None.
        entropy_coef: entropy bonus weight (0 = none).
    """

    def __init__(self, beta: float = 0.0, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                 loss_type: str = "dapo", max_completion_length: int | None = None,
                 importance_sampling_level: str = "token", temperature: float = 1.0, kl: str = "k3",
                 dual_clip: float | None = None, entropy_coef: float = 0.0, compiled: bool = True,
                 chunk_size: int = 1):
        super().__init__()
        del compiled, chunk_size  # Liger's knobs: nothing is compiled or chunked by the caller here
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"hotloop.nn.GRPOLoss: `loss_type` must be one of {tuple(LOSS_TYPES)}, got {loss_type!r}")
        self.options = dict(kl=kl, dual_clip=dual_clip, entropy_coef=entropy_coef, **policy_options(
            beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, loss_type=loss_type,
            importance_sampling_level=importance_sampling_level, max_completion_length=max_completion_length,
            temperature=temperature))

    def forward(self, _input: Tensor, lin_weight: Tensor, selected_token_ids: Tensor, attention_mask: Tensor,
                advantages: Tensor, bias: Tensor | None = None, ref_per_token_logps: Tensor | None = None,
                old_per_token_logps: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """_input [B, T, H], lin_weight [V, H], selected_token_ids [B, T], attention_mask [B, T], advantages [B]
        (or [B, T]); old_per_token_logps None = on-policy (the ratio is 1, as TRL with one iteration)."""
        return linear_policy_loss(_input, lin_weight, selected_token_ids, old_per_token_logps, advantages,
                                  attention_mask, ref_logp=ref_per_token_logps, bias=bias, **self.options)


class NFTLoss(torch.nn.Module):
    """NFT loss from hidden states and the lm_head weight (see hotloop.linear_nft_loss); groups of
    `group_size` adjacent responses unless forward gets a `group_index`."""

    def __init__(self, group_size: int | None = None, clamp_negative: float = 1.0, normalize: int = 1,
                 neg_weight: float = 1.0, ratio: str = "token", agg: str = "token-mean",
                 max_length: int | None = None, temperature: float = 1.0, entropy_coef: float = 0.0):
        super().__init__()
        self.group_size = group_size
        self.options = dict(clamp_negative=clamp_negative, normalize=normalize, neg_weight=neg_weight, ratio=ratio,
                            agg=agg, max_length=max_length, temperature=temperature, entropy_coef=entropy_coef)

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor, correct: Tensor,
                old_logp: Tensor | None = None, bias: Tensor | None = None, group_index: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """hidden [B, T, H], weight [V, H], labels / mask [B, T], correct [B]; old_logp None = on-policy."""
        return linear_nft_loss(hidden, weight, labels, old_logp, correct, mask, bias=bias,
                               group_size=None if group_index is not None else self.group_size,
                               group_index=group_index, **self.options)


class DPOLoss(torch.nn.Module):
    """DPO-family loss from hidden states and the lm_head weight (see hotloop.linear_preference_loss), a drop-in
    for Liger's LigerFusedLinearDPOLoss: the same constructor and forward arguments, chosen rows first and then
    rejected rows in `_input` / `target` (TRL's concatenated batch), prompt and padding positions marked with
    `ignore_index` in `target`. Returns (loss, metrics dict with TRL's names) where Liger returns (loss, tuple).

    Args:
        ignore_index: target value of positions outside the completions.
        beta: β.  loss_type: any kind of hotloop.preference_loss (sigmoid, ipo, apo_zero, cream, ...).
        compute_nll_loss, alpha: add alpha × the chosen tokens' mean NLL (RPO; Liger's and TRL's rpo_alpha).
        use_ref_model: the reference log-probs come from ref_input @ ref_weight.T in forward (or are passed
            precomputed as ref_chosen_logps / ref_rejected_logps).
        average_log_prob: per-token means instead of sums.
        label_smoothing, gamma, temperature: as hotloop.linear_preference_loss.
        compiled, chunk_size: Liger's knobs; nothing is compiled or chunked by the caller here.
    """

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, compute_nll_loss: bool = False,
                 compiled: bool = True, use_ref_model: bool = True, average_log_prob: bool = False,
                 chunk_size: int = 1, loss_type: str = "sigmoid", alpha: float = 1.0, label_smoothing: float = 0.0,
                 gamma: float = 0.5, temperature: float = 1.0):
        super().__init__()
        del compiled, chunk_size
        self.ignore_index, self.use_ref_model, self.average = ignore_index, use_ref_model, average_log_prob
        self.temperature = temperature
        self.options = dict(kind=loss_type, beta=beta, label_smoothing=label_smoothing, gamma=gamma,
                            sft_weight=alpha if compute_nll_loss else 0.0, average_log_prob=average_log_prob,
                            temperature=temperature)

    def _ref_logps(self, ref_input: Tensor, ref_weight: Tensor, ref_bias: Tensor | None, target: Tensor
                   ) -> tuple[Tensor, Tensor]:
        """The reference policy's per-sequence log-probs, [P] chosen and [P] rejected, no gradient."""
        mask = target != self.ignore_index
        with torch.no_grad():
            s = linear_sequence_logprobs(ref_input, ref_weight, target, mask, bias=ref_bias, average=self.average,
                                         temperature=self.temperature)
        half = s.shape[0] // 2
        return s[:half], s[half:]

    def forward(self, lin_weight: Tensor, _input: Tensor, target: Tensor, bias: Tensor | None = None,
                ref_input: Tensor | None = None, ref_weight: Tensor | None = None, ref_bias: Tensor | None = None,
                *, ref_chosen_logps: Tensor | None = None, ref_rejected_logps: Tensor | None = None,
                consistency: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """lin_weight [V, H], _input [2P, T, H], target [2P, T] (ignore_index outside completions); the reference
        from ref_input [2P, T, H] / ref_weight [V, H] / ref_bias, or precomputed [P] log-probs; consistency [P]
        (loss_type="cream")."""
        if self.use_ref_model and ref_chosen_logps is None and ref_input is not None:
            ref_chosen_logps, ref_rejected_logps = self._ref_logps(
                ref_input, lin_weight if ref_weight is None else ref_weight, ref_bias, target)
        return linear_preference_loss(_input, lin_weight, target, target != self.ignore_index,
                                      ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                                      consistency=consistency, bias=bias, **self.options)


class SimPOLoss(DPOLoss):
    """SimPO (reference-free, length-normalised: -logσ(β(s̄_w - s̄_l) - γ)); Liger's LigerFusedLinearSimPOLoss
    arguments."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0,
                 compute_nll_loss: bool = False, compiled: bool = True, gamma: float = 0.5, chunk_size: int = 1,
                 temperature: float = 1.0):
        super().__init__(ignore_index=ignore_index, beta=beta, compute_nll_loss=compute_nll_loss,
                         use_ref_model=False, loss_type="simpo", alpha=alpha, label_smoothing=label_smoothing,
                         gamma=gamma, temperature=temperature, compiled=compiled, chunk_size=chunk_size)

    def forward(self, lin_weight: Tensor, _input: Tensor, target: Tensor, bias: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        return super().forward(lin_weight, _input, target, bias)


class ORPOLoss(DPOLoss):
    """ORPO (reference-free: NLL of the chosen tokens - β logσ(log-odds ratio)); Liger's LigerFusedLinearORPOLoss
    arguments. The NLL is TRL's token mean over all chosen tokens."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, compute_nll_loss: bool = True,
                 compiled: bool = True, chunk_size: int = 1, temperature: float = 1.0):
        if not compute_nll_loss:
            raise ValueError("hotloop.nn.ORPOLoss: the NLL term is part of ORPO's loss (compute_nll_loss=True)")
        super().__init__(ignore_index=ignore_index, beta=beta, use_ref_model=False, loss_type="orpo",
                         temperature=temperature, compiled=compiled, chunk_size=chunk_size)

    def forward(self, lin_weight: Tensor, _input: Tensor, target: Tensor, bias: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        return super().forward(lin_weight, _input, target, bias)
