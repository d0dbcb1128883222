"""hotloop.ema_update_ and hotloop.EMATeacher (docs/ema.md): every dtype pair against float64 math, out_copy, decay
0 / 1 / tensors, module buffers, schedules, errors, torch.compile, opcheck, and a 2-process gloo DDP run (plus
FSDP2-style DTensor parameters) that must give the same teacher on both ranks."""
import copy
import math
import os

import pytest
import torch
from torch import nn

import hotloop
from hotloop.ema_teacher import cosine_decay

from distributed import run_ranks
from helpers import HAS_CUDA, rel_err

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
PAIRS = [(F32, F32), (F32, BF16), (F32, F16), (BF16, BF16), (F16, F16), (F64, F64)]
# one rounding to the target's dtype: a relative error of at most its unit roundoff
TOL = {F32: 1e-6, BF16: 5e-3, F16: 1e-3, F64: 1e-14}
SHAPES = [(7, 13), (1,), (0,), (3, 5, 2), (1000,), (33, 65)]


@pytest.fixture(params=["reference", "cpu"])
def backend(request, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", request.param)
    return request.param


def _tensors(dtype, shapes=SHAPES, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=F64).to(dtype).to(device) for s in shapes]


def _expected(target, online, d):
    return [(d * t.double() + (1 - d) * s.double()) for t, s in zip(target, online)]


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{str(p[0])[6:]}<-{str(p[1])[6:]}")
@pytest.mark.parametrize("decay", [0.996, 0.3, 0.7])
def test_matches_float64(backend, pair, decay):
    tdt, sdt = pair
    target, online = _tensors(tdt, seed=1), _tensors(sdt, seed=2)
    want = _expected(target, online, decay)
    hotloop.ema_update_(target, online, decay)
    for t, w in zip(target, want):
        assert t.dtype == tdt
        assert rel_err(t, w) <= TOL[tdt], (tdt, sdt)


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_cpu_isas_and_threads(monkeypatch, isa):
    """Every ISA build of the kernel, on a list long enough to be split across threads mid-tensor."""
    monkeypatch.setenv("HOTLOOP_BACKEND", "cpu")
    monkeypatch.setenv("HOTLOOP_CPU_ISA", isa)
    shapes = [(40_001,), (0,), (3,), (70_000,), (129, 257), (5,)]
    target, online = _tensors(F32, shapes, seed=3), _tensors(BF16, shapes, seed=4)
    copies = [torch.empty(s, dtype=BF16) for s in shapes]
    want = _expected(target, online, 0.9)
    hotloop.ema_update_(target, online, 0.9, out_copy=copies)
    for t, c, w in zip(target, copies, want):
        assert rel_err(t, w) <= TOL[F32]
        assert torch.equal(c, t.to(BF16))  # the copy is the new float32 value rounded once


def test_unknown_cpu_isa_refused(monkeypatch):  # the C++ kernels would ignore it and run the best ISA
    monkeypatch.setenv("HOTLOOP_CPU_ISA", "avx1024")
    with pytest.raises(ValueError, match="HOTLOOP_CPU_ISA='avx1024'"):
        hotloop.ema_update_([torch.zeros(3)], [torch.ones(3)], 0.5)
    with pytest.raises(ValueError, match="HOTLOOP_CPU_ISA"):
        hotloop.token_stats(torch.randn(2, 5), torch.tensor([1, 2]))


def test_float32_equals_foreach_lerp(monkeypatch):
    """With FMA (avx2 / avx512) the kernel is ATen's lerp bit for bit; base rounds the product apart."""
    monkeypatch.setenv("HOTLOOP_BACKEND", "cpu")
    monkeypatch.setenv("HOTLOOP_CPU_ISA", "avx2")
    if not os.path.exists("/proc/cpuinfo") or "fma" not in open("/proc/cpuinfo").read().split():
        pytest.skip("no FMA on this CPU")
    target, online = _tensors(F32, seed=5), _tensors(F32, seed=6)
    ref = [t.clone() for t in target]
    torch._foreach_lerp_(ref, online, 1 - 0.996)
    hotloop.ema_update_(target, online, 0.996)
    assert all(torch.equal(a, b) for a, b in zip(target, ref))


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{str(p[0])[6:]}<-{str(p[1])[6:]}")
def test_decay_one_and_zero_exact(backend, pair):
    tdt, sdt = pair
    target, online = _tensors(tdt, seed=7), _tensors(sdt, seed=8)
    before = [t.clone() for t in target]
    hotloop.ema_update_(target, online, 1.0)
    assert all(torch.equal(t, b) for t, b in zip(target, before))
    hotloop.ema_update_(target, online, 0.0)
    assert all(torch.equal(t, s.to(tdt)) for t, s in zip(target, online))


def test_mixed_dtypes_one_call_and_none_copies(backend):
    target = _tensors(F32, SHAPES[:3], seed=9) + _tensors(BF16, SHAPES[3:], seed=10)
    online = _tensors(BF16, SHAPES[:3], seed=11) + _tensors(BF16, SHAPES[3:], seed=12)
    copies = [torch.zeros(s, dtype=F16) for s in SHAPES[:3]] + [None] * 3
    want = _expected(target, online, 0.8)
    hotloop.ema_update_(target, online, 0.8, out_copy=copies)
    for t, w in zip(target, want):
        assert rel_err(t, w) <= TOL[t.dtype]
    for t, c in zip(target[:3], copies[:3]):
        assert torch.equal(c, t.to(F16))


def test_tensor_decay(backend):
    target, online = _tensors(F32, seed=13), _tensors(F32, seed=14)
    want = _expected(target, online, 0.75)
    hotloop.ema_update_(target, online, torch.tensor(0.75, dtype=F64))
    assert all(rel_err(t, w) <= TOL[F32] for t, w in zip(target, want))
    with pytest.raises(ValueError, match="decay"):
        hotloop.ema_update_(target, online, torch.tensor(1.5))
    with pytest.raises(ValueError, match="decay"):
        hotloop.ema_update_(target, online, torch.tensor([0.5, 0.5]))


def _net():
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))


@pytest.mark.parametrize("buffers", ["copy", "average", "skip"])
def test_modules_and_buffers(backend, buffers):
    torch.manual_seed(0)
    teacher, student = _net(), _net()
    student.train()(torch.randn(8, 6))  # BN running stats and its counter move
    t0 = copy.deepcopy(teacher)
    hotloop.ema_update_(teacher, student, 0.9, buffers=buffers)
    for p, p0, s in zip(teacher.parameters(), t0.parameters(), student.parameters()):
        assert rel_err(p, 0.9 * p0.double() + 0.1 * s.double()) <= TOL[F32]
    bn, bn0, sbn = teacher[1], t0[1], student[1]
    if buffers == "copy":
        assert torch.equal(bn.running_mean, sbn.running_mean)
    elif buffers == "average":
        assert rel_err(bn.running_mean, 0.9 * bn0.running_mean.double() + 0.1 * sbn.running_mean.double()) <= 1e-6
    else:
        assert torch.equal(bn.running_mean, bn0.running_mean)
    want_count = bn0.num_batches_tracked if buffers == "skip" else sbn.num_batches_tracked
    assert torch.equal(bn.num_batches_tracked, want_count)  # integers are copied, never averaged


def test_bad_inputs():
    a, b = _tensors(F32, seed=15), _tensors(F32, seed=16)
    with pytest.raises(ValueError, match="online"):
        hotloop.ema_update_(a, b[:-1], 0.5)
    with pytest.raises(ValueError, match="shape"):
        hotloop.ema_update_([torch.zeros(3)], [torch.zeros(4)], 0.5)
    with pytest.raises(TypeError, match="dtype pair"):
        hotloop.ema_update_([torch.zeros(3, dtype=BF16)], [torch.zeros(3)], 0.5)
    with pytest.raises(TypeError, match="dtype pair"):
        hotloop.ema_update_([torch.zeros(3, dtype=torch.int64)], [torch.zeros(3, dtype=torch.int64)], 0.5)
    for bad in (-0.1, 1.0001, math.nan, math.inf):
        with pytest.raises(ValueError, match="decay"):
            hotloop.ema_update_(a, b, bad)
    for bad in ("0.5", True, None):
        with pytest.raises(TypeError, match="decay"):
            hotloop.ema_update_(a, b, bad)
    with pytest.raises(ValueError, match="contiguous"):
        hotloop.ema_update_([torch.zeros(4, 4).t()], [torch.zeros(4, 4)], 0.5)
    with pytest.raises(ValueError, match="out_copy"):
        hotloop.ema_update_(a, b, 0.5, out_copy=[torch.zeros(1)] * len(a))
    with pytest.raises(TypeError, match="out_copy"):
        hotloop.ema_update_([torch.zeros(3)], [torch.zeros(3)], 0.5, out_copy=[torch.zeros(3, dtype=torch.int32)])
    with pytest.raises(ValueError, match="buffers"):
        hotloop.ema_update_(a, b, 0.5, buffers="mean")
    with pytest.raises(TypeError, match="target"):
        hotloop.ema_update_(3, b, 0.5)


def test_overlapping_tensors_refused():  # torch.lerp_ refuses them too; the fused kernel would read what it wrote
    buf = torch.randn(20, generator=torch.Generator().manual_seed(17))
    cases = [([buf[:10]], [buf[5:15]]),                      # target and online overlap
             ([buf[:10], buf[8:18]], [torch.zeros(10)] * 2),  # two targets overlap
             ([buf[:10]], [buf[:10]])]                         # the same memory
    for target, online in cases:
        before = buf.clone()
        with pytest.raises(ValueError, match="overlap"):
            hotloop.ema_update_(target, online, 0.5)
        assert torch.equal(buf, before)  # refused before any write
    with pytest.raises(ValueError, match="out_copy"):
        hotloop.ema_update_([buf[:10]], [torch.zeros(10)], 0.5, out_copy=[buf[4:14]])
    shared = torch.randn(10)  # online tensors may share memory: they are only read
    t1, t2 = torch.zeros(10), torch.zeros(10)
    hotloop.ema_update_([t1, t2], [shared, shared], 0.5)
    assert torch.equal(t1, 0.5 * shared) and torch.equal(t2, t1)


def test_compile_and_opcheck(monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", "cpu")
    target, online = _tensors(F32, SHAPES[:2], seed=17), _tensors(BF16, SHAPES[:2], seed=18)
    copies = [torch.empty(s, dtype=BF16) for s in SHAPES[:2]]
    want = _expected(target, online, 0.5)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(t, s, c):
        hotloop.ema_update_(t, s, 0.5, out_copy=c)

    step(target, online, copies)
    assert all(rel_err(t, w) <= TOL[F32] for t, w in zip(target, want))
    torch.library.opcheck(torch.ops.hotloop.ema_update.default, (target, online, copies, 0.9, None))
    torch.library.opcheck(torch.ops.hotloop.ema_update.default, (target, online, [], 0.9, None))


# --------------------------------------------------------------------------------------------- EMATeacher
def test_cosine_schedule_ends():
    assert cosine_decay(0.996, 0, 100) == pytest.approx(0.996, abs=1e-15)
    assert cosine_decay(0.996, 100, 100) == 1.0
    assert cosine_decay(0.996, 250, 100) == 1.0           # clamped past K
    assert cosine_decay(0.9, 50, 100) == pytest.approx(0.95)


def test_teacher_constant_and_cosine(backend):
    torch.manual_seed(1)
    student = _net()
    t = hotloop.EMATeacher(student, decay=0.9, schedule="cosine", total_steps=4)
    assert not any(p.requires_grad for p in t.module.parameters()) and not t.module.training
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in t.module.parameters()]
    assert t.update() == pytest.approx(0.9)          # k = 0: d_0
    for p, p0, s in zip(t.module.parameters(), before, student.parameters()):
        assert rel_err(p, 0.9 * p0.double() + 0.1 * s.double()) <= TOL[F32]
    frozen = [p.clone() for p in t.module.parameters()]
    assert t.update(step=4) == 1.0                     # k = K: the teacher stops moving
    assert all(torch.equal(p, f) for p, f in zip(t.module.parameters(), frozen))
    with pytest.raises(ValueError, match="total_steps"):
        hotloop.EMATeacher(student, schedule="cosine")
    with pytest.raises(ValueError, match="decay"):
        hotloop.EMATeacher(student, decay=1.5)


def test_teacher_bf16_student_float32_shadow(backend):
    torch.manual_seed(2)
    student = _net().to(BF16)
    t = hotloop.EMATeacher(student, decay=0.99)
    assert all(s is not None and s.dtype == F32 for s in t.shadow)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.5)
    for _ in range(3):
        t.update()
    for p, sh in zip(t.module.parameters(), t.shadow):
        assert p.dtype == BF16 and torch.equal(p, sh.to(BF16))  # the bf16 teacher is the shadow rounded once
    state = t.state_dict()
    t2 = hotloop.EMATeacher(_net().to(BF16), decay=0.5)
    t2.load_state_dict(state)
    assert t2.step == 3 and t2.decay == 0.99
    assert all(torch.equal(a, b) for a, b in zip(t2.shadow, t.shadow))
    assert all(torch.equal(a, b) for a, b in zip(t2.module.parameters(), t.module.parameters()))


def test_teacher_without_shadow_and_buffers(backend):
    torch.manual_seed(3)
    student = _net().to(BF16)
    t = hotloop.EMATeacher(student, decay=0.5, shadow_dtype=None, include_buffers=False)
    assert all(s is None for s in t.shadow)
    student.train()(torch.randn(8, 6, dtype=BF16))
    before = [p.clone() for p in t.module.parameters()]
    bn_before = t.module[1].running_mean.clone()
    t.update()
    for p, p0, s in zip(t.module.parameters(), before, student.parameters()):
        assert p.dtype == BF16 and rel_err(p, 0.5 * p0.double() + 0.5 * s.double()) <= TOL[BF16]
    assert torch.equal(t.module[1].running_mean, bn_before)  # buffers not tracked


# ------------------------------------------------------------------------------------ two processes (gloo)
def _ddp_worker(rank: int, world: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(rank)  # different init per rank: DDP broadcasts rank 0's weights
    model = nn.parallel.DistributedDataParallel(_net())
    teacher = hotloop.EMATeacher(model, decay=0.9, schedule="cosine", total_steps=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        x = torch.randn(8, 6)  # different data per rank; DDP averages the gradients
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        teacher.update()
    # parameters only: BN running statistics legitimately differ per rank after a forward on local data
    # (DDP re-broadcasts rank 0's at the next forward), and the teacher copies each rank's
    flat = torch.cat([p.reshape(-1) for p in teacher.module.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), "teachers differ between ranks"

    # FSDP2-style parameters: DTensors sharded along dim 0; the update works on each rank's local shard
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    lin.weight = nn.Parameter(distribute_tensor(lin.weight.detach(), mesh, [Shard(0)]))
    lin.bias = nn.Parameter(distribute_tensor(lin.bias.detach(), mesh, [Shard(0)]))
    t = hotloop.EMATeacher(lin, decay=0.75)
    before = [p.to_local().clone() for p in t.module.parameters()]
    with torch.no_grad():
        for p in lin.parameters():
            p.to_local().add_(1.0)
    t.update()
    for p, p0, s in zip(t.module.parameters(), before, lin.parameters()):
        want = 0.75 * p0.double() + 0.25 * s.to_local().double()
        assert rel_err(p.to_local(), want) <= 1e-6


def test_ddp_two_processes_same_teacher():
    run_ranks(_ddp_worker, world=2)


# ------------------------------------------------------------------------------------------------------ GPU
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("pair", PAIRS[:5], ids=lambda p: f"{str(p[0])[6:]}<-{str(p[1])[6:]}")
def test_cuda_matches_float64(pair):
    from hotloop._internal.extension import has_cuda_kernels

    if not has_cuda_kernels():
        pytest.skip("the extension was built without CUDA kernels")
    tdt, sdt = pair
    shapes = SHAPES + [(1 << 20) + 3, (5, 4099)]
    target, online = _tensors(tdt, shapes, 19, "cuda"), _tensors(sdt, shapes, 20, "cuda")
    # misaligned views: 16-byte loads must fall back to scalar ones
    target.append(torch.randn(1001, device="cuda").to(tdt)[1:])
    online.append(torch.randn(1001, device="cuda").to(sdt)[1:])
    copies = [torch.empty(t.shape, dtype=BF16, device="cuda") for t in target] if tdt == F32 else None
    want = _expected(target, online, 0.99)
    hotloop.ema_update_(target, online, torch.tensor(0.99, device="cuda"), out_copy=copies)
    for i, (t, w) in enumerate(zip(target, want)):
        assert rel_err(t.cpu(), w.cpu()) <= TOL[tdt]
        if copies is not None:
            assert torch.equal(copies[i], t.to(BF16))
