"""policy_loss and nft_loss (docs/policy_loss.md, docs/nft_loss.md): every test of the op, in sections.

- Backends: every backend against float64 (hotloop.reference.policy_loss).
- Reference: parity with the formulas TRL and verl use for each loss type and aggregation (written here from the
  math, vectorised, independent of the looped reference in hotloop.reference.policy_loss).
- CPU kernels: the C++ per-token loss contracts (hotloop._C.cpu.policy_tokens / nft_tokens) against
  policy_tokens_ref / nft_tokens_ref in float64 on the same inputs, hard cases planted in.
- Errors: bad input is rejected with an error that names the argument.
- Compile: torch.compile(fullgraph=True).
- Triton kernels: policy_tokens_triton / nft_tokens_triton on CPU tensors (the Triton interpreter) against the same
  contracts. Skipped with a GPU and without triton; the rest of the file runs either way.
"""
import math
import zlib

import pytest
import torch

import hotloop
from hotloop.contracts import KL_IDS
from hotloop.reference.policy_loss import nft_loss_ref, nft_tokens_ref, policy_loss_ref, policy_tokens_ref

from helpers import BACKENDS, LazyModule, device_for, interpreted, rel_err, triton_interpreter_only

# imported inside the Triton kernel tests, never at collection (no triton: those tests skip, the others run)
pl = LazyModule("hotloop.triton_kernels.policy_loss")


# =====================================================================================================================
# backends: every backend against float64
# =====================================================================================================================
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


# =====================================================================================================================
# reference: parity with TRL's / verl's formulas
# =====================================================================================================================
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


# =====================================================================================================================
# CPU kernels: hotloop._C.cpu.policy_tokens / nft_tokens against their float64 contracts
# Inputs are random per test (seeded from the test's parameters) with the hard cases planted in: log-ratios
# beyond +-20 (policy) or 10 (NFT) and exactly on those clamp edges, rho exactly on a clip edge, and NaN / inf
# inputs on masked tokens, which must not reach any output.
# =====================================================================================================================
CPU_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
CPU_SIZES = [1, 7, 5000, 70000]
DTYPES = [torch.float32, torch.float64]
KL_KINDS = {None: 0, "k1": 1, "k2": 2, "k3": 3}
CLIPS = [(0.2, 0.2), (0.2, 0.28), (0.0, 0.0)]  # (0, 0): lr = 0 puts rho exactly on both clip edges
POISON = [math.nan, math.inf, -math.inf]


def _gen(*params) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(params).encode()))


def _plant(x: torch.Tensor, values, g: torch.Generator) -> torch.Tensor:
    """Write `values` at random distinct positions of x (as many as fit); returns the positions."""
    pos = torch.randperm(x.numel(), generator=g)[:len(values)]
    x[pos] = torch.tensor(values[:pos.numel()], dtype=x.dtype)
    return pos


def _mask_and_weight(N: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mostly 0/1 mask with some fractional metric weights; loss weight 0 wherever the mask is."""
    u = torch.rand(N, generator=g, dtype=torch.float64)
    m = torch.where(u < 0.25, 0.0, torch.where(u < 0.35, 0.5, 1.0))
    if N > 0:
        m[0] = 1.0  # at least one live token
    w = m * torch.rand(N, generator=g, dtype=torch.float64) / max(N, 1) ** 0.5
    return m, w


def _poison_masked(x: torch.Tensor, m: torch.Tensor, g: torch.Generator) -> None:
    off = torch.nonzero(m == 0).flatten()
    x[off] = torch.tensor(POISON, dtype=x.dtype)[torch.randint(0, len(POISON), (off.numel(),), generator=g)]


def _policy_inputs(N, kl, g):
    m, w = _mask_and_weight(N, g)
    lr = torch.randn(N, generator=g, dtype=torch.float64) * 0.3
    pos = _plant(lr, [0.0] * 20, g)  # rho = 1: live, on the clip edges when a clip is 0
    m[pos], w[pos] = 1.0, 1.0 / max(N, 1) ** 0.5
    kld = torch.randn(N, generator=g, dtype=torch.float64) * 2.0
    # edges and beyond, on live tokens with a tiny weight so that rho up to e^20 does not drown the other tokens
    tiny = 2.0**-30
    for x, edges in ((lr, [20.0, -20.0, 20.5, -20.5, 35.0, -300.0]), (kld, [20.0, -20.0, 21.0, -21.0])):
        pos = _plant(x, edges, g)
        m[pos], w[pos] = tiny, tiny
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    for x in (lr, kld, adv):
        _poison_masked(x, m, g)
    return lr, (kld if kl is not None else None), adv, m, w


def _cpu_nft_inputs(N, g):
    m, w = _mask_and_weight(N, g)
    lr = torch.randn(N, generator=g, dtype=torch.float64) * 0.5
    pos = _plant(lr, [10.0, 10.0, 10.5, 12.0, 25.0, 0.0, -40.0], g)
    m[pos], w[pos] = 2.0**-18, 2.0**-18  # live, weighted so that R up to e^10 does not drown the other tokens
    r = 0.02 + 0.96 * torch.rand(N, generator=g, dtype=torch.float64)
    c = (torch.rand(N, generator=g) < 0.5).double()
    _poison_masked(lr, m, g)
    return lr, m, w, r, c


def _check(out: torch.Tensor, ref: torch.Tensor, dtype, m: torch.Tensor | None = None):
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    if m is not None:
        assert (out[m == 0] == 0).all()
    assert rel_err(out, ref) < CPU_TOL[dtype]


def _policy(lr, kld, adv, m, w, dtype, clip_low, clip_high, dual_clip, kl, kl_coef):
    cast = [None if t is None else t.to(dtype) for t in (lr, kld, adv, m, w)]
    return hotloop._C.cpu.policy_tokens(*cast, clip_low, clip_high, dual_clip, KL_KINDS[kl], kl_coef)


@pytest.mark.parametrize("clips", CLIPS)
@pytest.mark.parametrize("dual_clip", [0.0, 3.0])
@pytest.mark.parametrize("kl", list(KL_KINDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", CPU_SIZES)
def test_cpu_kernel_policy_tokens_match_reference(N, dtype, kl, dual_clip, clips):
    lr, kld, adv, m, w = _policy_inputs(N, kl, _gen("policy", N, str(dtype), kl, dual_clip, clips))
    # the reference sees exactly the kernel's inputs, in float64
    lr, kld, adv, m, w = [None if t is None else t.to(dtype).double() for t in (lr, kld, adv, m, w)]
    args = (*clips, dual_clip, kl, 0.1)
    g_lr, g_kl, sums = _policy(lr, kld, adv, m, w, dtype, *args)
    ref_g_lr, ref_g_kl, ref_sums = policy_tokens_ref(lr, kld, adv, m, w, *args)
    _check(g_lr, ref_g_lr, dtype, m)
    _check(g_kl, ref_g_kl, dtype, m if kl is not None else None)
    _check(sums, ref_sums, dtype)


@pytest.mark.parametrize("clamp_negative", [1.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", CPU_SIZES)
def test_cpu_kernel_nft_tokens_match_reference(N, dtype, clamp_negative):
    lr, m, w, r, c = _cpu_nft_inputs(N, _gen("nft", N, str(dtype), clamp_negative))
    lr, m, w, r, c = [t.to(dtype).double() for t in (lr, m, w, r, c)]
    g_lr, sums = hotloop._C.cpu.nft_tokens(*[t.to(dtype) for t in (lr, m, w, r, c)], clamp_negative)
    ref_g_lr, ref_sums = nft_tokens_ref(lr, m, w, r, c, clamp_negative)
    _check(g_lr, ref_g_lr, dtype, m)
    _check(sums, ref_sums, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_kernel_empty(dtype):
    e = torch.empty(0, dtype=dtype)
    g_lr, g_kl, sums = hotloop._C.cpu.policy_tokens(e, e, e, e, e, 0.2, 0.2, 3.0, 3, 0.1)
    assert g_lr.shape == (0,) and g_kl.shape == (0,) and torch.equal(sums, torch.zeros(6, dtype=dtype))
    g_lr, sums = hotloop._C.cpu.nft_tokens(e, e, e, e, e, 1.0)
    assert g_lr.shape == (0,) and torch.equal(sums, torch.zeros(3, dtype=dtype))


def test_cpu_kernel_deterministic_across_thread_counts():
    """Sums come from fixed token blocks added in order: bit-identical with 1 and 2 threads."""
    N = 70000
    lr, kld, adv, m, w = _policy_inputs(N, "k3", _gen("determinism"))
    nft = [t.float() for t in _cpu_nft_inputs(N, _gen("determinism-nft"))]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((_policy(lr, kld, adv, m, w, torch.float32, 0.2, 0.28, 3.0, "k3", 0.1),
                            hotloop._C.cpu.nft_tokens(*nft, 0.1)))
    finally:
        torch.set_num_threads(threads)
    (p1, n1), (p2, n2) = results
    for a, b in zip(p1 + n1, p2 + n2):
        assert torch.equal(a, b)


def _good_policy_args(N=8, dtype=torch.float32):
    x = torch.zeros(N, dtype=dtype)
    return [x, x.clone(), x.clone(), torch.ones(N, dtype=dtype), x.clone(), 0.2, 0.2, 0.0, 3, 0.1]


@pytest.mark.parametrize("index, bad, error, match", [
    (0, torch.zeros(8, dtype=torch.float16), TypeError, "`lr` must be float32 or float64"),
    (0, torch.zeros(8, dtype=torch.int64), TypeError, "`lr` must be float32 or float64"),
    (2, torch.zeros(8, dtype=torch.float64), TypeError, "`adv` must be"),
    (3, torch.zeros(9), ValueError, r"`m` must be \[N\] = \[8\]"),
    (4, torch.zeros(2, 4), ValueError, r"`w` must be \[N\]"),
    (0, torch.zeros(16)[::2], ValueError, "`lr` must be contiguous"),
    (1, torch.zeros(16)[::2], ValueError, "`kld` must be contiguous"),
    (1, None, ValueError, "`kld` must be given exactly when kl_kind != 0"),
    (8, 4, ValueError, "`kl_kind` must be"),
])
def test_cpu_kernel_policy_bad_inputs(index, bad, error, match):
    args = _good_policy_args()
    args[index] = bad
    with pytest.raises(error, match=match):
        hotloop._C.cpu.policy_tokens(*args)


def test_cpu_kernel_policy_kld_given_without_kl():
    args = _good_policy_args()
    args[8] = 0
    with pytest.raises(ValueError, match="`kld` must be given exactly when kl_kind != 0"):
        hotloop._C.cpu.policy_tokens(*args)


@pytest.mark.parametrize("index, bad, error, match", [
    (0, torch.zeros(8, dtype=torch.bfloat16), TypeError, "`lr` must be float32 or float64"),
    (4, torch.zeros(8, dtype=torch.float64), TypeError, "`c` must be"),
    (3, torch.zeros(7), ValueError, r"`r` must be \[N\] = \[8\]"),
    (2, torch.zeros(16)[::2], ValueError, "`w` must be contiguous"),
])
def test_cpu_kernel_nft_bad_inputs(index, bad, error, match):
    args = [torch.zeros(8) for _ in range(5)] + [1.0]
    args[index] = bad
    with pytest.raises(error, match=match):
        hotloop._C.cpu.nft_tokens(*args)


# =====================================================================================================================
# errors: bad input is rejected with an error that names the argument
# =====================================================================================================================
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


# =====================================================================================================================
# compile
# =====================================================================================================================
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


# =====================================================================================================================
# Triton kernels: policy_tokens_triton / nft_tokens_triton on CPU tensors (the interpreter)
# Compared with their contracts, policy_tokens_ref / nft_tokens_ref, evaluated in float64 on the same float32
# inputs, by relative norm error. Masked tokens hold NaN / inf in every per-token input, so any leak of padding
# into a gradient or a sum shows up. Sizes: 1, 37 (one partial block) and 3000 (three programs, the last
# partial). conftest.py sets TRITON_INTERPRET=1 when there is no GPU; with one (or without triton) these
# CPU-tensor cases cannot run and are skipped (triton_kernel_test).
# =====================================================================================================================


def triton_kernel_test(test):
    """triton_interpreter_only, and: the poisoned padding makes NaN / inf in the kernels' masked lanes (selected
    away), which numpy reports."""
    test = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")(test)
    return triton_interpreter_only(test)


TRITON_TOL = 1e-5
TRITON_SIZES = [1, 37, 3000]
KLS = [None, "k1", "k2", "k3"]
CLIP_LOW, CLIP_HIGH = 0.2, 0.28  # asymmetric, as in DAPO's clip-higher
DUAL_CLIP = 3.0
KL_COEF = 0.05
POLICY_NONNEG_SUMS = (1, 2, 3, 4)  # clip counts and the ratio sum: no cancellation, so each is checked alone
NFT_NONNEG_SUMS = (1, 2)


@pytest.fixture
def gen(request):
    """A generator seeded from the test's id: fresh inputs in every test, the same ones on every run."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


# ---------------------------------------------------------------------------------------------------- helpers
def make_mask(N, gen):
    """Metric weights in [0.5, 1.5), a quarter of them 0 (at least one of each kind when N > 1)."""
    keep = torch.rand(N, generator=gen) > 0.25
    if N > 1:
        keep[:2] = torch.tensor([False, True])
    return torch.where(keep, 0.5 + torch.rand(N, generator=gen), 0.0)


def poison_padding(m, gen, *tensors):
    """NaN, +inf or -inf where m == 0 in each tensor: a masked token must contribute nothing, whatever it holds."""
    pad = m == 0
    for t in tensors:
        bad = torch.tensor([float("nan"), float("inf"), float("-inf")])
        t[pad] = bad[torch.randint(0, 3, (int(pad.sum()),), generator=gen)]


def policy_inputs(N, kl, gen, lr_scale=0.3):
    """(lr, kld, adv, m, w): ratios around the clip range, padding poisoned; kld None when kl is None."""
    m = make_mask(N, gen)
    lr = torch.randn(N, generator=gen) * lr_scale
    kld = torch.randn(N, generator=gen)
    adv = torch.randn(N, generator=gen)
    w = torch.where(m != 0, torch.rand(N, generator=gen), 0.0)
    poison_padding(m, gen, lr, kld, adv, w)
    return lr, kld if kl else None, adv, m, w


def policy_both(lr, kld, adv, m, w, kl, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=0.0):
    """(Triton outputs, float64 reference outputs) on the same inputs."""
    out = pl.policy_tokens_triton(lr, kld, adv, m, w, clip_low, clip_high, dual_clip, KL_IDS[kl], KL_COEF)
    ref = policy_tokens_ref(*(None if t is None else t.double() for t in (lr, kld, adv, m, w)), clip_low,
                            clip_high, dual_clip, kl, KL_COEF)
    return out, ref


def nft_inputs(N, gen, lr_scale=1.0):
    """(lr, m, w, r, c): c in {0, 1}, r in (0.02, 0.98), ratios on both sides of every clamp; padding poisoned."""
    m = make_mask(N, gen)
    lr = torch.randn(N, generator=gen) * lr_scale
    w = torch.where(m != 0, torch.rand(N, generator=gen), 0.0)
    r = 0.02 + 0.96 * torch.rand(N, generator=gen)
    c = (torch.rand(N, generator=gen) < 0.5).float()
    poison_padding(m, gen, lr, w, r, c)
    return lr, m, w, r, c


def nft_both(lr, m, w, r, c, clamp_negative):
    out = pl.nft_tokens_triton(lr, m, w, r, c, clamp_negative)
    ref = nft_tokens_ref(*(t.double() for t in (lr, m, w, r, c)), clamp_negative)
    return out, ref


def assert_grad(out, ref, N):
    assert out.shape == (N,) and out.dtype == torch.float32
    assert torch.isfinite(out).all()  # every element written (poisoned NaN otherwise), no padding leaked
    assert rel_err(out, ref) < TRITON_TOL, rel_err(out, ref)


def assert_sums(out, ref, nonneg):
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TRITON_TOL, rel_err(out, ref)
    for j in nonneg:
        assert rel_err(out[j], ref[j]) < TRITON_TOL, (j, out[j].item(), ref[j].item())


def assert_each_close(out, ref):
    """Every element within TOL of its own reference (exactly 0 where the reference is): for inputs whose
    outputs span many orders of magnitude, where a norm would only see the largest."""
    err = (out.double() - ref).abs()
    assert (err <= TRITON_TOL * ref.abs()).all(), (out, ref)


# -------------------------------------------------------------------------------------------------- policy loss
@triton_kernel_test
@pytest.mark.parametrize("dual_clip", [0.0, DUAL_CLIP], ids=["no_dual", "dual"])
@pytest.mark.parametrize("kl", KLS, ids=str)
@pytest.mark.parametrize("N", TRITON_SIZES)
def test_triton_policy_matches_ref(gen, N, kl, dual_clip):
    inputs = policy_inputs(N, kl, gen)
    (g_lr, g_kl, sums), (r_lr, r_kl, r_sums) = policy_both(*inputs, kl, dual_clip=dual_clip)
    assert_grad(g_lr, r_lr, N)
    if kl is None:
        assert g_kl.shape == (0,)
    else:
        assert_grad(g_kl, r_kl, N)
    assert_sums(sums, r_sums, POLICY_NONNEG_SUMS)


@triton_kernel_test
@pytest.mark.parametrize("dual_clip", [0.0, DUAL_CLIP], ids=["no_dual", "dual"])
def test_triton_policy_clamp_edges(gen, dual_clip):
    # lr and d on and just past +-20, the closed ends of the clamps (gradient on at 20, off at 20.5), both signs
    # of the advantage; k3 reads d, where the clamp of -d is what matters
    edges = torch.tensor([-30.0, -20.5, -20.0, -19.5, -1.0, 1.0, 19.5, 20.0, 20.5, 30.0])
    n = edges.numel()
    lr = edges.repeat(2)
    kld = edges.flip(0).repeat(2)
    adv = torch.cat([torch.full((n,), 0.7), torch.full((n,), -0.7)])
    m = torch.ones(2 * n)
    w = 0.5 + torch.rand(2 * n, generator=gen)
    (g_lr, g_kl, sums), (r_lr, r_kl, r_sums) = policy_both(lr, kld, adv, m, w, "k3", dual_clip=dual_clip)
    assert_each_close(g_lr, r_lr)
    assert_each_close(g_kl, r_kl)
    assert_each_close(sums, r_sums)


@triton_kernel_test
def test_triton_policy_ratio_on_clip_bounds(gen):
    # lr = 0 gives rho = 1 exactly; with no clip room that is both bounds: neither clip count may fire, and the
    # gradient stays -w * adv (the closed range)
    N = 37
    _, _, adv, m, w = policy_inputs(N, None, gen)
    lr = torch.where(m != 0, 0.0, float("nan"))
    (g_lr, _, sums), (r_lr, _, r_sums) = policy_both(lr, None, adv, m, w, None, clip_low=0.0, clip_high=0.0)
    assert sums[1] == 0 and sums[2] == 0
    assert_grad(g_lr, r_lr, N)
    assert torch.equal(g_lr, torch.where(m != 0, -w * adv, 0.0))
    assert_sums(sums, r_sums, POLICY_NONNEG_SUMS)


@triton_kernel_test
@pytest.mark.parametrize("kl", KLS, ids=str)
def test_triton_policy_all_masked(gen, kl):
    N = 37
    lr, kld, adv, m, w = policy_inputs(N, kl, gen)
    m.zero_()
    poison_padding(m, gen, *(t for t in (lr, kld, adv, w) if t is not None))
    g_lr, g_kl, sums = pl.policy_tokens_triton(lr, kld, adv, m, w, CLIP_LOW, CLIP_HIGH, DUAL_CLIP,
                                               KL_IDS[kl], KL_COEF)
    assert torch.equal(g_lr, torch.zeros(N)) and torch.equal(sums, torch.zeros(6))
    assert torch.equal(g_kl, torch.zeros(N if kl else 0))


@triton_kernel_test
def test_triton_policy_deterministic(gen):
    # no atomics: a second launch gives the same bits, sums included
    inputs = policy_inputs(3000, "k3", gen)
    first = pl.policy_tokens_triton(*inputs, CLIP_LOW, CLIP_HIGH, DUAL_CLIP, 3, KL_COEF)
    second = pl.policy_tokens_triton(*inputs, CLIP_LOW, CLIP_HIGH, DUAL_CLIP, 3, KL_COEF)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@triton_kernel_test
@pytest.mark.parametrize("kl_kind", [0, 3])
def test_triton_policy_empty(kl_kind):
    e = torch.empty(0)
    g_lr, g_kl, sums = pl.policy_tokens_triton(e, e if kl_kind else None, e, e, e, CLIP_LOW, CLIP_HIGH, 0.0,
                                               kl_kind, KL_COEF)
    assert g_lr.shape == (0,) and g_kl.shape == (0,)
    assert torch.equal(sums, torch.zeros(6))


@triton_kernel_test
def test_triton_policy_bad_arguments():
    x = torch.zeros(8)
    with pytest.raises(ValueError, match="kl_kind must be one of"):
        pl.policy_tokens_triton(x, x, x, x, x, CLIP_LOW, CLIP_HIGH, 0.0, 4, KL_COEF)
    with pytest.raises(ValueError, match="kld must be given"):
        pl.policy_tokens_triton(x, None, x, x, x, CLIP_LOW, CLIP_HIGH, 0.0, 1, KL_COEF)
    with pytest.raises(ValueError, match="kld must be given"):
        pl.policy_tokens_triton(x, x, x, x, x, CLIP_LOW, CLIP_HIGH, 0.0, 0, KL_COEF)
    with pytest.raises(ValueError, match="adv must be a contiguous float32"):
        pl.policy_tokens_triton(x, None, x.double(), x, x, CLIP_LOW, CLIP_HIGH, 0.0, 0, KL_COEF)
    with pytest.raises(ValueError, match="w must be a contiguous float32"):
        pl.policy_tokens_triton(x, None, x, x, x[:7], CLIP_LOW, CLIP_HIGH, 0.0, 0, KL_COEF)
    with pytest.raises(ValueError, match="kld must be a contiguous float32"):
        pl.policy_tokens_triton(x, torch.zeros(16)[::2], x, x, x, CLIP_LOW, CLIP_HIGH, 0.0, 2, KL_COEF)


# ---------------------------------------------------------------------------------------------------------- NFT
@triton_kernel_test
@pytest.mark.parametrize("clamp_negative", [1.0, 0.1])
@pytest.mark.parametrize("N", TRITON_SIZES)
def test_triton_nft_matches_ref(gen, N, clamp_negative):
    inputs = nft_inputs(N, gen)
    (g_lr, sums), (r_lr, r_sums) = nft_both(*inputs, clamp_negative)
    assert_grad(g_lr, r_lr, N)
    assert_sums(sums, r_sums, NFT_NONNEG_SUMS)


@triton_kernel_test
@pytest.mark.parametrize("clamp_negative", [1.0, 0.1])
def test_triton_nft_clamp_edges(gen, clamp_negative):
    # lr on and past 10 (gradient on at 10, off beyond), lr = 0 where x = 1 exactly (on the clamp for 1.0:
    # not counted as clamped), and ratios deep on either side; each for a correct and an incorrect response
    edges = torch.tensor([-30.0, -1.0, 0.0, 0.5, 9.5, 10.0, 10.5, 12.0, 30.0])
    n = edges.numel()
    lr = edges.repeat(2)
    c = torch.cat([torch.ones(n), torch.zeros(n)])
    r = 0.02 + 0.96 * torch.rand(2 * n, generator=gen)
    m = torch.ones(2 * n)
    w = 0.5 + torch.rand(2 * n, generator=gen)
    (g_lr, sums), (r_lr, r_sums) = nft_both(lr, m, w, r, c, clamp_negative)
    assert_each_close(g_lr, r_lr)
    assert_sums(sums, r_sums, NFT_NONNEG_SUMS)


@triton_kernel_test
def test_triton_nft_deterministic(gen):
    inputs = nft_inputs(3000, gen)
    first = pl.nft_tokens_triton(*inputs, 0.1)
    second = pl.nft_tokens_triton(*inputs, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@triton_kernel_test
def test_triton_nft_empty():
    e = torch.empty(0)
    g_lr, sums = pl.nft_tokens_triton(e, e, e, e, e, 1.0)
    assert g_lr.shape == (0,) and torch.equal(sums, torch.zeros(3))


@triton_kernel_test
def test_triton_nft_bad_arguments():
    x = torch.zeros(8)
    with pytest.raises(ValueError, match="r must be a contiguous float32"):
        pl.nft_tokens_triton(x, x, x, x.double(), x, 1.0)
    with pytest.raises(ValueError, match="c must be a contiguous float32"):
        pl.nft_tokens_triton(x, x, x, x, x[:4], 1.0)
