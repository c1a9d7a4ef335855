"""Rows inside a cluster by the model's uncertainty among diverse candidates
(engine.within), the coordinator's two-step round, and the tiny LLaVA's uncertainty on
its own greedy answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.coordinator import BASELINE, CoordinatorState
from engine.llava import answer_uncertainty, build_llava, collate
from engine.llava.evaluate import greedy_uncertainty
from engine.progress import PoolClusters
from engine.selection_rule import ProgressSettings, SelectionRule
from engine.within import candidate_positions, diversity_layout, pick_in_band
from tests.engine.test_llava import examples

K = 3


def clusters_of(n: int) -> PoolClusters:
    return PoolClusters.from_labels(np.arange(n) % K, K)


def test_candidates_are_each_clusters_next_free_prototypes():
    clusters = clusters_of(30)  # cluster c: positions c, c + 3, ..., c + 27
    rank = np.arange(30)[::-1] // K  # a cluster's later positions are its first prototypes
    layout = diversity_layout(clusters, rank)
    assert layout[:10].tolist() == [27, 24, 21, 18, 15, 12, 9, 6, 3, 0]
    selected = np.zeros(30, bool)
    selected[[27, 21]] = True  # cluster 0's first and third prototypes are taken
    quota = np.array([2, 0, 1])
    got = candidate_positions(clusters, layout, selected, quota, per_pick=2.0)
    # cluster 0: ceil(2 x 2) = 4 free rows in prototype order; cluster 1: none; 2: two
    assert got.tolist() == [24, 18, 15, 12, 29, 26]
    # a cluster with fewer free rows than asked offers what it has
    selected[:] = True
    selected[[0, 3]] = False
    assert candidate_positions(clusters, layout, selected, np.array([2, 0, 0]), 3.0).tolist() == [
        3,
        0,
    ]


def test_the_band_takes_the_middle_of_each_clusters_candidates():
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    uncertainty = np.array([0.1, 0.9, 0.5, 0.3, 0.7, 2.0, np.nan, 1.0])
    chosen = pick_in_band(labels, uncertainty, np.array([1, 2]), band=0.5)
    # cluster 0's median is 0.5 (index 2); cluster 1 takes its two scored ones first
    assert chosen.tolist() == [2, 5, 7]
    assert pick_in_band(labels, uncertainty, np.array([2, 0]), band=1.0).tolist() == [1, 4]
    assert pick_in_band(labels, uncertainty, np.array([1, 0]), band=0.0).tolist() == [0]
    # equal distance from the band: the earlier candidate (the earlier prototype) wins
    tied = pick_in_band(np.zeros(4, int), np.array([1.0, 2.0, 3.0, 4.0]), np.array([1]), 0.5)
    assert tied.tolist() == [1]
    # a NaN is taken only when nothing scored is left
    assert pick_in_band(labels, uncertainty, np.array([0, 3]), 0.5).tolist() == [5, 6, 7]
    with pytest.raises(ValueError, match="uncertainties for 8"):
        pick_in_band(labels, uncertainty[:3], np.array([1, 1]), 0.5)


def make_state(**rule) -> CoordinatorState:
    labels = np.arange(300) % K
    settings = ProgressSettings(
        budget=120, round_size=30, seed=4,
        rule=SelectionRule(metric="accuracy", within="uncertainty", explore=0.0, **rule),
    )  # fmt: skip
    state = CoordinatorState(settings, PoolClusters.from_labels(labels, K))
    state.set_diversity(np.arange(300) // K)  # prototype order = position order
    state.warmup(np.arange(30))
    for t in (BASELINE, 0):
        rows = state.eval_positions(t)
        state.report(t, np.full(rows.size, 0.2 if t == BASELINE else 0.5))
    return state


def test_a_round_is_drawn_by_the_uncertainty_of_its_candidates():
    state = make_state(candidates=3.0, band=0.5)
    offered = state.candidates(1)
    # every cluster progressed alike: 10 picks each, 30 candidates each, never a selected row
    assert offered.size == 90 and not state.ledger.selected[offered].any()
    assert (state.candidates(1) == offered).all()  # asked again: the same rows
    with pytest.raises(ValueError, match=r"needs one value per row of candidates\(1\) \(90\)"):
        state.next_round(1)
    uncertainty = np.arange(90, dtype=float)[::-1]  # the earliest offered are the most unsure
    picked = state.next_round(1, uncertainty)
    assert picked.size == 30 and state.records[-1].candidates == 90
    for c in range(K):
        mine = offered[state.clusters.labels[offered] == c]
        # of 30 candidates ranked by uncertainty, the 10 nearest its median: places 10-19
        assert sorted(set(mine[10:20])) == sorted(picked[state.clusters.labels[picked] == c])
    # once drawn, the round offers nothing and returns the same rows without values
    assert state.candidates(1).size == 0 and (state.next_round(1) == picked).all()


def test_one_candidate_per_pick_is_the_prototype_order():
    state = make_state(candidates=1.0)
    offered = state.candidates(1)
    picked = state.next_round(1, np.random.default_rng(0).random(offered.size))
    assert (np.sort(offered) == picked).all()
    assert picked.tolist() == [p for p in range(30, 60)]  # the next 10 prototypes each


def test_uniform_rule_offers_no_candidates():
    settings = ProgressSettings(budget=60, round_size=10, rule=SelectionRule())
    state = CoordinatorState(settings, PoolClusters.from_labels(np.arange(90) % K, K))
    state.warmup(np.arange(9))
    for t in (BASELINE, 0):
        state.report(t, np.zeros(state.eval_positions(t).size))
    assert state.candidates(1).size == 0 and state.next_round(1).size == 10


def test_greedy_uncertainty_is_the_mean_nll_of_the_models_own_answer(
    world, tokenizer, processor, model_cfg
):
    torch.manual_seed(0)
    model = build_llava(model_cfg, tokenizer)
    data = examples(world, 3)
    questions = [{"image": ex["image"], "question": ex["question"]} for ex in data]
    values = answer_uncertainty(model, processor, questions, max_length=model_cfg.max_length,
                                max_new_tokens=6)  # fmt: skip
    assert values.shape == (3,) and np.isfinite(values).all() and (values > 0).all()
    # one example alone, token by token: teacher-force its own greedy answer
    batch = collate(questions[:1], processor, max_length=model_cfg.max_length,
                    with_answers=False, padding_side="left")  # fmt: skip
    alone = greedy_uncertainty(model, batch, processor, max_new_tokens=6)[0]
    assert alone == pytest.approx(values[0], rel=1e-4)
    ids, nll = batch["input_ids"], []
    with torch.no_grad():
        for _ in range(6):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           pixel_values=batch["pixel_values"]).logits[0, -1]  # fmt: skip
            logp = torch.log_softmax(logits.float(), -1)
            token = int(logp.argmax())
            nll.append(-float(logp[token]))
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
            if token == tokenizer.eos_token_id:
                break
    assert alone == pytest.approx(float(np.mean(nll)), rel=1e-4)


def test_a_restored_coordinator_offers_and_draws_the_same_rows():
    """A coordinator restarted between the trainer's two calls (candidates, then the
    draw) restores from its checkpoint, reads the prototype order again, and offers and
    draws exactly what it would have."""
    state = make_state()
    offered = state.candidates(1)
    restored = CoordinatorState.from_bytes(state.to_bytes(), state.clusters)
    restored.set_diversity(np.arange(300) // K)
    assert (restored.candidates(1) == offered).all()
    uncertainty = np.random.default_rng(1).random(offered.size)
    assert (restored.next_round(1, uncertainty) == state.next_round(1, uncertainty)).all()
    assert restored.to_bytes() == state.to_bytes()


def test_a_round_with_no_progress_offers_nothing_and_explores():
    """No cluster's Δk is positive: no quota, no candidate, and the round is drawn
    uniformly without uncertainties (the trainer has none to send)."""
    state = make_state()
    state.report(0, np.full(state.eval_positions(0).size, 0.1))  # worse than the baseline
    assert state.candidates(1).size == 0
    picked = state.next_round(1, None)
    assert picked.size == 30 and state.records[-1].candidates == 0
    assert state.records[-1].explore == 30
