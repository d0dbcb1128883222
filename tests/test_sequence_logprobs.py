"""sequence_logprobs / linear_sequence_logprobs: per-sequence sums and means of masked log-probs, padded and
packed, against float64 materialised math, with gradients."""
import pytest
import torch

from hotloop.ops.sequence_logprobs import linear_sequence_logprobs, sequence_logprobs

from helpers import rel_err


def _batch(B, T, V, H=None):
    lengths = torch.randint(0, T + 1, (B,))
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    labels = torch.randint(0, V, (B, T))
    labels[~mask] = V + 3  # padding ids may be anything
    logits = torch.randn(B, T, V, dtype=torch.float64) * 2
    hidden = None if H is None else torch.randn(B, T, H, dtype=torch.float64)
    return logits, hidden, labels, mask


def _expected(logits, labels, mask, average, temperature=1.0):
    lp = torch.log_softmax(logits.double() / temperature, -1).gather(-1, torch.where(mask, labels, 0)[..., None])
    s = (lp.squeeze(-1) * mask).sum(-1)
    return s / mask.sum(-1).clamp(min=1) if average else s


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_logprobs(average, dtype):
    logits, _, labels, mask = _batch(5, 12, 300)
    x = logits.to(dtype).requires_grad_()
    got = sequence_logprobs(x, labels, mask, average=average, temperature=0.8)
    y = logits.to(dtype).double().requires_grad_()
    want = _expected(y, labels, mask, average, 0.8)
    assert got.dtype == torch.float32 and got.shape == (5,)
    assert rel_err(got, want) < 1e-5
    g = torch.randn(5, dtype=torch.float64)
    (got * g.float()).sum().backward(), (want * g).sum().backward()
    assert rel_err(x.grad.double(), y.grad) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_packed_equals_padded():
    logits, _, labels, mask = _batch(4, 10, 100)
    lengths = mask.sum(1)
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    for average in (False, True):
        a = sequence_logprobs(logits, labels, mask, average=average)
        b = sequence_logprobs(logits[mask], labels[mask], torch.ones(int(lengths.sum()), dtype=torch.bool),
                              average=average, cu_seqlens=cu)
        assert rel_err(b, a) < 1e-12


def test_linear_sequence_logprobs():
    _, hidden, labels, mask = _batch(3, 8, 200, H=24)
    weight = torch.randn(200, 24, dtype=torch.float64) / 24 ** 0.5
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    got = linear_sequence_logprobs(h, w, labels, mask, average=True)
    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = _expected(h64 @ w64.T, labels, mask, True)
    assert rel_err(got, want) < 1e-5
    got.sum().backward(), want.sum().backward()
    assert rel_err(h.grad, h64.grad) < 1e-4 and rel_err(w.grad, w64.grad) < 1e-4


def test_errors():
    logits, _, labels, mask = _batch(2, 4, 10)
    with pytest.raises(ValueError, match="`mask` must have the shape"):
        sequence_logprobs(logits, labels, mask[:, :3])
    with pytest.raises(TypeError, match="`labels` must have dtype"):
        sequence_logprobs(logits, labels.float(), mask)
