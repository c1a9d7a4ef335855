"""Ranked neighbour lists: where a row sits in a list, its competition rank, and ties.

A list is one query's neighbours, best first: ids int64 (q, k) (-1 marks a missing
result; string ids with None also work where said) and scores float (q, k) (-inf for a
missing result). Two consumers share these: the cross-ranks (``engine.crossrank``),
which rank one space's top rows within the other space's list, and targeted selection
(``engine.targeted``), which takes rows in list order and must not let storage order
break ties. Everything is vectorised over all lists at once: a benchmark of 10k samples
with lists of 1,000 is 10M entries, where a Python loop per list is what cannot be
afforded.
"""

from __future__ import annotations

import numpy as np

TIE_TOL = 1e-6


def absent(ids: np.ndarray) -> np.ndarray:
    """bool, ``ids``' shape: no result here (row -1, or None in string ids)."""
    ids = np.asarray(ids)
    return np.equal(ids, None) if ids.dtype == object else ids < 0


def _valid(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """bool (q, k): entries that hold a result (a row, a finite score)."""
    return ~absent(ids) & np.isfinite(scores)


def searchsorted_groups(
    group: np.ndarray, a: np.ndarray, at_group: np.ndarray, v: np.ndarray, side: str = "left"
) -> np.ndarray:
    """``np.searchsorted`` of each ``v[j]`` within the group ``at_group[j]`` of ``a``, for
    all j in one call.

    NumPy has no batched searchsorted, and a loop per list is what 10k queries cannot
    afford. Each value is replaced by its index among the distinct values, so
    ``group * width + index`` is one sorted int64 key over all the groups and one
    ``np.searchsorted`` answers every query exactly (no float offsets to lose bits).

    Args:
        group: int64 (m,), non-decreasing: each group's entries are contiguous.
        a: float (m,), ascending within each group (±inf allowed, no NaN).
        at_group: int64 (n,), the group each value is searched in.
        v: float (n,), the values.
        side: "left" (before entries == v) or "right" (after them).
    Returns:
        int64 (n,): positions in ``a`` (global): the group's first entry not before
        ``v[j]``, or the next group's first entry (``m`` after the last group).
    """
    a = np.asarray(a, np.float64)
    distinct = np.unique(a)
    width = len(distinct) + 1  # > every index searchsorted can give: groups never overlap
    keys = np.asarray(group, np.int64) * width + np.searchsorted(distinct, a)
    at = np.searchsorted(distinct, np.asarray(v, np.float64), side=side)
    return np.searchsorted(keys, np.asarray(at_group, np.int64) * width + at, side="left")


def _codes(ids: np.ndarray, valid: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """int64, ``ids``' shape: each entry's index in the sorted ``wanted``, -1 if it is
    none of them (or not valid). Pool rows no larger than a few times the entries go
    through a lookup table (one pass); other ids (strings, a huge pool) are searched."""
    if ids.dtype.kind in "iu" and wanted.dtype.kind in "iu" and wanted[0] >= 0:
        top = int(max(ids.max(initial=0), wanted[-1]))
        if top < 4 * max(ids.size, 1 << 16):
            table = np.full(top + 1, -1, np.int64)
            table[wanted] = np.arange(len(wanted))
            return np.where(valid, table[np.maximum(ids, 0)], -1)
    filled = np.where(valid, ids, wanted[0])  # None would not compare; masked out below
    code = np.minimum(np.searchsorted(wanted, filled), len(wanted) - 1)
    return np.where(valid & (wanted[code] == filled), code, -1)


def _positions(ids: np.ndarray, valid: np.ndarray, row: np.ndarray, target: np.ndarray):
    """Where ``target[j]`` sits in the list ``ids[row[j]]``: int64 (n,), -1 if absent.

    A join through the (few) distinct targets: every list entry is looked up among
    them, and only the entries that match are sorted, so a (q, k) of 10M entries is
    scanned once, not sorted, and no (n, k) comparison is built (a top group can hold
    hundreds of tied rows). A row listed twice is found at its first place, as
    ``rank_within`` always did.
    """
    out = np.full(len(target), -1, np.int64)
    present = ~absent(target)
    wanted = np.unique(target[present])
    if wanted.size == 0 or ids.size == 0:
        return out
    code = _codes(ids, valid, wanted)
    r, c = np.nonzero(code >= 0)
    have = r.astype(np.int64) * len(wanted) + code[r, c]
    order = np.lexsort((c, have))  # equal keys: the first place first
    have, c = have[order], c[order]
    want = np.asarray(row, np.int64)[present] * len(wanted) + np.searchsorted(
        wanted, target[present]
    )
    if len(have):
        at = np.minimum(np.searchsorted(have, want), len(have) - 1)
        hit = have[at] == want
        out[np.flatnonzero(present)[hit]] = c[at[hit]]
    return out


def _better(desc: np.ndarray, row: np.ndarray, col: np.ndarray, tol: float) -> np.ndarray:
    """int64 (n,): entries of the list ``desc[row[j]]`` scoring more than
    ``desc[row[j], col[j]] + tol``.

    ``desc``: float64 (q, k), each row non-increasing (-inf tail). In a sorted list
    those entries are a prefix ending at the start of the entry's stretch of gaps <=
    tol; a stretch whose scores span no more than tol (exact ties, the common case)
    is that start exactly, and only the entries of wider stretches are searched.
    """
    q, k = desc.shape
    flat = desc.ravel()
    pos = np.asarray(row, np.int64) * k + np.asarray(col, np.int64)
    gap = np.ones(flat.size, bool)
    gap[1:] = flat[:-1] > flat[1:] + tol
    gap[::k] = True  # every list starts a stretch
    starts = np.flatnonzero(gap)
    ends = np.r_[starts[1:], flat.size]  # one past each stretch's last entry
    sid = np.searchsorted(starts, pos, side="right") - 1
    out = starts[sid]
    search = flat[out] > flat[ends[sid] - 1] + tol  # a stretch wider than tol
    if search.any():
        wide = np.unique(sid[search])
        size = ends[wide] - starts[wide]
        group = np.repeat(np.arange(len(wide)), size)
        inside = (
            starts[wide][group] + np.arange(size.sum()) - np.repeat(np.cumsum(size) - size, size)
        )
        # The first entry of the stretch not better than the member: at or before it.
        at = searchsorted_groups(group, -flat[inside], np.searchsorted(wide, sid[search]),
                                 -(flat[pos[search]] + tol), "left")  # fmt: skip
        out[search] = inside[at]
    return out - np.asarray(row, np.int64) * k


def ranks_of(row, target, ids, scores, tol):
    """``rank_within`` for targets in any rows (int64 rank, bool censored (n,), int64
    depth (q,)): the one definition of a rank that both ``rank_within`` and the tie
    groups of ``cross_ranks`` use."""
    ids, target = np.asarray(ids), np.asarray(target)
    scores = np.asarray(scores, dtype=np.float64)
    if ids.ndim != 2 or ids.shape != scores.shape:
        raise ValueError(f"ids {ids.shape} and scores {scores.shape} must be the same (q, k)")
    valid = _valid(ids, scores)
    depth = valid.sum(axis=1).astype(np.int64)
    row = np.asarray(row, np.int64)
    pos = _positions(ids, valid, row, target)
    found = pos >= 0
    rank = depth[row] + 1
    if found.any():
        masked = np.where(valid, scores, -np.inf)
        own = masked[row[found], pos[found]]
        if (masked[:, 1:] > masked[:, :-1]).any():  # not best first: compare with every entry
            better = (masked[row[found]] > (own + tol)[:, None]).sum(axis=1)
        else:
            better = _better(masked, row[found], pos[found], tol)
        rank[found] = 1 + better
    return rank, ~found, depth


def rank_within(
    target: np.ndarray, ids: np.ndarray, scores: np.ndarray, tol: float = TIE_TOL
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The competition rank of ``target[i]`` within the ranked list ``ids[i]``.

    Args:
        target: int64 (q,), one pool row per query (-1: nothing to rank); or string ids
            (object, None) with ``ids`` of strings.
        ids: int64 (q, k), each row best first; -1 marks a missing result (tail).
        scores: float32 (q, k), matching scores (-inf for missing results).
        tol: scores within ``tol`` of the target's count as tied with it.
    Returns:
        ``(rank int64 (q,), censored bool (q,), depth int64 (q,))``: rank = 1 + the
        entries scoring more than the target's score + tol; where the target is not in
        the list (or is None) rank = depth + 1 and censored is True.
    """
    ids = np.asarray(ids)
    return ranks_of(np.arange(len(ids)), target, ids, scores, tol)


def top_group(ids: np.ndarray, scores: np.ndarray, tol: float = TIE_TOL) -> np.ndarray:
    """bool (q, k): the entries within ``tol`` of their list's best score, wherever
    the index put them (the tied "top-1" of each list)."""
    ids = np.asarray(ids)
    scores = np.asarray(scores, np.float64)
    valid = _valid(ids, scores)
    masked = np.where(valid, scores, -np.inf)
    best = masked.max(axis=1, initial=-np.inf)
    return valid & ~(best[:, None] > masked + tol)  # tied as in rank_within


def _run_starts(desc: np.ndarray, tol: float) -> np.ndarray:
    """bool (q, k): where each run of tied scores begins in the rows of ``desc``
    (float64, each row non-increasing, -inf tail).

    A run is anchored at its first entry a (every later x with not s[a] > s[x] + tol,
    the tie of ``rank_within``), not chained entry to entry: in a deep list
    consecutive distinct scores can be closer than ``tol``, and a chain would merge
    far-apart scores into one "tie". A gap wider than ``tol`` always starts a run; a
    stretch of narrower gaps spanning no more than ``tol`` is one run (exact ties, the
    common case); only inside wider stretches are the starts followed along the chain
    a -> the first entry below a's tie, for all of them at once by pointer doubling
    (log2 of the longest chain passes).
    """
    q, k = desc.shape
    flat = desc.ravel()
    lifted = flat + tol
    starts = np.ones(flat.size, bool)
    starts[1:] = flat[:-1] > lifted[1:]
    starts[::k] = True  # every list starts a run
    first = np.flatnonzero(starts)
    size = np.diff(np.r_[first, flat.size])
    wide = np.flatnonzero(flat[first] > lifted[first + size - 1])
    if len(wide):
        size = size[wide]
        group = np.repeat(np.arange(len(wide)), size)
        offset = np.arange(size.sum()) - np.repeat(np.cumsum(size) - size, size)
        inside = first[wide][group] + offset
        # jump[j]: the first entry of j's stretch below j's tie (the next one's first,
        # or the sentinel m, when there is none): where a run anchored at j ends.
        m = len(inside)
        jump = np.append(searchsorted_groups(group, -lifted[inside], group, -flat[inside],
                                             "right"), m)  # fmt: skip
        mark = np.append(offset == 0, False)
        while True:  # mark: every entry reached from a stretch's first in < 2^t steps
            to = jump[np.flatnonzero(mark)]
            new = to[(to < m) & ~mark[to]]
            if not new.size:  # closed under the jump: every anchor is marked
                break
            mark[new] = True
            jump = jump[jump]
        starts[inside] = mark[:m]
    return starts.reshape(q, k)


# Entries ``shuffle_ties`` works on at once: its temporaries (a few 8-byte arrays of this
# length) stay near 0.2 GB however deep the lists (max_candidates is 16M entries).
SHUFFLE_CHUNK = 1 << 22


def _shuffle_block(ids, scores, valid, rng, tol) -> None:
    """``shuffle_ties`` in place on a block of whole lists (contiguous (b, k) arrays)."""
    desc = np.where(valid, scores.astype(np.float64), -np.inf)
    if (desc[:, 1:] > desc[:, :-1]).any():
        raise ValueError("every list must be best first (scores non-increasing)")
    run = np.cumsum(_run_starts(desc, tol).ravel())
    real = valid.ravel()
    tied = np.flatnonzero(real & (np.bincount(run, weights=real)[run] > 1))
    if not tied.size:
        return
    # Sorting by run number + a key in [0, 1) keeps the runs in place and orders each
    # at random (one float argsort: ~10x faster than lexsort of the two keys). Only
    # tied entries draw keys.
    dense = np.cumsum(np.r_[True, run[tied][1:] != run[tied][:-1]])
    order = tied[np.argsort(dense + rng.random(tied.size))]
    for a in (ids, scores):
        flat = a.reshape(-1)
        flat[tied] = flat[order]


def shuffle_ties(
    ids: np.ndarray, scores: np.ndarray, rng: np.random.Generator, tol: float = TIE_TOL
) -> tuple[np.ndarray, np.ndarray]:
    """The lists with the entries of every run of tied scores in random order.

    Why: which of several equal-scored rows the index lists first is an accident of
    storage order, and round-robin and score order would take that one first. A run is
    consecutive entries whose scores are within ``tol`` of the run's first (anchored,
    ``_run_starts``); runs keep their places, so a list stays best first.

    Args:
        ids: int64 (q, k) pool rows, each row best first; -1 marks a missing result.
        scores: float (q, k), non-increasing over each row's real entries (-inf missing).
        rng: the random stream (a seeded one makes the result reproducible).
        tol: the tie tolerance (``engine.crossrank.TIE_TOL``, as the cross-ranks).
    Returns:
        ``(ids int64 (q, k), scores (q, k))``, new arrays in the input dtypes: each row's
        (id, score) pairs permuted within runs; missing entries (-1 or a non-finite
        score) after every real one, in their own order. A list without ties is
        returned as it was.
    Raises:
        ValueError: not (q, k) arrays of one shape, or a list whose real scores increase.
    """
    ids, scores = np.asarray(ids), np.asarray(scores)
    if ids.ndim != 2 or ids.shape != scores.shape:
        raise ValueError(f"ids {ids.shape} and scores {scores.shape} must be the same (q, k)")
    q, k = ids.shape
    valid = (ids >= 0) & np.isfinite(scores)
    if (valid[:, 1:] & ~valid[:, :-1]).any():  # a hole before the tail: real entries first
        first = np.argsort(~valid, axis=1, kind="stable")
        ids, scores = np.take_along_axis(ids, first, 1), np.take_along_axis(scores, first, 1)
        valid = np.take_along_axis(valid, first, 1)
    else:
        ids, scores = ids.copy(), scores.copy()
    step = max(1, SHUFFLE_CHUNK // max(k, 1))
    for lo in range(0, q if k else 0, step):
        _shuffle_block(ids[lo : lo + step], scores[lo : lo + step], valid[lo : lo + step],
                       rng, tol)  # fmt: skip
    return ids, scores
