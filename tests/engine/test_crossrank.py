"""Cross-ranks against brute force over the whole pool, censoring, and the decision rule."""

from __future__ import annotations

import numpy as np
import pytest

from engine.crossrank import CrossRanks, aggregate, cross_ranks, decide, drop_self, rank_within
from engine.vectors import l2_normalize
from tests.synthetic_space import clustered_labelled


def topk(x: np.ndarray, q: np.ndarray, k: int, ids: np.ndarray):
    """Exact lists as the service returns them: float32 scores, best first, ties by row."""
    scores = (q @ x.T).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(scores, order, 1)


def brute_rank(x: np.ndarray, query: np.ndarray, target_row: int, tol: float) -> int:
    """1 + pool rows scoring strictly more than the target (the whole pool, no lists)."""
    s = (query @ x.T).astype(np.float32)
    return int(1 + np.sum(s > s[target_row] + tol))


@pytest.fixture(scope="module")
def pool():
    rng = np.random.default_rng(3)
    n = 400
    concept, _ = clustered_labelled(n, 16, 8, seed=1, spread=1.0)
    skill, _ = clustered_labelled(n, 12, 5, seed=2, spread=1.0)
    # Skill descriptions repeat word for word: equal vectors, equal scores (ties).
    dup = rng.choice(n, 120, replace=False)
    skill[dup[60:]] = skill[dup[:60]]
    queries_c = l2_normalize(rng.standard_normal((30, 16)))
    queries_s = l2_normalize(rng.standard_normal((30, 12)))
    ids = np.array([f"p{i:04d}" for i in range(n)], dtype=object)
    return concept, skill, queries_c, queries_s, ids


@pytest.mark.parametrize("depth", [400, 50, 5])
def test_cross_ranks_match_brute_force(pool, depth):
    concept, skill, qc, qs, ids = pool
    row = {v: i for i, v in enumerate(ids)}
    c_ids, c_scores = topk(concept, qc, depth, ids)
    s_ids, s_scores = topk(skill, qs, depth, ids)
    got = cross_ranks(c_ids, c_scores, s_ids, s_scores, tol=0.0)
    for i in range(len(qc)):
        for top, lists, x, q, rank, censored in (
            (s_ids[i, 0], c_ids[i], concept, qc[i], got.r_cs[i], got.censored_cs[i]),
            (c_ids[i, 0], s_ids[i], skill, qs[i], got.r_sc[i], got.censored_sc[i]),
        ):
            true = brute_rank(x, q, row[top], 0.0)
            if top in set(lists):
                assert not censored and rank == true
            else:  # deeper than the list: censored just past it, a lower bound
                assert censored and rank == depth + 1 and true >= rank - 1
    if depth == len(ids):
        assert not got.censored_cs.any() and not got.censored_sc.any()
    assert (got.r_cs >= 1).all() and (got.r_sc >= 1).all()
    assert (got.depth_c == depth).all()


def test_ties_share_the_best_rank():
    ids = np.array([["a", "b", "c", "d"]], dtype=object)
    scores = np.array([[0.9, 0.5, 0.5, 0.1]], np.float32)
    rank, cens, _ = rank_within(np.array(["c"], object), ids, scores)
    assert rank.tolist() == [2] and not cens[0]
    rank, cens, depth = rank_within(np.array(["z"], object), ids, scores)
    assert rank.tolist() == [5] and cens[0] and depth.tolist() == [4]


def test_missing_results_shorten_the_depth():
    ids = np.array([["a", "b", None]], dtype=object)
    scores = np.array([[0.9, 0.5, -np.inf]], np.float32)
    rank, cens, depth = rank_within(np.array(["q"], object), ids, scores)
    assert rank.tolist() == [3] and cens[0] and depth.tolist() == [2]


def test_drop_self_removes_the_query_and_keeps_order():
    ids = np.array([["x", "a", "b"], ["c", "d", "y"], ["e", "f", "g"]], dtype=object)
    scores = np.arange(9, dtype=np.float32).reshape(3, 3)[:, ::-1]
    out_ids, out_scores = drop_self(ids, scores, np.array(["x", "y", "z"], object), 2)
    assert out_ids.tolist() == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert out_scores.tolist() == [[1, 0], [5, 4], [8, 7]]


def test_aggregate_is_median_of_log_ranks():
    agg = aggregate(np.array([1, 10, 100]), np.array([1, 1, 1000]))
    assert agg["median_log_r_cs"] == pytest.approx(np.log(10))
    assert agg["median_log_r_sc"] == pytest.approx(0.0)
    assert agg["delta"] == pytest.approx(np.log(10))
    with pytest.raises(ValueError):
        aggregate(np.array([], np.int64), np.array([], np.int64))


def ranks(r_cs, r_sc) -> CrossRanks:
    r_cs, r_sc = np.asarray(r_cs, np.int64), np.asarray(r_sc, np.int64)
    no = np.zeros(len(r_cs), bool)
    depth = np.full(len(r_cs), 1000)
    return CrossRanks(r_cs, r_sc, no, no, depth, depth)


def test_decide_sign_confidence_and_reference():
    rng = np.random.default_rng(0)
    far_c = ranks(rng.integers(200, 400, 80), rng.integers(5, 20, 80))
    d = decide(far_c, n_boot=300)
    assert d.prediction == "concept" and d.confidence > 0.99 and d.margin > 0
    far_s = ranks(rng.integers(5, 20, 80), rng.integers(200, 400, 80))
    assert decide(far_s, n_boot=300).prediction == "skill"
    # A reference with the same offset cancels it: what is left is a coin flip.
    same = decide(far_c, far_c, n_boot=300)
    assert same.margin == 0 and same.confidence <= 0.5
    # The margin is measured from the reference's Δ, not from 0.
    shifted = decide(far_c, ranks(rng.integers(2000, 4000, 80), rng.integers(5, 20, 80)))
    assert shifted.prediction == "skill" and shifted.delta > 0
    assert decide(far_c, seed=1).as_dict()["prediction"] == "concept"
