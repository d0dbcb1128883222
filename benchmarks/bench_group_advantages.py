"""hotloop.group_advantages (GRPO, scale "group") against the ways RL libraries compute it.

Cases, same rewards in both (65,536 responses in 4,096 groups; sizes 2..30, mean 16):
  ragged-*   groups of random sizes in shuffled order (a `group_index` per response), as in verl. Providers:
             verl_loop (group ids -> Python lists -> per-group mean / std -> a per-response loop, verl's
             compute_grpo_outcome_advantage approach, written here), torch_scatter (vectorised eager: index_add
             sums and squares), hotloop (group_index).
  fixed-*    the same number of responses in fixed groups of 16 adjacent ones, as in TRL. Providers: trl_view
             (`rewards.view(-1, G).mean(1)` / `.std(1)` and repeat_interleave, TRL's approach), hotloop (group_size).
Every output is checked against float64 math before it is timed. Groups have >= 2 responses, where verl's
singleton rule (mean 0, std 1) and the spec's (advantage 0) agree.
    python -m benchmarks.bench_group_advantages [--quick]
"""
from __future__ import annotations

import dataclasses
import sys
from collections import defaultdict
from typing import Callable

import torch

from benchmarks import harness

BENCH = "group_advantages"
EPS = 1e-6
TOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    responses: int
    groups: int
    ragged: bool


CASES = [Case("ragged-65536r-4096g", 65536, 4096, True), Case("fixed-65536r-4096g", 65536, 4096, False)]
QUICK_CASES = [Case("ragged-256r-16g", 256, 16, True), Case("fixed-256r-16g", 256, 16, False)]


# ------------------------------------------------------------------------------------------------------ inputs
def make_inputs(case: Case, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """-> (rewards [R] fp32, group_index [R] int64 or None, G for the fixed layout)."""
    gen = torch.Generator().manual_seed(0)
    R, n = case.responses, case.groups
    rewards = torch.randint(0, 2, (R,), generator=gen).float() + 0.1 * torch.randn(R, generator=gen)
    if not case.ragged:
        return rewards.to(dev), None, R // n
    extra = torch.multinomial(torch.ones(n), R - 2 * n, replacement=True, generator=gen)
    sizes = 2 + torch.bincount(extra, minlength=n)  # sum = R, each >= 2
    ids = torch.repeat_interleave(torch.randperm(n, generator=gen) * (R // n), sizes)  # scattered ids
    perm = torch.randperm(R, generator=gen)
    return rewards.to(dev), ids[perm].to(dev), R // n


def expected(rewards: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """GRPO advantages in float64 (vectorised)."""
    r, ids = rewards.double().cpu(), ids.cpu()
    R = r.numel()
    n = torch.zeros(R, dtype=torch.float64).index_add_(0, ids, torch.ones_like(r))[ids]
    d = r - torch.zeros(R, dtype=torch.float64).index_add_(0, ids, r)[ids] / n
    std = (torch.zeros(R, dtype=torch.float64).index_add_(0, ids, d * d)[ids] / (n - 1)).sqrt()
    return d / (std + EPS)


# --------------------------------------------------------------------------------------------------- providers
def verl_loop(rewards: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """verl's approach: ids -> lists of scores -> per-group mean / std -> normalise response by response."""
    scores = rewards.clone()
    index = index.tolist()
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    with torch.no_grad():
        for i in range(scores.shape[0]):
            id2score[index[i]].append(scores[i])
        for idx, group in id2score.items():
            if len(group) == 1:
                id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
            else:
                t = torch.stack(group)
                id2mean[idx], id2std[idx] = torch.mean(t), torch.std(t)
        for i in range(scores.shape[0]):
            scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + EPS)
    return scores


def torch_scatter(rewards: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Vectorised eager torch: per-group count, sum and squared deviations with index_add (no sync)."""
    R = rewards.numel()
    z = rewards.new_zeros(R)
    n = z.index_add(0, index, torch.ones_like(rewards))[index]
    d = rewards - z.index_add(0, index, rewards)[index] / n
    std = (z.index_add(0, index, d * d)[index] / (n - 1)).sqrt()
    return d / (std + EPS)


def trl_view(rewards: torch.Tensor, G: int) -> torch.Tensor:
    """TRL's approach: fixed groups of G adjacent completions, view(-1, G) statistics, repeat_interleave."""
    grouped = rewards.view(-1, G)
    mean = grouped.mean(dim=1).repeat_interleave(G, dim=0)
    std = grouped.std(dim=1).repeat_interleave(G, dim=0)
    return (rewards - mean) / (std + EPS)


def hotloop_ragged(rewards: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    import hotloop

    return hotloop.group_advantages(rewards, group_index=index, kind="grpo")


def hotloop_fixed(rewards: torch.Tensor, G: int) -> torch.Tensor:
    import hotloop

    return hotloop.group_advantages(rewards, group_size=G, kind="grpo")


RAGGED = {"verl_loop": verl_loop, "torch_scatter": torch_scatter, "hotloop": hotloop_ragged}
FIXED = {"trl_view": trl_view, "hotloop": hotloop_fixed}


def bytes_moved(case: Case) -> int:
    """Rewards read and advantages written once (float32), plus the int64 group ids for ragged groups."""
    return case.responses * (4 + 4 + (8 if case.ragged else 0))


# ------------------------------------------------------------------------------------------------------- driver
def bench_case(case: Case, dev: torch.device, timing: dict) -> list[harness.Record]:
    rewards, ids, G = make_inputs(case, dev)
    ref = expected(rewards, ids if case.ragged else torch.arange(case.responses) // G)
    providers: dict[str, Callable] = RAGGED if case.ragged else FIXED
    arg = ids if case.ragged else G
    records = []
    for name, fn in providers.items():
        print(f"[{BENCH}] {case.name} {name}", file=sys.stderr, flush=True)
        rec = harness.Record(BENCH, case.name, "fwd", name)
        call = lambda fn=fn: fn(rewards, arg)  # noqa: E731
        try:
            _, out = harness.time_first_call_ms(call, dev)
            rec.max_rel_err = harness.rel_err(out, ref)
            rec.correct = rec.max_rel_err < TOL
            rec.ms, rec.reps = harness.time_ms(call, dev, warmup=False, **timing)
            rec.gbps = bytes_moved(case) / (rec.ms * 1e-3) / 1e9
        except Exception as exc:  # noqa: BLE001  (a failing provider is reported, the rest still run)
            rec.correct, rec.note = False, harness.error_note(exc)
        records.append(rec)
    harness.set_ratios(records)
    return records


def parse_args(argv):
    ap = harness.arg_parser(__doc__)
    return harness.parse_bench_args(ap, argv)


def main(argv=None) -> list[harness.Record]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    dev = harness.device()
    timing = {"budget_s": 0.05} if args.quick else {}
    records = []
    for case in QUICK_CASES if args.quick else CASES:
        records += bench_case(case, dev, timing)
    env = harness.env_info()
    extra = {"kind": "grpo (scale group), eps 1e-6",
             "bytes_moved": "rewards read + advantages written (fp32), + int64 group ids for ragged",
             "peak_extra": "not measured (O(R) buffers only)"}
    return harness.save_results(BENCH, records, env, args, extra)


if __name__ == "__main__":
    print(harness.markdown_table(main()))
