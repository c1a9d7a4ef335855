"""The selection-quality benchmark's report: summary over worlds and seeds, the tables,
the targets' verdicts, the plots.

A run result (``benchmarks/quality.py``) is a dict with ``world``, ``seed``,
``train_seconds`` and ``accuracy``: eval set -> {family: accuracy, "overall": accuracy}.
Results come as world seed -> label -> runs. A run's Rel is 100 x the mean, over the
held-out benchmarks it was scored on, of its accuracy over *its own world's* full-data
accuracy (that world's seeds' mean): worlds differ in how hard their benchmarks are, so
a run is compared with the full data of the pool it was chosen from. A label's
accuracy and Rel are mean ± std over all its (world, seed) runs; the in-distribution
``test`` split is reported beside them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from benchmarks.common import machine
from engine.quality import markdown_table, mean_std, relative_performance


def overall(acc: dict) -> dict[str, float]:
    return {name: a["overall"] for name, a in acc.items()}


def _full(runs: list[dict]) -> dict[str, float]:
    """Mean accuracy of each eval set over a world's full-data runs."""
    return {
        e: float(np.mean([overall(r["accuracy"])[e] for r in runs])) for e in runs[0]["accuracy"]
    }


def _rel(method: dict, full: dict, scored: list[str]) -> float:
    """Rel, or NaN where the world's full data scores 0 on every scored benchmark (an
    untrained smoke run's base): undefined there, not a reason to lose the table."""
    if not any(full[b] > 0 for b in scored):
        return float("nan")
    return relative_performance(method, full, scored)


def summarize(results: dict[int, dict[str, list[dict]]], benchmarks: list[str]) -> dict:
    """Per label, over every (world, seed) run: mean and std of each eval set's accuracy
    and of Rel (module docstring), the runs' Rel in ``rel_runs`` (aligned with ``runs``,
    [world, seed] pairs), and per world the means (``per_world``, keyed by str(world))."""
    full = {w: _full(labels["full"]) for w, labels in results.items()}
    order = list(dict.fromkeys(label for labels in results.values() for label in labels))
    out = {}
    for label in order:
        runs = [(w, r) for w, labels in results.items() for r in labels.get(label, [])]
        evals = list(runs[0][1]["accuracy"])
        scored = [b for b in benchmarks if b in evals]
        rel = [_rel(overall(r["accuracy"]), full[w], scored) for w, r in runs]
        per_eval = {e: mean_std([overall(r["accuracy"])[e] for _, r in runs]) for e in evals}
        per_world = {}
        for w in dict.fromkeys(w for w, _ in runs):
            mine = [i for i, (ww, _) in enumerate(runs) if ww == w]
            per_world[str(w)] = {
                "rel": float(np.mean([rel[i] for i in mine])),
                "accuracy": {
                    e: float(np.mean([overall(runs[i][1]["accuracy"])[e] for i in mine]))
                    for e in evals
                },  # fmt: skip
            }
        out[label] = {
            "runs": [[w, r["seed"]] for w, r in runs],
            "rows": runs[0][1]["rows"],
            "accuracy": {e: {"mean": m, "std": s} for e, (m, s) in per_eval.items()},
            "rel": dict(zip(("mean", "std"), mean_std(rel), strict=True)),
            "rel_runs": rel,
            "per_world": per_world,
            "train_seconds": float(np.mean([r["train_seconds"] for _, r in runs])),
        }
    return out


# Two spaces' accuracies this close are one result: means over seeds of equal counts of
# right answers differ in the last bits (0.45111111111111120 vs 0.45111111111111110).
TIE_ABS_TOL = 1e-9


def better_space(acc: dict[str, float]) -> str:
    """The space whose selection trained better, or "tie" (``max`` would crown whichever
    came first)."""
    if math.isclose(acc["concept"], acc["skill"], rel_tol=0.0, abs_tol=TIE_ABS_TOL):
        return "tie"
    return max(acc, key=acc.get)


def targeted_summary(summary: dict, modes: list[str], autos: dict, benchmarks: list[str]):
    """Per mode and per auto rule (quality.py files each world's predicted space's runs
    under ``target:<rule>:<benchmark>``), its cells per benchmark, each its own
    selection, and its Rel over (world, seed) runs; and per rule, per (world, benchmark),
    whether it picked the space that trained better there (``right`` None on a tie).

    autos: rule ("auto", "auto-calibrated") -> world -> benchmark -> "concept" | "skill".
    Returns ``(rows, choice)``: rows[mode or rule] = {"cells": {benchmark: summary
    entry}, "rel": {"mean", "std"}}; choice[rule]["<world>/<benchmark>"] = {world,
    benchmark, predicted, concept, skill, trained_better, right}.
    """
    rows = {}
    for mode in [*modes, *autos]:
        cells = {b: summary[f"target:{mode}:{b}"] for b in benchmarks}
        by_run = [{tuple(k): v for k, v in zip(c["runs"], c["rel_runs"], strict=True)}
                  for c in cells.values()]  # fmt: skip
        common = [k for k in by_run[0] if all(k in r for r in by_run)]
        rel = [float(np.mean([r[k] for r in by_run])) for k in common]
        rows[mode] = {"cells": cells, "rel": dict(zip(("mean", "std"), mean_std(rel), strict=True))}
    choice = {}
    for rule, predictions in autos.items():
        choice[rule] = {}
        for w, predicted in predictions.items():
            for b in benchmarks:
                acc = {m: summary[f"target:{m}:{b}"]["per_world"][str(w)]["accuracy"][b]
                       for m in ("concept", "skill")}  # fmt: skip
                better = better_space(acc)
                choice[rule][f"{w}/{b}"] = {
                    "world": w, "benchmark": b, "predicted": predicted[b], **acc,
                    "trained_better": better,
                    "right": None if better == "tie" else predicted[b] == better,
                }  # fmt: skip
    return rows, choice


def choice_score(choice: dict) -> dict:
    """``{"right": n, "decided": m, "ties": t}``: hits among the benchmarks where one
    space trained better (a tie can be neither)."""
    decided = [c for c in choice.values() if c["right"] is not None]
    return {"right": sum(bool(c["right"]) for c in decided), "decided": len(decided),
            "ties": len(choice) - len(decided)}  # fmt: skip


def choice_table(choice: dict) -> str:
    """Markdown: per world and benchmark, the prediction, both accuracies, the better
    space and whether ``auto`` picked it (yes / no, "—" for a tie); then the score."""
    verdict = {True: "yes", False: "no", None: "—"}
    table = markdown_table(
        ["world", "benchmark", "predicted", "concept", "skill", "trained better", "right"],
        [[c["world"], c["benchmark"], c["predicted"], f"{c['concept'] * 100:.1f}",
          f"{c['skill'] * 100:.1f}", c["trained_better"], verdict[c["right"]]]
         for c in choice.values()],
    )  # fmt: skip
    score = choice_score(choice)
    return (
        f"{table}\n\nIt picked the better space for {score['right']} of "
        f"{score['decided']} benchmarks where one trained better ({score['ties']} tied)."
    )


def _cell(stat: dict) -> str:
    return f"{stat['mean'] * 100:.1f} ± {stat['std'] * 100:.1f}"


def _rel_cell(stat: dict) -> str:
    return f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def targets(doc: dict) -> list[dict]:
    """The issue's targets on these worlds, each with its figures and whether it is met.

    - PROGRESS at 20% (the best of the variants run, named): Rel >= 98, and above random 20%
      by more than twice the larger of their two Rel standard deviations;
    - ``auto`` (and ``auto-calibrated``): the better space on >= 80% of the decided
      (world, benchmark) pairs, and a Rel above the best untargeted method's at 20%;
      ``sample``, which picks a space per benchmark sample, the latter only.
    """
    s, out = doc["summary"], []
    variants = ("progress-loss", "progress-accuracy", "progress-loss-uncertainty")
    progress = [m for m in variants if f"{m}@0.2" in s]
    if progress and "random@0.2" in s:
        best = max(progress, key=lambda m: s[f"{m}@0.2"]["rel"]["mean"])
        p, r = s[f"{best}@0.2"]["rel"], s["random@0.2"]["rel"]
        margin, needed = p["mean"] - r["mean"], 2 * max(p["std"], r["std"])
        out.append({"target": f"{best} at 20%: Rel >= 98", "value": round(p["mean"], 2),
                    "met": p["mean"] >= 98, "by": round(p["mean"] - 98, 2)})  # fmt: skip
        out.append({"target": f"{best} - random at 20% > 2 x max std", "value": round(margin, 2),
                    "needed": round(needed, 2), "met": margin > needed,
                    "by": round(margin - needed, 2)})  # fmt: skip
    untargeted = {m: s[f"{m}@0.2"]["rel"]["mean"] for m in doc["methods"] if f"{m}@0.2" in s}
    best = max(untargeted, key=untargeted.get) if untargeted else None
    for rule, choice in (doc.get("targeted") or {}).get("choice", {}).items():
        score = choice_score(choice)
        share = score["right"] / score["decided"] if score["decided"] else float("nan")
        out.append({"target": f"{rule}: the better space on >= 80% of decided benchmarks",
                    "value": f"{score['right']}/{score['decided']}", "met": share >= 0.8,
                    "by": round(100 * (share - 0.8), 1)})  # fmt: skip
        if best:
            out.append(_above(f"{rule} above the best untargeted 20% ({best})",
                              doc["targeted"]["rows"][rule], untargeted[best]))  # fmt: skip
    # auto's successor that chooses per benchmark sample has no "right space" to count
    sample = (doc.get("targeted") or {}).get("rows", {}).get("sample")
    if sample and best:
        out.append(_above(f"sample (per-sample space) above the best untargeted 20% ({best})",
                          sample, untargeted[best]))  # fmt: skip
    return out


def _above(target: str, row: dict, needed: float) -> dict:
    rel = row["rel"]["mean"]
    return {"target": target, "value": round(rel, 2), "needed": round(needed, 2),
            "met": rel > needed, "by": round(rel - needed, 2)}  # fmt: skip


def write_report(out: str, doc: dict) -> str:
    """Write ``out`` (JSON), its ``.md`` tables and the plots; return the markdown."""
    s, evals, benchmarks = doc["summary"], doc["evals"], doc["benchmarks"]
    budgets, methods, prior = doc["budgets"], doc["methods"], doc["prior"]
    worlds = [str(w) for w in doc["worlds"]]
    full = {e: s["full"]["accuracy"][e]["mean"] for e in evals}
    labels = [("full data", "100%", "full")]
    labels += [(m, f"{b:.0%}", f"{m}@{b:g}") for b in budgets for m in methods
               if f"{m}@{b:g}" in s]  # fmt: skip
    header = ["method", "budget", *benchmarks, "Rel", "test"]
    rows = [[name, budget, *(_cell(s[label]["accuracy"][b]) for b in benchmarks),
             _rel_cell(s[label]["rel"]), _cell(s[label]["accuracy"]["test"])]
            for name, budget, label in labels]  # fmt: skip
    per_world = [[name, budget, *(f"{s[label]['per_world'][w]['rel']:.1f}" for w in worlds)]
                 for name, budget, label in labels]  # fmt: skip
    if doc.get("targeted"):
        for mode, row in doc["targeted"]["rows"].items():
            rows.append([f"target: {mode}", f"{doc['target_budget']:.0%}",
                         *(_cell(row["cells"][b]["accuracy"][b]) for b in benchmarks),
                         _rel_cell(row["rel"]), ""])  # fmt: skip
    p = overall(prior["accuracy"])
    first = {e: s["full"]["per_world"][worlds[0]]["accuracy"][e] for e in evals}
    rows.append([f"text-only prior (full data, image black; world {worlds[0]})", "100%",
                 *(f"{p[b] * 100:.1f}" for b in benchmarks),
                 f"{_rel(p, first, benchmarks):.1f}",
                 f"{p['test'] * 100:.1f}"])  # fmt: skip
    n_runs = len(s["full"]["runs"])
    parts = [
        f"**{doc['role']} worlds {doc['worlds']}** (calibration worlds "
        f"{doc['calibration_worlds']}, evaluation worlds {doc['evaluation_worlds']}). "
        f"Accuracy (%), mean ± std over {n_runs} runs: worlds x training seeds "
        f"{doc['seeds']}; pool {doc['pool']} rows per world; Rel = 100 x mean over the "
        "held-out benchmarks of accuracy / the run's own world's full data (its seeds' "
        "mean); test = the in-distribution split." + (f" {doc['note']}" if doc.get("note") else ""),
        markdown_table(header, rows),
        "Rel per world (mean over seeds):",
        markdown_table(["method", "budget", *(f"world {w}" for w in worlds)], per_world),
    ]
    if doc.get("skipped"):
        parts.append("Not run: " + "; ".join(
            f"world {w}: {m} ({why})" for w, d in doc["skipped"].items() for m, why in d.items()))  # fmt: skip
    families = [*sorted(set(prior["accuracy"]["test"]) - {"overall"}), "overall"]
    runs = [(label, [r for w in worlds for r in doc["runs"][w].get(label, [])])
            for label in ["full", *(f"{m}@0.2" for m in methods if f"{m}@0.2" in s)]]  # fmt: skip
    fam_rows = [[label, *(f"{np.mean([r['accuracy']['test'][f] for r in rs]) * 100:.1f}"
                          for f in families)] for label, rs in runs]  # fmt: skip
    fam_rows.append(["text-only prior", *(f"{prior['accuracy']['test'][f] * 100:.1f}" for f in families)])  # fmt: skip
    parts += ["Per family on the test split (mean over runs):",
              markdown_table(["run", *families], fam_rows)]  # fmt: skip
    if doc.get("targeted"):
        choices = doc["targeted"]["choice"]
        scores = {rule: choice_score(choice) for rule, choice in choices.items()}
        doc = {**doc, "targeted": {**doc["targeted"], "score": scores}}
        for rule, choice in choices.items():
            parts += [f"Did `{rule}` pick the space that trained better?", choice_table(choice)]
    doc = {**doc, "targets": targets(doc)}
    parts += ["Targets:", markdown_table(
        ["target", "value", "needed", "met", "by"],
        [[t["target"], t["value"], t.get("needed", ""), "yes" if t["met"] else "no", t["by"]]
         for t in doc["targets"]],
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
