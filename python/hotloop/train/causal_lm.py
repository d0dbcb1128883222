"""Hugging Face causal LMs taken apart for the fused hidden-state losses: the backbone (everything but the
lm_head), the lm_head's weight and bias, and the last hidden states lined up with the tokens they predict.

Works with any `PreTrainedModel` whose logits are `lm_head(hidden)` and nothing else (Llama, Qwen2, Mistral,
GPT-2 with tied embeddings, ...): the backbone is `model.base_model` (the attribute named by base_model_prefix),
the head `model.get_output_embeddings()`. Models that scale or soft-cap their logits (Gemma 2's
final_logit_softcapping, Granite's logits_scaling, Cohere's logit_scale) raise: their logits are not hidden @ W^T.
Nothing here imports transformers; the model is duck-typed. It lives in hotloop.train, which runs every model
through it; hotloop.integrations.transformers, the layer above, publishes the same functions under its name.
"""
from __future__ import annotations

import torch
from torch import Tensor

# config attributes that make the logits something other than hidden @ W^T (+ b)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logits_scaling", "logit_scale", "output_multiplier",
                     "lm_head_multiplier")


def causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, Tensor, Tensor | None]:
    """-> (backbone, lm_head weight [V, H], lm_head bias [V] or None) of a Hugging Face causal LM.

    The weight is the parameter itself (tied to the input embeddings where the model ties them), so gradients
    reach it. Raises TypeError for a model without an output embedding or a backbone, ValueError for a model that
    transforms its logits (see the module docstring).
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise TypeError(f"hotloop.causal_lm_parts: `model` ({type(model).__name__}) has no output embedding "
                        "(get_output_embeddings() with a .weight); pass a *ForCausalLM / *LMHeadModel")
    backbone = getattr(model, "base_model", None)
    if backbone is None or backbone is model:
        get_decoder = getattr(model, "get_decoder", None)
        backbone = get_decoder() if callable(get_decoder) else None
    if backbone is None or backbone is model:
        raise TypeError(f"hotloop.causal_lm_parts: cannot find the backbone of `model` ({type(model).__name__}): "
                        "neither base_model nor get_decoder() gives a sub-module")
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _LOGIT_TRANSFORMS:
        value = getattr(text_config, name, None)
        if value is not None and value != 1.0:
            raise ValueError(f"hotloop.causal_lm_parts: the model's config sets {name}={value!r}: its logits are "
                             "not hidden @ lm_head.weight^T, which the fused losses compute")
    return backbone, head.weight, getattr(head, "bias", None)


def hidden_states(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Last hidden states [B, T, H] of the backbone alone (the lm_head never runs, so no [B, T, V] logits)."""
    return _last_hidden(causal_lm_parts(model)[0], input_ids, attention_mask)


def _last_hidden(backbone: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def completion_parts(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                     logits_to_keep: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """The fused losses' inputs for the last `logits_to_keep` tokens of each row (the completion, TRL's layout:
    prompt then completion in one [B, P + C] row).

    Returns (hidden [B, C, H], weight [V, H], bias [V] or None, labels [B, C]): hidden[:, t] is the state that
    predicts labels[:, t] = input_ids[:, P + t] (the shift: position P + t - 1 predicts token P + t).
    """
    T = input_ids.shape[-1]
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or not 0 < logits_to_keep < T:
        raise ValueError(f"hotloop.completion_parts: `logits_to_keep` must be an int in [1, T) = [1, {T}) "
                         f"(at least one prompt token precedes the completion), got {logits_to_keep!r}")
    backbone, weight, bias = causal_lm_parts(model)
    hidden = _last_hidden(backbone, input_ids, attention_mask)
    return hidden[:, T - logits_to_keep - 1:-1], weight, bias, input_ids[:, T - logits_to_keep:]


def lm_parts(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
             labels: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """(hidden [B, T-1, H], weight, bias, labels [B, T-1]) for next-token prediction over whole rows: hidden at t
    predicts labels[:, t] = (labels if given, else input_ids)[:, t + 1]; padding (attention_mask 0) gets -100."""
    backbone, weight, bias = causal_lm_parts(model)
    hidden = _last_hidden(backbone, input_ids, attention_mask)
    target = input_ids if labels is None else labels
    if attention_mask is not None:
        target = target.masked_fill(attention_mask == 0, -100)
    return hidden[:, :-1], weight, bias, target[:, 1:]
