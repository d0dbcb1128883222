"""The names TRL, Liger and verl give the options of hotloop's losses, and the hotloop argument each becomes.

hotloop.nn takes Liger's loss-module arguments, hotloop.train TRL's GRPOConfig names, and hotloop.integrations a
TRL trainer's settings; all three translate them here, so a peer's option name and value mean the same thing in
each layer. hotloop's names (the last column) are the ops' arguments, defined in hotloop.contracts.

GRPO family -> hotloop.linear_policy_loss (policy_options):
    TRL GRPOConfig             Liger LigerFusedLinearGRPOLoss  verl actor_rollout_ref.actor  hotloop
    beta                       beta                            kl_loss_coef (use_kl_loss)    kl_coef
    epsilon                    epsilon_low                     clip_ratio_low                clip_low
    epsilon_high               epsilon_high                    clip_ratio_high               clip_high
    -                          -                               clip_ratio_c                  dual_clip
    importance_sampling_level  importance_sampling_level       -                             importance
    loss_type                  loss_type                       loss_agg_mode                 agg (LOSS_TYPES)
    max_completion_length      max_completion_length           -                             max_length
    temperature                temperature                     rollout.temperature           temperature
    (k3)                       (k3)                            kl_loss_type                  kl
    -                          -                               entropy_coeff                 entropy_coef
  verl's values: loss_agg_mode's token-mean / seq-mean-token-mean / seq-mean-token-sum / seq-mean-token-sum-norm
  are hotloop's agg names as they are; kl_loss_type kl / mse / low_var_kl (or k1 / k2 / k3) are kl k1 / k2 / k3
  (verl also clamps its low_var_kl estimate to [-10, 10]; abs has no kl).

GRPO advantages -> hotloop.group_advantages (hotloop.train.GRPO):
    TRL GRPOConfig.scale_rewards  group / batch / none, or True / False  ->  scale (SCALE_REWARDS)
    verl algorithm.adv_estimator  grpo / rloo / reinforce_plus_plus_baseline  ->  advantage grpo / rloo /
        reinforce_pp_baseline (ADVANTAGES); verl's norm_adv_by_std_in_grpo=False is scale="none"

DPO family -> hotloop.linear_preference_loss:
    TRL DPOConfig      Liger LigerFusedLinear{DPO,SimPO,ORPO}Loss   hotloop
    loss_type          loss_type                                    kind (TRL_DPO_LOSS_TYPES: the same names)
    beta               beta                                         beta
    label_smoothing    label_smoothing                              label_smoothing (TRL applies it to robust only)
    rpo_alpha          alpha (with compute_nll_loss=True)           sft_weight
    -                  gamma (SimPO)                                gamma
    -                  average_log_prob                             average_log_prob
"""
from __future__ import annotations

# TRL GRPOConfig.loss_type / Liger's loss_type -> agg: grpo is the paper's mean over sequences of their token
# means; bnpo and dapo are both a token mean (TRL's dapo normalises by the generation batch's token count, which
# the TRL integration rescales to); dr_grpo is Σ / (B · max_completion_length).
LOSS_TYPES = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dapo": "token-mean", "dr_grpo": "dr_grpo"}

# TRL GRPOConfig.scale_rewards -> group_advantages' scale; True / False are TRL's older boolean form.
SCALE_REWARDS = {"group": "group", "batch": "batch", "none": "none", True: "group", False: "none"}

# hotloop.train.GRPO's advantage values, each the group_advantages kind of the same name.
ADVANTAGES = ("grpo", "rloo", "dr_grpo", "reinforce_pp_baseline")

# TRL DPOConfig.loss_type values whose TRL loss is hotloop's kind of the same name; TRL's others (exo_pair,
# nca_pair, aot, aot_pair, discopop, sft, ...) have no fused kind, and cdpo / simpo / orpo / cream are hotloop
# kinds that TRL's DPOTrainer does not name.
TRL_DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "apo_zero", "apo_down")


def policy_options(*, beta: float, epsilon_low: float, epsilon_high: float, loss_type: str,
                   importance_sampling_level: str, max_completion_length: int | None, temperature: float) -> dict:
    """hotloop.linear_policy_loss's keywords from the options TRL and Liger share (Liger's names; TRL's epsilon is
    epsilon_low). The caller checks loss_type against LOSS_TYPES first, to raise in its own name."""
    return dict(kl_coef=beta, clip_low=epsilon_low, clip_high=epsilon_high, importance=importance_sampling_level,
                agg=LOSS_TYPES[loss_type], max_length=max_completion_length, temperature=temperature)
