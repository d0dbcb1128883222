"""C++ CPU kernels of the per-token loss contracts (hotloop._C.cpu.policy_tokens / nft_tokens_cpu) against
policy_tokens_ref / nft_tokens_ref computed in float64 on the same inputs.

Inputs are random per test (seeded from the test's parameters) with the hard cases planted in: log-ratios beyond
+-20 (policy) or 10 (NFT) and exactly on those clamp edges, rho exactly on a clip edge, and NaN / inf inputs on
masked tokens, which must not reach any output.
"""
import math
import zlib

import pytest
import torch

import hotloop  # noqa: F401  (loads the extension that registers torch.ops.hotloop.*)
from hotloop.reference.policy_loss import nft_tokens_ref, policy_tokens_ref

from helpers import rel_err

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
SIZES = [1, 7, 5000, 70000]
DTYPES = [torch.float32, torch.float64]
KL_KINDS = {None: 0, "k1": 1, "k2": 2, "k3": 3}
CLIPS = [(0.2, 0.2), (0.2, 0.28), (0.0, 0.0)]  # (0, 0): lr = 0 puts rho exactly on both clip edges
POISON = [math.nan, math.inf, -math.inf]


def _gen(*params) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(params).encode()))


def _plant(x: torch.Tensor, values, g: torch.Generator) -> torch.Tensor:
    """Write `values` at random distinct positions of x (as many as fit); returns the positions."""
    pos = torch.randperm(x.numel(), generator=g)[:len(values)]
    x[pos] = torch.tensor(values[:pos.numel()], dtype=x.dtype)
    return pos


def _mask_and_weight(N: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mostly 0/1 mask with some fractional metric weights; loss weight 0 wherever the mask is."""
    u = torch.rand(N, generator=g, dtype=torch.float64)
    m = torch.where(u < 0.25, 0.0, torch.where(u < 0.35, 0.5, 1.0))
    if N > 0:
        m[0] = 1.0  # at least one live token
    w = m * torch.rand(N, generator=g, dtype=torch.float64) / max(N, 1) ** 0.5
    return m, w


def _poison_masked(x: torch.Tensor, m: torch.Tensor, g: torch.Generator) -> None:
    off = torch.nonzero(m == 0).flatten()
    x[off] = torch.tensor(POISON, dtype=x.dtype)[torch.randint(0, len(POISON), (off.numel(),), generator=g)]


def _policy_inputs(N, kl, g):
    m, w = _mask_and_weight(N, g)
    lr = torch.randn(N, generator=g, dtype=torch.float64) * 0.3
    pos = _plant(lr, [0.0] * 20, g)  # rho = 1: live, on the clip edges when a clip is 0
    m[pos], w[pos] = 1.0, 1.0 / max(N, 1) ** 0.5
    kld = torch.randn(N, generator=g, dtype=torch.float64) * 2.0
    # edges and beyond, on live tokens with a tiny weight so that rho up to e^20 does not drown the other tokens
    tiny = 2.0**-30
    for x, edges in ((lr, [20.0, -20.0, 20.5, -20.5, 35.0, -300.0]), (kld, [20.0, -20.0, 21.0, -21.0])):
        pos = _plant(x, edges, g)
        m[pos], w[pos] = tiny, tiny
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    for x in (lr, kld, adv):
        _poison_masked(x, m, g)
    return lr, (kld if kl is not None else None), adv, m, w


def _nft_inputs(N, g):
    m, w = _mask_and_weight(N, g)
    lr = torch.randn(N, generator=g, dtype=torch.float64) * 0.5
    pos = _plant(lr, [10.0, 10.0, 10.5, 12.0, 25.0, 0.0, -40.0], g)
    m[pos], w[pos] = 2.0**-18, 2.0**-18  # live, weighted so that R up to e^10 does not drown the other tokens
    r = 0.02 + 0.96 * torch.rand(N, generator=g, dtype=torch.float64)
    c = (torch.rand(N, generator=g) < 0.5).double()
    _poison_masked(lr, m, g)
    return lr, m, w, r, c


def _check(out: torch.Tensor, ref: torch.Tensor, dtype, m: torch.Tensor | None = None):
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    if m is not None:
        assert (out[m == 0] == 0).all()
    assert rel_err(out, ref) < TOL[dtype]


def _policy(lr, kld, adv, m, w, dtype, clip_low, clip_high, dual_clip, kl, kl_coef):
    cast = [None if t is None else t.to(dtype) for t in (lr, kld, adv, m, w)]
    return hotloop._C.cpu.policy_tokens(*cast, clip_low, clip_high, dual_clip, KL_KINDS[kl], kl_coef)


@pytest.mark.parametrize("clips", CLIPS)
@pytest.mark.parametrize("dual_clip", [0.0, 3.0])
@pytest.mark.parametrize("kl", list(KL_KINDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", SIZES)
def test_policy_tokens_match_reference(N, dtype, kl, dual_clip, clips):
    lr, kld, adv, m, w = _policy_inputs(N, kl, _gen("policy", N, str(dtype), kl, dual_clip, clips))
    # the reference sees exactly the kernel's inputs, in float64
    lr, kld, adv, m, w = [None if t is None else t.to(dtype).double() for t in (lr, kld, adv, m, w)]
    args = (*clips, dual_clip, kl, 0.1)
    g_lr, g_kl, sums = _policy(lr, kld, adv, m, w, dtype, *args)
    ref_g_lr, ref_g_kl, ref_sums = policy_tokens_ref(lr, kld, adv, m, w, *args)
    _check(g_lr, ref_g_lr, dtype, m)
    _check(g_kl, ref_g_kl, dtype, m if kl is not None else None)
    _check(sums, ref_sums, dtype)


@pytest.mark.parametrize("clamp_negative", [1.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", SIZES)
def test_nft_tokens_match_reference(N, dtype, clamp_negative):
    lr, m, w, r, c = _nft_inputs(N, _gen("nft", N, str(dtype), clamp_negative))
    lr, m, w, r, c = [t.to(dtype).double() for t in (lr, m, w, r, c)]
    g_lr, sums = hotloop._C.cpu.nft_tokens(*[t.to(dtype) for t in (lr, m, w, r, c)], clamp_negative)
    ref_g_lr, ref_sums = nft_tokens_ref(lr, m, w, r, c, clamp_negative)
    _check(g_lr, ref_g_lr, dtype, m)
    _check(sums, ref_sums, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty(dtype):
    e = torch.empty(0, dtype=dtype)
    g_lr, g_kl, sums = hotloop._C.cpu.policy_tokens(e, e, e, e, e, 0.2, 0.2, 3.0, 3, 0.1)
    assert g_lr.shape == (0,) and g_kl.shape == (0,) and torch.equal(sums, torch.zeros(6, dtype=dtype))
    g_lr, sums = hotloop._C.cpu.nft_tokens(e, e, e, e, e, 1.0)
    assert g_lr.shape == (0,) and torch.equal(sums, torch.zeros(3, dtype=dtype))


def test_deterministic_across_thread_counts():
    """Sums come from fixed token blocks added in order: bit-identical with 1 and 2 threads."""
    N = 70000
    lr, kld, adv, m, w = _policy_inputs(N, "k3", _gen("determinism"))
    nft = [t.float() for t in _nft_inputs(N, _gen("determinism-nft"))]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((_policy(lr, kld, adv, m, w, torch.float32, 0.2, 0.28, 3.0, "k3", 0.1),
                            hotloop._C.cpu.nft_tokens(*nft, 0.1)))
    finally:
        torch.set_num_threads(threads)
    (p1, n1), (p2, n2) = results
    for a, b in zip(p1 + n1, p2 + n2):
        assert torch.equal(a, b)


def _good_policy_args(N=8, dtype=torch.float32):
    x = torch.zeros(N, dtype=dtype)
    return [x, x.clone(), x.clone(), torch.ones(N, dtype=dtype), x.clone(), 0.2, 0.2, 0.0, 3, 0.1]


@pytest.mark.parametrize("index, bad, error, match", [
    (0, torch.zeros(8, dtype=torch.float16), TypeError, "`lr` must be float32 or float64"),
    (0, torch.zeros(8, dtype=torch.int64), TypeError, "`lr` must be float32 or float64"),
    (2, torch.zeros(8, dtype=torch.float64), TypeError, "`adv` must be"),
    (3, torch.zeros(9), ValueError, r"`m` must be \[N\] = \[8\]"),
    (4, torch.zeros(2, 4), ValueError, r"`w` must be \[N\]"),
    (0, torch.zeros(16)[::2], ValueError, "`lr` must be contiguous"),
    (1, torch.zeros(16)[::2], ValueError, "`kld` must be contiguous"),
    (1, None, ValueError, "`kld` must be given exactly when kl_kind != 0"),
    (8, 4, ValueError, "`kl_kind` must be"),
])
def test_policy_bad_inputs(index, bad, error, match):
    args = _good_policy_args()
    args[index] = bad
    with pytest.raises(error, match=match):
        hotloop._C.cpu.policy_tokens(*args)


def test_policy_kld_given_without_kl():
    args = _good_policy_args()
    args[8] = 0
    with pytest.raises(ValueError, match="`kld` must be given exactly when kl_kind != 0"):
        hotloop._C.cpu.policy_tokens(*args)


@pytest.mark.parametrize("index, bad, error, match", [
    (0, torch.zeros(8, dtype=torch.bfloat16), TypeError, "`lr` must be float32 or float64"),
    (4, torch.zeros(8, dtype=torch.float64), TypeError, "`c` must be"),
    (3, torch.zeros(7), ValueError, r"`r` must be \[N\] = \[8\]"),
    (2, torch.zeros(16)[::2], ValueError, "`w` must be contiguous"),
])
def test_nft_bad_inputs(index, bad, error, match):
    args = [torch.zeros(8) for _ in range(5)] + [1.0]
    args[index] = bad
    with pytest.raises(error, match=match):
        hotloop._C.cpu.nft_tokens(*args)
