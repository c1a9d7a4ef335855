"""The base's scene-language pretraining (engine.llava.language) on a tiny real LLaVA:
the scene texts, cells in the image tokens' places, what each stage trains."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.llava import BaseTrainConfig, build_llava, collate
from engine.llava.base import align_captions
from engine.llava.language import (
    EMPTY,
    cell_words,
    language_accuracy,
    pretrain_language,
    scene_forward,
)
from engine.llava.scenes import generate_scene_texts, generate_scenes
from engine.world.config import IMAGE_FAMILIES, TEXT_FAMILY
from engine.world.render import SceneObject
from tests.engine.test_llava import TINY_TRAIN


@pytest.fixture
def model(tokenizer, model_cfg):
    return build_llava(model_cfg, tokenizer)


def obj(row, col, shape="circle", colour="red", size="large", digit=None):
    return SceneObject(shape=shape, colour=colour, size=size, row=row, col=col, digit=digit)


def test_cells_are_row_major_words_with_cards_reading_their_digit():
    cells = cell_words([obj(0, 1), obj(3, 2, shape="card", colour="blue", digit=7)], grid=4)
    assert len(cells) == 16
    assert cells[1] == ["large", "red", "circle"]
    assert cells[14] == ["large", "blue", "card", "7"]
    assert all(c == [EMPTY] for k, c in enumerate(cells) if k not in (1, 14))


def test_scene_texts_use_known_words_the_families_asked_and_a_text_share(world, tokenizer):
    texts = generate_scene_texts(world, 11, 0, 400, text_share=0.2)
    assert len(texts) == 400 and set(texts.families) <= {*IMAGE_FAMILIES, TEXT_FAMILY}
    text_only = [i for i, f in enumerate(texts.families) if f == TEXT_FAMILY]
    assert 40 < len(text_only) < 120 and all(not texts.objects[i] for i in text_only)
    words = {w for objs in texts.objects for cell in cell_words(objs, 4) for w in cell}
    unk = tokenizer.unk_token_id
    assert all(tokenizer.convert_tokens_to_ids(w) != unk for w in words), words
    ids = tokenizer([*texts.questions, *texts.answers], add_special_tokens=False)["input_ids"]
    assert all(unk not in row for row in ids)
    only = generate_scene_texts(world, 11, 0, 60, families={"counting": 1.0, "spatial": 1.0})
    assert set(only.families) == {"counting", "spatial"}
    again = generate_scene_texts(world, 11, 10, 5, text_share=0.2)
    assert again.questions == texts.questions[10:15]  # a text depends on its index alone


def test_the_cells_fill_the_image_tokens_in_order(world, tokenizer, processor, model):
    example = {"image": np.zeros((64, 64, 3), np.uint8), "question": "Is there a red circle?",
               "answer": "yes"}  # fmt: skip
    batch = collate([example], processor, max_length=160)
    model.eval()
    with torch.no_grad():
        a = scene_forward(model, tokenizer, batch, [[obj(0, 0)]], 4).logits
        same = scene_forward(model, tokenizer, batch, [[obj(0, 0)]], 4).logits
        moved = scene_forward(model, tokenizer, batch, [[obj(2, 3)]], 4).logits
    assert a.equal(same) and not torch.allclose(a, moved)


def test_language_pretraining_trains_the_lm_only_and_learns(world, processor, model):
    texts = generate_scene_texts(world, 11, 0, 64, text_share=0.1)
    tower = [p.detach().clone() for p in model.model.vision_tower.parameters()]
    proj = [p.detach().clone() for p in model.model.multi_modal_projector.parameters()]
    lm = [p.detach().clone() for p in model.model.language_model.parameters()]
    losses = pretrain_language(
        model, processor, texts, steps=30, batch=16, lr=1e-2, caption_share=0.25,
        caption_style="objects", warmup=0.0, max_length=160, log=lambda m: None, seed=0,
    )  # fmt: skip
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert all(
        p.equal(q) for p, q in zip(model.model.vision_tower.parameters(), tower, strict=True)
    )
    assert all(
        p.equal(q)
        for p, q in zip(model.model.multi_modal_projector.parameters(), proj, strict=True)
    )
    assert any(
        not p.equal(q) for p, q in zip(model.model.language_model.parameters(), lm, strict=True)
    )
    acc = language_accuracy(model, processor, texts, 160)
    assert set(acc) == set(texts.families) and all(0 <= v <= 1 for v in acc.values())


def test_stage_one_trains_the_projector_alone_over_the_frozen_lm(world, processor, model):
    cfg = BaseTrainConfig.model_validate({**TINY_TRAIN, "caption_steps": 2})
    scenes = generate_scenes(world, 11, 0, 16)
    lm = [p.detach().clone() for p in model.model.language_model.parameters()]
    proj = [p.detach().clone() for p in model.model.multi_modal_projector.parameters()]
    align_captions(model, processor, scenes, cfg, 160, log=lambda m: None)
    assert all(p.equal(q) for p, q in zip(model.model.language_model.parameters(), lm, strict=True))
    assert any(
        not p.equal(q)
        for p, q in zip(model.model.multi_modal_projector.parameters(), proj, strict=True)
    )
    both = cfg.model_copy(update={"caption_trains": "projector+lm"})
    align_captions(model, processor, scenes, both, 160, log=lambda m: None)
    assert any(
        not p.equal(q) for p, q in zip(model.model.language_model.parameters(), lm, strict=True)
    )


def test_unknown_language_families_and_an_lm_never_trained_are_refused():
    with pytest.raises(ValueError, match="unknown image family"):
        BaseTrainConfig(language_families={"juggling": 1.0})
    with pytest.raises(ValueError, match="caption_trains: projector\\+lm"):
        BaseTrainConfig(language_steps=0)
    assert BaseTrainConfig(language_steps=0, caption_trains="projector+lm").language_steps == 0
