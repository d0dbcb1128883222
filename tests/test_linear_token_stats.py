"""linear_token_stats: values and gradients (hidden, weight, bias) of every backend against float64 (docs/linear_token_stats.md)."""
import pytest
import torch

import hotloop
import hotloop.cpu.tile_engine as tile_engine
from hotloop.reference import linear_token_stats_ref

from helpers import HAS_CUDA, HAS_TRITON, device_for, interpreted, random_labels, rel_err

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


def test_grad_filter_eps_must_be_positive():
    h, w, b, labels = _peaked(4, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="`grad_filter_eps` must be a finite number > 0"):
        hotloop.linear_token_stats(h, w, labels, grad_filter_eps=-1.0)
