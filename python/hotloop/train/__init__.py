"""The training API: one small class per algorithm family, each holding its options and exposing
`.loss(model, batch) -> Output(loss, metrics)` for a Hugging Face causal LM and a plain dict batch. The backbone
runs, its last hidden states and the lm_head weight go through hotloop's fused ops, and the logits never exist.

    GRPO            GRPO / DAPO / Dr.GRPO / BNPO / GSPO / RLOO (TRL GRPOConfig option names)
    NFT             negative-aware fine-tuning
    DPO             the DPO family: sigmoid, ipo, hinge, robust, ..., simpo, orpo, cream (kind=...)
    SelfCertainty   self-certainty scores (best-of-N, Intuitor rewards) and a confidence loss
    BYOL, DirectPred, DINO   self-supervised steps on hotloop.EMATeacher (any nn.Module; batches of views / crops)

`model` may be the engine's wrapper (DDP, FSDP2, a DeepSpeed engine): the loss then runs as its forward, so the
engine's hooks unshard parameters and synchronise gradients; token means span every data-parallel rank.

hotloop.train.causal_lm takes the Hugging Face models apart (hotloop.integrations.transformers publishes it).
"""
from hotloop.train._backbone import Output
from hotloop.train._engine import manual_gradient_sync
from hotloop.train.byol import BYOL, DirectPred
from hotloop.train.dino import DINO
from hotloop.train.dpo import DPO
from hotloop.train.grpo import GRPO
from hotloop.train.nft import NFT
from hotloop.train.self_certainty import SelfCertainty

__all__ = ["BYOL", "DINO", "DPO", "DirectPred", "GRPO", "NFT", "Output", "SelfCertainty", "manual_gradient_sync"]
