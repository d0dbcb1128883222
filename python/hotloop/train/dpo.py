"""The DPO family (DPO, cDPO, robust, hinge, IPO, BCO pair, SPPO hard, APO, SimPO, ORPO, CREAM, + RPO's NLL term)
as a loss over a Hugging Face causal LM's batch: hotloop's fused linear preference loss on the backbone's hidden
states and the lm_head weight, so the [2P, T, V] logits never exist."""
from __future__ import annotations

import torch
from torch import Tensor

from hotloop.ops.linear_preference_loss import linear_preference_loss
from hotloop.contracts import PAIR_LAYOUTS, REFERENCE_FREE
from hotloop.contracts import PREFERENCE_KINDS as KINDS
from hotloop.train._backbone import (SEQUENCE_KEYS, Output, check_batch, check_choice, completions, ref_logps,
                                     require)
from hotloop.train._engine import in_forward

BATCH_KEYS = SEQUENCE_KEYS + ("ref_chosen_logps", "ref_rejected_logps", "consistency")


class DPO:
    """Preference loss of a causal LM on chosen / rejected pairs.

    Args:
        kind: one of hotloop.reference.preference_loss.KINDS ("sigmoid" = DPO, "simpo", "orpo", "cream", "ipo",
            ...); the reference-free kinds (simpo, orpo) need no reference log-probs.
        beta, label_smoothing, gamma: as `hotloop.preference_loss` (TRL's names; hotloop.peer_names has the map).
        sft_weight: weight of an NLL term on the chosen tokens (RPO, TRL's rpo_alpha).
        layout: "concatenated" (TRL: the P chosen rows, then the P rejected rows) or "interleaved".
        ref_model: frozen reference model, used when the batch has no ref_chosen_logps / ref_rejected_logps.
        temperature: the logits are divided by it.

    loss(model, batch): batch holds input_ids [2P, T], attention_mask [2P, T], completion_mask [2P, C] over the
    last C tokens (C == T: TRL DPOTrainer's full-length mask); ref_chosen_logps / ref_rejected_logps [P]
    (sequence log-prob sums) for the reference-based kinds; consistency [P] for CREAM.
    """

    def __init__(self, *, kind: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0, gamma: float = 0.5,
                 sft_weight: float = 0.0, layout: str = "concatenated", ref_model: torch.nn.Module | None = None,
                 temperature: float = 1.0):
        check_choice("DPO", "kind", kind, KINDS)
        check_choice("DPO", "layout", layout, PAIR_LAYOUTS)
        self.kind, self.ref_model, self.layout, self.temperature = kind, ref_model, layout, temperature
        self.options = dict(kind=kind, beta=beta, label_smoothing=label_smoothing, gamma=gamma,
                            sft_weight=sft_weight, layout=layout, temperature=temperature)

    def reference(self, batch: dict) -> tuple[Tensor | None, Tensor | None]:
        """(ref_chosen_logps [P], ref_rejected_logps [P]) from the batch or the reference model."""
        if self.kind in REFERENCE_FREE:
            return None, None
        if batch.get("ref_chosen_logps") is not None:
            return require("DPO", batch, "ref_chosen_logps"), require("DPO", batch, "ref_rejected_logps")
        if self.ref_model is None:
            raise ValueError(f"hotloop.train.DPO: kind={self.kind!r} needs batch['ref_chosen_logps'] / "
                             "['ref_rejected_logps'] or a `ref_model`")
        per_token = ref_logps("DPO", self.ref_model, {k: v for k, v in batch.items() if k != "ref_logps"},
                              "ref_logps", self.temperature)
        sums = per_token.sum(1)
        if self.layout == "interleaved":
            return sums[0::2], sums[1::2]
        return sums[: sums.shape[0] // 2], sums[sums.shape[0] // 2:]

    def loss(self, model: torch.nn.Module, batch: dict) -> Output:
        """One preference loss over the pairs; loss.backward() reaches every parameter of `model`. A wrapped
        `model` (DDP, FSDP2, DeepSpeed) runs the loss as its forward; the mean over pairs is per rank, which the
        engine's gradient average makes the global mean when every rank holds as many pairs."""
        check_batch("DPO", batch, BATCH_KEYS)
        ref_w, ref_l = self.reference(batch)
        return in_forward("DPO", model, lambda m: self._loss(m, batch, ref_w, ref_l))

    def _loss(self, model: torch.nn.Module, batch: dict, ref_w: Tensor | None, ref_l: Tensor | None) -> Output:
        c = completions("DPO", model, batch)
        if c.hidden.shape[0] % 2:
            raise ValueError(f"hotloop.train.DPO: the batch must hold 2P rows (chosen and rejected), "
                             f"got {c.hidden.shape[0]}")
        loss, metrics = c.head_loss(lambda h, w, b: linear_preference_loss(
            h, w, c.labels, c.mask, ref_chosen_logps=ref_w, ref_rejected_logps=ref_l,
            consistency=batch.get("consistency"), bias=b, **self.options))
        return Output(loss, metrics)
