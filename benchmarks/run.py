"""Run every benchmarks/bench_*.py module, write each one's results plus a combined summary, print the table.

    python -m benchmarks.run [--quick] [--out-dir DIR] [--only token_stats] [any bench option, e.g. --cases bf16]
Results: <out-dir or benchmarks/results>/<device>/<bench>.json|.md and summary[_quick].md.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
from pathlib import Path

import benchmarks
from benchmarks import harness


def discover() -> list[str]:
    """Bench module names (token_stats for bench_token_stats.py), sorted so runs are reproducible."""
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(benchmarks.__path__)
                  if m.name.startswith("bench_"))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out-dir")
    ap.add_argument("--only", help="comma-separated bench names (default: all of %s)" % ",".join(discover()))
    args, _ = ap.parse_known_args(argv)  # the rest is for the bench modules

    names = args.only.split(",") if args.only else discover()
    start = time.perf_counter()
    records = []
    for name in names:
        mod = importlib.import_module(f"benchmarks.bench_{name}")
        records += mod.main(argv)
    elapsed = time.perf_counter() - start

    env = harness.env_info()
    folder = Path(args.out_dir or harness.DEFAULT_OUT) / env["device"]
    folder.mkdir(parents=True, exist_ok=True)
    table = harness.markdown_table(records)
    summary = (f"# hotloop benchmarks{' (quick)' if args.quick else ''}\n\n{harness.header_lines(env)}\n\n"
               f"suite wall time {elapsed:.0f} s; peer/hotloop > 1 means hotloop is faster\n\n{table}\n")
    (folder / f"summary{'_quick' if args.quick else ''}.md").write_text(summary)
    print(summary)
    bad = [r for r in records if r.provider.startswith("hotloop") and r.correct is False]
    return 1 if bad else 0  # a wrong hotloop result fails the run (CI); a slow one does not


if __name__ == "__main__":
    sys.exit(main())
