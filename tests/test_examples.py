"""The examples run end to end in their --fast mode (a few small steps), writing their plot (or printing the curve
without matplotlib) into a temporary folder."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = [("grpo_digit_addition.py",), ("dpo_synthetic.py",), ("grpo_memory_novelty.py",),
            ("byol_synthetic.py", "--method", "byol"), ("byol_synthetic.py", "--method", "directpred")]


@pytest.mark.parametrize("cmd", EXAMPLES, ids=lambda c: "_".join(a.strip("-").removesuffix(".py") for a in c))
def test_example_runs_fast(cmd, tmp_path):
    name, *extra = cmd
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "python"),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), "--fast", "--out", str(tmp_path),
                           *extra],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "steps in" in proc.stdout
    assert any(p.suffix == ".png" for p in tmp_path.iterdir()) or "matplotlib not installed" in proc.stdout
