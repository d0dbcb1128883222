"""NFT (negative-aware fine-tuning) as a loss over a Hugging Face causal LM's batch: hotloop.linear_nft_loss on the
backbone's hidden states and the lm_head weight (no [B, C, V] logits)."""
from __future__ import annotations

import torch

from hotloop.ops.linear_losses import linear_nft_loss
from hotloop.train._backbone import SEQUENCE_KEYS, Output, check_batch, completions, require
from hotloop.train._engine import data_parallel_groups, global_token_mean, in_forward

BATCH_KEYS = SEQUENCE_KEYS + ("correct", "rewards", "group_ids", "old_logps", "num_items_in_batch")


class NFT:
    """NFT loss of a causal LM on a batch of sampled completions with correctness flags.

    Args:
        num_generations: G responses per prompt, adjacent in the batch; or give batch["group_ids"].
        clamp_negative, normalize, neg_weight, ratio, agg, max_length: as `hotloop.nft_loss`.
        temperature: the logits are divided by it.  entropy_coef: entropy bonus weight.

    loss(model, batch): the layout of GRPO.loss, with correct [B] (bool or 0/1; else rewards [B] > 0 counts as
    correct) instead of rewards; old_logps [B, C] absent = on-policy.
    """

    def __init__(self, *, num_generations: int | None = None, clamp_negative: float = 1.0, normalize: int = 1,
                 neg_weight: float = 1.0, ratio: str = "token", agg: str = "token-mean",
                 max_length: int | None = None, temperature: float = 1.0, entropy_coef: float = 0.0,
                 grad_filter_eps: float = 0.0):
        self.num_generations = num_generations
        self.options = dict(clamp_negative=clamp_negative, normalize=normalize, neg_weight=neg_weight, ratio=ratio,
                            agg=agg, max_length=max_length, temperature=temperature, entropy_coef=entropy_coef,
                            grad_filter_eps=grad_filter_eps)

    def loss(self, model: torch.nn.Module, batch: dict) -> Output:
        """One NFT loss over the batch; loss.backward() reaches every parameter of `model` (wrapped or not, with
        token means over every data-parallel rank: see GRPO.loss)."""
        check_batch("NFT", batch, BATCH_KEYS)
        if batch.get("correct") is not None:
            correct = require("NFT", batch, "correct").float()
        else:
            correct = (require("NFT", batch, "rewards") > 0).float()
        groups = batch.get("group_ids")
        if groups is None and self.num_generations is None:
            raise ValueError("hotloop.train.NFT: give `num_generations` or batch['group_ids'] to group the responses")
        token_mean = self.options["agg"] == "token-mean"
        if batch.get("num_items_in_batch") is not None and not token_mean:
            raise ValueError(f"hotloop.train.NFT: batch['num_items_in_batch'] normalises token means; "
                             f"agg={self.options['agg']!r} averages per sequence")
        ranks = data_parallel_groups(model) if token_mean else []

        def nft(model: torch.nn.Module) -> Output:
            c = completions("NFT", model, batch)
            loss, metrics = c.head_loss(lambda h, w, b: linear_nft_loss(
                h, w, c.labels, batch.get("old_logps"), correct, c.mask, bias=b, group_index=groups,
                group_size=None if groups is not None else self.num_generations, **self.options))
            if token_mean:
                loss = global_token_mean("NFT", loss, c.mask.sum(), batch.get("num_items_in_batch"), ranks)
            metrics["accuracy"] = correct.mean()
            return Output(loss, metrics)

        return in_forward("NFT", model, nft)
