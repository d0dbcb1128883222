"""The ops under a TorchDispatchMode (FlopCounterMode here; profilers and debug modes use the same hook): forward and
backward give what they give without the mode, on the reference backend (whose backward kernels run torch.func
transforms, which a mode's excluded dispatch keys used to break) and on the CPU kernels."""
import contextlib

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import hotloop

B, T, H, V = 3, 4, 8, 11


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(V, H, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    return h, w, labels, mask, g


def _token_stats(h, w, labels, mask, g):
    s = hotloop.token_stats(h @ w.T, labels, entropy=True)
    return s.logprobs.sum() + s.entropy.sum()


def _linear_token_stats(h, w, labels, mask, g):
    s = hotloop.linear_token_stats(h, w, labels, entropy=True, self_certainty=True)
    return s.logprobs.sum() + s.entropy.sum() + s.self_certainty.sum()


def _linear_policy_loss(h, w, labels, mask, g):
    return hotloop.linear_policy_loss(h, w, labels, None, torch.randn(B, generator=g, dtype=torch.float64),
                                      mask, entropy_coef=0.1)[0]


def _linear_nft_loss(h, w, labels, mask, g):
    return hotloop.linear_nft_loss(h, w, labels, None, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64), mask,
                                   group_size=3)[0]


def _linear_preference_loss(h, w, labels, mask, g):
    h2 = torch.cat([h, h.flip(0)])
    return hotloop.linear_preference_loss(h2, w, torch.cat([labels, labels]), torch.cat([mask, mask]),
                                          kind="simpo")[0]


LOSSES = [_token_stats, _linear_token_stats, _linear_policy_loss, _linear_nft_loss, _linear_preference_loss]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("loss", LOSSES, ids=lambda f: f.__name__[1:])
def test_same_result_under_a_dispatch_mode(loss, backend, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    results = []
    for under_mode in (False, True):
        h, w, labels, mask, g = _inputs(0)
        with FlopCounterMode(display=False) if under_mode else contextlib.nullcontext():
            value = loss(h, w, labels, mask, g)
            value.backward()
        results.append((value.detach(), h.grad, w.grad))
    for plain, moded in zip(*results):
        torch.testing.assert_close(moded, plain, rtol=0, atol=0)
