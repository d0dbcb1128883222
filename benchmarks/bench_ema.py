"""hotloop.ema_update_ against the ways training code updates an EMA teacher, over a whole LLM-shaped model.

Model: the parameter list of a decoder (per layer q/k/v, o, up, down projections and two norms, plus the
embedding): ~210M parameters on CPU (H=1024, 14 layers), ~1B on GPU (H=2048, 18 layers). Cases:
  fp32        float32 teacher <- float32 student
  bf16-shadow float32 shadow <- bfloat16 student, and the bf16 teacher for forward rewritten from the shadow
Providers (same lists, decay 0.996, timed in place, repeatedly):
  loop      per tensor t.mul_(d).add_(s, alpha=1-d) (+ c.copy_(t)): the plain Python loop
  foreach   torch._foreach_lerp_(T, S, 1-d), timm's ModelEmaV3 way; for bf16-shadow it needs float32 copies of
            the student first (foreach_lerp_ takes one dtype) and a _foreach_copy_ to the bf16 teacher after
  hotloop   hotloop.ema_update_(T, S, d) (out_copy=the bf16 teacher for bf16-shadow): one pass, one launch
Bytes moved (the floor): target read + written, online read (+ copy written), in their dtypes; GB/s below uses
it, so on GPU it can be compared with the copy bandwidth measured here (a device-to-device clone).
Each provider's first call is checked against float64 math on the first tensors.
    python -m benchmarks.bench_ema [--quick]
"""
from __future__ import annotations

import dataclasses
import sys

import torch

from benchmarks import harness

BENCH = "ema"
DECAY = 0.996


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    hidden: int
    layers: int
    vocab: int
    online: torch.dtype


def _cases(dev: torch.device, quick: bool) -> list[Case]:
    if quick:
        dims = (128, 2, 1000, "tiny")
    elif dev.type == "cuda":
        dims = (2048, 18, 32000, "1B")
    else:
        dims = (1024, 14, 32000, "210M")
    h, n, v, tag = dims
    return [Case(f"{tag}-fp32", h, n, v, torch.float32), Case(f"{tag}-bf16-shadow", h, n, v, torch.bfloat16)]


def shapes(case: Case) -> list[tuple[int, ...]]:
    h = case.hidden
    per_layer = [(h,), (3 * h, h), (h, h), (h,), (4 * h, h), (h, 4 * h)]
    return [(case.vocab, h)] + per_layer * case.layers + [(h,)]


def make_inputs(case: Case, dev: torch.device):
    """-> (float32 targets, online tensors, bf16 teacher copies or None)."""
    gen = torch.Generator(device=dev).manual_seed(0)
    T = [torch.randn(s, generator=gen, device=dev) for s in shapes(case)]
    S = [torch.randn(s, generator=gen, device=dev).to(case.online) for s in shapes(case)]
    C = [t.to(torch.bfloat16) for t in T] if case.online != torch.float32 else None
    return T, S, C


def loop(T, S, C):
    for i, (t, s) in enumerate(zip(T, S)):
        t.mul_(DECAY).add_(s, alpha=1 - DECAY)
        if C is not None:
            C[i].copy_(t)


def foreach(T, S, C):
    if C is None:
        torch._foreach_lerp_(T, S, 1 - DECAY)
        return
    torch._foreach_lerp_(T, [s.float() for s in S], 1 - DECAY)
    torch._foreach_copy_(C, T)


def hotloop_ema(T, S, C):
    import hotloop

    hotloop.ema_update_(T, S, DECAY, out_copy=C)


PROVIDERS = {"loop": loop, "foreach": foreach, "hotloop": hotloop_ema}


def bytes_moved(T, S, C) -> int:
    n = sum(t.numel() for t in T)
    return n * (4 + 4 + S[0].element_size() + (2 if C is not None else 0))


def probe_call(spec: dict):
    case = next(c for c in _cases(harness.device(), spec["quick"]) if c.name == spec["case"])
    T, S, C = make_inputs(case, harness.device())
    fn = PROVIDERS[spec["provider"]]
    return lambda: fn(T, S, C)


def copy_bandwidth(T, dev) -> float:
    """GB/s of a device copy of the largest tensor (read + write), the bandwidth ceiling to compare with."""
    src = max(T, key=lambda t: t.numel())
    dst = torch.empty_like(src)
    ms, _ = harness.time_ms(lambda: dst.copy_(src), dev)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def time_providers(case: Case, dev: torch.device, timing: dict) -> tuple[list[harness.Record], float]:
    """-> (a record per provider, correctness-checked and timed on the same lists; the copy bandwidth)."""
    T, S, C = make_inputs(case, dev)
    n_check = 3
    records = []
    for name, fn in PROVIDERS.items():
        print(f"[{BENCH}] {case.name} {name}", file=sys.stderr, flush=True)
        rec = harness.Record(BENCH, case.name, "update", name)
        call = lambda fn=fn: fn(T, S, C)  # noqa: E731
        try:
            before = [t.double() for t in T[:n_check]]
            harness.time_first_call_ms(call, dev)
            want = [DECAY * b + (1 - DECAY) * s.double() for b, s in zip(before, S[:n_check])]
            rec.max_rel_err = max(harness.rel_err(t, w) for t, w in zip(T[:n_check], want))
            if C is not None:
                rec.max_rel_err = max(rec.max_rel_err, max(harness.rel_err(c, t) for c, t in zip(C[:n_check], T)))
            rec.correct = rec.max_rel_err < 5e-3  # the bf16 copy is one bf16 rounding of the new target
            rec.ms, rec.reps = harness.time_ms(call, dev, warmup=False, **timing)
            rec.gbps = bytes_moved(T, S, C) / (rec.ms * 1e-3) / 1e9
        except Exception as exc:  # noqa: BLE001
            rec.correct, rec.note = False, harness.error_note(exc)
        records.append(rec)
    return records, copy_bandwidth(T, dev)


def bench_case(case: Case, dev: torch.device, timing: dict, quick: bool) -> list[harness.Record]:
    records, bw = time_providers(case, dev, timing)  # its inputs are freed before the memory probes
    specs = [{"case": case.name, "provider": r.provider, "quick": quick} for r in records]
    for rec, m in zip(records, harness.peak_extra_bytes("benchmarks.bench_ema", specs, fresh=not quick)):
        if isinstance(m, int):
            rec.peak_extra_mib = m / 2**20
        else:
            rec.note += f" memory probe: {m}"
    harness.set_ratios(records)
    for r in records:
        r.note = (r.note + f" copy bandwidth {bw:.1f} GB/s").strip()
    return records


def main(argv=None) -> list[harness.Record]:
    args = harness.parse_bench_args(harness.arg_parser(__doc__), sys.argv[1:] if argv is None else argv)
    dev = harness.device()
    timing = {"budget_s": 0.05} if args.quick else {"budget_s": 2.0, "min_reps": 5}
    records = []
    for case in _cases(dev, args.quick):
        records += bench_case(case, dev, timing, args.quick)
    env = harness.env_info()
    extra = {"decay": DECAY, "bytes_moved": "target read + written (fp32), online read, bf16 copy written",
             "peak_extra": "peak RSS / allocator growth of one update beyond the inputs"}
    return harness.save_results(BENCH, records, env, args, extra)


if __name__ == "__main__":
    print(harness.markdown_table(main()))
