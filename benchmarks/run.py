"""Run every benchmarks/bench_*.py module, write each one's results plus a combined summary, print the table.

    python -m benchmarks.run [--quick] [--out-dir DIR] [--only token_stats] [any bench option, e.g. --cases bf16]
    python -m benchmarks.run --summarize benchmarks/results/<device> [--quick]
Results: <out-dir or benchmarks/results>/<device>/<bench>.json|.md, summary[_quick].md, and (when matplotlib is
installed; --no-plot skips it) summary[_quick].png: hotloop against each peer, speed and memory, drawn by
benchmarks/plot_summary.py from every <bench>[_quick].json in that folder. --summarize rewrites summary[_quick].md
and the PNG from the JSON files already in a folder (after runs of single benches, as benchmarks/gpu_check.sh does).
"""
from __future__ import annotations

import argparse
import dataclasses
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
    ap.add_argument("--no-plot", action="store_true", help="no summary PNG")
    ap.add_argument("--summarize", metavar="FOLDER", help="only rewrite FOLDER's summary .md / .png from its JSON")
    args, _ = ap.parse_known_args(argv)  # the rest is for the bench modules
    if args.summarize:
        return summarize(Path(args.summarize), args.quick, draw=not args.no_plot)

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
    return write_summary(folder, args.quick, env, f"suite wall time {elapsed:.0f} s", records,
                         draw=not args.no_plot)


def write_summary(folder: Path, quick: bool, env: dict, what: str, records: list, draw: bool) -> int:
    """summary[_quick].md (and the PNG) of `folder`, printed too. -> 1 when a hotloop result is wrong: that fails
    the run (CI); a slow one does not."""
    summary = (f"# hotloop benchmarks{' (quick)' if quick else ''}\n\n{harness.header_lines(env)}\n\n"
               f"{what}; peer/hotloop > 1 means hotloop is faster\n\n{harness.markdown_table(records)}\n")
    (folder / f"summary{'_quick' if quick else ''}.md").write_text(summary)
    print(summary)
    if draw:
        plot(folder, quick)
    bad = [r for r in records if r.provider.startswith("hotloop") and r.correct is False]
    return 1 if bad else 0


def plot(folder: Path, quick: bool) -> None:
    """summary[_quick].png of `folder` (benchmarks/plot_summary.py), or a message saying why not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("(matplotlib not installed: no summary PNG; pip install matplotlib)", file=sys.stderr)
        return
    from benchmarks import plot_summary

    try:
        plot_summary.main([str(folder)] + (["--quick"] if quick else []))
    except Exception as exc:  # noqa: BLE001  (a plotting problem never fails a benchmark run)
        print(f"(summary PNG failed: {harness.error_note(exc)})", file=sys.stderr)


def summarize(folder: Path, quick: bool, draw: bool = True) -> int:
    """Rewrite summary[_quick].md (every record of the folder's <bench>[_quick].json files, in bench order) and
    the PNG, as write_summary."""
    import json

    from benchmarks.plot_summary import result_files

    files = result_files(folder, quick)
    records, envs = [], []
    for path in files:
        payload = json.loads(path.read_text())
        envs.append(payload.get("env", {}))
        fields = {f.name for f in dataclasses.fields(harness.Record)}
        records += [harness.Record(**{k: v for k, v in r.items() if k in fields}) for r in payload.get("records", [])]
    if not records:
        print(f"no {'quick ' if quick else ''}results in {folder}", file=sys.stderr)
        return 1
    env = max(envs, key=lambda e: e.get("date_utc", ""))
    return write_summary(folder, quick, env, f"benches: {', '.join(p.stem for p in files)}", records, draw)


if __name__ == "__main__":
    sys.exit(main())
