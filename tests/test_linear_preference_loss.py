"""linear_preference_loss: the fused path against the composition of the unfused ops (reference backend) and
against float64 materialised DPO math; layouts, SFT term, errors."""
import pytest
import torch
import torch.nn.functional as F

from hotloop.ops.linear_preference_loss import linear_preference_loss

from helpers import rel_err


def _inputs(P, T, H, V, dtype=torch.float32):
    hidden = torch.randn(2 * P, T, H, dtype=torch.float64) / H ** 0.25
    weight = torch.randn(V, H, dtype=torch.float64) / H ** 0.25
    bias = torch.randn(V, dtype=torch.float64)
    labels = torch.randint(0, V, (2 * P, T))
    lengths = torch.randint(1, T + 1, (2 * P,))
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask[:, 0] = False  # a prompt token: not part of the completion
    labels[~mask] = -7  # anything
    ref_w, ref_l = torch.randn(P, dtype=torch.float64) * 3 - 40, torch.randn(P, dtype=torch.float64) * 3 - 40
    return [t.to(dtype) for t in (hidden, weight, bias)] + [labels, mask, ref_w.float(), ref_l.float()]


def _run(backend, monkeypatch, inputs, **kw):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    hidden, weight, bias, labels, mask, ref_w, ref_l = inputs
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    loss, metrics = linear_preference_loss(h, w, labels, mask, ref_chosen_logps=ref_w, ref_rejected_logps=ref_l,
                                           bias=b, **kw)
    loss.backward()
    return loss.detach(), metrics, (h.grad, w.grad, b.grad)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "simpo", "orpo", "hinge"])
@pytest.mark.parametrize("layout", ["concatenated", "interleaved"])
def test_fused_equals_unfused(monkeypatch, kind, layout):
    inputs = _inputs(3, 10, 32, 500)
    kw = dict(kind=kind, layout=layout, sft_weight=0.3 if kind == "sigmoid" else 0.0, temperature=0.9)
    fused = _run("cpu", monkeypatch, inputs, **kw)
    ref = _run("reference", monkeypatch, inputs, **kw)
    assert rel_err(fused[0], ref[0]) < 1e-5
    for name in ref[1]:  # metrics are means of O(1) terms that may cancel (a margin near 0): scale-relative
        assert abs(fused[1][name].item() - ref[1][name].item()) < 1e-5 * max(1.0, abs(ref[1][name].item())), name
    for a, b in zip(fused[2], ref[2]):
        assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "orpo", "cream", "apo_down"])
@pytest.mark.parametrize("layout", ["concatenated", "interleaved"])
@pytest.mark.parametrize("pairs_per_chunk", [1, 2, 0], ids=["1pair", "2pairs", "fallback"])
def test_cpu_one_pass_in_pair_chunks(monkeypatch, kind, layout, pairs_per_chunk):
    """The one-pass CPU path over chunks of whole pairs (others hold placeholders), and its two-pass fallback when a
    pair does not fit the buffer, equal the reference composition; tiles of a few columns on top."""
    from hotloop.cpu import tile_engine, vocab_tiles

    P, T, V = 4, 9, 300
    inputs = _inputs(P, T, 16, V)
    inputs[4][1, :] = False  # a sequence with no completion token: its pair still gets its gradient
    kw = dict(kind=kind, layout=layout, sft_weight=0.2, consistency=torch.rand(P) if kind == "cream" else None)
    ref = _run("reference", monkeypatch, inputs, **kw)
    monkeypatch.setattr(vocab_tiles, "TILE_COLS", 64)
    # a pair has at most 2 (T - 1) tokens; 0 pairs per chunk = a budget below one pair
    rows = 2 * (T - 1) * pairs_per_chunk if pairs_per_chunk else T - 2
    monkeypatch.setattr(tile_engine, "CHUNK_BYTES", rows * V * 4)
    fused = _run("cpu", monkeypatch, inputs, **kw)
    assert rel_err(fused[0], ref[0]) < 1e-5
    for name in ref[1]:
        assert abs(fused[1][name].item() - ref[1][name].item()) < 1e-5 * max(1.0, abs(ref[1][name].item())), name
    for a, b in zip(fused[2], ref[2]):
        assert rel_err(a, b) < 1e-4


def test_dpo_against_float64(monkeypatch):
    inputs = _inputs(4, 12, 24, 300)
    loss, metrics, grads = _run("cpu", monkeypatch, inputs, beta=0.2)
    hidden, weight, bias, labels, mask, ref_w, ref_l = inputs
    h, w, b = (t.double().requires_grad_() for t in (hidden, weight, bias))
    lp = torch.log_softmax(h @ w.T + b, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    s = (lp * mask).sum(-1)
    delta = (s[:4] - ref_w.double()) - (s[4:] - ref_l.double())
    want = -F.logsigmoid(0.2 * delta).mean()
    want.backward()
    assert rel_err(loss, want.detach()) < 1e-5
    for got, t in zip(grads, (h, w, b)):
        assert rel_err(got, t.grad) < 1e-4
    assert abs(metrics["rewards/accuracies"].item() - (delta > 0).double().mean().item()) < 1e-6


def test_errors():
    hidden, weight, bias, labels, mask, ref_w, ref_l = _inputs(2, 5, 8, 30)
    with pytest.raises(ValueError, match="even number of sequences"):
        linear_preference_loss(hidden[:3], weight, labels[:3], mask[:3], ref_chosen_logps=ref_w,
                               ref_rejected_logps=ref_l)
    with pytest.raises(ValueError, match="`layout` must be one of"):
        linear_preference_loss(hidden, weight, labels, mask, ref_chosen_logps=ref_w, ref_rejected_logps=ref_l,
                               layout="pairs")


def _materialised_logps(hidden, weight, bias, labels, mask, temperature=1.0):
    """float64 per-sequence sums and token counts from the full logits (the TRL path)."""
    z = (hidden @ weight.T + (0 if bias is None else bias)) / temperature
    lp = torch.log_softmax(z, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    m = mask.double()
    return (lp * m).sum(-1), m.sum(-1).clamp(min=1)  # an empty completion counts 1 token, as TRL clamps


def test_orpo_nll_is_trl_token_mean(monkeypatch):
    """ORPO = TRL's cross-entropy over all chosen tokens (one token mean, not a mean of per-pair means) minus
    β logσ(log-odds ratio) of the mean log-probs."""
    hidden, weight, bias, labels, mask, ref_w, ref_l = _inputs(3, 9, 16, 200)
    mask[:, 1], labels[:, 1] = True, torch.randint(0, 200, (6,))  # ORPO needs a token: log(1 - e^0) = -inf
    loss, metrics, grads = _run("cpu", monkeypatch, (hidden, weight, bias, labels, mask, ref_w, ref_l),
                                kind="orpo", beta=0.25)
    h, w, b = (t.double().requires_grad_() for t in (hidden, weight, bias))
    s, n = _materialised_logps(h, w, b, labels, mask)
    nll = -s[:3].sum() / mask[:3].sum()  # TRL's cross-entropy: a mean over the real chosen tokens
    mw, ml = s[:3] / n[:3], s[3:] / n[3:]
    log_odds = (mw - ml) - (torch.log1p(-torch.exp(mw)) - torch.log1p(-torch.exp(ml)))
    want = nll - 0.25 * F.logsigmoid(log_odds).mean()
    want.backward()
    assert rel_err(loss, want.detach()) < 1e-5
    for got, t in zip(grads, (h, w, b)):
        assert rel_err(got, t.grad) < 1e-4


def test_dpo_module_with_reference_model_and_average(monkeypatch):
    """nn.DPOLoss (Liger's arguments): the reference log-probs from ref_input @ ref_weight, per-token means with
    average_log_prob, the NLL term with compute_nll_loss; against float64 materialised math."""
    import hotloop

    monkeypatch.setenv("HOTLOOP_BACKEND", "cpu")
    hidden, weight, bias, labels, mask, _, _ = _inputs(2, 8, 16, 150)
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    ref_weight = weight + 0.1 * torch.randn_like(weight)
    target = labels.masked_fill(~mask, -100)
    module = hotloop.nn.DPOLoss(beta=0.3, average_log_prob=True, compute_nll_loss=True, alpha=0.5)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = module(w, h, target, ref_input=ref_hidden, ref_weight=ref_weight)
    loss.backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    s, n = _materialised_logps(h64, w64, None, labels, mask)
    r, _ = _materialised_logps(ref_hidden.double(), ref_weight.double(), None, labels, mask)
    mean, rmean = s / n, r / n
    delta = (mean[:2] - rmean[:2]) - (mean[2:] - rmean[2:])
    want = -F.logsigmoid(0.3 * delta).mean() + 0.5 * (-s[:2].sum() / mask[:2].sum())
    want.backward()
    assert rel_err(loss, want.detach()) < 1e-5
    assert rel_err(h.grad, h64.grad) < 1e-4 and rel_err(w.grad, w64.grad) < 1e-4
    assert abs(metrics["rewards/margins"].item() - (0.3 * delta).mean().item()) < 1e-5
    assert "nll_loss" in metrics


def test_simpo_module(monkeypatch):
    import hotloop

    monkeypatch.setenv("HOTLOOP_BACKEND", "cpu")
    hidden, weight, bias, labels, mask, _, _ = _inputs(3, 7, 12, 90)
    target = labels.masked_fill(~mask, -100)
    h = hidden.clone().requires_grad_()
    loss, _ = hotloop.nn.SimPOLoss(beta=2.0, gamma=0.5)(weight, h, target, bias)
    loss.backward()
    h64 = hidden.double().requires_grad_()
    s, n = _materialised_logps(h64, weight.double(), bias.double(), labels, mask)
    want = -F.logsigmoid(2.0 * (s[:3] / n[:3] - s[3:] / n[3:]) - 0.5).mean()
    want.backward()
    assert rel_err(loss, want.detach()) < 1e-5 and rel_err(h.grad, h64.grad) < 1e-4


def test_triton_fused_against_float64(monkeypatch):
    """The Triton kernels (interpreter on CPU) behind the fused path, tiny shapes."""
    inputs = _inputs(2, 4, 16, 40)
    loss, _, grads = _run("triton", monkeypatch, inputs, beta=0.2, layout="interleaved")
    hidden, weight, bias, labels, mask, ref_w, ref_l = inputs
    h, w, b = (t.double().requires_grad_() for t in (hidden, weight, bias))
    s, _ = _materialised_logps(h, w, b, labels, mask)
    delta = (s[0::2] - ref_w.double()) - (s[1::2] - ref_l.double())
    want = -F.logsigmoid(0.2 * delta).mean()
    want.backward()
    assert rel_err(loss, want.detach()) < 1e-5
    for got, t in zip(grads, (h, w, b)):
        assert rel_err(got, t.grad) < 1e-4


def test_packed_equals_padded(monkeypatch):
    """cu_seqlens-packed rows (no padding) give the padded batch's loss and gradients."""
    monkeypatch.setenv("HOTLOOP_BACKEND", "cpu")
    hidden, weight, bias, labels, mask, ref_w, ref_l = _inputs(2, 6, 12, 80)
    lengths = torch.tensor([6, 3, 5, 2])
    keep = torch.arange(6)[None, :] < lengths[:, None]
    cu = torch.zeros(5, dtype=torch.int64)
    cu[1:] = lengths.cumsum(0)
    kw = dict(ref_chosen_logps=ref_w, ref_rejected_logps=ref_l, kind="sigmoid", beta=0.2)
    h = hidden.clone().requires_grad_()
    padded, _ = linear_preference_loss(h, weight, labels, mask & keep, **kw)
    padded.backward()
    hp = hidden[keep].clone().requires_grad_()
    packed, _ = linear_preference_loss(hp, weight, labels[keep], mask[keep], cu_seqlens=cu, **kw)
    packed.backward()
    assert rel_err(packed.detach(), padded.detach()) < 1e-6
    assert rel_err(hp.grad, h.grad[keep]) < 1e-5
