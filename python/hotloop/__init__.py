"""hotloop: fused kernels for the hot loops of LLM post-training and self-supervised learning."""
from hotloop._internal import extension  # noqa: F401  (loads the compiled kernels when built)
from hotloop import nn
from hotloop.ops.group_advantages import group_advantages
from hotloop.ops.linear_losses import linear_nft_loss, linear_policy_loss
from hotloop.ops.linear_token_stats import linear_token_logprobs, linear_token_stats
from hotloop.ops.nft_loss import nft_loss
from hotloop.ops.policy_loss import policy_loss
from hotloop.ops.preference_loss import kto_loss, preference_loss
from hotloop.ops.linear_preference_loss import linear_preference_loss
from hotloop.ops.sequence_logprobs import linear_sequence_logprobs, sequence_logprobs
from hotloop.ops.token_stats import TokenStats, token_logprobs, token_stats
from hotloop.direct_pred import DirectPredictor
from hotloop.ema_teacher import EMATeacher
from hotloop.ops.byol_loss import byol_loss
from hotloop.ops.dino_loss import dino_loss, update_center_
from hotloop.ops.ema import ema_update_
from hotloop.ops.knn import knn
from hotloop.memory import EpisodicMemory
from hotloop.memory_rewards import MemoryRewards, memory_rewards, novelty_reward

__version__ = "0.1.0"


def __getattr__(name: str):
    """hotloop.train (the training API) and hotloop.integrations load on first use."""
    if name in ("train", "integrations"):
        import importlib

        return importlib.import_module(f"hotloop.{name}")
    raise AttributeError(f"module 'hotloop' has no attribute {name!r}")


__all__ = ["TokenStats", "group_advantages", "kto_loss", "linear_nft_loss", "linear_policy_loss",
           "linear_preference_loss", "linear_sequence_logprobs", "linear_token_logprobs", "linear_token_stats",
           "nft_loss", "nn", "policy_loss", "preference_loss", "sequence_logprobs", "token_logprobs", "token_stats",
           "DirectPredictor", "EMATeacher", "byol_loss", "dino_loss", "ema_update_", "update_center_",
           "knn", "EpisodicMemory", "MemoryRewards", "memory_rewards", "novelty_reward",
           "__version__"]
