"""token_stats / token_logprobs (docs/token_stats.md): every test of the op, in sections.

- Reference and backends: values and gradients of every backend against the float64 reference.
- Errors: bad input is rejected with an error that names the argument; never a crash or a silent answer.
- Compile and opcheck: torch.compile (no graph breaks) and the custom ops' registration (opcheck).
- Triton kernels: the token_stats launchers at kernel level, run on CPU tensors by the Triton interpreter, each case
  against the same math in float64 torch applied to the (already rounded) inputs, by relative norm error; shapes
  are tiny (the interpreter runs every program in numpy). Skipped with a GPU (the backend tests run these kernels
  on CUDA tensors there) and without triton; the rest of the file runs either way.
"""
import math

import pytest
import torch

import hotloop
from hotloop.reference import token_stats_ref

from helpers import (BACKENDS, FWD_TOL, GRAD_TOL, LazyModule, device_for, interpreted, random_labels, random_logits,
                     rel_err, triton_interpreter_only)

# imported inside the Triton kernel tests, never at collection (no triton: those tests skip, the others run)
ts = LazyModule("hotloop.triton_kernels.token_stats")


# =====================================================================================================================
# reference and backends: values and gradients of every backend against the float64 reference
# =====================================================================================================================
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


# =====================================================================================================================
# errors: bad input is rejected with an error that names the argument
# =====================================================================================================================
@pytest.fixture(params=BACKENDS)
def forced_backend(request, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", request.param)
    return request.param


def test_label_out_of_range(forced_backend):
    device = device_for(forced_backend)
    logits = torch.randn(2, 3, 10, device=device)
    for bad in (10, -1, -101):
        labels = torch.zeros(2, 3, dtype=torch.long, device=device)
        labels[1, 2] = bad
        with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 10\)"):
            hotloop.token_stats(logits, labels)


def test_int32_labels_out_of_range(forced_backend):
    device = device_for(forced_backend)
    labels = torch.tensor([0, 5], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="labels"):
        hotloop.token_logprobs(torch.randn(2, 5, device=device), labels)


@pytest.mark.parametrize("make, error, match", [
    (lambda: (torch.tensor(1.0), torch.tensor(0)), ValueError, "`logits` must have at least 1 dim"),
    (lambda: (torch.randn(2, 0), torch.zeros(2, dtype=torch.long)), ValueError, "empty vocabulary"),
    (lambda: (torch.randn(2, 5), torch.zeros(2)), TypeError, "`labels` must have dtype"),
    (lambda: (torch.randn(2, 5), torch.zeros(2, dtype=torch.int16)), TypeError, "`labels` must have dtype"),
    (lambda: (torch.randn(2, 5).long(), torch.zeros(2, dtype=torch.long)), TypeError, "`logits` must have dtype"),
    (lambda: (torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long)), ValueError, "leading shape"),
    (lambda: (torch.randn(2, 5), torch.zeros(2, dtype=torch.long, device="meta")), ValueError, "is on meta"),
    (lambda: (torch.randn(2, 5).numpy(), torch.zeros(2, dtype=torch.long)), TypeError, "torch.Tensor"),
])
def test_bad_arguments(make, error, match):
    logits, labels = make()
    with pytest.raises(error, match=match):
        hotloop.token_stats(logits, labels)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0"):
        hotloop.token_stats(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=temperature)


@pytest.mark.parametrize("temperature", [torch.tensor(1.0), True, "1.0"])
def test_temperature_must_be_a_real_number(temperature):
    with pytest.raises(TypeError, match="`temperature` must be a real number"):
        hotloop.token_stats(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=temperature)


@pytest.mark.parametrize("ignore_index, error", [(-100.5, TypeError), (None, TypeError), (2**70, ValueError)])
def test_ignore_index_must_be_an_int64(ignore_index, error):
    with pytest.raises(error, match="`ignore_index` must"):
        hotloop.token_stats(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), ignore_index=ignore_index)


def test_unknown_or_unusable_backend(monkeypatch):
    args = (torch.randn(2, 5), torch.zeros(2, dtype=torch.long))
    monkeypatch.setenv("HOTLOOP_BACKEND", "fast")
    with pytest.raises(ValueError, match="HOTLOOP_BACKEND='fast'"):
        hotloop.token_stats(*args)
    monkeypatch.setenv("HOTLOOP_BACKEND", "cuda")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        hotloop.token_stats(*args)
    monkeypatch.setenv("HOTLOOP_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        hotloop.token_stats(*args)


def test_cpu_kernel_checks_its_own_arguments():
    """The kernel-level op is reachable directly (torch.ops.hotloop.*): it must not trust its caller."""
    logits, labels = torch.randn(2, 3, 7), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"must be \[B, T, V\]"):
        hotloop._C.cpu.token_stats_fwd(logits[0], labels, 1.0, -100, True, False)
    with pytest.raises(ValueError, match="unit stride along V"):
        hotloop._C.cpu.token_stats_fwd(logits.transpose(1, 2), labels, 1.0, -100, True, False)
    with pytest.raises(ValueError, match="`labels` must be contiguous"):
        hotloop._C.cpu.token_stats_fwd(logits, labels[:, :2], 1.0, -100, True, False)
    with pytest.raises(ValueError, match="`temperature` must be > 0"):
        hotloop._C.cpu.token_stats_fwd(logits, labels, 0.0, -100, True, False)
    lp, ent, sc, lse = hotloop._C.cpu.token_stats_fwd(logits, labels, 1.0, -100, True, False)
    with pytest.raises(ValueError, match="needs the forward's entropy"):
        hotloop._C.cpu.token_stats_bwd(torch.empty_like(logits), None, torch.ones(2, 3), None, logits, labels,
                                              lse, None, 1.0, -100)
    with pytest.raises(TypeError, match="`lse` must be Float"):
        hotloop._C.cpu.token_stats_bwd(torch.empty_like(logits), lp, None, None, logits, labels,
                                              lse.double(), None, 1.0, -100)


# =====================================================================================================================
# compile and opcheck: torch.compile (no graph breaks) and the custom ops' registration
# =====================================================================================================================
def test_compile_with_inplace_backward(monkeypatch):
    torch._dynamo.reset()
    labels = random_labels((3, 4), 50, "cpu")
    fn = lambda x: hotloop.token_stats(x * 1, labels, inplace_backward=True).logprobs.sum()  # noqa: E731
    x_e, x_c = [random_logits((3, 4, 50), torch.float32, "cpu").requires_grad_() for _ in range(2)]
    x_c.data.copy_(x_e.data)
    fn(x_e).backward()
    torch.compile(fn, fullgraph=True)(x_c).backward()
    assert rel_err(x_c.grad, x_e.grad) < 1e-6


def _loss(logits, labels):
    out = hotloop.token_stats(logits, labels, temperature=0.9, self_certainty=True)
    return (out.logprobs * 2).sum() + out.entropy.sum() - out.self_certainty.mean()


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    logits = torch.randn(3, 5, 257)
    labels = torch.randint(0, 257, (3, 5))
    labels[0, 1] = -100
    compiled = torch.compile(_loss, fullgraph=True)
    x_eager, x_comp = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    eager, comp = _loss(x_eager, labels), compiled(x_comp, labels)
    eager.backward()
    comp.backward()
    assert rel_err(comp.detach(), eager.detach()) < 1e-6
    assert rel_err(x_comp.grad, x_eager.grad) < 1e-6


def _sample_inputs():
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(2, 4, 33, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, 33, (2, 4))
        labels[1, 0] = -100
        yield (logits, labels, 0.8, -100, True, True, False)
        yield (logits, labels, 1.0, -100, False, False, False)


@pytest.mark.parametrize("args", list(_sample_inputs()), ids=lambda a: f"{a[0].dtype}-entropy{a[4]}")
def test_opcheck_forward(args):
    torch.library.opcheck(torch.ops.hotloop.token_stats_fwd.default, args)


def test_opcheck_backward():
    logits = torch.randn(2, 4, 33)
    labels = torch.randint(0, 33, (2, 4))
    lp, ent, _, lse = torch.ops.hotloop.token_stats_fwd(logits, labels, 1.0, -100, True, False, False)
    args = (torch.randn(2, 4), torch.randn(2, 4), None, logits, labels, lse, ent, 1.0, -100)
    torch.library.opcheck(torch.ops.hotloop.token_stats_bwd.default, args)
    torch.library.opcheck(torch.ops.hotloop.token_stats_bwd_inplace.default, (*args[:3], logits.clone(), *args[4:]))


# =====================================================================================================================
# Triton kernels: the launchers on CPU tensors (the interpreter)
# conftest.py sets TRITON_INTERPRET=1 when there is no GPU; with one, the backend tests above run these kernels
# on CUDA tensors instead, and these are skipped (triton_interpreter_only, as they are without triton).
# Each case compares against the same math in float64 torch, applied to the (already rounded) inputs, by
# relative norm error. Shapes are tiny: the interpreter runs every program in numpy.
# =====================================================================================================================
IGNORE = -100
TEMP = 0.7
TRITON_FWD_TOL = 1e-5
TRITON_GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


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


def triton_rel_err(out, ref):
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
def triton_poison(monkeypatch):
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
TRITON_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------------------------------- forward
@triton_interpreter_only
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("V,num_splits,block_v", CASES)
def test_triton_forward_matches_float64(triton_poison, V, num_splits, block_v, dtype):
    B, T = 2, 4
    x, labels = make_inputs(B, T, V, dtype, ignore=((0, 1), (1, 3)))
    lp, ent, sc, lse = ts.token_stats_fwd_triton(x, labels, TEMP, IGNORE, True, True,
                                                 num_splits=num_splits, block_v=block_v)
    ref = ref_forward(x, labels)
    valid = labels != IGNORE
    for name, out, r in zip(("logprobs", "entropy", "self_certainty"), (lp, ent, sc), ref):
        assert out.shape == (B, T) and out.dtype == torch.float32, name
        assert torch.isfinite(out).all(), name  # every element written (poisoned NaN otherwise)
        assert triton_rel_err(out, r) < TRITON_FWD_TOL, (name, triton_rel_err(out, r))
        assert (out[~valid] == 0).all(), name
    assert torch.isfinite(lse).all()
    assert triton_rel_err(lse[valid], ref[3][valid]) < TRITON_FWD_TOL


@triton_interpreter_only
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_forward_flags_off(triton_poison, num_splits):
    x, labels = make_inputs(2, 3, 300, torch.float32)
    ref = ref_forward(x, labels)
    lp, ent, sc, lse = ts.token_stats_fwd_triton(x, labels, TEMP, IGNORE, False, False,
                                                 num_splits=num_splits, block_v=64)
    assert ent.shape == (0,) and sc.shape == (0,)
    assert triton_rel_err(lp, ref[0]) < TRITON_FWD_TOL
    _, ent, sc, _ = ts.token_stats_fwd_triton(x, labels, TEMP, IGNORE, True, False,
                                              num_splits=num_splits, block_v=64)
    assert sc.shape == (0,) and triton_rel_err(ent, ref[1]) < TRITON_FWD_TOL
    _, ent, sc, _ = ts.token_stats_fwd_triton(x, labels, TEMP, IGNORE, False, True,
                                              num_splits=num_splits, block_v=64)
    assert ent.shape == (0,) and triton_rel_err(sc, ref[2]) < TRITON_FWD_TOL


@triton_interpreter_only
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_forward_strided_rows(triton_poison, num_splits):
    # logits[:, :-1] of a [B, T + 1, V] tensor: row stride != V, read in place
    full, labels = make_inputs(2, 4, 203, torch.bfloat16)
    x = full[:, :-1]
    labels = labels[:, 1:].contiguous().int()  # int32 labels too
    assert x.stride(1) == 203 and x.stride(0) == 4 * 203 and not x.is_contiguous()
    outs = ts.token_stats_fwd_triton(x, labels, TEMP, IGNORE, True, True, num_splits=num_splits, block_v=64)
    for out, r in zip(outs[:3], ref_forward(x, labels)):
        assert triton_rel_err(out, r) < TRITON_FWD_TOL


@triton_interpreter_only
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_forward_masked_vocab(triton_poison, num_splits):
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
    assert triton_rel_err(lp, ref[0]) < TRITON_FWD_TOL and triton_rel_err(ent, ref[1]) < TRITON_FWD_TOL
    # KL(U || p) is +inf once any p_v is 0; other rows stay finite and right
    masked = torch.zeros(B, T, dtype=torch.bool)
    masked[0, 0] = masked[1, 2] = masked[0, 2] = True
    assert torch.isposinf(sc[masked]).all() and torch.isposinf(ref[2][masked]).all()
    assert triton_rel_err(sc[~masked], ref[2][~masked]) < TRITON_FWD_TOL


@triton_interpreter_only
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_forward_bad_labels_and_nan(triton_poison, num_splits):
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
        assert triton_rel_err(out[~bad], r[~bad]) < TRITON_FWD_TOL


@triton_interpreter_only
def test_triton_forward_other_ignore_index(triton_poison):
    # an ignore_index inside [0, V) is still ignored
    x, labels = make_inputs(1, 6, 40, torch.float32, ignore=())
    labels[0, :3] = 0
    lp, ent, sc, _ = ts.token_stats_fwd_triton(x, labels, TEMP, 0, True, True, block_v=16)
    ref = ref_forward(x, labels, ignore_index=0)
    for out, r in zip((lp, ent, sc), ref):
        assert (out[0, :3] == 0).all() and triton_rel_err(out, r) < TRITON_FWD_TOL


@triton_interpreter_only
def test_triton_rejects_float64():
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


@triton_interpreter_only
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("V,num_splits,block_v", CASES)
def test_triton_backward_matches_float64(triton_poison, V, num_splits, block_v, dtype):
    B, T = 2, 4
    x, labels = make_inputs(B, T, V, dtype, ignore=((0, 1), (1, 3)))
    grads = upstream(B, T)
    g = _fwd_bwd(x, labels, grads, num_splits, block_v)
    assert g.dtype == dtype and g.shape == x.shape
    assert torch.isfinite(g).all()  # poisoned NaN: every element written
    ref = ref_grad_autograd(x, labels, *grads)
    assert triton_rel_err(g, ref) < TRITON_GRAD_TOL[dtype], triton_rel_err(g, ref)
    assert triton_rel_err(g, ref_grad(x, labels, *grads)) < TRITON_GRAD_TOL[dtype]
    ignored = labels == IGNORE
    assert (g[ignored] == 0).all()


@triton_interpreter_only
@pytest.mark.parametrize("which", [(True, False, False), (False, True, False), (False, False, True),
                                   (True, False, True)])
def test_triton_backward_partial_upstream(triton_poison, which):
    B, T, V = 2, 3, 129
    x, labels = make_inputs(B, T, V, torch.float32)
    grads = [g if on else None for g, on in zip(upstream(B, T), which)]
    g = _fwd_bwd(x, labels, grads, 2, 32)
    assert triton_rel_err(g, ref_grad_autograd(x, labels, *grads)) < TRITON_GRAD_TOL[torch.float32]


@triton_interpreter_only
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_backward_strided_rows(triton_poison, num_splits):
    full, labels = make_inputs(2, 4, 203, torch.float32)
    x = full[:, :-1]
    labels = labels[:, 1:].contiguous()
    grads = upstream(2, 3)
    gfull = torch.full((2, 5, 203), float("nan"))
    out = gfull[:, 1:-1]  # strided output too
    _fwd_bwd(x, labels, grads, num_splits, 64, out=out)
    assert triton_rel_err(out, ref_grad_autograd(x, labels, *grads)) < TRITON_GRAD_TOL[torch.float32]
    assert torch.isnan(gfull[:, 0]).all() and torch.isnan(gfull[:, -1]).all()  # nothing outside the view


@triton_interpreter_only
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_backward_masked_vocab(triton_poison, num_splits):
    B, T, V = 2, 3, 100
    x, labels = make_inputs(B, T, V, torch.float32)
    x[0, 0, :48] = float("-inf")
    x[1, 2, 1::2] = float("-inf")
    labels[0, 0], labels[1, 2] = 50, 4
    grads = upstream(B, T)
    g = _fwd_bwd(x, labels, grads, num_splits, 16)
    assert torch.isfinite(g).all()
    assert triton_rel_err(g, ref_grad(x, labels, *grads)) < TRITON_GRAD_TOL[torch.float32]


@triton_interpreter_only
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_backward_bad_label_is_nan(triton_poison, num_splits):
    x, labels = make_inputs(2, 3, 50, torch.float32)
    labels[1, 0] = 1000
    grads = upstream(2, 3)
    g = _fwd_bwd(x, labels, grads, num_splits, 16)
    assert torch.isnan(g[1, 0]).all()
    ok = torch.ones(2, 3, dtype=torch.bool)
    ok[1, 0] = False
    ref = ref_grad_autograd(x, torch.where(labels == IGNORE, labels, labels.clamp(0, 49)), *grads)
    assert triton_rel_err(g[ok], ref[ok]) < TRITON_GRAD_TOL[torch.float32]


@triton_interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_backward_in_place(triton_poison, dtype, num_splits):
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
