"""Budgeted selection from neighbour lists: hand-worked round-robin, score, quota, hybrids,
the random fill, the row path equal, pick for pick, to the string-id code it replaced
(``targeted_reference``), and seeded tie-breaking (``shuffle_ties``)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.ranked_lists import shuffle_ties
from engine.targeted import (
    Selection,
    fill_at_random,
    fuse,
    select,
    select_from_lists,
    standardise,
)
from tests.engine import targeted_reference as before

LETTERS = "abcdefghxyz"


def rows(*letters: str | None) -> list[int]:
    """Pool rows named by letter (a = 0, b = 1, ...; None = -1, a missing result)."""
    return [LETTERS.index(x) if x is not None else -1 for x in letters]


def letters(selected) -> list[str]:
    return [LETTERS[r] for r in selected]


# Three benchmark samples, three neighbours each (best first).
IDS = np.array([rows("a", "b", "c"), rows("a", "d", "e"), rows("b", "f", "g")], np.int64)
SCORES = np.array([[0.9, 0.8, 0.1], [0.95, 0.5, 0.4], [0.7, 0.6, 0.3]], np.float32)


def test_round_robin_hand_worked():
    # Turn 1: s0 takes a; s1's a is taken, it takes d; s2 takes b.
    # Turn 2: s0's b is taken, it takes c; s1 takes e (s2 would take f next).
    got = select_from_lists(IDS, 5)
    assert letters(got.rows) == ["a", "d", "b", "c", "e"]
    assert got.sample.tolist() == [0, 1, 2, 0, 1]
    assert got.rank.tolist() == [0, 1, 0, 2, 2]
    assert got.per_sample(3).tolist() == [2, 2, 1]
    # Turn 3: s0 and s1 are exhausted; s2 takes f, then g.
    assert letters(select_from_lists(IDS, 7).rows) == ["a", "d", "b", "c", "e", "f", "g"]
    # The lists hold 7 distinct rows: a larger budget gets all of them, once.
    assert letters(select_from_lists(IDS, 10).rows) == ["a", "d", "b", "c", "e", "f", "g"]
    assert len(select_from_lists(IDS, 0)) == 0


def test_round_robin_quota_and_lifting():
    got = select_from_lists(IDS, 3, quota=1)
    assert letters(got.rows) == ["a", "d", "b"] and not got.quota_lifted
    # Everyone is capped after one turn: the cap is lifted for the rest, and said so.
    got = select_from_lists(IDS, 5, quota=1)
    assert letters(got.rows) == ["a", "d", "b", "c", "e"] and got.quota_lifted


def test_score_aggregation_hand_worked():
    # Pairs by score: (s1,a) .95, (s0,a) .9 dup, (s0,b) .8, (s2,b) .7 dup, (s2,f) .6,
    # (s1,d) .5, (s1,e) .4, (s2,g) .3, (s0,c) .1
    got = select_from_lists(IDS, 6, scores=SCORES, aggregation="score")
    assert letters(got.rows) == ["a", "b", "f", "d", "e", "g"]
    assert got.sample.tolist() == [1, 0, 2, 1, 1, 2]
    capped = select_from_lists(IDS, 4, scores=SCORES, aggregation="score", quota=1)
    assert letters(capped.rows[:3]) == ["a", "b", "f"] and capped.quota_lifted
    assert len(capped) == 4


def test_missing_entries_and_taken_rows_are_skipped():
    ids = np.array([rows("a", None, None), rows("a", "b", None)], np.int64)
    got = select_from_lists(ids, 5, taken=np.array(rows("b")))
    assert letters(got.rows) == ["a"]
    with pytest.raises(ValueError, match="score aggregation needs the scores"):
        select_from_lists(ids, 1, aggregation="score")
    with pytest.raises(ValueError, match="integer pool rows"):
        select_from_lists(np.array([["a"]], dtype=object), 1)


def test_standardise_and_fuse():
    z = standardise(SCORES, IDS)
    assert np.isclose(z.mean(), 0) and np.isclose(z.std(), 1)
    c_ids = np.array([rows("a", "b")], np.int64)
    s_ids = np.array([rows("b", "c")], np.int64)
    c_sc = np.array([[1.0, 0.0]], np.float32)  # standardised: a 1, b -1
    s_sc = np.array([[0.5, 0.1]], np.float32)  # standardised: b 1, c -1
    ids, scores = fuse(c_ids, c_sc, s_ids, s_sc, "sum")
    # a: 1 + (-1, floor of skill) = 0; b: -1 + 1 = 0; c: -1 (floor of concept) - 1 = -2
    assert ids[0].tolist() == rows("a", "b", "c", None) and scores[0, :3].tolist() == [0, 0, -2]
    ids, scores = fuse(c_ids, c_sc, s_ids, s_sc, "max")
    assert ids[0].tolist()[:3] == rows("a", "b", "c") and scores[0, :3].tolist() == [1, 1, -1]


def test_split_takes_half_from_each_space():
    concept = (np.array([rows("a", "b", "c", "d")]), np.ones((1, 4), np.float32))
    skill = (np.array([rows("a", "x", "y", "z")]), np.ones((1, 4), np.float32))
    got = select("split", 5, {"concept": concept, "skill": skill})
    assert letters(got.rows) == ["a", "b", "c", "x", "y"]
    assert got.space == ["concept"] * 3 + ["skill"] * 2
    assert got.space_counts() == {"concept": 3, "skill": 2}
    assert letters(select("skill", 2, {"skill": skill}).rows) == ["a", "x"]
    with pytest.raises(ValueError):
        select("auto", 2, {"skill": skill})


def test_sample_mode_serves_each_sample_from_its_own_space():
    concept = (np.array([rows("a", "b", "c"), rows("d", "e", "f")]), np.ones((2, 3), np.float32))
    skill = (np.array([rows("x", "y", "z"), rows("g", "h", "a")]), np.ones((2, 3), np.float32))
    lists = {"concept": concept, "skill": skill}
    got = select("sample", 4, lists, sample_concept=np.array([True, False]))
    assert letters(got.rows) == ["a", "g", "b", "h"]  # turns: sample 0 concept, 1 skill
    assert got.space == ["concept", "skill", "concept", "skill"]
    every = select("sample", 6, lists, sample_concept=np.array([False, False]))
    assert letters(every.rows) == ["x", "g", "y", "h", "z", "a"]  # all skill: skill mode's
    assert letters(every.rows) == letters(select("skill", 6, lists).rows)
    with pytest.raises(ValueError, match="sample_concept"):
        select("sample", 2, lists)


def test_sample_spaces_follow_each_samples_margin():
    from engine.crossrank import cross_ranks, sample_spaces

    # sample 0: the skill top sits deep in the concept list (concept-led); sample 1 the
    # reverse; sample 2 agrees both ways (margin 0): the benchmark's prediction decides
    c_ids = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    s_ids = np.array([[4, 1, 2, 3], [6, 7, 8, 5], [9, 10, 11, 12]])
    scores = np.tile(np.array([0.9, 0.8, 0.7, 0.6], np.float32), (3, 1))
    ranks = cross_ranks(c_ids, scores, s_ids, scores)
    assert sample_spaces(ranks, 0.0, "skill").tolist() == [True, False, False]
    assert sample_spaces(ranks, 0.0, "concept").tolist() == [True, False, True]
    # a reference offset moves every sample's margin alike
    assert sample_spaces(ranks, 10.0, "concept").tolist() == [False, False, False]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 8),
    st.integers(0, 40),
    st.sampled_from(["concept", "sum", "max", "split"]),
    st.sampled_from(["round_robin", "score"]),
    st.one_of(st.none(), st.integers(1, 3)),
    st.integers(0, 2**16),
)
def test_exact_budget_no_duplicates(q, k, budget, mode, aggregation, quota, seed):
    rng = np.random.default_rng(seed)

    def lists():
        ids = np.array([rng.choice(15, k, replace=False) for _ in range(q)], np.int64)
        return ids, np.sort(rng.random((q, k)).astype(np.float32), axis=1)[:, ::-1]

    both = {"concept": lists(), "skill": lists()}
    got = select(mode, budget, both, aggregation=aggregation, quota=quota)
    held = {x for ids, _ in (both.values() if mode != "concept" else [both["concept"]])
            for x in ids.ravel()}  # fmt: skip
    assert len(got.rows) == len(set(got.rows.tolist())) == min(budget, len(held))
    assert set(got.rows.tolist()) <= held
    assert isinstance(got, Selection) and len(got.sample) == len(got)


@settings(max_examples=80, deadline=None)
@given(
    st.integers(1, 7),
    st.integers(1, 9),
    st.integers(0, 50),
    st.sampled_from(["concept", "skill", "sum", "max", "split"]),
    st.sampled_from(["round_robin", "score"]),
    st.one_of(st.none(), st.integers(1, 3)),
    st.integers(0, 2**16),
)
def test_rows_select_exactly_what_the_string_ids_selected(
    q, k, budget, mode, aggregation, quota, seed
):
    """The same lists as rows and as the pool's string ids (short lists end early, scores
    tie): the row path picks the same rows, in the same order, from the same samples and
    ranks as the string-id code it replaced."""
    rng = np.random.default_rng(seed)
    pool = np.array([f"pool-{i:03d}" for i in range(20)], dtype=object)

    def lists():
        ids = np.array([rng.choice(20, k, replace=False) for _ in range(q)], np.int64)
        scores = np.round(np.sort(rng.random((q, k)), axis=1)[:, ::-1], 1).astype(np.float32)
        short = rng.integers(0, k + 1, q)  # the tail of a list may hold no result
        for i, n in enumerate(short):
            ids[i, n:], scores[i, n:] = -1, -np.inf
        as_ids = np.where(ids >= 0, pool[np.maximum(ids, 0)], None)
        return (ids, scores), (as_ids, scores)

    (c_rows, c_ids), (s_rows, s_ids) = lists(), lists()
    new = select(mode, budget, {"concept": c_rows, "skill": s_rows}, aggregation=aggregation,
                 quota=quota, split_share=0.4)  # fmt: skip
    old = before.select(mode, budget, {"concept": c_ids, "skill": s_ids},
                        aggregation=aggregation, quota=quota, split_share=0.4)  # fmt: skip
    assert pool[new.rows].tolist() == old.ids
    assert new.sample.tolist() == old.sample and new.rank.tolist() == old.rank
    assert new.space == old.space and new.quota_lifted == old.quota_lifted


def test_random_fill_tops_up_with_unselected_rows_seeded():
    got = select_from_lists(IDS, 10)  # the lists hold 7 rows
    assert fill_at_random(got, 11, 10, seed=3) == 3
    assert len(got) == 10 and len(set(got.rows.tolist())) == 10
    assert got.sample[-3:].tolist() == [-1] * 3 and got.space[-3:] == ["random fill"] * 3
    assert set(got.rows[-3:].tolist()) <= {7, 8, 9, 10}
    assert got.per_sample(3).sum() == 7 and got.space_counts()["random fill"] == 3
    again = select_from_lists(IDS, 10)
    fill_at_random(again, 11, 10, seed=3)
    assert again.rows.tolist() == got.rows.tolist()
    with pytest.raises(ValueError, match="more than the pool"):
        fill_at_random(select_from_lists(IDS, 10), 8, 10, seed=0)


def runs_of(scores: np.ndarray, tol: float = 1e-6) -> list[list[int]]:
    """Each list's run number per real entry, the slow way: a run holds the entries
    within tol of its first (-1 for missing entries)."""
    out = []
    for row in scores:
        runs, anchor, n = [], None, -1
        for s in row:
            if not np.isfinite(s):
                runs.append(-1)
                continue
            if anchor is None or anchor > s + tol:
                anchor, n = s, n + 1
            runs.append(n)
        out.append(runs)
    return out


def tied_lists(rng, q: int, k: int, pool: int = 500):
    ids = np.array([rng.choice(pool, k, replace=False) for _ in range(q)], np.int64)
    scores = -np.sort(-np.round(rng.random((q, k)), 1), axis=1).astype(np.float32)
    for i, n in enumerate(rng.integers(k // 2, k + 1, q)):  # some lists end early
        ids[i, n:], scores[i, n:] = -1, -np.inf
    return ids, scores


def test_shuffle_ties_permutes_only_within_runs_of_tied_scores():
    rng = np.random.default_rng(11)
    ids, scores = tied_lists(rng, 300, 25)
    got_ids, got_scores = shuffle_ties(ids, scores, np.random.default_rng(0))
    assert got_ids.dtype == ids.dtype and got_scores.dtype == scores.dtype
    # Runs keep their places (equal scores here, so the scores do not move at all) and
    # each run keeps its rows; the missing tail stays last.
    np.testing.assert_array_equal(got_scores, scores)
    runs = np.array(runs_of(scores))
    for i in range(len(ids)):
        for r in np.unique(runs[i]):
            assert sorted(got_ids[i, runs[i] == r]) == sorted(ids[i, runs[i] == r])
    assert ((got_ids < 0) == (ids < 0)).all()
    assert (got_ids != ids).any(axis=1).mean() > 0.5  # over 300 lists, most ties moved
    # The same seed, the same order; another seed, another order of the same runs.
    again = shuffle_ties(ids, scores, np.random.default_rng(0))
    np.testing.assert_array_equal(again[0], got_ids)
    other = shuffle_ties(ids, scores, np.random.default_rng(1))
    assert (other[0] != got_ids).any()
    np.testing.assert_array_equal(other[1], scores)


def test_shuffle_ties_anchors_runs_and_moves_missing_entries_last():
    # 0.6e-6 apart: a chain would make one run of seven; runs within 1e-6 of their first
    # entry are [0, 1], [2, 3], [4, 5], [6].
    scores = (1.0 - 0.6e-6 * np.arange(7))[None]
    ids = np.arange(7)[None]
    seen = set()
    for seed in range(40):
        got, got_scores = shuffle_ties(ids, scores, np.random.default_rng(seed))
        assert [sorted(got[0, a:b]) for a, b in ((0, 2), (2, 4), (4, 6), (6, 7))] == [
            [0, 1], [2, 3], [4, 5], [6]]  # fmt: skip
        assert (scores[0, got[0]] == got_scores[0]).all()
        seen.add(tuple(got[0]))
    assert len(seen) > 4
    # Random near-ties (steps of 0, 3e-7 or 2e-6): each run keeps its (id, score) pairs.
    rng = np.random.default_rng(12)
    steps = rng.choice([0.0, 3e-7, 2e-6], (200, 30))
    scores = 0.5 - np.cumsum(steps, axis=1)
    ids = np.array([rng.permutation(100)[:30] for _ in range(200)])
    got, got_scores = shuffle_ties(ids, scores, np.random.default_rng(0))
    for i, runs in enumerate(np.array(runs_of(scores))):
        for r in np.unique(runs):
            at = runs == r
            assert sorted(zip(got[i, at], got_scores[i, at], strict=True)) == sorted(
                zip(ids[i, at], scores[i, at], strict=True)
            )
    # A hole before the end (-1 id, or -inf score) goes behind every real entry.
    ids = np.array([[5, -1, 6, 7, 8]])
    scores = np.array([[0.5, 0.5, 0.5, -np.inf, 0.4]])
    got, got_scores = shuffle_ties(ids, scores, np.random.default_rng(3))
    assert sorted(got[0, :2]) == [5, 6] and got[0, 2] == 8 and got[0, 3:].tolist() == [-1, 7]
    assert got_scores[0, 2] == 0.4
    # Without ties a list is returned as it was, whatever the seed.
    ids, scores = np.array([[3, 1, 2]]), np.array([[0.9, 0.5, 0.1]])
    assert shuffle_ties(ids, scores, np.random.default_rng(5))[0].tolist() == [[3, 1, 2]]
    with pytest.raises(ValueError, match="best first"):
        shuffle_ties(ids, scores[:, ::-1], np.random.default_rng(0))


def test_seeded_selection_breaks_ties_at_random_and_reproducibly():
    """Every sample's neighbours tie: the unseeded selection takes the index's first
    rows (the early pool rows); seeds take other tied rows, the same ones per seed."""
    q, k = 6, 40
    rng = np.random.default_rng(4)
    ids = np.array([rng.permutation(200)[:k] for _ in range(q)], np.int64)
    ids.sort(axis=1)  # the index lists tied rows in storage order: early rows first
    lists = {"concept": (ids, np.full((q, k), 0.5, np.float32)),
             "skill": (ids[:, ::-1].copy(), np.full((q, k), 0.7, np.float32))}  # fmt: skip
    for mode in ("concept", "skill", "sum", "split"):
        for aggregation in ("round_robin", "score"):
            args = {"aggregation": aggregation}
            plain = select(mode, 30, lists, **args)
            one = select(mode, 30, lists, seed=1, **args)
            assert select(mode, 30, lists, seed=1, **args).rows.tolist() == one.rows.tolist()
            assert one.rows.tolist() != select(mode, 30, lists, seed=2, **args).rows.tolist()
            assert one.rows.tolist() != plain.rows.tolist()
            assert len(set(one.rows.tolist())) == 30
    # Lists without ties: a seed changes nothing.
    scores = np.tile(np.linspace(1, 0, k, dtype=np.float32), (q, 1))
    distinct = {"concept": (ids, scores)}
    assert (select("concept", 30, distinct, seed=3).rows.tolist()
            == select("concept", 30, distinct).rows.tolist())  # fmt: skip
