"""hotloop.EpisodicMemory, novelty_reward and memory_rewards against plain float64 math (docs/knn.md)."""
import math

import pytest
import torch

import hotloop
from hotloop.reference.knn import knn_ref
from helpers import HAS_CUDA

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU"))]


def _rand(*shape, seed=0, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_memory_search_partly_filled(device, metric):
    mem = hotloop.EpisodicMemory(8, 50, metric=metric, device=device)
    keys, q = _rand(30, 8, seed=1, device=device), _rand(6, 8, seed=2, device=device)
    assert torch.equal(mem.add(keys).cpu(), torch.arange(30)) and len(mem) == 30
    s, slots = mem.search(q, 40)  # k above the fill: padded
    rs, ri = knn_ref(q, keys, 30, metric)
    assert torch.equal(slots[:, :30].cpu(), ri.cpu()) and torch.all(slots[:, 30:] == -1)
    assert torch.allclose(s[:, :30].cpu(), rs.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_memory_empty_and_clear(device):
    mem = hotloop.EpisodicMemory(4, 10, value_dim=3, device=device)
    q = _rand(3, 4, device=device)
    s, slots = mem.search(q, 5)
    assert torch.all(slots == -1) and torch.all(s == float("inf")) and len(mem) == 0
    assert torch.equal(mem.read(q, 5), torch.zeros(3, 3, device=device))
    mem.add(_rand(4, 4, device=device), _rand(4, 3, device=device))
    mem.clear()
    assert len(mem) == 0 and torch.all(mem.search(q, 2)[1] == -1)


def test_memory_ring_overwrite_order():
    mem = hotloop.EpisodicMemory(2, 5, value_dim=1)
    rows = lambda a, b: torch.arange(a, b, dtype=torch.float32)[:, None].repeat(1, 2)  # noqa: E731
    assert mem.add(rows(0, 3), rows(0, 3)[:, :1]).tolist() == [0, 1, 2]
    assert mem.add(rows(3, 7), rows(3, 7)[:, :1]).tolist() == [3, 4, 0, 1]  # oldest (0, 1) overwritten first
    assert mem.keys[:, 0].tolist() == [5, 6, 2, 3, 4] and mem.values[:, 0].tolist() == [5, 6, 2, 3, 4]
    assert len(mem) == 5
    slots = mem.add(rows(7, 19), rows(7, 19)[:, :1])  # more rows than slots: the last 5 survive
    assert slots.tolist() == [2, 3, 4, 0, 1] * 2 + [2, 3]
    assert sorted(mem.keys[:, 0].tolist()) == [14, 15, 16, 17, 18]
    assert mem.keys[3, 0] == 18  # row 18 went to slot (2 + 16) % 5 = 3
    s, slot = mem.search(torch.tensor([[16.2, 16.2]]), 1)
    assert slot.item() == 1 and mem.keys[1, 0] == 16


@pytest.mark.parametrize("device", DEVICES)
def test_memory_save_load_round_trip(device, tmp_path):
    mem = hotloop.EpisodicMemory(6, 20, value_dim=6, metric="l2", device=device)
    mem.add(_rand(25, 6, seed=3, device=device), _rand(25, 6, seed=4, device=device))
    q = _rand(5, 6, seed=5, device=device)
    hotloop.novelty_reward(mem, q)
    hotloop.memory_rewards(mem, q, k=3)
    path = tmp_path / "mem.pt"
    mem.save(path)
    other = hotloop.EpisodicMemory(6, 20, value_dim=6, metric="l2", device=device).load(path)
    assert len(other) == 20 and torch.equal(other._ptr, mem._ptr)
    assert torch.equal(other.keys, mem.keys) and torch.equal(other.values, mem.values)
    for a, b in zip(mem.search(q, 7), other.search(q, 7)):
        assert torch.equal(a, b)
    assert torch.equal(hotloop.novelty_reward(mem, q), hotloop.novelty_reward(other, q))
    assert all(torch.equal(a, b) for a, b in zip(hotloop.memory_rewards(mem, q, k=3),
                                                 hotloop.memory_rewards(other, q, k=3)))
    # the next writes go to the same slots
    new = _rand(2, 6, seed=6, device=device)
    assert torch.equal(mem.add(new, new), other.add(new, new))
    with pytest.raises(ValueError, match="capacity"):
        hotloop.EpisodicMemory(6, 21, value_dim=6, device=device).load_state_dict(mem.state_dict())


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("weighting", ["softmax", "inverse_distance"])
def test_memory_read(metric, weighting):
    mem = hotloop.EpisodicMemory(5, 40, value_dim=3, metric=metric)
    keys, vals, q = _rand(33, 5, seed=7), _rand(33, 3, seed=8), _rand(4, 5, seed=9)
    mem.add(keys, vals)
    s, i = knn_ref(q, keys, 6, metric)
    s = s.double()
    if weighting == "softmax":
        w = torch.softmax(-s if metric == "l2" else s, dim=1)
    else:
        w = 1.0 / ((s if metric == "l2" else 1 - s) + 1e-3)
        w = w / w.sum(1, keepdim=True)
    want = (w[..., None] * vals.double()[i]).sum(1)
    got = mem.read(q, 6, weighting)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5)


def _ngu(d2, mean, k_found, xi=0.008, eps=1e-3, c=1e-3, s_max=8.0):
    out = []
    for row in d2.tolist():
        kern = sum(eps / (max(v / mean - xi, 0.0) + eps) for v in row[:k_found])
        s = math.sqrt(kern) + c
        out.append(0.0 if s > s_max else 1.0 / s)
    return torch.tensor(out)


def test_novelty_reward_ngu():
    mem = hotloop.EpisodicMemory(4, 100)
    keys = _rand(60, 4, seed=10)
    mem.add(keys)
    q1, q2 = _rand(5, 4, seed=11), _rand(3, 4, seed=12) * 3
    d1, _ = knn_ref(q1, keys, 10, "l2")
    r1 = hotloop.novelty_reward(mem, q1)
    assert torch.allclose(r1, _ngu(d1.double(), d1.double().mean().item(), 10).float(), rtol=1e-4)
    d2, _ = knn_ref(q2, keys, 10, "l2")
    running = torch.cat([d1.flatten(), d2.flatten()]).double().mean().item()  # running mean over both calls
    r2 = hotloop.novelty_reward(mem, q2)
    assert torch.allclose(r2, _ngu(d2.double(), running, 10).float(), rtol=1e-4)
    assert torch.all(r2 > 0) and torch.all(r2 <= 1 / 1e-3)
    # sitting on 70 stored copies of itself: sum K = 70, s = sqrt(70) + c > s_max -> 0 (k = 60 copies: not yet)
    mem.add(torch.zeros(70, 4))
    assert hotloop.novelty_reward(mem, torch.zeros(1, 4), k=70).item() == 0.0
    assert hotloop.novelty_reward(mem, torch.zeros(1, 4), k=60).item() == pytest.approx(1 / (math.sqrt(60) + 1e-3))
    with pytest.raises(ValueError, match="l2"):
        hotloop.novelty_reward(hotloop.EpisodicMemory(4, 10, metric="ip"), q1)


def test_novelty_reward_few_entries():
    mem = hotloop.EpisodicMemory(3, 20)
    q = _rand(2, 3, seed=13)
    assert torch.allclose(hotloop.novelty_reward(mem, q), torch.full((2,), 1 / 1e-3))  # empty: 1 / c
    keys = _rand(4, 3, seed=14)
    mem.add(keys)
    d, _ = knn_ref(q, keys, 4, "l2")
    assert torch.allclose(hotloop.novelty_reward(mem, q), _ngu(d.double(), d.double().mean().item(), 4).float(),
                          rtol=1e-4)


def test_memory_rewards_exploit_explore():
    mem = hotloop.EpisodicMemory(4, 30, value_dim=4)
    keys, vals = _rand(20, 4, seed=15), _rand(20, 4, seed=16)
    mem.add(keys, vals)
    e = _rand(6, 4, seed=17)
    _, idx = knn_ref(e, keys, 3, "l2")
    dist = (e.double() - vals.double()[idx].mean(1)).norm(dim=1)
    cos = torch.nn.functional.cosine_similarity(e.double()[:, None], vals.double()[None], dim=2).amax(1)
    raw_explore = 1 - cos
    norm = lambda x: (x - x.min()) / (x.max() - x.min())  # noqa: E731  (the window holds this batch only)
    out = hotloop.memory_rewards(mem, e, k=3, window=100)
    assert torch.allclose(out.exploit.double(), 1 - norm(dist), atol=1e-5)
    assert torch.allclose(out.explore.double(), norm(raw_explore), atol=1e-5)
    # a second batch is normalised over the window holding both
    e2 = _rand(2, 4, seed=18)
    _, idx2 = knn_ref(e2, keys, 3, "l2")
    dist2 = (e2.double() - vals.double()[idx2].mean(1)).norm(dim=1)
    window = torch.cat([dist, dist2])
    out2 = hotloop.memory_rewards(mem, e2, k=3, window=100)
    assert torch.allclose(out2.exploit.double(), 1 - (dist2 - window.min()) / (window.max() - window.min()), atol=1e-5)
    assert torch.all((out2.explore >= 0) & (out2.explore <= 1))


def test_memory_rewards_empty_memory():
    mem = hotloop.EpisodicMemory(4, 30)
    out = hotloop.memory_rewards(mem, _rand(3, 4), k=2)
    assert torch.equal(out.exploit, torch.zeros(3)) and torch.equal(out.explore, torch.ones(3))
    assert torch.all(torch.isnan(mem.stats["exploit_window"]))  # nothing recorded
    with pytest.raises(ValueError, match="value_dim"):
        hotloop.memory_rewards(hotloop.EpisodicMemory(4, 30, value_dim=2), _rand(3, 4), k=2)


def test_memory_errors():
    mem = hotloop.EpisodicMemory(4, 10, value_dim=2)
    with pytest.raises(ValueError, match=r"\[n, 4\]"):
        mem.add(torch.zeros(3, 5), torch.zeros(3, 2))
    with pytest.raises(TypeError, match="dtype"):
        mem.add(torch.zeros(3, 4, dtype=torch.float16), torch.zeros(3, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="values"):
        mem.add(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="one row per key"):
        mem.add(torch.zeros(3, 4), torch.zeros(2, 2))
    bad = torch.zeros(3, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        mem.add(bad, torch.zeros(3, 2))
    assert len(mem) == 0  # nothing written
    with pytest.raises(ValueError, match="finite"):
        mem.search(bad, 2)
    with pytest.raises(ValueError, match=r"\[n, 4\]"):
        mem.search(torch.zeros(3, 3), 2)
    with pytest.raises(ValueError, match="`k`"):
        mem.search(torch.zeros(3, 4), 11)
    with pytest.raises(ValueError, match="weighting"):
        mem.read(torch.zeros(3, 4), 2, "mean")
    with pytest.raises(ValueError, match="capacity"):
        hotloop.EpisodicMemory(4, 0)
    with pytest.raises(ValueError, match="metric"):
        hotloop.EpisodicMemory(4, 5, metric="l1")
    with pytest.raises(TypeError, match="dtype"):
        hotloop.EpisodicMemory(4, 5, dtype=torch.float64)


def test_memory_bf16_storage():
    mem = hotloop.EpisodicMemory(8, 16, dtype=torch.bfloat16)
    keys = _rand(16, 8, seed=19).bfloat16()
    mem.add(keys)
    q = _rand(3, 8, seed=20).bfloat16()
    s, i = mem.search(q, 4)
    rs, ri = knn_ref(q, keys, 4, "l2")
    assert torch.equal(i, ri) and torch.allclose(s, rs, rtol=1e-5)
