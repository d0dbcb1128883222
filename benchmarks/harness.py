"""Shared benchmark machinery: inputs, timing, peak-memory probes, result records and their JSON / markdown.

A bench module (bench_*.py) owns its cases and providers; it times them here in one process on the same inputs,
and measures memory through `peak_extra_bytes`, which on CPU re-builds each call in a fresh subprocess
(`python -m benchmarks.harness --probe ...`) so that one provider's freed-but-retained memory cannot hide or
inflate another's peak.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import gc
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"
PROBE_TAG = "HOTLOOP_PROBE "  # marks the probe's result line among whatever else the child prints


# ------------------------------------------------------------------------------------------------- device / env
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|\bprocessor\b|\bcpu @.*|\b\d+-core\b", " ", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown-cpu"


def device_slug() -> str:
    """Results folder name: the GPU's name, or cpu-<threads>threads-<model>; timings only compare within one."""
    if torch.cuda.is_available():
        return _slug(torch.cuda.get_device_name())
    return f"cpu-{torch.get_num_threads()}threads-{_slug(cpu_model())}"


def _version(dist: str) -> str | None:
    # metadata, not import: importing trl alone takes seconds
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def env_info() -> dict:
    dev = device()
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_slug(),
        "device_name": torch.cuda.get_device_name() if dev.type == "cuda" else cpu_model(),
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "versions": {d: _version(d) for d in ("torch", "triton", "hotloop", "trl", "liger-kernel", "flash-attn")},
    }


# ------------------------------------------------------------------------------------------------------- inputs
def random_logits(n: int, v: int, dtype: torch.dtype, dev: torch.device, seed: int = 0,
                  chunk_elems: int = 1 << 23) -> torch.Tensor:
    """randn * 2 in `dtype`, generated a few row blocks at a time so no full-size float32 temporary exists
    (on GPU that temporary would stay in the caching allocator and skew the memory numbers)."""
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = torch.empty(n, v, dtype=dtype, device=dev)
    rows = max(1, chunk_elems // v)
    for start in range(0, n, rows):
        block = torch.randn(min(rows, n - start), v, generator=gen, device=dev)
        out[start:start + block.shape[0]] = block.mul_(2)
        del block
    return out


def random_labels(n: int, v: int, dev: torch.device, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator(device=dev).manual_seed(seed)
    return torch.randint(0, v, (n,), generator=gen, device=dev, dtype=torch.int64)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64 (so the check itself adds no rounding)."""
    got, ref = got.detach().double(), ref.detach().double()
    return float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------------- timing
def importable(module: str) -> Callable[[], str | None]:
    """A provider's availability check: None when `module` imports here, else the reason it does not."""
    def check():
        try:
            __import__(module)
        except Exception as exc:  # noqa: BLE001  (any failure means: not available here)
            return f"{module} not importable: {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
        return None

    return check


def hotloop_backend(kernel_op: str, dev: torch.device) -> str | None:
    """The backend hotloop's dispatcher picks for the kernel-level op `kernel_op` (e.g. "token_stats_fwd") on
    `dev` (recorded with the results), or None when it has none."""
    try:
        import hotloop  # noqa: F401  (registers the kernels)
        from hotloop._internal import dispatch

        return dispatch.backend(kernel_op, dev)
    except Exception:  # noqa: BLE001  (not installed / not built: the records say so)
        return None


def arg_parser(doc: str, quick_help: str = "tiny shapes: a CI smoke test") -> argparse.ArgumentParser:
    """The options every bench module takes (--quick, --out-dir); modules add their own."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--out-dir", help="results root (default benchmarks/results); files go to <root>/<device>/")
    return ap


def parse_bench_args(ap: argparse.ArgumentParser, argv) -> argparse.Namespace:
    return ap.parse_known_args(argv)[0]  # known-args: run.py hands every bench the same argv


def select_cases(args: argparse.Namespace, quick_cases: list, full_cases: list) -> list:
    """quick_cases with --quick, else full_cases; narrowed by --cases (comma-separated substrings of case names)
    where the module has that option."""
    cases = quick_cases if args.quick else full_cases
    if getattr(args, "cases", None):
        cases = [c for c in cases if any(s in c.name for s in args.cases.split(","))]
    return cases


@contextlib.contextmanager
def private_inductor_cache():
    """A fresh inductor cache: compile times are cold compiles, and the memory probes (children inherit the
    variable) reuse the kernels; restored afterwards so the next bench in the same run.py picks its own."""
    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    cache = tempfile.mkdtemp(prefix="hotloop-bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    try:
        yield
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if saved is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_first_call_ms(fn: Callable[[], object], dev: torch.device) -> tuple[float, object]:
    """One timed call (torch.compile's compile time); returns the output too, for the correctness check."""
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return (time.perf_counter() - t0) * 1e3, out


def time_ms(fn: Callable[[], object], dev: torch.device, *, warmup: bool = True, budget_s: float = 1.0,
            min_reps: int = 3, max_reps: int = 30) -> tuple[float, int]:
    """Median ms of `fn` -> (median, repeats); `warmup=False` when the caller has already called it once.

    CPU: repeats until `budget_s` is spent (at least min_reps, at most max_reps), so the slowest rows (seconds
    per call) stay bounded in time and fast ones get enough samples for a stable median.
    GPU: triton's do_bench (CUDA events, L2 flushed between calls, its own warm-up)."""
    if dev.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")), -1
    if warmup:
        fn()  # thread-pool start, lazy inits
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out  # free before the next call, as a training step would
    return statistics.median(times) * 1e3, len(times)


def time_interleaved(fns: list[Callable[[], object]], dev: torch.device, *, budget_s: float = 1.0,
                     min_reps: int = 3, max_reps: int = 30) -> list[tuple[float, int]]:
    """Median ms of each of `fns` -> [(median, repeats)], already called once each (warm).

    CPU: timed in rounds, each fn once per round in turn, until `budget_s` per fn is spent (at least min_reps
    rounds, at most max_reps). The 2-vCPU cloud machines these run on drift between a fast and a slow speed (2x,
    over minutes): timed one after the other, a provider would be measured in whichever phase it fell in; in rounds
    every provider sees the same phases. GPU: time_ms for each (CUDA events, L2 flushed)."""
    if dev.type == "cuda":
        return [time_ms(fn, dev, warmup=False) for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < max_reps and (len(times[0]) < min_reps
                                        or time.perf_counter() - start < budget_s * len(fns)):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            out = fn()
            ts.append(time.perf_counter() - t0)
            del out  # free before the next call, as a training step would
    return [(statistics.median(ts) * 1e3, len(ts)) for ts in times]


# ------------------------------------------------------------------------------------------------------- memory
def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_freed_memory() -> None:
    gc.collect()
    try:  # glibc keeps freed small blocks in its arenas; hand them back so RSS-before is the live data only
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _cpu_peak_extra(fn: Callable[[], object]) -> int:
    """Peak RSS growth of one call: reset the high-water mark (clear_refs 5) right before it, read VmHWM after."""
    out = fn()  # warm-up, so one-time costs (thread stacks, compile, lazy imports) are not counted
    del out
    _release_freed_memory()
    before = _proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    out = fn()
    peak = _proc_status_kib("VmHWM")
    del out
    return (peak - before) * 1024


def _gpu_peak_extra(fn: Callable[[], object]) -> int:
    out = fn()
    del out
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return peak - before


def peak_extra_bytes(module: str, specs: list[dict], *, fresh: bool = True, timeout_s: float = 600
                     ) -> list[int | str]:
    """Peak extra memory of each spec's call beyond its inputs: bytes, or an error string.

    `module` must define probe_call(spec) -> zero-argument callable that holds its own inputs. On GPU the call
    runs in this process (the allocator's peak counters are exact); on CPU each spec runs in a fresh child
    (`fresh=False`: all specs in one child, for a quick smoke run)."""
    if torch.cuda.is_available():
        mod = importlib.import_module(module)
        results = []
        for spec in specs:
            try:
                results.append(_gpu_peak_extra(mod.probe_call(spec)))
            except Exception as exc:  # noqa: BLE001  (recorded, not fatal: other providers still get measured)
                results.append(f"{type(exc).__name__}: {exc}")
            gc.collect()
            torch.cuda.empty_cache()
        return results
    groups = [[s] for s in specs] if fresh else [specs]
    results = []
    for group in groups:
        arg = json.dumps({"module": module, "specs": group})
        try:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.harness", "--probe", arg], cwd=REPO_ROOT,
                                  capture_output=True, text=True, timeout=timeout_s)
            lines = [ln[len(PROBE_TAG):] for ln in proc.stdout.splitlines() if ln.startswith(PROBE_TAG)]
            got = [json.loads(ln) for ln in lines]
            if len(got) != len(group):
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                got += [f"probe exited {proc.returncode}: {tail[0]}"] * (len(group) - len(got))
        except subprocess.TimeoutExpired:
            got = [f"probe timed out after {timeout_s}s"] * len(group)
        results.extend(got)
    return results


def measure_memory(bench: str, module: str, records: list[Record], keys: tuple[str, ...] = ("case", "provider"), *,
                   quick: bool, timeout_s: float = 600, announce: bool = True) -> None:
    """Set peak_extra_mib on each timed record (ms not None) through `peak_extra_bytes`; a failed probe is added
    to the record's note instead. `keys`: the record fields that make the spec `module`.probe_call receives.
    quick: all probes in one child (CPU), else a fresh child each; announce: say how many on stderr first."""
    todo = [r for r in records if r.ms is not None]
    if announce:
        print(f"[{bench}] memory: {len(todo)} probes in {'one' if quick else 'fresh'} subprocess(es)",
              file=sys.stderr, flush=True)
    specs = [{k: getattr(r, k) for k in keys} for r in todo]
    for r, got in zip(todo, peak_extra_bytes(module, specs, fresh=not quick, timeout_s=timeout_s)):
        if isinstance(got, str):
            r.note = (r.note + "; " if r.note else "") + f"memory probe failed: {got[:120]}"
        else:
            r.peak_extra_mib = got / 2**20


def peak_extra_method(dev: torch.device, call: str = "call") -> str:
    """How measure_memory measured on `dev`, for the results' "peak_extra" field (`call`: what one call is)."""
    if dev.type == "cuda":
        return "cuda allocator peak minus allocated before the call"
    return f"VmHWM - VmRSS around one {call} in a fresh subprocess, after a warm-up {call}"


def _probe_main(arg: str) -> None:
    req = json.loads(arg)
    mod = importlib.import_module(req["module"])
    for spec in req["specs"]:
        try:
            fn = mod.probe_call(spec)
            result: int | str = _cpu_peak_extra(fn)
            del fn
        except Exception as exc:  # noqa: BLE001
            result = f"{type(exc).__name__}: {exc}"
        print(PROBE_TAG + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------------ records
@dataclasses.dataclass
class Record:
    bench: str
    case: str
    mode: str
    provider: str
    ms: float | None = None            # median of the timed calls
    reps: int | None = None            # timed calls behind the median (-1: do_bench chose)
    compile_ms: float | None = None    # first call (torch.compile only)
    ratio: float | None = None         # ms / hotloop's ms for the same case and mode: > 1 means hotloop is faster
    gbps: float | None = None          # effective bandwidth, see the bench module for the bytes counted
    peak_extra_mib: float | None = None
    correct: bool | None = None        # forward (and gradient) within tolerance of torch eager fp32
    max_rel_err: float | None = None
    note: str = ""                     # why unavailable / failed, or a caveat


def error_note(exc: BaseException) -> str:
    """A failed provider's note: the exception type and the first line of its message (at most 120 characters)."""
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0][:120] if lines else ''}"


def set_ratios(records: list[Record], baseline: str = "hotloop") -> None:
    """ratio = ms / the baseline provider's ms among `records` (one case and mode); None where a time is missing
    or the baseline's result was wrong."""
    base = next((r.ms for r in records if r.provider == baseline and r.correct), None)
    for r in records:
        r.ratio = r.ms / base if base and r.ms else None


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(records: list[Record]) -> str:
    head = ("| bench | case | mode | provider | ms | peer/hotloop | GB/s | peak extra MiB | correct (rel err) "
            "| compile s | note |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        ok = "-" if r.correct is None else ("ok" if r.correct else "**FAIL**")
        if r.max_rel_err is not None:
            ok += f" ({r.max_rel_err:.1e})"
        rows.append(f"| {r.bench} | {r.case} | {r.mode} | {r.provider} | {_fmt(r.ms, '.2f')} | "
                    f"{_fmt(r.ratio, '.2f')} | {_fmt(r.gbps, '.1f')} | {_fmt(r.peak_extra_mib, '.0f')} | {ok} | "
                    f"{_fmt(None if r.compile_ms is None else r.compile_ms / 1e3, '.1f')} | {r.note} |")
    return "\n".join(rows)


def header_lines(env: dict) -> str:
    v = ", ".join(f"{k} {val}" for k, val in env["versions"].items() if val)
    return (f"date (UTC) {env['date_utc']}; device {env['device_name']} ({env['device']}); "
            f"threads {env['threads']}; python {env['python']}; {v}")


def write_results(name: str, records: list[Record], env: dict, out_dir: Path | str | None = None,
                  extra: dict | None = None) -> Path:
    """-> <out_dir>/<device>/<name>.json and .md (the markdown: environment line, then the table)."""
    folder = Path(out_dir or DEFAULT_OUT) / env["device"]
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"env": env, **(extra or {}), "records": [dataclasses.asdict(r) for r in records]}
    (folder / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (folder / f"{name}.md").write_text(f"# {name}\n\n{header_lines(env)}\n\n{markdown_table(records)}\n")
    return folder / f"{name}.json"


def save_results(bench: str, records: list[Record], env: dict, args: argparse.Namespace, extra: dict
                 ) -> list[Record]:
    """The end of a bench module's main: write_results as <bench>[_quick] under --out-dir, the JSON's fields
    "bench" and "quick" first, then `extra`; say where on stderr. -> records (main's return value)."""
    path = write_results(bench + ("_quick" if args.quick else ""), records, env, args.out_dir,
                         {"bench": bench, "quick": args.quick, **extra})
    print(f"[{bench}] wrote {path}", file=sys.stderr)
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="internal: memory probe child (see peak_extra_bytes)")
    parser.add_argument("--probe", required=True)
    _probe_main(parser.parse_args().probe)
