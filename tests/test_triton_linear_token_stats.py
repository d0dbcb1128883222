"""Kernel-level tests of the Triton linear_token_stats launchers, run on CPU tensors by the Triton interpreter.

Each case compares against the same math in float64 torch (logits = hidden @ weight.T + bias, materialised),
applied to the (already rounded) inputs, by relative norm error. Shapes are tiny and deliberately not multiples
of any block (N = 19 / block_m 16, V = 203 / block_n 32, H = 40 / block_k 16): the interpreter runs every
program in numpy.
"""
import math


import pytest
import torch

# conftest.py sets TRITON_INTERPRET=1 when there is no GPU; with one, the public-op tests (test_token_stats.py,
# test_linear_token_stats.py) run these kernels on CUDA tensors instead
if torch.cuda.is_available():
    pytest.skip("interpreter-only kernel tests (CPU tensors)", allow_module_level=True)

pytest.importorskip("triton")
lts = pytest.importorskip("hotloop.triton_kernels.linear_token_stats")

IGNORE = -100
TEMP = 0.7
N, H, V = 19, 40, 203
BLOCKS = dict(block_m=16, block_n=32, block_k=16)
FWD_TOL = 1e-5
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


# ------------------------------------------------------------------------------------------------- references
def ref_forward(hidden, weight, bias, labels, temperature=TEMP, ignore_index=IGNORE):
    """float64 (logprobs, entropy, self_certainty, lse) from materialised logits; ignored rows give 0.

    Ignored rows' hidden is zeroed first: the kernels never read it (it may hold NaN)."""
    valid = labels != ignore_index
    h = torch.where(valid[:, None], hidden.double(), 0.0)
    z = h @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = z / temperature
    lse = torch.logsumexp(z, -1)
    logp = z - lse[:, None]
    safe = torch.where(valid, labels, 0).long()
    lp = logp.gather(-1, safe[:, None])[:, 0]
    p = logp.exp()
    ent = -(p * logp).sum(-1)
    sc = -logp.mean(-1) - math.log(weight.shape[0])
    zero = torch.zeros((), dtype=torch.float64)
    return tuple(torch.where(valid, t, zero) for t in (lp, ent, sc, lse))


def ref_grads(hidden, weight, bias, labels, g_lp, g_h, g_sc, temperature=TEMP):
    """float64 (d_hidden, d_weight, d_bias) of sum(g * outputs) by autograd through the materialised logits."""
    hh = hidden.double().requires_grad_()
    ww = weight.double().requires_grad_()
    bb = None if bias is None else bias.double().requires_grad_()
    lp, ent, sc, _ = ref_forward(hh, ww, bb, labels, temperature)
    loss = sum((o * g.double()).sum() for o, g in ((lp, g_lp), (ent, g_h), (sc, g_sc)) if g is not None)
    loss.backward()
    return hh.grad, ww.grad, None if bb is None else bb.grad


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    den = ref.norm()
    return ((out - ref).norm() / den).item() if den > 0 else (out - ref).abs().max().item()


def make_inputs(dtype=torch.float32, has_bias=True, seed=0, n=N, ignore=(1, 7)):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.4).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.5).to(dtype) if has_bias else None
    labels = torch.randint(0, V, (n,), generator=g)
    for i in ignore:
        labels[i] = IGNORE
    return hidden, weight, bias, labels


def upstream(n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, generator=g) for _ in range(3))


def fwd(hidden, weight, bias, labels, entropy=True, self_certainty=True, **kw):
    kw = {**BLOCKS, **kw}
    return lts.linear_token_stats_fwd_triton(hidden, weight, bias, labels, TEMP, IGNORE, entropy, self_certainty,
                                             **kw)


def bwd(g_lp, g_h, g_sc, hidden, weight, bias, labels, need=(True, True, True), **kw):
    _, ent, _, lse = fwd(hidden, weight, bias, labels, entropy=True, self_certainty=False)
    kw = {**BLOCKS, **kw}
    return lts.linear_token_stats_bwd_triton(g_lp, g_h, g_sc, hidden, weight, bias, labels, lse,
                                             ent if g_h is not None else None, TEMP, IGNORE,
                                             need[0], need[1], need[2] and bias is not None, **kw)


# ---------------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_forward_matches_reference(dtype, has_bias, num_splits):
    hidden, weight, bias, labels = make_inputs(dtype, has_bias)
    out = fwd(hidden, weight, bias, labels, num_splits=num_splits)
    ref = ref_forward(hidden, weight, bias, labels)
    for name, o, r in zip(("logprobs", "entropy", "self_certainty", "lse"), out, ref):
        assert o.dtype == torch.float32 and o.shape == (N,), name
        assert rel_err(o, r) < FWD_TOL, (name, rel_err(o, r))
    ignored = labels == IGNORE
    for o in out:
        assert torch.equal(o[ignored], torch.zeros(int(ignored.sum())))


def test_forward_many_splits_merge_fewer_rows_a_program():
    """140 vocabulary splits: the merge takes 4 rows a program (BLOCK_S 256), not 16 (which spilled on GPU)."""
    g = torch.Generator().manual_seed(3)
    v, h = 2240, 16
    hidden, labels = torch.randn(N, h, generator=g), torch.randint(0, v, (N,), generator=g)
    weight, bias = torch.randn(v, h, generator=g) * 0.4, torch.randn(v, generator=g) * 0.5
    labels[4] = IGNORE
    out = fwd(hidden, weight, bias, labels, num_splits=140, block_n=16)
    for name, o, r in zip(("logprobs", "entropy", "self_certainty", "lse"), out,
                          ref_forward(hidden, weight, bias, labels)):
        assert rel_err(o, r) < FWD_TOL, (name, rel_err(o, r))


def test_forward_flags_off_give_empty_and_int32_labels():
    hidden, weight, bias, labels = make_inputs()
    lp, ent, sc, lse = fwd(hidden, weight, bias, labels.to(torch.int32), entropy=False, self_certainty=False)
    assert ent.shape == (0,) and sc.shape == (0,)
    ref = ref_forward(hidden, weight, bias, labels)
    assert rel_err(lp, ref[0]) < FWD_TOL and rel_err(lse, ref[3]) < FWD_TOL


def test_forward_default_blocks_and_row_stride():
    # hidden as a column slice of a wider buffer: row stride != H; default (heuristic) block sizes
    hidden, weight, bias, labels = make_inputs()
    wide = torch.randn(N, H + 9)
    wide[:, :H] = hidden
    out = lts.linear_token_stats_fwd_triton(wide[:, :H], weight, bias, labels, TEMP, IGNORE, True, True)
    ref = ref_forward(hidden, weight, bias, labels)
    for o, r in zip(out, ref):
        assert rel_err(o, r) < FWD_TOL


def test_ignored_rows_are_not_read():
    # ignored rows may hold garbage (NaN): outputs stay exact zeros there and every gradient stays finite
    hidden, weight, bias, labels = make_inputs()
    hidden[1] = float("nan")
    lp, ent, sc, lse = fwd(hidden, weight, bias, labels, num_splits=3)
    for o in (lp, ent, sc, lse):
        assert torch.isfinite(o).all() and o[1] == 0 and o[7] == 0
    g_lp, g_h, g_sc = upstream()
    dh, dw, db = bwd(g_lp, g_h, g_sc, hidden, weight, bias, labels)
    assert torch.isfinite(dh).all() and torch.isfinite(dw).all() and torch.isfinite(db).all()
    ref = ref_grads(hidden, weight, bias, labels, g_lp, g_h, g_sc)
    for o, r in zip((dh, dw, db), ref):
        assert rel_err(o, r) < GRAD_TOL[torch.float32]


@pytest.mark.parametrize("num_splits", [1, 3])
def test_out_of_range_label_gives_nan(num_splits):
    hidden, weight, bias, labels = make_inputs()
    labels[4] = V
    labels[9] = -5
    out = fwd(hidden, weight, bias, labels, num_splits=num_splits)
    ref = ref_forward(hidden, weight, bias, torch.where((labels == V) | (labels == -5), 0, labels))
    bad = torch.zeros(N, dtype=torch.bool)
    bad[[4, 9]] = True
    for o, r in zip(out, ref):
        assert torch.isnan(o[bad]).all()
        assert rel_err(o[~bad], r[~bad]) < FWD_TOL
    g_lp, _, _ = upstream()
    dh, _, _ = bwd(g_lp, None, None, hidden, weight, bias, labels, need=(True, False, False))
    assert torch.isnan(dh[bad]).all() and torch.isfinite(dh[~bad]).all()


def test_all_rows_ignored():
    hidden, weight, bias, labels = make_inputs(ignore=range(N))
    for o in fwd(hidden, weight, bias, labels, num_splits=3):
        assert torch.equal(o, torch.zeros(N))
    g_lp, g_h, g_sc = upstream()
    for g in bwd(g_lp, g_h, g_sc, hidden, weight, bias, labels):
        assert torch.equal(g, torch.zeros_like(g))


def test_poisoned_empty_leaves_no_unwritten_output(monkeypatch):
    # torch.empty returns NaN-filled memory: any output element the kernels forget to write shows as NaN
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    hidden, weight, bias, labels = make_inputs()
    for splits in (1, 3):
        for o in fwd(hidden, weight, bias, labels, num_splits=splits):
            assert torch.isfinite(o).all()
    g_lp, g_h, g_sc = upstream()
    for g in bwd(g_lp, g_h, g_sc, hidden, weight, bias, labels):
        assert torch.isfinite(g).all()


# --------------------------------------------------------------------------------------------------- backward
GRADS = {
    "lp": (True, False, False),
    "ent": (False, True, False),
    "sc": (False, False, True),
    "all": (True, True, True),
}


@pytest.mark.parametrize("which", list(GRADS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_matches_reference(which, dtype):
    hidden, weight, bias, labels = make_inputs(dtype, has_bias=True)
    g_lp, g_h, g_sc = (g if on else None for g, on in zip(upstream(), GRADS[which]))
    dh, dw, db = bwd(g_lp, g_h, g_sc, hidden, weight, bias, labels)
    ref = ref_grads(hidden, weight, bias, labels, g_lp, g_h, g_sc)
    for name, o, r, like in zip(("d_hidden", "d_weight", "d_bias"), (dh, dw, db), ref, (hidden, weight, bias)):
        assert o.dtype == like.dtype and o.shape == like.shape, name
        assert rel_err(o, r) < GRAD_TOL[dtype], (name, rel_err(o, r))
    assert torch.equal(dh[labels == IGNORE], torch.zeros_like(dh[labels == IGNORE]))


def test_backward_no_bias_and_need_flags():
    hidden, weight, _, labels = make_inputs(has_bias=False)
    g_lp, g_h, g_sc = upstream()
    ref = ref_grads(hidden, weight, None, labels, g_lp, g_h, g_sc)
    dh, dw, db = bwd(g_lp, g_h, g_sc, hidden, weight, None, labels)
    assert db.shape == (0,)
    assert rel_err(dh, ref[0]) < GRAD_TOL[torch.float32] and rel_err(dw, ref[1]) < GRAD_TOL[torch.float32]

    hidden, weight, bias, labels = make_inputs()
    ref = ref_grads(hidden, weight, bias, labels, g_lp, g_h, g_sc)
    dh, dw, db = bwd(g_lp, g_h, g_sc, hidden, weight, bias, labels, need=(False, True, False))
    assert dh.shape == (0,) and db.shape == (0,) and rel_err(dw, ref[1]) < GRAD_TOL[torch.float32]
    dh, dw, db = bwd(g_lp, g_h, g_sc, hidden, weight, bias, labels, need=(True, False, True))
    assert dw.shape == (0,)
    assert rel_err(dh, ref[0]) < GRAD_TOL[torch.float32] and rel_err(db, ref[2]) < GRAD_TOL[torch.float32]
    dh, dw, db = bwd(None, None, None, hidden, weight, bias, labels)
    for g in (dh, dw, db):
        assert torch.equal(g, torch.zeros_like(g))


def test_backward_default_blocks_row_stride_int32():
    hidden, weight, bias, labels = make_inputs()
    wide = torch.randn(N, H + 5)
    wide[:, :H] = hidden
    g_lp, g_h, g_sc = upstream()
    _, ent, _, lse = fwd(hidden, weight, bias, labels)
    out = lts.linear_token_stats_bwd_triton(g_lp, g_h, g_sc, wide[:, :H], weight, bias, labels.to(torch.int32),
                                            lse, ent, TEMP, IGNORE, True, True, True)
    ref = ref_grads(hidden, weight, bias, labels, g_lp, g_h, g_sc)
    for o, r in zip(out, ref):
        assert rel_err(o, r) < GRAD_TOL[torch.float32]


def test_gradient_filter():
    hidden, weight, bias, labels = make_inputs()
    g_lp, g_h, g_sc = upstream()
    exact = bwd(g_lp, g_h, g_sc, hidden, weight, bias, labels)
    tiny = bwd(g_lp, g_h, g_sc, hidden, weight, bias, labels, filter_eps=1e-30)
    for a, b in zip(exact, tiny):
        assert rel_err(b, a) < 1e-6
    # eps above every probability: only tiles holding a live row's label still run, so the d_weight / d_bias
    # entries of column tiles without any label are exactly 0 and the rest is a partial gradient
    _, d_w, d_b = bwd(g_lp, g_h, g_sc, hidden, weight, bias, labels, filter_eps=1e30)
    bn = BLOCKS["block_n"]
    live = labels[labels != IGNORE]
    label_tiles = torch.zeros(math.ceil(V / bn), dtype=torch.bool)
    label_tiles[live // bn] = True
    dead = ~label_tiles.repeat_interleave(bn)[:V]
    assert dead.any() and torch.equal(d_w[dead], torch.zeros_like(d_w[dead])) and torch.all(d_b[dead] == 0)
    assert rel_err(d_w, exact[1]) > 1e-3


# ----------------------------------------------------------------------------------------------------- errors
def test_errors_name_the_argument():
    hidden, weight, bias, labels = make_inputs()
    f = lts.linear_token_stats_fwd_triton
    with pytest.raises(TypeError, match="hidden"):
        f(hidden.double(), weight.double(), None, labels, TEMP, IGNORE, True, False)
    with pytest.raises(TypeError, match="weight"):
        f(hidden, weight.bfloat16(), None, labels, TEMP, IGNORE, True, False)
    with pytest.raises(TypeError, match="bias"):
        f(hidden, weight, bias.half(), labels, TEMP, IGNORE, True, False)
    with pytest.raises(ValueError, match="weight"):
        f(hidden, weight[:, :-1], None, labels, TEMP, IGNORE, True, False)
    with pytest.raises(ValueError, match="bias"):
        f(hidden, weight, bias[:-1], labels, TEMP, IGNORE, True, False)
    with pytest.raises(ValueError, match="labels"):
        f(hidden, weight, bias, labels[:-1], TEMP, IGNORE, True, False)
    with pytest.raises(TypeError, match="labels"):
        f(hidden, weight, bias, labels.float(), TEMP, IGNORE, True, False)
    _, ent, _, lse = f(hidden, weight, bias, labels, TEMP, IGNORE, True, False, **BLOCKS)
    with pytest.raises(ValueError, match="entropy"):
        lts.linear_token_stats_bwd_triton(None, torch.ones(N), None, hidden, weight, bias, labels, lse, None,
                                          TEMP, IGNORE, True, True, True)
    with pytest.raises(ValueError, match="grad_logprobs"):
        lts.linear_token_stats_bwd_triton(torch.ones(N + 1), None, None, hidden, weight, bias, labels, lse, None,
                                          TEMP, IGNORE, True, True, True)
