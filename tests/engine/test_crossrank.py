"""Cross-ranks against brute force over the whole pool, tie groups, censoring, and the
decision rule."""

from __future__ import annotations

import json
from dataclasses import astuple

import numpy as np
import pytest

from engine.crossrank import CrossRanks, aggregate, cross_ranks, decide, drop_self
from engine.ranked_lists import rank_within
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


def expected(top_ids, top_scores, lists, x, q, row, depth):
    """The tie-aware rank by brute force: the top group (scores equal to the best, tol 0)
    of one list, each member ranked over the whole pool in the other space (censored at
    depth + 1 if the other list does not hold it), and the geometric mean."""
    group = top_ids[top_scores == top_scores[0]]
    held = set(lists)
    ranks = [brute_rank(x, q, row[m], 0.0) if m in held else depth + 1 for m in group]
    return np.exp(np.mean(np.log(ranks))), any(m not in held for m in group), len(group)


@pytest.mark.parametrize("depth", [400, 50, 5])
def test_cross_ranks_match_brute_force(pool, depth):
    """Against the whole pool. Before the ranks were tie-aware this ranked s_ids[i, 0],
    the first of the tied skill rows in the index's order; now the whole top group."""
    concept, skill, qc, qs, ids = pool
    row = {v: i for i, v in enumerate(ids)}
    c_ids, c_scores = topk(concept, qc, depth, ids)
    s_ids, s_scores = topk(skill, qs, depth, ids)
    got = cross_ranks(c_ids, c_scores, s_ids, s_scores, tol=0.0)
    for i in range(len(qc)):
        for tops, lists, x, q, rank, censored, ties in (
            ((s_ids[i], s_scores[i]), c_ids[i], concept, qc[i], got.r_cs[i],
             got.censored_cs[i], got.ties_s[i]),
            ((c_ids[i], c_scores[i]), s_ids[i], skill, qs[i], got.r_sc[i],
             got.censored_sc[i], got.ties_c[i]),
        ):  # fmt: skip
            want, want_censored, members = expected(*tops, lists, x, q, row, depth)
            assert rank == pytest.approx(want, rel=1e-12)
            assert censored == want_censored and ties == members
            if members == 1:
                assert rank == int(rank)  # one row: its integer rank exactly
    assert (got.ties_s > 1).any()  # the duplicated skill vectors do tie at the top
    if depth == len(ids):
        assert not got.censored_cs.any() and not got.censored_sc.any()
    assert (got.r_cs >= 1).all() and (got.r_sc >= 1).all()
    assert (got.depth_c == depth).all()


def test_a_tied_top_group_ranks_as_the_geometric_mean():
    """Three skill rows tie at the top; in the concept list (depth 10) they rank 1, 4
    and absent (censored at 11)."""
    c_ids = np.array([[10, 11, 12, 20, 13, 14, 15, 16, 17, 18]])
    c_scores = np.linspace(1.0, 0.1, 10, dtype=np.float32)[None]
    s_ids = np.array([[20, 30, 10, 40]])  # 30 is not in the concept list
    s_scores = np.array([[0.9, 0.9, 0.9, 0.5]], np.float32)
    got = cross_ranks(c_ids, c_scores, s_ids, s_scores)
    assert got.r_cs[0] == pytest.approx(np.exp(np.mean(np.log([1, 4, 11]))))
    assert got.censored_cs.tolist() == [True] and got.ties_s.tolist() == [3]
    # The concept list's top (row 10) is tied first in the skill list: rank 1, alone.
    assert got.r_sc.tolist() == [1.0] and got.ties_c.tolist() == [1]
    assert not got.censored_sc[0] and got.r_cs.dtype == np.float64
    # An empty list: nothing to rank, censored just past the other list.
    empty = cross_ranks(c_ids, c_scores, np.array([[-1, -1]]), np.full((1, 2), -np.inf))
    assert empty.r_cs.tolist() == [11.0] and empty.censored_cs[0] and empty.ties_s[0] == 0
    assert empty.r_sc.tolist() == [1.0] and empty.censored_sc[0]  # depth 0 + 1


def shuffled_within_ties(ids, scores, rng):
    """The lists with the entries of equal score in another order (as another index
    might have listed them)."""
    order = np.lexsort((rng.random(scores.shape), -scores), axis=1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)


def heavily_tied(rng, q, k, pool=60):
    ids = np.array([rng.choice(pool, k, replace=False) for _ in range(q)], np.int64)
    scores = -np.sort(-np.round(rng.random((q, k)), 1), axis=1).astype(np.float32)
    scores[:, :3] = scores[:, :1]  # at least three rows share every list's best score
    return ids, scores


def test_cross_ranks_do_not_depend_on_the_order_of_tied_rows():
    """Tied entries listed in another order, and the pool's rows numbered in another
    order: the same ranks, censoring and group sizes, to the last bit."""
    rng = np.random.default_rng(7)
    c, s = heavily_tied(rng, 200, 12), heavily_tied(rng, 200, 9)
    base = cross_ranks(*c, *s)
    assert (base.ties_c >= 3).all() and (base.ties_s >= 3).all()
    relabel = rng.permutation(60)
    for _ in range(5):
        (c_ids, c_sc), (s_ids, s_sc) = shuffled_within_ties(*c, rng), shuffled_within_ties(*s, rng)
        for got in (cross_ranks(c_ids, c_sc, s_ids, s_sc),
                    cross_ranks(relabel[c_ids], c_sc, relabel[s_ids], s_sc)):  # fmt: skip
            for a, b in zip(astuple(got), astuple(base), strict=True):
                np.testing.assert_array_equal(a, b)


def test_without_ties_the_ranks_are_the_integer_ranks():
    rng = np.random.default_rng(8)
    q, k = 50, 20
    c_ids = np.array([rng.choice(100, k, replace=False) for _ in range(q)], np.int64)
    s_ids = np.array([rng.choice(100, k, replace=False) for _ in range(q)], np.int64)
    c_sc = -np.sort(-rng.random((q, k)), axis=1)
    s_sc = -np.sort(-rng.random((q, k)), axis=1)
    got = cross_ranks(c_ids, c_sc, s_ids, s_sc)
    r_cs, cens_cs, _ = rank_within(s_ids[:, 0], c_ids, c_sc)
    r_sc, cens_sc, _ = rank_within(c_ids[:, 0], s_ids, s_sc)
    assert got.r_cs.tolist() == r_cs.tolist() and got.r_sc.tolist() == r_sc.tolist()
    assert (got.censored_cs == cens_cs).all() and (got.censored_sc == cens_sc).all()
    assert (got.ties_c == 1).all() and (got.ties_s == 1).all()


def test_rank_within_counts_only_strictly_better_across_near_ties():
    """Scores 3e-7 apart chain past tol (1e-6), lists unsorted or with holes: the rank
    is 1 + #{score > own + tol}, counted the slow way."""
    rng = np.random.default_rng(9)
    for _ in range(200):
        q, k = int(rng.integers(1, 6)), int(rng.integers(1, 30))
        ids = np.array([rng.choice(40, k, replace=False) for _ in range(q)], np.int64)
        scores = 0.5 - np.cumsum(rng.choice([0.0, 3e-7, 2e-6], (q, k)), axis=1)
        if rng.random() < 0.2:
            scores = rng.permuted(scores, axis=1)
        ids[rng.random((q, k)) < 0.1] = -1
        target = np.where(rng.random(q) < 0.8, ids[:, rng.integers(0, k)], 99)
        rank, cens, depth = rank_within(target, ids, scores)
        for i in range(q):
            real = ids[i] >= 0
            here = real & (ids[i] == target[i])
            if here.any():
                own = scores[i][here][0]
                assert not cens[i] and rank[i] == 1 + np.sum(real & (scores[i] > own + 1e-6))
            else:
                assert cens[i] and rank[i] == depth[i] + 1 == real.sum() + 1


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
    assert "median_ties_c" not in agg
    agg = aggregate(np.array([1.5, 10.0]), np.array([1.0, 2.0]), ties_c=np.array([1, 4]),
                    ties_s=np.array([2, 2, 5]))  # fmt: skip
    assert agg["median_r_cs"] == pytest.approx(5.75)
    assert (agg["median_ties_c"], agg["mean_ties_c"]) == (2.5, 2.5)
    assert (agg["median_ties_s"], agg["mean_ties_s"]) == (2.0, 3.0)
    json.dumps(agg)
    agg = aggregate(np.array([1, 10, 100]), np.array([1, 1, 1000]))
    assert agg["median_log_r_sc"] == pytest.approx(0.0)
    assert agg["delta"] == pytest.approx(np.log(10))
    with pytest.raises(ValueError):
        aggregate(np.array([], np.int64), np.array([], np.int64))


def ranks(r_cs, r_sc) -> CrossRanks:
    r_cs, r_sc = np.asarray(r_cs, np.float64), np.asarray(r_sc, np.float64)
    no = np.zeros(len(r_cs), bool)
    depth = np.full(len(r_cs), 1000)
    one = np.ones(len(r_cs), np.int64)
    return CrossRanks(r_cs, r_sc, no, no, depth, depth, one, one)


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


def test_a_calibrated_threshold_moves_the_line_and_is_fitted_to_known_leanings():
    from engine.crossrank import fit_threshold

    rng = np.random.default_rng(3)
    far_c = ranks(rng.integers(200, 400, 80), rng.integers(5, 20, 80))
    plain = decide(far_c, n_boot=200)
    assert plain.prediction == "concept"
    moved = decide(far_c, n_boot=200, threshold=plain.margin + 1.0)
    assert moved.prediction == "skill" and moved.confidence > 0.99
    assert moved.margin == plain.margin  # the threshold moves the line, not the data
    # Calibration benchmarks: concept trained better only above a margin of 0.5.
    margins = np.array([-0.4, 0.1, 0.3, 0.7, 0.9, -0.1])
    better = np.array([False, False, False, True, True, False])
    threshold, right = fit_threshold(margins, better)
    assert right == 6 and 0.3 < threshold < 0.7
    # Nothing to learn (the uncalibrated rule is already all right): the threshold stays 0.
    assert fit_threshold(np.array([-1.0, 1.0]), np.array([False, True])) == (0.0, 2)
    with pytest.raises(ValueError, match="differ"):
        fit_threshold(np.zeros(3), np.zeros(2, bool))
