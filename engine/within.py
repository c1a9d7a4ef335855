"""Which rows a PROGRESS round takes inside a cluster, without revealing answers.

The paper draws a cluster's quota uniformly among its unselected rows (its first open
question). ``selection.within: uncertainty`` ranks them instead, in two steps that cost
no answer:

1. *Diversity*: every cluster's rows are ordered once, before the first round, by
   greedy MMD prototypes over the run's features (the warm-up's selector,
   ``engine.warmup.cluster_order``, run on the progress clustering); the rank of a row
   in its cluster's order is its ``diversity`` rank. A cluster with quota q offers its
   ``candidates`` x q unselected rows earliest in that order: the prototypes not taken
   yet, spread over the cluster.
2. *Uncertainty*: the trainer answers each candidate's first question greedily, from
   the image and the question alone (the answer is never read), and reports the
   model's uncertainty on that answer: the mean negative log-probability of its own
   greedy tokens (``engine.llava.evaluate.answer_uncertainty``). Of a cluster's
   candidates, the q whose uncertainty rank lies nearest the ``band`` quantile are
   taken (0.5: the middle band; a candidate the model is sure of teaches little, one
   it is lost on is often noise or out of reach). Ties go to the earlier prototype.

``candidates`` mixes the two: 1 is pure diversity (the prototypes in order), a large
value pure uncertainty. Exploration rows stay uniform (``engine.progress.draw_round``).
"""

from __future__ import annotations

import numpy as np

from engine.progress import PoolClusters

# A run's prototype orders: <run>/diversity/part-*.parquet (id, rank) and this marker,
# written last, naming the parts and their rows.
DIVERSITY_FOLDER = "diversity"
DIVERSITY_MARKER = "diversity.json"


def diversity_layout(clusters: PoolClusters, rank: np.ndarray) -> np.ndarray:
    """Pool positions int64 (n,) sorted by (cluster, diversity rank): cluster c's rows in
    its prototype order are ``layout[clusters.offsets[c]:clusters.offsets[c + 1]]``.

    rank: int (n,) a row's place in its cluster's order (ties: the lower position).
    """
    rank = np.asarray(rank, np.int64)
    if rank.shape != clusters.labels.shape:
        raise ValueError(f"{rank.size} diversity ranks for a pool of {clusters.n} rows")
    return np.lexsort((np.arange(clusters.n), rank, clusters.labels)).astype(np.int64)


def candidate_positions(
    clusters: PoolClusters,
    layout: np.ndarray,
    selected: np.ndarray,
    quota: np.ndarray,
    per_pick: float,
) -> np.ndarray:
    """The rows offered to the trainer: per cluster c, the ceil(per_pick x quota[c])
    unselected rows earliest in its prototype order (all it has left, if fewer);
    int64 (m,) positions, in (cluster, diversity) order.

    layout: int64 (n,) from ``diversity_layout``; selected: bool (n,); quota: int (K,).
    """
    want = np.ceil(np.asarray(quota, np.float64) * per_pick).astype(np.int64)
    free = ~selected[layout]
    segment = clusters.sorted_labels  # the cluster of every place in layout
    # the place of each free row among its cluster's free rows
    seen = np.concatenate([[0], np.cumsum(free)])  # free rows before each place
    start = seen[clusters.offsets[:-1]]  # ... before each cluster's segment
    place = seen[:-1] - np.repeat(start, np.diff(clusters.offsets))
    return layout[free & (place < want[segment])]


def pick_in_band(
    labels: np.ndarray,
    uncertainty: np.ndarray,
    quota: np.ndarray,
    band: float,
) -> np.ndarray:
    """Indices int64 (ascending) into the candidates that a round takes: per cluster c,
    the quota[c] candidates whose uncertainty rank among c's candidates lies nearest the
    ``band`` quantile; unscored ones (NaN) last; ties to the earlier candidate.

    labels: int (m,) cluster of each candidate, candidates in (cluster, diversity) order
    (``candidate_positions``); uncertainty: float (m,); quota: int (K,); band in [0, 1].
    """
    labels = np.asarray(labels, np.int64)
    uncertainty = np.asarray(uncertainty, np.float64)
    m = labels.size
    if uncertainty.shape != (m,):
        raise ValueError(f"{uncertainty.size} uncertainties for {m} candidates")
    if not 0.0 <= band <= 1.0:
        raise ValueError(f"band must be a quantile in [0, 1], got {band}")
    scored = np.isfinite(uncertainty)
    # rank of each scored candidate within its cluster's scored ones, by uncertainty
    by_value = np.lexsort((np.arange(m), np.where(scored, uncertainty, np.inf), labels))
    counts = np.bincount(labels[scored], minlength=quota.size)
    first = np.searchsorted(labels[by_value], labels[by_value])
    rank = np.empty(m, np.float64)
    rank[by_value] = np.arange(m) - first
    n = counts[labels].astype(np.float64)
    quantile = np.where(n > 1, rank / np.maximum(n - 1, 1), 0.5)
    # rounded: 1/3 and 2/3 are equally far from 0.5, and the tie goes by diversity
    cost = np.where(scored, np.round(np.abs(quantile - band), 12), np.inf)
    order = np.lexsort((np.arange(m), cost, labels))
    seg = labels[order]
    place = np.arange(m) - np.searchsorted(seg, seg)
    return np.sort(order[place < np.asarray(quota, np.int64)[seg]])
