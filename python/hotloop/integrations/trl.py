"""TRL's GRPOTrainer and DPOTrainer with hotloop's fused losses: the trainer keeps generating, scoring, logging
and stepping; only its loss goes through hotloop.train.GRPO / DPO (backbone hidden states x lm_head weight, no
logits, one fused pass forward and backward).

    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), ...)
    patch_grpo_trainer(trainer)          # or patch_dpo_trainer(DPOTrainer(...))
    trainer.train()

The backbone runs under the trainer's autocast (TRL's default on CPU is bf16) and the loss in the lm_head
weight's dtype (TRL runs its fused head in the autocast dtype). In float32 the patched loss equals TRL's own
(`_compute_loss`) in value and gradients, including its scaling for gradient accumulation, and logs TRL's
entropy / kl / clip_ratio metrics (GRPO; the clip ratios at token level only, without low_min / high_max) or
rewards/* / logps/* (DPO).

Options outside the fused losses raise NotImplementedError when patching, never silently change the objective:
GRPO loss_type cispo / sapo / luspo / vespo, off_policy_mask_threshold, top_entropy_quantile < 1, the entropy
bonus, vLLM importance-sampling correction, delta, beta != 0 with use_bias_correction_kl (TRL's default: the KL
times the ratio; set it False), an MoE aux loss, cast_lm_head_to_fp32; DPO with several loss types,
f-divergences other than reverse KL, ld_alpha, use_weighting, no reference model (PEFT) without precomputed
reference log-probs. The loss runs as the forward of the model the trainer hands over (wrapped by accelerate in
DDP / FSDP2 / DeepSpeed under several processes), so the engine synchronises the gradients as it does for TRL.
"""
from __future__ import annotations

import torch
from torch import Tensor

from hotloop.peer_names import LOSS_TYPES, TRL_DPO_LOSS_TYPES
from hotloop.train.dpo import DPO
from hotloop.train.grpo import GRPO

_MULTIMODAL = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "token_type_ids",
               "mm_token_type_ids", "image_position_ids")


def _unsupported(trainer_name: str, what: str) -> NotImplementedError:
    return NotImplementedError(f"hotloop.integrations.trl: {trainer_name} with {what} is not supported by the fused "
                               "loss; leave the trainer unpatched for it")


def _check_trainer(trainer, name: str) -> None:
    """trainer is a trl.<name> (a subclass too); anything else is a TypeError naming what was given."""
    import trl

    if not isinstance(trainer, getattr(trl, name)):
        raise TypeError(f"hotloop.integrations.trl: expected a trl.{name}, got {type(trainer).__name__}")


def grpo_from_trainer(trainer) -> GRPO:
    """hotloop.train.GRPO with a GRPOTrainer's loss options (raises NotImplementedError for unsupported ones)."""
    _check_trainer(trainer, "GRPOTrainer")
    args = trainer.args
    checks = {
        f"loss_type={trainer.loss_type!r}": trainer.loss_type not in LOSS_TYPES,
        "off_policy_mask_threshold": trainer.off_policy_mask_threshold is not None,
        "top_entropy_quantile < 1": trainer.top_entropy_quantile < 1.0,
        "an entropy bonus (entropy_coef / adaptive entropy)": getattr(trainer, "_entropy_bonus_enabled", False),
        "vLLM importance-sampling correction": trainer.use_vllm and trainer.vllm_importance_sampling_correction,
        "delta (two-sided clipping)": getattr(args, "delta", None) is not None,
        "beta != 0 and use_bias_correction_kl (TRL's default; set it False)":
            trainer.beta != 0.0 and getattr(args, "use_bias_correction_kl", False),
        "an MoE aux loss": trainer.aux_loss_enabled,
        "cast_lm_head_to_fp32": getattr(args, "cast_lm_head_to_fp32", False),
    }
    for what, bad in checks.items():
        if bad:
            raise _unsupported("GRPOTrainer", what)
    return GRPO(beta=trainer.beta, epsilon=trainer.epsilon_low, epsilon_high=trainer.epsilon_high,
                loss_type=trainer.loss_type, importance_sampling_level=trainer.importance_sampling_level,
                temperature=trainer.temperature, max_completion_length=trainer.max_completion_length)


def patch_grpo_trainer(trainer):
    """Route a trl.GRPOTrainer's loss through hotloop.train.GRPO; returns the trainer (patched in place)."""
    loss_fn = grpo_from_trainer(trainer)

    def _compute_loss(model, inputs):
        return _grpo_loss(trainer, loss_fn, model, inputs)

    trainer._compute_loss = _compute_loss
    return trainer


def _grpo_loss(trainer, loss_fn: GRPO, model, inputs: dict) -> Tensor:
    if any(inputs.get(k) is not None for k in _MULTIMODAL):
        raise _unsupported("GRPOTrainer", "multimodal inputs")
    completion_mask = inputs["completion_mask"]
    mask = completion_mask if inputs.get("tool_mask") is None else completion_mask * inputs["tool_mask"]
    batch = {"input_ids": torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
             "attention_mask": torch.cat([inputs["prompt_mask"], completion_mask], dim=1),
             "completion_mask": mask, "advantages": inputs["advantages"],
             "old_logps": inputs.get("old_per_token_logps"), "ref_logps": inputs.get("ref_per_token_logps")}
    train = trainer.model.training
    mode = "train" if train else "eval"
    steps = trainer.current_gradient_accumulation_steps if train else 1
    # hotloop's token means take the step's token count over every rank and micro-batch (num_items_in_batch);
    # TRL's dapo counts the generation batch (steps_per_generation micro-batches), its bnpo each micro-batch
    if trainer.loss_type == "dapo":
        batch["num_items_in_batch"] = inputs["num_items_in_batch"] * (steps / trainer.args.steps_per_generation
                                                                       if train else 1.0)
    elif trainer.loss_type == "bnpo":
        batch["num_items_in_batch"] = mask.sum() * trainer.accelerator.num_processes * steps
    with trainer.accelerator.autocast():  # the backbone in the trainer's mixed precision, as TRL runs it
        out = loss_fn.loss(model, batch)  # the wrapped model: its engine synchronises the gradients
    loss = out.loss if trainer.loss_type in ("dapo", "bnpo") else out.loss / steps
    m, log = out.metrics, trainer._metrics[mode]
    if trainer.beta != 0.0:
        log["kl"].append(m["kl_mean"].item())
    log["entropy"].append(m["entropy_mean"].item())
    if trainer.importance_sampling_level == "token":  # GSPO: TRL counts clipped sequences, hotloop tokens
        log["clip_ratio/low_mean"].append(m["clip_frac_low"].item())
        log["clip_ratio/high_mean"].append(m["clip_frac_high"].item())
        log["clip_ratio/region_mean"].append((m["clip_frac_low"] + m["clip_frac_high"]).item())
    return loss


def dpo_from_trainer(trainer) -> DPO:
    """hotloop.train.DPO with a DPOTrainer's loss options (raises NotImplementedError for unsupported ones)."""
    _check_trainer(trainer, "DPOTrainer")
    types = list(trainer.loss_types)
    checks = {
        f"loss_type={types!r} (one of {TRL_DPO_LOSS_TYPES} is supported)":
            len(types) != 1 or types[0] not in TRL_DPO_LOSS_TYPES,
        f"f_divergence_type={trainer.f_divergence_type!r}": trainer.f_divergence_type != "reverse_kl",
        "ld_alpha": trainer.ld_alpha is not None,
        "use_weighting": trainer.use_weighting,
        "an MoE aux loss": trainer.aux_loss_enabled,
        "no reference model (PEFT's adapter-disabled reference) and no precompute_ref_log_probs":
            trainer.ref_model is None and not trainer.precompute_ref_logps,
    }
    for what, bad in checks.items():
        if bad:
            raise _unsupported("DPOTrainer", what)
    # of these loss types TRL reads label_smoothing in robust only (its sigmoid ignores it)
    return DPO(kind=types[0], beta=trainer.beta, label_smoothing=trainer.label_smoothing if types[0] == "robust"
               else 0.0, ref_model=trainer.ref_model)


def patch_dpo_trainer(trainer):
    """Route a trl.DPOTrainer's loss through hotloop.train.DPO; returns the trainer (patched in place)."""
    loss_fn = dpo_from_trainer(trainer)
    weight = float(trainer.loss_weights[0])

    def _compute_loss(model, inputs, return_outputs):
        if return_outputs:
            raise _unsupported("DPOTrainer", "return_outputs=True (the fused loss never builds logits)")
        return _dpo_loss(trainer, loss_fn, weight, model, inputs)

    trainer._compute_loss = _compute_loss
    return trainer


def _dpo_loss(trainer, loss_fn: DPO, weight: float, model, inputs: dict) -> Tensor:
    if any(inputs.get(k) is not None for k in _MULTIMODAL):
        raise _unsupported("DPOTrainer", "multimodal inputs")
    batch = {k: inputs.get(k) for k in ("input_ids", "attention_mask", "completion_mask", "ref_chosen_logps",
                                        "ref_rejected_logps")}
    with trainer.accelerator.autocast():
        out = loss_fn.loss(model, batch)
    log = trainer._metrics["train" if trainer.model.training else "eval"]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        log[name].append(out.metrics[name].item())
    return out.loss * weight
