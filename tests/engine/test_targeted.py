"""Budgeted selection from neighbour lists: hand-worked round-robin, score, quota, hybrids."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.targeted import Selection, fuse, select, select_from_lists, standardise

# Three benchmark samples, three neighbours each (best first).
IDS = np.array([["a", "b", "c"], ["a", "d", "e"], ["b", "f", "g"]], dtype=object)
SCORES = np.array([[0.9, 0.8, 0.1], [0.95, 0.5, 0.4], [0.7, 0.6, 0.3]], np.float32)


def test_round_robin_hand_worked():
    # Turn 1: s0 takes a; s1's a is taken, it takes d; s2 takes b.
    # Turn 2: s0's b is taken, it takes c; s1 takes e (s2 would take f next).
    got = select_from_lists(IDS, 5)
    assert got.ids == ["a", "d", "b", "c", "e"]
    assert got.sample == [0, 1, 2, 0, 1]
    assert got.rank == [0, 1, 0, 2, 2]
    assert got.per_sample(3).tolist() == [2, 2, 1]
    # Turn 3: s0 and s1 are exhausted; s2 takes f, then g.
    assert select_from_lists(IDS, 7).ids == ["a", "d", "b", "c", "e", "f", "g"]
    # The lists hold 7 distinct ids: a larger budget gets all of them, once.
    assert select_from_lists(IDS, 10).ids == ["a", "d", "b", "c", "e", "f", "g"]
    assert select_from_lists(IDS, 0).ids == []


def test_round_robin_quota_and_lifting():
    got = select_from_lists(IDS, 3, quota=1)
    assert got.ids == ["a", "d", "b"] and not got.quota_lifted
    # Everyone is capped after one turn: the cap is lifted for the rest, and said so.
    got = select_from_lists(IDS, 5, quota=1)
    assert got.ids == ["a", "d", "b", "c", "e"] and got.quota_lifted


def test_score_aggregation_hand_worked():
    # Pairs by score: (s1,a) .95, (s0,a) .9 dup, (s0,b) .8, (s2,b) .7 dup, (s2,f) .6,
    # (s1,d) .5, (s1,e) .4, (s2,g) .3, (s0,c) .1
    got = select_from_lists(IDS, 6, scores=SCORES, aggregation="score")
    assert got.ids == ["a", "b", "f", "d", "e", "g"]
    assert got.sample == [1, 0, 2, 1, 1, 2]
    capped = select_from_lists(IDS, 4, scores=SCORES, aggregation="score", quota=1)
    assert capped.ids[:3] == ["a", "b", "f"] and capped.quota_lifted and len(capped) == 4


def test_missing_entries_and_taken_ids_are_skipped():
    ids = np.array([["a", None, None], ["a", "b", None]], dtype=object)
    got = select_from_lists(ids, 5, taken={"b"})
    assert got.ids == ["a"]
    with pytest.raises(ValueError):
        select_from_lists(ids, 1, aggregation="score")


def test_standardise_and_fuse():
    z = standardise(SCORES, IDS)
    assert np.isclose(z.mean(), 0) and np.isclose(z.std(), 1)
    c_ids = np.array([["a", "b"]], dtype=object)
    s_ids = np.array([["b", "c"]], dtype=object)
    c_sc = np.array([[1.0, 0.0]], np.float32)  # standardised: a 1, b -1
    s_sc = np.array([[0.5, 0.1]], np.float32)  # standardised: b 1, c -1
    ids, scores = fuse(c_ids, c_sc, s_ids, s_sc, "sum")
    # a: 1 + (-1, floor of skill) = 0; b: -1 + 1 = 0; c: -1 (floor of concept) - 1 = -2
    assert ids[0].tolist() == ["a", "b", "c", None] and scores[0, :3].tolist() == [0, 0, -2]
    ids, scores = fuse(c_ids, c_sc, s_ids, s_sc, "max")
    assert ids[0].tolist()[:3] == ["a", "b", "c"] and scores[0, :3].tolist() == [1, 1, -1]


def test_split_takes_half_from_each_space():
    concept = (np.array([["a", "b", "c", "d"]], object), np.ones((1, 4), np.float32))
    skill = (np.array([["a", "x", "y", "z"]], object), np.ones((1, 4), np.float32))
    got = select("split", 5, {"concept": concept, "skill": skill})
    assert got.ids == ["a", "b", "c", "x", "y"]
    assert got.space == ["concept"] * 3 + ["skill"] * 2
    assert select("skill", 2, {"skill": skill}).ids == ["a", "x"]
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
    universe = np.array([f"p{i}" for i in range(15)], dtype=object)

    def lists():
        ids = np.array([rng.choice(universe, k, replace=False) for _ in range(q)], dtype=object)
        return ids, np.sort(rng.random((q, k)).astype(np.float32), axis=1)[:, ::-1]

    both = {"concept": lists(), "skill": lists()}
    got = select(mode, budget, both, aggregation=aggregation, quota=quota)
    held = {x for ids, _ in (both.values() if mode != "concept" else [both["concept"]])
            for x in ids.ravel()}  # fmt: skip
    assert len(got.ids) == len(set(got.ids)) == min(budget, len(held))
    assert set(got.ids) <= held
    assert isinstance(got, Selection) and len(got.sample) == len(got)
