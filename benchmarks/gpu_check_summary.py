"""summary.txt of a benchmarks/gpu_check.sh run: one screen from the files the steps left in its work folder.

    python -m benchmarks.gpu_check_summary WORK [--out WORK/summary.txt] [--title TEXT]

WORK holds steps.tsv (name, status, seconds, bound, note per step), logs/ (ceilings.txt, build.log, tests-*.log),
junit/*.xml, sanitizer/sanitizer.json and results/<device>/*.json. Any of them may be missing (a failed or
skipped step): the summary says so instead. No torch import: it runs even where the build broke.
Its second line is the verdict gpu_check.sh exits with: "result: ok", "result: incomplete: ..." (only benchmarks
were cut by the time budget; they are named; exit 0 too) or "result: FAILED: <steps>" (exit 1).
"""
from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import plot_summary, sanitizer_cases  # noqa: E402


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def steps(work: Path) -> list[list[str]]:
    rows = []
    for line in _read(work / "steps.tsv").splitlines():
        parts = line.split("\t")
        if len(parts) >= 4:
            rows.append((parts + [""])[:5])
    return rows


def ceilings(work: Path) -> str:
    text = _read(work / "logs" / "ceilings.txt")
    vals = dict(ln.split(None, 1) for ln in text.splitlines() if ln.split(None, 1)[:1]
                and ln.split()[0] in ("copy_bandwidth_GBps", "bf16_matmul_TFLOPs", "device", "where"))
    if not vals:
        return "ceilings: not measured"
    return (f"ceilings: copy {vals.get('copy_bandwidth_GBps', '?').strip()} GB/s, bf16 matmul "
            f"{vals.get('bf16_matmul_TFLOPs', '?').strip()} TFLOP/s ({vals.get('where', '?').strip()}); "
            f"{vals.get('device', '').strip()}")


def tests(work: Path) -> list[str]:
    """Totals over the junit files, the failed tests (at most 8), and shards that left no junit."""
    tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, secs, lines = [], 0.0, []
    xmls = sorted((work / "junit").glob("*.xml"))
    for x in xmls:
        try:
            root = ET.parse(x).getroot()
        except (ET.ParseError, OSError) as exc:
            lines.append(f"  {x.name}: unreadable ({exc})")
            continue
        for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
            for k in tot:
                tot[k] += int(suite.get(k, 0) or 0)
            secs = max(secs, float(suite.get("time", 0) or 0))
            for case in suite.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed.append(f"{case.get('classname', '')}::{case.get('name', '')}".split(".")[-1])
    logs = sorted((work / "logs").glob("tests-*.log"))
    for log in logs:
        if not (work / "junit" / (log.stem + ".xml")).exists():
            last = next((ln for ln in reversed(_read(log).splitlines()) if ln.strip()), "empty log")
            lines.append(f"  {log.stem}: no junit ({last.strip()[:100]})")
    if not xmls and not logs:
        return ["tests: not run"]
    passed = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    head = (f"tests: {passed} passed, {tot['failures']} failed, {tot['errors']} errors, {tot['skipped']} skipped "
            f"({len(xmls)} junit file(s), longest shard {secs:.0f} s)")
    out = [head] + lines + [f"  FAILED {name}" for name in failed[:8]]
    if len(failed) > 8:
        out.append(f"  ... and {len(failed) - 8} more (junit/*.xml)")
    return out


def build(work: Path) -> str:
    log = _read(work / "logs" / "build.log")
    for line in reversed(log.splitlines()):
        if line.startswith("cuda kernels built:") or line.startswith("hotloop._C:"):
            return "build: " + line.strip()
    last = next((ln.strip() for ln in reversed(log.splitlines()) if ln.strip()), "no logs/build.log")
    return f"build: no result line in logs/build.log; its last line: {last[:100]}"


def sanitizer(work: Path) -> list[str]:
    path = work / "sanitizer" / "sanitizer.json"
    if not path.exists():
        return ["sanitizer: no sanitizer.json (step skipped or killed; see logs/sanitizer-step.log)"]
    import json

    try:
        return sanitizer_cases.report_lines(json.loads(path.read_text()))
    except (ValueError, KeyError) as exc:
        return [f"sanitizer: unreadable sanitizer.json ({exc})"]


def benchmarks(work: Path) -> list[str]:
    folders = sorted(p for p in (work / "results").glob("*") if p.is_dir())
    if not folders:
        return ["benchmarks: no results"]
    out = []
    for folder in folders:
        env, groups = plot_summary.load(folder)
        out.append(f"benchmarks: results/{folder.name}/ ({', '.join(sorted(p.stem for p in folder.glob('*.json')))})")
        out += plot_summary.text_table(env, groups)
    return out


OK = ("ok", "skipped", "unsupported", "dry-run")


def verdict(rows) -> tuple[str, list[str], list[str]]:
    """("ok" | "incomplete" | "FAILED", failed step names, cut bench names). A benchmark the time budget cut
    ("incomplete": not run for lack of time, or stopped at its bound) leaves the run incomplete, not failed;
    any other step not ok (a failed, timed-out or not run build, test shard or sanitizer...) fails it."""
    cut = [r[0] for r in rows if r[1] == "incomplete" and r[0].startswith("bench-")]
    failed = [r[0] for r in rows if r[1] not in OK and r[0] not in cut]
    return ("FAILED" if failed else "incomplete" if cut else "ok"), failed, cut


def result_line(rows) -> str:
    status, failed, cut = verdict(rows)
    names = ", ".join(n[len("bench-"):] for n in cut)
    if status == "FAILED":
        return f"result: FAILED: {', '.join(failed)}" + (f" (and benchmarks cut by the budget: {names})" if cut else "")
    if status == "incomplete":
        return (f"result: incomplete: every step ok but {len(cut)} benchmark(s) cut by the time budget, "
                f"without (full) results: {names}")
    return "result: ok"


def summary(work: Path, title: str = "") -> str:
    rows = steps(work)
    lines = [title or "hotloop gpu_check", result_line(rows)]
    lines.append("steps (status, seconds / bound):")
    pad = max([len(r[0]) for r in rows] + [10])
    for name, status, secs, bound, note in rows:
        lines.append(f"  {name:<{pad}} {status:<11} {secs:>4} / {bound:<4} s  {note}".rstrip())
    lines += [ceilings(work), build(work)]
    lines += tests(work)
    lines += sanitizer(work)
    lines += benchmarks(work)
    for name, status, _, _, note in rows:
        if name.startswith("bench-") and status == "incomplete":
            lines.append(f"  not complete: {name[len('bench-'):]}: {note}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work")
    ap.add_argument("--out")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    work = Path(args.work)
    text = summary(work, args.title)
    Path(args.out or work / "summary.txt").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
