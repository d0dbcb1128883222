"""hotloop.byol_loss against torch eager (BYOL's own loss code), forward + backward.

Case: B rows of projection dimension D (BYOL / SPR: 256), float32 / bfloat16 predictions p and targets z.
Providers:
  eager    BYOL's regression loss: 2 - 2 cos(F.normalize(p), F.normalize(z.detach())), mean over rows
  hotloop  hotloop.byol_loss (loss and d/dp in one pass; on CPU a float32 torch expression, Triton on GPU)
Each provider's loss and gradient are checked against float64 before timing.
Bytes moved (the floor): p and z read once, the gradient written once.
    python -m benchmarks.bench_byol_loss [--quick]
"""
from __future__ import annotations

import dataclasses
import sys

import torch
import torch.nn.functional as F

from benchmarks import harness

BENCH = "byol_loss"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    B: int
    D: int
    dtype: torch.dtype


CASES = [Case("B8192-D256-fp32", 8192, 256, torch.float32), Case("B8192-D256-bf16", 8192, 256, torch.bfloat16)]
QUICK_CASES = [Case("B64-D32-fp32", 64, 32, torch.float32)]


def tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-2


def make_inputs(case: Case, dev: torch.device):
    gen = torch.Generator(device=dev).manual_seed(0)
    p = torch.randn(case.B, case.D, generator=gen, device=dev).to(case.dtype).requires_grad_(True)
    z = torch.randn(case.B, case.D, generator=gen, device=dev).to(case.dtype)
    return p, z


def eager(p, z):
    return (2 - 2 * (F.normalize(p, dim=-1) * F.normalize(z.detach(), dim=-1)).sum(-1)).mean()


def hotloop_byol(p, z):
    import hotloop

    return hotloop.byol_loss(p, z)


PROVIDERS = {"eager": eager, "hotloop": hotloop_byol}


def fwd_bwd(fn, p, z):
    p.grad = None
    loss = fn(p, z)
    loss.backward()
    return loss.detach(), p.grad


def probe_call(spec: dict):
    case = next(c for c in CASES + QUICK_CASES if c.name == spec["case"])
    p, z = make_inputs(case, harness.device())
    return lambda: fwd_bwd(PROVIDERS[spec["provider"]], p, z)[0]


def bench_case(case: Case, dev: torch.device, timing: dict, fresh: bool) -> list[harness.Record]:
    p, z = make_inputs(case, dev)
    p64 = p.detach().double().requires_grad_(True)
    ref_loss, ref_grad = fwd_bwd(eager, p64, z.double())
    records = []
    for name, fn in PROVIDERS.items():
        print(f"[{BENCH}] {case.name} {name}", file=sys.stderr, flush=True)
        rec = harness.Record(BENCH, case.name, "fwdbwd", name)
        call = lambda fn=fn: fwd_bwd(fn, p, z)  # noqa: E731
        try:
            _, (loss, grad) = harness.time_first_call_ms(call, dev)
            rec.max_rel_err = max(harness.rel_err(loss, ref_loss), harness.rel_err(grad, ref_grad))
            rec.correct = rec.max_rel_err < tolerance(case.dtype)
            rec.ms, rec.reps = harness.time_ms(call, dev, warmup=False, **timing)
            rec.gbps = 3 * p.numel() * p.element_size() / (rec.ms * 1e-3) / 1e9
        except Exception as exc:  # noqa: BLE001
            rec.correct, rec.note = False, harness.error_note(exc)
        records.append(rec)
    harness.measure_memory(BENCH, "benchmarks.bench_byol_loss", records, quick=not fresh, announce=False)
    harness.set_ratios(records)
    return records


def main(argv=None) -> list[harness.Record]:
    args = harness.parse_bench_args(harness.arg_parser(__doc__), sys.argv[1:] if argv is None else argv)
    dev = harness.device()
    timing = {"budget_s": 0.05} if args.quick else {"budget_s": 2.0}
    records = []
    for case in QUICK_CASES if args.quick else CASES:
        records += bench_case(case, dev, timing, fresh=not args.quick)
    extra = {"bytes_moved": "p and z read once, the gradient written once (input dtype)",
             "peak_extra": "peak RSS / allocator growth of one fwd+bwd beyond the inputs (fresh process on CPU)"}
    return harness.save_results(BENCH, records, harness.env_info(), args, extra)


if __name__ == "__main__":
    print(harness.markdown_table(main()))
