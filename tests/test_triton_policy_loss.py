"""Kernel-level tests of the Triton policy-loss launchers, run on CPU tensors by the Triton interpreter.

policy_tokens_triton / nft_tokens_triton are compared with their contracts, policy_tokens_ref / nft_tokens_ref,
evaluated in float64 on the same float32 inputs, by relative norm error. Masked tokens hold NaN / inf in every
per-token input, so any leak of padding into a gradient or a sum shows up. Sizes: 1, 37 (one partial block) and
3000 (three programs, the last partial).
"""
import zlib

import pytest
import torch

# conftest.py sets TRITON_INTERPRET=1 when there is no GPU; with one, these CPU-tensor cases cannot run
if torch.cuda.is_available():
    pytest.skip("interpreter-only kernel tests (CPU tensors)", allow_module_level=True)

pytest.importorskip("triton")
pl = pytest.importorskip("hotloop.triton_kernels.policy_loss")
# the poisoned padding makes NaN / inf in the kernels' masked lanes (selected away), which numpy reports
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

from hotloop.contracts import KL_IDS  # noqa: E402
from hotloop.reference.policy_loss import nft_tokens_ref, policy_tokens_ref  # noqa: E402
from helpers import rel_err  # noqa: E402

TOL = 1e-5
SIZES = [1, 37, 3000]
KLS = [None, "k1", "k2", "k3"]
CLIP_LOW, CLIP_HIGH = 0.2, 0.28  # asymmetric, as in DAPO's clip-higher
DUAL_CLIP = 3.0
KL_COEF = 0.05
POLICY_NONNEG_SUMS = (1, 2, 3, 4)  # clip counts and the ratio sum: no cancellation, so each is checked alone
NFT_NONNEG_SUMS = (1, 2)


@pytest.fixture
def gen(request):
    """A generator seeded from the test's id: fresh inputs in every test, the same ones on every run."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


# ---------------------------------------------------------------------------------------------------- helpers
def make_mask(N, gen):
    """Metric weights in [0.5, 1.5), a quarter of them 0 (at least one of each kind when N > 1)."""
    keep = torch.rand(N, generator=gen) > 0.25
    if N > 1:
        keep[:2] = torch.tensor([False, True])
    return torch.where(keep, 0.5 + torch.rand(N, generator=gen), 0.0)


def poison_padding(m, gen, *tensors):
    """NaN, +inf or -inf where m == 0 in each tensor: a masked token must contribute nothing, whatever it holds."""
    pad = m == 0
    for t in tensors:
        bad = torch.tensor([float("nan"), float("inf"), float("-inf")])
        t[pad] = bad[torch.randint(0, 3, (int(pad.sum()),), generator=gen)]


def policy_inputs(N, kl, gen, lr_scale=0.3):
    """(lr, kld, adv, m, w): ratios around the clip range, padding poisoned; kld None when kl is None."""
    m = make_mask(N, gen)
    lr = torch.randn(N, generator=gen) * lr_scale
    kld = torch.randn(N, generator=gen)
    adv = torch.randn(N, generator=gen)
    w = torch.where(m != 0, torch.rand(N, generator=gen), 0.0)
    poison_padding(m, gen, lr, kld, adv, w)
    return lr, kld if kl else None, adv, m, w


def policy_both(lr, kld, adv, m, w, kl, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=0.0):
    """(Triton outputs, float64 reference outputs) on the same inputs."""
    out = pl.policy_tokens_triton(lr, kld, adv, m, w, clip_low, clip_high, dual_clip, KL_IDS[kl], KL_COEF)
    ref = policy_tokens_ref(*(None if t is None else t.double() for t in (lr, kld, adv, m, w)), clip_low,
                            clip_high, dual_clip, kl, KL_COEF)
    return out, ref


def nft_inputs(N, gen, lr_scale=1.0):
    """(lr, m, w, r, c): c in {0, 1}, r in (0.02, 0.98), ratios on both sides of every clamp; padding poisoned."""
    m = make_mask(N, gen)
    lr = torch.randn(N, generator=gen) * lr_scale
    w = torch.where(m != 0, torch.rand(N, generator=gen), 0.0)
    r = 0.02 + 0.96 * torch.rand(N, generator=gen)
    c = (torch.rand(N, generator=gen) < 0.5).float()
    poison_padding(m, gen, lr, w, r, c)
    return lr, m, w, r, c


def nft_both(lr, m, w, r, c, clamp_negative):
    out = pl.nft_tokens_triton(lr, m, w, r, c, clamp_negative)
    ref = nft_tokens_ref(*(t.double() for t in (lr, m, w, r, c)), clamp_negative)
    return out, ref


def assert_grad(out, ref, N):
    assert out.shape == (N,) and out.dtype == torch.float32
    assert torch.isfinite(out).all()  # every element written (poisoned NaN otherwise), no padding leaked
    assert rel_err(out, ref) < TOL, rel_err(out, ref)


def assert_sums(out, ref, nonneg):
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL, rel_err(out, ref)
    for j in nonneg:
        assert rel_err(out[j], ref[j]) < TOL, (j, out[j].item(), ref[j].item())


def assert_each_close(out, ref):
    """Every element within TOL of its own reference (exactly 0 where the reference is): for inputs whose
    outputs span many orders of magnitude, where a norm would only see the largest."""
    err = (out.double() - ref).abs()
    assert (err <= TOL * ref.abs()).all(), (out, ref)


# -------------------------------------------------------------------------------------------------- policy loss
@pytest.mark.parametrize("dual_clip", [0.0, DUAL_CLIP], ids=["no_dual", "dual"])
@pytest.mark.parametrize("kl", KLS, ids=str)
@pytest.mark.parametrize("N", SIZES)
def test_policy_matches_ref(gen, N, kl, dual_clip):
    inputs = policy_inputs(N, kl, gen)
    (g_lr, g_kl, sums), (r_lr, r_kl, r_sums) = policy_both(*inputs, kl, dual_clip=dual_clip)
    assert_grad(g_lr, r_lr, N)
    if kl is None:
        assert g_kl.shape == (0,)
    else:
        assert_grad(g_kl, r_kl, N)
    assert_sums(sums, r_sums, POLICY_NONNEG_SUMS)


@pytest.mark.parametrize("dual_clip", [0.0, DUAL_CLIP], ids=["no_dual", "dual"])
def test_policy_clamp_edges(gen, dual_clip):
    # lr and d on and just past +-20, the closed ends of the clamps (gradient on at 20, off at 20.5), both signs
    # of the advantage; k3 reads d, where the clamp of -d is what matters
    edges = torch.tensor([-30.0, -20.5, -20.0, -19.5, -1.0, 1.0, 19.5, 20.0, 20.5, 30.0])
    n = edges.numel()
    lr = edges.repeat(2)
    kld = edges.flip(0).repeat(2)
    adv = torch.cat([torch.full((n,), 0.7), torch.full((n,), -0.7)])
    m = torch.ones(2 * n)
    w = 0.5 + torch.rand(2 * n, generator=gen)
    (g_lr, g_kl, sums), (r_lr, r_kl, r_sums) = policy_both(lr, kld, adv, m, w, "k3", dual_clip=dual_clip)
    assert_each_close(g_lr, r_lr)
    assert_each_close(g_kl, r_kl)
    assert_each_close(sums, r_sums)


def test_policy_ratio_on_clip_bounds(gen):
    # lr = 0 gives rho = 1 exactly; with no clip room that is both bounds: neither clip count may fire, and the
    # gradient stays -w * adv (the closed range)
    N = 37
    _, _, adv, m, w = policy_inputs(N, None, gen)
    lr = torch.where(m != 0, 0.0, float("nan"))
    (g_lr, _, sums), (r_lr, _, r_sums) = policy_both(lr, None, adv, m, w, None, clip_low=0.0, clip_high=0.0)
    assert sums[1] == 0 and sums[2] == 0
    assert_grad(g_lr, r_lr, N)
    assert torch.equal(g_lr, torch.where(m != 0, -w * adv, 0.0))
    assert_sums(sums, r_sums, POLICY_NONNEG_SUMS)


@pytest.mark.parametrize("kl", KLS, ids=str)
def test_policy_all_masked(gen, kl):
    N = 37
    lr, kld, adv, m, w = policy_inputs(N, kl, gen)
    m.zero_()
    poison_padding(m, gen, *(t for t in (lr, kld, adv, w) if t is not None))
    g_lr, g_kl, sums = pl.policy_tokens_triton(lr, kld, adv, m, w, CLIP_LOW, CLIP_HIGH, DUAL_CLIP,
                                               KL_IDS[kl], KL_COEF)
    assert torch.equal(g_lr, torch.zeros(N)) and torch.equal(sums, torch.zeros(6))
    assert torch.equal(g_kl, torch.zeros(N if kl else 0))


def test_policy_deterministic(gen):
    # no atomics: a second launch gives the same bits, sums included
    inputs = policy_inputs(3000, "k3", gen)
    first = pl.policy_tokens_triton(*inputs, CLIP_LOW, CLIP_HIGH, DUAL_CLIP, 3, KL_COEF)
    second = pl.policy_tokens_triton(*inputs, CLIP_LOW, CLIP_HIGH, DUAL_CLIP, 3, KL_COEF)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("kl_kind", [0, 3])
def test_policy_empty(kl_kind):
    e = torch.empty(0)
    g_lr, g_kl, sums = pl.policy_tokens_triton(e, e if kl_kind else None, e, e, e, CLIP_LOW, CLIP_HIGH, 0.0,
                                               kl_kind, KL_COEF)
    assert g_lr.shape == (0,) and g_kl.shape == (0,)
    assert torch.equal(sums, torch.zeros(6))


def test_policy_bad_arguments():
    x = torch.zeros(8)
    with pytest.raises(ValueError, match="kl_kind must be one of"):
        pl.policy_tokens_triton(x, x, x, x, x, CLIP_LOW, CLIP_HIGH, 0.0, 4, KL_COEF)
    with pytest.raises(ValueError, match="kld must be given"):
        pl.policy_tokens_triton(x, None, x, x, x, CLIP_LOW, CLIP_HIGH, 0.0, 1, KL_COEF)
    with pytest.raises(ValueError, match="kld must be given"):
        pl.policy_tokens_triton(x, x, x, x, x, CLIP_LOW, CLIP_HIGH, 0.0, 0, KL_COEF)
    with pytest.raises(ValueError, match="adv must be a contiguous float32"):
        pl.policy_tokens_triton(x, None, x.double(), x, x, CLIP_LOW, CLIP_HIGH, 0.0, 0, KL_COEF)
    with pytest.raises(ValueError, match="w must be a contiguous float32"):
        pl.policy_tokens_triton(x, None, x, x, x[:7], CLIP_LOW, CLIP_HIGH, 0.0, 0, KL_COEF)
    with pytest.raises(ValueError, match="kld must be a contiguous float32"):
        pl.policy_tokens_triton(x, torch.zeros(16)[::2], x, x, x, CLIP_LOW, CLIP_HIGH, 0.0, 2, KL_COEF)


# ---------------------------------------------------------------------------------------------------------- NFT
@pytest.mark.parametrize("clamp_negative", [1.0, 0.1])
@pytest.mark.parametrize("N", SIZES)
def test_nft_matches_ref(gen, N, clamp_negative):
    inputs = nft_inputs(N, gen)
    (g_lr, sums), (r_lr, r_sums) = nft_both(*inputs, clamp_negative)
    assert_grad(g_lr, r_lr, N)
    assert_sums(sums, r_sums, NFT_NONNEG_SUMS)


@pytest.mark.parametrize("clamp_negative", [1.0, 0.1])
def test_nft_clamp_edges(gen, clamp_negative):
    # lr on and past 10 (gradient on at 10, off beyond), lr = 0 where x = 1 exactly (on the clamp for 1.0:
    # not counted as clamped), and ratios deep on either side; each for a correct and an incorrect response
    edges = torch.tensor([-30.0, -1.0, 0.0, 0.5, 9.5, 10.0, 10.5, 12.0, 30.0])
    n = edges.numel()
    lr = edges.repeat(2)
    c = torch.cat([torch.ones(n), torch.zeros(n)])
    r = 0.02 + 0.96 * torch.rand(2 * n, generator=gen)
    m = torch.ones(2 * n)
    w = 0.5 + torch.rand(2 * n, generator=gen)
    (g_lr, sums), (r_lr, r_sums) = nft_both(lr, m, w, r, c, clamp_negative)
    assert_each_close(g_lr, r_lr)
    assert_sums(sums, r_sums, NFT_NONNEG_SUMS)


def test_nft_deterministic(gen):
    inputs = nft_inputs(3000, gen)
    first = pl.nft_tokens_triton(*inputs, 0.1)
    second = pl.nft_tokens_triton(*inputs, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_nft_empty():
    e = torch.empty(0)
    g_lr, sums = pl.nft_tokens_triton(e, e, e, e, e, 1.0)
    assert g_lr.shape == (0,) and torch.equal(sums, torch.zeros(3))


def test_nft_bad_arguments():
    x = torch.zeros(8)
    with pytest.raises(ValueError, match="r must be a contiguous float32"):
        pl.nft_tokens_triton(x, x, x, x.double(), x, 1.0)
    with pytest.raises(ValueError, match="c must be a contiguous float32"):
        pl.nft_tokens_triton(x, x, x, x, x[:4], 1.0)
