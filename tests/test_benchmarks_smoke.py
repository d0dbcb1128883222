"""Smoke test of the benchmark suite: `python -m benchmarks.run --quick` runs end to end and hotloop is correct."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_benchmarks_quick(tmp_path):
    pytest.importorskip("hotloop")
    # a child process, as CI and users run it: `-m` from the repo root, results into a temp dir
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "| provider |" in proc.stdout  # the combined table is printed

    files = list(tmp_path.glob("*/token_stats_quick.json"))
    assert len(files) == 1, list(tmp_path.rglob("*"))
    payload = json.loads(files[0].read_text())
    assert payload["env"]["threads"] >= 1 and payload["env"]["versions"]["torch"]
    records = payload["records"]
    assert records
    hot = [r for r in records if r["provider"].startswith("hotloop")]
    assert {r["mode"] for r in hot} == {"fwd", "fwd+ent", "fwdbwd", "fwdbwd+ent"}
    for r in hot:
        assert r["correct"] is True, r
        assert r["ms"] and r["ms"] > 0, r
        assert r["peak_extra_mib"] is not None, r  # the memory probe ran


def test_matmul_floor_quick(tmp_path):
    """benchmarks.matmul_floor (not part of run.py) runs end to end and times all three calls."""
    pytest.importorskip("hotloop")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.matmul_floor", "--quick", "--out-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = json.loads(next(tmp_path.glob("*/matmul_floor_quick.json")).read_text())["records"]
    assert {r["provider"] for r in records} == {"three_matmuls", "trl_materialised", "hotloop"}
    assert all(r["ms"] > 0 for r in records)
