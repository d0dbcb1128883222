"""linear_token_stats / linear_token_logprobs (docs/linear_token_stats.md): every test of the op, in sections.

- Reference and backends: values and gradients (hidden, weight, bias) of every backend against float64.
- Errors: bad input is rejected with an error that names the argument.
- Compile and opcheck: torch.compile(fullgraph=True) and the custom op's registration.
- Triton kernels: the linear_token_stats launchers at kernel level, run on CPU tensors by the Triton interpreter,
  each case against the same math in float64 torch (logits = hidden @ weight.T + bias, materialised) applied to the
  (already rounded) inputs, by relative norm error. Skipped with a GPU (the backend tests run these kernels on CUDA
  tensors there) and without triton; the rest of the file runs either way.
"""
import math

import pytest
import torch

import hotloop
import hotloop.cpu.tile_engine as tile_engine
from hotloop.reference import linear_token_stats_ref

from helpers import (HAS_CUDA, HAS_TRITON, LazyModule, device_for, interpreted, random_labels, rel_err,
                     triton_interpreter_only)

# imported inside the Triton kernel tests, never at collection (no triton: those tests skip, the others run)
lts = LazyModule("hotloop.triton_kernels.linear_token_stats")


# =====================================================================================================================
# reference and backends: values and gradients of every backend against float64
# =====================================================================================================================
BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("cpu", id="cpu"),
    pytest.param("triton", id="triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")),
]
# bf16 logits are rounded to bf16 by the matmul in every path that forms them (as F.linear does): the error
# against float64 is that rounding, not the kernels' arithmetic
FWD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12}
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float64: 1e-12}


def shapes_for(backend):
    # H and V multiples of no block size; GPT-2's V on the fast backends
    if interpreted(backend):
        return [(19, 40, 203)]
    return [(37, 200, 1003), (64, 200, 50257)]


def run(backend, monkeypatch, N, H, V, dtype, *, bias=True, temperature=1.0, grads=(1.0, 0.5, 0.3), lead=None):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    device = device_for(backend)
    lead = lead or (N,)
    make = lambda *s, scale=1.0: (torch.randn(*s, dtype=torch.float64) * scale).to(dtype).to(device)  # noqa: E731
    hidden = make(*lead, H).requires_grad_()
    weight = make(V, H, scale=H ** -0.5 * 3).requires_grad_()
    b = make(V).requires_grad_() if bias else None
    labels = random_labels(lead, V, device)
    out = hotloop.linear_token_stats(hidden, weight, labels, bias=b, temperature=temperature, self_certainty=True)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    ref = linear_token_stats_ref(leaves[0], leaves[1], labels.cpu(), leaves[2] if bias else None, temperature,
                                 -100, True, True)
    for name, o, r in zip(("logprobs", "entropy", "self_certainty"), out, ref):
        assert o.shape == labels.shape
        assert rel_err(o, r) < FWD_TOL[dtype], f"{name}: {rel_err(o, r):.2e}"
    weights = [torch.randn(lead, dtype=torch.float64) * g for g in grads]
    sum((o * w.to(o.dtype).to(device)).sum() for o, w in zip(out, weights) if w.abs().sum() > 0).backward()
    sum((r * w).sum() for r, w in zip(ref, weights) if w.abs().sum() > 0).backward()
    ignored = (labels == -100).cpu()
    for name, t, r in zip(("hidden", "weight", "bias"), (hidden, weight, b), leaves):
        assert t.grad.dtype == dtype and t.grad.shape == t.shape
        assert rel_err(t.grad, r.grad) < GRAD_TOL[dtype], f"d{name}: {rel_err(t.grad, r.grad):.2e}"
    assert torch.all(hidden.grad.cpu()[ignored] == 0)
    return hidden, weight, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_matches_float64_reference(backend, dtype, bias, monkeypatch):
    for N, H, V in shapes_for(backend):
        run(backend, monkeypatch, N, H, V, dtype, bias=bias, temperature=0.8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grads", [(1, 0, 0), (0, 1, 0), (0, 0, 1)], ids=["logprobs", "entropy", "self_certainty"])
def test_gradient_of_each_output(backend, grads, monkeypatch):
    N, H, V = shapes_for(backend)[0]
    run(backend, monkeypatch, N, H, V, torch.float32, grads=grads)


def test_float64_on_cpu(monkeypatch):
    run("cpu", monkeypatch, 21, 30, 300, torch.float64, temperature=1.3)


@pytest.mark.parametrize("budget", [1 << 10, 40 << 10, 1 << 20])
def test_cpu_blocking(budget, monkeypatch):
    """Token chunks, vocabulary blocks and both at once give the same answer as one big block."""
    monkeypatch.setattr(tile_engine, "BLOCK_BYTES", budget)
    run("cpu", monkeypatch, 150, 48, 3001, torch.float32, temperature=0.9)
    run("cpu", monkeypatch, 150, 48, 3001, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_shared_weight(backend, monkeypatch):
    """[B, T, H] hidden; a weight used by two calls (tied embeddings / policy + reference) accumulates its grad."""
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    device = device_for(backend)
    N, H, V = shapes_for(backend)[0]
    weight = (torch.randn(V, H) * 0.2).to(device).requires_grad_()
    h1 = torch.randn(2, 3, H, device=device, requires_grad=True)
    h2 = torch.randn(4, H, device=device, requires_grad=True)
    l1, l2 = random_labels((2, 3), V, device), random_labels((4,), V, device)
    loss = hotloop.linear_token_logprobs(h1, weight, l1).sum() + hotloop.linear_token_stats(h2, weight, l2).entropy.sum()
    loss.backward()
    w = weight.detach().double().cpu().requires_grad_()
    ref = linear_token_stats_ref(h1.detach().double().cpu(), w, l1.cpu())[0].sum() + \
        linear_token_stats_ref(h2.detach().double().cpu(), w, l2.cpu())[1].sum()
    ref.backward()
    assert rel_err(weight.grad, w.grad) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_hidden_in_ignored_rows_stays_out(backend, monkeypatch):
    """Padding rows may hold garbage hidden states: they must not reach d_weight (0 * NaN) or any output."""
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    device = device_for(backend)
    N, H, V = shapes_for(backend)[0]
    hidden = torch.randn(N, H, device=device)
    hidden[2] = float("nan")
    labels = random_labels((N,), V, device, frac_ignored=0.0)
    labels[2] = -100
    x, w = hidden.clone().requires_grad_(), (torch.randn(V, H, device=device) * 0.2).requires_grad_()
    out = hotloop.linear_token_stats(x, w, labels, self_certainty=True)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    for t in (*out, w.grad):
        assert torch.isfinite(t).all()
    assert torch.isfinite(x.grad[labels != -100]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    device = device_for(backend)
    x, w = torch.randn(5, 16, device=device, requires_grad=True), torch.randn(40, 16, device=device, requires_grad=True)
    out = hotloop.linear_token_stats(x, w, torch.full((5,), -100, device=device), self_certainty=True)
    (out.logprobs.sum() + out.entropy.sum() + out.self_certainty.sum()).backward()
    for t in (*out, x.grad, w.grad):
        assert torch.all(t == 0)


def test_float16_on_cpu(monkeypatch):
    monkeypatch.setattr(tile_engine, "BLOCK_BYTES", 1 << 12)
    for key in (FWD_TOL, GRAD_TOL):
        monkeypatch.setitem(key, torch.float16, key[torch.bfloat16])
    run("cpu", monkeypatch, 33, 40, 500, torch.float16)


def test_only_some_inputs_need_grad(monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", "cpu")
    hidden, weight = torch.randn(9, 16, requires_grad=True), torch.randn(70, 16)
    hotloop.linear_token_logprobs(hidden, weight, torch.randint(0, 70, (9,))).sum().backward()
    assert hidden.grad is not None and weight.grad is None
    frozen_h, trained_w = torch.randn(9, 16), torch.randn(70, 16, requires_grad=True)
    hotloop.linear_token_logprobs(frozen_h, trained_w, torch.randint(0, 70, (9,))).sum().backward()
    assert trained_w.grad is not None


def test_empty_input(monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", "cpu")
    hidden, weight = torch.randn(0, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    out = hotloop.linear_token_stats(hidden, weight, torch.zeros(0, dtype=torch.long))
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert out.logprobs.shape == (0,) and torch.all(weight.grad == 0)


def _peaked(N, H, V, dtype):
    """LM-like inputs: hidden states aligned with their label's weight row and a Zipf bias, so the softmax is
    peaked (p(label) ~ 0.3, entropy ~ 2.7 nats) and most of its gradient is tiny."""
    w = torch.randn(V, H, dtype=torch.float64) / H ** 0.5
    labels = torch.randint(0, V, (N,))
    h = torch.randn(N, H, dtype=torch.float64) * 0.5 + 14 * w[labels] / w[labels].norm(dim=1, keepdim=True)
    b = -1.5 * torch.log(torch.arange(1, V + 1, dtype=torch.float64))
    return h.to(dtype), w.to(dtype), b.to(dtype), labels


def _grads(h, w, b, labels, **kw):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    st = hotloop.linear_token_stats(h, w, labels, bias=b, **kw)
    (st.logprobs.sum() + st.entropy.sum()).backward()
    return h.grad.double(), w.grad.double()


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.skipif(
    HAS_CUDA, reason="interpreter test"))])
def test_grad_filter_is_a_bounded_approximation(monkeypatch, backend):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    N, H, V = (16, 32, 3000) if backend == "triton" else (256, 64, 4000)  # many label-free tiles
    h, w, b, labels = _peaked(N, H, V, torch.float32)
    exact = _grads(h, w, b, labels)
    small = _grads(h, w, b, labels, grad_filter_eps=2.0 ** -16)
    large = _grads(h, w, b, labels, grad_filter_eps=0.5)
    for e, s, big in zip(exact, small, large):
        assert rel_err(s, e) < 1e-2          # what the README documents for eps up to 2^-12 on such inputs
        assert rel_err(big, e) > rel_err(s, e)  # the filter does act: a huge eps drops real gradient


# =====================================================================================================================
# errors: bad input is rejected with an error that names the argument
# =====================================================================================================================
@pytest.mark.parametrize("make, error, match", [
    (lambda: (torch.randn(3, 8), torch.randn(10, 7), None, torch.zeros(3, dtype=torch.long)), ValueError,
     r"`weight` must be \[V, H\] with V >= 1 and H = hidden.shape\[-1\] = 8"),
    (lambda: (torch.randn(3, 8), torch.randn(10, 8), torch.randn(9), torch.zeros(3, dtype=torch.long)), ValueError,
     r"`bias` must be \[V\] = \[10\]"),
    (lambda: (torch.randn(3, 8), torch.randn(10, 8).bfloat16(), None, torch.zeros(3, dtype=torch.long)), TypeError,
     "`weight` must have hidden's dtype"),
    (lambda: (torch.randn(3, 8), torch.randn(10, 8), torch.randn(10).double(), torch.zeros(3, dtype=torch.long)),
     TypeError, "`bias` must have dtype"),
    (lambda: (torch.randn(3, 8), torch.randn(10, 8, device="meta"), None, torch.zeros(3, dtype=torch.long)),
     ValueError, "`weight` is on meta"),
    (lambda: (torch.randn(3, 8), torch.randn(10, 8), None, torch.zeros(4, dtype=torch.long)), ValueError,
     "leading shape"),
    (lambda: (torch.randn(3, 8), torch.randn(10, 8), None, torch.full((3,), 10)), ValueError,
     r"`labels` must lie in \[0, 10\)"),
    (lambda: (torch.randn(3, 8), torch.randn(10, 8), None, torch.zeros(3)), TypeError, "`labels` must have dtype"),
    (lambda: (torch.randn(3, 0), torch.randn(10, 0), None, torch.zeros(3, dtype=torch.long)), ValueError,
     "empty hidden dim"),
])
def test_bad_arguments(make, error, match):
    hidden, weight, bias, labels = make()
    with pytest.raises(error, match=match):
        hotloop.linear_token_stats(hidden, weight, labels, bias=bias)


def test_grad_filter_eps_must_be_positive():
    h, w, b, labels = _peaked(4, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="`grad_filter_eps` must be a finite number > 0"):
        hotloop.linear_token_stats(h, w, labels, grad_filter_eps=-1.0)


# =====================================================================================================================
# compile and opcheck
# =====================================================================================================================
def test_compile_fullgraph(monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", "cpu")
    torch._dynamo.reset()

    def loss(h, w, b, labels):
        out = hotloop.linear_token_stats(h, w, labels, bias=b, temperature=0.7)
        return out.logprobs.sum() + 0.1 * out.entropy.sum()

    h, w, b = torch.randn(6, 24), torch.randn(101, 24), torch.randn(101)
    labels = torch.randint(0, 101, (6,))
    args_e = [t.clone().requires_grad_() for t in (h, w, b)]
    args_c = [t.clone().requires_grad_() for t in (h, w, b)]
    loss(*args_e, labels).backward()
    torch.compile(loss, fullgraph=True)(*args_c, labels).backward()
    for e, c in zip(args_e, args_c):
        assert rel_err(c.grad, e.grad) < 1e-6


def test_opcheck():
    h, w, b = torch.randn(5, 12, requires_grad=True), torch.randn(33, 12, requires_grad=True), torch.randn(33)
    labels = torch.randint(0, 33, (5,))
    torch.library.opcheck(torch.ops.hotloop.linear_token_stats_fwd.default,
                          (h, w, b, labels, 0.9, -100, True, False, 0.0))
    torch.library.opcheck(torch.ops.hotloop.linear_token_stats_fwd.default,
                          (h, w, None, labels, 1.0, -100, False, True, 0.0))


# =====================================================================================================================
# Triton kernels: the launchers on CPU tensors (the interpreter)
# conftest.py sets TRITON_INTERPRET=1 when there is no GPU; with one, the backend tests above run these kernels
# on CUDA tensors instead, and these are skipped (triton_interpreter_only, as they are without triton).
# Each case compares against the same math in float64 torch (logits = hidden @ weight.T + bias, materialised),
# applied to the (already rounded) inputs, by relative norm error. Shapes are tiny and deliberately not
# multiples of any block (N = 19 / block_m 16, V = 203 / block_n 32, H = 40 / block_k 16): the interpreter
# runs every program in numpy.
# =====================================================================================================================
IGNORE = -100
TEMP = 0.7
N, H, V = 19, 40, 203
BLOCKS = dict(block_m=16, block_n=32, block_k=16)
TRITON_FWD_TOL = 1e-5
TRITON_GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


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


def triton_rel_err(out, ref):
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
@triton_interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_forward_matches_reference(dtype, has_bias, num_splits):
    hidden, weight, bias, labels = make_inputs(dtype, has_bias)
    out = fwd(hidden, weight, bias, labels, num_splits=num_splits)
    ref = ref_forward(hidden, weight, bias, labels)
    for name, o, r in zip(("logprobs", "entropy", "self_certainty", "lse"), out, ref):
        assert o.dtype == torch.float32 and o.shape == (N,), name
        assert triton_rel_err(o, r) < TRITON_FWD_TOL, (name, triton_rel_err(o, r))
    ignored = labels == IGNORE
    for o in out:
        assert torch.equal(o[ignored], torch.zeros(int(ignored.sum())))


@triton_interpreter_only
def test_triton_forward_many_splits_merge_fewer_rows_a_program():
    """140 vocabulary splits: the merge takes 4 rows a program (BLOCK_S 256), not 16 (which spilled on GPU)."""
    g = torch.Generator().manual_seed(3)
    v, h = 2240, 16
    hidden, labels = torch.randn(N, h, generator=g), torch.randint(0, v, (N,), generator=g)
    weight, bias = torch.randn(v, h, generator=g) * 0.4, torch.randn(v, generator=g) * 0.5
    labels[4] = IGNORE
    out = fwd(hidden, weight, bias, labels, num_splits=140, block_n=16)
    for name, o, r in zip(("logprobs", "entropy", "self_certainty", "lse"), out,
                          ref_forward(hidden, weight, bias, labels)):
        assert triton_rel_err(o, r) < TRITON_FWD_TOL, (name, triton_rel_err(o, r))


@triton_interpreter_only
def test_triton_forward_flags_off_give_empty_and_int32_labels():
    hidden, weight, bias, labels = make_inputs()
    lp, ent, sc, lse = fwd(hidden, weight, bias, labels.to(torch.int32), entropy=False, self_certainty=False)
    assert ent.shape == (0,) and sc.shape == (0,)
    ref = ref_forward(hidden, weight, bias, labels)
    assert triton_rel_err(lp, ref[0]) < TRITON_FWD_TOL and triton_rel_err(lse, ref[3]) < TRITON_FWD_TOL


@triton_interpreter_only
def test_triton_forward_default_blocks_and_row_stride():
    # hidden as a column slice of a wider buffer: row stride != H; default (heuristic) block sizes
    hidden, weight, bias, labels = make_inputs()
    wide = torch.randn(N, H + 9)
    wide[:, :H] = hidden
    out = lts.linear_token_stats_fwd_triton(wide[:, :H], weight, bias, labels, TEMP, IGNORE, True, True)
    ref = ref_forward(hidden, weight, bias, labels)
    for o, r in zip(out, ref):
        assert triton_rel_err(o, r) < TRITON_FWD_TOL


@triton_interpreter_only
def test_triton_ignored_rows_are_not_read():
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
        assert triton_rel_err(o, r) < TRITON_GRAD_TOL[torch.float32]


@triton_interpreter_only
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_out_of_range_label_gives_nan(num_splits):
    hidden, weight, bias, labels = make_inputs()
    labels[4] = V
    labels[9] = -5
    out = fwd(hidden, weight, bias, labels, num_splits=num_splits)
    ref = ref_forward(hidden, weight, bias, torch.where((labels == V) | (labels == -5), 0, labels))
    bad = torch.zeros(N, dtype=torch.bool)
    bad[[4, 9]] = True
    for o, r in zip(out, ref):
        assert torch.isnan(o[bad]).all()
        assert triton_rel_err(o[~bad], r[~bad]) < TRITON_FWD_TOL
    g_lp, _, _ = upstream()
    dh, _, _ = bwd(g_lp, None, None, hidden, weight, bias, labels, need=(True, False, False))
    assert torch.isnan(dh[bad]).all() and torch.isfinite(dh[~bad]).all()


@triton_interpreter_only
def test_triton_all_rows_ignored():
    hidden, weight, bias, labels = make_inputs(ignore=range(N))
    for o in fwd(hidden, weight, bias, labels, num_splits=3):
        assert torch.equal(o, torch.zeros(N))
    g_lp, g_h, g_sc = upstream()
    for g in bwd(g_lp, g_h, g_sc, hidden, weight, bias, labels):
        assert torch.equal(g, torch.zeros_like(g))


@triton_interpreter_only
def test_triton_poisoned_empty_leaves_no_unwritten_output(monkeypatch):
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


@triton_interpreter_only
@pytest.mark.parametrize("which", list(GRADS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_backward_matches_reference(which, dtype):
    hidden, weight, bias, labels = make_inputs(dtype, has_bias=True)
    g_lp, g_h, g_sc = (g if on else None for g, on in zip(upstream(), GRADS[which]))
    dh, dw, db = bwd(g_lp, g_h, g_sc, hidden, weight, bias, labels)
    ref = ref_grads(hidden, weight, bias, labels, g_lp, g_h, g_sc)
    for name, o, r, like in zip(("d_hidden", "d_weight", "d_bias"), (dh, dw, db), ref, (hidden, weight, bias)):
        assert o.dtype == like.dtype and o.shape == like.shape, name
        assert triton_rel_err(o, r) < TRITON_GRAD_TOL[dtype], (name, triton_rel_err(o, r))
    assert torch.equal(dh[labels == IGNORE], torch.zeros_like(dh[labels == IGNORE]))


@triton_interpreter_only
def test_triton_backward_no_bias_and_need_flags():
    hidden, weight, _, labels = make_inputs(has_bias=False)
    g_lp, g_h, g_sc = upstream()
    ref = ref_grads(hidden, weight, None, labels, g_lp, g_h, g_sc)
    dh, dw, db = bwd(g_lp, g_h, g_sc, hidden, weight, None, labels)
    assert db.shape == (0,)
    assert triton_rel_err(dh, ref[0]) < TRITON_GRAD_TOL[torch.float32] and triton_rel_err(dw, ref[1]) < TRITON_GRAD_TOL[torch.float32]

    hidden, weight, bias, labels = make_inputs()
    ref = ref_grads(hidden, weight, bias, labels, g_lp, g_h, g_sc)
    dh, dw, db = bwd(g_lp, g_h, g_sc, hidden, weight, bias, labels, need=(False, True, False))
    assert dh.shape == (0,) and db.shape == (0,) and triton_rel_err(dw, ref[1]) < TRITON_GRAD_TOL[torch.float32]
    dh, dw, db = bwd(g_lp, g_h, g_sc, hidden, weight, bias, labels, need=(True, False, True))
    assert dw.shape == (0,)
    assert triton_rel_err(dh, ref[0]) < TRITON_GRAD_TOL[torch.float32] and triton_rel_err(db, ref[2]) < TRITON_GRAD_TOL[torch.float32]
    dh, dw, db = bwd(None, None, None, hidden, weight, bias, labels)
    for g in (dh, dw, db):
        assert torch.equal(g, torch.zeros_like(g))


@triton_interpreter_only
def test_triton_backward_default_blocks_row_stride_int32():
    hidden, weight, bias, labels = make_inputs()
    wide = torch.randn(N, H + 5)
    wide[:, :H] = hidden
    g_lp, g_h, g_sc = upstream()
    _, ent, _, lse = fwd(hidden, weight, bias, labels)
    out = lts.linear_token_stats_bwd_triton(g_lp, g_h, g_sc, wide[:, :H], weight, bias, labels.to(torch.int32),
                                            lse, ent, TEMP, IGNORE, True, True, True)
    ref = ref_grads(hidden, weight, bias, labels, g_lp, g_h, g_sc)
    for o, r in zip(out, ref):
        assert triton_rel_err(o, r) < TRITON_GRAD_TOL[torch.float32]


@triton_interpreter_only
def test_triton_gradient_filter():
    hidden, weight, bias, labels = make_inputs()
    g_lp, g_h, g_sc = upstream()
    exact = bwd(g_lp, g_h, g_sc, hidden, weight, bias, labels)
    tiny = bwd(g_lp, g_h, g_sc, hidden, weight, bias, labels, filter_eps=1e-30)
    for a, b in zip(exact, tiny):
        assert triton_rel_err(b, a) < 1e-6
    # eps above every probability: only tiles holding a live row's label still run, so the d_weight / d_bias
    # entries of column tiles without any label are exactly 0 and the rest is a partial gradient
    _, d_w, d_b = bwd(g_lp, g_h, g_sc, hidden, weight, bias, labels, filter_eps=1e30)
    bn = BLOCKS["block_n"]
    live = labels[labels != IGNORE]
    label_tiles = torch.zeros(math.ceil(V / bn), dtype=torch.bool)
    label_tiles[live // bn] = True
    dead = ~label_tiles.repeat_interleave(bn)[:V]
    assert dead.any() and torch.equal(d_w[dead], torch.zeros_like(d_w[dead])) and torch.all(d_b[dead] == 0)
    assert triton_rel_err(d_w, exact[1]) > 1e-3


# ----------------------------------------------------------------------------------------------------- errors
@triton_interpreter_only
def test_triton_errors_name_the_argument():
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
