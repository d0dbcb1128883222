"""hotloop.train: each class at a tiny Hugging Face model against the composition of the unfused reference ops
on materialised logits (loss and every parameter's gradient), in float32."""
import pytest
import torch

from helpers import rel_err
from hotloop.reference.group_advantages import group_advantages_ref
from hotloop.reference.policy_loss import nft_loss_ref, policy_loss_ref
from hotloop.reference.preference_loss import preference_loss_ref
from hotloop.reference.token_stats import token_stats_ref
from train_models import SEQUENCE, grads, keep, materialised_logits, rl_batch, tiny_gpt2, tiny_llama

from hotloop import train
from hotloop.integrations.transformers import causal_lm_parts, completion_parts, lm_parts

LOSS_TOL, GRAD_TOL = 1e-5, 1e-4


def _ref_logps(model, batch, C, temperature=1.0):
    logits = materialised_logits(model, batch, C, temperature)
    labels = batch["input_ids"][:, -C:].masked_fill(batch["completion_mask"] == 0, -100)
    return token_stats_ref(logits, labels, 1.0, -100, True, True)


def _check(fused, ref, model):
    fused.loss.backward()
    g_fused = grads(model)
    ref.backward()
    g_ref = grads(model)
    assert rel_err(fused.loss.detach(), ref.detach()) < LOSS_TOL
    assert rel_err(g_fused, g_ref) < GRAD_TOL


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2_tied"])
@pytest.mark.parametrize("opts", [
    dict(loss_type="dapo"),
    dict(loss_type="grpo", beta=0.04, epsilon_high=0.28, temperature=0.7),
    dict(loss_type="dr_grpo", scale_rewards="none", max_completion_length=9),
    dict(loss_type="bnpo", importance_sampling_level="sequence", scale_rewards="batch"),
    dict(loss_type="dapo", advantage="rloo", entropy_coef=0.01),
], ids=["dapo", "grpo_kl_temp", "dr_grpo", "gspo_batch", "rloo_entropy"])
def test_grpo_matches_unfused(make, opts):
    model, batch, C = make(), rl_batch(), 7
    fused = train.GRPO(num_generations=4, **opts).loss(model, batch)
    T = opts.get("temperature", 1.0)
    lp, ent, _ = _ref_logps(model, batch, C, T)
    scale = {True: "group", False: "none"}.get(opts.get("scale_rewards"), opts.get("scale_rewards", "group"))
    kind = opts.get("advantage", "grpo")
    adv = group_advantages_ref(batch["rewards"], 4, None, "dr_grpo" if kind == "grpo" and scale == "none" else kind,
                               scale, 1e-4)
    agg = {"dapo": "token-mean", "bnpo": "token-mean", "grpo": "seq-mean-token-mean", "dr_grpo": "dr_grpo"}
    ref, _ = policy_loss_ref(lp, batch["old_logps"], adv, batch["completion_mask"], batch["ref_logps"], "k3",
                             opts.get("beta", 0.0), 0.2, opts.get("epsilon_high", 0.2), None,
                             opts.get("importance_sampling_level", "token"), agg[opts["loss_type"]],
                             opts.get("max_completion_length"), None)
    m = batch["completion_mask"].float()
    ref = ref - opts.get("entropy_coef", 0.0) * (ent * m).sum() / m.sum()
    _check(fused, ref, model)
    assert set(fused.metrics) >= {"clip_frac_low", "clip_frac_high", "entropy_mean", "reward_mean"}
    assert rel_err(fused.metrics["entropy_mean"], (ent * m).sum() / m.sum()) < LOSS_TOL


def test_grpo_on_policy_trl_layout_and_group_ids():
    """TRL's prompt_ids / completion_ids batch, no old log-probs (ratio 1), ragged groups by id, given advantages."""
    model, batch, C = tiny_llama(), rl_batch(left_pad=False), 7
    P = batch["input_ids"].shape[1] - C
    trl_batch = {"prompt_ids": batch["input_ids"][:, :P], "prompt_mask": batch["attention_mask"][:, :P],
                 "completion_ids": batch["input_ids"][:, P:], "completion_mask": batch["completion_mask"],
                 "rewards": batch["rewards"], "group_ids": torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])}
    fused = train.GRPO().loss(model, trl_batch)
    lp, _, _ = _ref_logps(model, batch, C)
    adv = group_advantages_ref(batch["rewards"], None, trl_batch["group_ids"], "grpo", "group", 1e-4)
    ref, _ = policy_loss_ref(lp, None, adv, batch["completion_mask"], None, "k3", 0.0, 0.2, 0.2, None, "token",
                             "token-mean", None, None)
    _check(fused, ref, model)
    given = train.GRPO().loss(model, {**batch, "old_logps": None, "rewards": None, "advantages": adv})
    assert rel_err(given.loss.detach(), ref.detach()) < LOSS_TOL
    model.zero_grad(set_to_none=True)


def test_grpo_masks_truncated_and_ref_model():
    model, ref_model, batch, C = tiny_llama(), tiny_llama(seed=3), rl_batch(), 7
    eos = int(batch["input_ids"][0, -C])  # row 0 ends on "eos" at its first completion token
    opts = dict(num_generations=4, beta=0.1, mask_truncated_completions=True, eos_token_id=eos)
    fused = train.GRPO(ref_model=ref_model, **opts).loss(model, {**batch, "ref_logps": None})
    lp, _, _ = _ref_logps(model, batch, C)
    with torch.no_grad():
        ref_lp, _, _ = _ref_logps(ref_model, batch, C)
    labels, m = batch["input_ids"][:, -C:], batch["completion_mask"]
    kept = ((labels == eos) & (m != 0)).any(1)
    assert kept[0]
    adv = group_advantages_ref(batch["rewards"], 4, None, "grpo", "group", 1e-4)
    ref, _ = policy_loss_ref(lp, batch["old_logps"], adv, m * kept[:, None], ref_lp, "k3", 0.1, 0.2, 0.2, None,
                             "token", "token-mean", None, None)
    _check(fused, ref, model)


def test_nft_matches_unfused():
    model, batch, C = tiny_llama(), rl_batch(), 7
    correct = (batch["rewards"] > 1).float()
    fused = train.NFT(num_generations=4, neg_weight=0.5).loss(
        model, {**keep(batch, *SEQUENCE, "old_logps"), "correct": correct})
    lp, _, _ = _ref_logps(model, batch, C)
    ref, _ = nft_loss_ref(lp, batch["old_logps"], correct, batch["completion_mask"], 4, None, 1.0, 1, 0.5,
                          "token", "token-mean", None, None)
    _check(fused, ref, model)


def _dpo_batch(P=3, T=12, C=6, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 128, (2 * P, T), generator=g)
    lengths = torch.randint(2, C + 1, (2 * P,), generator=g)
    cm = (torch.arange(C)[None] < lengths[:, None]).long()
    am = torch.ones(2 * P, T, dtype=torch.long)
    am[:, T - C:] = cm
    return {"input_ids": ids, "attention_mask": am, "completion_mask": cm,
            "ref_chosen_logps": -25 + torch.randn(P, generator=g),
            "ref_rejected_logps": -25 + torch.randn(P, generator=g), "consistency": torch.rand(P, generator=g)}


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "simpo", "orpo", "cream"])
def test_dpo_matches_unfused(kind):
    model, batch, C = tiny_llama(), _dpo_batch(), 6
    fused = train.DPO(kind=kind, beta=0.2, sft_weight=0.3 if kind == "sigmoid" else 0.0).loss(model, batch)
    lp, _, _ = _ref_logps(model, batch, C)
    m = batch["completion_mask"]
    s, n = (lp * m).sum(1), m.sum(1)
    P = s.shape[0] // 2
    free = kind in ("simpo", "orpo")
    ref, _ = preference_loss_ref(s[:P], s[P:], None if free else batch["ref_chosen_logps"],
                                 None if free else batch["ref_rejected_logps"], kind, 0.2, 0.0, 0.5,
                                 batch["consistency"] if kind == "cream" else None, n[:P], n[P:],
                                 -s[:P] * P / n[:P].sum() if kind == "orpo" else None)  # TRL: token-mean NLL
    if kind == "sigmoid":
        ref = ref + 0.3 * (-s[:P].sum() / n[:P].sum())
    _check(fused, ref, model)
    assert "rewards/accuracies" in fused.metrics


def test_dpo_trl_full_length_mask_and_ref_model():
    """TRL DPOTrainer's completion_mask spans the whole row (its first column predicts nothing)."""
    model, ref_model, batch = tiny_llama(), tiny_llama(seed=5), _dpo_batch()
    T, C = batch["input_ids"].shape[1], 6
    full = torch.zeros_like(batch["input_ids"])
    full[:, T - C:] = batch["completion_mask"]
    trl_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "completion_mask": full}
    fused = train.DPO(ref_model=ref_model).loss(model, trl_batch)
    lp, _, _ = _ref_logps(model, batch, C)
    with torch.no_grad():
        rlp, _, _ = _ref_logps(ref_model, batch, C)
    m = batch["completion_mask"]
    s, r = (lp * m).sum(1), (rlp * m).sum(1)
    ref, _ = preference_loss_ref(s[:3], s[3:], r[:3], r[3:], "sigmoid", 0.1, 0.0, 0.5, None, None, None, None)
    _check(fused, ref, model)


def test_self_certainty_scores_best_of_n_and_loss():
    model, batch, C = tiny_llama(), keep(rl_batch(), *SEQUENCE), 7
    sc = train.SelfCertainty(temperature=0.8)
    _, ent, ref_sc = _ref_logps(model, batch, C, 0.8)
    m = batch["completion_mask"].float()
    want = (ref_sc * m).sum(1) / m.sum(1)
    # KL(U||p) ~ 0.01 here is a difference of O(5) terms: float32 cancellation allows ~1e-5 relative
    assert rel_err(sc.scores(model, batch), want.detach()) < 1e-4
    best = sc.best_of_n(model, batch, num_generations=4)
    assert torch.equal(best, want.view(2, 4).argmax(1) + torch.tensor([0, 4]))
    _check(sc.loss(model, batch), -(ref_sc * m).sum() / m.sum(), model)


def test_transformers_parts():
    model = tiny_gpt2()
    backbone, w, b = causal_lm_parts(model)
    assert backbone is model.transformer and w is model.transformer.wte.weight and b is None
    batch = rl_batch(B=2)
    h, w, _, labels = completion_parts(model, batch["input_ids"], batch["attention_mask"], 7)
    with torch.no_grad():
        assert rel_err(h @ w.T, materialised_logits(model, batch, 7)) < 1e-6
    assert torch.equal(labels, batch["input_ids"][:, -7:])
    h, _, _, labels = lm_parts(model, batch["input_ids"], batch["attention_mask"])
    assert h.shape[1] == labels.shape[1] == batch["input_ids"].shape[1] - 1
    assert (labels[batch["attention_mask"][:, 1:] == 0] == -100).all()


def test_errors_name_the_argument():
    model, batch = tiny_llama(), rl_batch()
    with pytest.raises(ValueError, match="loss_type"):
        train.GRPO(loss_type="ppo")
    for bad in ({"epsilon": 5.0}, {"epsilon_high": -0.1}, {"temperature": 0.0}, {"beta": float("nan")}):
        with pytest.raises(ValueError, match=f"GRPO: `{next(iter(bad))}`"):  # at construction, in TRL's names
            train.GRPO(**bad)
    with pytest.raises(KeyError, match="rewards"):
        train.GRPO(num_generations=4).loss(model, {k: v for k, v in batch.items() if k != "rewards"})
    with pytest.raises(ValueError, match="num_generations"):
        train.GRPO().loss(model, batch)
    with pytest.raises(ValueError, match="ref_logps"):
        train.GRPO(num_generations=4, beta=0.1).loss(model, {**batch, "ref_logps": None})
    with pytest.raises(ValueError, match="completion_mask"):
        train.GRPO(num_generations=4).loss(model, {**batch, "completion_mask": batch["completion_mask"][:1]})
    with pytest.raises(ValueError, match="kind"):
        train.DPO(kind="dpo")
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        train.DPO().loss(model, {k: v for k, v in _dpo_batch().items() if not k.startswith("ref")})
    with pytest.raises(TypeError, match="output embedding"):
        causal_lm_parts(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="batch"):
        train.GRPO(num_generations=4).loss(model, [1, 2])
    for algo, extra in ((train.GRPO(num_generations=4), "old_logprobs"), (train.NFT(num_generations=4), "ref_logps"),
                        (train.SelfCertainty(), "rewards")):  # a misspelt or unread key: never ignored
        with pytest.raises(ValueError, match=f"unknown batch keys \\['{extra}'\\]"):
            algo.loss(model, {**keep(batch, *SEQUENCE), extra: batch["old_logps"]})
    with pytest.raises(ValueError, match="unknown batch keys"):
        train.DPO().loss(model, {**_dpo_batch(), "ref_logps": batch["old_logps"]})
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        causal_lm_parts(model)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_grpo_and_dpo_every_backend(backend, monkeypatch):
    """The classes dispatch like the ops: forced backends (Triton under the interpreter on CPU) agree with the
    default CPU kernels."""
    model, batch = tiny_llama(), rl_batch(B=4)
    grpo, dpo, pairs = train.GRPO(num_generations=2, beta=0.04), train.DPO(kind="sigmoid"), _dpo_batch(P=2)
    want = [grpo.loss(model, batch), dpo.loss(model, pairs)]
    want_grads = []
    for out in want:
        out.loss.backward()
        want_grads.append(grads(model))
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    for out, g, ref in zip([grpo.loss(model, batch), dpo.loss(model, pairs)], want_grads, want):
        out.loss.backward()
        assert rel_err(out.loss.detach(), ref.loss.detach()) < LOSS_TOL
        assert rel_err(grads(model), g) < GRAD_TOL
