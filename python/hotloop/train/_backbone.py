"""What every hotloop.train class shares: the Output type, reading a batch dict, and running a Hugging Face
causal LM's backbone up to the hidden states that predict the completion tokens (the lm_head never runs)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from hotloop.train._engine import in_forward, in_head
from hotloop.train.causal_lm import completion_parts


@dataclass
class Output:
    """loss: [] float32 scalar, differentiable w.r.t. the model's parameters; metrics: detached 0-dim tensors
    (no host sync; call .item() when logging)."""
    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


# a pytree node, so an engine that walks its forward's output (DDP with find_unused_parameters / static_graph)
# finds the loss inside
torch.utils._pytree.register_dataclass(Output)


@dataclass
class Completions:
    """The fused losses' inputs: hidden [B, C, H] predicts labels [B, C]; mask [B, C] marks the scored tokens;
    head is the lm_head module (weight [V, H], bias [V] or None, as the backbone's forward left them)."""
    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    labels: Tensor
    mask: Tensor
    head: torch.nn.Module

    def head_loss(self, loss):
        """loss(hidden, weight, bias) with autocast off (the fused ops pick their own precision; under a
        trainer's autocast their internal matmuls would come back in bf16), run inside the lm_head's forward
        where an engine shards the head on its own (hotloop.train._engine.in_head)."""
        with torch.autocast(self.hidden.device.type, enabled=False):
            return in_head(self.head, loss, self.hidden)


SEQUENCE_KEYS = ("input_ids", "attention_mask", "completion_mask", "prompt_ids", "prompt_mask", "completion_ids")


def check_batch(op: str, batch: object, keys: tuple[str, ...]) -> None:
    """batch is a dict whose keys are all among `keys`: a misspelt or unsupported key would otherwise be
    ignored and the loss silently be another one (e.g. "old_logprobs" for "old_logps": on-policy ratios)."""
    if not isinstance(batch, dict):
        raise TypeError(f"hotloop.train.{op}: `batch` must be a dict of tensors, got {type(batch).__name__}")
    unknown = sorted(str(k) for k in batch if k not in keys)
    if unknown:
        raise ValueError(f"hotloop.train.{op}: unknown batch keys {unknown}; accepted: {sorted(keys)}")


def require(op: str, batch: dict, key: str) -> Tensor:
    """batch[key] as a tensor, or a KeyError naming the key and the class."""
    if not isinstance(batch, dict):
        raise TypeError(f"hotloop.train.{op}: `batch` must be a dict of tensors, got {type(batch).__name__}")
    if key not in batch or batch[key] is None:
        raise KeyError(f"hotloop.train.{op}: the batch needs {key!r} (has {sorted(batch)})")
    value = batch[key]
    if not isinstance(value, Tensor):
        raise TypeError(f"hotloop.train.{op}: batch[{key!r}] must be a tensor, got {type(value).__name__}")
    return value


def sequences(op: str, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
    """-> (input_ids [B, T], attention_mask [B, T], completion_mask [B, C]) from either layout:
    input_ids (+ attention_mask) + completion_mask over the last C tokens (C <= T; C == T is TRL DPO's
    full-length mask), or TRL GRPOTrainer's prompt_ids / prompt_mask / completion_ids / completion_mask."""
    if "prompt_ids" in batch and "completion_ids" in batch:
        prompt, completion = require(op, batch, "prompt_ids"), require(op, batch, "completion_ids")
        input_ids = torch.cat([prompt, completion], dim=1)
        completion_mask = batch.get("completion_mask")
        if completion_mask is None:
            completion_mask = torch.ones_like(completion)
        prompt_mask = batch.get("prompt_mask")
        if prompt_mask is None:
            prompt_mask = torch.ones_like(prompt)
        attention_mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)
        return input_ids, attention_mask, completion_mask
    input_ids = require(op, batch, "input_ids")
    if input_ids.dim() != 2:
        raise ValueError(f"hotloop.train.{op}: batch['input_ids'] must be [B, T], got {tuple(input_ids.shape)}")
    completion_mask = require(op, batch, "completion_mask")
    B, T = input_ids.shape
    if completion_mask.dim() != 2 or completion_mask.shape[0] != B or not 0 < completion_mask.shape[1] <= T:
        raise ValueError(f"hotloop.train.{op}: batch['completion_mask'] must be [B, C] with B = {B} and "
                         f"1 <= C <= T = {T} (the last C tokens), got {tuple(completion_mask.shape)}")
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return input_ids, attention_mask, completion_mask


def completions(op: str, model: torch.nn.Module, batch: dict) -> Completions:
    """Run the backbone once and line up the hidden states with the completion tokens they predict.

    Only the completion's positions are kept (TRL's logits_to_keep); a completion mask as long as the row loses its
    first column, whose token nothing predicts. A label of padding is harmless: masked tokens are never scored.
    """
    input_ids, attention_mask, completion_mask = sequences(op, batch)
    T = input_ids.shape[1]
    C = min(completion_mask.shape[1], T - 1)
    hidden, weight, bias, labels = completion_parts(model, input_ids, attention_mask, C)
    if hidden.dtype != weight.dtype:  # a backbone under autocast: the head's loss runs in the weight's dtype
        hidden = hidden.to(weight.dtype)
    return Completions(hidden, weight, bias, labels, completion_mask[:, -C:], model.get_output_embeddings())


def ref_logps(op: str, ref_model: torch.nn.Module | None, batch: dict, key: str, temperature: float = 1.0
              ) -> Tensor | None:
    """Per-token reference log-probs [B, C] (0 on masked tokens): batch[key] when given, else from `ref_model`
    (no gradient, fused path, logits / temperature), else None."""
    if batch.get(key) is not None:
        return require(op, batch, key)
    if ref_model is None:
        return None
    from hotloop.ops.linear_token_stats import linear_token_logprobs

    def logprobs(model: torch.nn.Module) -> Tensor:
        c = completions(op, model, batch)
        labels = torch.where(c.mask != 0, c.labels, -100)
        return c.head_loss(lambda h, w, b: linear_token_logprobs(h, w, labels, bias=b, temperature=temperature))

    with torch.no_grad():
        return in_forward(op, ref_model, logprobs, trains=False)


def check_choice(op: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"hotloop.train.{op}: `{name}` must be one of {tuple(choices)}, got {value!r}")
