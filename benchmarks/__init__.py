"""hotloop benchmark suite: `python -m benchmarks.run [--quick]` from the repo root (see run.py)."""
