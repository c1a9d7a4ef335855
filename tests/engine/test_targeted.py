"""Budgeted selection from neighbour lists: hand-worked round-robin, score, quota, hybrids,
the random fill, and the row path equal, pick for pick, to the string-id code it replaced
(``targeted_reference``)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
