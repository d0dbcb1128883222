"""hotloop.train under data-parallel engines: 2 spawned gloo ranks, each on its half of a batch, against one process
on the whole batch (loss and every parameter gradient); a model that reaches hotloop without its wrapper raises.

Each rank returns its loss and its full gradients (FSDP2's sharded gradients gathered); the engines average the
ranks' gradients, so those equal the single process's, and the ranks' losses average to its loss."""
import pytest
import torch
from torch import nn

import hotloop
from distributed import run_ranks
from train_models import SEQUENCE, keep, rl_batch, tiny_llama

WORLD = 2
TOL = 1e-6


def _split(batch: dict, rank: int, world: int, micro: int = 1) -> list[dict]:
    """This rank's `micro` micro-batches: the whole batch's rows split in world * micro contiguous pieces."""
    pieces = world * micro
    B = batch["input_ids"].shape[0]
    size = B // pieces
    return [{k: v[(rank * micro + m) * size:(rank * micro + m + 1) * size] for k, v in batch.items()}
            for m in range(micro)]


def _algorithm(kind: str):
    if kind == "grpo":
        return hotloop.train.GRPO(num_generations=2, beta=0.04, loss_type="dapo"), rl_batch(B=8, seed=3)
    if kind == "grpo_seq":
        return hotloop.train.GRPO(num_generations=2, loss_type="grpo"), rl_batch(B=8, seed=4)
    if kind == "nft":
        batch = rl_batch(B=8, seed=5)
        batch = {**keep(batch, *SEQUENCE, "old_logps"), "correct": batch["rewards"] > 0}
        return hotloop.train.NFT(num_generations=2), batch
    if kind == "self_certainty":
        return hotloop.train.SelfCertainty(), keep(rl_batch(B=8, seed=8), *SEQUENCE)
    if kind == "dpo":
        batch = rl_batch(B=8, seed=6)
        P, g = 4, torch.Generator().manual_seed(7)  # the same on every rank
        # TRL's layout is chosen then rejected; interleaved keeps each rank's rows whole pairs
        batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                 "completion_mask": batch["completion_mask"], "ref_chosen_logps": -20 + torch.randn(P, generator=g),
                 "ref_rejected_logps": -21 + torch.randn(P, generator=g)}
        return hotloop.train.DPO(layout="interleaved"), batch
    raise ValueError(kind)


def _dpo_split(batch: dict, rank: int, world: int) -> dict:
    rows = batch["input_ids"].shape[0] // world
    pairs = batch["ref_chosen_logps"].shape[0] // world
    out = {k: v[rank * rows:(rank + 1) * rows] for k, v in batch.items() if not k.startswith("ref_")}
    out.update({k: v[rank * pairs:(rank + 1) * pairs] for k, v in batch.items() if k.startswith("ref_")})
    return out


def _wrap(model: nn.Module, engine: str) -> nn.Module:
    if engine == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    if engine == "fsdp2_head":  # the lm_head its own unit: its weight is a sharded DTensor outside its forward
        fully_shard(model.lm_head)
    return fully_shard(model)


def _full_grads(model: nn.Module) -> dict:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name.removeprefix("module.")] = (g.full_tensor() if isinstance(g, DTensor) else g).clone()
    return out


def _worker(rank: int, world: int, kind: str, engine: str, micro: int, with_count: bool) -> dict:
    algo, batch = _algorithm(kind)
    model = _wrap(tiny_llama(seed=0), engine)
    if kind == "dpo":
        parts = [_dpo_split(batch, rank, world)]
    else:
        parts = _split(batch, rank, world, micro)
    total = batch["completion_mask"].sum()
    loss_sum = 0.0
    for m, part in enumerate(parts):
        if with_count:
            part["num_items_in_batch"] = total
        if isinstance(model, nn.parallel.DistributedDataParallel) and m < len(parts) - 1:
            with model.no_sync():
                out = algo.loss(model, part)
                out.loss.backward()
        else:
            out = algo.loss(model, part)
            out.loss.backward()
        loss_sum += out.loss.detach()
    return {"loss": loss_sum, "grads": _full_grads(model)}


def _single(kind: str) -> dict:
    algo, batch = _algorithm(kind)
    model = tiny_llama(seed=0)
    out = algo.loss(model, batch)
    out.loss.backward()
    return {"loss": out.loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters()}}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


CASES = [("grpo", "ddp", 1, False), ("grpo", "ddp", 2, True), ("grpo", "fsdp2", 1, False),
         ("grpo", "fsdp2_head", 2, True), ("grpo_seq", "ddp", 1, False), ("nft", "fsdp2", 1, False),
         ("self_certainty", "ddp", 2, True),
         ("dpo", "ddp", 1, False)]


@pytest.mark.parametrize("kind,engine,micro,with_count", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_ranks_equal_one_process(kind, engine, micro, with_count):
    ranks = run_ranks(_worker, WORLD, (kind, engine, micro, with_count), timeout=240)
    want = _single(kind)
    # DDP / FSDP2 average the ranks' gradients: the ranks' (micro-summed) losses average to the global loss
    got_loss = sum(r["loss"] for r in ranks) / WORLD
    assert _rel(got_loss, want["loss"]) <= TOL, (got_loss, want["loss"])
    for rank in ranks:
        assert rank["grads"].keys() == want["grads"].keys()
        for name, g in want["grads"].items():
            assert rank["grads"][name] is not None, f"{name}: no gradient"
            assert _rel(rank["grads"][name], g) <= TOL, (name, _rel(rank["grads"][name], g))


def _unwrapped_worker(rank: int, world: int) -> dict:
    algo, batch = _algorithm("grpo")
    ddp = _wrap(tiny_llama(seed=0), "ddp")
    part = _split(batch, rank, world)[0]
    try:
        algo.loss(ddp.module, part)
        raised = ""
    except RuntimeError as e:
        raised = str(e)
    with hotloop.train.manual_gradient_sync():  # the caller's own all-reduce: accepted
        algo.loss(ddp.module, part).loss.backward()
    return {"raised": raised}


def test_unwrapped_model_under_several_processes_raises():
    for rank in run_ranks(_unwrapped_worker, WORLD, timeout=120):
        assert "not wrapped by DistributedDataParallel" in rank["raised"] and "ddp_model.module" in rank["raised"]


def test_num_items_in_batch_only_for_token_means():
    algo, batch = _algorithm("grpo_seq")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        algo.loss(tiny_llama(seed=0), {**batch, "num_items_in_batch": 10})
    algo, batch = _algorithm("grpo")
    with pytest.raises(TypeError, match="num_items_in_batch"):
        algo.loss(tiny_llama(seed=0), {**batch, "num_items_in_batch": "10"})
