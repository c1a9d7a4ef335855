"""The quality benchmark's protocol and report: worlds split into calibration and
evaluation, Rel against each run's own world, ties reported as ties (neither a hit nor a
miss), and the targets' verdicts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.quality import CALIBRATION_WORLDS, EVALUATION_WORLDS, world_seeds
from benchmarks.quality_report import (
    better_space,
    choice_score,
    choice_table,
    summarize,
    targeted_summary,
    write_report,
)

# Means over seeds of the same right answers, summed in another order: equal but for
# the last bits.
EQUAL_A, EQUAL_B = 0.45111111111111120, 0.45111111111111110
BENCHES = ["b1", "b2"]


def run(world, seed, acc: dict, rows=100):
    return {"world": world, "seed": seed, "rows": rows, "train_seconds": 1.0,
            "accuracy": {e: {"overall": a, "colour": a} for e, a in acc.items()}}  # fmt: skip


def test_the_worlds_split_is_the_protocol():
    assert not set(CALIBRATION_WORLDS) & set(EVALUATION_WORLDS)
    assert world_seeds("evaluation") == (list(EVALUATION_WORLDS), "evaluation")
    assert world_seeds("calibration") == (list(CALIBRATION_WORLDS), "calibration")
    assert world_seeds("7") == ([7], "other")
    with pytest.raises(SystemExit, match="mix evaluation worlds"):
        world_seeds(f"{CALIBRATION_WORLDS[0]},{EVALUATION_WORLDS[0]}")


def test_rel_is_taken_against_each_runs_own_world():
    # world 1's benchmarks are twice as hard: full data scores half of world 2's
    results = {
        1: {"full": [run(1, s, {"test": 0.5, "b1": 0.2, "b2": 0.4}) for s in (0, 1)],
            "random@0.2": [run(1, s, {"test": 0.4, "b1": 0.1, "b2": 0.4}) for s in (0, 1)]},
        2: {"full": [run(2, s, {"test": 0.5, "b1": 0.4, "b2": 0.8}) for s in (0, 1)],
            "random@0.2": [run(2, s, {"test": 0.4, "b1": 0.4, "b2": 0.4}) for s in (0, 1)]},
    }  # fmt: skip
    s = summarize(results, BENCHES)
    r = s["random@0.2"]
    assert r["runs"] == [[1, 0], [1, 1], [2, 0], [2, 1]]
    np.testing.assert_allclose(r["rel_runs"], [75.0, 75.0, 75.0, 75.0])
    assert r["rel"]["mean"] == pytest.approx(75.0) and r["rel"]["std"] == pytest.approx(0.0)
    assert r["per_world"]["2"]["accuracy"]["b1"] == pytest.approx(0.4)
    assert r["accuracy"]["b1"]["mean"] == pytest.approx(0.25)  # pooled over worlds


def target_summary(acc: dict[str, tuple[float, float]], predictions: dict[str, str]):
    """One world, one seed: concept and skill runs per benchmark, auto filed as quality.py
    files it, full data at 1.0 everywhere."""
    labels = {"full": [run(5, 0, {"test": 1.0, **{b: 1.0 for b in acc}})]}
    for b, pair in acc.items():
        for i, mode in enumerate(("concept", "skill")):
            labels[f"target:{mode}:{b}"] = [run(5, 0, {b: pair[i]})]
        labels[f"target:auto:{b}"] = labels[f"target:{predictions[b]}:{b}"]
    return summarize({5: labels}, list(acc))


def test_targeted_summary_reports_ties_as_ties():
    assert EQUAL_A != EQUAL_B
    acc = {"hit": (0.6, 0.4), "tie": (EQUAL_B, EQUAL_A), "miss": (0.3, 0.5)}
    predictions = {"hit": "concept", "tie": "skill", "miss": "concept"}
    summary = target_summary(acc, predictions)
    rows, choices = targeted_summary(summary, ["concept", "skill"], {"auto": {5: predictions}},
                                     list(acc))  # fmt: skip
    choice = choices["auto"]
    assert rows["auto"]["cells"]["tie"] is summary["target:auto:tie"]
    assert rows["auto"]["rel"]["mean"] == pytest.approx(100 * (0.6 + EQUAL_A + 0.3) / 3)
    assert [choice[f"5/{b}"]["trained_better"] for b in acc] == ["concept", "tie", "skill"]
    assert [choice[f"5/{b}"]["right"] for b in acc] == [True, None, False]
    assert choice_score(choice) == {"right": 1, "decided": 2, "ties": 1}
    json.dumps(choice)
    table = choice_table(choice)
    tie_line = next(line for line in table.splitlines() if "| tie |" in line)
    assert tie_line.rstrip().endswith("| tie | — |")
    assert (
        "picked the better space for 1 of 2 benchmarks where one trained better (1 tied)" in table
    )


def test_better_space_needs_more_than_rounding():
    assert better_space({"concept": EQUAL_A, "skill": EQUAL_B}) == "tie"
    assert better_space({"concept": 0.5, "skill": 0.5 + 1e-6}) == "skill"
    assert better_space({"concept": 0.5 + 1e-6, "skill": 0.5}) == "concept"


def test_the_report_states_every_target_with_its_margin(tmp_path):
    def acc(x):
        return {"test": x, "b1": x, "b2": x}

    results = {}
    for w in (11, 12):
        results[w] = {
            "full": [run(w, s, acc(0.5)) for s in (0, 1, 2)],
            "random@0.2": [run(w, s, acc(0.45 + 0.01 * s)) for s in (0, 1, 2)],
            "progress-loss@0.2": [run(w, s, acc(0.495)) for s in (0, 1, 2)],
        }
        for b in BENCHES:
            results[w][f"target:concept:{b}"] = [run(w, s, {b: 0.55}) for s in (0, 1, 2)]
            results[w][f"target:skill:{b}"] = [run(w, s, {b: 0.40}) for s in (0, 1, 2)]
            results[w][f"target:sample:{b}"] = [run(w, s, {b: 0.45}) for s in (0, 1, 2)]
            space = "concept" if (w, b) != (12, "b2") else "skill"  # one miss of four
            results[w][f"target:auto:{b}"] = results[w][f"target:{space}:{b}"]
    summary = summarize(results, BENCHES)
    predictions = {w: {b: ("concept" if (w, b) != (12, "b2") else "skill") for b in BENCHES}
                   for w in (11, 12)}  # fmt: skip
    modes = ["concept", "skill", "sample"]
    rows, choice = targeted_summary(summary, modes, {"auto": predictions}, BENCHES)
    doc = {
        "role": "evaluation", "worlds": [11, 12], "calibration_worlds": [0],
        "evaluation_worlds": [11, 12], "seeds": [0, 1, 2], "pool": 100,
        "budgets": [0.2], "methods": ["random", "progress-loss"], "evals": ["test", *BENCHES],
        "benchmarks": BENCHES, "target_budget": 0.2, "summary": summary,
        "prior": run(11, 0, acc(0.2)), "runs": {str(w): r for w, r in results.items()},
        "targeted": {"rows": rows, "choice": choice}, "skipped": {},
    }  # fmt: skip
    text = write_report(str(tmp_path / "quality.json"), doc)
    saved = json.loads((tmp_path / "quality.json").read_text())
    verdict = {t["target"]: t for t in saved["targets"]}
    rel = verdict["progress-loss at 20%: Rel >= 98"]
    assert rel["value"] == pytest.approx(99.0) and rel["met"]
    margin = verdict["progress-loss - random at 20% > 2 x max std"]
    assert margin["value"] == pytest.approx(99.0 - 92.0) and margin["met"]
    auto = verdict["auto: the better space on >= 80% of decided benchmarks"]
    assert auto["value"] == "3/4" and not auto["met"] and auto["by"] == pytest.approx(-5.0)
    # sample's Rel 90 (0.45 / 0.5) against progress-loss's 99: below, by 9
    sample = verdict["sample (per-sample space) above the best untargeted 20% (progress-loss)"]
    assert sample["value"] == pytest.approx(90.0) and not sample["met"]
    assert sample["by"] == pytest.approx(-9.0)
    assert "world 11" in text and "| no |" in text
    assert (tmp_path / "quality_budget.png").stat().st_size > 0


def test_the_auto_threshold_is_fitted_on_calibration_worlds_only(tmp_path, monkeypatch):
    import sys

    from benchmarks import calibrate_auto

    # concept trained better exactly where the margin is above 0.2: at 0 one is wrong
    margins = {"b1": 0.5, "b2": 0.1}
    acc = {"b1": (0.6, 0.4), "b2": (0.3, 0.5)}
    predictions = {b: "concept" if m > 0 else "skill" for b, m in margins.items()}
    summary = target_summary(acc, predictions)
    rows, choice = targeted_summary(summary, ["concept", "skill"], {"auto": {5: predictions}},
                                    list(acc))  # fmt: skip
    doc = {"role": "calibration", "worlds": [5],
           "targeted": {"margins": {"5": margins}, "choice": choice, "rows": rows}}  # fmt: skip
    points = calibrate_auto.calibration_points(doc)
    assert [(x["benchmark"], x["trained_better"]) for x in points] == [
        ("b1", "concept"), ("b2", "skill")]  # fmt: skip
    source = tmp_path / "quality_calibration.json"
    source.write_text(json.dumps(doc))
    out = tmp_path / "auto_threshold.json"
    argv = ["calibrate_auto.py", "--quality", str(source), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    calibrate_auto.main()
    fitted = json.loads(out.read_text())
    assert 0.1 < fitted["threshold"] < 0.5 and fitted["right"] == 2
    assert fitted["right_uncalibrated"] == 1 and fitted["decided"] == 2
    source.write_text(json.dumps({**doc, "role": "evaluation"}))
    with pytest.raises(SystemExit, match="calibration worlds only"):
        calibrate_auto.main()
