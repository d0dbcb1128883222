"""GRPO and its variants (DAPO, Dr.GRPO, BNPO, GSPO, RLOO) as one loss over a Hugging Face causal LM's batch:
group-relative advantages (hotloop.group_advantages) and the clipped policy loss straight from the backbone's
hidden states and the lm_head weight (hotloop.linear_policy_loss), so the [B, C, V] logits never exist.

Options carry TRL GRPOConfig's names (hotloop.peer_names maps them to the ops'); the variants are settings of them:
    GRPO (TRL's default)  loss_type="dapo"                    token mean over the batch
    original GRPO         loss_type="grpo"                    mean over sequences of their token means
    Dr.GRPO               loss_type="dr_grpo", scale_rewards="none"   Σ / (B · max_completion_length)
    DAPO                  epsilon_high=0.28, mask_truncated_completions=True
    GSPO                  importance_sampling_level="sequence"
    RLOO                  advantage="rloo"
"""
from __future__ import annotations

import torch
from torch import Tensor

from hotloop._internal.loss_checks import check_real
from hotloop.contracts import IMPORTANCE
from hotloop.ops.group_advantages import group_advantages
from hotloop.ops.linear_losses import linear_policy_loss
from hotloop.peer_names import ADVANTAGES, LOSS_TYPES, SCALE_REWARDS, policy_options
from hotloop.train._backbone import (SEQUENCE_KEYS, Output, check_batch, check_choice, completions, ref_logps,
                                     require)
from hotloop.train._engine import data_parallel_groups, global_token_mean, in_forward

BATCH_KEYS = SEQUENCE_KEYS + ("rewards", "advantages", "group_ids", "old_logps", "ref_logps", "truncated",
                              "num_items_in_batch")


class GRPO:
    """GRPO-family loss of a causal LM on a batch of sampled completions.

    Args:
        num_generations: G, responses per prompt, adjacent in the batch (TRL's layout); or give batch["group_ids"].
        beta: KL coefficient against the reference (needs batch["ref_logps"] or `ref_model`); TRL default 0.
        epsilon, epsilon_high: clip range [1 - epsilon, 1 + epsilon_high]; epsilon_high None = epsilon.
        loss_type: "dapo" / "bnpo" (token mean), "grpo" (sequence mean of token means), "dr_grpo".
        importance_sampling_level: "token" (PPO ratio per token) or "sequence" (GSPO).
        scale_rewards: "group" (divide by the group's std), "batch" (by the batch std), "none"; True / False as TRL.
        advantage: "grpo" (mean baseline, scaled per scale_rewards), "rloo" (leave-one-out), "dr_grpo"
            (mean baseline, unscaled), "reinforce_pp_baseline".
        temperature: sampling temperature; the logits are divided by it (TRL).
        max_completion_length: L for dr_grpo (default: the batch's completion length C).
        mask_truncated_completions: drop completions flagged batch["truncated"] [B] bool, or without
            `eos_token_id` when no flags are given (DAPO's overlong filtering).
        eos_token_id: see mask_truncated_completions.
        kl: KL estimator "k1" / "k2" / "k3" (TRL: k3).  entropy_coef: entropy bonus weight.
        ref_model: frozen reference model for the KL term when the batch has no ref_logps.
        reward_eps: added to the std before dividing (TRL: 1e-4).
        grad_filter_eps: opt-in gradient filtering of the fused op (0 = exact).

    loss(model, batch): batch holds input_ids [B, P + C] (+ attention_mask) and completion_mask [B, C] over the
    last C tokens, or TRL's prompt_ids / prompt_mask / completion_ids / completion_mask; rewards [B] (or
    advantages [B] / [B, C]); optional group_ids [B], old_logps [B, C] (absent = on-policy, ratio 1),
    ref_logps [B, C], truncated [B].
    """

    def __init__(self, *, num_generations: int | None = None, beta: float = 0.0, epsilon: float = 0.2,
                 epsilon_high: float | None = None, loss_type: str = "dapo", importance_sampling_level: str = "token",
                 scale_rewards: str | bool = "group", advantage: str = "grpo", temperature: float = 1.0,
                 max_completion_length: int | None = None, mask_truncated_completions: bool = False,
                 eos_token_id: int | None = None, kl: str = "k3", entropy_coef: float = 0.0,
                 ref_model: torch.nn.Module | None = None, reward_eps: float = 1e-4, grad_filter_eps: float = 0.0):
        check_choice("GRPO", "loss_type", loss_type, LOSS_TYPES)
        check_choice("GRPO", "scale_rewards", scale_rewards, tuple(SCALE_REWARDS))
        check_choice("GRPO", "advantage", advantage, ADVANTAGES)
        check_choice("GRPO", "importance_sampling_level", importance_sampling_level, IMPORTANCE)
        # the numbers in the user's (TRL's) names, now rather than at the first loss in the op's names
        beta = check_real("train.GRPO", "beta", beta)
        epsilon = check_real("train.GRPO", "epsilon", epsilon, low=0.0, high=1.0)
        if epsilon_high is not None:
            epsilon_high = check_real("train.GRPO", "epsilon_high", epsilon_high, low=0.0)
        temperature = check_real("train.GRPO", "temperature", temperature, low=0.0, low_open=True)
        reward_eps = check_real("train.GRPO", "reward_eps", reward_eps, low=0.0)
        entropy_coef = check_real("train.GRPO", "entropy_coef", entropy_coef)
        self.num_generations, self.beta, self.ref_model, self.loss_type = num_generations, beta, ref_model, loss_type
        self.advantage, self.scale, self.reward_eps = advantage, SCALE_REWARDS[scale_rewards], reward_eps
        self.mask_truncated, self.eos_token_id, self.temperature = mask_truncated_completions, eos_token_id, temperature
        self.options = dict(kl=kl, entropy_coef=entropy_coef, grad_filter_eps=grad_filter_eps, **policy_options(
            beta=beta, epsilon_low=epsilon, epsilon_high=epsilon if epsilon_high is None else epsilon_high,
            loss_type=loss_type, importance_sampling_level=importance_sampling_level,
            max_completion_length=max_completion_length, temperature=temperature))

    def advantages(self, batch: dict) -> Tensor:
        """Advantages [B] (or the batch's [B, C]): batch["advantages"] if given, else from batch["rewards"] over
        the groups (batch["group_ids"] or num_generations adjacent responses)."""
        if batch.get("advantages") is not None:
            return require("GRPO", batch, "advantages")
        rewards = require("GRPO", batch, "rewards")
        groups = batch.get("group_ids")
        if groups is None and self.num_generations is None:
            raise ValueError("hotloop.train.GRPO: give `num_generations` or batch['group_ids'] to group the rewards")
        kind = self.advantage
        if kind == "grpo" and self.scale == "none":
            kind = "dr_grpo"
        return group_advantages(rewards.float(), group_size=None if groups is not None else self.num_generations,
                                group_index=groups, kind=kind, scale=self.scale, eps=self.reward_eps)

    def loss(self, model: torch.nn.Module, batch: dict) -> Output:
        """One GRPO loss over the batch; loss.backward() reaches every parameter of `model`.

        `model` may be wrapped (DDP, FSDP2, a DeepSpeed engine): the loss runs as its forward, so the engine
        synchronises the gradients. Token means (loss_type dapo / bnpo) span every data-parallel rank, and with
        batch["num_items_in_batch"] (the step's scored tokens, all ranks and accumulation steps) every
        micro-batch of the step too; groups of num_generations stay within a rank."""
        check_batch("GRPO", batch, BATCH_KEYS)
        adv = self.advantages(batch)  # the batch's errors before any forward
        if self.beta != 0.0 and batch.get("ref_logps") is None and self.ref_model is None:
            raise ValueError("hotloop.train.GRPO: beta != 0 needs batch['ref_logps'] or a `ref_model`")
        if batch.get("num_items_in_batch") is not None and self.options["agg"] != "token-mean":
            raise ValueError(f"hotloop.train.GRPO: batch['num_items_in_batch'] normalises token means (loss_type "
                             f"dapo / bnpo); loss_type={self.loss_type!r} averages per sequence: divide the loss by "
                             "the gradient-accumulation steps instead")
        ref = ref_logps("GRPO", self.ref_model, batch, "ref_logps", self.temperature) if self.beta != 0.0 else None
        groups = data_parallel_groups(model) if self.options["agg"] == "token-mean" else []
        return in_forward("GRPO", model, lambda m: self._loss(m, batch, adv, ref, groups))

    def _loss(self, model: torch.nn.Module, batch: dict, adv: Tensor, ref: Tensor | None, groups: list) -> Output:
        c = completions("GRPO", model, batch)
        mask = c.mask
        if self.mask_truncated:
            mask = mask * ~self._truncated(batch, c.labels, mask)[:, None]
        loss, metrics = c.head_loss(lambda h, w, b: linear_policy_loss(
            h, w, c.labels, batch.get("old_logps"), adv, mask, ref_logp=ref, bias=b, **self.options))
        if self.options["agg"] == "token-mean":
            loss = global_token_mean("GRPO", loss, mask.sum(), batch.get("num_items_in_batch"), groups)
        if batch.get("rewards") is not None:
            r = batch["rewards"].detach().float()
            metrics["reward_mean"], metrics["reward_std"] = r.mean(), r.std() if r.numel() > 1 else r.new_zeros(())
        metrics["completion_length"] = mask.sum(1).float().mean()
        return Output(loss, metrics)

    def _truncated(self, batch: dict, labels: Tensor, mask: Tensor) -> Tensor:
        if batch.get("truncated") is not None:
            return require("GRPO", batch, "truncated").bool()
        if self.eos_token_id is None:
            raise ValueError("hotloop.train.GRPO: mask_truncated_completions needs batch['truncated'] or "
                             "`eos_token_id`")
        return ~((labels == self.eos_token_id) & (mask != 0)).any(1)
