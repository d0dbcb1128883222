"""Self-certainty (KL(U ‖ p), Kang et al. 2025) of a causal LM's completions, from the backbone's hidden states and
the lm_head weight in one fused pass: per-completion scores for best-of-N selection, rewards for self-certainty RL
(Intuitor: pass them to GRPO as batch["rewards"]), and a differentiable confidence loss."""
from __future__ import annotations

import torch
from torch import Tensor

from hotloop.ops.linear_token_stats import linear_token_stats
from hotloop.train._backbone import SEQUENCE_KEYS, Output, check_batch, completions
from hotloop.train._engine import data_parallel_groups, global_token_mean, in_forward


class SelfCertainty:
    """Args: temperature: the logits are divided by it.

    Batches use GRPO.loss's layout (input_ids + completion_mask over the last C tokens, or TRL's prompt_ids /
    completion_ids); completions are adjacent groups of `num_generations` for best_of_n.
    """

    def __init__(self, *, temperature: float = 1.0):
        self.temperature = temperature

    def _token_stats(self, model: torch.nn.Module, batch: dict, trains: bool) -> tuple[Tensor, Tensor]:
        check_batch("SelfCertainty", batch, SEQUENCE_KEYS + (("num_items_in_batch",) if trains else ()))
        def stats(model: torch.nn.Module) -> tuple[Tensor, Tensor]:
            c = completions("SelfCertainty", model, batch)
            labels = torch.where(c.mask != 0, c.labels, -100)  # -100: not scored, no gradient
            out = c.head_loss(lambda h, w, b: linear_token_stats(h, w, labels, bias=b, temperature=self.temperature,
                                                                 entropy=True, self_certainty=True))
            return out, c.mask.to(out.self_certainty.dtype)

        return in_forward("SelfCertainty", model, stats, trains=trains)

    def scores(self, model: torch.nn.Module, batch: dict) -> Tensor:
        """Mean self-certainty over each completion's tokens: [B] float32, no gradient (higher = more confident)."""
        with torch.no_grad():
            stats, mask = self._token_stats(model, batch, trains=False)
            return (stats.self_certainty * mask).sum(1) / mask.sum(1).clamp(min=1)

    def best_of_n(self, model: torch.nn.Module, batch: dict, num_generations: int) -> Tensor:
        """Row index [B / num_generations] of the most self-certain completion of each group."""
        s = self.scores(model, batch)
        if s.shape[0] % num_generations:
            raise ValueError(f"hotloop.train.SelfCertainty: `num_generations`={num_generations} must divide the "
                             f"batch size {s.shape[0]}")
        best = s.view(-1, num_generations).argmax(1)
        return best + torch.arange(0, s.shape[0], num_generations, device=s.device)

    def loss(self, model: torch.nn.Module, batch: dict) -> Output:
        """-(token mean of self-certainty): minimising it sharpens the policy on its own completions. The mean
        spans every data-parallel rank of a wrapped `model` (and the step, with batch["num_items_in_batch"]).
        Metrics: self_certainty and entropy token means of this rank."""
        stats, mask = self._token_stats(model, batch, trains=True)
        n = mask.sum().clamp(min=1)
        sc = (stats.self_certainty * mask).sum() / n
        loss = global_token_mean("SelfCertainty", -sc, mask.sum(), batch.get("num_items_in_batch"),
                                 data_parallel_groups(model))
        return Output(loss, {"self_certainty": sc.detach(), "entropy": ((stats.entropy * mask).sum() / n).detach()})
