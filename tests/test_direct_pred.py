"""hotloop.DirectPredictor (docs/byol_loss.md): the correlation EMA (first step copies), W = U diag(p) U^T against float64
eigh, DirectCopy, the update frequency, eval mode, gradients w.r.t. the input, state_dict, errors."""
import pytest
import torch

import hotloop

from helpers import rel_err


def _feats(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ mix).float()


def _w_expected(corr, eps=0.01):
    s, U = torch.linalg.eigh(corr.double())
    p = (s.clamp_min(0) / s.max()).sqrt() + eps
    return U @ torch.diag(p.clamp_min(1e-4)) @ U.T


def test_directpred_reproduces_u_diag_p_ut():
    pred = hotloop.DirectPredictor(6, rho=0.3, eps=0.01)
    f1, f2 = _feats(32, 6, 0), _feats(40, 6, 1)
    pred(f1)
    c1 = f1.double().T @ f1.double() / 32
    assert rel_err(pred.corr, c1) <= 1e-6                     # the first step copies
    assert rel_err(pred.weight, _w_expected(c1)) <= 1e-5
    pred(f2)
    c2 = 0.3 * c1 + 0.7 * f2.double().T @ f2.double() / 40
    assert rel_err(pred.corr, c2) <= 1e-6
    assert rel_err(pred.weight, _w_expected(c2)) <= 1e-5
    assert torch.allclose(pred.weight, pred.weight.T, atol=1e-6)


def test_forward_gradient_and_eval_mode():
    pred = hotloop.DirectPredictor(5)
    x = _feats(7, 5, 2).requires_grad_(True)
    y = pred(x)
    y.sum().backward()
    assert rel_err(y.detach(), x.detach().double() @ pred.weight.double().T) <= 1e-6
    assert rel_err(x.grad, torch.ones(7, 5, dtype=torch.float64) @ pred.weight.double()) <= 1e-6
    assert not any(p.requires_grad for p in pred.parameters())  # W is set, not learned
    frozen = pred.weight.clone()
    pred.eval()(_feats(7, 5, 3))
    assert torch.equal(pred.weight, frozen) and pred.steps == 1


def test_two_views_before_one_backward():
    """BYOL / SimSiam pass both views through the predictor, then call backward once: each view's gradient uses
    the W its forward saw (W is replaced, never changed in place under a saved graph)."""
    pred = hotloop.DirectPredictor(4)
    x1, x2 = _feats(6, 4, 4).requires_grad_(True), _feats(6, 4, 5).requires_grad_(True)
    y1 = pred(x1)
    w1 = pred.weight.clone()
    y2 = pred(x2)
    (y1.sum() + y2.sum()).backward()
    ones = torch.ones(6, 4, dtype=torch.float64)
    assert rel_err(x1.grad, ones @ w1.double()) <= 1e-6
    assert rel_err(x2.grad, ones @ pred.weight.double()) <= 1e-6
    assert not torch.equal(w1, pred.weight)


def test_freq_and_directcopy():
    pred = hotloop.DirectPredictor(4, freq=2, mode="directcopy", eps=0.1)
    f = [_feats(16, 4, s) for s in range(3)]
    pred(f[0])
    c0 = pred.corr.double().clone()
    s0 = torch.linalg.eigvalsh(c0).max()
    assert rel_err(pred.weight, c0 / s0 + 0.1 * torch.eye(4, dtype=torch.float64)) <= 1e-6
    w0 = pred.weight.clone()
    pred(f[1])                      # step 2: F updated, W kept (freq=2)
    assert torch.equal(pred.weight, w0) and not torch.equal(pred.corr.double(), c0)
    pred(f[2])                      # step 3: W recomputed
    assert not torch.equal(pred.weight, w0)
    raw = hotloop.DirectPredictor(4, mode="directcopy", eps=0.1, normalize=False)
    raw(f[0])
    assert rel_err(raw.weight, c0 + 0.1 * torch.eye(4, dtype=torch.float64)) <= 1e-6


def test_state_dict_roundtrip():
    a = hotloop.DirectPredictor(3)
    a(_feats(9, 3, 4))
    b = hotloop.DirectPredictor(3)
    b.load_state_dict(a.state_dict())
    assert b.steps == 1 and torch.equal(b.weight, a.weight) and torch.equal(b.corr, a.corr)


def test_bad_inputs():
    for kwargs in ({"rho": 1.0}, {"eps": -1.0}, {"freq": 0}, {"mode": "copy"}):
        with pytest.raises(ValueError):
            hotloop.DirectPredictor(4, **kwargs)
    with pytest.raises(ValueError, match="dim"):
        hotloop.DirectPredictor(0)
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        hotloop.DirectPredictor(4)(torch.randn(2, 5))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_batch_refused_and_state_kept(bad):
    p = hotloop.DirectPredictor(4)
    p(_feats(8, 4, 5))
    corr, weight, steps = p.corr.clone(), p.weight.clone(), p.steps
    x = _feats(8, 4, 6)
    x[3, 1] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        p(x)
    assert torch.equal(p.corr, corr) and torch.equal(p.weight, weight) and p.steps == steps
    p(_feats(8, 4, 7))  # the next good batch trains as if the bad one never came
    assert torch.isfinite(p.weight).all()


def test_eigh_failure_names_the_input():
    with pytest.raises(ValueError, match="correlation"):
        hotloop.DirectPredictor(3).predictor_from(torch.full((3, 3), float("nan")))
