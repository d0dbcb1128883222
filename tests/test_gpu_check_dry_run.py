"""benchmarks/gpu_check.sh --dry-run: every step with its CPU stand-in, then the same packing the GPU run does.

What comes back from the device tool is limited (at most 8 files, at most 2 folders deep, names of letters /
digits / . _ -, each under 16 MiB): the packed $OUT must fit, hold summary.txt, and its archive the logs, junit,
sanitizer report and results a session commits. One dry run (~1 minute on 2 cores) serves every check here.
"""
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("hotloop._C")
    out = tmp_path_factory.mktemp("gpu_out")
    env = {k: v for k, v in os.environ.items() if k not in ("HOTLOOP_BACKEND", "HOTLOOP_CPU_ISA")}
    env.update(OUT=str(out), PYTHON=sys.executable, TMPDIR=str(tmp_path_factory.mktemp("stage")))
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=400)
    return proc, out


def test_bash_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_succeeds_and_prints_the_summary_last(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("hotloop gpu_check (DRY RUN")
    assert "result: ok" in summary
    for line in ("ceilings:", "build:", "tests:", "sanitizer:", "benchmarks:"):
        assert line in summary, line
    assert re.search(r"tests: [1-9]\d* passed, 0 failed", summary), summary
    assert "token_stats_fwd" in summary and "knn" in summary  # the sanitizer driver's families
    assert "| trl_materialised" in summary  # a peer ratio from the benchmark stand-in
    assert summary.splitlines()[0] in proc.stdout
    assert "out check: ok" in proc.stdout.splitlines()[-2]  # the summary, then the check, come last


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
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    png = out / "summary.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_archive_holds_logs_results_and_reports(dry_run):
    _, out = dry_run
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = set(tar.getnames())
        steps = tar.extractfile("gpu_check/steps.tsv").read().decode()
        san = json.loads(tar.extractfile("gpu_check/sanitizer/sanitizer.json").read())
    for name in ("steps.tsv", "summary.txt", "logs/ceilings.txt", "logs/build.log", "logs/nvidia-smi.txt",
                 "logs/tests-0.log", "logs/sanitizer-step.log", "logs/bench-group_advantages.log",
                 "logs/bench-policy_loss.log", "junit/tests-0.xml", "sanitizer/sanitizer.log"):
        assert f"gpu_check/{name}" in names, name
    results = [n for n in names if re.fullmatch(r"gpu_check/results/[^/]+/(group_advantages|policy_loss)_quick.json",
                                                 n)]
    assert len(results) == 2, sorted(names)
    assert any(n.endswith("/summary_quick.md") for n in names)
    step_names = [line.split("\t")[0] for line in steps.splitlines()]
    for step in ("syntax", "wheels", "nvidia-smi", "ceilings", "build", "tests-0", "sanitizer",
                 "bench-group_advantages", "bench-policy_loss", "pack"):
        assert step in step_names, steps
    assert san["status"] == "plain" and len(san["cases"]) == 15
    assert all(c["status"] == "clean" for c in san["cases"]), san


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
