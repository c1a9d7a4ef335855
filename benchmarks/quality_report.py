"""The selection-quality benchmark's report: summary over seeds, the tables, the plots.

A run result (``benchmarks/quality.py``) is a dict with ``seed``, ``train_seconds`` and
``accuracy``: eval set -> {family: accuracy, "overall": accuracy}. Rel is taken over
the held-out benchmarks only (the papers' columns); the in-distribution ``test`` split
is reported beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.common import machine
from engine.quality import markdown_table, mean_std, relative_performance


def overall(acc: dict) -> dict[str, float]:
    return {name: a["overall"] for name, a in acc.items()}


def summarize(results: dict[str, list[dict]], benchmarks: list[str]) -> dict:
    """Per label: mean and std over seeds of each eval set's accuracy, and of Rel vs the
    seeds' mean full-data accuracy (over the benchmarks the label was scored on)."""
    full_runs = results["full"]
    full = {e: float(np.mean([overall(r["accuracy"])[e] for r in full_runs]))
            for e in full_runs[0]["accuracy"]}  # fmt: skip
    out = {}
    for label, runs in results.items():
        evals = list(runs[0]["accuracy"])
        scored = [b for b in benchmarks if b in evals]
        per_eval = {e: mean_std([overall(r["accuracy"])[e] for r in runs]) for e in evals}
        rel = [relative_performance(overall(r["accuracy"]), full, scored) for r in runs]
        out[label] = {
            "seeds": [r["seed"] for r in runs],
            "rows": runs[0]["rows"],
            "accuracy": {e: {"mean": m, "std": s} for e, (m, s) in per_eval.items()},
            "rel": dict(zip(("mean", "std"), mean_std(rel), strict=True)),
            "train_seconds": float(np.mean([r["train_seconds"] for r in runs])),
        }
    return out


def targeted_summary(summary: dict, modes: list[str], predictions: dict, benchmarks: list[str]):
    """Per mode, one row over the benchmarks (each column its own selection), plus
    ``auto`` (each benchmark's predicted space) and whether it picked the better space."""
    rows = {mode: {b: summary[f"target:{mode}:{b}"] for b in benchmarks} for mode in modes}
    rows["auto"] = {b: rows[predictions[b]][b] for b in benchmarks}
    choice = {}
    for b in benchmarks:
        acc = {m: rows[m][b]["accuracy"][b]["mean"] for m in ("concept", "skill")}
        better = max(acc, key=acc.get)
        choice[b] = {"predicted": predictions[b], "trained_better": better, **acc,
                     "right": predictions[b] == better}  # fmt: skip
    return rows, choice


def _cell(stat: dict) -> str:
    return f"{stat['mean'] * 100:.1f} ± {stat['std'] * 100:.1f}"


def _rel_of_row(cells: dict, full: dict, benchmarks: list[str]) -> float:
    """Rel of a targeted row, each benchmark scored by its own selection."""
    row = {b: cells[b]["accuracy"][b]["mean"] for b in benchmarks}
    return relative_performance(row, full, benchmarks)


def write_report(out: str, doc: dict) -> str:
    """Write ``out`` (JSON), its ``.md`` tables and the plots; return the markdown."""
    s, evals, benchmarks = doc["summary"], doc["evals"], doc["benchmarks"]
    budgets, methods, prior = doc["budgets"], doc["methods"], doc["prior"]
    full = {e: s["full"]["accuracy"][e]["mean"] for e in evals}
    header = ["method", "budget", *benchmarks, "Rel", "test"]
    rows = [["full data", "100%", *(_cell(s["full"]["accuracy"][b]) for b in benchmarks),
             "100.0", _cell(s["full"]["accuracy"]["test"])]]  # fmt: skip
    for b in budgets:
        for m in methods:
            label = f"{m}@{b:g}"
            if label in s:
                x = s[label]
                rows.append([m, f"{b:.0%}", *(_cell(x["accuracy"][e]) for e in benchmarks),
                             f"{x['rel']['mean']:.1f} ± {x['rel']['std']:.1f}",
                             _cell(x["accuracy"]["test"])])  # fmt: skip
    if doc.get("targeted"):
        for mode, cells in doc["targeted"]["rows"].items():
            rows.append([f"target: {mode}", f"{doc['target_budget']:.0%}",
                         *(_cell(cells[b]["accuracy"][b]) for b in benchmarks),
                         f"{_rel_of_row(cells, full, benchmarks):.1f}", ""])  # fmt: skip
    p = overall(prior["accuracy"])
    rows.append(["text-only prior (full data, image black)", "100%",
                 *(f"{p[b] * 100:.1f}" for b in benchmarks),
                 f"{relative_performance(p, full, benchmarks):.1f}",
                 f"{p['test'] * 100:.1f}"])  # fmt: skip
    parts = [
        f"Accuracy (%), mean ± std over seeds {doc['seeds']}; pool {doc['pool']} rows; "
        f"Rel = 100 x mean over the held-out benchmarks of accuracy / full data's "
        f"(seeds' mean); test = the in-distribution split.",
        markdown_table(header, rows),
    ]
    families = [*sorted(set(prior["accuracy"]["test"]) - {"overall"}), "overall"]
    fam_rows = []
    for label in ["full", *(f"{m}@0.2" for m in methods if f"{m}@0.2" in s)]:
        fam_rows.append([label, *(f"{np.mean([r['accuracy']['test'][f] for r in doc['runs'][label]]) * 100:.1f}" for f in families)])  # fmt: skip
    fam_rows.append(["text-only prior", *(f"{prior['accuracy']['test'][f] * 100:.1f}" for f in families)])  # fmt: skip
    parts += ["Per family on the test split (mean over seeds):",
              markdown_table(["run", *families], fam_rows)]  # fmt: skip
    if doc.get("targeted"):
        choice = doc["targeted"]["choice"]
        parts += ["Did `auto` pick the space that trained better?", markdown_table(
            ["benchmark", "predicted", "concept", "skill", "trained better", "right"],
            [[b, c["predicted"], f"{c['concept'] * 100:.1f}", f"{c['skill'] * 100:.1f}",
              c["trained_better"], "yes" if c["right"] else "no"] for b, c in choice.items()],
        )]  # fmt: skip
    text = "\n\n".join(parts) + "\n"
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".md").write_text(text)
    path.write_text(json.dumps({"benchmark": "quality", "machine": machine(), **doc}, indent=1))
    plot_budgets(path.with_name(path.stem + "_budget.png"), doc, full, p)
    return text


def plot_budgets(path: Path, doc: dict, full: dict, prior: dict) -> None:
    """Mean accuracy over the held-out benchmarks against budget, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, benchmarks = doc["summary"], doc["benchmarks"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in doc["methods"]:
        pts = [(b, s[f"{m}@{b:g}"]) for b in doc["budgets"] if f"{m}@{b:g}" in s]
        xs = [b * 100 for b, _ in pts]
        ys = [100 * np.mean([x["accuracy"][e]["mean"] for e in benchmarks]) for _, x in pts]
        ax.plot(xs, ys, marker="o", label=m)
    ax.axhline(100 * np.mean([full[b] for b in benchmarks]), color="k", label="full data")
    ax.axhline(100 * np.mean([prior[b] for b in benchmarks]), color="grey", ls="--",
               label="text-only prior")  # fmt: skip
    ax.set_xlabel("budget (% of the pool)")
    ax.set_ylabel("accuracy, mean over held-out benchmarks (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
