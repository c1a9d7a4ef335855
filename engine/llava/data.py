"""LLaVA-style chat formatting and collation.

One example is a mapping with ``image`` (encoded bytes, a uint8 (H, W, 3) array, or
None for a text-only sample), ``question`` (no '<image>' token) and ``answer``
(absent or None for generation). The prompt puts the image BEFORE the question, as
LLaVA does (the image after the question did worse on the world):

    <s> USER: <image> x N  {question} ASSISTANT: {answer} </s>

Labels are -100 everywhere but the answer tokens and the closing eos, so the loss
and the per-sample loss score only what the model is asked to say.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from engine.llava.model import decode_images, model_device, pixel_values, vision_dtype
from engine.llava.tokenizer import ASSISTANT, USER, image_token_id

IGNORE = -100
_TENSOR_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def format_example(
    tokenizer, question: str, answer: str | None, n_image_tokens: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example (``n_image_tokens`` 0 for a text-only sample).

    Returns (ids, labels), equal lengths; labels are IGNORE over the prompt. With
    ``answer`` None the ids end at 'ASSISTANT:' (a generation prompt) and no label is set.
    """
    image = [image_token_id(tokenizer)] * n_image_tokens
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt = bos + _encode(tokenizer, USER) + image
    prompt += _encode(tokenizer, question) + _encode(tokenizer, ASSISTANT)
    if answer is None:
        return prompt, [IGNORE] * len(prompt)
    target = _encode(tokenizer, answer) + [tokenizer.eos_token_id]
    return prompt + target, [IGNORE] * len(prompt) + target


def collate(
    examples: Sequence[Mapping[str, Any]],
    tokenizer,
    *,
    image_size: int,
    n_image_tokens: int,
    max_length: int,
    with_answers: bool = True,
    padding_side: str = "right",
    blank_images: bool = False,
    pixels: bool = True,
) -> dict[str, Any]:
    """A padded batch of B examples, on CPU.

    Returns a dict:
        input_ids: int64 (B, L); attention_mask: int64 (B, L), 0 on padding;
        labels: int64 (B, L), IGNORE except answer tokens + eos (only with_answers);
        pixel_values: float32 (n_img, 3, image_size, image_size), CLIP-normalised, one row
            per example that has an image, in batch order; None when none has;
        has_image: bool (B,).
    ``padding_side`` 'left' for generation. ``blank_images`` keeps the image tokens but
    feeds black pixels: the text-only prior of the same model. ``pixels`` False leaves
    pixel_values None but keeps the image tokens (their inputs come from elsewhere:
    ``engine.llava.language``'s scene cells).

    Raises:
        ValueError: a prompt longer than max_length (name the example), or an answer missing.
    """
    import torch

    rows, imgs, has_image = [], [], []
    for i, ex in enumerate(examples):
        image = ex.get("image")
        answer = ex.get("answer") if with_answers else None
        if with_answers and answer is None:
            raise ValueError(f"example {i} has no answer; collate(with_answers=False) to generate")
        n_img = n_image_tokens if image is not None else 0
        ids, labels = format_example(tokenizer, ex["question"], answer, n_img)
        if len(ids) > max_length:
            prompt_len = sum(lab == IGNORE for lab in labels)
            if prompt_len >= max_length:
                raise ValueError(
                    f"example {i} ({ex.get('id', '?')}): prompt of {prompt_len} tokens does not "
                    f"fit max_length {max_length}; raise max_length"
                )
            ids, labels = ids[:max_length], labels[:max_length]  # cut the answer's tail
        rows.append((ids, labels))
        has_image.append(image is not None)
        if image is not None:
            imgs.append(np.zeros((image_size, image_size, 3), np.uint8) if blank_images else image)
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels_t = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for b, (ids, labels) in enumerate(rows):
        sl = slice(0, len(ids)) if padding_side == "right" else slice(width - len(ids), width)
        input_ids[b, sl] = torch.tensor(ids)
        attention[b, sl] = 1
        labels_t[b, sl] = torch.tensor(labels)
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "pixel_values": (
            pixel_values(decode_images(imgs, image_size)) if imgs and pixels else None
        ),
        "has_image": torch.tensor(has_image, dtype=torch.bool),
    }
    if with_answers:
        batch["labels"] = labels_t
    return batch


def collate_for(model, tokenizer, examples, max_length: int, **kw) -> dict[str, Any]:
    """``collate`` with the image size and token count read from ``model``'s config."""
    base = model.module if hasattr(model, "module") else model
    cfg = base.config
    vc = cfg.vision_config
    n_tokens = (vc.image_size // vc.patch_size) ** 2 + (
        cfg.vision_feature_select_strategy == "full"
    )
    return collate(
        examples,
        tokenizer,
        image_size=vc.image_size,
        n_image_tokens=n_tokens,
        max_length=max_length,
        **kw,
    )


def model_inputs(batch: Mapping[str, Any], model) -> dict[str, Any]:
    """The model's keyword arguments from a batch, moved to its device (pixels in its dtype)."""
    device = model_device(model)
    out = {}
    for key in _TENSOR_KEYS:
        value = batch.get(key)
        if value is None:
            continue
        if key == "pixel_values":
            value = value.to(device, vision_dtype(model), non_blocking=True)
        else:
            value = value.to(device, non_blocking=True)
        out[key] = value
    return out
