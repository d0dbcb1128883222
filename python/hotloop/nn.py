"""Module forms of the fused linear RL losses, for drop-in use where a trainer holds a loss module.

GRPOLoss takes the main constructor and forward arguments of Liger's LigerFusedLinearGRPOLoss (TRL's names:
beta, epsilon_low / high, loss_type, max_completion_length, importance_sampling_level, temperature; compiled and
chunk_size are accepted and have nothing to tune here) and runs hotloop.linear_policy_loss; NFTLoss runs
hotloop.linear_nft_loss. Both return (loss, metrics dict) where Liger returns (loss, metrics tuple); the reference
model's log-probs come precomputed (ref_per_token_logps), not as ref_input / ref_weight.
"""
from __future__ import annotations

import torch
from torch import Tensor

from hotloop.ops.linear_losses import linear_nft_loss, linear_policy_loss

# TRL / Liger loss_type -> SPEC §4 aggregation
LOSS_TYPES = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dapo": "token-mean", "dr_grpo": "dr_grpo"}


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
        self.options = dict(kl=kl, kl_coef=beta, clip_low=epsilon_low, clip_high=epsilon_high, dual_clip=dual_clip,
                            importance=importance_sampling_level, agg=LOSS_TYPES[loss_type],
                            max_length=max_completion_length, temperature=temperature, entropy_coef=entropy_coef)

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
