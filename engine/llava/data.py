"""Batches of whole conversations for a LLaVA checkpoint, with its own processor.

``processor`` is the checkpoint's ``LlavaProcessor`` (its tokenizer and chat template,
its image processor); examples are those of ``engine.llava.chat``. The image comes
before the first question, as LLaVA-1.5 puts it (llava-hf's template renders
``USER: <image>\\n{question} ASSISTANT: {answer} USER: ...``), every image filling the
checkpoint's placeholder count. Labels are IGNORE everywhere but the assistant turns'
tokens and their closing eos, so the loss and the per-sample loss score only what the
model is asked to say, every turn of it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from engine.llava.chat import IGNORE, encode_conversation, truncate, turns_of
from engine.llava.model import model_device, vision_dtype

_TENSOR_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values")

__all__ = ["IGNORE", "collate", "image_tokens", "model_inputs", "pixels_of", "tokenizer_of"]


def tokenizer_of(processor):
    """The tokenizer inside a processor (a bare tokenizer is returned as it is)."""
    return getattr(processor, "tokenizer", processor)


def image_tokens(processor) -> int:
    """Placeholders one image fills: (crop / patch)^2, plus the CLS the processor counts,
    minus it again under the 'default' strategy (llava-1.5: 336 / 14 -> 576)."""
    crop = processor.image_processor.crop_size
    n = (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size)
    n += processor.num_additional_image_tokens
    return n - (processor.vision_feature_select_strategy == "default")


def _pil(image):
    from PIL import Image

    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    with Image.open(io.BytesIO(image)) as pil:
        return pil.convert("RGB")


def pixels_of(processor, images: Sequence[bytes | np.ndarray]):
    """Encoded images or uint8 (H, W, 3) arrays -> float32 torch (n, 3, S, S) by the
    checkpoint's image processor (resize, crop, CLIP normalisation). Raises ValueError
    naming the index of an undecodable image."""
    decoded = []
    for i, image in enumerate(images):
        try:
            decoded.append(_pil(image))
        except (OSError, ValueError) as err:
            raise ValueError(f"image {i} of the batch is not decodable: {err}") from None
    return processor.image_processor(images=decoded, return_tensors="pt")["pixel_values"]


def collate(
    examples: Sequence[Mapping[str, Any]],
    processor,
    *,
    max_length: int,
    with_answers: bool = True,
    padding_side: str = "right",
    blank_images: bool = False,
    pixels: bool = True,
) -> dict[str, Any]:
    """A padded batch of B examples, on CPU.

    Returns a dict:
        input_ids: int64 (B, L); attention_mask: int64 (B, L), 0 on padding;
        labels: int64 (B, L), IGNORE except assistant tokens + eos (only with_answers);
        pixel_values: float32 (n_img, 3, S, S) from the image processor, one row per
            example that has an image, in batch order; None when none has;
        has_image: bool (B,).
    ``with_answers`` False: each example's first question with the generation prompt
    (greedy answering). ``padding_side`` 'left' for generation. ``blank_images`` keeps the
    image tokens but feeds black pixels: the text-only prior of the same model. ``pixels``
    False leaves pixel_values None but keeps the image tokens (their inputs come from
    elsewhere: ``engine.llava.language``'s scene cells).

    Raises:
        ValueError: an image whose tokens do not fit max_length (naming the example), an
            undecodable image, or a conversation the chat template cannot render.
    """
    import torch

    tokenizer = tokenizer_of(processor)
    n_tokens = image_tokens(processor)
    rows, imgs, has_image = [], [], []
    for i, ex in enumerate(examples):
        image = ex.get("image")
        encoded = encode_conversation(
            tokenizer,
            turns_of(ex, with_answers),
            has_image=image is not None,
            n_image_tokens=n_tokens,
            generation=not with_answers,
        )
        encoded = truncate(encoded, max_length, n_tokens, str(ex.get("id", f"#{i}")))
        rows.append(encoded)
        has_image.append(image is not None)
        if image is not None:
            imgs.append(_blank(image, processor) if blank_images else image)
    width = max(len(r.ids) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(0, len(r.ids)) if padding_side == "right" else slice(width - len(r.ids), width)
        input_ids[b, sl] = torch.tensor(r.ids)
        attention[b, sl] = 1
        labels[b, sl] = torch.tensor(r.labels)
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "pixel_values": pixels_of(processor, imgs) if imgs and pixels else None,
        "has_image": torch.tensor(has_image, dtype=torch.bool),
    }
    if with_answers:
        batch["labels"] = labels
    return batch


def _blank(image, processor) -> np.ndarray:
    crop = processor.image_processor.crop_size
    return np.zeros((crop["height"], crop["width"], 3), np.uint8)


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
