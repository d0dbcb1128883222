"""Kernel-level tests of the Triton token_stats launchers, run on CPU tensors by the Triton interpreter.

Each case compares against the same math in float64 torch, applied to the (already rounded) inputs, by relative
norm error. Shapes are tiny: the interpreter runs every program in numpy.
"""
import math


import pytest
import torch

# conftest.py sets TRITON_INTERPRET=1 when there is no GPU; with one, the public-op tests (test_token_stats.py,
# test_linear_token_stats.py) run these kernels on CUDA tensors instead
if torch.cuda.is_available():
    pytest.skip("interpreter-only kernel tests (CPU tensors)", allow_module_level=True)

pytest.importorskip("triton")
ts = pytest.importorskip("hotloop.triton_kernels.token_stats")

IGNORE = -100
TEMP = 0.7
FWD_TOL = 1e-5
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


# ------------------------------------------------------------------------------------------------- references
def ref_forward(x, labels, temperature=TEMP, ignore_index=IGNORE):
    """float64 (logprobs, entropy, self_certainty, lse) of x (any dtype, read as is)."""
    z = x.double() / temperature
    lse = torch.logsumexp(z, -1)
    logp = z - lse[..., None]
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0).long()
    lp = logp.gather(-1, safe[..., None])[..., 0]
    p = logp.exp()
    ent = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    sc = -logp.mean(-1) - math.log(x.shape[-1])
    zero = torch.zeros((), dtype=torch.float64)
    return tuple(torch.where(valid, t, zero) for t in (lp, ent, sc, lse))


def ref_grad(x, labels, g_lp, g_h, g_sc, temperature=TEMP, ignore_index=IGNORE):
    """float64 d(sum g * outputs)/dx by the closed form (autograd of p log p is NaN at masked -inf logits)."""
    z = x.double() / temperature
    lse = torch.logsumexp(z, -1, keepdim=True)
    d = z - lse
    p = d.exp()
    d_c = d.clamp_min(-1e4)  # p = 0 there
    H = -(p * d_c).sum(-1, keepdim=True)
    V = x.shape[-1]
    valid = (labels != ignore_index)[..., None]
    onehot = torch.nn.functional.one_hot(torch.where(valid[..., 0], labels, 0).long(), V).double()
    g_lp, g_h, g_sc = (torch.zeros(labels.shape, dtype=torch.float64) if g is None else g.double()
                       for g in (g_lp, g_h, g_sc))
    g_lp, g_h, g_sc = g_lp[..., None], g_h[..., None], g_sc[..., None]
    g = g_lp * onehot - p * (g_lp - g_sc + g_h * (d_c + H)) - g_sc / V
    return torch.where(valid, g / temperature, torch.zeros((), dtype=torch.float64))


def ref_grad_autograd(x, labels, g_lp, g_h, g_sc, temperature=TEMP, ignore_index=IGNORE):
    xx = x.double().requires_grad_()
    lp, ent, sc, _ = ref_forward(xx, labels, temperature, ignore_index)
    loss = sum((o * g.double()).sum() for o, g in ((lp, g_lp), (ent, g_h), (sc, g_sc)) if g is not None)
    loss.backward()
    return xx.grad


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    den = ref.norm()
    return ((out - ref).norm() / den).item() if den > 0 else (out - ref).abs().max().item()


def make_inputs(B, T, V, dtype, seed=0, ignore=((0, 1),)):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    for b, t in ignore:
        labels[b, t] = IGNORE
    return x, labels


def upstream(B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, generator=g) for _ in range(3)]


@pytest.fixture
def poison(monkeypatch):
    """Launcher-allocated buffers start as NaN, so an element the kernels never write shows up."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(ts.torch, "empty", empty)


CASES = [  # (V, num_splits, block_v): V off the block, multi-tile loops, empty splits, the heuristics
    (1, 1, None),
    (1, 3, None),
    (37, 1, 16),
    (37, 3, 16),
    (1000, 1, 256),
    (3001, 3, 512),
    (3001, None, None),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V,num_splits,block_v", CASES)
def test_forward_matches_float64(poison, V, num_splits, block_v, dtype):
    B, T = 2, 4
    x, labels = make_inputs(B, T, V, dtype, ignore=((0, 1), (1, 3)))
    lp, ent, sc, lse = ts.token_stats_fwd_triton(x, labels, TEMP, IGNORE, True, True,
                                                 num_splits=num_splits, block_v=block_v)
    ref = ref_forward(x, labels)
    valid = labels != IGNORE
    for name, out, r in zip(("logprobs", "entropy", "self_certainty"), (lp, ent, sc), ref):
        assert out.shape == (B, T) and out.dtype == torch.float32, name
        assert torch.isfinite(out).all(), name  # every element written (poisoned NaN otherwise)
        assert rel_err(out, r) < FWD_TOL, (name, rel_err(out, r))
        assert (out[~valid] == 0).all(), name
    assert torch.isfinite(lse).all()
    assert rel_err(lse[valid], ref[3][valid]) < FWD_TOL


@pytest.mark.parametrize("num_splits", [1, 3])
def test_forward_flags_off(poison, num_splits):
    x, labels = make_inputs(2, 3, 300, torch.float32)
    ref = ref_forward(x, labels)
    lp, ent, sc, lse = ts.token_stats_fwd_triton(x, labels, TEMP, IGNORE, False, False,
                                                 num_splits=num_splits, block_v=64)
    assert ent.shape == (0,) and sc.shape == (0,)
    assert rel_err(lp, ref[0]) < FWD_TOL
    _, ent, sc, _ = ts.token_stats_fwd_triton(x, labels, TEMP, IGNORE, True, False,
                                              num_splits=num_splits, block_v=64)
    assert sc.shape == (0,) and rel_err(ent, ref[1]) < FWD_TOL
    _, ent, sc, _ = ts.token_stats_fwd_triton(x, labels, TEMP, IGNORE, False, True,
                                              num_splits=num_splits, block_v=64)
    assert ent.shape == (0,) and rel_err(sc, ref[2]) < FWD_TOL


@pytest.mark.parametrize("num_splits", [1, 3])
def test_forward_strided_rows(poison, num_splits):
    # logits[:, :-1] of a [B, T + 1, V] tensor: row stride != V, read in place
    full, labels = make_inputs(2, 4, 203, torch.bfloat16)
    x = full[:, :-1]
    labels = labels[:, 1:].contiguous().int()  # int32 labels too
    assert x.stride(1) == 203 and x.stride(0) == 4 * 203 and not x.is_contiguous()
    outs = ts.token_stats_fwd_triton(x, labels, TEMP, IGNORE, True, True, num_splits=num_splits, block_v=64)
    for out, r in zip(outs[:3], ref_forward(x, labels)):
        assert rel_err(out, r) < FWD_TOL


@pytest.mark.parametrize("num_splits", [1, 3])
def test_forward_masked_vocab(poison, num_splits):
    B, T, V = 2, 3, 100
    x, labels = make_inputs(B, T, V, torch.float32)
    x[0, 0, :48] = float("-inf")  # whole leading tiles (and splits) of -inf
    x[1, 2, 1::2] = float("-inf")  # scattered masking
    x[0, 2, 64:] = float("-inf")  # trailing tiles
    labels[0, 0], labels[1, 2], labels[0, 2] = 50, 4, 10
    lp, ent, sc, _ = ts.token_stats_fwd_triton(x, labels, TEMP, IGNORE, True, True,
                                               num_splits=num_splits, block_v=16)
    ref = ref_forward(x, labels)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert rel_err(lp, ref[0]) < FWD_TOL and rel_err(ent, ref[1]) < FWD_TOL
    # KL(U || p) is +inf once any p_v is 0; other rows stay finite and right
    masked = torch.zeros(B, T, dtype=torch.bool)
    masked[0, 0] = masked[1, 2] = masked[0, 2] = True
    assert torch.isposinf(sc[masked]).all() and torch.isposinf(ref[2][masked]).all()
    assert rel_err(sc[~masked], ref[2][~masked]) < FWD_TOL


@pytest.mark.parametrize("num_splits", [1, 3])
def test_forward_bad_labels_and_nan(poison, num_splits):
    x, labels = make_inputs(2, 3, 50, torch.float32)
    labels[0, 0] = 50  # == V
    labels[0, 2] = -1  # negative, not ignore_index
    x[1, 1, 7] = float("nan")
    outs = ts.token_stats_fwd_triton(x, labels, TEMP, IGNORE, True, True, num_splits=num_splits, block_v=16)
    ref = ref_forward(x, torch.where(labels == IGNORE, labels, labels.clamp(0, 49)))
    bad = torch.zeros(2, 3, dtype=torch.bool)
    bad[0, 0] = bad[0, 2] = bad[1, 1] = True
    for out, r in zip(outs[:3], ref):
        assert torch.isnan(out[bad]).all()
        assert rel_err(out[~bad], r[~bad]) < FWD_TOL


def test_forward_other_ignore_index(poison):
    # an ignore_index inside [0, V) is still ignored
    x, labels = make_inputs(1, 6, 40, torch.float32, ignore=())
    labels[0, :3] = 0
    lp, ent, sc, _ = ts.token_stats_fwd_triton(x, labels, TEMP, 0, True, True, block_v=16)
    ref = ref_forward(x, labels, ignore_index=0)
    for out, r in zip((lp, ent, sc), ref):
        assert (out[0, :3] == 0).all() and rel_err(out, r) < FWD_TOL


def test_rejects_float64():
    x, labels = make_inputs(1, 2, 10, torch.float64)
    with pytest.raises(TypeError):
        ts.token_stats_fwd_triton(x, labels, 1.0, IGNORE, True, True)


# --------------------------------------------------------------------------------------------------- backward
def _fwd_bwd(x, labels, grads, num_splits, block_v, out=None, temperature=TEMP, ignore_index=IGNORE):
    g_lp, g_h, g_sc = grads
    _, ent, _, lse = ts.token_stats_fwd_triton(x, labels, temperature, ignore_index, g_h is not None,
                                               g_sc is not None, num_splits=num_splits, block_v=block_v)
    if out is None:
        out = torch.full_like(x, float("nan"))
    ts.token_stats_bwd_triton(out, g_lp, g_h, g_sc, x, labels, lse, ent if g_h is not None else None,
                              temperature, ignore_index, num_splits=num_splits, block_v=block_v)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V,num_splits,block_v", CASES)
def test_backward_matches_float64(poison, V, num_splits, block_v, dtype):
    B, T = 2, 4
    x, labels = make_inputs(B, T, V, dtype, ignore=((0, 1), (1, 3)))
    grads = upstream(B, T)
    g = _fwd_bwd(x, labels, grads, num_splits, block_v)
    assert g.dtype == dtype and g.shape == x.shape
    assert torch.isfinite(g).all()  # poisoned NaN: every element written
    ref = ref_grad_autograd(x, labels, *grads)
    assert rel_err(g, ref) < GRAD_TOL[dtype], rel_err(g, ref)
    assert rel_err(g, ref_grad(x, labels, *grads)) < GRAD_TOL[dtype]
    ignored = labels == IGNORE
    assert (g[ignored] == 0).all()


@pytest.mark.parametrize("which", [(True, False, False), (False, True, False), (False, False, True),
                                   (True, False, True)])
def test_backward_partial_upstream(poison, which):
    B, T, V = 2, 3, 129
    x, labels = make_inputs(B, T, V, torch.float32)
    grads = [g if on else None for g, on in zip(upstream(B, T), which)]
    g = _fwd_bwd(x, labels, grads, 2, 32)
    assert rel_err(g, ref_grad_autograd(x, labels, *grads)) < GRAD_TOL[torch.float32]


@pytest.mark.parametrize("num_splits", [1, 3])
def test_backward_strided_rows(poison, num_splits):
    full, labels = make_inputs(2, 4, 203, torch.float32)
    x = full[:, :-1]
    labels = labels[:, 1:].contiguous()
    grads = upstream(2, 3)
    gfull = torch.full((2, 5, 203), float("nan"))
    out = gfull[:, 1:-1]  # strided output too
    _fwd_bwd(x, labels, grads, num_splits, 64, out=out)
    assert rel_err(out, ref_grad_autograd(x, labels, *grads)) < GRAD_TOL[torch.float32]
    assert torch.isnan(gfull[:, 0]).all() and torch.isnan(gfull[:, -1]).all()  # nothing outside the view


@pytest.mark.parametrize("num_splits", [1, 3])
def test_backward_masked_vocab(poison, num_splits):
    B, T, V = 2, 3, 100
    x, labels = make_inputs(B, T, V, torch.float32)
    x[0, 0, :48] = float("-inf")
    x[1, 2, 1::2] = float("-inf")
    labels[0, 0], labels[1, 2] = 50, 4
    grads = upstream(B, T)
    g = _fwd_bwd(x, labels, grads, num_splits, 16)
    assert torch.isfinite(g).all()
    assert rel_err(g, ref_grad(x, labels, *grads)) < GRAD_TOL[torch.float32]


@pytest.mark.parametrize("num_splits", [1, 3])
def test_backward_bad_label_is_nan(poison, num_splits):
    x, labels = make_inputs(2, 3, 50, torch.float32)
    labels[1, 0] = 1000
    grads = upstream(2, 3)
    g = _fwd_bwd(x, labels, grads, num_splits, 16)
    assert torch.isnan(g[1, 0]).all()
    ok = torch.ones(2, 3, dtype=torch.bool)
    ok[1, 0] = False
    ref = ref_grad_autograd(x, torch.where(labels == IGNORE, labels, labels.clamp(0, 49)), *grads)
    assert rel_err(g[ok], ref[ok]) < GRAD_TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_backward_in_place(poison, dtype, num_splits):
    full, labels = make_inputs(2, 4, 301, dtype)
    x = full[:, :-1]  # in place on a strided view
    labels = labels[:, 1:].contiguous().int()
    grads = upstream(2, 3)
    expected = _fwd_bwd(x, labels, grads, num_splits, 64)
    _, ent, _, lse = ts.token_stats_fwd_triton(x, labels, TEMP, IGNORE, True, True,
                                               num_splits=num_splits, block_v=64)
    last = full[:, -1].clone()
    ts.token_stats_bwd_triton(x, *grads, x, labels, lse, ent, TEMP, IGNORE, num_splits=num_splits, block_v=64)
    assert torch.equal(x, expected)
    assert torch.equal(full[:, -1], last)
