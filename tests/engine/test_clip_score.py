"""CLIP-Score with the tiny random CLIP (offline): shapes, bounds, determinism, one text
whichever form the row takes, NaN without an image, and the trained-tower verdict."""

from __future__ import annotations

import numpy as np
import torch

from engine.clip_score import clip_scores, clip_tokenizer, has_trained_text_tower, row_text
from engine.encoders import EncoderSpec
from tests.engine.test_encoders import TINY, png

# Seed 1's random towers put every image row above the clamp, so the equality checks
# compare real cosines, not zeros; seed 0 clamps most of them.
SPEC: EncoderSpec = TINY["clip"].model_copy(update={"seed": 1})


def rows() -> list[dict]:
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    out = [
        {
            "id": f"r{i}",
            "image": png(80, 64, (40 * i, 255 - 40 * i, 30 * i)),
            "question": f"What color is the circle?\nAnswer the question using a single word. {i}",
            "answer": colours[i],
        }
        for i in range(6)
    ]
    # The same (image, text) as r0, as LLaVA conversations with the image token.
    out.append(
        {
            "id": "r0-again",
            "image": out[0]["image"],
            "conversations": [
                {"from": "human", "value": "<image>\n" + out[0]["question"]},
                {"from": "gpt", "value": "red"},
                {"from": "human", "value": "And the square?"},
                {"from": "gpt", "value": "blue"},
            ],
        }
    )
    out.append({"id": "text", "image": None, "question": "What is 2 plus 3?", "answer": "5"})
    out.append({"id": "broken", "image": b"not an image", "question": "Shape?", "answer": "x"})
    return out


def test_row_text_is_the_first_exchange_without_image_token_or_format_suffix():
    data = rows()
    assert row_text(data[0]) == "What color is the circle? red"
    assert row_text(data[6]) == row_text(data[0])


def test_clip_scores_are_bounded_deterministic_and_equal_for_equal_rows():
    data = rows()
    scores = clip_scores(SPEC, data, batch_size=4)
    assert scores.shape == (len(data),) and scores.dtype == np.float64
    image_rows = scores[:7]
    assert np.isfinite(image_rows).all() and (image_rows >= 0).all() and (image_rows <= 100).all()
    assert (image_rows > 0).all()
    assert len(set(image_rows[:6].round(6).tolist())) == 6
    assert scores[6] == scores[0]  # same image and text, other row form and batch
    assert np.isnan(scores[7]) and np.isnan(scores[8])  # no image, undecodable image
    again = clip_scores(SPEC, data, batch_size=64)
    np.testing.assert_allclose(again, scores, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert clip_scores(SPEC, [], batch_size=4).shape == (0,)
    clamped = clip_scores(TINY["clip"], data[:7], batch_size=4)
    assert (clamped >= 0).all() and (clamped == 0).any()  # negative cosines score 0


def test_tiny_vocabulary_keeps_end_of_text_as_the_pooled_maximum():
    tokens = clip_tokenizer(SPEC)(["What color is the circle? red " * 5, "a"])
    vocab = SPEC.arch["text_cfg"]["vocab_size"]
    assert tokens.shape == (2, SPEC.arch["text_cfg"]["context_length"])
    assert tokens.dtype == torch.long and int(tokens.max()) == vocab - 1
    assert tokens[0, -1] == vocab - 1  # cut to the context, end-of-text kept
    assert tokens[1].tolist()[:3] == [vocab - 2, tokens[1, 1], vocab - 1]
    assert (tokens.argmax(1) == torch.tensor([15, 2])).all()


def test_only_a_trained_open_clip_text_tower_counts(tmp_path):
    ok, reason = has_trained_text_tower(SPEC)
    assert not ok and "random" in reason and "untrained" in reason
    ok, reason = has_trained_text_tower(TINY["dino"])
    assert not ok and "no text tower" in reason
    ok, reason = has_trained_text_tower(EncoderSpec(kind="open_clip", model="tiny-clip"))
    assert not ok and "weights: random" in reason  # no pretrained weights exist for it
    ckpt = tmp_path / "clip.pt"
    ckpt.write_bytes(b"")
    ok, reason = has_trained_text_tower(
        EncoderSpec(kind="open_clip", model="ViT-B-32", pretrained=str(ckpt))
    )
    assert ok and str(ckpt) in reason
    missing = EncoderSpec(kind="open_clip", model="ViT-B-32", pretrained=str(tmp_path / "no.pt"))
    ok, reason = has_trained_text_tower(missing)
    assert not ok and "not found" in reason
