"""preference_loss and kto_loss (docs/preference_loss.md): every backend against float64 formulas written here the way TRL's
DPOTrainer / CPOTrainer / ORPOTrainer / KTOTrainer write them (vectorised, independent of
hotloop.reference.preference_loss), the limits the issue names, metrics, compile, and bad inputs.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import hotloop
from hotloop.reference.preference_loss import KINDS

from helpers import BACKENDS, device_for, rel_err


@pytest.fixture(params=[p for p in BACKENDS if p.id != "cuda"])  # CUDA tensors run the Triton kernels
def backend(request, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", request.param)
    return request.param


def _pairs(B, dev, dtype=torch.float32, seed=None):
    """Sequence log-prob sums of realistic size (tens of nats), lengths 1..60, consistency in [0, 1]."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    len_w = torch.randint(1, 61, (B,), generator=g)
    len_l = torch.randint(1, 61, (B,), generator=g)
    # per-token log-probs in (-3, 0): sums scale with the lengths, means stay in (-3, 0) (ORPO needs s̄ < 0)
    s_w = -torch.rand(B, generator=g, dtype=torch.float64) * 3 * len_w
    s_l = -torch.rand(B, generator=g, dtype=torch.float64) * 3 * len_l
    r_w = s_w + torch.randn(B, generator=g, dtype=torch.float64) * 4
    r_l = s_l + torch.randn(B, generator=g, dtype=torch.float64) * 4
    c = torch.rand(B, generator=g, dtype=torch.float64)
    nll = -s_w / len_w
    f = lambda t: t.to(dtype).to(dev)  # noqa: E731
    return dict(s_w=f(s_w), s_l=f(s_l), r_w=f(r_w), r_l=f(r_l), len_w=len_w.to(dev), len_l=len_l.to(dev), c=f(c),
                nll=f(nll))


def trl_losses(s_w, s_l, r_w, r_l, len_w, len_l, c, nll, kind, beta, eps, gamma):
    """Per-pair losses in float64, TRL's formulas (docs/preference_loss.md)."""
    ls = F.logsigmoid
    hw, hl = s_w - r_w, s_l - r_l
    logits = hw - hl
    if kind in ("sigmoid", "cdpo"):
        return -ls(beta * logits) * (1 - eps) - ls(-beta * logits) * eps
    if kind == "robust":
        return (-ls(beta * logits) * (1 - eps) + ls(-beta * logits) * eps) / (1 - 2 * eps)
    if kind == "hinge":
        return torch.relu(1 - beta * logits)
    if kind == "ipo":  # TRL averages the log-probs over tokens for ipo
        return ((hw / len_w - hl / len_l) - 1 / (2 * beta)) ** 2
    if kind == "bco_pair":
        return -ls(beta * hw) - ls(-beta * hl)
    if kind == "sppo_hard":
        return (hw - 0.5 / beta) ** 2 + (hl + 0.5 / beta) ** 2
    if kind == "apo_zero":
        return (1 - torch.sigmoid(beta * hw)) + torch.sigmoid(beta * hl)
    if kind == "apo_down":
        return torch.sigmoid(beta * hw) + (1 - torch.sigmoid(beta * logits))
    if kind == "simpo":  # CPOTrainer: logits = (π_w - π_l) - γ/β on mean log-probs
        t = (s_w / len_w - s_l / len_l) - gamma / beta
        return -ls(beta * t) * (1 - eps) - ls(-beta * t) * eps
    if kind == "orpo":  # ORPOTrainer's odds ratio on mean log-probs, written without log1mexp
        mw, ml = s_w / len_w, s_l / len_l
        log_odds = (mw - ml) - (torch.log(1 - torch.exp(mw)) - torch.log(1 - torch.exp(ml)))
        return nll - beta * ls(log_odds)
    if kind == "cream":
        return -c * ls(beta * logits) - (1 - c) * ls(-beta * logits)
    raise AssertionError(kind)


def _call(x, kind, beta=0.1, eps=0.0, gamma=0.5, **over):
    """hotloop.preference_loss on the inputs `x` (dict of _pairs), passing what `kind` needs."""
    a = {**x, **over}
    return hotloop.preference_loss(
        a["s_w"], a["s_l"], a["r_w"], a["r_l"], kind=kind, beta=beta, label_smoothing=eps, gamma=gamma,
        consistency=a["c"] if kind == "cream" else None, chosen_lengths=a["len_w"], rejected_lengths=a["len_l"],
        chosen_nll=a["nll"] if kind == "orpo" else None)


def _float64_want(x, kind, beta=0.1, eps=0.0, gamma=0.5):
    """(loss, grads of s_w / s_l / nll) of the TRL formula in float64 autograd."""
    d = {k: v.detach().cpu().double() for k, v in x.items()}
    leaves = {k: d[k].clone().requires_grad_() for k in ("s_w", "s_l", "nll")}
    d.update(leaves)
    loss = trl_losses(d["s_w"], d["s_l"], d["r_w"], d["r_l"], d["len_w"].clamp(min=1), d["len_l"].clamp(min=1),
                      d["c"], d["nll"], kind, beta, eps, gamma).mean()
    loss.backward()
    return loss.detach(), {k: t.grad for k, t in leaves.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_matches_trl_formula(backend, kind):
    dev = device_for(backend)
    x = _pairs(7 if backend == "triton" else 64, dev)
    eps = 0.15 if kind in ("cdpo", "robust", "simpo") else 0.0
    leaves = {k: x[k].clone().requires_grad_() for k in ("s_w", "s_l", "nll")}
    loss, metrics = _call({**x, **leaves}, kind, beta=0.2, eps=eps, gamma=0.7)
    loss.backward()
    want, grads = _float64_want(x, kind, beta=0.2, eps=eps, gamma=0.7)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(loss.item() - want.item()) < 2e-6 * max(1.0, abs(want.item()))
    assert rel_err(leaves["s_w"].grad, grads["s_w"]) < 1e-5
    assert rel_err(leaves["s_l"].grad, grads["s_l"]) < 1e-5
    if kind == "orpo":
        assert rel_err(leaves["nll"].grad, grads["nll"]) < 1e-6
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                            "logps/chosen", "logps/rejected"}


def test_float64_exact(monkeypatch):
    """float64 input runs float64 math on the C++ kernels: agreement to 1e-12."""
    monkeypatch.setenv("HOTLOOP_BACKEND", "cpu")
    x = _pairs(50, "cpu", dtype=torch.float64)
    for kind in KINDS:
        eps = 0.1 if kind in ("cdpo", "robust", "simpo") else 0.0
        leaves = {k: x[k].clone().requires_grad_() for k in ("s_w", "s_l", "nll")}
        loss, _ = _call({**x, **leaves}, kind, eps=eps)
        loss.backward()
        want, grads = _float64_want(x, kind, eps=eps)
        assert loss.dtype == torch.float64
        assert abs(loss.item() - want.item()) < 1e-12 * max(1.0, abs(want.item())), kind
        assert rel_err(leaves["s_w"].grad, grads["s_w"]) < 1e-11, kind


def test_metrics_as_trl_names_them(backend):
    dev = device_for(backend)
    x = _pairs(33, dev)
    beta = 0.3
    _, m = _call(x, "sigmoid", beta=beta)
    d = {k: v.cpu().double() for k, v in x.items()}
    hw, hl = d["s_w"] - d["r_w"], d["s_l"] - d["r_l"]
    want = {"rewards/chosen": (beta * hw).mean(), "rewards/rejected": (beta * hl).mean(),
            "rewards/accuracies": (hw > hl).double().mean(), "rewards/margins": (beta * (hw - hl)).mean(),
            "logps/chosen": d["s_w"].mean(), "logps/rejected": d["s_l"].mean()}
    for name, w in want.items():
        assert abs(m[name].item() - w.item()) < 1e-5 * max(1.0, abs(w.item())), name
        assert not m[name].requires_grad


@pytest.mark.parametrize("kind", ["sigmoid", "cdpo"])
def test_label_smoothing_limits(backend, kind):
    """ε = 0 is DPO; ε = 0.5 - tiny is symmetric: the loss no longer depends on which side is chosen."""
    x = _pairs(16, device_for(backend))
    dpo, _ = _call(x, "sigmoid")
    smoothed0, _ = _call(x, kind, eps=0.0)
    assert abs(dpo.item() - smoothed0.item()) < 1e-7 * max(1.0, dpo.item())
    near_half = 0.5 - 1e-7
    a, _ = _call(x, kind, eps=near_half)
    swapped = dict(x, s_w=x["s_l"], s_l=x["s_w"], r_w=x["r_l"], r_l=x["r_w"])
    b, _ = _call(swapped, kind, eps=near_half)
    assert abs(a.item() - b.item()) < 1e-5 * a.item()


def test_robust_is_unbiased(backend):
    """rDPO's expectation over a flip with probability ε is the clean DPO loss: (1-ε)·robust(pair) +
    ε·robust(swapped) = DPO(pair)."""
    x = _pairs(16, device_for(backend))
    eps = 0.2
    rob, _ = _call(x, "robust", eps=eps)
    swapped = dict(x, s_w=x["s_l"], s_l=x["s_w"], r_w=x["r_l"], r_l=x["r_w"])
    rob_sw, _ = _call(swapped, "robust", eps=eps)
    dpo, _ = _call(x, "sigmoid")
    assert abs((1 - eps) * rob.item() + eps * rob_sw.item() - dpo.item()) < 1e-5 * dpo.item()


def test_ipo_length_normalisation(backend):
    """IPO reads per-token-mean log-ratios: doubling a pair's sums and lengths leaves its loss unchanged, and
    with unit lengths it is (Δ - 1/(2β))² of the sums."""
    x = _pairs(12, device_for(backend))
    a, _ = _call(x, "ipo")
    doubled = dict(x, s_w=2 * x["s_w"], s_l=2 * x["s_l"], r_w=2 * x["r_w"], r_l=2 * x["r_l"], len_w=2 * x["len_w"],
                   len_l=2 * x["len_l"])
    b, _ = _call(doubled, "ipo")
    assert abs(a.item() - b.item()) < 1e-5 * a.item()
    ones = torch.ones_like(x["len_w"])
    c, _ = _call(x, "ipo", len_w=ones, len_l=ones)
    d = {k: v.cpu().double() for k, v in x.items()}
    want = (((d["s_w"] - d["r_w"]) - (d["s_l"] - d["r_l"]) - 1 / 0.2) ** 2).mean()
    assert abs(c.item() - want.item()) < 1e-5 * want.item()


def test_simpo_needs_no_reference(backend):
    x = _pairs(10, device_for(backend))
    with_ref, _ = _call(x, "simpo")
    no_ref = hotloop.preference_loss(x["s_w"], x["s_l"], kind="simpo", chosen_lengths=x["len_w"],
                                     rejected_lengths=x["len_l"])[0]
    assert with_ref.item() == no_ref.item()


def test_orpo_log1mexp_both_branches(backend):
    """ORPO's log(1 - e^s̄) on both sides of -ln 2: s̄ near 0 (a confident model, where 1 - e^s̄ cancels) and far
    below; the float64 reference computes log(1 - e^s̄) directly, which is exact there in float64."""
    dev = device_for(backend)
    m_w = torch.tensor([-1e-3, -0.05, -0.4, -0.69, -0.70, -2.0, -8.0, -0.01], dtype=torch.float64)
    m_l = torch.tensor([-0.3, -1e-2, -3.0, -0.71, -0.68, -0.9, -0.02, -5.0], dtype=torch.float64)
    n = torch.tensor([5, 9, 3, 40, 1, 7, 2, 11])
    x = dict(s_w=(m_w * n).float().to(dev), s_l=(m_l * n).float().to(dev), r_w=torch.zeros(8, device=dev),
             r_l=torch.zeros(8, device=dev), len_w=n.to(dev), len_l=n.to(dev), c=torch.ones(8, device=dev),
             nll=(-m_w).float().to(dev))
    leaves = {k: x[k].clone().requires_grad_() for k in ("s_w", "s_l")}
    loss, _ = _call({**x, **leaves}, "orpo", beta=0.5)
    loss.backward()
    want, grads = _float64_want(x, "orpo", beta=0.5)
    assert abs(loss.item() - want.item()) < 1e-6 * abs(want.item())
    assert rel_err(leaves["s_w"].grad, grads["s_w"]) < 1e-5
    assert rel_err(leaves["s_l"].grad, grads["s_l"]) < 1e-5


def test_cream_with_full_consistency_is_dpo(backend):
    x = _pairs(20, device_for(backend))
    cream, m_c = _call(x, "cream", c=torch.ones_like(x["c"]))
    dpo, m_d = _call(x, "sigmoid")
    assert abs(cream.item() - dpo.item()) < 1e-7 * dpo.item()
    assert m_c["rewards/margins"].item() == m_d["rewards/margins"].item()
    # C = 0: DPO on the swapped pair
    cream0, _ = _call(x, "cream", c=torch.zeros_like(x["c"]))
    swapped = dict(x, s_w=x["s_l"], s_l=x["s_w"], r_w=x["r_l"], r_l=x["r_w"])
    dpo_sw, _ = _call(swapped, "sigmoid")
    assert abs(cream0.item() - dpo_sw.item()) < 1e-6 * dpo_sw.item()


def test_low_precision_inputs(backend):
    """bf16 / fp16 sequence log-probs: float32 math, float32 loss, gradients in the input dtype."""
    dev = device_for(backend)
    for dt in (torch.bfloat16, torch.float16):
        x = _pairs(9, dev, dtype=dt)
        s_w = x["s_w"].clone().requires_grad_()
        loss, _ = _call(dict(x, s_w=s_w), "sigmoid")
        loss.backward()
        want, grads = _float64_want(x, "sigmoid")
        assert loss.dtype == torch.float32
        assert abs(loss.item() - want.item()) < 1e-5 * max(1.0, want.item())
        assert s_w.grad.dtype == dt and rel_err(s_w.grad, grads["s_w"]) < 1e-2


def kto_formula(x, r, des, kl, beta, wd, wu):
    h = x - r
    return torch.where(des, wd * (1 - torch.sigmoid(beta * (h - kl))),
                       wu * (1 - torch.sigmoid(beta * (kl - h)))).mean()


def test_kto_matches_trl_formula(backend):
    dev = device_for(backend)
    B = 9 if backend == "triton" else 40
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    x64 = -torch.rand(B, generator=g, dtype=torch.float64) * 60
    r64 = x64 + torch.randn(B, generator=g, dtype=torch.float64) * 5
    des = torch.rand(B, generator=g) < 0.6
    for kl in (None, 0.7, torch.tensor(-0.3), torch.tensor([1.4])):
        x = x64.float().to(dev).requires_grad_()
        kl_dev = kl.to(dev) if isinstance(kl, torch.Tensor) else kl
        loss, m = hotloop.kto_loss(x, r64.float().to(dev), des.to(dev), beta=0.25, desirable_weight=1.3,
                                   undesirable_weight=0.8, kl=kl_dev)
        loss.backward()
        z0 = 0.0 if kl is None else max(float(torch.as_tensor(kl).reshape(())), 0.0)
        xx = x64.clone().requires_grad_()
        want = kto_formula(xx, r64, des, z0, 0.25, 1.3, 0.8)
        want.backward()
        assert abs(loss.item() - want.item()) < 2e-6 * max(1.0, want.item())
        assert rel_err(x.grad, xx.grad) < 1e-5
        h = (x64 - r64)
        assert abs(m["rewards/chosen"].item() - (0.25 * h[des]).mean().item()) < 1e-4
        assert abs(m["kl"].item() - z0) < 1e-7


def test_kto_one_sided_batch(backend):
    """All items desirable: the rejected metrics are 0 (TRL skips them), nothing is NaN."""
    dev = device_for(backend)
    x = (-torch.rand(6) * 10).to(dev).requires_grad_()
    loss, m = hotloop.kto_loss(x, x.detach() + 1, torch.ones(6, dtype=torch.bool, device=dev))
    loss.backward()
    assert torch.isfinite(loss) and m["rewards/rejected"].item() == 0.0 and m["logps/rejected"].item() == 0.0
    assert torch.isfinite(x.grad).all()


def test_compile_fullgraph(monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", "cpu")
    x = _pairs(8, "cpu")

    def step(s_w, s_l, r_w, r_l):
        loss, m = hotloop.preference_loss(s_w, s_l, r_w, r_l, kind="sigmoid", beta=0.1)
        return loss, m["rewards/margins"]

    s_w = x["s_w"].clone().requires_grad_()
    loss, margin = torch.compile(step, fullgraph=True, backend="aot_eager")(s_w, x["s_l"], x["r_w"], x["r_l"])
    loss.backward()
    want, grads = _float64_want(x, "sigmoid")
    assert abs(loss.item() - want.item()) < 1e-6 * want.item()
    assert rel_err(s_w.grad, grads["s_w"]) < 1e-5


def test_opcheck():
    x = _pairs(5, "cpu")
    ones = torch.ones(5)
    for kind_id in (0, 4, 10, 11):
        args = (x["s_w"], x["s_l"], x["r_w"], x["r_l"], ones * 3, ones * 2, x["c"], x["nll"], kind_id, 0.1, 0.0, 0.5)
        torch.library.opcheck(torch.ops.hotloop.preference_pairs.default, args)
    torch.library.opcheck(torch.ops.hotloop.kto_items.default,
                          (x["s_w"], x["r_w"], (x["c"] > 0.5).float(), torch.zeros(1), 0.1, 1.0, 1.0))


def test_errors():
    x = _pairs(4, "cpu")
    s_w, s_l, r_w, r_l = x["s_w"], x["s_l"], x["r_w"], x["r_l"]
    pl = hotloop.preference_loss
    with pytest.raises(ValueError, match="`rejected_logps` must be \\[B\\]"):
        pl(s_w, s_l[:3], r_w, r_l)
    with pytest.raises(ValueError, match="`ref_chosen_logps` must be \\[B\\]"):
        pl(s_w, s_l, r_w[:2], r_l)
    with pytest.raises(ValueError, match="`beta`"):
        pl(s_w, s_l, r_w, r_l, beta=0.0)
    with pytest.raises(ValueError, match="`beta`"):
        pl(s_w, s_l, r_w, r_l, beta=-1.0)
    with pytest.raises(ValueError, match="`label_smoothing` must be in \\[0, 0.5\\)"):
        pl(s_w, s_l, r_w, r_l, label_smoothing=0.5)
    with pytest.raises(ValueError, match="`label_smoothing`"):
        pl(s_w, s_l, r_w, r_l, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="`kind` must be one of"):
        pl(s_w, s_l, r_w, r_l, kind="dpo++")
    with pytest.raises(ValueError, match="needs `ref_chosen_logps`"):
        pl(s_w, s_l, kind="sigmoid")
    with pytest.raises(ValueError, match="needs `chosen_lengths`"):
        pl(s_w, s_l, r_w, r_l, kind="ipo")
    with pytest.raises(ValueError, match="needs `chosen_nll`"):
        pl(s_w, s_l, kind="orpo", chosen_lengths=x["len_w"], rejected_lengths=x["len_l"])
    with pytest.raises(ValueError, match="needs `consistency`"):
        pl(s_w, s_l, r_w, r_l, kind="cream")
    with pytest.raises(ValueError, match="`consistency` must lie in \\[0, 1\\]"):
        pl(s_w, s_l, r_w, r_l, kind="cream", consistency=x["c"] + 1)
    with pytest.raises(ValueError, match="`chosen_logps` must be \\[B\\] with B >= 1"):
        pl(s_w[:0], s_l[:0], r_w[:0], r_l[:0])
    with pytest.raises(TypeError, match="`chosen_logps`"):
        pl(s_w.long(), s_l, r_w, r_l)
    with pytest.raises(ValueError, match="`beta`"):
        pl(s_w, s_l, r_w, r_l, beta=math.nan)
    with pytest.raises(TypeError, match="`desirable`"):
        hotloop.kto_loss(s_w, r_w, torch.ones(4))
    with pytest.raises(ValueError, match="`kl` must be a scalar"):
        hotloop.kto_loss(s_w, r_w, torch.ones(4, dtype=torch.bool), kl=torch.zeros(2))
