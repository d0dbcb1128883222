"""compute-sanitizer memcheck over one small case of every GPU kernel family (benchmarks/gpu_check.sh, step 3).

    python benchmarks/sanitizer_cases.py --list [--device cuda|cpu]
    python benchmarks/sanitizer_cases.py --run --out DIR [--timeout S] [--sanitizer compute-sanitizer|none]
                                         [--device cuda|cpu] [--plain-if-unsupported] [--cases a,b]
    python benchmarks/sanitizer_cases.py --worker [--device cuda|cpu] [--cases family/backend,...] [--deadline T]

A case is (family, backend): each family's small, odd-sized inputs (ragged tails for every tile loop) run once
with HOTLOOP_BACKEND forced to each GPU backend the op has (triton and / or cuda); on --device cpu (the CI dry
run) every family runs once on the C++ backend instead.

--run (the orchestrator, never itself under the sanitizer):
  1. probes once: `compute-sanitizer --tool memcheck python -c <one CUDA add>`; not on PATH, "Device not
     supported" (gVisor machines), a non-zero exit or no output from the probe -> status "unsupported", recorded
     with the reason, and no case runs (--plain-if-unsupported: they run without the sanitizer, to exercise the
     driver); `--sanitizer none` skips the probe and runs the cases plainly.
  2. runs every case in ONE worker process under `compute-sanitizer --tool memcheck` (the caching allocator off,
     so an out-of-bounds access inside a cached block is seen), the worker printing BEGIN / END markers around
     each case and synchronising before END; the sanitizer's report lines between a case's markers are that
     case's. A worker that dies inside a case (crash, illegal address) marks it "crashed" and a new worker
     carries on with the rest, until --timeout seconds are spent (the rest: "not run"). Each worker (and the
     probe) runs in its own session: at the deadline its whole process group is killed (the sanitizer and its
     Python target), the output is read by a thread so that a pipe held open cannot stall the deadline, and the
     worker ends itself (SIGALRM) 5 s after it, should the orchestrator have been killed first.
  3. writes DIR/sanitizer.log (everything), DIR/sanitizer-probe.log and DIR/sanitizer.json:
     {"status": clean | errors | unsupported | incomplete | plain, "reason", "sanitizer", "seconds",
      "cases": [{"family", "backend", "status": clean | errors | failed | crashed | not run, "mem_errors",
                 "api_errors", "seconds", "note"}]}
     and prints one line per family. Exit 0 unless a case has errors, failed or crashed.
Report lines: "Invalid __global__ read ..." and the like count as memory errors; "Program hit <error> on CUDA API
call" as API errors (recorded, not failures: torch and triton probe optional driver entry points that way).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

MARK = "@@HOTLOOP_SANITIZE"
REPO = Path(__file__).resolve().parent.parent

# family -> GPU backends that op has (hotloop._internal.dispatch.backends(op); token_stats has all four)
FAMILIES = {
    "token_stats_fwd": ("triton", "cuda"),
    "token_stats_bwd": ("triton", "cuda"),
    "linear_token_stats_fwd": ("triton",),
    "linear_token_stats_bwd": ("triton",),
    "group_advantages": ("triton",),
    "policy_tokens": ("triton",),
    "nft_tokens": ("triton",),
    "linear_policy_loss": ("triton",),
    "preference_pairs": ("triton",),
    "kto": ("triton",),
    "linear_preference_loss": ("triton",),
    "dino": ("triton",),
    "byol": ("triton",),
    "ema": ("cuda",),
    "knn": ("cuda",),
}

PROBE = ("import torch; x = torch.arange(7, device='{dev}', dtype=torch.float32); "
         "torch.cuda.synchronize() if x.is_cuda else None; print('PROBE_OK', float((x + 1).sum()))")
_MEM = re.compile(r"^=+ +(Invalid |Misaligned|Out-of-range|Uninitialized|Illegal|Malloc|Free|Leaked|Barrier|"
                  r"Race|Warp |Lane |Hardware|Device-side|Cuda|CUDA_EXCEPTION)")
_API = re.compile(r"^=+ +Program hit ")
_UNSUPPORTED = re.compile(r"(device|gpu|platform|architecture)[^\n]{0,40}not supported|not supported[^\n]{0,40}"
                          r"(device|gpu|platform)|unable to (attach|initialize)|no attachable|unsupported",
                          re.IGNORECASE)


def cases_for(device: str) -> list[tuple[str, str]]:
    if device == "cpu":
        return [(f, "cpu") for f in FAMILIES]
    return [(f, b) for f, backends in FAMILIES.items() for b in backends]


# ------------------------------------------------------------------------------------------------------ the cases
def run_case(family: str, dev: str) -> str:
    """One small call (forward, and backward where the family has one) on `dev`; returns a short note."""
    import torch

    import hotloop

    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, dtype=torch.float32, grad=False):
        t = torch.randn(*shape, generator=g).to(device=dev, dtype=dtype)
        return t.requires_grad_(True) if grad else t

    def randint(high, *shape):
        return torch.randint(0, high, shape, generator=g).to(dev)

    bf16 = torch.bfloat16 if dev != "cpu" else torch.float32
    N, V, H, B, T = 37, 1003, 72, 6, 13  # odd sizes: tails in every tile loop
    mask = (torch.rand(B, T, generator=g) > 0.3).to(dev)
    if family.startswith("token_stats"):
        logits = randn(N, V, dtype=bf16, grad=family.endswith("bwd"))
        labels = randint(V, N)
        labels[3] = -100
        st = hotloop.token_stats(logits, labels, temperature=0.7, self_certainty=True)
        if family.endswith("bwd"):
            (st.logprobs.sum() + st.entropy.sum() + st.self_certainty.sum()).backward()
        return f"[{N}, {V}] {str(bf16)[6:]}"
    if family.startswith("linear_token_stats"):
        bwd = family.endswith("bwd")
        hidden, weight = randn(N, H, dtype=bf16, grad=bwd), (randn(V, H, dtype=bf16) / 8).requires_grad_(bwd)
        labels = randint(V, N)
        labels[5] = -100
        st = hotloop.linear_token_stats(hidden, weight, labels)
        if bwd:
            (st.logprobs.sum() + st.entropy.sum()).backward()
        return f"N={N} H={H} V={V} {str(bf16)[6:]}"
    if family == "group_advantages":
        r = randn(B * 5)
        hotloop.group_advantages(r, group_size=5)
        hotloop.group_advantages(r, group_index=randint(7, B * 5), kind="rloo")
        return f"{B * 5} rewards, fixed and ragged groups"
    if family in ("policy_tokens", "nft_tokens"):
        logp = (-randn(B, T).abs()).requires_grad_(True)
        old = logp.detach() + 0.1 * randn(B, T)
        if family == "policy_tokens":
            loss, _ = hotloop.policy_loss(logp, old, randn(B), mask, ref_logp=old - 0.05, kl_coef=0.04,
                                          clip_high=0.28)
        else:
            loss, _ = hotloop.nft_loss(logp, old, (randn(B) > 0).float(), mask, group_size=3)
        loss.backward()
        return f"[{B}, {T}]"
    if family == "linear_policy_loss":
        hidden = randn(B, T, H, grad=True)
        weight = (randn(V, H) / 8).requires_grad_(True)
        labels = randint(V, B, T)
        loss, _ = hotloop.linear_policy_loss(hidden, weight, labels, None, randn(B), mask)
        loss.backward()
        return f"[{B}, {T}] H={H} V={V}"
    if family == "preference_pairs":
        cw, cl = randn(B, grad=True), randn(B, grad=True)
        loss, _ = hotloop.preference_loss(cw, cl, randn(B), randn(B), kind="sigmoid")
        loss.backward()
        return f"{B} pairs"
    if family == "kto":
        p = randn(B, grad=True)
        loss, _ = hotloop.kto_loss(p, randn(B), randn(B) > 0)
        loss.backward()
        return f"{B} items"
    if family == "linear_preference_loss":
        hidden = randn(2 * 3, T, H, grad=True)
        weight = (randn(V, H) / 8).requires_grad_(True)
        labels = randint(V, 2 * 3, T)
        m = (torch.rand(6, T, generator=g) > 0.3).to(dev)
        loss, _ = hotloop.linear_preference_loss(hidden, weight, labels, m, ref_chosen_logps=randn(3),
                                                 ref_rejected_logps=randn(3))
        loss.backward()
        return f"3 pairs x {T} H={H} V={V}"
    if family == "dino":
        K, crops, b = 1031, 4, 3
        s = randn(crops * b, K, grad=True)
        t = randn(2 * b, K)
        c = randn(K)
        hotloop.dino_loss(s, t, c).backward()
        hotloop.update_center_(c, t)
        return f"{crops} crops x {b}, K={K}"
    if family == "byol":
        p = randn(B * 3, H + 1, grad=True)
        hotloop.byol_loss(p, randn(B * 3, H + 1)).backward()
        return f"[{B * 3}, {H + 1}]"
    if family == "ema":
        shapes = [(37,), (5, 4099), (1001,)]
        target = [randn(*s) for s in shapes]
        online = [randn(*s, dtype=bf16) for s in shapes]
        copies = [torch.empty(s, dtype=bf16, device=dev) for s in shapes]
        hotloop.ema_update_(target, online, 0.99, out_copy=copies)
        return f"{len(shapes)} tensors, fp32 shadow of {str(bf16)[6:]}"
    if family == "knn":
        q, x = randn(29, 40), randn(1037, 40)
        hotloop.knn(q, x, 17)
        hotloop.knn(q, x, 5, metric="ip", valid=torch.rand(1037, generator=g).to(dev) > 0.2)
        return "29 queries x 1037 keys, d=40, k=17 / 5"
    raise ValueError(f"unknown family {family!r}")


def worker(device: str, todo: list[tuple[str, str]], deadline: float | None = None) -> int:
    """Run the cases in this process, between markers the orchestrator reads. `deadline` (epoch seconds): a
    SIGALRM a few seconds after it ends this process, should the orchestrator that kills it be gone."""
    if deadline:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(max(1, int(deadline - time.time()) + 5))
    import torch

    print(f"{MARK} START torch {torch.__version__} device {device}", flush=True)
    for family, backend in todo:
        os.environ["HOTLOOP_BACKEND"] = backend  # read by hotloop on every call
        print(f"{MARK} BEGIN {family} {backend}", flush=True)
        t0 = time.perf_counter()
        status, note = "ok", ""
        try:
            note = run_case(family, device)
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001  (recorded per case; the next case still runs)
            status, note = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        dt = time.perf_counter() - t0
        print(f"{MARK} END {family} {backend} {status} {dt:.2f} {json.dumps(note)}", flush=True)
    print(f"{MARK} DONE", flush=True)
    return 0


# --------------------------------------------------------------------------------------------------- orchestrator
def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL proc's whole process group (it leads its own session: start_new_session=True). Under
    compute-sanitizer, proc is the sanitizer and the Python target its child: proc.kill() alone would leave the
    target running, holding the output pipe open."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _run_capture(cmd: list[str], timeout: float, env: dict) -> tuple[int | None, str]:
    """(exit status, or None when it ran past `timeout`; stdout + stderr), the command's whole group killed at
    the timeout."""
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                env=env, cwd=REPO, start_new_session=True)
    except OSError as exc:
        return -1, f"{type(exc).__name__}: {exc}"
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout))
        return proc.returncode, out
    except subprocess.TimeoutExpired as exc:
        _kill_group(proc)
        try:
            out, _ = proc.communicate(timeout=5)  # everything, what came before the timeout included
        except subprocess.TimeoutExpired:  # a process that left the group still holds the pipe: leave it
            out = exc.output or ""
        return None, out.decode(errors="replace") if isinstance(out, bytes) else out
    finally:
        _kill_group(proc)


def probe(sanitizer: str, timeout: float, env: dict, log: Path, device: str = "cuda") -> tuple[bool, str]:
    """(works, reason) for `sanitizer --tool memcheck` on this machine: one add on `device` under it."""
    exe = shutil.which(sanitizer)
    if exe is None:
        log.write_text(f"{sanitizer}: not on PATH\n")
        return False, f"{sanitizer} not on PATH"
    cmd = [exe, "--tool", "memcheck", sys.executable, "-c", PROBE.format(dev=device)]
    t0 = time.time()
    rc, out = _run_capture(cmd, timeout, env)
    log.write_text(f"$ {' '.join(cmd)}\nrc {rc}, {time.time() - t0:.1f} s\n{out}")
    first = next((ln.strip("= ").strip() for ln in out.splitlines() if _UNSUPPORTED.search(ln)), None)
    if first:
        return False, first[:160]
    if rc is None:
        return False, f"probe timed out after {timeout:.0f} s"
    if rc != 0 or "PROBE_OK" not in out:
        last = next((ln.strip() for ln in reversed(out.splitlines()) if ln.strip()), "no output")
        return False, f"probe exited {rc}: {last[:160]}"
    return True, f"probe ok ({time.time() - t0:.1f} s)"


def orchestrate(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    deadline = t_start + args.timeout
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTORCH_NO_CUDA_MEMORY_CACHING="1",
               HOTLOOP_CHECK_LABELS=os.environ.get("HOTLOOP_CHECK_LABELS", "1"))
    env.pop("HOTLOOP_BACKEND", None)
    todo = cases_for(args.device)
    if args.cases:
        want = args.cases.split(",")
        todo = [c for c in todo if any(w in f"{c[0]}/{c[1]}" for w in want)]
    result = {"status": "", "reason": "", "sanitizer": args.sanitizer, "device": args.device, "cases": []}
    prefix: list[str] = []
    plain = args.sanitizer == "none"
    if plain:
        result["reason"] = "no sanitizer (--sanitizer none): the cases ran plainly"
    else:
        ok, reason = probe(args.sanitizer, min(args.probe_timeout, deadline - time.time()), env,
                           out / "sanitizer-probe.log", args.device)
        result["reason"] = reason
        if ok:
            prefix = [shutil.which(args.sanitizer), "--tool", "memcheck", "--print-limit", "100"]
        elif args.plain_if_unsupported:
            plain = True
            result["reason"] = f"unsupported ({reason}); the cases ran without the sanitizer"
        else:
            result["status"] = "unsupported"
            result["cases"] = [dict(family=f, backend=b, status="not run", mem_errors=0, api_errors=0, seconds=0,
                                    note="sanitizer unsupported") for f, b in todo]
            return _finish(result, out, t_start, log_text=(out / "sanitizer-probe.log").read_text())

    done: dict[tuple[str, str], dict] = {}
    log_parts: list[str] = []
    interrupted = []

    def on_signal(signum, frame):  # the caller's timeout: stop, and still write what there is
        interrupted.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    remaining = list(todo)
    try:
        while remaining and time.time() < deadline - 2:
            _one_worker(args, prefix, env, deadline, remaining, done, log_parts, result)
            remaining = [c for c in remaining if c not in done]
            if result.pop("_worker_broken", False):
                break  # the worker cannot start (import error...): retrying would fail the same way
    except KeyboardInterrupt:
        log_parts.append(f"\ninterrupted by signal {interrupted[:1]}\n")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        for p in result.pop("_procs", []):  # the workers' whole groups (a signal: this run is being stopped)
            _kill_group(p)
    for c in todo:
        if c not in done:
            done[c] = dict(family=c[0], backend=c[1], status="not run", mem_errors=0, api_errors=0, seconds=0,
                           note="time ran out" if interrupted or time.time() >= deadline - 2
                           else "worker did not start")
    result["cases"] = [done[c] for c in todo]
    statuses = {c["status"] for c in result["cases"]}
    if statuses & {"errors", "crashed", "failed"} or result.get("outside_mem_errors"):
        result["status"] = "errors"
    elif "not run" in statuses:
        result["status"] = "incomplete"
    else:
        result["status"] = "plain" if plain else "clean"
    if interrupted:
        result["status"] = "incomplete" if result["status"] != "errors" else "errors"
        result["reason"] += f"; stopped by signal {interrupted[0]}"
    rc = _finish(result, out, t_start, log_text="".join(log_parts))
    return rc or (2 if interrupted else 0)


def _one_worker(args, prefix, env, deadline, remaining, done, log_parts, result) -> None:
    """One worker process over `remaining` (under the sanitizer unless prefix is empty): fills `done` from its
    markers; a case it died in is "crashed" ("not run" when the deadline killed it)."""
    cmd = prefix + [sys.executable, str(Path(__file__).resolve()), "--worker", "--device", args.device,
                    "--deadline", f"{deadline:.0f}", "--cases", ",".join(f"{f}/{b}" for f, b in remaining)]
    log_parts.append(f"$ {' '.join(cmd)}\n")
    current, mem, api = None, 0, 0
    # its own session and process group: at the deadline the whole group is killed, the sanitizer's target too
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            env=env, cwd=REPO, bufsize=1, start_new_session=True)
    result.setdefault("_procs", []).append(proc)
    lines: queue.Queue = queue.Queue()

    def read():  # a reader thread, so that the loop below keeps the deadline even when no line comes
        try:
            for ln in proc.stdout:
                lines.put(ln)
        except (OSError, ValueError):
            pass
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    n_done = len(done)
    killed_at = None
    while True:
        now = time.time()
        if killed_at is None and now >= deadline:
            _kill_group(proc)
            killed_at = now
            log_parts.append(f"\n{MARK} worker killed at the deadline\n")
        if killed_at is not None and now > killed_at + 3:
            break  # killed, yet the pipe is still open (a process outside the group): stop reading it
        try:
            line = lines.get(timeout=max(0.05, min(1.0, (deadline if killed_at is None else killed_at + 3) - now)))
        except queue.Empty:
            continue
        if line is None:
            break
        log_parts.append(line)
        if line.startswith(MARK):
            parts = line.split(maxsplit=6)
            if parts[1] == "BEGIN":
                current, mem, api = (parts[2], parts[3]), 0, 0
            elif parts[1] == "END" and current:
                status = parts[4]
                if status == "ok":
                    status = "errors" if mem else "clean"
                done[current] = dict(family=current[0], backend=current[1], status=status, mem_errors=mem,
                                     api_errors=api, seconds=float(parts[5]),
                                     note=json.loads(parts[6]) if len(parts) > 6 else "")
                current = None
        elif current:
            if _MEM.match(line):
                mem += 1
            elif _API.match(line):
                api += 1
        elif _MEM.match(line):  # between cases: imports, CUDA init, exit
            result["outside_mem_errors"] = result.get("outside_mem_errors", 0) + 1
    try:
        rc = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # its output closed, yet it does not exit
        _kill_group(proc)
        rc = proc.wait()
    timed_out = killed_at is not None or time.time() > deadline
    if current:  # died inside a case
        done[current] = dict(family=current[0], backend=current[1], status="not run" if timed_out else "crashed",
                             mem_errors=mem, api_errors=api, seconds=0,
                             note="timed out" if timed_out else f"worker exited {rc} inside the case")
    elif len(done) == n_done and rc != 0 and not timed_out:
        log_parts.append(f"worker exited {rc} before its first case\n")
        result["_worker_broken"] = True


def _finish(result: dict, out: Path, t_start: float, log_text: str) -> int:
    result["seconds"] = round(time.time() - t_start, 1)
    (out / "sanitizer.log").write_text(log_text)
    (out / "sanitizer.json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(report_lines(result)))
    bad = [c for c in result["cases"] if c["status"] in ("errors", "crashed", "failed")]
    return 1 if bad or result.get("outside_mem_errors") else 0


def report_lines(result: dict) -> list[str]:
    """The summary's lines: the overall status, then one line per family: backend=status (errors)."""
    cases = result.get("cases", [])
    n_clean = sum(c["status"] == "clean" for c in cases)
    lines = [f"sanitizer: {result.get('status')}: {n_clean}/{len(cases)} cases clean; {result.get('reason', '')} "
             f"({result.get('seconds', 0):.0f} s)"]
    if result.get("status") == "unsupported":
        return lines  # every case "not run": sanitizer.json lists them
    fams: dict[str, list[str]] = {}
    clean: dict[str, list[str]] = {}
    for c in cases:
        clean.setdefault(c["family"], []).append(c["backend"] if c["status"] == "clean" else "")
        s = c["status"]
        if c.get("mem_errors"):
            s += f" ({c['mem_errors']} memory errors)"
        if c.get("api_errors"):
            s += f" [{c['api_errors']} api]"
        if c["status"] in ("failed", "crashed") and c.get("note"):
            s += f": {c['note'][:70]}"
        fams.setdefault(c["family"], []).append(f"{c['backend']}={s}")
    ok = [f"{fam} ({', '.join(b)})" for fam, b in clean.items() if all(b)]  # every backend clean: one list
    line = "  clean:"
    for item in ok:
        if len(line) + len(item) > 116:
            lines.append(line.rstrip(","))
            line = "   "
        line += f" {item},"
    if ok:
        lines.append(line.rstrip(","))
    for fam, items in fams.items():
        if not all(clean[fam]):
            lines.append(f"  {fam:<24} " + "  ".join(items))
    if result.get("outside_mem_errors"):
        lines.append(f"  {result['outside_mem_errors']} memory error report(s) outside the cases: see sanitizer.log")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--list", action="store_true", help="print the cases")
    mode.add_argument("--run", action="store_true", help="probe, run the cases under the sanitizer, report")
    mode.add_argument("--worker", action="store_true", help="internal: run the cases in this process")
    mode.add_argument("--report", metavar="JSON", help="print the report lines of a sanitizer.json")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if torch sees one")
    ap.add_argument("--cases", help="comma-separated substrings of family/backend (default: all)")
    ap.add_argument("--out", default="sanitizer_out", help="--run: folder for sanitizer.json / .log")
    ap.add_argument("--timeout", type=float, default=120, help="--run: seconds for everything")
    ap.add_argument("--probe-timeout", type=float, default=60)
    ap.add_argument("--deadline", type=float, help="--worker: epoch seconds after which it ends itself")
    ap.add_argument("--sanitizer", default="compute-sanitizer", help="its command, or none")
    ap.add_argument("--plain-if-unsupported", action="store_true",
                    help="run the cases without the sanitizer when it does not work here")
    args = ap.parse_args(argv)
    if args.report:
        print("\n".join(report_lines(json.loads(Path(args.report).read_text()))))
        return 0
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.list:
        for f, b in cases_for(args.device):
            print(f"{f} {b}")
        return 0
    if args.worker:
        todo = cases_for(args.device)
        if args.cases:
            keys = set(args.cases.split(","))
            todo = [c for c in todo if f"{c[0]}/{c[1]}" in keys]
        return worker(args.device, todo, args.deadline)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
