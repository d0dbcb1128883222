"""The contract every layer shares: option names, kind ids, clamps and metric names of the ops.

References (hotloop.reference), ops (hotloop.ops), kernels (triton_kernels, and csrc/ by the same numbers, named
in its schemas' comments) and the trainers all read these from here, so an option or a clamp is defined once.
The math behind each is in docs/ (docs/README.md lists the files).
"""
from __future__ import annotations

import math

IGNORE_INDEX = -100  # the label of a position that counts for nothing (torch's cross_entropy, TRL, verl)

# ------------------------------------------------------------------------------- group advantages (docs/group_advantages.md)
ADVANTAGE_KINDS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "passk")
ADVANTAGE_SCALES = ("group", "batch", "none")

# ------------------------------------------------------------------------------------- policy loss (docs/policy_loss.md)
KL_KINDS = ("k1", "k2", "k3")
KL_IDS = {None: 0, "k1": 1, "k2": 2, "k3": 3}  # the kernels' kl_kind (0: no KL term)
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "dr_grpo")
IMPORTANCE = ("token", "sequence")
POLICY_METRICS = ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "ratio_mean", "kl_mean")
LOG_RATIO_CLAMP = 20.0  # rho = exp(clamp(logp - old_logp, -20, 20)); k3 clamps -d the same way

# --------------------------------------------------------------------------------------------- NFT loss (docs/nft_loss.md)
NFT_METRICS = ("ratio_mean", "neg_clamped_frac")
NFT_LOG_RATIO_MAX = 10.0  # R = exp(min(logp - old_logp, 10))
NFT_RQ_RANGE = (0.02, 0.98)  # the group's correct fraction r_q is clamped into this range

# ----------------------------------------------------------------------------- preference losses (docs/preference_loss.md)
PREFERENCE_KINDS = ("sigmoid", "cdpo", "robust", "hinge", "ipo", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
                    "simpo", "orpo", "cream")
PREFERENCE_KIND_IDS = {k: i for i, k in enumerate(PREFERENCE_KINDS)}  # the kernels' kind
REFERENCE_FREE = ("simpo", "orpo")
LENGTH_NORMALISED = ("ipo", "simpo", "orpo")
PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                      "logps/rejected")
KTO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl")
PAIR_LAYOUTS = ("concatenated", "interleaved")  # how a fused preference batch stacks chosen / rejected rows
LN2 = math.log(2.0)

# ------------------------------------------------------------------------------------------------------ kNN (docs/knn.md)
KNN_METRICS = ("l2", "ip", "cosine")
KNN_COSINE_EPS = 1e-8  # cosine: norms below this are clamped (a zero vector has cosine 0 with everything)
