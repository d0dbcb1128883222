"""hotloop.linear_token_stats / linear_token_logprobs (hidden x lm_head, no [N, V] logits) against torch eager
(materialised logits, as TRL / verl do with HF models), torch.compile of it, Liger, cut-cross-entropy and verl.

Every provider gets the same hidden, weight and labels in one process. Each one's first call is checked against
a float32 materialised reference (logprobs, entropy where the provider has it, and for fwdbwd the hidden and
weight gradients) before it is timed.
    python -m benchmarks.bench_linear_token_stats [--quick] [--cases bf16] [--modes fwd]
        [--providers eager,hotloop] [--big-memory] [--slow-calls 3] [--slow-all]

Providers without entropy (Liger, cut-cross-entropy) compute logprobs only; their ratio is taken against
hotloop_logprobs (hotloop.linear_token_logprobs), so each peer is compared with hotloop doing the same work.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable

import torch

from benchmarks import harness

BENCH = "linear_token_stats"
MODULE = "benchmarks.bench_linear_token_stats"  # import path for the memory-probe child (not __main__)
# (hidden [N, H], weight [V, H], labels [N]) -> (logprobs [N] float32, entropy [N] | None)
Stats = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    n: int
    h: int
    v: int
    dtype: torch.dtype
    # slow: one call takes 20-90 s on 2 CPU cores (a 4096x2048x128256 fp32 GEMM alone is ~15-20 s), so it gets
    # `--slow-calls` calls instead of ~1 s of repeats, a sampled gradient check, the providers that say in_slow
    # (all with --slow-all), and memory probes only with --big-memory
    slow: bool = False


def _cases(n, h, v, slow=False):
    return [Case(f"{n}x{h}x{v}-{tag}", n, h, v, dt, slow) for tag, dt in (("bf16", torch.bfloat16),
                                                                      ("fp32", torch.float32))]


CPU_CASES = _cases(2048, 1024, 32000) + _cases(4096, 2048, 128256, slow=True)
GPU_CASES = [Case("8192x4096x128256-bf16", 8192, 4096, 128256, torch.bfloat16)]
QUICK_CASES = _cases(64, 32, 1000)
ALL_CASES = CPU_CASES + GPU_CASES + QUICK_CASES
# mode -> with backward; the loss is logprobs.sum() + entropy.sum() (logprobs.sum() for logprob-only providers)
MODES = {"fwd": False, "fwdbwd": True}


def tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 2e-2


def useful_flops(case: Case, mode: str) -> int:
    """The logits GEMM (2NHV) forward; + d_hidden and d_weight GEMMs backward. hotloop's backward recomputes the
    logits, but that recompute is its choice, not work the op needs, so it is not counted."""
    return 2 * case.n * case.h * case.v * (3 if MODES[mode] else 1)


# ---------------------------------------------------------------------------------------------------- providers
def _materialised(hidden, weight, labels, entropy: bool = True):
    # what RL trainers do with an HF model: logits in the model dtype, upcast, one log_softmax for both outputs
    lsm = torch.log_softmax(torch.nn.functional.linear(hidden, weight).float(), -1)
    lp = lsm.gather(-1, labels[:, None]).squeeze(-1)
    return lp, (-(lsm.exp() * lsm).sum(-1) if entropy else None)


def make_eager() -> Stats:
    return _materialised


def make_compiled() -> Stats:
    # a clean dynamo state per (case, mode): the first call is a true compile and is reported as compile time
    torch._dynamo.reset()
    return torch.compile(_materialised, dynamic=False)


def make_liger_flce() -> Stats:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="none")

    def liger_flce(hidden, weight, labels):
        loss = loss_fn(weight, hidden, labels)  # (lin_weight, input, target); loss = -logprob
        return -(loss[0] if isinstance(loss, tuple) else loss).float(), None

    return liger_flce


def make_liger_chunked() -> Stats:
    # the per-token log-prob path of Liger's PPO/GRPO losses: sequence x vocab chunks in plain torch, logits
    # recomputed per chunk in the backward (a custom autograd.Function), so it also runs on CPU
    from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase

    def liger_chunked(hidden, weight, labels):
        lp = LigerFusedLinearPPOBase.chunk_forward(hidden[None], weight, labels[None])  # wants [B, T, H]
        return lp[0], None

    return liger_chunked


def make_cce() -> Stats:
    from cut_cross_entropy import linear_cross_entropy

    # the CCE Triton kernels are CUDA-only; its documented fallback for other platforms is impl="torch_compile"
    # (materialised logits under torch.compile), which is what a CPU user of the library gets
    impl = "cce" if torch.cuda.is_available() else "torch_compile"
    if impl == "torch_compile":
        torch._dynamo.reset()  # cold compile per (case, mode), as for the compile provider

    def cce(hidden, weight, labels):
        return -linear_cross_entropy(hidden, weight, labels, reduction="none", impl=impl).float(), None

    return cce


def make_verl() -> Stats:
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

    def verl(hidden, weight, labels):
        try:  # current signature: (hidden, weight, labels, temperature, reduction, ...)
            lp, ent = linear_cross_entropy(hidden, weight, labels, 1.0, "none")
        except TypeError:  # older releases: (hidden, weight, labels, reduction)
            lp, ent = linear_cross_entropy(hidden, weight, labels, "none")
        return lp.float(), ent.float()

    return verl


def make_hotloop() -> Stats:
    import hotloop

    def hot(hidden, weight, labels):
        s = hotloop.linear_token_stats(hidden, weight, labels, entropy=True)
        return s.logprobs, s.entropy

    return hot


def make_hotloop_logprobs() -> Stats:
    import hotloop

    return lambda hidden, weight, labels: (hotloop.linear_token_logprobs(hidden, weight, labels), None)


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    make: Callable[[], Stats]
    unavailable: Callable[[], str | None] = lambda: None  # -> reason, or None when usable
    entropy: bool = True      # computes entropy too; else logprobs only, compared with hotloop_logprobs
    compiles: bool = False    # first call is a compile: reported as compile_ms, never counted as a timing
    in_slow: bool = True      # runs on the slow CPU case by default (else only with --slow-all)
    gpu_only: bool = False
    in_quick: bool = True     # part of the --quick smoke run (compiling providers take too long for it)


PROVIDERS = [
    Provider("eager", make_eager),
    # compile and CCE's torch_compile fallback both do the same GEMM as eager: on the slow case they would add
    # ~5 min each to the run while the GEMM, not the compiled softmax, sets their time
    Provider("compile", make_compiled, compiles=True, in_quick=False, in_slow=False),
    Provider("liger_flce", make_liger_flce, harness.importable("liger_kernel.transformers"), entropy=False,
             gpu_only=True),
    Provider("liger_chunked", make_liger_chunked, harness.importable("liger_kernel.chunked_loss.fused_linear_ppo"),
             entropy=False),
    Provider("cce", make_cce, harness.importable("cut_cross_entropy"), entropy=False,
             compiles=not torch.cuda.is_available(), in_quick=False, in_slow=False),
    Provider("verl", make_verl, harness.importable("verl.utils.kernel.linear_cross_entropy"), gpu_only=True),
    Provider("hotloop", make_hotloop, harness.importable("hotloop")),
    Provider("hotloop_logprobs", make_hotloop_logprobs, harness.importable("hotloop"), entropy=False),
]
BY_NAME = {p.name: p for p in PROVIDERS}


# --------------------------------------------------------------------------------------------------- the calls
def make_inputs(case: Case, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden ~ randn; weight ~ randn * 3 / sqrt(H), so logits have std ~3 (a realistic lm_head scale: a
    peaked but not one-hot softmax); labels uniform valid ids. Generated in float32, then cast."""
    gen = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(case.n, case.h, generator=gen, device=dev).to(case.dtype)
    weight = torch.empty(case.v, case.h, dtype=case.dtype, device=dev)
    rows = max(1, (1 << 24) // case.h)  # in row blocks: no full-size float32 temporary for a bf16 weight
    for start in range(0, case.v, rows):
        block = torch.randn(min(rows, case.v - start), case.h, generator=gen, device=dev)
        weight[start:start + block.shape[0]] = block.mul_(3 * case.h ** -0.5)
        del block
    return hidden, weight, harness.random_labels(case.n, case.v, dev)


def make_call(p: Provider, mode: str, hidden, weight, labels) -> Callable[[], object]:
    """Zero-argument call of `p`: fwd -> (logprobs, entropy | None); fwdbwd -> (d_hidden, d_weight)."""
    f = p.make()
    if not MODES[mode]:
        def forward():
            with torch.no_grad():  # how RL computes old / reference log-probs
                return f(hidden, weight, labels)
        return forward
    # leaves of their own over the shared storage; autograd.grad returns the gradients without touching .grad
    h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)

    def forward_backward():
        lp, ent = f(h, w, labels)
        loss = lp.sum() if ent is None else lp.sum() + ent.sum()
        return torch.autograd.grad(loss, (h, w))
    return forward_backward


def _dlogits(lsm, ent, labels, cols):
    """d logprob / dz = onehot(label) - p and d entropy / dz = -p (log p + H) on a block of the logits z:
    lsm holds log p for some rows (ent, labels are theirs) and the columns `cols` (None: all)."""
    p = lsm.exp()
    g_ent = (lsm + ent[:, None]).mul_(p).neg_()
    ids = torch.arange(lsm.shape[1], device=lsm.device) if cols is None else cols
    g_lp = (labels[:, None] == ids[None, :]).float().sub_(p)
    return g_lp, g_ent


@torch.no_grad()
def reference(hidden, weight, labels, grads: bool, logprob_only_grads: bool, sample: bool = False) -> dict:
    """float32 materialised reference, gradients in closed form on the logits (no autograd graph to hold).
    sample: d_hidden only on 256 rows and d_weight only on 4096 vocab rows (half of them label ids, so the
    gather's gradient is covered): the full gradient GEMMs would cost ~1 min more per slow case.
    -> {"fwd": (logprobs, entropy), "grad": {with_entropy: (d_hidden, d_weight)}, "index": (rows, cols) | None}"""
    h, w = hidden.float(), weight.float()
    lsm = torch.nn.functional.linear(h, w)
    lsm -= torch.logsumexp(lsm, -1, keepdim=True)
    lp = lsm.gather(-1, labels[:, None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    out = {"fwd": (lp, ent), "grad": {}, "index": None}
    if not grads:
        return out
    rows = cols = None
    if sample:
        gen = torch.Generator(device=hidden.device).manual_seed(2)
        n, v = lsm.shape
        rows = torch.randperm(n, generator=gen, device=hidden.device)[:256].sort().values
        rand = torch.randperm(v, generator=gen, device=hidden.device)[:2048]
        cols = torch.cat([labels.unique()[:2048], rand]).unique()
        out["index"] = (rows, cols)
    # d_hidden = dz @ W over the (sampled) rows, d_weight = dz^T @ hidden over the (sampled) vocab columns
    r_lp, r_ent = _dlogits(lsm if rows is None else lsm[rows], ent if rows is None else ent[rows],
                           labels if rows is None else labels[rows], None)
    c_lp, c_ent = (r_lp, r_ent) if rows is None else _dlogits(lsm[:, cols], ent, labels, cols)
    del lsm
    if logprob_only_grads:
        out["grad"][False] = (r_lp @ w, c_lp.T @ h)
    r_lp += r_ent  # now d (logprob + entropy) / dz; unsampled, c_lp is the same tensor
    if rows is not None:
        c_lp += c_ent
    out["grad"][True] = (r_lp @ w, c_lp.T @ h)
    return out


def check(p: Provider, mode: str, out, ref: dict, dtype: torch.dtype) -> tuple[bool, float]:
    """fwd: logprobs (+ entropy when p has it); fwdbwd: d_hidden and d_weight of p's own loss (on the sampled
    rows / vocab ids for the slow case). -> (every tensor within tolerance, largest relative error)."""
    if MODES[mode]:
        d_h, d_w = out
        if ref["index"] is not None:
            d_h, d_w = d_h[ref["index"][0]], d_w[ref["index"][1]]
        pairs = list(zip((d_h, d_w), ref["grad"][p.entropy]))
    else:
        pairs = [(out[0], ref["fwd"][0])] + ([(out[1], ref["fwd"][1])] if out[1] is not None else [])
    err = max(harness.rel_err(o, r) for o, r in pairs)
    return err < tolerance(dtype), err


def probe_call(spec: dict) -> Callable[[], object]:
    """Memory-probe entry (harness.peak_extra_bytes): rebuilds the inputs and the call in a fresh process."""
    case = next(c for c in ALL_CASES if c.name == spec["case"])
    return make_call(BY_NAME[spec["provider"]], spec["mode"], *make_inputs(case, harness.device()))


# ------------------------------------------------------------------------------------------------------- driver
def runs(p: Provider, dev: torch.device) -> bool:
    return dev.type == "cuda" or not p.gpu_only


def bench_one(p: Provider, mode: str, case: Case, inputs, ref: dict, dev, timing: dict
              ) -> tuple[harness.Record, Callable[[], object] | None]:
    """The provider's checked record, timed here on the slow case; elsewhere it comes back with its call, for
    bench_case's interleaved timing rounds (None: nothing to time)."""
    rec = harness.Record(BENCH, case.name, mode, p.name)
    reason = p.unavailable()
    if not reason and case.slow and not (p.in_slow or timing["slow_all"]):
        reason = "skipped on the slow case (same GEMM as eager; --slow-all runs it)"
    if reason:
        rec.note = reason
        return rec, None
    call = None
    try:
        call = make_call(p, mode, *inputs)
        first_ms, out = harness.time_first_call_ms(call, dev)  # pristine state: the call that gets checked
        rec.correct, rec.max_rel_err = check(p, mode, out, ref, case.dtype)
        del out
        if p.compiles:
            rec.compile_ms = first_ms
        if case.slow and timing["slow_calls"] <= 1 and not p.compiles:
            # 20-90 s a call: the checked call is the one sample. It is a warm call: the process has run the
            # reference GEMMs (and the smaller cases) before, and at these sizes every call maps fresh memory
            rec.ms, rec.reps = first_ms, 1
        elif case.slow:
            # the checked call (or, compiling, the compile) is the warm-up; slow_calls - 1 timed calls
            n = max(1, timing["slow_calls"] - 1)
            rec.ms, rec.reps = harness.time_ms(call, dev, warmup=False, budget_s=0, min_reps=n, max_reps=n)
        elif p.compiles:
            call()  # the compile was the first call: one more warms it as the others are warm
    except Exception as exc:  # noqa: BLE001  (a failing provider is reported, the rest still run)
        rec.correct, rec.note = False, harness.error_note(exc)
        return rec, None
    notes = []
    if rec.correct is False:
        notes.append(f"WRONG: rel err above {tolerance(case.dtype):g}")
    if not p.entropy:
        notes.append("logprobs only: ratio vs hotloop_logprobs")
    if p.name == "cce" and dev.type == "cpu":
        notes.append("impl=torch_compile (CCE kernels are CUDA-only)")
    rec.note = "; ".join(notes)
    return rec, (None if case.slow else call)


def note_tflops(rec: harness.Record, case: Case, timing: dict) -> None:
    if rec.ms and timing.get("mm_tflops"):
        tflops = useful_flops(case, rec.mode) / (rec.ms * 1e-3) / 1e12
        rec.note = "; ".join(filter(None, [rec.note, f"{tflops:.0f} TFLOPS = "
                                           f"{100 * tflops / timing['mm_tflops']:.0f}% of dense bf16 mm"]))


def bench_case(case: Case, modes: list[str], providers: list[Provider], dev, timing: dict) -> list[harness.Record]:
    inputs = make_inputs(case, dev)
    t0 = time.perf_counter()
    need_lp_grads = "fwdbwd" in modes and any(not p.entropy for p in providers if runs(p, dev))
    ref = reference(*inputs, grads="fwdbwd" in modes, logprob_only_grads=need_lp_grads, sample=case.slow)
    print(f"[{BENCH}] {case.name} reference {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    records = []
    for mode in modes:
        mode_recs, timed = [], []
        for p in providers:
            if runs(p, dev):
                t0 = time.perf_counter()
                rec, call = bench_one(p, mode, case, inputs, ref, dev, timing)
                mode_recs.append(rec)
                if call is not None:
                    timed.append((rec, call))
                print(f"[{BENCH}] {case.name} {mode} {p.name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr,
                      flush=True)
        t0 = time.perf_counter()
        times = harness.time_interleaved([c for _, c in timed], dev, budget_s=timing["budget_s"])
        for (rec, _), (ms, reps) in zip(timed, times):
            rec.ms, rec.reps = ms, reps
        print(f"[{BENCH}] {case.name} {mode} timing rounds: {time.perf_counter() - t0:.1f} s", file=sys.stderr,
              flush=True)
        if dev.type == "cuda":
            for rec in mode_recs:
                note_tflops(rec, case, timing)
        # each peer against hotloop doing the same work: entropy peers vs hotloop, logprob-only vs _logprobs
        base = {e: next((r.ms for r in mode_recs if r.provider == name and r.correct), None)
                for e, name in ((True, "hotloop"), (False, "hotloop_logprobs"))}
        for r in mode_recs:
            b = base[BY_NAME[r.provider].entropy]
            r.ratio = r.ms / b if b and r.ms else None
        records += mode_recs
    del ref, inputs
    return records


def measure_memory(records: list[harness.Record], cases: list[Case], quick: bool, big: bool) -> None:
    """Probe every timed row but the slow case's (those only with --big-memory: each probe re-runs the call)."""
    slow = {c.name for c in cases if c.slow}
    for r in records:
        if r.ms is not None and not (big or r.case not in slow):
            r.note = (r.note + "; " if r.note else "") + "memory not probed (slow case: --big-memory)"
    harness.measure_memory(BENCH, MODULE, [r for r in records if big or r.case not in slow],
                           ("case", "mode", "provider"), quick=quick, timeout_s=1800)


def dense_mm_tflops(dev: torch.device) -> float | None:
    """The GPU's measured dense bf16 rate (8192x4096 @ 4096x8192), the ceiling the TFLOPS notes compare with."""
    if dev.type != "cuda":
        return None
    a = torch.randn(8192, 4096, device=dev, dtype=torch.bfloat16)
    b = torch.randn(4096, 8192, device=dev, dtype=torch.bfloat16)
    ms, _ = harness.time_ms(lambda: torch.mm(a, b), dev)
    return 2 * 8192 * 4096 * 8192 / (ms * 1e-3) / 1e12


def parse_args(argv):
    ap = harness.arg_parser(__doc__, "tiny shapes, fast providers: a CI smoke test")
    ap.add_argument("--cases", help="comma-separated substrings of case names, e.g. bf16 or 2048x1024")
    ap.add_argument("--modes", help=f"comma-separated, from {','.join(MODES)}")
    ap.add_argument("--providers", help=f"comma-separated, from {','.join(BY_NAME)} (hotloop and "
                                        "hotloop_logprobs always run: they are the ratios' baselines)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    ap.add_argument("--big-memory", action="store_true",
                    help="also probe memory for the slow CPU case (each probe re-runs the call twice in a child)")
    ap.add_argument("--slow-calls", type=int, default=1,
                    help="calls per row of the slow CPU case: 1 = the checked call is the sample; k > 1 = it is "
                         "the warm-up and k - 1 timed calls give the median (3: 1 warm-up + 2 timed)")
    ap.add_argument("--slow-all", action="store_true", help="also run compile and cce on the slow CPU case")
    return harness.parse_bench_args(ap, argv)


def main(argv=None) -> list[harness.Record]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    dev = harness.device()
    cases = harness.select_cases(args, QUICK_CASES, GPU_CASES if dev.type == "cuda" else CPU_CASES)
    modes = args.modes.split(",") if args.modes else list(MODES)
    names = args.providers.split(",") if args.providers else [p.name for p in PROVIDERS
                                                              if p.in_quick or not args.quick]
    names = [n for n in names if n in BY_NAME and n not in ("hotloop", "hotloop_logprobs")]
    providers = [BY_NAME[n] for n in names] + [BY_NAME["hotloop"], BY_NAME["hotloop_logprobs"]]
    # quick: a few repeats; full: harness defaults (~1 s of repeats per row, at least 3)
    timing = {"budget_s": 0.05 if args.quick else 1.0, "slow_calls": args.slow_calls, "slow_all": args.slow_all,
              "mm_tflops": dense_mm_tflops(dev)}
    if timing["mm_tflops"]:
        print(f"[{BENCH}] dense bf16 mm 8192x4096x8192: {timing['mm_tflops']:.0f} TFLOPS", file=sys.stderr)

    with harness.private_inductor_cache():
        records, t0 = [], time.perf_counter()
        for case in cases:
            records += bench_case(case, modes, providers, dev, timing)
        t1 = time.perf_counter()
        if not args.no_memory:
            measure_memory(records, cases, args.quick, args.big_memory)
        t2 = time.perf_counter()
        print(f"[{BENCH}] timing {t1 - t0:.0f} s, memory probes {t2 - t1:.0f} s, total {t2 - t0:.0f} s",
              file=sys.stderr)

    env = harness.env_info()
    env["versions"].update({d: harness._version(d) for d in ("cut-cross-entropy", "verl")})
    extra = {"hotloop_backend": harness.hotloop_backend("linear_token_stats_fwd", dev),
             "wall_s": {"timing": round(t1 - t0, 1), "memory": round(t2 - t1, 1)},
             "dense_bf16_mm_tflops": timing["mm_tflops"],
             "useful_flops": "2*N*H*V (fwd), 6*N*H*V (fwdbwd); hotloop's backward logit recompute not counted",
             "reference": "float32 materialised logits; grads of logprobs.sum() + entropy.sum() (logprobs.sum() "
                          "for logprob-only providers) w.r.t. hidden and weight",
             "peak_extra": harness.peak_extra_method(dev) + "; fwdbwd includes the returned d_weight [V, H]"}
    return harness.save_results(BENCH, records, env, args, extra)


if __name__ == "__main__":
    print(harness.markdown_table(main()))
