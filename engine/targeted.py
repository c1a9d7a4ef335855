"""Budgeted selection from a benchmark's neighbour lists (the selection half of targeted
concept-or-skill selection).

Every benchmark sample i has a ranked list of pool rows (``rows[i]``: int64 global row
positions, best first, -1 where a list ends early, with scores). A selection takes
exactly ``budget`` distinct rows (or every row the lists hold, when they hold fewer):

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
the rest from the skill lists (``split_share``). ``sample`` (past the paper) decides the
space per benchmark sample instead of per benchmark: each sample's list comes from the
space its own cross-ranks favour (``engine.crossrank.sample_spaces``), so a benchmark
that mixes concept-led and skill-led questions is served by both.

Ties: the order of equal-scored entries within a list is the index's, which on a real
pool stored in source order would hand the early sources every tied pick (skill
descriptions repeat word for word, so ties are common). ``select`` given a ``seed``
first permutes every list's entries at random within each run of tied scores
(``shuffle_ties``, one seeded stream per space): the same seed gives the same picks,
another seed may change only which of tied entries are taken.

Rows, not string ids, and a boolean mask of what is taken: a 200k selection from 10k
lists of depth 1000 holds a few flat arrays, never a Python object per candidate.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from engine.ranked_lists import shuffle_ties

Aggregation = Literal["round_robin", "score"]
Mode = Literal["concept", "skill", "sum", "max", "split", "sample"]
MODES: tuple[str, ...] = ("auto", "concept", "skill", "sum", "max", "split", "sample")


SPACES: tuple[str, ...] = ("concept", "skill", "fused", "random fill")


class Selection:
    """What a selection took, in the order it took it.

    rows: int64 (n,), the selected pool rows (distinct).
    sample: int64 (n,), the benchmark sample whose list each row came from (-1: filled).
    rank: int64 (n,), the row's position in that sample's list (0 = nearest; -1: filled),
        after ``shuffle_ties`` where the selection was seeded.
    space: per row, the lists it came from (``space_codes`` index ``SPACES``).
    quota_lifted: the quota stopped every sample before the budget and was lifted.
    """

    def __init__(self) -> None:
        self._n = 0
        self._cols = np.zeros((4, 1024), np.int64)  # rows, sample, rank, space code
        self.quota_lifted = False

    def __len__(self) -> int:
        return self._n

    def add(self, row: int, sample: int, rank: int, space: str) -> None:
        if self._n == self._cols.shape[1]:
            self._cols = np.concatenate([self._cols, np.zeros_like(self._cols)], axis=1)
        self._cols[:, self._n] = (row, sample, rank, SPACES.index(space))
        self._n += 1

    def extend(self, rows: np.ndarray, space: str) -> None:
        """Add ``rows`` (int64 (m,)) that came from no list (sample and rank -1)."""
        m = len(rows)
        while self._n + m > self._cols.shape[1]:
            self._cols = np.concatenate([self._cols, np.zeros_like(self._cols)], axis=1)
        block = self._cols[:, self._n : self._n + m]
        block[0], block[1], block[2], block[3] = rows, -1, -1, SPACES.index(space)
        self._n += m

    @property
    def rows(self) -> np.ndarray:
        return self._cols[0, : self._n]

    @property
    def sample(self) -> np.ndarray:
        return self._cols[1, : self._n]

    @property
    def rank(self) -> np.ndarray:
        return self._cols[2, : self._n]

    @property
    def space_codes(self) -> np.ndarray:
        return self._cols[3, : self._n]

    @property
    def space(self) -> list[str]:
        return [SPACES[c] for c in self.space_codes]

    def space_counts(self) -> dict[str, int]:
        """Rows taken from each space's lists (only the spaces that gave any)."""
        counts = np.bincount(self.space_codes, minlength=len(SPACES))
        return {SPACES[c]: int(n) for c, n in enumerate(counts) if n}

    def relabel(self, space_of_sample: np.ndarray) -> None:
        """Record each listed row's space as its sample's (``space_of_sample`` str (q,));
        filled rows keep theirs."""
        listed = self.sample >= 0
        codes = np.array([SPACES.index(x) for x in space_of_sample], np.int64)
        self._cols[3, : self._n][listed] = codes[self.sample[listed]]

    def per_sample(self, samples: int) -> np.ndarray:
        """int64 (samples,): how many rows each benchmark sample's list gave."""
        return np.bincount(self.sample[self.sample >= 0], minlength=samples)


def _take_turns(ids, budget, taken, out, space, quota) -> None:
    """Round-robin over the rows of ``ids`` (int64 (q, k)) until ``budget`` rows are out."""
    q, k = ids.shape
    pointer = np.zeros(q, np.int64)
    given = np.zeros(q, np.int64)
    active = list(range(q))
    mask = taken
    while active and len(out) < budget:
        still = []
        for i in active:
            if len(out) >= budget:
                break
            row, j = ids[i], int(pointer[i])
            while j < k and (row[j] < 0 or mask[row[j]]):
                j += 1
            if j < k:
                mask[row[j]] = True
                out.add(int(row[j]), i, j, space)
                given[i] += 1
                j += 1
            pointer[i] = j
            if j < k and (quota is None or given[i] < quota):
                still.append(i)
        active = still


def _take_by_score(ids, scores, budget, taken, out, space, quota) -> None:
    """Every (sample, rank) pair, best score first (ties: sample then rank), new rows only."""
    q, k = ids.shape
    flat_scores = np.where(ids < 0, -np.inf, scores).reshape(-1)
    order = np.argsort(-flat_scores, kind="stable")
    real = int(np.isfinite(flat_scores).sum())  # -inf sort last: stop where they start
    given = np.zeros(q, np.int64)
    mask, flat_ids = taken, ids.reshape(-1)
    for flat in order[:real]:
        if len(out) >= budget:
            break
        row = flat_ids[flat]
        i = int(flat) // k
        if mask[row] or (quota is not None and given[i] >= quota):
            continue
        mask[row] = True
        out.add(int(row), i, int(flat) - i * k, space)
        given[i] += 1


def select_from_lists(
    ids: np.ndarray,
    budget: int,
    *,
    scores: np.ndarray | None = None,
    aggregation: Aggregation = "round_robin",
    quota: int | None = None,
    space: str = "concept",
    taken: np.ndarray | None = None,
    into: Selection | None = None,
) -> Selection:
    """Up to ``budget`` new distinct rows from one set of neighbour lists.

    Args:
        ids: int64 (q, k) pool rows, each row best first; -1 marks a missing result.
        budget: how many rows the returned selection holds at most, in total (>= 0).
        scores: float32 (q, k), needed for ``aggregation="score"``.
        aggregation: ``round_robin`` (turns) or ``score`` (one ranking by score).
        quota: most rows one benchmark sample may give (None: no cap). If every sample
            is capped before the budget is spent, the cap is lifted for the rest and
            ``quota_lifted`` says so.
        space: the label recorded with each row.
        taken: int64 (m,), rows already selected elsewhere (skipped, not counted).
        into: a selection to extend (its rows count towards ``budget`` and are skipped).
    Returns:
        The selection: exactly ``budget`` rows, or every distinct row the lists hold that
        was not taken, when that is fewer.
    """
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"ids must be (q, k), got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"ids must be integer pool rows (-1 = missing), got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if quota is not None and quota < 1:
        raise ValueError(f"quota must be >= 1, got {quota}")
    out = into if into is not None else Selection()
    taken = np.zeros(0, np.int64) if taken is None else np.asarray(taken, np.int64)
    # One flag per pool row up to the largest row in play: 1 MB at a million rows.
    used = np.zeros(1 + max(ids.max(initial=-1), taken.max(initial=-1), out.rows.max(initial=-1)),
                    bool)  # fmt: skip
    used[taken] = True
    used[out.rows] = True
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


def fill_at_random(chosen: Selection, pool: int, budget: int, seed: int) -> int:
    """Top ``chosen`` up to ``budget`` rows with rows drawn uniformly without replacement
    (seeded) from the pool rows ``[0, pool)`` it does not hold; they are recorded with
    sample and rank -1 and space ``random fill``. Returns how many were added."""
    need = budget - len(chosen)
    if need <= 0:
        return 0
    free = np.ones(pool, bool)
    free[chosen.rows] = False
    rows = np.flatnonzero(free)
    if need > len(rows):
        raise ValueError(f"budget {budget} is more than the pool's {pool} rows")
    chosen.extend(np.random.default_rng(seed).choice(rows, need, replace=False), "random fill")
    return need


def standardise(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """float64 (q, k): scores minus the mean, over the std, of every real entry (a space's
    scale made comparable with another's); missing entries -inf."""
    valid = (np.asarray(ids) >= 0) & np.isfinite(scores)
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
    candidate is any row in either list; where it is missing from one list its score
    there is that row's last (lowest) standardised score, the best it could have had.
    ``sum`` ranks by z_c + z_s, ``max`` by max(z_c, z_s).

    Returns:
        ``(rows int64 (q, k_c + k_s), scores float64 (q, k_c + k_s))``, best first; lists
        with fewer candidates end in -1 / -inf.
    """
    zc, zs = standardise(concept_scores, concept_ids), standardise(skill_scores, skill_ids)
    q = len(concept_ids)
    width = concept_ids.shape[1] + skill_ids.shape[1]
    out_ids = np.full((q, width), -1, dtype=np.int64)
    out_scores = np.full((q, width), -np.inf)
    for i in range(q):
        c = {x: s for x, s in zip(concept_ids[i].tolist(), zc[i], strict=True) if x >= 0}
        s = {x: v for x, v in zip(skill_ids[i].tolist(), zs[i], strict=True) if x >= 0}
        floor_c = min(c.values(), default=0.0)
        floor_s = min(s.values(), default=0.0)
        cand = list(dict.fromkeys([*c, *s]))
        a = np.array([c.get(x, floor_c) for x in cand])
        b = np.array([s.get(x, floor_s) for x in cand])
        fused = a + b if how == "sum" else np.maximum(a, b)
        order = np.argsort(-fused, kind="stable")
        out_ids[i, : len(cand)] = np.array(cand, dtype=np.int64)[order]
        out_scores[i, : len(cand)] = fused[order]
    return out_ids, out_scores


def per_sample_lists(
    lists: dict[str, tuple[np.ndarray, np.ndarray]], sample_concept: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's list from its own space: ``(rows int64 (q, w), scores float64 (q, w))``,
    w the wider list's width, -1 / -inf padded. Scores are standardised per space over
    the benchmark (``standardise``), so the ``score`` aggregation compares like with like.

    sample_concept: bool (q,), True: the concept list, False: the skill list.
    """
    (ci, cs), (si, ss) = lists["concept"], lists["skill"]
    zc, zs = standardise(cs, ci), standardise(ss, si)
    concept = np.asarray(sample_concept, bool)
    width = max(ci.shape[1], si.shape[1])
    ids = np.full((len(concept), width), -1, np.int64)
    scores = np.full((len(concept), width), -np.inf)
    ids[concept, : ci.shape[1]], scores[concept, : ci.shape[1]] = ci[concept], zc[concept]
    ids[~concept, : si.shape[1]], scores[~concept, : si.shape[1]] = si[~concept], zs[~concept]
    return ids, scores


# Each space's tie-breaking stream: np.random.default_rng([seed, SPACE_STREAM[space]]).
SPACE_STREAM = {"concept": 0, "skill": 1, "fused": 2}


def _shuffled(ids, scores, seed: int, space: str):
    return shuffle_ties(ids, scores, np.random.default_rng([seed, SPACE_STREAM[space]]))


def select(
    mode: Mode,
    budget: int,
    lists: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    aggregation: Aggregation = "round_robin",
    quota: int | None = None,
    split_share: float = 0.5,
    seed: int | None = None,
    sample_concept: np.ndarray | None = None,
) -> Selection:
    """Exactly ``budget`` distinct rows (or all the lists hold) in ``mode``.

    Args:
        mode: concept | skill | sum | max | split (``auto`` is resolved by the caller).
        lists: ``{"concept": (rows int64 (q, k), scores (q, k)), "skill": (...)}``; the spaces
            the mode reads must be there.
        split_share: ``split``: the concept lists' share of the budget (rounded up).
        sample_concept: ``sample``: bool (q,), True where a sample takes its concept list.
        seed: breaks ties among equal-scored entries at random (``shuffle_ties``; a
            stream per space, and one for the fused lists of ``sum`` / ``max``), so that
            storage order does not decide them. None keeps the lists' own order: for
            lists whose ties are already broken, and for comparisons with code that
            took the index's order.
    """
    if seed is not None:
        reads = [mode] if mode in ("concept", "skill") else ["concept", "skill"]
        lists = {**lists, **{s: _shuffled(*lists[s], seed, s) for s in reads if s in lists}}
    if mode in ("concept", "skill"):
        ids, scores = lists[mode]
        return select_from_lists(
            ids, budget, scores=scores, aggregation=aggregation, quota=quota, space=mode
        )
    if mode in ("sum", "max"):
        ids, scores = fuse(*lists["concept"], *lists["skill"], how=mode)
        if seed is not None:  # fused scores tie too (a candidate at both lists' floors)
            ids, scores = _shuffled(ids, scores, seed, "fused")
        return select_from_lists(
            ids, budget, scores=scores, aggregation=aggregation, quota=quota, space="fused"
        )
    if mode == "sample":
        if sample_concept is None:
            raise ValueError("mode sample needs each sample's space (sample_concept)")
        ids, scores = per_sample_lists(lists, sample_concept)
        out = select_from_lists(
            ids, budget, scores=scores, aggregation=aggregation, quota=quota, space="concept"
        )
        out.relabel(np.where(np.asarray(sample_concept, bool), "concept", "skill"))
        return out
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
