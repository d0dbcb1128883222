"""Compile every Triton kernel variant hotloop's launchers choose, for real GPUs, on a machine without one.

The interpreter (TRITON_INTERPRET=1, how the tests run the kernels on CPU) accepts programs the GPU compiler
rejects and knows nothing of registers or shared memory. This tool runs the real launchers
(hotloop/triton_kernels/*_triton) on fake CUDA tensors (torch's FakeTensorMode: shapes, strides and dtypes, no
storage) with a compile-only Triton driver that reports the target GPU, so each launch is compiled exactly as it
would be on that GPU (same block sizes, constexprs, warps, integer and alignment specialisations) and never run.
Each compiled kernel's cubin is read with the cuobjdump shipped inside triton: registers, stack, local memory,
and (where a stack frame exists) spill counts from a `ptxas -v` run over the same PTX (without triton's own ptxas
flags, so they may differ slightly from the cubin's). Fake tensors report data_ptr() 0, so every pointer compiles
as 16-byte aligned: the variant a misaligned view would get on a GPU is not in the matrix.

Fails (exit 1) on a compile error, on shared memory above the architecture's per-block limit, on register spills
not covered by SPILLS_ALLOWED (kernel, variant, bytes, reason), and on a launchable kernel (a `*_kernel` JIT function
in hotloop.triton_kernels) that no case reaches.

  python scripts/triton_compile_matrix.py                      # both archs, the installed triton
  python scripts/triton_compile_matrix.py --triton 3.6.0       # the GPU image's triton (installed once into
                                                               #   $HOTLOOP_CACHE/triton-3.6.0, put on PYTHONPATH)
  python scripts/triton_compile_matrix.py --list               # the captured launches only, no compile
Writes benchmarks/results/compile/triton-<version>.{json,md} (kernel, variant, arch, regs, spills, smem).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("HOTLOOP_CACHE", Path.home() / ".cache" / "hotloop"))


@dataclasses.dataclass(frozen=True)
class Arch:
    capability: int
    sm_count: int      # what the launchers' tile / split heuristics see (torch.cuda.get_device_properties)
    smem_limit: int    # bytes of shared memory one block may use (opt-in maximum)
    gpu: str


ARCHS = {
    "sm_80": Arch(80, 108, 163 * 1024, "A100"),
    "sm_90a": Arch(90, 132, 227 * 1024, "H100 / H200"),  # triton targets sm_90a for capability 90
}

@dataclasses.dataclass(frozen=True)
class SpillAllowance:
    kernel: str
    variant_has: tuple[str, ...]  # substrings the variant text must all hold
    max_bytes: int                # spill stores or loads, per thread
    reason: str
    arch: str | None = None       # None: any


# the only spills accepted, each with why; any other spill fails the matrix
SPILLS_ALLOWED = [
    SpillAllowance(kernel, ("PRECISION=ieee",), 16,
                   "fp32 ieee tl.dot has no tensor-core form (FMA); ptxas keeps 8-16 B a thread in local memory at "
                   "every tile tried (64/128 x 32/64/128, 4 or 8 warps), against 400-600 B at the old 128 x 128 tiles")
    for kernel in ("_linear_token_stats_fwd_kernel", "_linear_token_stats_bwd_kernel")
] + [
    SpillAllowance("_linear_token_stats_fwd_kernel",
                   ("BLOCK_M=128,BLOCK_N=128,", "HAS_BIAS=True,HAS_ENTROPY=True,HAS_SC=True"), 12,
                   "Hopper's 128 x 128 bf16 / fp16 tile over 16 warps (a 128-register cap) with bias, entropy and "
                   "self-certainty all on: triton 3.6 spills 12 B a thread, 3.9 none; the smaller tiles that do not "
                   "spill trade wgmma width for it, unmeasured until a GPU run", arch="sm_90a"),
]


def _spill_allowed(row: dict) -> bool:
    return any(a.kernel == row["kernel"] and a.arch in (None, row["arch"])
               and all(part in row["variant"] for part in a.variant_has)
               and max(row["spill_stores"], row["spill_loads"]) <= a.max_bytes for a in SPILLS_ALLOWED)

# constexpr values a GPU launch never takes, per kernel parameter: UPCAST is the interpreter's bf16 tl.dot
# workaround (launchers pass interpreting(), False on a GPU)
GPU_CONSTANTS = {"UPCAST": False}


# ------------------------------------------------------------------------------------------------ the cases
def _cases() -> Iterator[tuple[str, Callable[[], object]]]:
    """(label, launch) pairs: every launcher over the dtypes, flags and shape regimes that change what it
    compiles (block sizes from V / H / N, vocabulary splits from the row count, fixed vs ragged groups)."""
    import torch

    from hotloop.contracts import ADVANTAGE_KINDS as GA_KINDS
    from hotloop.contracts import PREFERENCE_KIND_IDS as PREF_KINDS
    from hotloop.triton_kernels import (byol_loss, dino_loss, group_advantages, linear_token_stats, policy_loss,
                                        preference_loss, token_stats)

    def t(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device="cuda")

    floats = (torch.float32, torch.bfloat16, torch.float16)
    flags = list(itertools.product((False, True), repeat=2))

    # token_stats: V picks the tile (cap 8192 for 2-byte logits, 4096 for fp32); few rows split the vocabulary
    for dt, (ent, sc), (rows, V) in itertools.product(floats, flags, ((4096, 152064), (8, 152064), (64, 1000))):
        def fwd_bwd(dt=dt, ent=ent, sc=sc, rows=rows, V=V):
            logits, labels = t(1, rows, V, dtype=dt), t(1, rows, dtype=torch.int64)
            lp, e, s, lse = token_stats.token_stats_fwd_triton(logits, labels, 1.0, -100, ent, sc)
            g = t(1, rows)
            token_stats.token_stats_bwd_triton(logits, g, g if ent else None, g if sc else None, logits, labels,
                                               lse, e if ent else None, 1.0, -100)
        yield f"token_stats {dt} entropy={ent} sc={sc} rows={rows} V={V}", fwd_bwd
    for dt in floats:  # the backward's other upstream-gradient subsets
        for glp, gh, gsc in itertools.product((False, True), repeat=3):
            if not (glp or gh or gsc):
                continue
            def bwd(dt=dt, glp=glp, gh=gh, gsc=gsc):
                logits, labels, g = t(2, 64, 32000, dtype=dt), t(2, 64, dtype=torch.int32), t(2, 64)
                token_stats.token_stats_bwd_triton(logits, g if glp else None, g if gh else None,
                                                   g if gsc else None, logits, labels, g, g if gh else None, 1.0, -100)
            yield f"token_stats bwd {dt} glp={glp} gh={gh} gsc={gsc}", bwd

    # linear_token_stats, per dtype: every flag set (entropy, self-certainty, bias) at the largest tiles (few row
    # blocks: split vocabulary), then every tile regime with all flags on and all off: N >= 67584 fills the SMs
    # unsplit, N <= 64 takes 64-row tiles, small H / V shrink BLOCK_K / BLOCK_N
    def lin_case(dt, ent, sc, bias, N, H, V):
        hidden, weight, labels = t(N, H, dtype=dt), t(V, H, dtype=dt), t(N, dtype=torch.int64)
        b = t(V, dtype=dt) if bias else None
        lp, e, s, lse = linear_token_stats.linear_token_stats_fwd_triton(hidden, weight, b, labels, 1.0, -100, ent, sc)
        g = t(N)
        linear_token_stats.linear_token_stats_bwd_triton(g, g if ent else None, g if sc else None, hidden, weight, b,
                                                         labels, lse, e if ent else None, 1.0, -100, True, True, bias)

    big = (8192, 4096, 151936)
    lin = [(dt, ent, sc, bias, big) for dt, (ent, sc), bias in itertools.product(floats, flags, (False, True))]
    lin += [(dt, on, on, on, shape) for dt, on, shape in itertools.product(
        floats, (False, True), ((131072, 4096, 151936), (64, 4096, 151936), (300, 896, 32000), (16, 16, 100),
                                (64, 64, 66000)))]  # the last: one row block, ~520 splits, the widest merge
    for dt, ent, sc, bias, shape in lin:
        yield (f"linear_token_stats {dt} entropy={ent} sc={sc} bias={bias} N,H,V={shape}",
               lambda a=(dt, ent, sc, bias, *shape): lin_case(*a))

    # the backward's other choices: which gradients, which upstream terms, gradient filtering, fp32 ieee / tf32
    def lin_bwd(dt, tf32, need_h, need_w, glp, gh, filt):
        N, H, V = 2048, 2048, 32000
        hidden, weight, labels, g = t(N, H, dtype=dt), t(V, H, dtype=dt), t(N, dtype=torch.int32), t(N)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            linear_token_stats.linear_token_stats_bwd_triton(g if glp else None, g if gh else None, None, hidden,
                                                             weight, None, labels, g, g if gh else None, 1.0, -100,
                                                             need_h, need_w, False, filter_eps=filt)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old

    bwd = [(torch.float32, True, True, True, True, False, 0.0)]  # tf32
    bwd += [(dt, False, nh, nw, True, False, 0.0) for dt in floats for nh, nw in ((True, False), (False, True))]
    bwd += [(dt, False, True, True, glp, gh, 0.0) for dt in floats for glp, gh in ((False, True), (True, True))]
    bwd += [(dt, False, True, True, True, False, 2.0 ** -16) for dt in floats]
    for a in bwd:
        yield "linear_token_stats bwd {} tf32={} need_h={} need_w={} glp={} gh={} filter={}".format(*a), \
            lambda a=a: lin_bwd(*a)

    # group advantages: fixed groups (tile shape from G and the group count) and ragged, every kind and scale
    for kind, scale in itertools.product(GA_KINDS, group_advantages.SCALE_IDS):
        if kind != "grpo" and scale != "group":
            continue
        for dt, (R, G) in itertools.product((torch.float32, torch.bfloat16), ((4096, 8), (16, 16), (8192, 8192))):
            yield (f"group_advantages {kind} {scale} {dt} R={R} G={G}",
                   lambda kind=kind, scale=scale, dt=dt, R=R, G=G:
                   group_advantages.group_advantages_fwd_triton(t(R, dtype=dt), None, G, kind, scale, 1e-6))
        for gdt in (torch.int32, torch.int64):
            yield (f"group_advantages ragged {kind} {scale} group_index={gdt}",
                   lambda kind=kind, scale=scale, gdt=gdt:
                   group_advantages.group_advantages_fwd_triton(t(5000), t(5000, dtype=gdt), 0, kind, scale, 1e-6))

    # policy / NFT tokens: every KL kind, dual clip on and off
    for kl, dual in itertools.product(range(4), (0.0, 3.0)):
        yield (f"policy_tokens kl={kl} dual={dual}",
               lambda kl=kl, dual=dual: policy_loss.policy_tokens_triton(
                   t(70000), t(70000) if kl else None, t(70000), t(70000), t(70000), 0.2, 0.28, dual, kl, 0.04))
    yield "nft_tokens", lambda: policy_loss.nft_tokens_triton(t(70000), t(70000), t(70000), t(70000), t(70000), 1.0)

    # preference pairs (every kind) and KTO items
    for name, kind in PREF_KINDS.items():
        yield (f"preference_pairs {name}",
               lambda kind=kind: preference_loss.preference_pairs_triton(*(t(512) for _ in range(8)), kind, 0.1,
                                                                         0.0, 0.5))
    yield "kto_items", lambda: preference_loss.kto_items_triton(t(512), t(512), t(512), t(1), 0.1, 1.0, 1.0)

    # DINO (K up to the 2048 tile and beyond) and BYOL (D below and above the 1024 tile), with / without grad
    for dt, K, grad in itertools.product(floats, (256, 65536), (False, True)):
        yield (f"dino {dt} K={K} grad={grad}",
               lambda dt=dt, K=K, grad=grad: dino_loss.dino_loss_fwd_triton(t(10 * 64, K, dtype=dt), t(2 * 64, K, dtype=dt),
                                                                            t(K), 2, 0.1, 0.04, grad))
    for dt, D, grad in itertools.product(floats, (256, 4096), (False, True)):
        yield (f"byol {dt} D={D} grad={grad}",
               lambda dt=dt, D=D, grad=grad: byol_loss.byol_loss_fwd_triton(t(512, D, dtype=dt), t(512, D, dtype=dt),
                                                                            grad))


# ------------------------------------------------------------------------------------------- capture + compile
@dataclasses.dataclass
class Launch:
    kernel: str
    variant: str        # constexprs, warps / stages, pointer dtypes: what makes it a different program
    constexprs: dict
    compiled: object    # triton CompiledKernel, or None (--list)


def _variant(fn, args, kwargs) -> tuple[str, dict]:
    import torch

    names = [p.name for p in fn.params]
    bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    constexprs = {p.name: bound[p.name] for p in fn.params if p.is_constexpr and p.name in bound}
    ptrs = sorted({str(v.dtype).replace("torch.", "") for v in bound.values() if isinstance(v, torch.Tensor)})
    opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    text = ",".join(f"{k}={v}" for k, v in {**constexprs, **opts}.items()) + " ptr:" + "/".join(ptrs)
    return text, constexprs


@contextlib.contextmanager
def compile_only(arch: Arch, launches: list[Launch], compile: bool = True):
    """Launches inside see `arch`'s GPU, compile for it (unless not `compile`) and record a Launch each."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    import hotloop.triton_kernels._common as common

    class CompileOnlyDriver(DriverBase):
        """What JITFunction.run asks of a driver before it launches; the launch itself never happens."""

        def __init__(self, target):
            self.target = target

        @classmethod
        def is_active(cls):
            return False

        def get_current_target(self):
            return self.target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cuda", 0)

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError

        def get_benchmarker(self):
            raise NotImplementedError

    real_run, real_info = JITFunction.run, common._device_info

    def run(self, *args, grid, warmup, **kwargs):
        variant, constexprs = _variant(self, args, kwargs)
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs) if compile else None
        launches.append(Launch(self.fn.__name__, variant, constexprs, kernel))
        return kernel

    if compile:  # the worker process owns the driver from here on (a reset would look for a real GPU)
        driver.set_active(CompileOnlyDriver(GPUTarget("cuda", arch.capability, 32)))
    JITFunction.run = run
    common._device_info = lambda index: (arch.sm_count, arch.capability)
    try:
        with warnings.catch_warnings(), FakeTensorMode(allow_non_fake_inputs=True):
            warnings.simplefilter("ignore")  # FakeTensor.data_ptr() (triton's alignment check) warns each time
            yield
    finally:
        JITFunction.run, common._device_info = real_run, real_info


def _tool(name: str) -> str:
    import triton.backends.nvidia as nv

    return str(Path(nv.__file__).parent / "bin" / name)


def _resources(kernel, arch_name: str) -> dict:
    """Registers, stack, local memory from the cubin; spill bytes from ptxas -v when there is a stack frame
    (the ptxas triton itself picks for the arch: its PTX version may be newer than another ptxas reads)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], check=True,
                               capture_output=True, text=True).stdout
        fields = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", usage.split("Function", 1)[-1]))
        res = {"regs": int(fields["REG"]), "stack": int(fields["STACK"]), "local": int(fields["LOCAL"]),
               "smem": int(kernel.metadata.shared), "spill_stores": 0, "spill_loads": 0}
        if res["stack"] or res["local"]:
            ptx = Path(tmp) / "k.ptx"
            ptx.write_text(kernel.asm["ptx"])
            ptxas = get_ptxas(ARCHS[arch_name].capability).path
            proc = subprocess.run([ptxas, "-v", f"--gpu-name={arch_name}", str(ptx), "-o", str(cubin)],
                                  capture_output=True, text=True)
            log = proc.stdout + proc.stderr
            if proc.returncode:
                raise RuntimeError(f"ptxas -v failed on {kernel.name}: {log[-2000:]}")
            for kind in ("stores", "loads"):
                found = re.findall(rf"(\d+) bytes spill {kind}", log)
                res[f"spill_{kind}"] = max(map(int, found), default=0)
    return res


def run_arch(arch_name: str, only: str | None) -> dict:
    """Compile every case for one arch -> {"rows": [...], "errors": [...]} (rows deduplicated by program)."""
    import triton

    arch = ARCHS[arch_name]
    rows, errors, seen = [], [], set()
    for label, launch in _cases():
        if only and not re.search(only, label):
            continue
        launches: list[Launch] = []
        try:
            with compile_only(arch, launches):
                launch()
        except Exception as exc:  # a compile error: report the case and go on with the others
            errors.append({"arch": arch_name, "case": label, "error": f"{type(exc).__name__}: {exc}"[:4000]})
            continue
        for ln in launches:
            key = (ln.kernel, ln.compiled.hash)
            if key in seen:
                continue
            seen.add(key)
            rows.append({"kernel": ln.kernel, "variant": ln.variant, "arch": arch_name, "case": label,
                         "num_warps": ln.compiled.metadata.num_warps, "num_stages": ln.compiled.metadata.num_stages,
                         **_resources(ln.compiled, arch_name)})
    return {"triton": triton.__version__, "rows": rows, "errors": errors}


def capture_all(only: str | None = None) -> list[tuple[str, Launch]]:
    """Every case's launches on every arch, recorded without compiling (fast; what the coverage check reads)."""
    out = []
    for arch, (label, launch) in itertools.product(ARCHS.values(), _cases()):
        if only and not re.search(only, label):
            continue
        launches: list[Launch] = []
        with compile_only(arch, launches, compile=False):
            launch()
        out += [(label, ln) for ln in launches]
    return out


def launchable_kernels() -> set[str]:
    """Every `*_kernel` JIT function of hotloop.triton_kernels (helpers called inside kernels end otherwise)."""
    import importlib
    import pkgutil

    import hotloop.triton_kernels as pkg
    from triton.runtime.jit import JITFunction

    names = set()
    for mod in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{mod.name}")
        names |= {n for n, v in vars(module).items() if isinstance(v, JITFunction) and n.endswith("_kernel")}
    return names


def coverage_problems(captured: list[tuple[str, Launch]]) -> list[str]:
    """Kernels no case launches, and boolean constexprs a case list leaves at one value (UPCAST excepted)."""
    problems = [f"{k}: launched by no case" for k in sorted(launchable_kernels() - {ln.kernel for _, ln in captured})]
    values: dict[tuple[str, str], set] = {}
    for _, ln in captured:
        for name, v in ln.constexprs.items():
            values.setdefault((ln.kernel, name), set()).add(v)
    for (kernel, name), vs in sorted(values.items()):
        if name in GPU_CONSTANTS:
            if vs != {GPU_CONSTANTS[name]}:
                problems.append(f"{kernel}.{name}: a GPU launch took {vs}, expected only {GPU_CONSTANTS[name]}")
        elif all(isinstance(v, bool) for v in vs) and vs != {False, True}:
            problems.append(f"{kernel}.{name}: only {vs} is compiled; a launcher can choose the other value")
    return problems


def violations(result: dict) -> list[str]:
    out = [f"[{e['arch']}] {e['case']}: {e['error'].splitlines()[0]}" for e in result["errors"]]
    for r in result["rows"]:
        limit = ARCHS[r["arch"]].smem_limit
        if r["smem"] > limit:
            out.append(f"[{r['arch']}] {r['kernel']} {r['variant']}: {r['smem']} B of shared memory > {limit}")
        if (r["spill_stores"] or r["spill_loads"]) and not _spill_allowed(r):
            out.append(f"[{r['arch']}] {r['kernel']} {r['variant']}: spills {r['spill_stores']} B stores / "
                       f"{r['spill_loads']} B loads (fix it, or add a SpillAllowance with the reason)")
    return out


def markdown(result: dict) -> str:
    lines = [f"# Triton compile matrix (triton {result['triton']})", "",
             f"{len(result['rows'])} programs; shared-memory limits per block: "
             + ", ".join(f"{k} {a.smem_limit // 1024} KiB ({a.gpu})" for k, a in ARCHS.items()) + ".", "",
             "| kernel | variant | arch | warps | stages | regs | spill B (st/ld) | local B | smem B |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: (r["kernel"], r["variant"], r["arch"])):
        lines.append(f"| {r['kernel']} | {r['variant']} | {r['arch']} | {r['num_warps']} | {r['num_stages']} | "
                     f"{r['regs']} | {r['spill_stores']}/{r['spill_loads']} | {r['local']} | {r['smem']} |")
    lines += ["", "Accepted spills:"] + [
        f"- {a.kernel} ({a.arch or 'any arch'}) with `{'`, `'.join(a.variant_has)}`, up to {a.max_bytes} B: {a.reason}"
        for a in SPILLS_ALLOWED]
    for e in result["errors"]:
        lines.append(f"\nERROR [{e['arch']}] {e['case']}:\n```\n{e['error']}\n```")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- driver
def _triton_path(version: str | None) -> str | None:
    """A directory holding triton==version (pip --target, cached), or None for the installed triton."""
    if version is None:
        return None
    target = CACHE / f"triton-{version}"
    if not (target / "triton" / "__init__.py").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        f"triton=={version}"], check=True)
    return str(target)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--triton", help="compile with this triton release instead of the installed one")
    ap.add_argument("--only", help="regex over case labels")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compile")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    ap.add_argument("--list", action="store_true", help="print the captured launches and the coverage check")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # one arch, in a child process: JSON on stdout
    args = ap.parse_args()

    if args.worker:
        print(json.dumps(run_arch(args.worker, args.only)))
        return 0
    if args.list:
        captured = capture_all(args.only)
        for variant in sorted({f"{ln.kernel} {ln.variant}" for _, ln in captured}):
            print(variant)
        problems = coverage_problems(captured) if not args.only else []
        print(f"{len(captured)} launches, {len({(ln.kernel, ln.variant) for _, ln in captured})} variants")
        print("\n".join(problems) or "coverage: every launchable kernel and boolean constexpr variant is reached")
        return 1 if problems else 0

    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    extra = _triton_path(args.triton)
    if extra:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, env.get("PYTHONPATH")) if p)
    start = time.perf_counter()
    # one child per arch (a driver and JIT caches per process), at most --jobs at a time
    pending, running, outputs = list(args.arch), [], {}
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            a = pending.pop(0)
            cmd = [sys.executable, __file__, "--worker", a] + (["--only", args.only] if args.only else [])
            running.append((a, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)))
        a, proc = running.pop(0)
        out, _ = proc.communicate()
        if proc.returncode:
            print(f"compile matrix worker for {a} failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        outputs[a] = json.loads(out)
    result = {"triton": outputs[args.arch[0]]["triton"], "rows": [], "errors": []}
    for a in args.arch:
        result["rows"] += outputs[a]["rows"]
        result["errors"] += outputs[a]["errors"]
    problems = violations(result)
    if not args.only:
        problems += coverage_problems(capture_all())
    if not args.only:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"triton-{result['triton']}"
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / f"{stem}.md").write_text(markdown(result))
    worst = max(result["rows"], key=lambda r: r["smem"], default=None)
    print(f"triton {result['triton']}: {len(result['rows'])} programs over {', '.join(args.arch)} in "
          f"{time.perf_counter() - start:.0f} s; {len(result['errors'])} compile errors; max smem "
          + (f"{worst['smem']} B ({worst['kernel']} {worst['arch']})" if worst else "-")
          + f"; max regs {max((r['regs'] for r in result['rows']), default=0)}")
    for p in problems:
        print("FAIL", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
