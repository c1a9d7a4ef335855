"""Fit ``auto``'s margin threshold on the calibration worlds, whose leaning is measured.

    python benchmarks/calibrate_auto.py [--quality benchmarks/results/quality_calibration.json]
    python benchmarks/quality.py --auto-threshold <the printed threshold>   # the evaluation

``auto`` predicts concept when a benchmark's margin Δ_bench - Δ_ref is above 0. Whether 0
is the right line is an empirical question: the two spaces' offset is estimated from a
reference of pool samples, which need not lean the way benchmarks do. The calibration
run (``quality.py --worlds calibration``) records each (world, benchmark)'s margin and
which space's selection trained better there; ``engine.crossrank.fit_threshold`` picks
the threshold that calls most of them right (0 when nothing beats it). Refuses the
evaluation worlds' results: the threshold must never see them. Writes
``benchmarks/results/auto_threshold.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402
from engine.crossrank import fit_threshold  # noqa: E402
from engine.quality import markdown_table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def calibration_points(doc: dict) -> list[dict]:
    """(world, benchmark, margin, trained_better) of every decided calibration benchmark."""
    if doc.get("role") != "calibration":
        raise SystemExit(
            f"{doc.get('role')!r} results: the threshold is fitted on calibration worlds only "
            "(run `python benchmarks/quality.py --worlds calibration` first)"
        )
    margins = doc["targeted"]["margins"]
    return [
        {"world": c["world"], "benchmark": c["benchmark"],
         "margin": margins[str(c["world"])][c["benchmark"]], "trained_better": c["trained_better"]}
        for c in doc["targeted"]["choice"]["auto"].values()
        if c["right"] is not None
    ]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quality", default=str(RESULTS / "quality_calibration.json"))
    p.add_argument("--out", default=str(RESULTS / "auto_threshold.json"))
    args = p.parse_args()
    doc = json.loads(Path(args.quality).read_text())
    points = calibration_points(doc)
    if not points:
        raise SystemExit(f"{args.quality} has no decided benchmark (every one tied)")
    margins = np.array([x["margin"] for x in points])
    concept = np.array([x["trained_better"] == "concept" for x in points])
    threshold, right = fit_threshold(margins, concept)
    uncalibrated = int(((margins > 0) == concept).sum())
    print(markdown_table(
        ["world", "benchmark", "margin", "trained better", "uncalibrated", "calibrated"],
        [[x["world"], x["benchmark"], f"{x['margin']:+.3f}", x["trained_better"],
          "concept" if x["margin"] > 0 else "skill",
          "concept" if x["margin"] > threshold else "skill"] for x in points],
    ))  # fmt: skip
    result = {
        "benchmark": "calibrate_auto", "machine": machine(), "source": args.quality,
        "worlds": doc["worlds"], "threshold": threshold, "right": right,
        "right_uncalibrated": uncalibrated, "decided": len(points), "points": points,
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nthreshold {threshold:+.4f}: {right} of {len(points)} decided calibration "
          f"benchmarks right (at 0: {uncalibrated}); wrote {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
