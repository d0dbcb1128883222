"""hotloop.knn against the float64 brute-force spec (hotloop.reference.knn) on every backend."""
import pytest
import torch

import hotloop
from hotloop.reference.knn import knn_ref, knn_scores_ref
from helpers import HAS_CUDA, rel_err

KNN_BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("cpu", id="cpu"),
]
METRICS = ["l2", "ip", "cosine"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _data(Q, M, d, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(Q, d, generator=g).to(dtype).to(device), torch.randn(M, d, generator=g).to(dtype).to(device))


def _check(scores, idx, queries, keys, k, metric, valid=None):
    """Scores match the spec and every returned index really has the returned score (near-ties may swap)."""
    ref_s, ref_i = knn_ref(queries, keys, k, metric, valid)
    assert scores.shape == idx.shape == (queries.shape[0], k)
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64
    assert torch.equal(idx < 0, ref_i < 0)
    found = idx >= 0
    assert rel_err(scores[found], ref_s[found]) < 1e-5
    full = knn_scores_ref(queries, keys, metric)
    got = full.gather(1, idx.cpu().clamp_min(0))
    assert rel_err(got[found.cpu()], ref_s[found].double().cpu()) < 1e-5
    assert (idx == ref_i).float().mean() > 0.99  # identical but for float32 near-ties


@pytest.mark.parametrize("backend", KNN_BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_knn_matches_bruteforce(backend, metric, dtype, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    q, x = _data(37, 1531, 24, dtype)
    for k in (1, 7, 1531):
        s, i = hotloop.knn(q, x, k, metric=metric)
        _check(s, i, q, x, k, metric)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("blocks", [(8, 64), (5, 37), (1, 1)])
def test_knn_cpu_many_tiles(metric, blocks):
    """Tiles smaller than the data: heaps carry over key blocks, rows split over query blocks."""
    q, x = _data(29, 700, 16, seed=1)
    for k in (1, 16, 300, 700):
        s, i = hotloop._C.cpu.knn(q, x, k, metric, None, *blocks)
        _check(s, i, q, x, k, metric)


@pytest.mark.parametrize("backend", KNN_BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_knn_ties_and_duplicates(backend, metric, monkeypatch):
    """Small integers: every score is exact in float32, so equal scores must come out lower index first."""
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-2, 3, (400, 6), generator=g).float()
    x[200:300] = x[:100]  # exact duplicates
    q = torch.randint(-2, 3, (23, 6), generator=g).float()
    for k in (1, 50, 400):
        s, i = hotloop.knn(q, x, k, metric=metric)
        rs, ri = knn_ref(q, x, k, metric)
        assert torch.equal(i, ri)
        assert torch.equal(s, rs)


@pytest.mark.parametrize("backend", KNN_BACKENDS)
def test_knn_large_k(backend, monkeypatch):
    """k > 2048 (FAISS GPU's limit)."""
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    q, x = _data(5, 3000, 8, seed=3)
    s, i = hotloop.knn(q, x, 2500, metric="l2")
    _check(s, i, q, x, 2500, "l2")
    assert torch.all(s[:, 1:] >= s[:, :-1])


@pytest.mark.parametrize("backend", KNN_BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_knn_valid_mask_and_padding(backend, metric, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    q, x = _data(11, 300, 8, seed=4)
    valid = torch.zeros(300, dtype=torch.bool)
    valid[torch.randperm(300, generator=torch.Generator().manual_seed(5))[:40]] = True
    s, i = hotloop.knn(q, x, 60, metric=metric, valid=valid)
    _check(s, i, q, x, 60, metric, valid)
    assert torch.all(valid[i[:, :40]]) and torch.all(i[:, 40:] == -1)
    pad = float("inf") if metric == "l2" else float("-inf")
    assert torch.all(s[:, 40:] == pad)
    s, i = hotloop.knn(q, x, 3, metric=metric, valid=torch.zeros(300, dtype=torch.bool))  # nothing valid
    assert torch.all(i == -1) and torch.all(s == pad)


def test_knn_empty_queries():
    q, x = _data(0, 10, 4)
    s, i = hotloop.knn(q, x, 3)
    assert s.shape == i.shape == (0, 3)


@pytest.mark.parametrize("backend", KNN_BACKENDS)
@pytest.mark.parametrize("where", ["queries", "keys"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_knn_rejects_non_finite(backend, where, bad, monkeypatch):
    monkeypatch.setenv("HOTLOOP_BACKEND", backend)
    q, x = _data(4, 20, 5)
    (q if where == "queries" else x)[2, 3] = bad
    with pytest.raises(ValueError, match=rf"`{where}` must be finite"):
        hotloop.knn(q, x, 3)


def test_knn_argument_errors():
    q, x = _data(4, 20, 5)
    with pytest.raises(ValueError, match="dim d"):
        hotloop.knn(q, x[:, :4], 3)
    with pytest.raises(ValueError, match=r"\[Q, d\]"):
        hotloop.knn(q[0], x, 3)
    with pytest.raises(TypeError, match="same dtype"):
        hotloop.knn(q, x.half(), 3)
    with pytest.raises(TypeError, match="queries"):
        hotloop.knn(q.double(), x.double(), 3)
    with pytest.raises(TypeError, match="keys"):
        hotloop.knn(q, x.long(), 3)
    for k in (0, 21, -1):
        with pytest.raises(ValueError, match="`k` must lie in"):
            hotloop.knn(q, x, k)
    with pytest.raises(TypeError, match="`k`"):
        hotloop.knn(q, x, 2.0)
    with pytest.raises(ValueError, match="metric"):
        hotloop.knn(q, x, 3, metric="l1")
    with pytest.raises(ValueError, match="valid"):
        hotloop.knn(q, x, 3, valid=torch.ones(19, dtype=torch.bool))
    with pytest.raises(TypeError, match="valid"):
        hotloop.knn(q, x, 3, valid=torch.ones(20))


def test_knn_opcheck():
    q, x = _data(9, 50, 8)
    valid = torch.rand(50, generator=torch.Generator().manual_seed(0)) > 0.3
    for args in [(q, x, 5, "l2", None), (q, x, 50, "cosine", valid), (q.bfloat16(), x.bfloat16(), 3, "ip",
                                                                                  None)]:
        torch.library.opcheck(torch.ops.hotloop.knn_fwd.default, args)


def test_knn_compile_fullgraph():
    q, x = _data(9, 50, 8)

    @torch.compile(fullgraph=True)
    def f(q, x):
        s, i = hotloop.knn(q, x, 4, metric="cosine")
        return s * 2, i

    s, i = f(q, x)
    rs, ri = hotloop.knn(q, x, 4, metric="cosine")
    assert torch.equal(i, ri) and torch.allclose(s, rs * 2)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_knn_cuda_matches_bruteforce(metric, dtype):
    q, x = _data(70, 5000, 40, dtype, device="cuda")
    valid = (torch.rand(5000, generator=torch.Generator().manual_seed(6)) > 0.1).cuda()
    for k in (1, 16, 700, 4096, 5000):
        s, i = hotloop.knn(q, x, k, metric=metric)
        _check(s, i, q, x, k, metric)
        s, i = hotloop.knn(q, x, k, metric=metric, valid=valid)
        _check(s, i, q, x, k, metric, valid)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_knn_cuda_ties_and_splits(metric, monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-2, 3, (3000, 6), generator=g).float()
    x[1500:2000] = x[:500]
    q = torch.randint(-2, 3, (40, 6), generator=g).float()
    rs, ri = knn_ref(q, x, 300, metric)
    for splits in ("0", "1", "7"):  # automatic, none, and a merge of 7 per-split lists
        monkeypatch.setenv("HOTLOOP_KNN_SPLITS", splits)
        s, i = hotloop.knn(q.cuda(), x.cuda(), 300, metric=metric)
        assert torch.equal(i.cpu(), ri) and torch.equal(s.cpu(), rs)
