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

from engine.llava.chat import IGNORE, Encoded, encode_conversation, truncate, turns_of
from engine.llava.model import model_device, vision_dtype

_TENSOR_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values")
# an EpochBatcher keeps its examples' pixels up to this (then processes them per batch)
PIXEL_CACHE_BYTES = 2**30

__all__ = [
    "IGNORE",
    "EpochBatcher",
    "collate",
    "image_tokens",
    "model_inputs",
    "pixels_of",
    "tokenizer_of",
]


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
    tokenizer = tokenizer_of(processor)
    rows = [_encode(ex, i, processor, max_length, with_answers) for i, ex in enumerate(examples)]
    images = [ex.get("image") for ex in examples]
    imgs = [_blank(im, processor) if blank_images else im for im in images if im is not None]
    batch = _pad(rows, tokenizer, padding_side, with_answers)
    batch["pixel_values"] = pixels_of(processor, imgs) if imgs and pixels else None
    batch["has_image"] = _has_image(images)
    return batch


class EpochBatcher:
    """Batches of a fixed set of examples drawn many times (every epoch of a fine-tune):
    each example is tokenized once and its pixels processed once, then padded into
    whatever batches ask for it. ``batch(idx)`` equals ``collate([examples[i] for i in
    idx], ...)`` tensor for tensor (the image processor works image by image).

    Pixels are kept only while the whole set's fit in ``pixel_cache_bytes`` (float32
    (3, S, S) an image: 48 KiB at S=64, 1.3 MiB at LLaVA-1.5's 336); beyond that each
    batch processes its images again, as ``collate`` does. Token ids are always kept
    (max_length ints an example).
    """

    def __init__(
        self,
        examples: Sequence[Mapping[str, Any]],
        processor,
        *,
        max_length: int,
        blank_images: bool = False,
        pixel_cache_bytes: int = PIXEL_CACHE_BYTES,
    ):
        self.examples, self.processor = examples, processor
        self.max_length, self.blank_images = max_length, blank_images
        crop = processor.image_processor.crop_size
        per_image = 3 * crop["height"] * crop["width"] * 4
        n_images = sum(ex.get("image") is not None for ex in examples)
        self.keep_pixels = n_images * per_image <= pixel_cache_bytes
        self._rows: dict[int, Encoded] = {}
        self._pixels: dict[int, Any] = {}

    def batch(self, idx: Sequence[int]) -> dict[str, Any]:
        """The padded batch (``collate``'s dict, labels included) of examples ``idx``."""
        import torch

        for i in idx:
            if i not in self._rows:
                self._rows[i] = _encode(self.examples[i], i, self.processor, self.max_length)
        batch = _pad([self._rows[i] for i in idx], tokenizer_of(self.processor), "right", True)
        images = [self.examples[i].get("image") for i in idx]
        batch["has_image"] = _has_image(images)
        with_image = [i for i, im in zip(idx, images, strict=True) if im is not None]
        if not with_image:
            batch["pixel_values"] = None
        elif not self.keep_pixels:
            batch["pixel_values"] = pixels_of(self.processor, [self._image(i) for i in with_image])
        else:
            missing = list(dict.fromkeys(i for i in with_image if i not in self._pixels))
            if missing:
                fresh = pixels_of(self.processor, [self._image(i) for i in missing])
                self._pixels.update(zip(missing, fresh, strict=True))
            batch["pixel_values"] = torch.stack([self._pixels[i] for i in with_image])
        return batch

    def _image(self, i: int):
        image = self.examples[i]["image"]
        return _blank(image, self.processor) if self.blank_images else image


def _encode(ex: Mapping[str, Any], i: int, processor, max_length: int, with_answers=True):
    n_tokens = image_tokens(processor)
    encoded = encode_conversation(
        tokenizer_of(processor),
        turns_of(ex, with_answers),
        has_image=ex.get("image") is not None,
        n_image_tokens=n_tokens,
        generation=not with_answers,
    )
    return truncate(encoded, max_length, n_tokens, str(ex.get("id", f"#{i}")))


def _has_image(images: Sequence[Any]):
    import torch

    return torch.tensor([im is not None for im in images], dtype=torch.bool)


def _pad(
    rows: Sequence[Encoded], tokenizer, padding_side: str, with_answers: bool
) -> dict[str, Any]:
    import torch

    width = max(len(r.ids) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(0, len(r.ids)) if padding_side == "right" else slice(width - len(r.ids), width)
        input_ids[b, sl] = torch.tensor(r.ids)
        attention[b, sl] = 1
        labels[b, sl] = torch.tensor(r.labels)
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention}
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
