"""How fast any exact fused GRPO step could be here: the three matmuls of the materialised path alone, timed in
the same rounds as TRL's materialised path and hotloop.linear_policy_loss (bench_policy_loss's CPU full-mask cases).

Every exact path from hidden states computes logits = h W^T, d_hidden = G W and d_weight = G^T h ([N, V] x H each);
with all tokens valid none can skip any of them. So peer ms / floor ms bounds the speed-up over a peer that uses
the same matmul library: on a CPU where these matmuls are most of the materialised path's time, a 2x target over
it cannot be met by an exact method. Not part of the suite (run.py): a one-off check of a target's feasibility.
    python -m benchmarks.matmul_floor [--quick] [--out-dir DIR]
Writes <out-dir or benchmarks/results>/<device>/matmul_floor.json|.md; ratio = ms / hotloop's ms, as elsewhere.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks import bench_policy_loss as policy

BENCH = "matmul_floor"


def three_matmuls(x: policy.Inputs):
    """logits, d_hidden and d_weight products at the case's full size, on a stand-in gradient of the logits."""
    H = x.hidden.shape[-1]
    h = x.hidden.reshape(-1, H)
    g = torch.randn(h.shape[0], x.weight.shape[0]).to(h.dtype)

    def floor():
        return F.linear(h, x.weight), g @ x.weight, g.t() @ h

    return floor


def provider_call(make, x: policy.Inputs):
    loss_of = make(x)

    def call():
        h, w = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)
        return torch.autograd.grad(loss_of(h, w), (h, w))

    return call


def main(argv=None) -> list[harness.Record]:
    args = harness.parse_bench_args(harness.arg_parser(__doc__), sys.argv[1:] if argv is None else argv)
    dev = torch.device("cpu")
    records = []
    cases = harness.select_cases(args, policy.QUICK_CASES, policy.CPU_CASES)
    for case in [c for c in cases if not c.ragged and not c.kl_coef] or cases[:1]:
        x = policy.make_inputs(case, dev)
        calls = {"three_matmuls": three_matmuls(x), "trl_materialised": provider_call(policy.make_trl, x),
                 "hotloop": provider_call(policy.make_hotloop, x)}
        for fn in calls.values():
            fn()  # warm
        timed = harness.time_interleaved(list(calls.values()), dev, budget_s=0.0 if args.quick else 8.0,
                                         min_reps=1 if args.quick else 8)
        hot_ms = dict(zip(calls, timed))["hotloop"][0]
        # correctness is bench_policy_loss's business: nothing is checked here (correct stays None)
        recs = [harness.Record(BENCH, case.name, "fwdbwd", name, ms=ms, reps=reps, ratio=ms / hot_ms,
                               note="lower bound, not a loss" if name == "three_matmuls" else "")
                for name, (ms, reps) in zip(calls, timed)]
        records += recs
        print(f"[{BENCH}] {case.name}: " + ", ".join(f"{r.provider} {r.ms:.0f} ms" for r in recs), file=sys.stderr)
    return harness.save_results(BENCH, records, harness.env_info(), args, {
        "what": "the materialised path's three matmuls alone vs TRL's path and hotloop, interleaved rounds"})


if __name__ == "__main__":
    print(harness.markdown_table(main()))
