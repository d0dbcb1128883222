"""policy_loss and nft_loss (docs/policy_loss.md, docs/nft_loss.md): every backend against float64, and parity with the formulas TRL and verl
use for each loss type and aggregation (written here from the math, vectorised, independent of the looped
reference in hotloop.reference.policy_loss).
"""
import math

import pytest
import torch

import hotloop
from hotloop.reference.policy_loss import nft_loss_ref, policy_loss_ref

from helpers import BACKENDS, device_for, interpreted, rel_err

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "dr_grpo"]


@pytest.fixture(params=[p for p in BACKENDS if p.id != "cuda"])  # CUDA tensors run the Triton kernels
def backend(request, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", request.param)
    return request.param


def _batch(B, T, dev, dtype=torch.float32, seed=None, spread=0.3, empty_row=False):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    old = logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    if empty_row:
        lengths[B // 2] = 0
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return [t.to(dtype).to(dev) if t.is_floating_point() else t.to(dev) for t in (logp, old, ref, adv)] + [mask.to(dev)]


def _compare(got, want, tol):
    """The loss is a mean of O(1) per-token terms of both signs (advantages, NFT's two sides) that may cancel:
    it is checked to tol relative to max(1, |loss|); the gradients, elementwise, to tol relative."""
    (gl, gm), (wl, wm) = got, want
    assert abs(gl.item() - wl.item()) < tol * max(1.0, abs(wl.item()))
    for name in wm:
        if name == "kl_mean":  # k3 = exp(-d) + d - 1 cancels in float32 for small d: absolute error ~ 1e-7
            assert abs(gm[name].item() - wm[name].item()) < 1e-6 + tol * abs(wm[name].item()), name
        else:
            assert rel_err(gm[name], wm[name]) < tol, name


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("importance", ["token", "sequence"])
def test_policy_loss_matches_float64(backend, agg, importance):
    dev = device_for(backend)
    B, T = (3, 7) if interpreted(backend) else (6, 50)
    logp, old, ref, adv, mask = _batch(B, T, dev, empty_row=True)
    x = logp.clone().requires_grad_()
    x64 = logp.double().cpu().requires_grad_()
    opts = dict(kl_coef=0.05, agg=agg, importance=importance, dual_clip=3.0, clip_high=0.28)
    got = hotloop.policy_loss(x, old, adv, mask, ref_logp=ref, **opts)
    want = policy_loss_ref(x64, old.double().cpu(), adv.double().cpu(), mask.cpu(), ref.double().cpu(), "k3", 0.05,
                           0.2, 0.28, 3.0, importance, agg, T, None)
    _compare(got, want, 1e-5)
    g, = torch.autograd.grad(got[0], x)
    g_ref, = torch.autograd.grad(want[0], x64)
    assert rel_err(g, g_ref) < 1e-5
    assert torch.all(g[~mask] == 0)


@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_policy_loss_kl_and_token_advantages(backend, kl, per_token_adv):
    dev = device_for(backend)
    B, T = (2, 9) if interpreted(backend) else (5, 40)
    logp, old, ref, adv, mask = _batch(B, T, dev)
    if per_token_adv:
        adv = torch.randn(B, T, dtype=adv.dtype, device=dev)
    x = logp.clone().requires_grad_()
    x64 = logp.double().cpu().requires_grad_()
    got = hotloop.policy_loss(x, old, adv, mask, ref_logp=ref, kl=kl, kl_coef=0.3)
    want = policy_loss_ref(x64, old.double().cpu(), adv.double().cpu(), mask.cpu(), ref.double().cpu(), kl, 0.3,
                           0.2, 0.2, None, "token", "token-mean", None, None)
    _compare(got, want, 1e-5)
    assert rel_err(torch.autograd.grad(got[0], x)[0], torch.autograd.grad(want[0], x64)[0]) < 1e-5


def test_policy_loss_packed_equals_padded(backend):
    dev = device_for(backend)
    B, T = (3, 6) if interpreted(backend) else (5, 30)
    logp, old, ref, adv, mask = _batch(B, T, dev)
    lengths = mask.sum(1)
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    pack = lambda t: t[mask]  # noqa: E731
    for agg, imp in (("token-mean", "token"), ("seq-mean-token-mean", "sequence"), ("dr_grpo", "token")):
        x, xp = logp.clone().requires_grad_(), pack(logp).clone().requires_grad_()
        a, ap = hotloop.policy_loss(x, old, adv, mask, ref_logp=ref, kl_coef=0.1, agg=agg, importance=imp,
                                    max_length=T)
        b, bp = hotloop.policy_loss(xp, pack(old), adv, torch.ones_like(xp, dtype=torch.bool), ref_logp=pack(ref),
                                    kl_coef=0.1, agg=agg, importance=imp, max_length=T, cu_seqlens=cu)
        assert rel_err(b.detach(), a.detach()) < 1e-5  # fp32 loss sums in another order
        assert rel_err(torch.autograd.grad(b, xp)[0], pack(torch.autograd.grad(a, x)[0])) < 1e-6
        for k in ap:
            assert rel_err(bp[k], ap[k]) < 1e-6, k


def test_policy_loss_masked_nan_and_empty(backend):
    dev = device_for(backend)
    logp, old, ref, adv, mask = _batch(3, 8, dev)
    logp[~mask] = float("nan")
    old[~mask] = float("-inf")
    x = logp.clone().requires_grad_()
    loss, metrics = hotloop.policy_loss(x, old, adv, mask, ref_logp=ref, kl_coef=0.1)
    g, = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(g).all() and all(torch.isfinite(v) for v in metrics.values())
    empty = torch.zeros_like(mask)
    for agg in AGGS:
        loss, metrics = hotloop.policy_loss(x, old, adv, empty, agg=agg, importance="sequence")
        assert loss.item() == 0 and torch.autograd.grad(loss, x)[0].abs().sum() == 0


def test_policy_loss_on_policy_none_old(backend):
    dev = device_for(backend)
    logp, _, _, adv, mask = _batch(3, 8, dev)
    x = logp.clone().requires_grad_()
    loss, metrics = hotloop.policy_loss(x, None, adv, mask)
    loss2, _ = hotloop.policy_loss(x, logp, adv, mask)
    assert rel_err(torch.autograd.grad(loss, x)[0], torch.autograd.grad(loss2, x)[0]) < 1e-6
    assert abs(metrics["ratio_mean"].item() - 1.0) < 1e-6


# ------------------------------------------------------------------------- parity with TRL's / verl's formulas
def _trl_grpo_loss(logp, old, adv, mask, ref, beta, eps_low, eps_high, loss_type, max_len, level="token"):
    """TRL GRPOTrainer._compute_loss, from its formulas: coef = exp(log ratio), -min(coef A, clip(coef) A) + β k3."""
    m = mask.to(logp.dtype)
    log_ratio = logp - old
    if level == "sequence":
        log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0))[:, None]
    coef1 = torch.exp(log_ratio)
    coef2 = coef1.clamp(1 - eps_low, 1 + eps_high)
    ptl = -torch.min(coef1 * adv[:, None], coef2 * adv[:, None])
    if beta:
        ptl = ptl + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
    if loss_type == "grpo":
        return ((ptl * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (ptl * m).sum() / m.sum().clamp(min=1.0)
    return (ptl * m).sum() / (logp.shape[0] * max_len)  # dr_grpo


def _verl_loss(logp, old, adv, mask, clip_low, clip_high, clip_c, agg):
    """verl compute_policy_loss (vanilla, dual clip) + agg_loss, from their formulas."""
    m = mask.to(logp.dtype)
    ratio = torch.exp((logp - old).clamp(-20.0, 20.0))
    A = adv[:, None].expand_as(logp)
    l1 = -A * ratio
    l2 = -A * ratio.clamp(1 - clip_low, 1 + clip_high)
    clipped = torch.maximum(l1, l2)
    l3 = -A * clip_c
    pg = torch.where(A < 0, torch.min(l3, clipped), clipped)
    if agg == "token-mean":
        return (pg * m).sum() / m.sum()
    if agg == "seq-mean-token-sum":
        return (pg * m).sum(-1).mean()
    if agg == "seq-mean-token-mean":
        return ((pg * m).sum(-1) / m.sum(-1)).mean()
    return ((pg * m).sum(-1) / logp.shape[1]).mean()  # seq-mean-token-sum-norm (loss_scale_factor = T)


@pytest.mark.parametrize("loss_type,agg", [("grpo", "seq-mean-token-mean"), ("bnpo", "token-mean"),
                                           ("dr_grpo", "dr_grpo")])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_parity_trl(loss_type, agg, level):
    logp, old, ref, adv, mask = _batch(6, 20, "cpu", dtype=torch.float64, spread=0.4, empty_row=True)
    x, y = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    ours, _ = hotloop.policy_loss(x, old, adv, mask, ref_logp=ref, kl_coef=0.04, clip_high=0.28, agg=agg,
                                  importance=level, max_length=24)
    trl = _trl_grpo_loss(y, old, adv, mask, ref, 0.04, 0.2, 0.28, loss_type, 24, level)
    assert rel_err(ours.detach(), trl.detach()) < 1e-12
    assert rel_err(torch.autograd.grad(ours, x)[0], torch.autograd.grad(trl, y)[0]) < 1e-12


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_parity_verl_dual_clip(agg):
    logp, old, _, adv, mask = _batch(6, 20, "cpu", dtype=torch.float64, spread=1.0)
    adv[0], old[0, 0] = -1.0, logp[0, 0] - 2.0  # at least one token in the dual-clip region (A < 0, ratio e^2)
    x, y = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    ours, metrics = hotloop.policy_loss(x, old, adv, mask, dual_clip=3.0, agg=agg)
    verl = _verl_loss(y, old, adv, mask, 0.2, 0.2, 3.0, agg)
    assert rel_err(ours.detach(), verl.detach()) < 1e-12
    assert rel_err(torch.autograd.grad(ours, x)[0], torch.autograd.grad(verl, y)[0]) < 1e-12
    assert metrics["clip_frac_dual"] > 0


# ---------------------------------------------------------------------------------------------------------- NFT
def _nft_inputs(B, G, T, dev, dtype=torch.float32):
    logp, old, _, _, mask = _batch(B, T, dev, dtype=dtype, spread=0.5)
    correct = torch.rand(B) > 0.5
    correct[:2] = torch.tensor([True, False])  # both kinds present in every draw
    correct = correct.to(dev)
    return logp, old, correct, mask


@pytest.mark.parametrize("normalize", [0, 1, 2])
@pytest.mark.parametrize("ratio", ["token", "sequence"])
@pytest.mark.parametrize("clamp_negative", [1.0, 0.1])
def test_nft_matches_float64(backend, normalize, ratio, clamp_negative):
    dev = device_for(backend)
    B, T = (4, 6) if interpreted(backend) else (8, 40)
    logp, old, correct, mask = _nft_inputs(B, 2, T, dev)
    x, x64 = logp.clone().requires_grad_(), logp.double().cpu().requires_grad_()
    opts = dict(clamp_negative=clamp_negative, normalize=normalize, neg_weight=0.7, ratio=ratio)
    got = hotloop.nft_loss(x, old, correct, mask, group_size=2, **opts)
    want = nft_loss_ref(x64, old.double().cpu(), correct.cpu(), mask.cpu(), 2, None, clamp_negative, normalize, 0.7,
                        ratio, "token-mean", None, None)
    _compare(got, want, 1e-5)
    assert rel_err(torch.autograd.grad(got[0], x)[0], torch.autograd.grad(want[0], x64)[0]) < 1e-5


def test_nft_ragged_shuffled_equals_fixed(backend):
    dev = device_for(backend)
    B, G, T = (6, 3, 5) if interpreted(backend) else (12, 4, 20)
    logp, old, correct, mask = _nft_inputs(B, G, T, dev)
    perm = torch.randperm(B, device=dev)
    gid = (torch.arange(B, device=dev) // G)[perm] * 5 % B  # any ids in [0, B), responses shuffled
    x = logp.clone().requires_grad_()
    a, _ = hotloop.nft_loss(x, old, correct, mask, group_size=G, agg="seq-mean-token-mean")
    xp = logp[perm].clone().requires_grad_()
    b, _ = hotloop.nft_loss(xp, old[perm], correct[perm], mask[perm], group_index=gid, agg="seq-mean-token-mean")
    assert rel_err(b.detach(), a.detach()) < 1e-5
    assert rel_err(torch.autograd.grad(b, xp)[0], torch.autograd.grad(a, x)[0][perm]) < 1e-6


def test_nft_on_policy_gradient_equals_grpo(backend):
    """docs/nft_loss.md: with R = 1 and normalize=2, NFT's gradient is GRPO's with binary rewards (population std)."""
    dev = device_for(backend)
    B, G, T = (6, 3, 5) if interpreted(backend) else (16, 4, 30)
    logp, _, _, mask = _nft_inputs(B, G, T, dev)
    correct = torch.tensor([1, 0, 0] * (B // 3), device=dev) if G == 3 else torch.tensor([1, 0, 1, 0] * (B // 4),
                                                                                          device=dev)
    c = correct.double().view(-1, G)
    adv = ((c - c.mean(1, keepdim=True)) / c.std(1, correction=0, keepdim=True)).reshape(-1).to(dev)
    x, y = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    nft, _ = hotloop.nft_loss(x, None, correct, mask, group_size=G, normalize=2)
    grpo, _ = hotloop.policy_loss(y, None, adv.float(), mask)
    assert rel_err(torch.autograd.grad(nft, x)[0], torch.autograd.grad(grpo, y)[0]) < 1e-5


def test_nft_neg_weight_zero_is_rft(backend):
    dev = device_for(backend)
    logp, old, correct, mask = _nft_inputs(4, 2, 6, dev)
    x = logp.clone().requires_grad_()
    loss, _ = hotloop.nft_loss(x, old, correct, mask, group_size=2, neg_weight=0.0)
    g, = torch.autograd.grad(loss, x)
    assert torch.all(g[~correct.bool()] == 0) and g[correct.bool()].abs().sum() > 0


# ------------------------------------------------------------------------------------------------- bad inputs
def _good(dev="cpu"):
    logp, old, ref, adv, mask = _batch(2, 5, dev)
    return dict(logp=logp, old_logp=old, advantages=adv, mask=mask, ref_logp=ref)


@pytest.mark.parametrize("change,exc,words", [
    (dict(logp=torch.zeros(10)), ValueError, "`logp` must be [B, T]"),
    (dict(old_logp=torch.zeros(2, 4)), ValueError, "`old_logp` must have the shape"),
    (dict(advantages=torch.zeros(3)), ValueError, "`advantages` must be [B]"),
    (dict(mask=torch.zeros(2, 5, dtype=torch.int16)), TypeError, "`mask` must have dtype"),
    (dict(mask=-torch.ones(2, 5)), ValueError, "`mask` must be bool, or 0 / 1 integers, or finite weights"),
    (dict(kl="k4"), ValueError, "`kl` must be one of"),
    (dict(kl_coef=0.1, ref_logp=None), ValueError, "needs `ref_logp`"),
    (dict(clip_low=1.5), ValueError, "`clip_low`"),
    (dict(dual_clip=0.5), ValueError, "`dual_clip`"),
    (dict(importance="seq"), ValueError, "`importance`"),
    (dict(agg="mean"), ValueError, "`agg`"),
    (dict(max_length=0), ValueError, "`max_length`"),
    (dict(logp=torch.zeros(10), cu_seqlens=torch.tensor([0, 4, 9])), ValueError, "`cu_seqlens` must start at 0"),
    (dict(logp="x"), TypeError, "`logp` must be a torch.Tensor"),
])
def test_policy_loss_errors(change, exc, words):
    args = {**_good(), **change}
    if "cu_seqlens" in change:
        args.update(old_logp=torch.zeros(10), mask=torch.ones(10, dtype=torch.bool), ref_logp=None,
                    advantages=torch.zeros(2))
    kw = {k: args.pop(k) for k in list(args) if k not in ("logp", "old_logp", "advantages", "mask")}
    with pytest.raises(exc) as info:
        hotloop.policy_loss(args["logp"], args["old_logp"], args["advantages"], args["mask"], **kw)
    assert words in str(info.value)


@pytest.mark.parametrize("change,words", [
    (dict(correct=torch.tensor([0, 2, 1, 0])), "`correct` must hold 0 / 1"),
    (dict(group_size=3), "`group_size` must be an int >= 1 dividing B"),
    (dict(group_size=None), "exactly one of `group_size`"),
    (dict(group_size=None, group_index=torch.tensor([0, 0, 4, 1])), "`group_index` values must lie in [0, B)"),
    (dict(normalize=3), "`normalize`"),
    (dict(clamp_negative=0.0), "`clamp_negative`"),
    (dict(ratio="seq"), "`ratio`"),
])
def test_nft_errors(change, words):
    logp, old, correct, mask = _nft_inputs(4, 2, 5, "cpu")
    args = {"correct": correct, "group_size": 2, **change}
    correct = args.pop("correct")
    with pytest.raises(ValueError) as info:
        hotloop.nft_loss(logp, old, correct, mask, **args)
    assert words in str(info.value)


def test_policy_loss_compiles():
    logp, old, ref, adv, mask = _batch(4, 16, "cpu")
    f = torch.compile(lambda x: hotloop.policy_loss(x, old, adv, mask, ref_logp=ref, kl_coef=0.1,
                                                    importance="sequence")[0], fullgraph=True)
    x, y = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    a = f(x)
    b, _ = hotloop.policy_loss(y, old, adv, mask, ref_logp=ref, kl_coef=0.1, importance="sequence")
    assert rel_err(a.detach(), b.detach()) < 1e-5
    a.backward(), b.backward()
    assert rel_err(x.grad, y.grad) < 1e-6
    assert math.isfinite(a.item())


def test_single_response_and_integer_mask(backend):
    """B = 1 (broadcasts stay contiguous for the kernels) and TRL's int64 completion mask."""
    dev = device_for(backend)
    logp, old, ref, adv, mask = _batch(1, 7, dev)
    x = logp.clone().requires_grad_()
    for m in (mask, mask.long()):
        a, _ = hotloop.policy_loss(x, old, adv, m, importance="sequence")
        b, _ = hotloop.nft_loss(x, old, torch.tensor([1], device=dev), m, group_size=1)
        assert torch.isfinite(a) and torch.isfinite(b)
        assert torch.isfinite(torch.autograd.grad(a + b, x)[0]).all()


def test_low_precision_logp_with_a_loss_scale():
    """fp16 log-probs under GradScaler's 65536: the scale multiplies in float32, then one rounding to fp16."""
    logp, old, _, adv, mask = _batch(4, 30, "cpu")
    x16, x32 = logp.half().requires_grad_(), logp.half().float().requires_grad_()
    loss16, _ = hotloop.policy_loss(x16, old, adv, mask)
    loss32, _ = hotloop.policy_loss(x32, old, adv, mask)
    (loss16 * 65536.0).backward(), (loss32 * 65536.0).backward()
    assert torch.isfinite(x16.grad).all()
    assert rel_err(x16.grad.float(), x32.grad) < 1e-3
