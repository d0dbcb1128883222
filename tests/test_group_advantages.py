"""group_advantages (docs/group_advantages.md): every kind x scale, fixed and ragged groups, every backend, against float64 math.

The expected values come from `_expected`, a vectorised float64 version of the formulas written here (scatter
sums, no loop), which also cross-checks the looped reference `group_advantages_ref`. Triton runs in the
interpreter on CPU, so its cases keep R small; the C++ kernel also gets an R past its threading threshold.
"""
import pytest
import torch

import hotloop
from hotloop.reference import group_advantages_ref

from helpers import BACKENDS, HAS_CUDA, device_for, interpreted, rel_err

KINDS = ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "passk"]
SCALES = ["group", "batch", "none"]
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6, torch.float64: 1e-12}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "cuda":
        pytest.skip("group_advantages has no CUDA C++ kernel: CUDA tensors run the Triton kernels (the triton case)")
    monkeypatch.setenv("HOTLOOP_BACKEND", request.param)
    return request.param


def _expected(r: torch.Tensor, gid: torch.Tensor, kind: str, scale: str = "group", eps: float = 1e-6):
    """docs/group_advantages.md in float64, vectorised over groups (finite rewards)."""
    r, gid = r.double().cpu(), gid.long().cpu()
    R = r.numel()
    n = torch.zeros(R, dtype=torch.float64).index_add_(0, gid, torch.ones_like(r))[gid]
    mean = torch.zeros(R, dtype=torch.float64).index_add_(0, gid, r)[gid] / n
    d = r - mean
    ss = torch.zeros(R, dtype=torch.float64).index_add_(0, gid, d * d)[gid]
    many = n > 1
    if kind == "grpo" and scale == "group":
        return torch.where(many, d / ((ss / (n - 1).clamp(min=1)).sqrt() + eps), 0.0)
    if kind == "grpo" and scale == "batch":
        return d / (r.std() + eps)
    if kind == "rloo":
        return torch.where(many, d * n / (n - 1).clamp(min=1), 0.0)
    if kind == "reinforce_pp_baseline":
        return (d - d.mean()) / (d.std() + eps)
    if kind == "passk":
        idx = torch.arange(R)
        max1 = torch.full((R,), -torch.inf, dtype=torch.float64).scatter_reduce(0, gid, r, "amax")
        best = torch.full((R,), R).scatter_reduce(0, gid, torch.where(r == max1[gid], idx, R), "amin")
        is_best = idx == best[gid]
        max2 = torch.full((R,), -torch.inf, dtype=torch.float64).scatter_reduce(
            0, gid, torch.where(is_best, -torch.inf, r), "amax")
        return torch.where(is_best & many, max1[gid] - max2[gid], 0.0)
    return d  # dr_grpo, grpo scale="none"


def _rewards(R: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(R, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)


def _ragged_ids(R: int, num_groups: int, seed: int = 0) -> torch.Tensor:
    """Random group sizes (singletons included), ids scattered over [0, R) (not contiguous, not all used)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(R, generator=g)[:num_groups]
    return ids[torch.randint(0, num_groups, (R,), generator=g)]


def _check(out, expected, dtype=torch.float32, tol=None):
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(out.cpu(), expected) < (tol or TOL[dtype]), (out, expected)


# ------------------------------------------------------------------------------------------------- the math
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("kind", KINDS)
def test_fixed_groups(backend, kind, scale):
    dev = device_for(backend)
    G, R = 4, 28
    r = _rewards(R)
    r[8:12] = 1.5            # zero-variance group
    r[16:20] = torch.tensor([3.0, 1.0, 3.0, 2.0])  # tie for the best: the first gets 0 (= 3 - 3)
    out = hotloop.group_advantages(r.to(dev), group_size=G, kind=kind, scale=scale)
    expected = _expected(r, torch.arange(R) // G, kind, scale)
    _check(out, expected)
    if kind == "grpo" and scale == "group":
        assert torch.all(out[8:12].cpu() == 0)
    if kind == "passk":
        assert torch.all(out[16:20].cpu() == 0)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("kind", KINDS)
def test_ragged_shuffled_equals_sorted_fixed(backend, kind, scale):
    dev = device_for(backend)
    G, R = 3, 30
    r = _rewards(R, seed=1)
    fixed = hotloop.group_advantages(r.to(dev), group_size=G, kind=kind, scale=scale).cpu()
    perm = torch.randperm(R, generator=torch.Generator().manual_seed(2))
    ids = (torch.arange(R) // G) * 7 % R  # distinct, non-contiguous ids
    ragged = hotloop.group_advantages(r[perm].to(dev), group_index=ids[perm].to(dev), kind=kind, scale=scale)
    assert rel_err(ragged.cpu(), fixed[perm]) < 1e-6


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("kind", KINDS)
def test_ragged_random_sizes(backend, kind, index_dtype):
    dev = device_for(backend)
    R = 40 if interpreted(backend) else 300
    r = _rewards(R, seed=3)
    ids = _ragged_ids(R, R // 4, seed=4)
    ids[0] = R - 1  # the largest id is used (most likely as a singleton)
    for scale in SCALES:
        out = hotloop.group_advantages(r.to(dev), group_index=ids.to(index_dtype).to(dev), kind=kind, scale=scale)
        _check(out, _expected(r, ids, kind, scale))
        _check(group_advantages_ref(r.double(), None, ids, kind, scale), _expected(r, ids, kind, scale),
               torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_dtypes(backend, kind, dtype):
    dev = device_for(backend)
    if dtype == torch.float64 and dev != "cpu":
        pytest.skip("float64 rewards are CPU only")
    r = _rewards(24, seed=5, dtype=dtype)
    ids = _ragged_ids(24, 6, seed=6)
    _check(hotloop.group_advantages(r.to(dev), group_size=6, kind=kind), _expected(r, torch.arange(24) // 6, kind),
           dtype)
    _check(hotloop.group_advantages(r.to(dev), group_index=ids.to(dev), kind=kind), _expected(r, ids, kind), dtype)


def test_cpu_threaded_sizes(monkeypatch):
    """Past the C++ kernel's threading threshold (2^14 responses), fixed and ragged."""
    monkeypatch.setenv("HOTLOOP_BACKEND", "cpu")
    R = 1 << 15
    r = _rewards(R, seed=7)
    ids = _ragged_ids(R, 2048, seed=8)
    for kind in KINDS:
        for scale in (SCALES if kind == "grpo" else ["group"]):
            _check(hotloop.group_advantages(r, group_size=16, kind=kind, scale=scale),
                   _expected(r, torch.arange(R) // 16, kind, scale))
            _check(hotloop.group_advantages(r, group_index=ids, kind=kind, scale=scale),
                   _expected(r, ids, kind, scale))


def test_singletons_and_zero_variance(backend):
    dev = device_for(backend)
    r = torch.tensor([2.0, 5.0, 5.0, 5.0, -1.0, 4.0])
    ids = torch.tensor([0, 1, 1, 1, 4, 4])  # a singleton, a zero-variance group, a pair
    out = {k: hotloop.group_advantages(r.to(dev), group_index=ids.to(dev), kind=k).cpu() for k in KINDS}
    for k in ("grpo", "dr_grpo", "rloo", "passk"):
        assert torch.all(out[k][:4] == 0), (k, out[k])
    # the pair [-1, 4]: mean 1.5, d = -+2.5, unbiased std 2.5 * sqrt(2)
    assert torch.allclose(out["grpo"][4:], torch.tensor([-0.70710678, 0.70710678]), rtol=1e-5)
    assert torch.allclose(out["rloo"][4:], torch.tensor([-5.0, 5.0]))
    assert torch.allclose(out["passk"], torch.tensor([0, 0, 0, 0, 0, 5.0]))
    # one response, and a batch of one group of identical rewards: no 0/0 anywhere
    for kind in KINDS:
        for scale in SCALES:
            one = hotloop.group_advantages(torch.tensor([3.0], device=dev), group_size=1, kind=kind, scale=scale)
            same = hotloop.group_advantages(torch.full((4,), 2.0, device=dev), group_size=4, kind=kind, scale=scale)
            assert torch.all(one.cpu() == 0) and torch.all(same.cpu() == 0), (kind, scale, one, same)


def test_empty(backend):
    dev = device_for(backend)
    r = torch.empty(0, device=dev)
    assert hotloop.group_advantages(r, group_size=4).shape == (0,)
    assert hotloop.group_advantages(r, group_index=torch.empty(0, dtype=torch.long, device=dev)).shape == (0,)
    assert hotloop.group_advantages(r, group_size=2, mask=torch.ones(0, 5, device=dev)).shape == (0, 5)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.bfloat16])
def test_mask_broadcast(backend, mask_dtype):
    dev = device_for(backend)
    R, T = 8, 5
    r = _rewards(R, seed=9)
    mask = torch.rand(R, T, generator=torch.Generator().manual_seed(10)) > 0.4
    mask[2] = False  # an empty response
    mask = mask.to(mask_dtype)
    a = hotloop.group_advantages(r.to(dev), group_size=4, kind="grpo")
    out = hotloop.group_advantages(r.to(dev), group_size=4, kind="grpo", mask=mask.to(dev))
    assert out.shape == (R, T) and out.dtype == torch.float32
    assert torch.equal(out.cpu(), a.cpu()[:, None] * mask.float())
    assert torch.all(out[2].cpu() == 0)
    empty = hotloop.group_advantages(r.to(dev), group_size=4, mask=torch.ones(R, 0, dtype=mask_dtype, device=dev))
    assert empty.shape == (R, 0)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("kind", KINDS)
def test_nan_reward_stays_in_its_group(backend, kind, scale):
    """Policy: a NaN reward makes its whole group NaN; the other groups keep their values. Batch statistics skip
    the non-finite values only: under grpo scale="batch" the NaN group's finite rewards still count."""
    dev = device_for(backend)
    r = _rewards(16, seed=11)
    clean = hotloop.group_advantages(r[4:].to(dev), group_size=4, kind=kind, scale=scale).cpu()
    r[1] = float("nan")
    if kind == "grpo" and scale == "batch":
        finite = r[torch.isfinite(r)].double()
        clean = _expected(r[4:], torch.arange(12) // 4, "dr_grpo") / (finite.std() + 1e-6)
    fixed = hotloop.group_advantages(r.to(dev), group_size=4, kind=kind, scale=scale).cpu()
    ids = torch.arange(16) // 4
    ragged = hotloop.group_advantages(r.to(dev), group_index=ids.to(dev), kind=kind, scale=scale).cpu()
    ref = group_advantages_ref(r, 4, None, kind, scale)
    for out in (fixed, ragged, ref):
        assert torch.all(torch.isnan(out[:4])), out
        assert rel_err(out[4:], clean) < 1e-6


def test_backends_agree_on_ties_and_order():
    """passk's best is the first index of the max in index order, for every backend (ragged ids shuffled)."""
    r = torch.tensor([1.0, 7.0, 7.0, 2.0, 7.0, 0.0])
    ids = torch.tensor([3, 3, 0, 0, 3, 0])
    expected = torch.tensor([0.0, 0.0, 5.0, 0.0, 0.0, 0.0])
    assert torch.equal(group_advantages_ref(r, None, ids, "passk"), expected)
    assert torch.equal(hotloop.group_advantages(r, group_index=ids, kind="passk"), expected)


# ------------------------------------------------------------------------------------------------- bad input
def _bad(match, error=ValueError, **kw):
    args = dict(rewards=torch.randn(8), group_size=4)
    args.update(kw)
    rewards = args.pop("rewards")
    with pytest.raises(error, match=match):
        hotloop.group_advantages(rewards, **{k: v for k, v in args.items() if v is not _DROP})


_DROP = object()


def test_bad_arguments(backend):
    dev = device_for(backend)
    ok_ids = torch.zeros(8, dtype=torch.long, device=dev)
    r = torch.randn(8, device=dev)
    _bad("exactly one of `group_size`.*both", rewards=r, group_index=ok_ids)
    _bad("exactly one of `group_size`.*neither", rewards=r, group_size=_DROP)
    _bad("`group_size`=3 must divide", rewards=r, group_size=3)
    _bad("`group_size` must be >= 1", rewards=r, group_size=0)
    _bad("`group_size` must be a Python int", TypeError, rewards=r, group_size=2.0)
    _bad("`group_size` must be a Python int", TypeError, rewards=r, group_size=torch.tensor(2))
    for bad in (8, -1, 100):
        ids = ok_ids.clone()
        ids[5] = bad
        _bad(r"`group_index` values must lie in \[0, R\) = \[0, 8\)", rewards=r, group_size=_DROP, group_index=ids)
    _bad(r"`group_index` must have shape \[R\]", rewards=r, group_size=_DROP, group_index=ok_ids[:7])
    _bad(r"`group_index` must have shape \[R\]", rewards=r, group_size=_DROP, group_index=ok_ids.view(2, 4))
    _bad("`group_index` must have dtype", TypeError, rewards=r, group_size=_DROP, group_index=ok_ids.float())
    _bad("`group_index` must be a torch.Tensor", TypeError, rewards=r, group_size=_DROP, group_index=[0] * 8)
    _bad("`kind` must be one of", rewards=r, kind="ppo")
    _bad("`scale` must be one of", rewards=r, scale="token")
    for eps in (0.0, -1e-6, float("nan"), float("inf")):
        _bad("`eps` must be a finite number > 0", rewards=r, eps=eps)
    _bad(r"`rewards` must be \[R\]", rewards=r.view(2, 4))
    _bad("`rewards` must have dtype", TypeError, rewards=r.long())
    _bad(r"`mask` must be \[R, T\]", rewards=r, mask=torch.ones(7, 3, device=dev))
    _bad(r"`mask` must be \[R, T\]", rewards=r, mask=torch.ones(8, device=dev))
    _bad("`mask` must have dtype", TypeError, rewards=r, mask=torch.ones(8, 3, dtype=torch.long, device=dev))


def test_bad_devices():
    r = torch.randn(8)
    _bad("is on meta", rewards=r, group_size=_DROP, group_index=torch.zeros(8, dtype=torch.long, device="meta"))
    _bad("is on meta", rewards=r, mask=torch.ones(8, 2, device="meta"))


def test_cpu_kernel_checks_its_own_arguments():
    """The kernel-level op is reachable directly (torch.ops.hotloop.*): it must not trust its caller."""
    op = hotloop._C.cpu.group_advantages
    r = torch.randn(8)
    with pytest.raises(ValueError, match="exactly one of"):
        op(r, None, 0, "grpo", "group", 1e-6)
    with pytest.raises(ValueError, match="must divide"):
        op(r, None, 3, "grpo", "group", 1e-6)
    with pytest.raises(ValueError, match="`kind` must be one of"):
        op(r, None, 4, "ppo", "group", 1e-6)
    with pytest.raises(ValueError, match="`scale` must be one of"):
        op(r, None, 4, "grpo", "tokens", 1e-6)
    with pytest.raises(ValueError, match="`eps` must be"):
        op(r, None, 4, "grpo", "group", 0.0)
    with pytest.raises(ValueError, match=r"found 9 at position 2"):
        op(r, torch.tensor([0, 1, 9, 0, 0, 0, 0, 0]), 0, "grpo", "group", 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        op(r, torch.zeros(16, dtype=torch.long)[::2], 0, "grpo", "group", 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        op(torch.randn(16)[::2], None, 4, "grpo", "group", 1e-6)


def test_unchecked_bad_ids_give_nan_not_a_wild_write(monkeypatch):
    """Triton with the host check off (as on GPU with HOTLOOP_CHECK_LABELS=0): bad ids -> NaN, nothing else."""
    monkeypatch.setenv("HOTLOOP_BACKEND", "triton")
    from hotloop.triton_kernels.group_advantages import group_advantages_fwd_triton

    r = _rewards(8, seed=12)
    ids = torch.tensor([0, 0, 8, 1, 1, -3, 0, 1])
    out = group_advantages_fwd_triton(r, ids, 0, "dr_grpo", "group", 1e-6)
    assert torch.isnan(out[[2, 5]]).all()
    keep = torch.tensor([0, 1, 3, 4, 6, 7])
    _check(out[keep], _expected(r[keep], ids[keep], "dr_grpo"))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_gpu_ragged_never_syncs(monkeypatch):
    monkeypatch.setenv("HOTLOOP_CHECK_LABELS", "0")
    r = _rewards(4096, seed=13).cuda()
    ids = _ragged_ids(4096, 512, seed=14).cuda()
    for kind in KINDS:
        hotloop.group_advantages(r, group_index=ids, kind=kind, scale="batch")  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for kind in KINDS:
            for scale in SCALES:
                hotloop.group_advantages(r, group_index=ids, kind=kind, scale=scale)
                hotloop.group_advantages(r, group_size=8, kind=kind, scale=scale)
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ----------------------------------------------------------------------------------------- compile / opcheck
def _advantage_loss_weights(rewards, ids, mask):
    a = hotloop.group_advantages(rewards, group_index=ids, kind="grpo")
    b = hotloop.group_advantages(rewards, group_size=4, kind="rloo", mask=mask)
    return a * 2, b.sum(-1)


def test_compile_fullgraph():
    torch._dynamo.reset()
    r = _rewards(16, seed=15)
    ids = _ragged_ids(16, 5, seed=16)
    mask = torch.rand(16, 3) > 0.5
    compiled = torch.compile(_advantage_loss_weights, fullgraph=True)
    for got, want in zip(compiled(r, ids, mask), _advantage_loss_weights(r, ids, mask)):
        assert rel_err(got, want) < 1e-6


def _sample_inputs():
    r = _rewards(12, seed=17)
    ids = _ragged_ids(12, 4, seed=18)
    for kind, scale in (("grpo", "group"), ("grpo", "batch"), ("passk", "group"), ("reinforce_pp_baseline", "none")):
        yield (r, None, 4, kind, scale, 1e-6)
        yield (r, ids, 0, kind, scale, 1e-6)
    yield (r.double(), ids.int(), 0, "rloo", "group", 1e-6)
    yield (r.bfloat16(), None, 3, "dr_grpo", "none", 1e-6)


@pytest.mark.parametrize("args", list(_sample_inputs()),
                         ids=lambda a: f"{a[0].dtype}-{'ragged' if a[1] is not None else 'fixed'}-{a[3]}-{a[4]}")
def test_opcheck(args):
    torch.library.opcheck(torch.ops.hotloop.group_advantages_fwd.default, args)


def test_opcheck_triton(monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", "triton")
    r, ids = _rewards(12, seed=19), _ragged_ids(12, 4, seed=20)
    torch.library.opcheck(torch.ops.hotloop.group_advantages_fwd.default, (r, ids, 0, "passk", "group", 1e-6))
