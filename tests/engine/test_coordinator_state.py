"""The coordinator's state machine and checkpoint, without Ray."""

from __future__ import annotations

import numpy as np
import pytest

from engine.coordinator import BASELINE, CoordinatorState, ProgressSettings, SelectionRule
from engine.progress import PoolClusters

K = 6


def make_state(budget=120, round_size=25, metric="accuracy", **kw) -> CoordinatorState:
    labels = np.arange(300) % K
    sizes = {k: kw.pop(k) for k in ("seed",) if k in kw}
    rule = SelectionRule(metric=metric, **kw)
    settings = ProgressSettings(budget=budget, round_size=round_size, rule=rule, **sizes)
    return CoordinatorState(settings, PoolClusters.from_labels(labels, K))


def scores_after(state, round_index, acc):
    evaluated = np.bincount(
        state.clusters.labels[state.eval_positions(max(round_index, 0))], minlength=K
    )
    state.report(round_index, np.where(evaluated > 0, acc, np.nan), evaluated)


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
        state.report(t - 1, np.zeros(K), np.ones(K), {"round": t - 1, "train_loss": 0.5})
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
        state.report(2, np.zeros(K), np.ones(K))
    # a round asked before the previous one is scored would draw on a NaN delta
    with pytest.raises(ValueError, match="before round 0's scores were reported"):
        state.next_round(1)


def test_eval_rows_are_selected_and_capped_per_cluster():
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
