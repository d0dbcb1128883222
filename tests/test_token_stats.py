"""token_stats / token_logprobs: values and gradients of every backend against the float64 reference (docs/token_stats.md)."""
import math

import pytest
import torch

import hotloop
from hotloop.reference import token_stats_ref

from helpers import (BACKENDS, FWD_TOL, GRAD_TOL, device_for, interpreted, random_labels, random_logits,
                     rel_err)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (leading shape, V): V = 1, V not a multiple of any block, GPT-2's 50257, Qwen's 152064 (one long row per
# thread exercises the vocabulary split of the CPU kernel)
SHAPES = [((4, 9), 37), ((3,), 1), ((2, 3), 1000), ((2, 5), 50257), ((2,), 152064)]
SMALL_SHAPES = [((2, 3), 37), ((3,), 1), ((1, 4), 300)]  # the Triton interpreter runs ~0.4 ms per program


def shapes_for(backend):
    return SMALL_SHAPES if interpreted(backend) else SHAPES


def float64_reference(logits, labels, temperature, ignore_index, weights):
    """Outputs and d(weighted sum)/d logits of the reference in float64 on the same (rounded) inputs."""
    x = logits.detach().cpu().double().requires_grad_()
    outs = token_stats_ref(x, labels.cpu(), temperature, ignore_index, True, True)
    loss = sum((o * w.cpu().double()).sum() for o, w in zip(outs, weights) if w is not None)
    loss.backward()
    return outs, x.grad


def check_against_reference(backend, monkeypatch, lead, V, dtype, temperature=1.0, ignore_index=-100,
                            grads=(True, True, True), label_dtype=torch.int64, make_logits=None):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    device = device_for(backend)
    logits = make_logits() if make_logits else random_logits((*lead, V), dtype, device)
    labels = random_labels(lead, V, device, ignore_index, dtype=label_dtype)
    weights = [torch.randn(lead, device=device) if g else None for g in grads]
    x = logits.detach().requires_grad_()
    out = hotloop.token_stats(x, labels, temperature=temperature, ignore_index=ignore_index, self_certainty=True)
    ref, ref_grad = float64_reference(logits, labels, temperature, ignore_index, weights)
    tol, grad_tol = FWD_TOL[dtype], GRAD_TOL[dtype]
    if backend == "reference" and dtype != torch.float64:
        # plain torch sums V float32 terms in an order set by the CPU's vector width, so its error grows with V
        # (the kernels' does not): on an AVX2 CPU at V = 152064, up to 1.8e-5 forward and 1.6e-4 gradient (2.6e-6
        # / 2e-5 at 50257); allowed 5e-10 V and 4e-9 V, ~4x that
        tol, grad_tol = max(tol, 5e-10 * V), max(grad_tol, 4e-9 * V)
    for name, o, r in zip(("logprobs", "entropy", "self_certainty"), out, ref):
        assert o.shape == labels.shape and o.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert rel_err(o, r) < tol, f"{name}: {rel_err(o, r):.2e}"
    ignored = labels == ignore_index
    for o in out:
        assert torch.all(o[ignored] == 0)
    loss = sum((o * w).sum() for o, w in zip(out, weights) if w is not None)
    loss.backward()
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    assert rel_err(x.grad, ref_grad) < grad_tol, f"grad: {rel_err(x.grad, ref_grad):.2e}"
    assert torch.all(x.grad[ignored] == 0)
    return out, x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_reference(backend, dtype, monkeypatch):
    for lead, V in shapes_for(backend):
        check_against_reference(backend, monkeypatch, lead, V, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_temperature(backend, temperature, monkeypatch):
    lead, V = shapes_for(backend)[-1]
    check_against_reference(backend, monkeypatch, lead, V, torch.float32, temperature=temperature)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grads", [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["logprobs", "entropy", "self_certainty"])
def test_gradient_of_each_output(backend, grads, monkeypatch):
    lead, V = shapes_for(backend)[0]
    check_against_reference(backend, monkeypatch, lead, V, torch.float32, grads=grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_and_int32_labels(backend, monkeypatch):
    lead, V = shapes_for(backend)[0]
    check_against_reference(backend, monkeypatch, lead, V, torch.float32, ignore_index=-1, label_dtype=torch.int32)


def test_float64_on_cpu(monkeypatch):
    for lead, V in SHAPES[:3]:
        check_against_reference("cpu", monkeypatch, lead, V, torch.float64, temperature=0.8)


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_cpu_instruction_set(isa, dtype, monkeypatch):
    monkeypatch.setenv("HOTLOOP_CPU_ISA", isa)  # lowered to what the CPU has, never raised
    for lead, V in [((3, 5), 1000), ((1,), 20000)]:
        check_against_reference("cpu", monkeypatch, lead, V, dtype, temperature=0.9)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_threads_and_vocab_split(threads, monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for lead, V in [((1,), 152064), ((2,), 50257), ((5,), 3)]:
            check_against_reference("cpu", monkeypatch, lead, V, torch.float32)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views(backend, monkeypatch):
    V = 37 if interpreted(backend) else 1000
    base = random_logits((3, 5, V), torch.float32, device_for(backend))
    # logits[:, :-1]: row stride != V; read in place (no copy)
    check_against_reference(backend, monkeypatch, (3, 4), V, torch.float32, make_logits=lambda: base[:, :-1])
    # three leading strides that no two-level view covers: copied, same answer
    base4 = random_logits((2, 3, 4, V), torch.float32, device_for(backend))
    check_against_reference(backend, monkeypatch, (2, 2, 3), V, torch.float32,
                            make_logits=lambda: base4[:, :-1, :-1])
    # vocabulary dim with stride 2
    wide = random_logits((3, 2 * V), torch.float32, device_for(backend))
    check_against_reference(backend, monkeypatch, (3,), V, torch.float32, make_logits=lambda: wide[:, ::2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_backward(backend, dtype, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    device = device_for(backend)
    V = 37 if interpreted(backend) else 5000
    base = random_logits((2, 4, V), dtype, device)
    labels = random_labels((2, 3), V, device)
    w = torch.randn(2, 3, device=device)

    def grad_of(inplace):
        src = base.clone().requires_grad_()
        logits = src * 1  # a non-leaf, as logits from an lm_head are
        view = logits[:, :-1]
        seen = []
        view.register_hook(lambda g: seen.append(g))  # the gradient as it flows, not a retained copy
        out = hotloop.token_stats(view, labels, inplace_backward=inplace)
        ((out.logprobs + out.entropy) * w).sum().backward()
        return seen[0], logits

    g_ref, _ = grad_of(False)
    g_in, logits = grad_of(True)
    assert torch.equal(g_in, g_ref)
    if backend != "reference":  # the reference has no in-place path
        assert g_in.data_ptr() == logits.data_ptr(), "the gradient must live in the logits' storage"


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_with_rows_sharing_memory(backend, monkeypatch):
    """Expanded logits (stride 0): every row would write one storage, so the gradient is computed out of place."""
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    device = device_for(backend)
    V = 37
    src = random_logits((1, 1, V), torch.float32, device).requires_grad_()
    labels = random_labels((4, 1), V, device, frac_ignored=0.0)
    grads = []
    for inplace in (False, True):
        src.grad = None
        hotloop.token_stats((src * 1).expand(4, 1, V), labels,
                            inplace_backward=inplace).logprobs.sum().backward()
        grads.append(src.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_compile_with_inplace_backward(monkeypatch):
    torch._dynamo.reset()
    labels = random_labels((3, 4), 50, "cpu")
    fn = lambda x: hotloop.token_stats(x * 1, labels, inplace_backward=True).logprobs.sum()  # noqa: E731
    x_e, x_c = [random_logits((3, 4, 50), torch.float32, "cpu").requires_grad_() for _ in range(2)]
    x_c.data.copy_(x_e.data)
    fn(x_e).backward()
    torch.compile(fn, fullgraph=True)(x_c).backward()
    assert rel_err(x_c.grad, x_e.grad) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_and_nan_rows(backend, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    device = device_for(backend)
    V = 300 if interpreted(backend) else 3000
    logits = random_logits((4, V), torch.float32, device)
    logits[:, V // 3:] = -math.inf       # padded vocabulary, as in models whose embedding is rounded up
    logits[1, : V // 3 + 5] = -math.inf  # a row whose first block is all -inf
    logits[1, V // 3 + 7] = 1.0
    logits[2, 5] = math.nan
    labels = torch.tensor([0, V // 3 + 7, 3, 1], device=device)
    x = logits.clone().requires_grad_()
    out = hotloop.token_stats(x, labels, self_certainty=True)
    ref = token_stats_ref(logits.double().cpu(), labels.cpu(), 1.0, -100, True, True)
    keep = torch.tensor([True, True, False, True])
    assert rel_err(out.logprobs.cpu()[keep], ref[0][keep]) < 1e-5
    assert rel_err(out.entropy.cpu()[keep], ref[1][keep]) < 1e-5
    assert torch.all(torch.isinf(out.self_certainty.cpu()[keep]))  # KL(U || p) is infinite when p has zeros
    assert torch.isnan(out.logprobs[2]) and torch.isnan(out.entropy[2])
    (out.logprobs[keep.to(device)].sum() + out.entropy[keep.to(device)].sum()).backward()
    assert torch.all(torch.isfinite(x.grad[keep.to(device)]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    device = device_for(backend)
    x = torch.randn(0, 7, 11, device=device, requires_grad=True)
    out = hotloop.token_stats(x, torch.zeros(0, 7, dtype=torch.long, device=device), self_certainty=True)
    assert out.logprobs.shape == (0, 7) and out.entropy.shape == (0, 7)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert x.grad.shape == x.shape


def test_token_logprobs_and_optional_fields(monkeypatch):
    logits = torch.randn(3, 4, 50)
    labels = torch.randint(0, 50, (3, 4))
    lp = hotloop.token_logprobs(logits, labels, temperature=0.7)
    stats = hotloop.token_stats(logits, labels, temperature=0.7, entropy=False)
    assert torch.equal(lp, stats.logprobs)
    assert stats.entropy is None and stats.self_certainty is None
    assert hotloop.token_stats(logits, labels).self_certainty is None


def test_gradcheck_cpu_float64():
    labels = torch.tensor([[1, -100, 6], [0, 3, 2]])
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    fn = lambda t: tuple(hotloop.token_stats(t, labels, temperature=0.8, self_certainty=True))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "reference"])
def test_offsets_past_2_pow_31(backend, monkeypatch):
    """Rows that start past element 2^31: offsets must be 64-bit (only the touched pages are ever mapped)."""
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    device = device_for(backend)
    V = 301
    far = 2**31 + 11
    # the poison fixture would fill (and so map) all 4 GiB: this one allocation stays untouched
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", False)
    storage = torch.empty(far + V, dtype=torch.bfloat16, device=device)
    logits = storage.as_strided((2, 1, V), (far, V, 1))
    logits.copy_(random_logits((2, 1, V), torch.bfloat16, device))
    labels = torch.tensor([[3], [V - 1]], device=device)
    out = hotloop.token_stats(logits, labels)
    ref = token_stats_ref(logits.double().cpu(), labels.cpu(), 1.0, -100, True, False)
    assert rel_err(out.logprobs.cpu(), ref[0]) < 1e-5 and rel_err(out.entropy.cpu(), ref[1]) < 1e-5
    # in-place backward writes its gradient at the far row too
    expected = torch.softmax(logits.double().cpu(), -1).neg()
    torch.ops.hotloop.token_stats_bwd_inplace(
        torch.ones(2, 1, device=device), None, None, logits, labels,
        torch.logsumexp(logits.float(), -1), None, 1.0, -100)
    expected[0, 0, 3] += 1
    expected[1, 0, V - 1] += 1
    assert rel_err(logits.cpu(), expected) < 1e-2
