"""The fused linear losses (linear_policy_loss, linear_nft_loss, linear_preference_loss) under
torch.compile(fullgraph=True, backend="aot_eager"), and the registration of hotloop::attach_grads (opcheck).

These losses make their gradients in the forward and hand them to autograd through hotloop::attach_grads, so a
compiled training step must trace the whole forward (custom ops with fake kernels, no host reads, no autograd
calls of its own) and its backward graph must carry attach_grads's gradients, scaled by the incoming one, to
hidden / weight / bias and on into whatever produced hidden. Each step here is a tiny model (hidden = h + 0.1 tanh(h
@ proj)), the loss times a loss scale, compiled; backward runs on its output. Loss, metrics and the gradients of h,
proj, weight and bias are compared with the same step in eager mode (and, in float32, with plain-torch autograd
through the reference backend, so an error common to both cannot pass), on the CPU backend (the default for CPU
tensors) and the Triton backend (the interpreter on CPU tensors; the real kernels when a GPU is present).

Each fused linear loss is one custom op (its CPU path splits tokens on the host, the preference loss differentiates
its pair objective inside): these tests keep it opaque to the compiler, on every path.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import hotloop
import hotloop._internal.attach_grads  # noqa: F401  (registers torch.ops.hotloop.attach_grads)

from helpers import HAS_TRITON, device_for, rel_err

H, V = 16, 40
LOSS_SCALE = 2.5  # d total / d loss != 1: attach_grads's backward must multiply by it
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # compiled vs eager: the same kernels, the same order


needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
BACKENDS = [pytest.param("cpu", id="cpu"), pytest.param("triton", id="triton", marks=needs_triton)]


def _use(backend: str, monkeypatch) -> str:
    """cpu: the default dispatch of CPU tensors (nothing forced); triton: forced. -> the device to use."""
    if backend == "triton":
        monkeypatch.setenv("HOTLOOP_BACKEND", "triton")
    torch._dynamo.reset()  # the backend is read while tracing: no graph from another test may be reused
    return device_for(backend)


# ---------------------------------------------------------------------------------------------------- inputs
def _tokens(B: int, T: int, seed: int, packed: bool):
    """Shared token-level inputs: h [B, T, H] (or packed [N, H]), proj [H, H], weight [V, H], bias [V], labels with
    garbage under the mask, a mask with a prompt token off and ragged lengths, cu_seqlens when packed."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g) / H ** 0.25
    proj = torch.randn(H, H, generator=g) / H ** 0.5
    weight = torch.randn(V, H, generator=g) / H ** 0.25
    bias = torch.randn(V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask[:, 0] = False  # a prompt token
    labels[~mask] = V + 3  # padding ids may be anything
    labels[0, 1] = -100  # a -100 label masks its token out
    mask[0, 1] = True
    old = torch.randn(B, T, generator=g) * 0.3 - 3.0
    ref = old + 0.1 * torch.randn(B, T, generator=g)
    x = dict(h=h, proj=proj, weight=weight, bias=bias, labels=labels, mask=mask, old=old, ref=ref,
             adv=torch.randn(B, generator=g), correct=(torch.arange(B) % 3 == 0).long(), cu_seqlens=None)
    if packed:  # drop each row's padding: [N] tokens, rows back to back
        keep = torch.arange(T)[None, :] < lengths[:, None]
        for k in ("labels", "mask", "old", "ref"):
            x[k] = x[k][keep]
        x["h"] = h[keep]
        cu = torch.zeros(B + 1, dtype=torch.int64)
        cu[1:] = lengths.cumsum(0)
        x["cu_seqlens"] = cu
    return x


def _policy(opts):
    def loss_fn(hidden, w, b, x):
        return hotloop.linear_policy_loss(hidden, w, x["labels"], x["old"], x["adv"], x["mask"],
                                          ref_logp=x["ref"] if opts.get("kl_coef") else None, bias=b,
                                          cu_seqlens=x["cu_seqlens"], **opts)
    return loss_fn


def _nft(opts):
    def loss_fn(hidden, w, b, x):
        return hotloop.linear_nft_loss(hidden, w, x["labels"], x["old"], x["correct"], x["mask"], bias=b,
                                       group_size=2, cu_seqlens=x["cu_seqlens"], **opts)
    return loss_fn


def _preference(opts):
    def loss_fn(hidden, w, b, x):
        return hotloop.linear_preference_loss(hidden, w, x["labels"], x["mask"], ref_chosen_logps=x["ref_w"],
                                              ref_rejected_logps=x["ref_l"], bias=b,
                                              cu_seqlens=x["cu_seqlens"], **opts)
    return loss_fn


def _step(loss_fn, with_bias: bool):
    """A training step's forward: a tiny model producing hidden, the fused loss, a loss scale."""
    def step(h, proj, w, b, x):
        hidden = h + 0.1 * torch.tanh(h @ proj)
        loss, metrics = loss_fn(hidden, w, b if with_bias else None, x)
        return LOSS_SCALE * loss, loss, metrics
    return step


def _run(step, x, device, dtype, fn=None):
    """(total, loss, metrics, grads of h / proj / weight / bias) of one step and its backward."""
    x = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    leaves = [x[k].to(dtype).clone().requires_grad_() for k in ("h", "proj", "weight", "bias")]
    total, loss, metrics = (fn or step)(*leaves, x)
    total.backward()
    return total.detach(), loss.detach(), metrics, [t.grad for t in leaves]


def _scale(x) -> float:
    """Magnitude of the largest sum in these losses: T tokens of log-probs ~log V, times (1 + |advantage|) and the
    loss scale; the compile-vs-eager tolerances are relative to it (a loss or metric may itself be near 0)."""
    T = x["labels"].shape[-1] if x["cu_seqlens"] is None else int(x["cu_seqlens"].diff().max())
    return LOSS_SCALE * T * math.log(V) * (1.0 + float(x["adv"].abs().max()))


def _compare(got, want, x, dtype, tol=None, grad_tol=None):
    scale = _scale(x)
    tol = tol or (1e-6 if dtype == torch.float32 else 1e-3)
    grad_tol = grad_tol or GRAD_TOL[dtype]
    assert abs(got[0].item() - want[0].item()) <= tol * scale
    assert abs(got[1].item() - want[1].item()) <= tol * scale
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        assert abs(got[2][name].item() - want[2][name].item()) <= tol * scale, name
    for name, g, w in zip(("h", "proj", "weight", "bias"), got[3], want[3]):
        if w is None:
            assert g is None, name
            continue
        assert g is not None and g.dtype == w.dtype, name
        assert rel_err(g, w) <= grad_tol, name


def _check_compiled_step(loss_fn, x, device, dtype=torch.float32, with_bias=True):
    step = _step(loss_fn, with_bias)
    cc = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=cc)
    got = _run(step, x, device, dtype, fn=compiled)
    want = _run(step, x, device, dtype)
    _compare(got, want, x, dtype)
    assert cc.frame_count == 1
    if dtype == torch.float32:  # and both right: plain-torch autograd through the reference backend
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HOTLOOP_BACKEND", "reference")
            ref = _run(step, x, device, dtype)
        _compare(got, ref, x, dtype, tol=1e-5, grad_tol=1e-4)


# -------------------------------------------------------------------------------- policy / NFT: compile vs eager
POLICY_CASES = [
    pytest.param(dict(importance="token", kl_coef=0.1, entropy_coef=0.05, temperature=0.8), True, False,
                 id="token-kl-entropy-bias"),
    pytest.param(dict(importance="token"), False, False, id="token-plain"),
    pytest.param(dict(importance="token", clip_high=0.28, agg="seq-mean-token-sum"), True, True, id="token-packed"),
    pytest.param(dict(importance="sequence", kl_coef=0.1, entropy_coef=0.05,
                      agg="seq-mean-token-mean"), True, False, id="sequence-kl-entropy-bias"),
    pytest.param(dict(importance="sequence", dual_clip=3.0, entropy_coef=-0.02), False, True,
                 id="sequence-packed-dualclip"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts,with_bias,packed", POLICY_CASES)
def test_linear_policy_loss_compiled_step(monkeypatch, backend, opts, with_bias, packed):
    device = _use(backend, monkeypatch)
    _check_compiled_step(_policy(opts), _tokens(4, 6, seed=11, packed=packed), device, with_bias=with_bias)


NFT_CASES = [
    pytest.param(dict(ratio="token", entropy_coef=0.1, neg_weight=0.5), False, id="token-entropy"),
    pytest.param(dict(ratio="sequence", clamp_negative=0.8, temperature=1.2), False, id="sequence"),
    pytest.param(dict(ratio="sequence", entropy_coef=0.05, agg="seq-mean-token-mean"), True, id="sequence-packed"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts,packed", NFT_CASES)
def test_linear_nft_loss_compiled_step(monkeypatch, backend, opts, packed):
    device = _use(backend, monkeypatch)
    _check_compiled_step(_nft(opts), _tokens(4, 6, seed=12, packed=packed), device)


def test_bf16_compiled_step(monkeypatch):
    """bf16 hidden / weight (the gradients come back in bf16, rounded once from float32)."""
    device = _use("cpu", monkeypatch)
    opts = dict(importance="sequence", entropy_coef=0.05)
    _check_compiled_step(_policy(opts), _tokens(4, 6, seed=13, packed=False), device, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------- preference: compile vs eager
def _pairs(P: int, T: int, seed: int, packed: bool):
    x = _tokens(2 * P, T, seed, packed)
    g = torch.Generator().manual_seed(seed + 1)
    x["ref_w"] = torch.randn(P, generator=g) - 2.0 * T  # sequence log-prob sums: about -log V per token
    x["ref_l"] = torch.randn(P, generator=g) - 2.0 * T
    return x


PREFERENCE_CASES = [
    pytest.param(dict(kind="sigmoid", layout="concatenated", beta=0.2, sft_weight=0.3), False, id="sigmoid-concat"),
    pytest.param(dict(kind="sigmoid", layout="interleaved", label_smoothing=0.1), True,
                 id="sigmoid-interleaved-packed"),
    pytest.param(dict(kind="simpo", layout="interleaved", beta=2.0, gamma=0.5), False, id="simpo-interleaved"),
    pytest.param(dict(kind="orpo", layout="concatenated", beta=0.1), False, id="orpo-concat"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts,packed", PREFERENCE_CASES)
def test_linear_preference_loss_compiled_step(monkeypatch, backend, opts, packed):
    device = _use(backend, monkeypatch)
    _check_compiled_step(_preference(opts), _pairs(2, 6, seed=14, packed=packed), device)


# --------------------------------------------------------------------------- repeated calls, recompiles, backward
@pytest.mark.parametrize("backend,importance", [
    pytest.param("cpu", "sequence", id="cpu-sequence"),
    pytest.param("triton", "token", id="triton-token", marks=needs_triton),
])
def test_compiled_step_reused_across_values_and_shapes(monkeypatch, backend, importance):
    """New values of the same shapes reuse the graph (no graph break, no recompile); new shapes recompile a bounded
    number of times (automatic dynamic shapes: at most once per dimension that changes), then reuse."""
    device = _use(backend, monkeypatch)
    step = _step(_policy(dict(importance=importance, entropy_coef=0.05)), True)
    cc = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=cc)
    for seed in (21, 22, 23):
        x = _tokens(4, 6, seed, packed=False)
        _compare(_run(step, x, device, torch.float32, fn=compiled), _run(step, x, device, torch.float32), x,
                 torch.float32)
    assert cc.frame_count == 1
    for B, T, seed in ((5, 6, 24), (3, 8, 25), (6, 7, 26)):  # B, then T become dynamic; the last shape reuses
        before = cc.frame_count
        x = _tokens(B, T, seed, packed=False)
        _compare(_run(step, x, device, torch.float32, fn=compiled), _run(step, x, device, torch.float32), x,
                 torch.float32)
    assert cc.frame_count <= 3 and cc.frame_count == before


def test_second_backward_raises(monkeypatch):
    """One backward per call (the forward's gradients are used up): a second backward raises, compiled or not."""
    _use("cpu", monkeypatch)
    x = _tokens(4, 6, seed=31, packed=False)
    step = _step(_policy(dict(importance="sequence")), True)
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaves = [x[k].clone().requires_grad_() for k in ("h", "proj", "weight", "bias")]
        total, _, _ = fn(*leaves, x)
        total.backward()
        with pytest.raises(RuntimeError, match="second time|used up"):
            total.backward()
        # retain_graph does not buy a second one: eager raises on the second backward (the gradients are used up),
        # compiled already on the first (AOT's donated buffers)
        total, _, _ = fn(*leaves, x)
        with pytest.raises(RuntimeError, match="used up|retain_graph"):
            total.backward(retain_graph=True)
            total.backward()


# -------------------------------------------------------------------------------------- attach_grads: opcheck
def _attach_args(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    value = torch.randn((), generator=g)
    inputs = [torch.randn(3, 4, generator=g).to(dtype).requires_grad_(),
              torch.randn(7, 4, generator=g).to(dtype).requires_grad_(),
              torch.randn(7, generator=g).to(dtype).requires_grad_()]
    grads = [torch.randn(x.shape, generator=g) for x in inputs]  # float32, whatever the inputs' dtype
    return value, inputs, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attach_grads_opcheck(dtype):
    value, inputs, grads = _attach_args(dtype, seed=41)
    torch.library.opcheck(torch.ops.hotloop.attach_grads.default, (value, inputs, grads))
    torch.library.opcheck(torch.ops.hotloop.attach_grads.default, (value, inputs[:1], grads[:1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attach_grads_compiled(dtype):
    """The op alone under fullgraph: the value passes through, each input's gradient is its float32 gradient
    times the incoming one, rounded once to the input's dtype."""
    torch._dynamo.reset()
    value, inputs, grads = _attach_args(dtype, seed=42)
    want = [(g * 3.0).to(dtype) for g in grads]  # before the call: the backward may scale `grads` in place

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(v, xs, gs):
        return 3.0 * torch.ops.hotloop.attach_grads(v, xs, gs)

    out = f(value, inputs, [g.clone() for g in grads])
    out.backward()
    assert torch.equal(out.detach(), 3.0 * value)
    for x, w in zip(inputs, want):
        assert x.grad.dtype == dtype and torch.equal(x.grad, w)
