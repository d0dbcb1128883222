"""hotloop.byol_loss (docs/byol_loss.md): 2 - 2 cos(p, stopgrad(z)), every backend against float64 math, loss and gradient,
leading shapes, no gradient into z, errors, torch.compile and opcheck."""
import pytest
import torch
import torch.nn.functional as F

import hotloop

from helpers import BACKENDS, device_for, rel_err

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
GRAD_TOL = {F32: 1e-5, BF16: 1e-2, F16: 2e-3, F64: 1e-12}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "cuda":
        pytest.skip("byol_loss has no CUDA C++ kernel: CUDA tensors run the Triton kernel")
    monkeypatch.setenv("HOTLOOP_BACKEND", request.param)
    return request.param


def _expected(p, z):
    p64 = p.detach().double().cpu().requires_grad_(True)
    loss = (2 - 2 * (F.normalize(p64, dim=-1) * F.normalize(z.detach().double().cpu(), dim=-1)).sum(-1)).mean()
    loss.backward()
    return loss.detach(), p64.grad


@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64])
@pytest.mark.parametrize("shape", [(7, 33), (2, 3, 17), (1, 1)])
def test_matches_float64(backend, dtype, shape):
    dev = device_for(backend)
    if dtype == F64 and dev != "cpu":
        pytest.skip("float64 on CPU only")
    g = torch.Generator().manual_seed(0)
    p = torch.randn(shape, generator=g, dtype=F64).to(dtype).to(dev).requires_grad_(True)
    z = torch.randn(shape, generator=g, dtype=F64).to(dtype).to(dev).requires_grad_(True)
    want_loss, want_grad = _expected(p, z)
    loss = hotloop.byol_loss(p, z)
    assert loss.dtype == (F64 if dtype == F64 else F32) and loss.dim() == 0
    loss.backward()
    assert rel_err(loss.detach().cpu(), want_loss) <= (1e-12 if dtype == F64 else 1e-5)
    assert p.grad.dtype == dtype and rel_err(p.grad.cpu(), want_grad) <= GRAD_TOL[dtype]
    assert z.grad is None  # stop-gradient on the target


def test_same_direction_is_zero(backend):
    dev = device_for(backend)
    p = torch.randn(4, 9, device=dev)
    assert abs(float(hotloop.byol_loss(p, 3 * p))) <= 1e-6
    assert abs(float(hotloop.byol_loss(p, -p)) - 4.0) <= 1e-5


def test_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        hotloop.byol_loss(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(TypeError, match="`p`"):
        hotloop.byol_loss(torch.ones(3, 4, dtype=torch.int64), torch.randn(3, 4))
    with pytest.raises(ValueError, match="feature dim"):
        hotloop.byol_loss(torch.randn(3, 0), torch.randn(3, 0))


def test_compile_and_opcheck(monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", "cpu")
    p = torch.randn(5, 8, requires_grad=True)
    z = torch.randn(5, 8)
    want_loss, want_grad = _expected(p, z)
    loss = torch.compile(hotloop.byol_loss, fullgraph=True, backend="aot_eager")(p, z)
    loss.backward()
    assert rel_err(loss.detach(), want_loss) <= 1e-5 and rel_err(p.grad, want_grad) <= 1e-5
    for need_grad in (True, False):
        torch.library.opcheck(torch.ops.hotloop.byol_loss_fwd.default, (p.detach(), z, need_grad))
