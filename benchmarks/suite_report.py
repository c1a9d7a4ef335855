"""The bench report: one JSON, one markdown page and a log-log plot of growth with pool size."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from engine.quality import markdown_table

FIGURE_HEADER = ["stage", "metric", "N", "ours", "reference", "ref. value", "ratio", "s",
                 "peak MiB", "note"]  # fmt: skip


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def seconds_for_n(fig: dict) -> float | None:
    """What a figure costs as time for its N rows (rates inverted); None for latencies."""
    if fig["unit"] == "s":
        return fig["value"]
    if fig["unit"] == "rows/s" and fig["value"] > 0:
        return fig["n"] / fig["value"]
    return None  # latencies, and rates of a fixed workload (queries, tokens, questions)


def growth(figures: list[dict]) -> list[dict]:
    """Per stage and metric: the value at each N and the log-log slope of its cost from
    the smallest to the largest N: time for the pool (rows/s inverted, times as they are;
    1.0 linear in the pool, 0 flat), or time per item for the rates of a fixed workload
    (queries/s, tokens/s: 0 when the pool's size does not slow them)."""
    by_key: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for f in figures:
        by_key[(f["stage"], f["metric"])][f["n"]] = f["value"]
    out = []
    for (stage, metric), values in by_key.items():
        sizes = sorted(values)
        row = {"stage": stage, "metric": metric, "values": {str(n): values[n] for n in sizes}}
        lo, hi = sizes[0], sizes[-1]
        if hi > lo and values[lo] > 0 and values[hi] > 0:
            if metric == "rows/s":
                a, b = lo / values[lo], hi / values[hi]
            elif metric.endswith("/s"):
                a, b = 1 / values[lo], 1 / values[hi]
            else:
                a, b = values[lo], values[hi]
            row["exponent"] = round(math.log(b / a) / math.log(hi / lo), 2)
        out.append(row)
    return out


def plot(figures: list[dict], path: Path) -> bool:
    """Seconds for N rows against N, log-log, ours solid and references dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for f in figures:
        ours = seconds_for_n(f)
        if ours is None:
            continue
        ref = dict(f, value=f["reference_value"])
        lines[f["stage"]].append((f["n"], ours, seconds_for_n(ref) or float("nan")))
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, (stage, points) in enumerate(sorted(lines.items())):
        points.sort()
        colour = f"C{i % 10}"
        n = [p[0] for p in points]
        ax.plot(n, [p[1] for p in points], "o-", color=colour, label=stage)
        ax.plot(n, [p[2] for p in points], "x--", color=colour, alpha=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("pool size N (rows)")
    ax.set_ylabel("seconds for N rows")
    ax.set_title("vlselect bench: ours (solid) and each stage's reference (dashed)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(out: Path, doc: dict) -> str:
    """Write ``bench.json``, ``bench.md`` and ``bench_scaling.png`` into ``out``; returns
    the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    figures = doc["figures"]
    doc = {**doc, "growth": growth(figures)}
    has_plot = plot(figures, out / "bench_scaling.png")
    rows = [
        [f["stage"], f["metric"] if f["metric"] == f["unit"] else f"{f['metric']} ({f['unit']})",
         f"{f['n']:,}", _fmt(f["value"]),
         f["reference"], _fmt(f["reference_value"]), _fmt(f["ratio"]), _fmt(f["seconds"]),
         _fmt(f["peak_total_mib"]), f["note"]]
        for f in figures
    ]  # fmt: skip
    sizes = sorted({f["n"] for f in figures})
    grow = [
        [g["stage"], g["metric"], *(_fmt(g["values"].get(str(n))) for n in sizes),
         _fmt(g.get("exponent"))]
        for g in doc["growth"]
    ]  # fmt: skip
    machine = doc["machine"]
    parts = [
        "# vlselect bench",
        f"{doc['date']}, {machine['cpus']} CPUs, {machine['memory_gib']} GiB, "
        f"{machine['platform']}; sizes {', '.join(f'{n:,}' for n in sizes)}; "
        f"{doc['seconds']:.0f} s in all.",
        "ratio: ours over the reference as speed (above 1 ours is faster). "
        "peak MiB: the driver and every Ray process it started, at the job's peak.",
        markdown_table(FIGURE_HEADER, rows),
        "## Growth with pool size",
        "exponent: the log-log slope of the cost from the smallest to the largest N: time "
        "for the pool for rows/s and times (1 is linear in the pool, 0 flat), time per "
        "item for queries/s and latencies (0: the pool's size does not slow them).",
        markdown_table(["stage", "metric", *(f"N={n:,}" for n in sizes), "exponent"], grow),
    ]
    if has_plot:
        parts.append("![growth](bench_scaling.png)")
    parts += ["## Artifacts", "\n".join(f"- {k}: `{v}`" for k, v in doc["artifacts"].items())]
    markdown = "\n\n".join(parts) + "\n"
    (out / "bench.md").write_text(markdown)
    (out / "bench.json").write_text(json.dumps(doc, indent=1) + "\n")
    return markdown
