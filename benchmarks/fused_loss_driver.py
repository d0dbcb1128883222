"""The driver shared by the fused-loss benchmarks (bench_policy_loss, bench_preference_loss): one training step's
loss from last hidden states x lm_head, forward + backward to d_hidden and d_weight, for each provider.

A bench module keeps what is its own: its cases, how its inputs are made, its materialised reference, its
providers' loss closures, its tolerance and its texts. It hands them to a `FusedLossBench`, which does the rest
the same way for both:
  * per case, the inputs and the reference (float64 for float32 inputs, else float32) once, then every provider
    on them: its first call checked (the largest ||got - ref|| / ||ref|| of loss, d_hidden and d_weight) against
    the module's tolerance, then all of them timed in interleaved rounds (harness.time_interleaved); each ratio
    against hotloop's time;
  * peak memory of every timed row (harness.measure_memory, which rebuilds the call in the module's probe_call);
  * the command line (--quick, --out-dir, --cases, --providers, --no-memory), a private inductor cache, and the
    JSON / markdown results with the module's extra fields.
A case needs .name and .dtype; the inputs need .hidden [.., H] and .weight [V, H] (the differentiated leaves)
and .mask (1 = a scored token, for the progress line).

Also here, for the modules' references and TRL-style providers: row_blocks, materialised_logp and TRL's
selective_log_softmax.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from benchmarks import harness

# (hidden [.., T, H], weight [V, H]) leaves -> loss []; the call differentiates it w.r.t. both
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------- reference helpers
def row_blocks(n: int, v: int) -> list[tuple[int, int]]:
    """Row ranges of at most 2^26 logits: the reference never holds a whole [N, V] float64 block at GPU sizes."""
    rows = max(1, (1 << 26) // v)
    return [(s, min(s + rows, n)) for s in range(0, n, rows)]


@torch.no_grad()
def materialised_logp(hidden2d, weight, labels1d, dt: torch.dtype, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(hidden @ weight.T / temperature)[label] in `dt`, [N]."""
    w = weight.to(dt)
    out = torch.empty(hidden2d.shape[0], dtype=dt, device=hidden2d.device)
    for s, e in row_blocks(hidden2d.shape[0], w.shape[0]):
        z = F.linear(hidden2d[s:e].to(dt), w)
        if temperature != 1.0:
            z.div_(temperature)
        out[s:e] = z.gather(-1, labels1d[s:e, None]).squeeze(-1) - torch.logsumexp(z, -1)
    return out


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL's selective_log_softmax (torch path): loops over batch rows to bound the temporaries."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, index[..., None]).squeeze(-1)
        return picked - torch.stack([torch.logsumexp(row, -1) for row in logits])
    # TRL: logsumexp is unstable in bf16, so a log_softmax per row (the result stays in the logits' dtype)
    return torch.stack([F.log_softmax(row, -1).gather(-1, ids[:, None]).squeeze(-1)
                        for row, ids in zip(logits, index)])


# ---------------------------------------------------------------------------------------------------- providers
@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    make: Callable[[Any], Loss]  # the module's inputs -> its loss closure
    unavailable: Callable[[], str | None] = lambda: None  # -> reason, or None when usable
    compiles: bool = False    # first call is a compile: reported as compile_ms, never counted as a timing
    in_quick: bool = True     # part of the --quick smoke run (compiling takes too long for it)
    bf16_caveat: str = ""     # why its bf16 results miss the tolerance by design (said in the note)


def make_call(p: Provider, x) -> Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Zero-argument forward + backward of `p` -> (loss, d_hidden, d_weight)."""
    f = p.make(x)
    # leaves of their own over the shared storage; autograd.grad returns the gradients without touching .grad
    h, w = x.hidden.detach().requires_grad_(True), x.weight.detach().requires_grad_(True)

    def forward_backward():
        loss = f(h, w)
        return (loss.detach(), *torch.autograd.grad(loss, (h, w)))

    return forward_backward


# ------------------------------------------------------------------------------------------------------- driver
@dataclasses.dataclass
class FusedLossBench:
    name: str                  # BENCH: the records' bench and the results' file name
    module: str                # import path of the bench module, for the memory-probe child (not __main__)
    doc: str                   # the module's docstring: its --help
    providers: list[Provider]  # must include "hotloop", the ratios' baseline (it always runs, last)
    cpu_cases: list
    gpu_cases: list
    quick_cases: list
    make_inputs: Callable[[Any, torch.device], Any]                  # (case, device) -> inputs
    reference: Callable[[Any, torch.dtype], tuple]                   # (inputs, dtype) -> (loss, d_hidden, d_weight)
    tolerance: Callable[[torch.dtype], float]                        # case dtype -> largest relative error allowed
    op: str                    # hotloop op, for the recorded hotloop_backend
    loss: str                  # the JSON's "loss" field: what is computed
    mask_share: str = "of tokens valid"  # progress line: what the mask's mean is the share of
    cases_example: str = "bf16"          # --cases help: an example
    first_call_note: bool = False        # note each non-compiling provider's first-call time (what a user feels)

    def __post_init__(self):
        self.by_name = {p.name: p for p in self.providers}

    def probe_call(self, spec: dict) -> Callable[[], object]:
        """Memory-probe entry (harness.peak_extra_bytes): rebuilds the inputs and the call in a fresh process."""
        case = next(c for c in self.cpu_cases + self.gpu_cases + self.quick_cases if c.name == spec["case"])
        return make_call(self.by_name[spec["provider"]], self.make_inputs(case, harness.device()))

    def prepare_one(self, p: Provider, case, x, ref, dev) -> tuple[harness.Record, Callable | None]:
        """The provider's record after its first call (checked against the reference; compile time for compiling
        providers) and its call for the timing rounds, None when it is unavailable or failed."""
        rec = harness.Record(self.name, case.name, "fwdbwd", p.name)
        rec.note = p.unavailable() or ""
        if rec.note:
            return rec, None
        tol = self.tolerance(case.dtype)
        try:
            call = make_call(p, x)
            first_ms, out = harness.time_first_call_ms(call, dev)  # pristine state: the call that gets checked
            rec.max_rel_err = max(harness.rel_err(o, r) for o, r in zip(out, ref))
            rec.correct = rec.max_rel_err < tol
            del out
            if p.compiles:
                rec.compile_ms = first_ms
                call()  # the first call compiled: one more warms it as the others are warm
            elif self.first_call_note:  # what a user feels on the first step: no compile warm-up expected
                rec.note = f"first call {first_ms:.0f} ms"
        except Exception as exc:  # noqa: BLE001  (a failing provider is reported, the rest still run)
            rec.correct, rec.note = False, harness.error_note(exc)
            return rec, None
        if not rec.correct:
            caveat = p.bf16_caveat if case.dtype == torch.bfloat16 else ""
            rec.note = "; ".join(filter(None, [rec.note, f"WRONG: rel err above {tol:g}", caveat]))
        return rec, call

    def bench_case(self, case, providers: list[Provider], dev, budget_s: float) -> list[harness.Record]:
        t0 = time.perf_counter()
        x = self.make_inputs(case, dev)
        ref = self.reference(x, torch.float64 if case.dtype == torch.float32 else torch.float32)
        print(f"[{self.name}] {case.name} inputs + reference {time.perf_counter() - t0:.1f} s, "
              f"{x.mask.mean().item():.0%} {self.mask_share}", file=sys.stderr, flush=True)
        records, timed = [], []
        for p in providers:
            t0 = time.perf_counter()
            rec, call = self.prepare_one(p, case, x, ref, dev)
            records.append(rec)
            if call is not None:
                timed.append((rec, call))
            print(f"[{self.name}] {case.name} {p.name}: first call + check {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            for (rec, _), (ms, reps) in zip(timed, harness.time_interleaved([c for _, c in timed], dev,
                                                                           budget_s=budget_s)):
                rec.ms, rec.reps = ms, reps
        except Exception as exc:  # noqa: BLE001  (a provider failing after its checked first call: no timings)
            for rec, _ in timed:
                rec.note = "; ".join(filter(None, [rec.note, "timing rounds failed: " + harness.error_note(exc)]))
        print(f"[{self.name}] {case.name} timing rounds: {time.perf_counter() - t0:.1f} s", file=sys.stderr,
              flush=True)
        harness.set_ratios(records)
        return records

    def parse_args(self, argv):
        ap = harness.arg_parser(self.doc, "tiny shapes, fast providers: a CI smoke test")
        ap.add_argument("--cases", help=f"comma-separated substrings of case names, e.g. {self.cases_example}")
        ap.add_argument("--providers", help=f"comma-separated, from {','.join(self.by_name)} (hotloop always runs: "
                                            "it is the ratios' baseline)")
        ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
        return harness.parse_bench_args(ap, argv)

    def main(self, argv=None) -> list[harness.Record]:
        args = self.parse_args(sys.argv[1:] if argv is None else argv)
        dev = harness.device()
        cases = harness.select_cases(args, self.quick_cases,
                                     self.gpu_cases if dev.type == "cuda" else self.cpu_cases)
        names = args.providers.split(",") if args.providers else [p.name for p in self.providers
                                                                  if p.in_quick or not args.quick]
        providers = ([self.by_name[n] for n in names if n in self.by_name and n != "hotloop"]
                     + [self.by_name["hotloop"]])
        budget_s = 0.05 if args.quick else 1.0  # full: ~1 s of repeats per row, at least 3

        with harness.private_inductor_cache():
            records, t0 = [], time.perf_counter()
            for case in cases:
                records += self.bench_case(case, providers, dev, budget_s)
            t1 = time.perf_counter()
            if not args.no_memory:
                harness.measure_memory(self.name, self.module, records, quick=args.quick)
            t2 = time.perf_counter()
        print(f"[{self.name}] timing {t1 - t0:.0f} s, memory probes {t2 - t1:.0f} s", file=sys.stderr)

        extra = {"hotloop_backend": harness.hotloop_backend("fused_linear_loss", dev),
                 "wall_s": {"timing": round(t1 - t0, 1), "memory": round(t2 - t1, 1)},
                 "loss": self.loss,
                 "reference": "materialised logits in float32 (float64 for float32 inputs); loss and gradients "
                              "compared as ||got - ref|| / ||ref||, the largest of the three recorded",
                 "peak_extra": harness.peak_extra_method(dev) + "; includes the returned d_hidden and d_weight"}
        return harness.save_results(self.name, records, harness.env_info(), args, extra)
