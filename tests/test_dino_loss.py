"""hotloop.dino_loss and hotloop.update_center_ (docs/dino_loss.md): every backend against float64 DINO math (loss and
student gradient), crop layouts, no-grad calls, errors, torch.compile, opcheck, finite differences, and the centre's
all-reduce across two gloo processes."""

import pytest
import torch

import hotloop
from hotloop.reference.dino_loss import dino_loss_ref

from distributed import run_ranks
from helpers import BACKENDS, device_for, rel_err

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
LOSS_TOL = {F32: 1e-5, BF16: 1e-5, F16: 1e-5, F64: 1e-12}
GRAD_TOL = {F32: 1e-5, BF16: 1e-2, F16: 2e-3, F64: 1e-12}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "cuda":
        pytest.skip("dino_loss has no CUDA C++ kernel: CUDA tensors run the Triton kernels")
    monkeypatch.setenv("HOTLOOP_BACKEND", request.param)
    return request.param


def _inputs(B, crops, n_global, K, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(crops * B, K, generator=g, dtype=F64) * 2).to(dtype).to(device)
    t = (torch.randn(n_global * B, K, generator=g, dtype=F64) * 2).to(dtype).to(device)
    c = (0.3 * torch.randn(K, generator=g, dtype=F64)).to(F64 if dtype == F64 else F32).to(device)
    return s, t, c


def _expected(s, t, c, n_global, tau_s=0.1, tau_t=0.04):
    s64 = s.detach().double().cpu().requires_grad_(True)
    loss = dino_loss_ref(s64, t.double().cpu(), c.double().cpu(), n_global, tau_s, tau_t)
    loss.backward()
    return loss.detach(), s64.grad


@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64])
@pytest.mark.parametrize("layout", [(3, 5, 2, 37), (2, 2, 1, 64), (4, 3, 3, 130)], ids=lambda x: "x".join(map(str, x)))
def test_matches_float64(backend, dtype, layout):
    dev = device_for(backend)
    if dtype == F64 and dev != "cpu":
        pytest.skip("float64 on CPU only")
    B, crops, ng, K = layout
    s, t, c = _inputs(B, crops, ng, K, dtype, dev)
    want_loss, want_grad = _expected(s, t, c, ng)
    s.requires_grad_(True)
    loss = hotloop.dino_loss(s, t, c, n_global=ng)
    assert loss.dtype == (F64 if dtype == F64 else F32) and loss.dim() == 0
    loss.backward()
    assert s.grad.dtype == dtype
    # the reference backend's float32 math is itself rounded: compare it like the kernels
    assert rel_err(loss.detach().cpu(), want_loss) <= LOSS_TOL[dtype]
    assert rel_err(s.grad.cpu(), want_grad) <= GRAD_TOL[dtype]


def test_temperatures_center_shape_and_scaled_backward(backend):
    dev = device_for(backend)
    s, t, c = _inputs(2, 4, 2, 50, F32, dev, seed=1)
    want_loss, want_grad = _expected(s, t, c, 2, tau_s=0.2, tau_t=0.07)
    s.requires_grad_(True)
    loss = hotloop.dino_loss(s, t, c.reshape(1, -1), tau_s=0.2, tau_t=0.07)  # DINO keeps center as [1, K]
    (3.0 * loss).backward()
    assert rel_err(loss.detach().cpu(), want_loss) <= 1e-5
    assert rel_err(s.grad.cpu(), 3.0 * want_grad) <= 1e-5


def test_cpu_many_images_threads(monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", "cpu")
    s, t, c = _inputs(9, 4, 2, 3001, F32, "cpu", seed=2)
    want_loss, want_grad = _expected(s, t, c, 2)
    s.requires_grad_(True)
    hotloop.dino_loss(s, t, c).backward()
    assert rel_err(s.grad, want_grad) <= 1e-5
    with torch.no_grad():  # no gradient requested: the kernel skips the gradient pass
        assert rel_err(hotloop.dino_loss(s, t, c), want_loss) <= 1e-5


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_cpu_isas(monkeypatch, isa):
    monkeypatch.setenv("HOTLOOP_BACKEND", "cpu")
    monkeypatch.setenv("HOTLOOP_CPU_ISA", isa)
    s, t, c = _inputs(3, 4, 2, 257, BF16, "cpu", seed=3)
    want_loss, want_grad = _expected(s, t, c, 2)
    s.requires_grad_(True)
    loss = hotloop.dino_loss(s, t, c)
    loss.backward()
    assert rel_err(loss.detach(), want_loss) <= 1e-5 and rel_err(s.grad, want_grad) <= 1e-2


def test_gradient_matches_finite_differences(monkeypatch):
    """The kernel's gradient against central differences of the kernel's own loss (float64), along random
    directions (gradcheck itself needs several backwards of one forward, which a fused loss does not keep)."""
    monkeypatch.setenv("HOTLOOP_BACKEND", "cpu")
    s, t, c = _inputs(2, 3, 2, 11, F64, "cpu", seed=4)
    s.requires_grad_(True)
    hotloop.dino_loss(s, t, c, tau_s=0.5, tau_t=0.3).backward()
    g = torch.Generator().manual_seed(7)
    h = 1e-6
    with torch.no_grad():
        for _ in range(3):
            v = torch.randn(s.shape, generator=g, dtype=F64)
            fd = (hotloop.dino_loss(s + h * v, t, c, tau_s=0.5, tau_t=0.3)
                  - hotloop.dino_loss(s - h * v, t, c, tau_s=0.5, tau_t=0.3)) / (2 * h)
            assert abs(float(fd) - float((s.grad * v).sum())) <= 1e-7 * max(1.0, abs(float(fd)))


def test_bad_inputs():
    s, t, c = _inputs(2, 4, 2, 16, F32, "cpu")
    with pytest.raises(ValueError, match="K must agree"):
        hotloop.dino_loss(s, t, c[:-1])
    with pytest.raises(ValueError, match="K must agree"):
        hotloop.dino_loss(s[:, :-1], t, c)
    with pytest.raises(ValueError, match="student_out"):
        hotloop.dino_loss(s[:-1], t, c)
    with pytest.raises(ValueError, match="teacher_out"):
        hotloop.dino_loss(s, t[:-1], c)
    with pytest.raises(ValueError, match="n_global"):
        hotloop.dino_loss(s, t, c, n_global=0)
    with pytest.raises(TypeError, match="teacher_out"):
        hotloop.dino_loss(s, t.to(BF16), c)
    with pytest.raises(TypeError, match="student_out"):
        hotloop.dino_loss(s.long(), t, c)
    with pytest.raises(ValueError, match="tau_s"):
        hotloop.dino_loss(s, t, c, tau_s=0.0)
    with pytest.raises(ValueError, match="2-D"):
        hotloop.dino_loss(s.reshape(4, 2, 16), t, c)


def test_compile_and_opcheck(monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", "cpu")
    s, t, c = _inputs(2, 4, 2, 16, F32, "cpu", seed=5)
    want_loss, want_grad = _expected(s, t, c, 2)
    s.requires_grad_(True)
    f = torch.compile(lambda a, b, cc: hotloop.dino_loss(a, b, cc), fullgraph=True, backend="aot_eager")
    loss = f(s, t, c)
    loss.backward()
    assert rel_err(loss.detach(), want_loss) <= 1e-5 and rel_err(s.grad, want_grad) <= 1e-5
    for need_grad in (True, False):
        torch.library.opcheck(torch.ops.hotloop.dino_loss_fwd.default,
                              (s.detach(), t, c, 2, 0.1, 0.04, need_grad))


# ------------------------------------------------------------------------------------------- update_center_
def test_update_center_single_process():
    g = torch.Generator().manual_seed(6)
    c = torch.randn(1, 20, generator=g)
    t = torch.randn(8, 20, generator=g)
    want = 0.9 * c.double() + 0.1 * t.double().mean(0, keepdim=True)
    out = hotloop.update_center_(c, t)
    assert out is c and rel_err(c, want) <= 1e-6
    with pytest.raises(ValueError, match="momentum"):
        hotloop.update_center_(c, t, momentum=1.5)
    with pytest.raises(ValueError, match="teacher_out"):
        hotloop.update_center_(c, t[:, :-1])


def test_update_center_no_rows_leaves_it():  # a NaN centre would make every later DINO loss NaN
    c = torch.randn(1, 20, generator=torch.Generator().manual_seed(7))
    before = c.clone()
    hotloop.update_center_(c, torch.empty(0, 20))
    assert torch.equal(c, before)


def _center_worker(rank: int, world: int) -> None:
    sizes = [4, 0, 3][:world]  # ranks with different numbers of rows, one with none
    rows = [torch.randn(n, 10, generator=torch.Generator().manual_seed(r)) for r, n in enumerate(sizes)]
    c = torch.zeros(1, 10)
    hotloop.update_center_(c, rows[rank], momentum=0.5)
    want = 0.5 * torch.cat(rows).double().mean(0, keepdim=True)  # the mean over every rank's rows
    assert rel_err(c, want) <= 1e-6, (rank, c, want)
    empty = c.clone()
    hotloop.update_center_(c, rows[rank][:0])  # no rows on any rank: unchanged
    assert torch.equal(c, empty)


@pytest.mark.parametrize("world", [2, 3])
def test_update_center_all_reduce(world):
    run_ranks(_center_worker, world=world)
