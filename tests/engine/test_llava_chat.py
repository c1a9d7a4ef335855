"""Whole conversations through the chat template: every assistant turn labelled, token by
token, and nothing else; the image's placeholders whole; text-only samples; truncation."""

from __future__ import annotations

import numpy as np
import pytest

from engine.llava import IGNORE, LLAVA_CHAT_TEMPLATE, collate, encode_conversation
from engine.llava.chat import to_messages, truncate
from engine.llava.tokenizer import IMAGE

THREE_TURNS = [
    {"from": "human", "value": f"{IMAGE}\nWhat shape is the red object?"},
    {"from": "gpt", "value": "circle"},
    {"from": "human", "value": "How many squares are there?"},
    {"from": "gpt", "value": "2"},
    {"from": "human", "value": "Is there a blue ring?"},
    {"from": "gpt", "value": "yes"},
]


def tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids)


def test_every_assistant_turn_and_its_eos_is_labelled_token_by_token(tokenizer):
    enc = encode_conversation(tokenizer, THREE_TURNS, has_image=True, n_image_tokens=4)
    want = (
        ["<s>", "user", ":"] + [IMAGE] * 4 + ["what", "shape", "is", "the", "red", "object", "?"]
        + ["assistant", ":", "circle", "</s>"]
        + ["user", ":", "how", "many", "squares", "are", "there", "?"]
        + ["assistant", ":", "2", "</s>"]
        + ["user", ":", "is", "there", "a", "blue", "ring", "?"]
        + ["assistant", ":", "yes", "</s>"]
    )  # fmt: skip
    assert tokens(tokenizer, enc.ids) == want
    labelled = [t if lab != IGNORE else "_" for t, lab in zip(want, enc.labels, strict=True)]
    answers = {i for i, t in enumerate(want) if t in ("circle", "2", "yes", "</s>")}
    assert [i for i, t in enumerate(labelled) if t != "_"] == sorted(answers)
    assert all(lab == tid for lab, tid in zip(enc.labels, enc.ids, strict=True) if lab != IGNORE)
    assert enc.image_at == 3


def test_a_system_turn_and_a_text_only_sample_are_never_labelled_but_answers_are(tokenizer):
    turns = [{"from": "system", "value": "Answer red circle."}, *THREE_TURNS[:2]]
    enc = encode_conversation(tokenizer, turns, has_image=False, n_image_tokens=4)
    toks = tokens(tokenizer, enc.ids)
    assert IMAGE not in toks and toks[:4] == ["<s>", "answer", "red", "circle"]
    assert [t for t, lab in zip(toks, enc.labels, strict=True) if lab != IGNORE] == [
        "circle",
        "</s>",
    ]
    with pytest.raises(ValueError, match="from 'robot'"):
        to_messages([{"from": "robot", "value": "hi"}], has_image=False)


def test_the_image_goes_to_the_turn_that_names_it_and_generation_asks_the_first_question(
    tokenizer,
):
    late = [THREE_TURNS[0] | {"value": "What shape is the red object?"}, THREE_TURNS[1],
            {"from": "human", "value": f"Look again {IMAGE}"}, THREE_TURNS[3]]  # fmt: skip
    enc = encode_conversation(tokenizer, late, has_image=True, n_image_tokens=2)
    toks = tokens(tokenizer, enc.ids)
    assert toks.index(IMAGE) > toks.index("circle") and toks.count(IMAGE) == 2
    gen = encode_conversation(
        tokenizer, THREE_TURNS, has_image=True, n_image_tokens=2, generation=True
    )
    assert tokens(tokenizer, gen.ids)[-3:] == ["?", "assistant", ":"]
    assert "squares" not in tokens(tokenizer, gen.ids) and set(gen.labels) == {IGNORE}


def test_a_byte_level_bpe_tokenizer_labels_exactly_the_answer_text():
    """Spaces belong to the next word in byte-level BPE (GPT-2, Llama-3): the labels still
    decode to each answer and nothing around it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [t["value"] for t in THREE_TURNS] + ["USER: ASSISTANT: large green squares"] * 5
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", IMAGE],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        chat_template=LLAVA_CHAT_TEMPLATE,
    )  # fmt: skip
    enc = encode_conversation(fast, THREE_TURNS, has_image=True, n_image_tokens=3)
    spans, current = [], []
    for tid, lab in zip(enc.ids, enc.labels, strict=True):
        if lab == IGNORE:
            continue
        if tid == fast.eos_token_id:
            spans.append(fast.decode(current))
            current = []
        else:
            current.append(tid)
    assert [s.strip() for s in spans] == ["circle", "2", "yes"]
    assert enc.ids.count(fast.convert_tokens_to_ids(IMAGE)) == 3


def test_truncation_keeps_the_image_whole_and_refuses_an_image_that_does_not_fit(tokenizer):
    enc = encode_conversation(tokenizer, THREE_TURNS, has_image=True, n_image_tokens=16)
    cut = truncate(enc, 30, 16, "pool-1")
    assert len(cut.ids) == 30 and cut.ids == enc.ids[:30]
    assert cut.ids.count(tokenizer.convert_tokens_to_ids(IMAGE)) == 16
    assert truncate(enc, 1000, 16, "pool-1") is enc
    with pytest.raises(ValueError, match="pool-1.*raise max_length"):
        truncate(enc, 12, 16, "pool-1")


def test_collate_trains_every_turn_and_scores_the_first(world, tokenizer, processor):
    image = np.zeros((64, 64, 3), np.uint8)
    examples = [
        {"id": "a", "image": image, "conversations": THREE_TURNS},
        {"id": "b", "image": None, "question": "What is 2 plus 3?", "answer": "5"},
    ]
    batch = collate(examples, processor, max_length=160)
    labelled = [tokens(tokenizer, row[row != IGNORE].tolist()) for row in batch["labels"]]
    assert labelled == [["circle", "</s>", "2", "</s>", "yes", "</s>"], ["5", "</s>"]]
    assert batch["pixel_values"].shape == (1, 3, 64, 64)
    assert (batch["input_ids"][0] == tokenizer.convert_tokens_to_ids(IMAGE)).sum() == 16
    prompts = collate(examples, processor, max_length=160, with_answers=False, padding_side="left")
    assert tokens(tokenizer, prompts["input_ids"][0, -3:].tolist()) == ["?", "assistant", ":"]
