"""PROGRESS maths: per-cluster relative progress, the selection round, the budget ledger.

Everything is integer pool positions in numpy arrays (the pool's i-th id is position
i), never lists of records: the reference code spends 92% of a round removing picked
records from a list of dicts (O(N*M), minutes at 665K); here a round at a million rows
and K=5000 costs milliseconds (``benchmarks/progress_round.py``).

A round, as the paper and its code do it, with the reference's two slips fixed:
    1. Δk per cluster from its probe rows' scores now and ``gap`` rounds ago
       (``engine.probes``: fixed probe sets, the same rows compared): accuracy rises,
       loss drops (the reference rewards a rising loss);
    2. among clusters with Δk > 0 and unselected rows left, p = softmax(Δk / τ);
       ``1 - explore`` of the round's picks are apportioned by p, capped by what each
       cluster has left, and the shortfall of a full cluster is spread over the others
       (the reference drops it, so its rounds come up short);
    3. the ``explore`` share, and whatever the positive clusters cannot take, is drawn
       uniformly from the unselected rows of the other clusters, then of any cluster;
    4. inside a cluster, uniform random among its unselected rows (the paper), or by
       the model's uncertainty among diverse candidates (``engine.within``).
A round never returns more than the budget left, never a row twice, and never fewer
rows than asked while the pool has them (tests/engine/test_progress.py, hypothesis).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from engine.errors import InputError

Metric = Literal["accuracy", "loss"]


def rows_of(value: float, pool: int, what: str) -> int:
    """A size given as a fraction (<= 1) of ``pool`` or as a count, in rows (>= 1).

    Raises:
        InputError: the size is no rows at all.
    """
    n = int(round(value * pool)) if value <= 1 else int(value)
    if n < 1:
        raise InputError(f"{what} {value} of a pool of {pool} rows is no rows; raise it")
    return n


def round_rows(budget: int, warmup: int, round_size: int) -> list[int]:
    """Rows of each round of a run: the warm-up, full rounds, then the budget's rest.

    Exact while the pool has the rows (the budget never exceeds it), so the cosine
    schedule's total steps are known before the first round.
    """
    rest = budget - warmup
    tail = [rest % round_size] if rest % round_size else []
    return [warmup] + [round_size] * (rest // round_size) + tail


def balanced_share(items: list, rank: int, world: int) -> tuple[list, int]:
    """Rank ``rank``'s share of ``items`` (every ``world``-th from ``rank``), topped up to
    ceil(n / world) with repeats from the start, and how many of it are its own.

    Every rank gets the same count, so that collective forwards (ZeRO-3 gathers each
    layer's weights from every rank) run equally often on each; the repeats' scores are
    dropped. An empty ``items`` gives every rank nothing.
    """
    own = items[rank::world]
    per = -(-len(items) // world)
    fill = [items[i % len(items)] for i in range(per - len(own))] if items else []
    return own + fill, len(own)


def progress_probabilities(delta: np.ndarray, eligible: np.ndarray, tau: float) -> np.ndarray:
    """p_k = softmax(Δk / τ) over clusters with Δk > 0 that are ``eligible``; float64 (K,).

    Zero elsewhere; all zero when no cluster qualifies. ``eligible``: bool (K,).
    """
    if tau <= 0:
        raise ValueError(f"temperature must be > 0, got {tau}")
    delta = np.asarray(delta, np.float64)
    positive = eligible & np.isfinite(delta) & (delta > 0)
    p = np.zeros(delta.shape, np.float64)
    if positive.any():
        z = delta[positive] / tau
        e = np.exp(z - z.max())
        p[positive] = e / e.sum()
    return p


def apportion(total: int, weights: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Split ``total`` into integer quotas int64 (K,) proportional to ``weights`` (K,).

    Largest remainders make the quotas sum exactly; a quota above its ``capacity`` (K,)
    is cut there and the excess goes to the others in proportion to their weights, until
    all is placed or every weighted cluster is full (then the sum falls short).
    """
    weights = np.asarray(weights, np.float64)
    capacity = np.asarray(capacity, np.int64)
    quota = np.zeros(weights.shape, np.int64)
    active = (weights > 0) & (capacity > 0)
    left = int(total)
    while left > 0 and active.any():
        w = np.where(active, weights, 0.0)
        share = left * w / w.sum()
        base = np.floor(share).astype(np.int64)
        extra = left - int(base.sum())
        if extra:
            # Ties go to the lower index (stable sort), so a seed gives one answer.
            order = np.argsort(-(share - base), kind="stable")[:extra]
            base[order] += 1
        base = np.minimum(base, capacity - quota)
        quota += base
        left = int(total) - int(quota.sum())
        active &= quota < capacity
    return quota


@dataclass(frozen=True)
class PoolClusters:
    """The pool's cluster labels with each cluster's rows grouped for fast draws.

    labels: int32 (n,) cluster of pool position i, in [0, k).
    order: int64 (n,) positions sorted by cluster; cluster c's rows are
        ``order[offsets[c]:offsets[c + 1]]``.
    sorted_labels: int32 (n,) ``labels[order]``: the cluster of each place in ``order``.
    """

    labels: np.ndarray
    k: int
    order: np.ndarray
    offsets: np.ndarray
    sorted_labels: np.ndarray

    @classmethod
    def from_labels(cls, labels: np.ndarray, k: int | None = None) -> PoolClusters:
        labels = np.asarray(labels, np.int32)
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-d, got shape {labels.shape}")
        if labels.size and labels.min() < 0:
            raise ValueError(f"cluster labels must be >= 0, got {labels.min()}")
        k = int(k if k is not None else (labels.max() + 1 if labels.size else 0))
        if labels.size and labels.max() >= k:
            raise ValueError(f"cluster label {labels.max()} >= k ({k})")
        counts = np.bincount(labels, minlength=k)
        offsets = np.zeros(k + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        order = np.argsort(labels, kind="stable")
        return cls(labels, k, order, offsets, np.repeat(np.arange(k, dtype=np.int32), counts))

    @property
    def n(self) -> int:
        return int(self.labels.size)

    def unselected_counts(self, selected: np.ndarray) -> np.ndarray:
        """int64 (K,) rows left per cluster, given ``selected`` bool (n,)."""
        taken = np.bincount(self.labels[selected], minlength=self.k)
        return (np.diff(self.offsets) - taken).astype(np.int64)

    def sample_where(self, mask: np.ndarray, take: np.ndarray, rng: np.random.Generator):
        """Per cluster c, min(take[c], its rows in ``mask``) of those rows, uniformly
        without replacement; int64 positions, ascending.

        mask: bool (n,) the rows that may be drawn; take: int (K,) rows wanted per cluster.
        One vectorised pass (``sample_segments``), not a draw per cluster: at K=5000 and
        a million rows a loop over the clusters took 50 ms of a round's draw, this 15-20.
        """
        in_order = mask[self.order]
        picked = sample_segments(self.sorted_labels[in_order], np.asarray(take), rng)
        return np.sort(self.order[in_order][picked])


def sample_segments(segments: np.ndarray, take: np.ndarray, rng: np.random.Generator):
    """Indices int64 (ascending) into ``segments`` that draw, for every segment s,
    min(take[s], size of s) of its places uniformly without replacement.

    segments: int (m,) non-decreasing segment numbers in [0, len(take)); take: int (K,).
    A segment that gives every place is taken whole. Elsewhere every place gets a
    uniform key and its segment keeps the take[s] smallest: a uniform subset. Only keys
    under a per-segment limit that holds take[s] of them with high probability (mean +
    2 sigma + 2) are sorted; a segment whose keys fall short of it sorts all of its
    keys, so the result is exact whatever the draw.
    """
    take = np.asarray(take, np.int64)
    sizes = np.bincount(segments, minlength=take.size)
    want = np.minimum(take, sizes)
    keys = rng.random(segments.size)
    whole = want == sizes
    part = (want > 0) & ~whole
    limit = np.where(whole, 2.0, 0.0)  # keys are below 1: a whole segment's all pass
    limit[part] = (want[part] + 2 * np.sqrt(want[part]) + 2) / sizes[part]
    candidate = keys < np.repeat(limit, sizes)  # segments are contiguous: no gather
    short = part & (np.bincount(segments[candidate], minlength=take.size) < want)
    if short.any():
        candidate |= short[segments]
    places = np.flatnonzero(candidate)
    drawn = part[segments[places]]
    # One sort of (segment, 32-bit key) as int64: segments are already in order.
    ranked = places[drawn]
    composite = (segments[ranked].astype(np.int64) << 32) | (keys[ranked] * 2**32).astype(np.int64)
    ranked = ranked[np.argsort(composite, kind="stable")]
    seg = segments[ranked]
    rank = np.arange(ranked.size) - np.searchsorted(seg, seg)
    return np.sort(np.concatenate([places[~drawn], ranked[rank < want[seg]]]))


@dataclass(frozen=True)
class RoundPlan:
    """How one round's picks split: ``quota`` int64 (K,) per progressing cluster, plus
    ``explore`` rows drawn uniformly outside them; ``probabilities`` float64 (K,)."""

    quota: np.ndarray
    explore: int
    probabilities: np.ndarray

    @property
    def total(self) -> int:
        return int(self.quota.sum()) + self.explore


def plan_round(
    delta: np.ndarray,
    remaining: np.ndarray,
    picks: int,
    tau: float,
    explore: float,
) -> RoundPlan:
    """Quotas for a round of ``picks`` rows (already capped to the budget left).

    delta: float64 (K,) Δk (NaN = unknown); remaining: int64 (K,) unselected rows per
    cluster; explore: share δ in [0, 1] drawn uniformly from the other clusters.
    The exploration count is ``picks - floor((1 - δ) * picks)`` plus whatever the
    progressing clusters cannot take; it is capped by the rows left anywhere.
    """
    if not 0.0 <= explore <= 1.0:
        raise ValueError(f"explore share must be in [0, 1], got {explore}")
    picks = min(int(picks), int(remaining.sum()))
    p = progress_probabilities(delta, remaining > 0, tau)
    guided = int(np.floor((1.0 - explore) * picks)) if p.any() else 0
    quota = apportion(guided, p, remaining)
    return RoundPlan(quota, picks - int(quota.sum()), p)


def draw_round(
    plan: RoundPlan,
    clusters: PoolClusters,
    selected: np.ndarray,
    rng: np.random.Generator,
    quota_rows: np.ndarray | None = None,
) -> np.ndarray:
    """Pool positions int64 (plan.total,) for ``plan``: distinct, all unselected.

    Inside a cluster the draw is uniform, unless ``quota_rows`` int64 gives the quota's
    rows already chosen (``engine.within``: plan.quota[c] unselected rows of each c);
    exploration is uniform over the unselected rows of clusters with no quota, then (if
    those run out) over any unselected row. ``selected`` bool (n,) is not modified.
    """
    if quota_rows is None:
        taken = clusters.sample_where(~selected, plan.quota, rng)
    else:
        taken = np.asarray(quota_rows, np.int64)
        got = np.bincount(clusters.labels[taken], minlength=clusters.k)
        if (got != plan.quota).any() or selected[taken].any():
            raise ValueError("the quota's rows do not fill the plan's quotas with free rows")
    if plan.explore:
        outside = plan.quota[clusters.labels] == 0
        free = np.flatnonzero(~selected & outside)
        n = min(plan.explore, free.size)
        explored = rng.choice(free, size=n, replace=False)
        if n < plan.explore:
            blocked = selected.copy()
            blocked[taken] = True
            blocked[explored] = True
            rest = np.flatnonzero(~blocked)
            explored = np.concatenate(
                [explored, rng.choice(rest, size=plan.explore - n, replace=False)]
            )
        taken = np.concatenate([taken, explored])
    return taken.astype(np.int64)


class BudgetExceeded(ValueError):
    """A selection would spend more than the budget or pick a row twice."""


class Ledger:
    """The annotation budget: which pool positions are selected, in what round.

    selected: bool (n,); round_of: int32 (n,) the round that selected a row, -1 = not;
    answered: bool (n,) rows whose answers were read from the pool (``reveal``).
    The spend is the count of selected rows; ``take`` refuses anything that would break
    the budget, ``reveal`` refuses an answer of a row that is not selected. ``revealed``
    counts what was read, apart from what was picked: a run whose reveals and picks
    differ lost or leaked answers.
    """

    def __init__(self, n: int, budget: int):
        if not 0 < budget <= n:
            raise ValueError(f"budget must be in 1..{n} (the pool), got {budget}")
        self.n, self.budget = int(n), int(budget)
        self.round_of = np.full(self.n, -1, np.int32)
        self.answered = np.zeros(self.n, bool)

    @property
    def revealed(self) -> int:
        return int(np.count_nonzero(self.answered))

    def reveal(self, positions: np.ndarray) -> None:
        """Record that the answers of ``positions`` int (m,) were read (again: no-op)."""
        positions = np.asarray(positions, np.int64)
        unpaid = positions[~self.selected[positions]]
        if unpaid.size:
            raise BudgetExceeded(
                f"answers of {unpaid.size} rows that are not selected were asked "
                f"(e.g. position {int(unpaid[0])}): they are not paid for by the budget"
            )
        self.answered[positions] = True

    @property
    def selected(self) -> np.ndarray:
        return self.round_of >= 0

    @property
    def spent(self) -> int:
        return int(np.count_nonzero(self.round_of >= 0))

    @property
    def left(self) -> int:
        return self.budget - self.spent

    def take(self, positions: np.ndarray, round_index: int) -> None:
        """Mark ``positions`` int (m,) selected in ``round_index``; all or nothing."""
        positions = np.asarray(positions, np.int64)
        if positions.size > self.left:
            raise BudgetExceeded(
                f"round {round_index} picks {positions.size} rows but only {self.left} "
                f"of the budget of {self.budget} are left"
            )
        if positions.size and (positions.min() < 0 or positions.max() >= self.n):
            raise BudgetExceeded(f"positions outside the pool of {self.n} rows")
        if np.unique(positions).size != positions.size:
            raise BudgetExceeded(f"round {round_index} picks a row twice")
        again = positions[self.round_of[positions] >= 0]
        if again.size:
            raise BudgetExceeded(
                f"round {round_index} picks {again.size} rows already selected "
                f"(e.g. position {int(again[0])} in round {int(self.round_of[again[0]])})"
            )
        self.round_of[positions] = round_index

    def rows_of_round(self, round_index: int) -> np.ndarray:
        """int64 positions selected in ``round_index``, ascending."""
        return np.flatnonzero(self.round_of == round_index)

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to checkpoint (``np.savez``; no pickle)."""
        return {
            "round_of": self.round_of,
            "answered": self.answered,
            "budget": np.array([self.budget], np.int64),
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> Ledger:
        round_of = np.asarray(state["round_of"], np.int32)
        ledger = cls(round_of.size, int(state["budget"][0]))
        if int(np.count_nonzero(round_of >= 0)) > ledger.budget:
            raise ValueError("checkpoint spends more than its budget: refusing it")
        ledger.round_of = round_of.copy()
        if "answered" in state:  # checkpoints before the counter: as many as picked
            ledger.answered = np.asarray(state["answered"], bool).copy()
        else:
            ledger.answered = ledger.selected.copy()
        return ledger


def ledger_plan(
    ledger: Ledger,
    clusters: PoolClusters,
    delta: np.ndarray,
    picks: int,
    tau: float,
    explore: float,
) -> RoundPlan:
    """``plan_round`` for the rows ``ledger`` has left: the next round's quotas, which
    ``select_round`` draws (deterministic: no generator is used)."""
    remaining = clusters.unselected_counts(ledger.selected)
    return plan_round(delta, remaining, min(picks, ledger.left), tau, explore)


def select_round(
    ledger: Ledger,
    clusters: PoolClusters,
    delta: np.ndarray,
    picks: int,
    tau: float,
    explore: float,
    rng: np.random.Generator,
    round_index: int,
    choose=None,
) -> tuple[np.ndarray, RoundPlan]:
    """Plan, draw and record one round: (positions int64 (m,), plan), m = min(picks,
    budget left, rows left). ``choose(plan, selected)``, when given, returns the quota's
    rows (``draw_round``'s ``quota_rows``); else they are drawn uniformly."""
    selected = ledger.selected
    plan = ledger_plan(ledger, clusters, delta, picks, tau, explore)
    quota_rows = None if choose is None else choose(plan, selected)
    positions = draw_round(plan, clusters, selected, rng, quota_rows)
    ledger.take(positions, round_index)
    return positions, plan
