"""EL2N of the tiny LLaVA: bounds, one example recomputed token by token, padding and
chunking invariance, NaN without an answer token, the model's mode kept, and lower
once the model has learnt the examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.llava import IGNORE, build_llava, collate, sample_el2n, torch_stepper, train_step
from tests.engine.test_llava import examples, text_only_example


def direct_el2n(model, processor, example, max_length) -> float:
    """One example alone (no padding), token by token with softmax and one_hot."""
    batch = collate([example], processor, max_length=max_length)
    model.eval()
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        ).logits[0]  # (L, V)
    labels = batch["labels"][0]
    norms = []
    for t in range(len(labels) - 1):
        target = int(labels[t + 1])
        if target == IGNORE:
            continue
        p = torch.softmax(logits[t].double(), dim=-1)
        y = F.one_hot(torch.tensor(target), logits.shape[-1]).double()
        norms.append(float(torch.linalg.vector_norm(p - y)))
    return sum(norms) / len(norms)


def test_el2n_is_bounded_and_matches_a_direct_computation(world, tokenizer, processor, model_cfg):
    torch.manual_seed(0)
    model = build_llava(model_cfg, tokenizer)
    data = [*examples(world, 4), text_only_example()]
    scores = sample_el2n(model, processor, data, max_length=model_cfg.max_length)
    assert scores.shape == (5,) and scores.dtype == np.float64
    assert np.isfinite(scores).all()
    assert (scores >= 0).all() and (scores <= math.sqrt(2)).all()
    # Scored in a padded batch, each agrees with the example scored alone.
    for i in (0, 4):
        want = direct_el2n(model, processor, data[i], model_cfg.max_length)
        assert scores[i] == pytest.approx(want, rel=1e-5, abs=1e-6)
    chunked = sample_el2n(model, processor, data, max_length=model_cfg.max_length, batch_size=2)
    np.testing.assert_allclose(chunked, scores, rtol=1e-5, atol=1e-6)


def test_el2n_is_nan_without_answer_tokens_and_keeps_the_model_mode(
    world, tokenizer, processor, model_cfg
):
    model = build_llava(model_cfg, tokenizer)
    no_answer = {"image": None, "question": "What is 2 plus 3?", "answer": None}
    batch = collate([no_answer], processor, max_length=model_cfg.max_length)
    assert (batch["labels"] == IGNORE).all()
    model.train()
    scores = sample_el2n(
        model, processor, [text_only_example(), no_answer], max_length=model_cfg.max_length
    )
    assert np.isfinite(scores[0]) and np.isnan(scores[1])
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    sample_el2n(model, processor, [text_only_example()], max_length=model_cfg.max_length)
    assert not model.training
    assert sample_el2n(model, processor, [], max_length=model_cfg.max_length).shape == (0,)


def test_el2n_drops_after_training_on_the_scored_examples(world, tokenizer, processor, model_cfg):
    torch.manual_seed(0)
    model = build_llava(model_cfg, tokenizer)
    data = [*examples(world, 3), text_only_example()]
    before = sample_el2n(model, processor, data, max_length=model_cfg.max_length)
    batch = collate(data, processor, max_length=model_cfg.max_length)
    params = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    stepper = torch_stepper(model, [{"params": params, "lr": 1e-2}], 20, warmup=0.0)
    for _ in range(20):
        train_step(stepper, batch)
    after = sample_el2n(model, processor, data, max_length=model_cfg.max_length)
    assert (after < before).all(), (before, after)
    assert after.mean() < 0.8 * before.mean(), (before, after)
