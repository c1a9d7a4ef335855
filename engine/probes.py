"""PROGRESS's per-cluster probe sets and the progress Δk measured on them.

Why not score a fresh random sample of the selected rows every round (the paper's code,
and this project's first version): the sample after round t includes round t's own
rows, just trained on for several epochs, so Δk rewarded the cluster whose last picks
the model memorised; and two rounds' scores came from different rows, so Δk mixed
progress with the luck of the draw. Here:

- A cluster's probe set is *fixed*: a row that joins it stays in it. After round t the
  set is topped up to ``cap`` rows per cluster from rows selected in rounds before t
  (the warm-up, round 0, has nothing earlier: its probe set is its own rows, which the
  baseline scores before any training). A probe row is never a row the model has just
  been trained on, except in that first comparison.
- Δk compares the *same rows*: only rows scored both now and ``gap`` rounds ago count.
- Accuracy is smoothed by a Beta(a, a) prior, (correct + a) / (n + 2a): a cluster with
  no right answer yet has a finite, small score instead of a zero that the ratio cannot
  divide by.
- Before the softmax, Δk is divided by its spread over the clusters (``standardise``),
  so τ is in units of that spread for both metrics: raw accuracy Δk from a zero start
  counts right answers (softmax(Δ/τ) is then nearly an argmax) while raw loss Δk is a
  fraction below 1 (nearly uniform).
"""

from __future__ import annotations

import numpy as np

from engine.progress import Metric, PoolClusters, sample_segments

NOT_PROBED = -1


def probe_positions(probe_round: np.ndarray, round_index: int) -> np.ndarray:
    """Pool positions of the probe set scored after ``round_index``: every row that
    joined by then. probe_round: int32 (n,), the round a row joined (-1: never).
    Returns int64 (m,), ascending."""
    return np.flatnonzero((probe_round >= 0) & (probe_round <= max(round_index, 0)))


def grow_probes(
    probe_round: np.ndarray,
    clusters: PoolClusters,
    round_of: np.ndarray,
    round_index: int,
    cap: int,
    rng: np.random.Generator,
) -> int:
    """Top every cluster's probe set up to ``cap`` rows, in place; how many joined.

    probe_round: int32 (n,), updated: joiners get ``round_index``.
    round_of: int32 (n,), the round that selected a row (-1: not selected); joiners come
        from rounds before ``round_index`` (round 0: from round 0 itself), uniformly
        within each cluster.
    """
    last = 0 if round_index == 0 else round_index - 1  # the warm-up: its own rows
    candidate = (round_of >= 0) & (round_of <= last) & (probe_round == NOT_PROBED)
    members = np.bincount(clusters.labels[probe_round != NOT_PROBED], minlength=clusters.k)
    want = np.maximum(cap - members, 0)
    in_order = candidate[clusters.order]
    joined = clusters.order[in_order][sample_segments(clusters.sorted_labels[in_order], want, rng)]
    probe_round[joined] = round_index
    return int(joined.size)


def cluster_progress(
    labels: np.ndarray,
    now: np.ndarray,
    then: np.ndarray,
    k: int,
    metric: Metric,
    prior: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Δk per cluster from the rows scored at both times; (delta, rows) float64 / int64 (K,).

    labels: int (m,) cluster of each common row; now, then: float (m,) the rows' scores
        (1/0 correct for ``accuracy``, per-token loss for ``loss``), finite.
    ``accuracy``: s = (correct + prior) / (n + 2 prior), Δk = (s_now - s_then) / s_then
    (with ``prior`` 0 a zero s_then is floored at 1/n, one more right answer of n).
    ``loss``: Δk = (L_then - L_now) / L_then on the mean losses, the relative drop.
    NaN where a cluster has no common row.
    """
    n = np.bincount(labels, minlength=k).astype(np.float64)
    s_now = np.bincount(labels, weights=now, minlength=k)
    s_then = np.bincount(labels, weights=then, minlength=k)
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric == "accuracy":
            a = float(prior)
            s_now, s_then = (s_now + a) / (n + 2 * a), (s_then + a) / (n + 2 * a)
            floor = 0.0 if a > 0 else 1.0 / np.maximum(n, 1.0)
            delta = (s_now - s_then) / np.maximum(s_then, floor)
        elif metric == "loss":
            delta = (s_then - s_now) / (s_then + 1e-8 * n)
        else:
            raise ValueError(f"metric must be 'accuracy' or 'loss', got {metric!r}")
    return np.where(n > 0, delta, np.nan), n.astype(np.int64)


def cluster_means(labels: np.ndarray, values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster mean of the finite ``values`` float (m,) and their count; float64 /
    int64 (K,), NaN where a cluster has none (the round's score, for the report)."""
    finite = np.isfinite(values)
    n = np.bincount(labels[finite], minlength=k)
    sums = np.bincount(labels[finite], weights=values[finite], minlength=k)
    return np.where(n > 0, sums / np.maximum(n, 1), np.nan), n.astype(np.int64)


def standardise(delta: np.ndarray) -> np.ndarray:
    """Δk over its standard deviation across the clusters that have one; float64 (K,).

    The sign is kept (only Δk > 0 is ever drawn from) and no mean is removed: the
    softmax is shift-free already, and a shift would move clusters across zero. A
    spread of 0 (one scored cluster, or all equal) leaves Δk as it is.
    """
    delta = np.asarray(delta, np.float64)
    finite = delta[np.isfinite(delta)]
    spread = float(finite.std()) if finite.size > 1 else 0.0
    return delta / spread if spread > 0 else delta.copy()
