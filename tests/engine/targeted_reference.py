"""The selection of targeted selection as it was before pool rows (string ids, Python sets):
kept verbatim, only as the oracle that tests/engine/test_targeted.py holds the row path
to, pick for pick.

The original docstring follows.

Budgeted selection from a benchmark's neighbour lists (the selection half of targeted
concept-or-skill selection).

Every benchmark sample i has a ranked list of pool ids (``ids[i]``, best first, with
scores). A selection takes exactly ``budget`` distinct pool ids (or every id the lists
hold, when they hold fewer):

- ``round_robin``: in turns, each benchmark sample in order takes its next-best
  neighbour not yet selected, so every benchmark sample is served before any is served
  twice; ``quota`` caps what one sample may take (lifted, and reported, if every
  sample reaches it before the budget is spent).
- ``score``: score-weighted: every (sample, neighbour) pair in one ranking by score,
  best first, each new id taken in that order (a sample with closer neighbours takes
  more); the same ``quota`` rule applies.

Modes: ``concept`` and ``skill`` select from one space's lists. The hybrids the paper
found weaker, kept as baselines: ``sum`` and ``max`` fuse the two lists of a sample
into one ranking (``fuse``), ``split`` takes half the budget from the concept lists and
the rest from the skill lists (``split_share``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Aggregation = Literal["round_robin", "score"]
Mode = Literal["concept", "skill", "sum", "max", "split"]
MODES: tuple[str, ...] = ("auto", "concept", "skill", "sum", "max", "split")


@dataclass
class Selection:
    """What a selection took, in the order it took it.

    ids: the selected pool ids (distinct).
    sample: int64 (n,), the benchmark sample whose list each id came from.
    rank: int64 (n,), the id's position in that sample's list (0 = nearest).
    space: per id, the lists it came from ("concept", "skill" or "fused").
    quota_lifted: the quota stopped every sample before the budget and was lifted.
    """

    ids: list[str] = field(default_factory=list)
    sample: list[int] = field(default_factory=list)
    rank: list[int] = field(default_factory=list)
    space: list[str] = field(default_factory=list)
    quota_lifted: bool = False

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, pool_id: str, sample: int, rank: int, space: str) -> None:
        self.ids.append(pool_id)
        self.sample.append(sample)
        self.rank.append(rank)
        self.space.append(space)

    def per_sample(self, samples: int) -> np.ndarray:
        """int64 (samples,): how many ids each benchmark sample's list gave."""
        return np.bincount(np.asarray(self.sample, np.int64), minlength=samples)


def _take_turns(ids, budget, taken, out, space, quota) -> None:
    """Round-robin over the rows of ``ids`` (object (q, k)) until ``budget`` ids are out."""
    q, k = ids.shape
    pointer = np.zeros(q, np.int64)
    given = np.zeros(q, np.int64)
    active = list(range(q))
    while active and len(out) < budget:
        still = []
        for i in active:
            if len(out) >= budget:
                break
            row, j = ids[i], pointer[i]
            while j < k and (row[j] is None or row[j] in taken):
                j += 1
            if j < k:
                taken.add(row[j])
                out.add(row[j], i, int(j), space)
                given[i] += 1
                j += 1
            pointer[i] = j
            if j < k and (quota is None or given[i] < quota):
                still.append(i)
        active = still


def _take_by_score(ids, scores, budget, taken, out, space, quota) -> None:
    """Every (sample, rank) pair, best score first (ties: sample then rank), new ids only."""
    q, k = ids.shape
    flat_scores = np.where(np.equal(ids, None), -np.inf, scores).reshape(-1)
    order = np.argsort(-flat_scores, kind="stable")
    given = np.zeros(q, np.int64)
    for flat in order:
        if len(out) >= budget or not np.isfinite(flat_scores[flat]):
            break
        i, j = divmod(int(flat), k)
        pool_id = ids[i, j]
        if pool_id in taken or (quota is not None and given[i] >= quota):
            continue
        taken.add(pool_id)
        out.add(pool_id, i, j, space)
        given[i] += 1


def select_from_lists(
    ids: np.ndarray,
    budget: int,
    *,
    scores: np.ndarray | None = None,
    aggregation: Aggregation = "round_robin",
    quota: int | None = None,
    space: str = "concept",
    taken: Iterable[str] = (),
    into: Selection | None = None,
) -> Selection:
    """Up to ``budget`` new distinct ids from one set of neighbour lists.

    Args:
        ids: object (q, k) pool ids, each row best first; None marks a missing result.
        budget: how many ids the returned selection holds at most, in total (>= 0).
        scores: float32 (q, k), needed for ``aggregation="score"``.
        aggregation: ``round_robin`` (turns) or ``score`` (one ranking by score).
        quota: most ids one benchmark sample may give (None: no cap). If every sample
            is capped before the budget is spent, the cap is lifted for the rest and
            ``quota_lifted`` says so.
        space: the label recorded with each id.
        taken: ids already selected elsewhere (skipped, not counted).
        into: a selection to extend (its ids count towards ``budget`` and are skipped).
    Returns:
        The selection: exactly ``budget`` ids, or every distinct id the lists hold that
        was not taken, when that is fewer.
    """
    ids = np.asarray(ids, dtype=object)
    if ids.ndim != 2:
        raise ValueError(f"ids must be (q, k), got shape {ids.shape}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if quota is not None and quota < 1:
        raise ValueError(f"quota must be >= 1, got {quota}")
    out = into if into is not None else Selection()
    used = set(taken) | set(out.ids)
    if aggregation == "score":
        if scores is None:
            raise ValueError("score aggregation needs the scores")
        scores = np.asarray(scores, np.float64)
        _take_by_score(ids, scores, budget, used, out, space, quota)
        if quota is not None and len(out) < budget:
            before = len(out)
            _take_by_score(ids, scores, budget, used, out, space, None)
            out.quota_lifted = len(out) > before
    elif aggregation == "round_robin":
        _take_turns(ids, budget, used, out, space, quota)
        if quota is not None and len(out) < budget:
            before = len(out)
            _take_turns(ids, budget, used, out, space, None)
            out.quota_lifted = len(out) > before
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}: round_robin or score")
    return out


def standardise(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """float64 (q, k): scores minus the mean, over the std, of every real entry (a space's
    scale made comparable with another's); missing entries -inf."""
    valid = ~np.equal(ids, None) & np.isfinite(scores)
    real = scores[valid].astype(np.float64)
    mean, std = (real.mean(), real.std()) if real.size else (0.0, 1.0)
    out = (scores.astype(np.float64) - mean) / (std if std > 0 else 1.0)
    return np.where(valid, out, -np.inf)


def fuse(
    concept_ids: np.ndarray,
    concept_scores: np.ndarray,
    skill_ids: np.ndarray,
    skill_scores: np.ndarray,
    how: Literal["sum", "max"],
) -> tuple[np.ndarray, np.ndarray]:
    """One ranking per sample from its concept and skill lists (the hybrids).

    Each space's scores are standardised over the benchmark (``standardise``). A
    candidate is any id in either list; where it is missing from one list its score
    there is that row's last (lowest) standardised score, the best it could have had.
    ``sum`` ranks by z_c + z_s, ``max`` by max(z_c, z_s).

    Returns:
        ``(ids object (q, k_c + k_s), scores float64 (q, k_c + k_s))``, best first; rows
        with fewer candidates end in None / -inf.
    """
    zc, zs = standardise(concept_scores, concept_ids), standardise(skill_scores, skill_ids)
    q = len(concept_ids)
    width = concept_ids.shape[1] + skill_ids.shape[1]
    out_ids = np.full((q, width), None, dtype=object)
    out_scores = np.full((q, width), -np.inf)
    for i in range(q):
        c = {x: s for x, s in zip(concept_ids[i], zc[i], strict=True) if x is not None}
        s = {x: v for x, v in zip(skill_ids[i], zs[i], strict=True) if x is not None}
        floor_c = min(c.values(), default=0.0)
        floor_s = min(s.values(), default=0.0)
        cand = list(dict.fromkeys([*c, *s]))
        a = np.array([c.get(x, floor_c) for x in cand])
        b = np.array([s.get(x, floor_s) for x in cand])
        fused = a + b if how == "sum" else np.maximum(a, b)
        order = np.argsort(-fused, kind="stable")
        out_ids[i, : len(cand)] = np.array(cand, dtype=object)[order]
        out_scores[i, : len(cand)] = fused[order]
    return out_ids, out_scores


def select(
    mode: Mode,
    budget: int,
    lists: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    aggregation: Aggregation = "round_robin",
    quota: int | None = None,
    split_share: float = 0.5,
) -> Selection:
    """Exactly ``budget`` distinct ids (or all the lists hold) in ``mode``.

    Args:
        mode: concept | skill | sum | max | split (``auto`` is resolved by the caller).
        lists: ``{"concept": (ids (q, k), scores (q, k)), "skill": (...)}``; the spaces
            the mode reads must be there.
        split_share: ``split``: the concept lists' share of the budget (rounded up).
    """
    if mode in ("concept", "skill"):
        ids, scores = lists[mode]
        return select_from_lists(
            ids, budget, scores=scores, aggregation=aggregation, quota=quota, space=mode
        )
    if mode in ("sum", "max"):
        ids, scores = fuse(*lists["concept"], *lists["skill"], how=mode)
        return select_from_lists(
            ids, budget, scores=scores, aggregation=aggregation, quota=quota, space="fused"
        )
    if mode == "split":
        first = int(np.ceil(budget * split_share))
        ids, scores = lists["concept"]
        out = select_from_lists(
            ids, first, scores=scores, aggregation=aggregation, quota=quota, space="concept"
        )
        ids, scores = lists["skill"]
        out = select_from_lists(
            ids, budget, scores=scores, aggregation=aggregation, quota=quota, space="skill",
            into=out,
        )  # fmt: skip
        if len(out) < budget:  # the skill lists ran dry: the concept lists fill the rest
            ids, scores = lists["concept"]
            select_from_lists(
                ids, budget, scores=scores, aggregation=aggregation, space="concept", into=out
            )
        return out
    raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES[1:])}")
