"""hotloop.token_logprobs / token_stats against torch eager, torch.compile, TRL, Liger and flash-attn.

Every provider gets the same logits and labels in one process; torch eager (fp32 math) is the reference each
provider's forward (logprobs, entropy) and gradient are checked against before it is timed.
    python -m benchmarks.bench_token_stats [--quick] [--cases bf16] [--modes fwd] [--providers eager,hotloop]
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable

import torch

from benchmarks import harness

BENCH = "token_stats"
MODULE = "benchmarks.bench_token_stats"  # import path for the memory-probe child (not __main__)
Stats = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    n: int
    v: int
    dtype: torch.dtype


CASES = [Case("4096x32000-fp32", 4096, 32000, torch.float32),
         Case("4096x32000-bf16", 4096, 32000, torch.bfloat16),
         Case("2048x128256-bf16", 2048, 128256, torch.bfloat16)]
QUICK_CASES = [Case("64x1000-fp32", 64, 1000, torch.float32),
               Case("64x1000-bf16", 64, 1000, torch.bfloat16)]
# mode -> (with entropy, with backward); the backward's loss is logprobs.sum() (+ entropy.sum())
MODES = {"fwd": (False, False), "fwd+ent": (True, False), "fwdbwd": (False, True), "fwdbwd+ent": (True, True)}


def tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 1e-2


# ---------------------------------------------------------------------------------------------------- providers
def _eager_logprobs(logits, labels):
    lsm = torch.log_softmax(logits.float(), -1)
    return lsm.gather(-1, labels[..., None]).squeeze(-1), None


def _eager_stats(logits, labels):
    lsm = torch.log_softmax(logits.float(), -1)  # one log_softmax feeds both outputs
    return lsm.gather(-1, labels[..., None]).squeeze(-1), -(lsm.exp() * lsm).sum(-1)


def make_eager(entropy: bool) -> Stats:
    return _eager_stats if entropy else _eager_logprobs


def make_compiled(entropy: bool) -> Stats:
    # a clean dynamo state per (case, mode): the first call is a true compile, and the 12 shape/grad variants
    # never hit dynamo's recompile limit (past it dynamo silently falls back to eager)
    torch._dynamo.reset()
    return torch.compile(make_eager(entropy), dynamic=False)


def make_trl(entropy: bool) -> Stats:
    from trl.trainer import utils as trl_utils

    def trl_stats(logits, labels):
        fused = getattr(trl_utils, "_fused_logprob_entropy", None)  # GPU: TRL's own one-pass triton kernel
        if entropy and fused is not None and trl_utils._supports_trl_loss_kernel(logits, labels):
            return fused(logits, labels)
        lp = trl_utils.selective_log_softmax(logits, labels)
        return lp, (trl_utils.entropy_from_logits(logits) if entropy else None)

    return trl_stats


def make_liger(entropy: bool) -> Stats:
    from liger_kernel.transformers.functional import liger_cross_entropy

    def liger_logprobs(logits, labels):
        loss = liger_cross_entropy(logits, labels, reduction="none")
        return -(loss[0] if isinstance(loss, tuple) else loss), None

    return liger_logprobs


def make_flash_attn(entropy: bool) -> Stats:
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    return lambda logits, labels: (-cross_entropy_loss(logits, labels)[0], None)


def make_hotloop(entropy: bool, inplace: bool = False) -> Stats:
    import hotloop

    if entropy:
        return lambda logits, labels: tuple(hotloop.token_stats(logits, labels, entropy=True,
                                                                inplace_backward=inplace)[:2])
    return lambda logits, labels: (hotloop.token_logprobs(logits, labels, inplace_backward=inplace), None)


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    make: Callable[[bool], Stats]
    unavailable: Callable[[], str | None] = lambda: None  # -> reason, or None when usable
    entropy: bool = True          # can compute entropy (else the +ent modes skip it)
    forward: bool = True          # timed in forward-only modes
    gpu_only: bool = False
    mutates_logits: bool = False  # writes into its logits (Liger's forward, inplace backward): gets a private copy
    in_quick: bool = True         # part of the --quick smoke run (compile and TRL's import take too long)


PROVIDERS = [
    Provider("eager", make_eager),
    Provider("compile", make_compiled, in_quick=False),
    Provider("trl", make_trl, harness.importable("trl.trainer.utils"), in_quick=False),
    Provider("liger", make_liger, harness.importable("liger_kernel.transformers.functional"), entropy=False,
             gpu_only=True, mutates_logits=True),
    Provider("flash_attn", make_flash_attn, harness.importable("flash_attn.ops.triton.cross_entropy"), entropy=False,
             gpu_only=True),
    Provider("hotloop", make_hotloop, harness.importable("hotloop")),
    Provider("hotloop_inplace", lambda e: make_hotloop(e, inplace=True), harness.importable("hotloop"), forward=False,
             mutates_logits=True),
]
BY_NAME = {p.name: p for p in PROVIDERS}


def runs(p: Provider, mode: str, dev: torch.device) -> bool:
    entropy, backward = MODES[mode]
    return (dev.type == "cuda" or not p.gpu_only) and (p.entropy or not entropy) and (p.forward or backward)


# --------------------------------------------------------------------------------------------------- the calls
def make_inputs(case: Case, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return harness.random_logits(case.n, case.v, case.dtype, dev), harness.random_labels(case.n, case.v, dev)


def make_call(p: Provider, mode: str, logits: torch.Tensor, labels: torch.Tensor) -> Callable[[], object]:
    """Zero-argument call of `p` in `mode`: forward -> (logprobs, entropy|None), fwd+bwd -> d loss / d logits."""
    entropy, backward = MODES[mode]
    f = p.make(entropy)
    x = logits.detach().clone() if p.mutates_logits else logits.detach()
    if not backward:
        def forward():
            with torch.no_grad():  # how RL computes old / reference log-probs
                return f(x, labels)
        return forward
    x.requires_grad_(True)  # a leaf of its own; autograd.grad returns the gradient without accumulating .grad

    def forward_backward():
        lp, ent = f(x, labels)
        loss = lp.sum() if ent is None else (lp + ent).sum()
        return torch.autograd.grad(loss, x)[0]
    return forward_backward


def check(out, ref, dtype: torch.dtype) -> tuple[bool, float]:
    """Forward: logprobs and entropy; fwd+bwd: the gradient. -> (within tolerance, largest relative error)."""
    pairs = list(zip(out, ref)) if isinstance(ref, tuple) else [(out, ref)]
    err = max(harness.rel_err(o, r) for o, r in pairs if r is not None)
    return err < tolerance(dtype), err


def bytes_moved(case: Case, mode: str) -> int:
    """Logits read once, plus the gradient written once in fwd+bwd (the floor for any implementation)."""
    size = case.n * case.v * torch.tensor([], dtype=case.dtype).element_size()
    return size * (2 if MODES[mode][1] else 1)


def probe_call(spec: dict) -> Callable[[], object]:
    """Memory-probe entry (harness.peak_extra_bytes): rebuilds the inputs and the call in a fresh process."""
    case = next(c for c in CASES + QUICK_CASES if c.name == spec["case"])
    logits, labels = make_inputs(case, harness.device())
    return make_call(BY_NAME[spec["provider"]], spec["mode"], logits, labels)


# ------------------------------------------------------------------------------------------------------- driver
def bench_one(p: Provider, mode: str, case: Case, logits, labels, ref, dev, **timing):
    """-> (record, first-call output); eager runs first and its output is the others' `ref`."""
    rec = harness.Record(BENCH, case.name, mode, p.name)
    reason = p.unavailable()
    if reason:
        rec.note = reason
        return rec, None
    try:
        call = make_call(p, mode, logits, labels)
        first_ms, out = harness.time_first_call_ms(call, dev)  # pristine inputs: the call that gets checked
        if p.name == "eager":
            rec.correct, rec.max_rel_err = True, 0.0  # the reference itself
        elif ref is None:
            rec.note = "unchecked: eager (the reference) failed"
        else:
            rec.correct, rec.max_rel_err = check(out, ref, case.dtype)
        if p.name == "compile":
            rec.compile_ms = first_ms
        # after a compile the next call may still warm up; everyone else is warm after the checked call
        rec.ms, rec.reps = harness.time_ms(call, dev, warmup=p.name == "compile", **timing)
    except Exception as exc:  # noqa: BLE001  (a failing provider is reported, the rest still run)
        rec.correct, rec.note = False, harness.error_note(exc)
        return rec, None
    rec.gbps = bytes_moved(case, mode) / (rec.ms * 1e-3) / 1e9
    if rec.correct is False:
        rec.note = f"WRONG: rel err above {tolerance(case.dtype):g}"
    elif p.mutates_logits:
        rec.note = "timed on its own copy of the logits (overwritten by the call)"
    return rec, out


def bench_case(case: Case, modes: list[str], providers: list[Provider], dev, timing: dict) -> list[harness.Record]:
    """providers[0] must be eager: its output is the reference the others are checked against."""
    logits, labels = make_inputs(case, dev)
    records = []
    for mode in modes:
        ref, mode_recs = None, []
        for p in providers:
            if runs(p, mode, dev):
                print(f"[{BENCH}] {case.name} {mode} {p.name}", file=sys.stderr, flush=True)
                rec, out = bench_one(p, mode, case, logits, labels, ref, dev, **timing)
                ref = out if p.name == "eager" else ref
                del out
                mode_recs.append(rec)
        del ref
        harness.set_ratios(mode_recs)
        records += mode_recs
    return records


def parse_args(argv):
    ap = harness.arg_parser(__doc__, "tiny shapes, fast providers: a CI smoke test")
    ap.add_argument("--cases", help="comma-separated substrings of case names, e.g. bf16 or 4096x32000-fp32")
    ap.add_argument("--modes", help=f"comma-separated, from {','.join(MODES)}")
    ap.add_argument("--providers", help=f"comma-separated, from {','.join(BY_NAME)} (eager always runs)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    return harness.parse_bench_args(ap, argv)


def main(argv=None) -> list[harness.Record]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    dev = harness.device()
    cases = harness.select_cases(args, QUICK_CASES, CASES)
    modes = args.modes.split(",") if args.modes else list(MODES)
    names = args.providers.split(",") if args.providers else [p.name for p in PROVIDERS
                                                              if p.in_quick or not args.quick]
    providers = [BY_NAME["eager"]] + [BY_NAME[n] for n in names if n != "eager"]
    # quick: a few repeats; full: harness defaults (~1 s of repeats per row, at least 3)
    timing = {"budget_s": 0.05} if args.quick else {}

    with harness.private_inductor_cache():
        records, t0 = [], time.perf_counter()
        for case in cases:
            records += bench_case(case, modes, providers, dev, timing)
        t1 = time.perf_counter()
        if not args.no_memory:
            harness.measure_memory(BENCH, MODULE, records, ("case", "mode", "provider"), quick=args.quick)
        print(f"[{BENCH}] timing {t1 - t0:.0f} s, memory probes {time.perf_counter() - t1:.0f} s",
              file=sys.stderr)

    env = harness.env_info()
    extra = {"hotloop_backend": harness.hotloop_backend("token_stats_fwd", dev),
             "bytes_moved": "logits read once (+ gradient written once for fwdbwd)",
             "peak_extra": harness.peak_extra_method(dev)}
    return harness.save_results(BENCH, records, env, args, extra)


if __name__ == "__main__":
    print(harness.markdown_table(main()))
