"""hotloop.dino_loss against torch eager (DINO's own loss code), forward + backward.

Case: B images, 10 crops (2 global + 8 local), K prototypes (DINO's 65536), float32 student / teacher outputs,
tau_s 0.1, tau_t 0.04. Providers:
  eager    DINO's DINOLoss.forward (softmax of the centred teacher, log_softmax per student crop, a loop over
           the (teacher crop, other student crop) pairs), the spec in hotloop.reference.dino_loss
  compile  the same under torch.compile (with --compile; the first call's compile time is recorded)
  hotloop  hotloop.dino_loss (one fused pass per row, gradient computed in the forward)
Each provider's loss and student gradient are checked against the eager float32 result before timing.
Bytes moved (the floor for any implementation): student read once + gradient written once + teacher read once.
    python -m benchmarks.bench_dino_loss [--quick] [--compile]
"""
from __future__ import annotations

import dataclasses
import sys

import torch

from benchmarks import harness

BENCH = "dino_loss"
TOL = 1e-4


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    B: int
    crops: int
    K: int


CASES = [Case("B64-10crops-K65536-fp32", 64, 10, 65536)]
QUICK_CASES = [Case("B4-4crops-K1024-fp32", 4, 4, 1024)]
N_GLOBAL = 2


def make_inputs(case: Case, dev: torch.device):
    gen = torch.Generator(device=dev).manual_seed(0)
    s = torch.randn(case.crops * case.B, case.K, generator=gen, device=dev).requires_grad_(True)
    t = torch.randn(N_GLOBAL * case.B, case.K, generator=gen, device=dev)
    c = 0.1 * torch.randn(case.K, generator=gen, device=dev)
    return s, t, c


def eager(s, t, c):
    from hotloop.reference.dino_loss import dino_loss_ref

    return dino_loss_ref(s, t, c, N_GLOBAL, 0.1, 0.04)


def hotloop_dino(s, t, c):
    import hotloop

    return hotloop.dino_loss(s, t, c, n_global=N_GLOBAL, tau_s=0.1, tau_t=0.04)


def fwd_bwd(fn, s, t, c):
    s.grad = None
    loss = fn(s, t, c)
    loss.backward()
    return loss.detach(), s.grad


def providers(with_compile: bool) -> dict:
    out = {"eager": eager, "hotloop": hotloop_dino}
    if with_compile:
        out = {"eager": eager, "compile": torch.compile(eager), "hotloop": hotloop_dino}
    return out


def probe_call(spec: dict):
    case = next(c for c in CASES + QUICK_CASES if c.name == spec["case"])
    fn = {"eager": eager, "hotloop": hotloop_dino}[spec["provider"]]
    s, t, c = make_inputs(case, harness.device())

    def call():
        loss, g = fwd_bwd(fn, s, t, c)
        s.grad = None
        return loss

    return call


def bench_case(case: Case, dev: torch.device, timing: dict, with_compile: bool, fresh: bool) -> list[harness.Record]:
    s, t, c = make_inputs(case, dev)
    ref_loss, ref_grad = fwd_bwd(eager, s, t, c)
    ref_loss, ref_grad = ref_loss.clone(), ref_grad.clone()
    records = []
    for name, fn in providers(with_compile).items():
        print(f"[{BENCH}] {case.name} {name}", file=sys.stderr, flush=True)
        rec = harness.Record(BENCH, case.name, "fwdbwd", name)
        call = lambda fn=fn: fwd_bwd(fn, s, t, c)  # noqa: E731
        try:
            ms, (loss, grad) = harness.time_first_call_ms(call, dev)
            if name == "compile":
                rec.compile_ms = ms
            rec.max_rel_err = max(harness.rel_err(loss, ref_loss), harness.rel_err(grad, ref_grad))
            rec.correct = rec.max_rel_err < TOL
            rec.ms, rec.reps = harness.time_ms(call, dev, warmup=False, **timing)
            elems = s.numel()
            rec.gbps = (elems * 4 * 2 + t.numel() * 4) / (rec.ms * 1e-3) / 1e9
        except Exception as exc:  # noqa: BLE001
            rec.correct, rec.note = False, harness.error_note(exc)
        records.append(rec)
    probed = [r for r in records if r.provider != "compile"]  # the probe child has no compiled loss
    harness.measure_memory(BENCH, "benchmarks.bench_dino_loss", probed, quick=not fresh, announce=False)
    harness.set_ratios(records)
    return records


def main(argv=None) -> list[harness.Record]:
    ap = harness.arg_parser(__doc__)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the eager loss")
    args = harness.parse_bench_args(ap, sys.argv[1:] if argv is None else argv)
    dev = harness.device()
    timing = {"budget_s": 0.05} if args.quick else {"budget_s": 3.0, "max_reps": 10}
    records = []
    for case in QUICK_CASES if args.quick else CASES:
        records += bench_case(case, dev, timing, args.compile, fresh=not args.quick)
    env = harness.env_info()
    extra = {"n_global": N_GLOBAL, "tau_s": 0.1, "tau_t": 0.04,
             "bytes_moved": "student read + gradient written + teacher read (fp32)",
             "peak_extra": "peak RSS / allocator growth of one fwd+bwd beyond the inputs (fresh process on CPU)"}
    return harness.save_results(BENCH, records, env, args, extra)


if __name__ == "__main__":
    print(harness.markdown_table(main()))
