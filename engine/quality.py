"""The selection-quality benchmark's maths: the untargeted baselines' selections, the
papers' relative performance, and the summary over seeds.

Baselines (each returns pool positions, int64 (count,), sorted ascending):
    - ``random_selection``: a seeded uniform draw without replacement.
    - ``score_selection``: rows ranked by a static per-row score (the warm-up model's
      per-token loss, i.e. log-perplexity, or EL2N), keeping the ``high`` end, the
      ``low`` end or the ``middle`` (Marion et al. 2023 found middle-perplexity pruning
      the best of the three for LLM pre-training; the VLM papers' tables report it
      below random).

Relative performance ("Rel", the papers' last column): for a method m and the
benchmarks B, ``Rel(m) = 100 * mean_b acc(m, b) / acc(full, b)``, with acc the mean
over seeds; a benchmark where full data scores 0 is left out (the ratio is undefined).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

Keep = Literal["high", "low", "middle"]


def random_selection(n: int, count: int, seed: int) -> np.ndarray:
    """``count`` distinct positions of ``range(n)``, uniform, seeded: int64 (count,)."""
    if not 0 <= count <= n:
        raise ValueError(f"cannot select {count} of {n} rows")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=count, replace=False)).astype(np.int64)


def score_selection(scores: np.ndarray, count: int, keep: Keep) -> np.ndarray:
    """``count`` positions by a static score, float (n,): the highest, the lowest or the
    middle of the ranking (ties broken by position; NaN scores ranked last and taken
    only when nothing else is left). Returns int64 (count,), sorted."""
    scores = np.asarray(scores, np.float64)
    n = len(scores)
    if not 0 <= count <= n:
        raise ValueError(f"cannot select {count} of {n} rows")
    finite = np.isfinite(scores)
    ranked = np.flatnonzero(finite)[np.argsort(scores[finite], kind="stable")]  # ascending
    if keep == "high":
        ranked = ranked[::-1]
    elif keep == "middle":
        ranked = ranked[max(0, (len(ranked) - count) // 2) :]
    ranked = np.concatenate([ranked, np.flatnonzero(~finite)])
    return np.sort(ranked[:count]).astype(np.int64)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def relative_performance(
    method: Mapping[str, float], full: Mapping[str, float], benchmarks: Sequence[str]
) -> float:
    """100 x the mean over ``benchmarks`` of method / full accuracy (full > 0 only).

    Raises:
        ValueError: a benchmark missing from either mapping, or none with full > 0.
    """
    missing = [b for b in benchmarks if b not in method or b not in full]
    if missing:
        raise ValueError(f"no accuracy for {missing}")
    ratios = [method[b] / full[b] for b in benchmarks if full[b] > 0]
    if not ratios:
        raise ValueError("full data scores 0 on every benchmark: Rel is undefined")
    return 100.0 * float(np.mean(ratios))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)
