"""The coordinator's state machine and checkpoint, without Ray."""

from __future__ import annotations

import numpy as np
import pytest

from engine.coordinator import BASELINE, CoordinatorState
from engine.progress import PoolClusters
from engine.selection_rule import ProgressSettings, SelectionRule

K = 6


def make_state(budget=120, round_size=25, metric="accuracy", **kw) -> CoordinatorState:
    labels = np.arange(300) % K
    sizes = {k: kw.pop(k) for k in ("seed",) if k in kw}
    rule = SelectionRule(metric=metric, **kw)
    settings = ProgressSettings(budget=budget, round_size=round_size, rule=rule, **sizes)
    return CoordinatorState(settings, PoolClusters.from_labels(labels, K))


def scores_after(state, round_index, acc, training=None):
    """Report every probe row of a cluster at the cluster's score ``acc`` float (K,)."""
    rows = state.eval_positions(round_index)
    state.report(round_index, np.asarray(acc, float)[state.clusters.labels[rows]], training)


def test_rounds_follow_the_cluster_that_improves():
    state = make_state(explore=0.0)
    warm = state.warmup(np.arange(30))
    assert warm.size == 30 and state.ledger.spent == 30
    scores_after(state, BASELINE, np.full(K, 0.5))
    # After the warm-up, cluster 2 improves relatively most: it takes the round.
    scores_after(state, 0, np.array([0.5, 0.55, 0.9, 0.5, 0.4, 0.5]))
    delta = state.delta(0)
    assert np.argmax(delta) == 2 and delta[4] < 0
    picks = state.next_round(1)
    per_cluster = np.bincount(state.clusters.labels[picks], minlength=K)
    assert picks.size == 25 and per_cluster[2] > per_cluster[1] > 0
    assert per_cluster[[0, 3, 4, 5]].sum() == 0  # no progress, no exploration
    # Retried: the same rows, no new spending.
    assert (state.next_round(1) == picks).all() and state.ledger.spent == 55
    record = state.records[-1]
    assert record.round == 1 and record.spent == 55 and record.probabilities


def test_budget_is_spent_exactly_and_rounds_stop():
    state = make_state(budget=70, round_size=25)
    state.warmup(np.arange(0, 300, 10))  # 30 rows
    sizes = []
    for t in (1, 2, 3):
        scores_after(state, t - 1, np.zeros(K), {"round": t - 1, "train_loss": 0.5})
        sizes.append(state.next_round(t).size)
    assert sizes == [25, 15, 0] and state.finished and state.ledger.spent == 70
    assert [m["round"] for m in state.training_rounds()] == [0, 1, 2]
    assert state.rounds == 3  # the empty ask recorded nothing
    assert (state.next_round(0) == np.arange(0, 300, 10)).all()


def test_order_is_enforced():
    state = make_state()
    with pytest.raises(ValueError, match="warm-up"):
        state.next_round(1)
    state.warmup(np.arange(10))
    with pytest.raises(ValueError, match="next round is 1"):
        state.next_round(3)
    with pytest.raises(ValueError, match="rounds 0..0"):
        state.report(2, np.zeros(K))
    with pytest.raises(ValueError, match="before its probe rows were handed out"):
        state.report(BASELINE, np.zeros(0))  # the probe rows are asked first
    # a round asked before the previous one is scored would draw on a NaN delta
    with pytest.raises(ValueError, match="before round 0's scores were reported"):
        state.next_round(1)


def test_probe_rows_are_selected_and_capped_per_cluster():
    state = make_state(budget=200, round_size=100, eval_per_cluster=7)
    state.warmup(np.arange(60))
    rows = state.eval_positions(0)
    assert np.isin(rows, np.arange(60)).all()
    assert np.bincount(state.clusters.labels[rows], minlength=K).tolist() == [7] * K
    assert (state.eval_positions(0) == rows).all()  # seeded


def test_checkpoint_round_trip_continues_identically():
    state = make_state(metric="loss")
    state.warmup(np.arange(30))
    scores_after(state, BASELINE, np.full(K, 2.0))
    scores_after(state, 0, np.array([1.0, 1.5, 2.0, 2.5, 1.8, 1.9]))
    blob = state.to_bytes()
    restored = CoordinatorState.from_bytes(blob, state.clusters)
    assert (restored.next_round(1) == state.next_round(1)).all()
    assert restored.rounds_jsonl() == state.rounds_jsonl()
    other = PoolClusters.from_labels(np.arange(299) % K, K)
    with pytest.raises(ValueError, match="299 rows"):
        CoordinatorState.from_bytes(blob, other)


def test_probe_sets_are_fixed_and_never_hold_the_latest_round():
    state = make_state(budget=240, round_size=60, eval_per_cluster=12, explore=1.0)
    state.warmup(np.arange(30))  # 5 rows per cluster
    before = state.eval_positions(BASELINE)
    assert (before == np.arange(30)).all()  # round 0 has nothing earlier: its own rows
    scores_after(state, BASELINE, np.full(K, 0.5))
    assert (state.eval_positions(0) == before).all()  # the baseline's rows, compared
    scores_after(state, 0, np.full(K, 0.6))
    sets = [before]
    for t in (1, 2, 3):
        state.next_round(t)
        rows = state.eval_positions(t)
        round_of = state.ledger.round_of[rows]
        assert (round_of < t).all()  # never a row just trained on
        assert np.isin(sets[-1], rows).all()  # a row that joined stays
        assert np.bincount(state.clusters.labels[rows], minlength=K).max() <= 12
        sets.append(rows)
        scores_after(state, t, np.full(K, 0.6 + 0.01 * t))
    assert len(sets[2]) > len(sets[1])  # round 1's rows joined for round 2
    # asked again (a retried call), a round's set is the one it had
    assert (state.eval_positions(1) == sets[1]).all()


def test_delta_compares_only_rows_scored_both_times():
    state = make_state(budget=240, round_size=60, eval_per_cluster=50, explore=1.0)
    state.warmup(np.arange(30))
    scores_after(state, BASELINE, np.zeros(K))
    scores_after(state, 0, np.zeros(K))
    state.next_round(1)
    scores_after(state, 1, np.zeros(K))
    state.next_round(2)
    rows = state.eval_positions(2)
    values = np.where(state.probe_round[rows] == 2, 1.0, 0.0)  # only the new rows right
    assert values.any()
    state.report(2, values)
    np.testing.assert_allclose(state.delta(2), 0.0)  # the new rows have no earlier score
    assert state.scores[2].max() > 0  # though the round's mean counts them


def test_a_beta_prior_keeps_a_zero_start_finite_and_tau_scale_free():
    from engine.probes import cluster_progress, standardise

    labels = np.repeat(np.arange(3), 10)
    then = np.zeros(30)
    now = np.zeros(30)
    now[:3], now[10:11] = 1.0, 1.0  # cluster 0: 3 of 10 right, cluster 1: 1, cluster 2: 0
    delta, rows = cluster_progress(labels, now, then, 3, "accuracy", prior=1.0)
    np.testing.assert_allclose(delta, [3.0, 1.0, 0.0])  # (c + 1) / 12 over 1 / 12, minus 1
    assert rows.tolist() == [10, 10, 10]
    raw, _ = cluster_progress(labels, now, then, 3, "accuracy", prior=0.0)
    np.testing.assert_allclose(raw, [3.0, 1.0, 0.0])  # 0 floored at 1/n: the same here
    loss, _ = cluster_progress(labels, np.full(30, 1.5), np.full(30, 2.0), 3, "loss")
    np.testing.assert_allclose(loss, 0.25, rtol=1e-6)
    with pytest.raises(ValueError, match="metric"):
        cluster_progress(labels, now, then, 3, "f1")
    # standardised, Δk of any unit gives the same softmax: one τ for both metrics
    small = np.array([0.02, 0.01, -0.01, np.nan])
    np.testing.assert_allclose(standardise(small), standardise(100 * small))
    assert np.isnan(standardise(small)[3]) and standardise(np.array([0.3]))[0] == 0.3


def test_checkpoint_keeps_the_probe_sets_and_their_values():
    state = make_state(budget=240, round_size=60, eval_per_cluster=8)
    state.warmup(np.arange(30))
    scores_after(state, BASELINE, np.full(K, 0.2))
    scores_after(state, 0, np.linspace(0.1, 0.9, K))
    state.next_round(1)
    scores_after(state, 1, np.linspace(0.9, 0.1, K))
    restored = CoordinatorState.from_bytes(state.to_bytes(), state.clusters)
    assert (restored.probe_round == state.probe_round).all()
    np.testing.assert_array_equal(restored.delta(1), state.delta(1))
    assert sorted(restored.row_values) == [0, 1]  # only what a Δk still needs
    assert (restored.next_round(2) == state.next_round(2)).all()
    assert (restored.eval_positions(2) == state.eval_positions(2)).all()
