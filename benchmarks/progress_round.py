"""Coordinator round latency: Δk, the draw, bookkeeping and the checkpoint, at pool scale.

For each pool size, a coordinator state runs a whole PROGRESS budget (20% of the
pool: a 9% warm-up, then rounds of 7,500 picks) with synthetic per-cluster scores,
and every round is timed in its parts: ``report`` (scores in), ``next_round`` (Δk,
softmax, apportioning, the draw, the ledger), ``eval_positions`` (the rows to score
next) and ``to_bytes`` (the checkpoint). Beside it, the reference code's way of
removing a round's picks from the pool (a list of dicts filtered against the list
of picked dicts, O(N*M): 92% of its round) is timed at the smallest size, where it
still finishes. ``--within uniform,uncertainty`` also runs the rule that draws inside a
cluster by the model's uncertainty (``engine.within``): its round adds ``candidates``
(the rows offered, 3 per guided pick) and the pick in the band to ``next_round``
(uncertainties synthetic: the trainer's forwards are not the coordinator's cost).

    python benchmarks/progress_round.py [--sizes 100000,1000000] [--k 5000]
        [--within uniform,uncertainty]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import report  # noqa: E402
from engine.coordinator import BASELINE, CoordinatorState  # noqa: E402
from engine.progress import PoolClusters  # noqa: E402
from engine.selection_rule import ProgressSettings, SelectionRule  # noqa: E402

ROUND = 7_500


def run(pool: int, k: int, seed: int, within: str = "uniform") -> dict:
    rng = np.random.default_rng(seed)
    # Cluster sizes vary as real ones do (log-normal), not k equal parts.
    weights = rng.lognormal(0.0, 1.0, k)
    labels = rng.choice(k, size=pool, p=weights / weights.sum()).astype(np.int32)
    start = time.perf_counter()
    clusters = PoolClusters.from_labels(labels, k)
    setup = time.perf_counter() - start
    rule = SelectionRule(metric="accuracy", within=within)
    settings = ProgressSettings(budget=pool // 5, round_size=ROUND, seed=seed, rule=rule)
    state = CoordinatorState(settings, clusters)
    if within == "uncertainty":  # a prototype order: any ranks within each cluster
        state.set_diversity(rng.permutation(pool))
    state.warmup(np.sort(rng.choice(pool, size=int(0.09 * pool), replace=False)))
    skill = rng.uniform(0.2, 0.8, k)
    names = ("report", "candidates", "next_round", "eval_positions", "checkpoint")
    timings: dict[str, list[float]] = {name: [] for name in names}

    def scores(t: int) -> np.ndarray:
        """Right (1) or wrong (0) per probe row, at its cluster's accuracy."""
        rows = state.eval_positions(t)
        acc = np.clip(skill + 0.02 * (t + 1) * rng.standard_normal(k), 0, 1)
        return (rng.random(rows.size) < acc[labels[rows]]).astype(np.float64)

    state.report(BASELINE, scores(BASELINE))
    t = 0
    while not state.finished:
        values = scores(t)
        a = time.perf_counter()
        state.report(t, values)
        b = time.perf_counter()
        offered = state.candidates(t + 1)
        unsure = rng.random(offered.size) if offered.size else None
        b2 = time.perf_counter()
        picks = state.next_round(t + 1, unsure)
        c = time.perf_counter()
        state.eval_positions(t + 1)
        d = time.perf_counter()
        blob = state.to_bytes()
        e = time.perf_counter()
        parts = (b - a, b2 - b, c - b2, d - c, e - d)
        for name, seconds in zip(timings, parts, strict=True):
            timings[name].append(seconds)
        assert picks.size and state.ledger.spent <= settings.budget
        t += 1
    assert state.ledger.spent == settings.budget
    per_round = np.sum([timings[name] for name in timings], axis=0)
    return {
        "pool": pool,
        "k": k,
        "within": within,
        "rounds": t,
        "picks_per_round": ROUND,
        "setup_s": round(setup, 3),
        "round_mean_ms": round(1000 * per_round.mean(), 1),
        "round_max_ms": round(1000 * per_round.max(), 1),
        **{f"{name}_ms": round(1000 * float(np.mean(v)), 1) for name, v in timings.items()},
        "checkpoint_mb": round(len(blob) / 2**20, 2),
    }


def reference_removal(pool: int, picks: int, seed: int) -> float:
    """The reference's bookkeeping: drop picked records from a list of dicts."""
    rng = np.random.default_rng(seed)
    data = [
        {"id": f"s{i}", "cluster_id": int(c)} for i, c in enumerate(rng.integers(0, 1000, pool))
    ]
    chosen = [data[i] for i in rng.choice(pool, size=picks, replace=False)]
    start = time.perf_counter()
    remaining = [s for s in data if s not in chosen]
    assert len(remaining) == pool - picks
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--k", type=int, default=5000)
    parser.add_argument("--reference-pool", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--within", default="uniform,uncertainty",
                        help="selection.within rules to time")  # fmt: skip
    parser.add_argument("--out", default="benchmarks/results/progress_round.json")
    args = parser.parse_args()
    rows = [run(int(size), args.k, args.seed, within) for within in args.within.split(",")
            for size in args.sizes.split(",")]  # fmt: skip
    ref = reference_removal(args.reference_pool, ROUND, args.seed)
    ours = run(args.reference_pool, min(args.k, args.reference_pool // 20), args.seed)
    ours["reference_removal_ms"] = round(1000 * ref, 1)
    ours["reference_vs_ours"] = round(1000 * ref / ours["round_mean_ms"], 1)
    rows.append(ours)
    header = ["pool", "k", "within", "rounds", "round_mean_ms", "round_max_ms", "report_ms"]
    header += [
        "candidates_ms",
        "next_round_ms",
        "eval_positions_ms",
        "checkpoint_ms",
        "checkpoint_mb",
    ]
    header += ["setup_s", "reference_removal_ms", "reference_vs_ours"]
    report("progress_round", rows, header, args.out, round_size=ROUND)


if __name__ == "__main__":
    main()
