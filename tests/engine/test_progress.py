"""PROGRESS maths: Δk, softmax, apportioning, rounds and the ledger (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import InputError
from engine.progress import (
    BudgetExceeded,
    Ledger,
    PoolClusters,
    apportion,
    plan_round,
    progress_probabilities,
    round_rows,
    rows_of,
    sample_segments,
    select_round,
)


def test_probabilities_are_a_softmax_over_positive_eligible_clusters():
    delta = np.array([1.0, 2.0, -1.0, np.nan, 3.0])
    eligible = np.array([True, True, True, True, False])
    p = progress_probabilities(delta, eligible, tau=0.5)
    expected = np.exp(np.array([1.0, 2.0]) / 0.5)
    np.testing.assert_allclose(p[:2], expected / expected.sum())
    assert p[2:].sum() == 0
    assert not progress_probabilities(-np.ones(3), np.ones(3, bool), 1.0).any()


def test_apportion_is_exact_and_spreads_a_full_clusters_shortfall():
    # 10 by weights 0.5/0.3/0.2 -> 5/3/2; cluster 0 holds only 2, so its 3 spread 3:2.
    q = apportion(10, np.array([0.5, 0.3, 0.2]), np.array([2, 100, 100]))
    assert q.tolist() == [2, 5, 3]
    assert apportion(7, np.array([1.0, 1.0, 1.0]), np.array([9, 9, 9])).sum() == 7
    # Everything full: the sum falls short rather than exceeding a capacity.
    assert apportion(50, np.array([1.0, 1.0]), np.array([3, 4])).tolist() == [3, 4]


def test_a_round_follows_progress_and_explores_the_rest():
    labels = np.repeat(np.arange(4), 100)
    clusters = PoolClusters.from_labels(labels)
    ledger = Ledger(400, 200)
    delta = np.array([2.0, np.nan, -0.5, np.nan])  # only cluster 0 progresses
    rng = np.random.default_rng(0)
    picks, plan = select_round(ledger, clusters, delta, 50, 1.0, 0.1, rng, round_index=1)
    assert plan.quota.tolist() == [45, 0, 0, 0] and plan.explore == 5
    per_cluster = np.bincount(labels[picks], minlength=4)
    assert per_cluster[0] == 45 and per_cluster[1:].sum() == 5
    assert ledger.spent == 50 and (ledger.rows_of_round(1) == np.sort(picks)).all()


def test_no_progress_anywhere_means_a_uniform_round():
    clusters = PoolClusters.from_labels(np.arange(300) % 3)
    plan = plan_round(
        np.full(3, np.nan), clusters.unselected_counts(np.zeros(300, bool)), 30, 1, 0.1
    )
    assert plan.quota.sum() == 0 and plan.explore == 30


def test_the_ledger_refuses_overspending_and_double_picks():
    ledger = Ledger(10, 4)
    ledger.take(np.array([1, 2]), 0)
    with pytest.raises(BudgetExceeded, match="already selected"):
        ledger.take(np.array([2]), 1)
    with pytest.raises(BudgetExceeded, match="twice"):
        ledger.take(np.array([5, 5]), 1)
    with pytest.raises(BudgetExceeded, match="only 2 of the budget of 4"):
        ledger.take(np.array([3, 4, 5]), 1)
    assert ledger.spent == 2  # all or nothing
    restored = Ledger.from_state(ledger.state())
    assert (restored.round_of == ledger.round_of).all() and restored.left == 2
    with pytest.raises(ValueError, match="budget"):
        Ledger(10, 11)


@st.composite
def pools(draw):
    k = draw(st.integers(1, 12))
    n = draw(st.integers(1, 300))
    labels = np.array(draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)))
    budget = draw(st.integers(1, n))
    rounds = draw(
        st.lists(
            st.tuples(
                st.integers(0, 80),  # picks asked
                st.lists(
                    st.one_of(st.none(), st.floats(-2, 5, allow_nan=False)),
                    min_size=k,
                    max_size=k,
                ),
            ),
            min_size=1,
            max_size=8,
        )
    )
    tau = draw(st.floats(0.05, 3.0))
    explore = draw(st.floats(0.0, 1.0))
    return labels, k, budget, rounds, tau, explore, draw(st.integers(0, 2**31))


@settings(max_examples=300, deadline=None)
@given(pools())
def test_rounds_never_overspend_repeat_or_come_up_short(case):
    labels, k, budget, rounds, tau, explore, seed = case
    clusters = PoolClusters.from_labels(labels, k)
    ledger = Ledger(labels.size, budget)
    rng = np.random.default_rng(seed)
    seen: set[int] = set()
    for t, (asked, raw_delta) in enumerate(rounds, start=1):
        delta = np.array([np.nan if d is None else d for d in raw_delta])
        unselected_before = ~ledger.selected
        left_before = ledger.left
        picks, plan = select_round(ledger, clusters, delta, asked, tau, explore, rng, t)
        assert picks.size == min(asked, left_before, int(unselected_before.sum()))
        assert unselected_before[picks].all()  # only rows of the unselected pool
        assert len(set(picks.tolist()) & seen) == 0 and np.unique(picks).size == picks.size
        seen.update(picks.tolist())
        assert ledger.spent == len(seen) <= budget
        # Quotas only where Δk > 0, and never more than a cluster had left.
        positive = np.isfinite(delta) & (delta > 0)
        assert not plan.quota[~positive].any()
        assert (np.bincount(labels[picks], minlength=k) >= plan.quota).all()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 40), min_size=1, max_size=20),
    st.lists(st.integers(0, 50), min_size=20, max_size=20),
    st.integers(0, 2**31),
)
def test_segment_draws_take_min_of_ask_and_size_from_each_segment(sizes, take, seed):
    segments = np.repeat(np.arange(len(sizes)), sizes)
    take = np.array(take[: len(sizes)])
    picked = sample_segments(segments, take, np.random.default_rng(seed))
    assert np.unique(picked).size == picked.size and (np.diff(picked) > 0).all()
    got = np.bincount(segments[picked], minlength=len(sizes))
    assert got.tolist() == np.minimum(take, sizes).tolist()


class _HighKeys:
    """Keys that all land above every limit: each segment takes the exact fallback."""

    def random(self, n):
        return np.linspace(0.9, 0.5, n)


def test_segment_draws_fall_back_to_every_key_when_the_limit_holds_too_few():
    segments = np.repeat(np.arange(3), [1000, 50, 7])
    picked = sample_segments(segments, np.array([3, 10, 7]), _HighKeys())
    assert np.bincount(segments[picked], minlength=3).tolist() == [3, 10, 7]
    # The smallest keys win: the last places of each segment (keys fall along the array).
    assert picked[:3].tolist() == [997, 998, 999]


def test_segment_draws_are_uniform_subsets():
    rng = np.random.default_rng(0)
    segments = np.repeat(np.arange(2), [5, 400])
    counts = np.zeros(405)
    draws = 4000
    for _ in range(draws):
        counts[sample_segments(segments, np.array([2, 3]), rng)] += 1
    # Each place of segment 0 is in 2 of 5 draws, of segment 1 in 3 of 400.
    np.testing.assert_allclose(counts[:5] / draws, 0.4, atol=0.04)
    assert abs(counts[5:].mean() / draws - 3 / 400) < 1e-9  # exactly 3 a draw
    assert counts[5:].max() / draws < 3 / 400 + 0.012  # no place favoured


def test_sizes_are_fractions_or_counts_and_rounds_cover_the_budget():
    assert rows_of(0.2, 665_000, "budget") == 133_000 and rows_of(7500, 665_000, "round") == 7500
    with pytest.raises(InputError, match="no rows"):
        rows_of(0.001, 100, "budget")
    assert round_rows(60, 27, 10) == [27, 10, 10, 10, 3]
    assert (
        round_rows(133_000, 59_850, 7500)[-1] == 5650
        and sum(round_rows(133_000, 59_850, 7500)) == 133_000
    )


def test_the_ledger_counts_reveals_apart_from_picks_and_refuses_unpaid_answers():
    ledger = Ledger(10, 5)
    ledger.take(np.array([1, 2, 3]), 0)
    assert ledger.spent == 3 and ledger.revealed == 0  # picked, not yet read
    ledger.reveal(np.array([1, 2]))
    ledger.reveal(np.array([2, 3]))  # a second read of row 2 is no new answer
    assert ledger.revealed == 3
    with pytest.raises(BudgetExceeded, match="not selected"):
        ledger.reveal(np.array([3, 7]))
    restored = Ledger.from_state(ledger.state())
    assert restored.revealed == 3 and (restored.answered == ledger.answered).all()
