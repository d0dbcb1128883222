"""hotloop.integrations.trl: a patched GRPOTrainer / DPOTrainer gives TRL's own loss and parameter gradients
(TRL's `_compute_loss` on the same inputs), and a real trainer step runs, offline, at a tiny Llama."""
import copy

import pytest
import torch

from helpers import rel_err
from train_models import grads
from trl_setup import dpo_trainer, grpo_trainer

from hotloop.integrations.trl import patch_dpo_trainer, patch_grpo_trainer

LOSS_TOL, GRAD_TOL = 1e-5, 1e-4


def _grpo_inputs(B=8, P=5, C=6, seed=0, old=True, ref=False):
    g = torch.Generator().manual_seed(seed)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[::3, :2] = 0  # left padding
    lengths = torch.randint(1, C + 1, (B,), generator=g)
    inputs = {"prompt_ids": torch.randint(2, 40, (B, P), generator=g), "prompt_mask": prompt_mask,
              "completion_ids": torch.randint(1, 40, (B, C), generator=g),
              "completion_mask": (torch.arange(C)[None] < lengths[:, None]).long(),
              "advantages": torch.randn(B, generator=g), "num_items_in_batch": lengths.sum().float()}
    if old:
        inputs["old_per_token_logps"] = -3.7 + 0.3 * torch.randn(B, C, generator=g)
    if ref:
        inputs["ref_per_token_logps"] = -3.7 + 0.3 * torch.randn(B, C, generator=g)
    return inputs


def _loss_and_grads(trainer, inputs):
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), grads(trainer.model)


@pytest.mark.parametrize("config,old,ref", [
    (dict(), False, False),
    (dict(loss_type="grpo", epsilon_high=0.28, temperature=0.7, use_bias_correction_kl=False), True, True),
    (dict(loss_type="dr_grpo", scale_rewards="none"), True, False),
    (dict(loss_type="bnpo", importance_sampling_level="sequence", gradient_accumulation_steps=2), True, False),
], ids=["dapo_on_policy", "grpo_kl_temp", "dr_grpo", "gspo_bnpo_accum"])
def test_grpo_trainer_loss_and_grads_equal_trl(config, old, ref):
    trainer = grpo_trainer(**config)
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    if ref:  # beta set after construction: with beta != 0 TRL would load the reference model from the hub
        trainer.beta = 0.04
    inputs = _grpo_inputs(old=old, ref=ref)
    loss_trl, g_trl = _loss_and_grads(trainer, inputs)
    trl_metrics = {k: list(v) for k, v in trainer._metrics["train"].items()}
    patch_grpo_trainer(trainer)
    loss_hl, g_hl = _loss_and_grads(trainer, inputs)
    assert rel_err(loss_hl, loss_trl) < LOSS_TOL
    assert rel_err(g_hl, g_trl) < GRAD_TOL
    token_level = trainer.importance_sampling_level == "token"  # (GSPO: TRL's clip ratios count sequences)
    names = ("entropy",) + (("clip_ratio/low_mean", "clip_ratio/high_mean") if token_level else ())
    for name in names + (("kl",) if ref else ()):
        assert abs(trainer._metrics["train"][name][-1] - trl_metrics[name][-1]) < 1e-5, name


def test_grpo_trainer_trains_a_step_patched():
    trainer = patch_grpo_trainer(grpo_trainer(bf16=True))  # TRL's CPU default: bf16 autocast
    before = copy.deepcopy(trainer.model.state_dict())
    trainer.train()
    log = trainer.state.log_history[0]
    assert torch.isfinite(torch.tensor(log["loss"])) and "entropy" in log and "clip_ratio/high_mean" in log
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # the optimizer step moved the parameters


def test_dpo_trainer_loss_and_grads_equal_trl():
    trainer = dpo_trainer(beta=0.3)
    inputs = next(iter(trainer.get_train_dataloader()))
    loss_trl, g_trl = _loss_and_grads(trainer, inputs)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    patch_dpo_trainer(trainer)
    loss_hl, g_hl = _loss_and_grads(trainer, inputs)
    assert rel_err(loss_hl, loss_trl) < LOSS_TOL
    assert rel_err(g_hl, g_trl) < GRAD_TOL
    for name in ("rewards/chosen", "rewards/margins", "logps/rejected"):
        assert abs(trainer._metrics["train"][name][-1] - logged[name]) < 1e-4 * (1 + abs(logged[name])), name


@pytest.mark.parametrize("loss_type", ["ipo", "robust"])
def test_dpo_trainer_kinds_equal_trl(loss_type):
    trainer = dpo_trainer(loss_type=[loss_type], label_smoothing=0.1 if loss_type == "robust" else 0.0)
    inputs = next(iter(trainer.get_train_dataloader()))
    loss_trl, g_trl = _loss_and_grads(trainer, inputs)
    patch_dpo_trainer(trainer)
    loss_hl, g_hl = _loss_and_grads(trainer, inputs)
    assert rel_err(loss_hl, loss_trl) < LOSS_TOL
    assert rel_err(g_hl, g_trl) < GRAD_TOL


def test_dpo_trainer_trains_a_step_patched():
    trainer = patch_dpo_trainer(dpo_trainer(bf16=True))
    trainer.train()
    assert "rewards/margins" in trainer.state.log_history[0]


def test_unsupported_options_raise():
    with pytest.raises(NotImplementedError, match="cispo"):
        patch_grpo_trainer(grpo_trainer(loss_type="cispo"))
    with pytest.raises(NotImplementedError, match="top_entropy_quantile"):
        patch_grpo_trainer(grpo_trainer(top_entropy_quantile=0.2))
    with pytest.raises(NotImplementedError, match="loss_type"):
        patch_dpo_trainer(dpo_trainer(loss_type=["sigmoid", "sft"]))


def test_not_a_trainer_is_a_type_error():
    with pytest.raises(TypeError, match="trl.GRPOTrainer, got object"):
        patch_grpo_trainer(object())
    with pytest.raises(TypeError, match="trl.DPOTrainer, got GRPOTrainer"):
        patch_dpo_trainer(grpo_trainer())
