"""One PNG (and a text table) of a results folder: hotloop against each peer, per case.

    python -m benchmarks.plot_summary benchmarks/results/<device> [--out PNG] [--quick] [--text]

Reads the <bench>.json files that benchmarks/harness.py writes (the _quick ones with --quick; by default the full
ones, or the quick ones where a folder holds only those). Left panel: speed, peer time / hotloop time per case
(the record's `ratio`; > 1, right of the line at 1.0, means hotloop is faster). Right panel: peak extra memory of
the call, hotloop and each peer (MiB, log scale). Hatched bars: the peer's result was outside the bench's
tolerance. hotloop's own variants (hotloop_inplace, hotloop_logprobs, ...) are in the .md tables, not here.
Default PNG: <folder>/summary.png (summary_quick.png with --quick). --text prints the same data as a table
(used by benchmarks/gpu_check.sh's summary.txt). Needs matplotlib for the PNG only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# benches first in this order (the post-training core), then any other alphabetically
ORDER = ("token_stats", "linear_token_stats", "policy_loss", "preference_loss", "train_step", "matmul_floor")
BASELINE = "hotloop"


def _is_hotloop(provider: str) -> bool:
    return provider.startswith("hotloop")


def result_files(folder: Path, quick: bool | None = None) -> list[Path]:
    """The bench JSON files of `folder`: quick=True the *_quick.json, False the others, None: the full ones if
    there are any, else the quick ones."""
    files = sorted(p for p in Path(folder).glob("*.json") if p.is_file())
    full = [p for p in files if not p.stem.endswith("_quick")]
    fast = [p for p in files if p.stem.endswith("_quick")]
    if quick is None:
        return full or fast
    return fast if quick else full


def load(folder: Path, quick: bool | None = None) -> tuple[dict, list[dict]]:
    """-> (env of the newest file, groups). A group is one (bench, case, mode) with hotloop's record and its peers'
    records that have a time: {"bench", "case", "mode", "hotloop": record, "peers": [record + "speedup"],
    "missing": [(provider, note)]}. Groups without a hotloop time or without any timed peer are left out."""
    env: dict = {}
    groups: dict[tuple, dict] = {}
    payloads, dates = [], []
    for path in result_files(folder, quick):
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(payload, dict) or not isinstance(payload.get("records"), list):
            continue
        payloads.append(payload)
        dates.append(str(payload.get("env", {}).get("date_utc", ""))[:10])
        if payload.get("env", {}).get("date_utc", "") >= env.get("date_utc", ""):
            env = dict(payload.get("env", {}))
    dates = sorted(d for d in dates if d)
    if dates:
        env["dates"] = dates[0] if dates[0] == dates[-1] else f"{dates[0]} .. {dates[-1]}"
    for payload in payloads:
        for r in payload["records"]:
            key = (r.get("bench", payload.get("bench", "?")), str(r.get("case")), str(r.get("mode")))
            g = groups.setdefault(key, {"bench": key[0], "case": key[1], "mode": key[2], "hotloop": None,
                                        "peers": [], "missing": []})
            if r.get("provider") == BASELINE:
                g["hotloop"] = r
            elif not _is_hotloop(str(r.get("provider"))):
                (g["peers"] if r.get("ms") else g["missing"]).append(r)
    out = []
    for g in groups.values():
        hot = g["hotloop"]
        if not hot or not hot.get("ms"):
            continue
        for p in g["peers"]:
            ratio = p.get("ratio")
            if ratio is None and hot.get("correct") is None:  # nothing checked (e.g. matmul_floor): ms / ms
                ratio = p["ms"] / hot["ms"]
            p["speedup"] = ratio
        g["peers"] = [p for p in g["peers"] if p.get("speedup")]
        g["missing"] = [(r["provider"], r.get("note") or "no time") for r in g["missing"]]
        if g["peers"]:
            out.append(g)
    rank = {b: i for i, b in enumerate(ORDER)}
    out.sort(key=lambda g: (rank.get(g["bench"], len(ORDER)), g["bench"]))  # stable: file order within a bench
    return env, out


def _mib(x) -> str:
    return "-" if x is None else (f"{x:.0f}" if x >= 10 else f"{x:.1f}")


def _ms(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 0.1 else f"{x:.3g}"


def text_table(env: dict, groups: list[dict], width: int = 132) -> list[str]:
    """Lines: one per (bench, case, mode): hotloop's ms and MiB, then each peer's ratio (x; '!' = its result was
    outside tolerance) and MiB, wrapped at `width`; then the peers that did not run, once per bench and provider."""
    if not groups:
        return ["(no benchmark results with hotloop and a peer)"]
    labels = [f"{g['bench']} {g['case']} [{g['mode']}]" for g in groups]
    pad = min(max(len(t) for t in labels), 64)
    lines = [f"{'bench case [mode]':<{pad}} {'hotloop ms, MiB':>15} | peer: time / hotloop's (> 1: hotloop faster; "
             "! = wrong result), peak extra MiB"]
    for g, label in zip(groups, labels):
        hot = g["hotloop"]
        mib = hot.get("peak_extra_mib")
        line = f"{label:<{pad}} {_ms(hot['ms']):>6}ms {'' if mib is None else _mib(mib) + 'M':>6}"
        for p in g["peers"]:
            mib = p.get("peak_extra_mib")
            item = (f"{p['provider']} {p['speedup']:.2f}x{'!' if p.get('correct') is False else ''}"
                    f"{'' if mib is None else ' ' + _mib(mib) + 'M'}")
            if len(line) + 3 + len(item) > width:
                lines.append(line)
                line = " " * (pad + 16) + " | " + item
            else:
                line += " | " + item
        lines.append(line)
    seen = set()
    for g in groups:
        for provider, note in g["missing"]:
            if (g["bench"], provider) not in seen:
                seen.add((g["bench"], provider))
                lines.append(f"  not timed: {g['bench']} {provider}: {note[:90]}")
    return lines


# peers of one project share a hue (liger*: blues, trl*: greens); torch's own baselines are grays
_FAMILIES = (("liger", "Blues"), ("trl", "Greens"), ("cce", "Purples"), ("eager", "Greys"), ("compile", "Greys"),
             ("flash_attn", "Oranges"), ("faiss", "Oranges"), ("verl", "YlOrBr"))


def provider_colors(providers: list[str]) -> dict[str, tuple]:
    import matplotlib

    colors: dict[str, tuple] = {BASELINE: (0.84, 0.15, 0.16, 1.0)}
    by_family: dict[str, list[str]] = {}
    others = []
    for name in providers:
        fam = next((f for f, _ in _FAMILIES if name.startswith(f)), None)
        (by_family.setdefault(fam, []) if fam else others).append(name)
    for fam, cmap in _FAMILIES:
        names = by_family.get(fam, [])
        shade = {"eager": [0.55], "compile": [0.35]}.get(fam)
        for i, name in enumerate(names):
            level = shade[0] if shade else 0.85 - 0.45 * i / max(1, len(names) - 1) if len(names) > 1 else 0.7
            colors[name] = matplotlib.colormaps[cmap](level)
    tab = matplotlib.colormaps["tab10"].colors  # not red (hotloop) nor gray (torch): brown, pink, cyan, ...
    rest = [tab[i] for i in (5, 6, 9, 8, 4, 1, 0, 2)]
    for i, name in enumerate(others):
        colors[name] = rest[i % len(rest)]
    return colors


def plot(env: dict, groups: list[dict], out: Path, title: str | None = None) -> Path:
    """Draw the two panels into `out` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator

    providers = []
    for g in groups:
        for p in g["peers"]:
            if p["provider"] not in providers:
                providers.append(p["provider"])
    colors = provider_colors(providers)

    # one slot per bar: the peers of a group, then hotloop (memory panel); a gap between groups, a larger one
    # (holding the bench's name) before each bench
    ys, labels, heads, y, prev = [], [], [], 0.0, None
    for g in groups:
        if g["bench"] != prev:
            y += 1.0 if prev is None else 1.6
            heads.append((y - 1.05, g["bench"]))
            prev = g["bench"]
        n = len(g["peers"]) + 1
        ys.append([y + i for i in range(n)])
        labels.append((y + (n - 1) / 2, f"{g['case']}  [{g['mode']}]"))
        y += n + 0.5
    total = y
    n_legend = 2 + len(providers)  # hotloop, the peers, "outside tolerance"
    ncol = min(n_legend, 6)
    top_in, bottom_in = 0.75, 0.55 + 0.2 * -(-n_legend // ncol)  # title lines; x label + legend rows
    fig_h = top_in + bottom_in + 0.15 * max(total, 8)  # 0.15 in (11 pt) per bar slot
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, fig_h), sharey=True,
                                     gridspec_kw={"width_ratios": [1.35, 1], "wspace": 0.04})
    speed = [p["speedup"] for g in groups for p in g["peers"]]
    mems = [r.get("peak_extra_mib") for g in groups for r in g["peers"] + [g["hotloop"]]]
    mems = [m for m in mems if m is not None]
    floor = 0.1  # MiB shown for a measured 0 (log scale)
    for g, slots in zip(groups, ys):
        rows = g["peers"] + [g["hotloop"]]
        for r, yy in zip(rows, slots):
            name = r["provider"]
            wrong = r.get("correct") is False
            style = dict(color=colors[name], height=0.85, edgecolor="black" if wrong else "none",
                         hatch="////" if wrong else None, linewidth=0.6)
            if name != BASELINE:
                ax_t.barh(yy, r["speedup"], **style)
                ax_t.text(r["speedup"] * 1.04, yy, f"{r['speedup']:.2f}x", va="center", fontsize=6.5)
            m = r.get("peak_extra_mib")
            if m is not None:
                ax_m.barh(yy, max(m, floor), **style)
                ax_m.text(max(m, floor) * 1.08, yy, _mib(m), va="center", fontsize=6.5)
            elif name == BASELINE:
                ax_m.text(floor * 1.1, yy, "not measured", va="center", fontsize=6, color="gray")
    for yy, bench in heads:  # bench names in the gap above their rows
        for ax in (ax_t, ax_m):
            ax.axhline(yy - 0.55, color="gray", linewidth=0.5)
        ax_t.text(0.004, yy, bench, transform=ax_t.get_yaxis_transform(), fontsize=8, fontweight="bold",
                  va="center", ha="left")
    lo = min(speed + [1.0])
    hi = max(speed + [1.0])
    ax_t.set_xscale("log")
    ax_t.set_xlim(min(0.5, lo / 1.5), hi * 2.2)
    ax_t.axvline(1.0, color="black", linewidth=1.0)
    ax_t.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax_t.set_xlabel("peer time / hotloop time  (> 1: hotloop is faster)")
    ax_t.set_yticks([p for p, _ in labels], [t for _, t in labels], fontsize=7)
    ax_t.set_ylim(total - 0.2, -0.2)
    ax_t.grid(axis="x", which="major", linewidth=0.3)
    ax_m.set_xscale("log")
    ax_m.set_xlim(floor / 1.5, max(mems + [1.0]) * 4)
    ax_m.set_xlabel("peak extra memory of the call, MiB (log; 0 drawn at 0.1)")
    ax_m.grid(axis="x", which="major", linewidth=0.3)
    ax_m.tick_params(axis="y", length=0)
    for ax in (ax_t, ax_m):  # 0.5 1 2 5 10, not 10^0
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    handles = [Patch(color=colors[BASELINE], label="hotloop")] + [Patch(color=colors[p], label=p)
                                                                   for p in providers]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="////", label="result outside tolerance"))
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7.5, frameon=False,
               bbox_to_anchor=(0.5, 0.02 / fig_h))
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v and k != "hotloop")
    where = env.get("device", "?")
    if where.startswith("cpu"):
        where += f", {env.get('threads', '?')} threads"
    fig.suptitle(title or f"hotloop vs peers on {env.get('device_name', '?')} ({where}), {env.get('dates', '')}",
                 fontsize=10, y=1 - 0.25 / fig_h)
    fig.text(0.5, 1 - 0.5 / fig_h, versions, ha="center", fontsize=7, color="dimgray")
    fig.subplots_adjust(left=0.25, right=0.98, top=1 - top_in / fig_h, bottom=bottom_in / fig_h)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a results folder, benchmarks/results/<device>")
    ap.add_argument("--out", help="PNG path (default <folder>/summary.png, summary_quick.png with --quick)")
    ap.add_argument("--quick", action="store_true", help="the *_quick.json files")
    ap.add_argument("--text", action="store_true", help="print the table instead of drawing")
    args = ap.parse_args(argv)
    folder = Path(args.folder)
    env, groups = load(folder, True if args.quick else None)
    if args.text:
        print("\n".join(text_table(env, groups)))
        return 0
    if not groups:
        print(f"plot_summary: no results with hotloop and a peer in {folder}", file=sys.stderr)
        return 1
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot_summary: matplotlib is not installed; no PNG (pip install matplotlib)", file=sys.stderr)
        return 1
    quick = args.quick or all(p.stem.endswith("_quick") for p in result_files(folder))
    out = plot(env, groups, Path(args.out) if args.out else folder / f"summary{'_quick' if quick else ''}.png")
    print(f"plot_summary: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
