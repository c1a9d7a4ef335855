"""The tiny LLaVA with real (tiny) transformers and PEFT models: tokenizer, collation,
forward, the shared train step, generation + judge, LoRA set-up, the cached base."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.artifacts import BaseModelArtifact
from engine.errors import InputError
from engine.llava import (
    IGNORE,
    BaseTrainConfig,
    EpochBatcher,
    FinetuneConfig,
    build_llava,
    build_or_load_base,
    collate,
    generate_answers,
    is_match,
    load_base,
    load_tokenizer,
    normalize_answer,
    param_groups,
    per_sample_loss,
    prepare_for_finetune,
    torch_stepper,
    train_step,
)
from engine.llava.model import image_tokens_of
from engine.llava.scenes import generate_scenes
from engine.llava.tokenizer import CAPTION_PROMPTS, IMAGE, world_corpus
from engine.workspace import Workspace
from engine.world.config import IMAGE_FAMILIES, TEXT_FAMILY
from engine.world.generate import generate_sample

TINY = {
    "vision": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
    "text": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
    "max_length": 160,
}
TINY_TRAIN = {
    "vision_scenes": 32,
    "vision_steps": 3,
    "vision_batch": 8,
    "caption_scenes": 32,
    "caption_steps": 3,
    "caption_batch": 8,
    "language_scenes": 32,
    "language_steps": 3,
    "language_batch": 8,
    "eval_scenes": 8,
    "device": "cpu",
}


def examples(world, n, split="test"):
    out = []
    for i in range(n):
        s, img = generate_sample(world, split, i)
        out.append({"image": img, "question": s.question, "answer": s.answer, "family": s.family})
    return out


def text_only_example():
    return {"image": None, "question": "What is 2 plus 3?", "answer": "5"}


def test_tokenizer_round_trip_and_no_unknown_words(world, tokenizer, tmp_path):
    text = "What color is the circle?\nAnswer the question using a single word or number."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert normalize_answer(tokenizer.decode(ids)) == normalize_answer(text)
    corpus_ids = tokenizer(world_corpus(world), add_special_tokens=False)["input_ids"]
    assert all(tokenizer.unk_token_id not in row for row in corpus_ids)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    assert tokenizer(f"{IMAGE} red", add_special_tokens=False)["input_ids"][0] == image_id
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [0, 1, 2]
    tokenizer.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(str(tmp_path / "tok"))
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert again.convert_tokens_to_ids(IMAGE) == image_id


@pytest.mark.parametrize("style", ["objects", "rows"])
def test_base_captions_of_either_style_have_no_unknown_words(world, tokenizer, style):
    scenes = generate_scenes(world, 7, 0, 24, card_share=0.5, caption_style=style)
    assert scenes.prompt == CAPTION_PROMPTS[style]
    for text in [scenes.prompt, *scenes.captions]:
        assert tokenizer.unk_token_id not in tokenizer(text, add_special_tokens=False)["input_ids"]
    again = generate_scenes(world, 7, 8, 4, card_share=0.5, caption_style=style)
    assert again.captions == scenes.captions[8:12]  # a scene's caption depends on it alone
    with pytest.raises(InputError, match="unknown caption style"):
        generate_scenes(world, 7, 0, 1, caption_style="poems")


def test_load_tokenizer_names_a_missing_folder(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_tokenizer(str(tmp_path / "nope"))


def test_collate_pads_masks_and_stacks_images(world, tokenizer, processor, model_cfg):
    batch_ex = [*examples(world, 3), text_only_example()]
    right = collate(batch_ex, processor, max_length=model_cfg.max_length)
    assert right["pixel_values"].shape == (3, 3, 64, 64)
    assert right["has_image"].tolist() == [True, True, True, False]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    assert (right["input_ids"] == image_id).sum(1).tolist() == [16, 16, 16, 0]
    pad = right["attention_mask"] == 0
    assert (right["labels"][pad] == IGNORE).all()
    assert (right["input_ids"][pad] == tokenizer.pad_token_id).all()
    for b, ex in enumerate(batch_ex):
        kept = right["labels"][b][right["labels"][b] != IGNORE].tolist()
        want = tokenizer(ex["answer"], add_special_tokens=False)["input_ids"]
        assert kept == [*want, tokenizer.eos_token_id]
    left = collate(
        batch_ex, processor, max_length=model_cfg.max_length, with_answers=False,
        padding_side="left",
    )  # fmt: skip
    assert "labels" not in left
    assert (left["attention_mask"][:, -1] == 1).all()
    blank = collate(batch_ex, processor, max_length=model_cfg.max_length, blank_images=True)
    assert np.allclose(blank["pixel_values"][0], blank["pixel_values"][1])


@pytest.mark.parametrize("blank", [False, True])
@pytest.mark.parametrize("cache_bytes", [2**30, 0])
def test_epoch_batcher_equals_collate_batch_for_batch(
    world, processor, model_cfg, blank, cache_bytes
):
    pool = [*examples(world, 5), text_only_example()]
    batcher = EpochBatcher(
        pool, processor, max_length=model_cfg.max_length, blank_images=blank,
        pixel_cache_bytes=cache_bytes,
    )  # fmt: skip
    assert batcher.keep_pixels == (cache_bytes > 0)
    # an epoch's batches draw rows again, in other company, twice in one batch, text only
    for idx in ([0, 1, 5], [5, 2, 0], [3, 3, 4], [5], [4, 0, 1, 2, 3, 5]):
        want = collate(
            [pool[i] for i in idx], processor, max_length=model_cfg.max_length,
            blank_images=blank,
        )  # fmt: skip
        got = batcher.batch(idx)
        assert got.keys() == want.keys()
        for key, value in want.items():
            if value is None:
                assert got[key] is None
            else:
                assert torch.equal(got[key], value), key
    # each row was encoded once, however often it was drawn
    assert sorted(batcher._rows) == list(range(6))


def test_forward_loss_is_finite_with_one_image_token_per_patch(
    world, tokenizer, processor, model_cfg
):
    model = build_llava(model_cfg, tokenizer)
    batch = collate(
        [*examples(world, 2), text_only_example()], processor, max_length=model_cfg.max_length
    )
    # One placeholder per patch (16 for a 64-px image of 16-px patches), none for text only;
    # the forward itself refuses a count that differs from the projected image features.
    placeholders = (batch["input_ids"] == model.config.image_token_index).sum(1).tolist()
    assert placeholders == [16, 16, 0] and image_tokens_of(model) == 16
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}
    out = model(**inputs)
    assert math.isfinite(float(out.loss.detach()))
    short = inputs["input_ids"].clone()  # one placeholder fewer than the image's features
    short[0, short[0].tolist().index(model.config.image_token_index)] = tokenizer.pad_token_id
    with pytest.raises(ValueError, match="image tokens do not match"):
        model(**{**inputs, "input_ids": short})
    per = per_sample_loss(model, batch)
    assert per.shape == (3,) and bool(np.isfinite(per.numpy()).all())


def test_train_step_learns_a_hand_example_then_greedy_answers_match(
    world, tokenizer, processor, model_cfg
):
    model = build_llava(model_cfg, tokenizer)
    data = [
        {"image": None, "question": "What is 2 plus 3?", "answer": "5"},
        {"image": None, "question": "What is 4 times 4?", "answer": "16"},
        {**examples(world, 1)[0], "answer": "large red circle"},
    ]
    batch = collate(data, processor, max_length=model_cfg.max_length)
    params = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    stepper = torch_stepper(model, [{"params": params, "lr": 1e-2}], 60, warmup=0.0)
    before = float(per_sample_loss(model, batch).mean())
    losses = [train_step(stepper, batch) for _ in range(60)]
    assert losses[-1] < 0.05 < before
    prompts = collate(
        data, processor, max_length=model_cfg.max_length, with_answers=False, padding_side="left"
    )
    answers = generate_answers(model, prompts, processor, max_new_tokens=5)
    assert [is_match(a, ex["answer"]) for a, ex in zip(answers, data, strict=True)] == [True] * 3


def test_judge_normalizes_case_punctuation_articles_and_number_words():
    assert is_match("The Red.", "red")
    assert is_match("  two ", "2")
    assert is_match("a large circle!", "large circle")
    assert not is_match("3", "2")
    assert not is_match("", "yes")


def test_lora_trains_adapters_and_projector_never_the_tower(world, tokenizer, processor, model_cfg):
    model = build_llava(model_cfg, tokenizer)
    tower = model.model.vision_tower
    tower_before = [p.detach().clone() for p in tower.parameters()]
    cfg = FinetuneConfig.model_validate({"lora": {"r": 4, "alpha": 8}, "projector_lr": 1e-2})
    peft_model = prepare_for_finetune(model, cfg)
    groups = param_groups(peft_model, cfg)
    names = {id(p): n for n, p in peft_model.named_parameters()}
    lm = [names[id(p)] for p in groups[0]["params"]]
    proj = [names[id(p)] for p in groups[1]["params"]]
    assert proj and all("multi_modal_projector" in n for n in proj)
    assert any("lora_A" in n for n in lm) and all("vision_tower" not in n for n in lm)
    assert all("language_model" in n or "embed" in n or "lm_head" in n for n in lm)
    proj_before = [p.detach().clone() for p in groups[1]["params"]]
    stepper = torch_stepper(peft_model, groups, 2)
    batch = collate(examples(world, 4), processor, max_length=model_cfg.max_length)
    assert math.isfinite(train_step(stepper, batch))
    assert math.isfinite(train_step(stepper, batch))
    assert any(not p.equal(q) for p, q in zip(groups[1]["params"], proj_before, strict=True))
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "vision" in n)
    assert all(p.equal(q) for p, q in zip(tower.parameters(), tower_before, strict=True))


def test_base_is_cached_reused_by_fingerprint_and_refused_when_changed(world, model_cfg, tmp_path):
    ws = Workspace.open(str(tmp_path / "ws"))
    train = BaseTrainConfig.model_validate(TINY_TRAIN)
    logs = []
    base, built = build_or_load_base(ws, world, model_cfg, train, log=logs.append)
    assert built
    meta = base.meta.model_dump()
    assert set(meta["metrics"]["vision_patch_accuracy"]) == {
        "colour",
        "shape",
        "size",
        "glyph",
        "row",
        "col",
    }
    assert math.isfinite(meta["metrics"]["caption_loss"])
    assert set(meta["metrics"]["language_accuracy"]) <= {*IMAGE_FAMILIES, TEXT_FAMILY}
    committed = BaseModelArtifact.open(ws, "tiny-llava")
    assert {f.split("/")[0] for f in committed.manifest.files} == {"model"}
    # one Hugging Face checkpoint folder with its processor, as llava-hf ships them
    names = {f.split("/")[-1] for f in committed.manifest.files}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
            "chat_template.jinja"} <= names  # fmt: skip
    assert committed.files("model", ".safetensors") and committed.dir == base.path
    again, built = build_or_load_base(ws, world, model_cfg, train, log=logs.append)
    assert not built and again.fingerprint == base.fingerprint == meta["recipe"]
    for (n, p), (_, q) in zip(
        base.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert p.equal(q), n
    # device and threads say where it trains, not what it is
    moved = train.model_copy(update={"torch_threads": 1})
    assert not build_or_load_base(ws, world, model_cfg, moved, log=logs.append)[1]
    changed = train.model_copy(update={"caption_steps": 4})
    with pytest.raises(InputError, match="--overwrite"):
        build_or_load_base(ws, world, model_cfg, changed, log=logs.append)
    with pytest.raises(InputError, match="another config"):
        load_base(ws, fingerprint="0" * 16)


def test_a_base_that_fails_while_saving_leaves_nothing_behind(
    world, model_cfg, tmp_path, monkeypatch
):
    from transformers import PreTrainedTokenizerFast

    ws = Workspace.open(str(tmp_path / "ws"))
    train = BaseTrainConfig.model_validate(TINY_TRAIN)

    def crash(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        build_or_load_base(ws, world, model_cfg, train, log=lambda m: None)
    assert BaseModelArtifact.find(ws, "tiny-llava") is None
    assert not (tmp_path / "ws" / "models").exists()
    with pytest.raises(InputError, match="vlselect base"):
        load_base(ws)


def test_base_refuses_the_pools_seed_and_a_grid_the_tower_cannot_read(world, model_cfg, tmp_path):
    from engine.llava.scenes import base_world, check_grid

    with pytest.raises(InputError, match="seed"):
        base_world(world, world.seed)
    with pytest.raises(InputError, match="patch_size"):
        check_grid(world, 64, 8)


def test_the_base_world_can_leave_out_domains_the_pool_has(world):
    from pydantic import ValidationError

    from engine.llava.config import BaseTrainConfig
    from engine.llava.scenes import base_world

    seen = {"meadow": 0.6, "ocean": 0.4}
    bw = base_world(world, world.seed + 1, domains=seen)
    assert bw.domains == seen and world.domains != seen and bw.seed == world.seed + 1
    assert base_world(world, world.seed + 1).domains == world.domains
    scenes = generate_scenes(world, world.seed + 1, 0, 4, domains={"snow": 1.0})
    pale = generate_scenes(world, world.seed + 1, 0, 4, domains={"space": 1.0})
    assert scenes.images.mean() > pale.images.mean()  # snow scenes are pale, space dark
    with pytest.raises(ValidationError, match="unknown domain"):
        BaseTrainConfig(domains={"mars": 1.0})


def test_a_base_fingerprint_changes_with_the_domains_knob_only_when_it_is_set(world):
    from engine.llava.cache import base_fingerprint
    from engine.llava.config import BaseTrainConfig, LlavaModelConfig, fingerprint

    model = LlavaModelConfig()
    plain = base_fingerprint(world, model, BaseTrainConfig())
    dump = BaseTrainConfig().model_dump(mode="json", exclude={"device", "torch_threads"})
    dump.pop("domains")  # what a base cached before the knob existed was keyed by
    # nor did the world have turns then (and the base never sees the pool's turns)
    rendering = world.model_dump(
        mode="json", exclude={"size", "shard_size", "benchmarks", "test_size", "turns"}
    )
    assert plain == fingerprint(model, dump, rendering)
    assert base_fingerprint(world, model, BaseTrainConfig(domains={"meadow": 1.0})) != plain
