"""token_stats rejects bad input with an error that names the argument; never a crash or a silent answer."""
import pytest
import torch

import hotloop

from helpers import BACKENDS, device_for


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", request.param)
    return request.param


def test_label_out_of_range(backend):
    device = device_for(backend)
    logits = torch.randn(2, 3, 10, device=device)
    for bad in (10, -1, -101):
        labels = torch.zeros(2, 3, dtype=torch.long, device=device)
        labels[1, 2] = bad
        with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 10\)"):
            hotloop.token_stats(logits, labels)


def test_int32_labels_out_of_range(backend):
    device = device_for(backend)
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
