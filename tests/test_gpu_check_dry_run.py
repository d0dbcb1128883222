"""benchmarks/gpu_check.sh --dry-run: every step with its CPU stand-in, then the same packing the GPU run does.

What comes back from the device tool is limited (at most 8 files, at most 2 folders deep, names of letters /
digits / . _ -, each under 16 MiB): the packed $OUT must fit, hold summary.txt, and its archive the logs, junit,
sanitizer report and results a session commits. One dry run (~40 s on 2 cores) serves every check here. On a loaded
machine a step may run out of its time bound (timeout / no-time / incomplete): that is tolerated here, only for
that step's own outputs; any other failure, and every packing check, is not.
"""
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
FINE = {"ok", "dry-run", "skipped", "unsupported"}
CUT = {"timeout", "no-time", "incomplete"}  # stopped at its time bound, or no time left in the budget


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("hotloop._C")
    out = tmp_path_factory.mktemp("gpu_out")
    env = {k: v for k, v in os.environ.items()
           if k not in ("HOTLOOP_BACKEND", "HOTLOOP_CPU_ISA") and not k.startswith("HOTLOOP_GPU_")}
    env.update(OUT=str(out), PYTHON=sys.executable, TMPDIR=str(tmp_path_factory.mktemp("stage")))
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=400)  # the dry run's budget (300 s) bounds it
    return proc, out


def steps_of(out: Path) -> dict[str, tuple[str, str]]:
    """steps.tsv of the packed archive: name -> (status, note)."""
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        text = tar.extractfile("gpu_check/steps.tsv").read().decode()
    return {p[0]: (p[1], p[4] if len(p) > 4 else "") for p in (ln.split("\t") for ln in text.splitlines())}


def test_bash_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_succeeds_and_prints_the_summary_last(dry_run):
    proc, out = dry_run
    log = proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("hotloop gpu_check (DRY RUN")
    for line in ("ceilings:", "build:", "tests:", "sanitizer:", "benchmarks:"):
        assert line in summary, line
    assert summary.splitlines()[0] in proc.stdout
    assert "out check: ok" in proc.stdout.splitlines()[-2], log  # the summary, then the check, come last
    steps = steps_of(out)
    bad = {k: v for k, v in steps.items() if v[0] not in FINE | CUT}
    assert not bad, (bad, log)  # no step failed but by a time bound
    cut = {k for k, v in steps.items() if v[0] in CUT}
    if not cut:
        assert proc.returncode == 0 and "result: ok" in summary, log
    elif cut <= {k for k in steps if k.startswith("bench-")}:  # only benchmarks cut: incomplete, not failed
        assert proc.returncode == 0 and "result: incomplete:" in summary, log
        assert all(k[len("bench-"):] in summary.splitlines()[1] for k in cut), summary
    else:
        assert proc.returncode == 1 and "result: FAILED:" in summary, log
    if all(v[0] == "ok" for k, v in steps.items() if k.startswith("tests-")):
        assert re.search(r"tests: [1-9]\d* passed, 0 failed", summary), summary
    if steps["sanitizer"][0] == "ok":
        assert "token_stats_fwd" in summary and "knn" in summary  # the sanitizer driver's families
    if steps["bench-policy_loss"][0] == "ok":
        assert "| trl_materialised" in summary  # a peer ratio from the benchmark stand-in


def test_out_fits_what_the_device_tool_returns(dry_run):
    _, out = dry_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 2 <= len(files) <= 8, files
    for p in out.rglob("*"):
        rel = p.relative_to(out)
        assert len(rel.parts) <= 3, rel  # at most 2 folders deep
        assert re.fullmatch(r"[A-Za-z0-9._-]+", p.name), p.name
        assert p.is_dir() or (p.is_file() and not p.is_symlink()), p
        if p.is_file():
            assert p.stat().st_size < 16 * 2**20, p
    assert {"gpu_check.tar.gz", "summary.txt"} <= {p.name for p in files}
    if not steps_of(out)["bench-group_advantages"][0] == "ok":
        return  # no results to draw
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    png = out / "summary.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_archive_holds_logs_results_and_reports(dry_run):
    _, out = dry_run
    steps = steps_of(out)
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = set(tar.getnames())
        san = (json.loads(tar.extractfile("gpu_check/sanitizer/sanitizer.json").read())
               if steps["sanitizer"][0] == "ok" else None)
    for name in ("steps.tsv", "summary.txt", "logs/ceilings.txt", "logs/build.log", "logs/nvidia-smi.txt",
                 "logs/tests-0.log", "logs/sanitizer-step.log", "logs/bench-group_advantages.log",
                 "logs/bench-policy_loss.log"):
        assert f"gpu_check/{name}" in names, name
    for step in ("syntax", "wheels", "nvidia-smi", "ceilings", "build", "tests-0", "sanitizer",
                 "bench-group_advantages", "bench-policy_loss", "pack"):
        assert step in steps, steps
    if steps["tests-0"][0] == "ok":
        assert "gpu_check/junit/tests-0.xml" in names
    ran = [b for b in ("group_advantages", "policy_loss") if steps[f"bench-{b}"][0] == "ok"]
    results = {m.group(1) for n in names
               if (m := re.fullmatch(r"gpu_check/results/[^/]+/(group_advantages|policy_loss)_quick.json", n))}
    assert results == set(ran), sorted(names)
    if ran:
        assert any(n.endswith("/summary_quick.md") for n in names)
    if san is not None:
        assert "gpu_check/sanitizer/sanitizer.log" in names
        assert san["status"] == "plain" and len(san["cases"]) == 15
        assert all(c["status"] == "clean" for c in san["cases"]), san


def _summary_of(tmp_path, rows):
    from benchmarks import gpu_check_summary

    (tmp_path / "steps.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
    return gpu_check_summary.summary(tmp_path, "t").splitlines()


def test_benchmarks_cut_by_the_budget_leave_the_run_incomplete_not_failed(tmp_path):
    base = [("build", "ok", "90", "180", ""), ("tests-0", "ok", "80", "150", ""), ("sanitizer", "ok", "70", "150", ""),
            ("bench-linear_token_stats", "ok", "50", "60", "")]
    assert _summary_of(tmp_path, base)[1] == "result: ok"
    cut = base + [("bench-token_stats", "incomplete", "40", "40", "stopped at 40 s, the budget's rest"),
                  ("bench-policy_loss", "incomplete", "0", "60", "not run: no time left in the budget")]
    lines = _summary_of(tmp_path, cut)
    assert lines[1].startswith("result: incomplete:") and "token_stats, policy_loss" in lines[1], lines
    assert "  not complete: policy_loss: not run: no time left in the budget" in lines
    # a test, sanitizer or build cut by its bound, or a benchmark that failed, still fails the run
    for name, status in (("tests-0", "timeout"), ("sanitizer", "no-time"), ("build", "timeout"),
                         ("bench-linear_token_stats", "failed"), ("tests", "failed")):
        rows = [r for r in cut if r[0] != name] + [(name, status, "1", "1", "")]
        assert _summary_of(tmp_path, rows)[1].startswith(f"result: FAILED: {name}"), (name, status)


def test_sanitizer_worker_group_killed_at_the_deadline():
    """A "sanitizer" whose child holds the output pipe open: the read returns at the deadline, the child is gone."""
    from benchmarks import sanitizer_cases

    fake = [sys.executable, "-c", "import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
            "print('CHILD', p.pid, flush=True); time.sleep(60)"]  # the worker command follows: ignored
    done, log, result = {}, [], {}
    t0 = time.time()
    sanitizer_cases._one_worker(types.SimpleNamespace(device="cpu"), fake, dict(os.environ), t0 + 2,
                                [("ema", "cpu")], done, log, result)
    assert time.time() - t0 < 8
    pid = int(next(ln for ln in log if ln.startswith("CHILD")).split()[1])
    for _ in range(20):
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                break  # killed, not reaped yet (a container's init may never reap it)
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the sanitizer's child {pid} outlived the deadline")
    assert not result.get("_worker_broken")


def test_plot_summary_of_the_committed_results(tmp_path):
    """benchmarks/plot_summary.py over a committed results folder: the table's ratios are the JSON's, the PNG draws."""
    from benchmarks import plot_summary

    folder = REPO / "benchmarks" / "results" / "cpu-2threads-intel-xeon"
    env, groups = plot_summary.load(folder)
    assert env["device"] == "cpu-2threads-intel-xeon"
    records = json.loads((folder / "policy_loss.json").read_text())["records"]
    want = next(r for r in records if r["provider"] == "liger")
    got = next(p for g in groups if g["bench"] == "policy_loss" and g["case"] == want["case"] for p in g["peers"]
               if p["provider"] == "liger")
    assert got["speedup"] == want["ratio"]
    text = "\n".join(plot_summary.text_table(env, groups))
    assert f"liger {want['ratio']:.2f}x" in text and "trl_materialised" in text and "!" in text  # TRL bf16: wrong
    pytest.importorskip("matplotlib")
    png = plot_summary.plot(env, groups, tmp_path / "summary.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
