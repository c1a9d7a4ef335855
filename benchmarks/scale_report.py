"""The report of a ``benchmarks/scale.py`` run: growth from the smallest to the largest
pool, the issue's targets each met or missed, and the JSON, markdown and plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.common import machine
from engine.quality import markdown_table


def growth(rows: list[dict]) -> list[dict]:
    """Per stage, the smallest and largest N: the log-log slope of seconds (1 linear in
    the pool, 0 flat) and the driver peak's ratio."""
    out = []
    for stage in dict.fromkeys(r["stage"] for r in rows):
        mine = sorted((r for r in rows if r["stage"] == stage), key=lambda r: r["n"])
        if len(mine) < 2 or mine[0]["n"] == mine[-1]["n"]:
            continue
        lo, hi = mine[0], mine[-1]
        slope = math.log(hi["seconds"] / lo["seconds"]) / math.log(hi["n"] / lo["n"])
        out.append({"stage": stage, "from": lo["n"], "to": hi["n"], "exponent": round(slope, 2),
                    "driver_ratio": round(hi["driver_peak_mib"] / lo["driver_peak_mib"], 2)})  # fmt: skip
    return out


def targets(rows: list[dict], grown: list[dict]) -> list[dict]:
    """The issue's targets that this benchmark measures, each met or missed."""
    out = []
    for g in grown:
        out.append({"name": f"driver peak at {g['to']:,} / at {g['from']:,}: {g['stage']}",
                    "value": g["driver_ratio"], "target": "<= 1.5",
                    "met": g["driver_ratio"] <= 1.5})  # fmt: skip
    for r in rows:
        if r["stage"] in ("embed:dino", "embed:text") and "ratio_to_bare" in r:
            out.append({"name": f"{r['stage']} rows/s / bare loop, N={r['n']:,}",
                        "value": r["ratio_to_bare"], "target": ">= 0.9",
                        "met": r["ratio_to_bare"] >= 0.9})  # fmt: skip
        if r["stage"] == "cluster:1000" and "ratio_to_bare" in r:
            out.append({"name": f"k-means seconds / faiss.Kmeans, N={r['n']:,}, K=1000",
                        "value": r["ratio_to_bare"], "target": "<= 1.15",
                        "met": r["ratio_to_bare"] <= 1.15})  # fmt: skip
        if r["stage"] == "progress":
            out.append({"name": f"coordinator round with reveal and checkpoint, N={r['n']:,}, "
                        "K=5000 (slowest)", "value": r["round_max_ms"], "target": "<= 1000 ms",
                        "met": r["round_max_ms"] <= 1000})  # fmt: skip
            if "select_max_ms" in r:
                out.append({"name": f"coordinator selection maths alone, N={r['n']:,}, K=5000 "
                            "(slowest round)", "value": r["select_max_ms"], "target": "<= 100 ms",
                            "met": r["select_max_ms"] <= 100})  # fmt: skip
        if r["stage"] == "target":
            out.append({"name": f"targeted selection completes, N={r['n']:,}, driver peak",
                        "value": r["driver_peak_mib"], "target": "<= 2048 MiB",
                        "met": r["driver_peak_mib"] <= 2048})  # fmt: skip
    return out


def retrieval_targets(path: Path) -> list[dict]:
    """The retrieval targets from ``benchmarks/retrieval.py``'s JSON at 1M rows (its own
    run: the service beside one in-process index at the same threads and batch)."""
    if not path.is_file():
        return []
    doc = json.loads(path.read_text())
    rows, n = doc["rows"], doc["data"]["rows"]
    out = []
    for r in rows:
        if r["how"] != "service":
            continue
        where = f"{r['factory']}, {r['shards']} shard(s), batch {r['batch']}, N={n:,}"
        out.append({"name": f"retrieval queries/s / one in-process index, {where}",
                    "value": r["ratio_to_in_process"], "target": ">= 0.8",
                    "met": r["ratio_to_in_process"] >= 0.8})  # fmt: skip
        single = [x for x in rows if x["factory"] == r["factory"] and x["how"] != "service"]
        if r["factory"].startswith("IVF") and single:
            gap = round(single[0]["recall@10"] - r["recall@10"], 4)
            out.append({"name": f"sharded IVF recall@10 below the single index's, {where}",
                        "value": gap, "target": "<= 0.01", "met": gap <= 0.01})  # fmt: skip
    return out


HEADER = ["stage", "n", "seconds", "rows_per_s", "driver_peak_mib", "all_peak_mib", "note"]


def write(out: Path, rows: list[dict], args) -> None:
    """The JSON, the markdown beside it and the plot, from every row kept so far;
    ``seconds`` is the stages' own seconds summed (with --keep, rows of earlier runs too)."""
    grown = growth(rows)
    seconds = sum(r["seconds"] for r in rows)
    doc = {"benchmark": "scale", "machine": machine(), "sizes": sorted({r["n"] for r in rows}),
           "seconds": round(seconds, 1), "note": args.note, "rows": rows, "growth": grown,
           "targets": targets(rows, grown) + retrieval_targets(Path(args.retrieval))}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# vlselect scale", "", f"{doc['machine']['cpus']} CPUs, "
             f"{doc['machine']['memory_gib']} GiB; sizes {', '.join(f'{n:,}' for n in doc['sizes'])}"
             f"; {seconds:.0f} s of stages in all.", "", *([f"Provenance: {args.note}", ""] if args.note else []),
             markdown_table(HEADER, [[r.get(h, "") for h in HEADER] for r in rows]), ""]  # fmt: skip
    if grown:
        lines += ["## Growth", "", markdown_table(["stage", "from", "to", "exponent",
                  "driver_ratio"], [[g[h] for h in ("stage", "from", "to", "exponent",
                  "driver_ratio")] for g in grown]), ""]  # fmt: skip
    lines += ["## Targets", "", markdown_table(["name", "value", "target", "met"],
              [[t["name"], t["value"], t["target"], "yes" if t["met"] else "no"]
               for t in doc["targets"]]), ""]  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines))
    plot(out.with_suffix(".png"), rows)
    print("\n".join(lines), flush=True)


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for stage in dict.fromkeys(r["stage"] for r in rows):
        mine = sorted((r for r in rows if r["stage"] == stage), key=lambda r: r["n"])
        a.plot([r["n"] for r in mine], [r["seconds"] for r in mine], "o-", label=stage)
        b.plot([r["n"] for r in mine], [r["driver_peak_mib"] for r in mine], "o-", label=stage)
    a.set(xscale="log", yscale="log", xlabel="pool rows", ylabel="seconds", title="wall time")
    b.set(xscale="log", xlabel="pool rows", ylabel="MiB", title="driver peak RSS")
    b.legend(fontsize=7, loc="upper left")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
