"""linear_policy_loss / linear_nft_loss and the nn modules: every test of the fused linear losses, in sections.

- Reference and backends: loss and gradients of hidden, weight and bias against float64 materialised math,
  equality with composing the unfused ops, the CPU one-pass path over several token blocks, masked garbage labels,
  weight-gradient accumulation across calls, and the Triton path (interpreter).
- Errors: bad input is rejected with an error that names the argument.
- Compile and opcheck: the fused linear losses (linear_policy_loss, linear_nft_loss, linear_preference_loss) under
  torch.compile(fullgraph=True, backend="aot_eager"), and the registration of hotloop::attach_grads (opcheck).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import hotloop
import hotloop._internal.attach_grads  # noqa: F401  (registers torch.ops.hotloop.attach_grads)
import hotloop.cpu.tile_engine as tile_engine
from hotloop.reference.policy_loss import nft_loss_ref, policy_loss_ref, with_entropy_bonus

from helpers import HAS_CUDA, HAS_TRITON, device_for, rel_err


# =====================================================================================================================
# reference and backends: loss and gradients against float64 materialised math
# =====================================================================================================================
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2)}  # (loss, gradients)


def _inputs(B, T, H, V, dtype, bias=True, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64) / H ** 0.25
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.25
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    labels[~mask] = V + 7  # padding ids may be anything
    old = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 - 5.0
    ref = old + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), labels, mask, old.float(), ref.float(), adv.float()


def _logp64(hidden, weight, bias, labels, mask, temperature, logits_dtype=torch.float64):
    """Materialised float64 log-probs and entropy of the masked positions. logits_dtype bf16: the logits rounded to
    bf16 first, as every bf16 path forms them (else bf16's ~1e-2 log-prob error flips clip decisions at random)."""
    z = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    z = z.to(logits_dtype).double()
    lsm = torch.log_softmax(z / temperature, -1)
    lp = lsm.gather(-1, torch.where(mask, labels, 0)[..., None]).squeeze(-1)
    return lp, -(lsm.exp() * lsm).sum(-1)


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def _check_grads(got, want, tol):
    for g, w in zip(got, want):
        if w is None:
            continue
        assert rel_err(g.grad.double(), w.grad) < tol


OPTS = [dict(), dict(kl_coef=0.05, entropy_coef=0.01, temperature=0.7, agg="seq-mean-token-mean"),
        dict(importance="sequence", agg="dr_grpo", dual_clip=3.0), dict(clip_high=0.28, agg="seq-mean-token-sum")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", OPTS, ids=["default", "kl-entropy-temp", "gspo-drgrpo", "dapo"])
def test_linear_policy_loss_matches_float64(dtype, opts):
    B, T, H, V = 3, 9, 200, 1037
    hidden, weight, bias, labels, mask, old, ref, adv = _inputs(B, T, H, V, dtype)
    h, w, b = _leaves(hidden, weight, bias)
    loss, metrics = hotloop.linear_policy_loss(h, w, labels, old, adv, mask, ref_logp=ref, bias=b, **opts)
    loss.backward()
    h64, w64, b64 = _leaves(hidden.double(), weight.double(), bias.double())
    temperature = opts.get("temperature", 1.0)
    lp, ent = _logp64(h64, w64, b64, labels, mask, temperature, logits_dtype=dtype)
    ref_loss, ref_metrics = policy_loss_ref(
        lp, old.double(), adv.double(), mask, ref.double(), "k3", opts.get("kl_coef", 0.0), 0.2,
        opts.get("clip_high", 0.2), opts.get("dual_clip"), opts.get("importance", "token"),
        opts.get("agg", "token-mean"), T, None)
    ref_loss, ref_metrics = with_entropy_bonus(ref_loss, ref_metrics, ent, mask, opts.get("entropy_coef", 0.0),
                                               opts.get("agg", "token-mean"), T, None)
    ref_loss.backward()
    tl, tg = TOL[dtype]
    assert rel_err(loss.detach(), ref_loss.detach()) < tl
    for name in ref_metrics:
        assert rel_err(metrics[name], ref_metrics[name]) < max(tl, 1e-4), name
    _check_grads((h, w, b), (h64, w64, b64), tg)
    assert torch.all(h.grad[~mask] == 0)


@pytest.mark.parametrize("ratio", ["token", "sequence"])
def test_linear_nft_loss_matches_float64(ratio):
    B, T, H, V = 4, 7, 64, 501
    hidden, weight, bias, labels, mask, old, _, _ = _inputs(B, T, H, V, torch.float32)
    correct = torch.tensor([1, 0, 0, 1])
    h, w, b = _leaves(hidden, weight, bias)
    loss, _ = hotloop.linear_nft_loss(h, w, labels, old, correct, mask, bias=b, group_size=2, ratio=ratio,
                                      entropy_coef=0.5, normalize=1, neg_weight=0.5)
    loss.backward()
    h64, w64, b64 = _leaves(hidden.double(), weight.double(), bias.double())
    lp, ent = _logp64(h64, w64, b64, labels, mask, 1.0)
    ref_loss, m = nft_loss_ref(lp, old.double(), correct, mask, 2, None, 1.0, 1, 0.5, ratio, "token-mean", None, None)
    ref_loss, _ = with_entropy_bonus(ref_loss, m, ent, mask, 0.5, "token-mean", None, None)  # plain entropy mean
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    _check_grads((h, w, b), (h64, w64, b64), 1e-4)


def test_equals_composition_of_unfused_ops():
    B, T, H, V = 4, 10, 48, 300
    hidden, weight, _, labels, mask, old, ref, adv = _inputs(B, T, H, V, torch.float32, bias=False)
    h1, w1, h2, w2 = _leaves(hidden, weight, hidden, weight)
    fused, m1 = hotloop.linear_policy_loss(h1, w1, labels, old, adv, mask, ref_logp=ref, kl_coef=0.1)
    lp = hotloop.linear_token_logprobs(h2, w2, torch.where(mask, labels, -100))
    composed, m2 = hotloop.policy_loss(lp, old, adv, mask, ref_logp=ref, kl_coef=0.1)
    fused.backward(), composed.backward()
    assert rel_err(fused.detach(), composed.detach()) < 1e-5
    assert rel_err(h1.grad, h2.grad) < 1e-5 and rel_err(w1.grad, w2.grad) < 1e-5
    for k in m2:
        assert rel_err(m1[k], m2[k]) < 1e-5, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_one_pass_over_many_token_blocks(monkeypatch, dtype):
    """A buffer of a few rows forces many blocks: the d_weight accumulation across them is checked."""
    B, T, H, V = 4, 16, 32, 257
    hidden, weight, bias, labels, mask, old, ref, adv = _inputs(B, T, H, V, dtype)
    runs = []
    for chunk_bytes in (1 << 30, 5 * V * hidden.element_size()):
        monkeypatch.setattr(tile_engine, "CHUNK_BYTES", chunk_bytes)
        h, w, b = _leaves(hidden, weight, bias)
        loss, _ = hotloop.linear_policy_loss(h, w, labels, old, adv, mask, bias=b, entropy_coef=0.1)
        loss.backward()
        runs.append((loss.detach(), h.grad, w.grad, b.grad))
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # float32: the loss is a cancelling sum, order-dependent
    for one, many in zip(*runs):
        assert rel_err(many.double(), one.double()) < tol


def test_weight_shared_across_calls_accumulates():
    B, T, H, V = 2, 6, 16, 100
    a = _inputs(B, T, H, V, torch.float32, bias=False)
    c = _inputs(B, T, H, V, torch.float32, bias=False)
    w = a[1].clone().requires_grad_()
    l1, _ = hotloop.linear_policy_loss(a[0], w, a[3], a[5], a[7], a[4])
    l2, _ = hotloop.linear_policy_loss(c[0], w, c[3], c[5], c[7], c[4])
    (l1 + 2 * l2).backward()
    w1, w2 = _leaves(a[1], a[1])
    hotloop.linear_policy_loss(a[0], w1, a[3], a[5], a[7], a[4])[0].backward()
    hotloop.linear_policy_loss(c[0], w2, c[3], c[5], c[7], c[4])[0].backward()
    assert rel_err(w.grad, w1.grad + 2 * w2.grad) < 1e-6


def test_all_masked_gives_zero_loss_and_gradients():
    hidden, weight, _, labels, mask, old, _, adv = _inputs(2, 5, 16, 50, torch.float32, bias=False)
    h, w = _leaves(hidden, weight)
    loss, metrics = hotloop.linear_policy_loss(h, w, labels, old, adv, torch.zeros_like(mask))
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0
    assert metrics["entropy_mean"].item() == 0


def test_grpo_module_matches_function():
    hidden, weight, _, labels, mask, old, ref, adv = _inputs(3, 8, 32, 120, torch.float32, bias=False)
    module = hotloop.nn.GRPOLoss(beta=0.04, epsilon_high=0.28, loss_type="grpo", temperature=0.9)
    a, _ = module(hidden, weight, labels, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
    b, _ = hotloop.linear_policy_loss(hidden, weight, labels, old, adv, mask, ref_logp=ref, kl_coef=0.04,
                                      clip_high=0.28, agg="seq-mean-token-mean", temperature=0.9)
    assert a.item() == b.item()
    nft = hotloop.nn.NFTLoss(group_size=3)
    c, _ = nft(hidden, weight, labels, mask, torch.tensor([1, 0, 1]), old_logp=old)
    d, _ = hotloop.linear_nft_loss(hidden, weight, labels, old, torch.tensor([1, 0, 1]), mask, group_size=3)
    assert c.item() == d.item()


@pytest.mark.skipif(HAS_CUDA, reason="interpreter test; on GPU the Triton path runs in the GPU suite")
@pytest.mark.parametrize("importance", ["token", "sequence"])
def test_triton_path_matches_cpu(monkeypatch, importance):
    hidden, weight, bias, labels, mask, old, ref, adv = _inputs(2, 4, 16, 40, torch.float32)
    runs = []
    for backend in ("cpu", "triton"):
        monkeypatch.setenv("HOTLOOP_BACKEND", backend)
        h, w, b = _leaves(hidden, weight, bias)
        loss, _ = hotloop.linear_policy_loss(h, w, labels, old, adv, mask, ref_logp=ref, bias=b, kl_coef=0.1,
                                             entropy_coef=0.05, importance=importance)
        loss.backward()
        runs.append((loss.detach(), h.grad, w.grad, b.grad))
    for cpu, tri in zip(*runs):
        assert rel_err(tri, cpu) < 1e-5


@pytest.mark.parametrize("importance", ["token", "sequence"])  # the one-pass and the two-pass CPU paths
def test_grad_filter_in_the_fused_loss(importance):
    """LM-like peaked softmax (hidden states aligned with their label's row, Zipf bias): a small filter changes
    the gradients by little, a huge one by a lot (so it does act)."""
    B, T, H, V = 4, 32, 64, 3000
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    w = torch.randn(V, H, generator=g) / H ** 0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    h = torch.randn(B, T, H, generator=g) * 0.5 + 14 * w[labels] / w[labels].norm(dim=-1, keepdim=True)
    bias = -1.5 * torch.log(torch.arange(1, V + 1, dtype=torch.float32))
    mask, adv = torch.ones(B, T, dtype=torch.bool), torch.randn(B, generator=g)

    def grads(eps):
        hh, ww = _leaves(h, w)
        loss, _ = hotloop.linear_policy_loss(hh, ww, labels, None, adv, mask, bias=bias, importance=importance,
                                             entropy_coef=0.01, grad_filter_eps=eps)
        loss.backward()
        return hh.grad, ww.grad

    exact, small, large = grads(0.0), grads(2.0 ** -16), grads(0.5)
    for e, s, big in zip(exact, small, large):
        assert rel_err(s, e) < 1e-2
        assert rel_err(big, e) > rel_err(s, e)


@pytest.mark.parametrize("importance", ["token", "sequence"])
def test_label_minus_100_masks_its_token_in_every_path(monkeypatch, importance):
    hidden, weight, _, labels, mask, old, _, adv = _inputs(2, 6, 16, 50, torch.float32, bias=False)
    labels[0, 0], mask[0, 0] = -100, True
    runs = []
    for backend in ("reference", "cpu"):
        monkeypatch.setenv("HOTLOOP_BACKEND", backend)
        h = hidden.clone().requires_grad_()
        loss, _ = hotloop.linear_policy_loss(h, weight, labels, old, adv, mask, importance=importance)
        loss.backward()
        runs.append((loss.detach(), h.grad))
    assert rel_err(runs[1][0], runs[0][0]) < 1e-5 and rel_err(runs[1][1], runs[0][1]) < 1e-5
    assert torch.all(runs[1][1][0, 0] == 0)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("importance", ["token", "sequence"])
def test_cuda_linear_policy_loss_matches_cpu(importance):
    hidden, weight, bias, labels, mask, old, ref, adv = _inputs(4, 64, 256, 5000, torch.float32)
    runs = []
    for dev in ("cpu", "cuda"):
        h, w, b = _leaves(*(t.to(dev) for t in (hidden, weight, bias)))
        loss, _ = hotloop.linear_policy_loss(h, w, labels.to(dev), old.to(dev), adv.to(dev), mask.to(dev),
                                             ref_logp=ref.to(dev), bias=b, kl_coef=0.1, entropy_coef=0.05,
                                             importance=importance)
        loss.backward()
        runs.append([t.detach().cpu() for t in (loss, h.grad, w.grad, b.grad)])
    for cpu, gpu in zip(*runs):
        assert rel_err(gpu, cpu) < 1e-4


# =====================================================================================================================
# errors: bad input is rejected with an error that names the argument
# =====================================================================================================================
def test_label_out_of_range_under_the_mask_is_an_error():
    hidden, weight, _, labels, mask, old, _, adv = _inputs(2, 5, 16, 50, torch.float32, bias=False)
    labels[0, 0] = 50
    mask[0, 0] = True
    with pytest.raises(ValueError, match="`labels` must lie in"):
        hotloop.linear_policy_loss(hidden, weight, labels, old, adv, mask)


@pytest.mark.parametrize("change,words", [
    (dict(weight=torch.zeros(50, 15)), "`weight` must be [V, H]"),
    (dict(bias=torch.zeros(49)), "`bias` must be [V]"),
    (dict(labels=torch.zeros(2, 4, dtype=torch.int64)), "`labels` must have the leading shape"),
    (dict(old=torch.zeros(2, 4)), "`old_logp` must have the shape"),
])
def test_linear_errors(change, words):
    hidden, weight, _, labels, mask, old, _, adv = _inputs(2, 5, 16, 50, torch.float32, bias=False)
    args = {"weight": weight, "bias": None, "labels": labels, "old": old, **change}
    with pytest.raises(ValueError) as info:
        hotloop.linear_policy_loss(hidden, args["weight"], args["labels"], args["old"], adv, mask, bias=args["bias"])
    assert words in str(info.value)


# =====================================================================================================================
# compile and opcheck: torch.compile(fullgraph=True, backend="aot_eager") and hotloop::attach_grads
# These losses make their gradients in the forward and hand them to autograd through hotloop::attach_grads, so
# a compiled training step must trace the whole forward (custom ops with fake kernels, no host reads, no
# autograd calls of its own) and its backward graph must carry attach_grads's gradients, scaled by the incoming
# one, to hidden / weight / bias and on into whatever produced hidden. Each step here is a tiny model (hidden =
# h + 0.1 tanh(h @ proj)), the loss times a loss scale, compiled; backward runs on its output. Loss, metrics
# and the gradients of h, proj, weight and bias are compared with the same step in eager mode (and, in float32,
# with plain-torch autograd through the reference backend, so an error common to both cannot pass), on the CPU
# backend (the default for CPU tensors) and the Triton backend (the interpreter on CPU tensors; the real kernels
# when a GPU is present).
#
# Each fused linear loss is one custom op (its CPU path splits tokens on the host, the preference loss
# differentiates its pair objective inside): these tests keep it opaque to the compiler, on every path.
# =====================================================================================================================
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
