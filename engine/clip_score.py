"""CLIP-Score of pool rows (Hessel et al. 2021): how well a row's text describes its
image, max(100 * cos(image, text), 0) in a CLIP space.

It is a static baseline of the PROGRESS paper's table: rows whose question and answer
CLIP cannot match to the image are taken for noise. The image side is the concept
space's own ``ImageEncoder`` (same loader, same preprocessing); the text side is that
model's text tower. A random-initialised tower embeds text at random, so the score
only means something with trained weights: ``has_trained_text_tower`` says when.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from engine.encoders import (
    EncoderSpec,
    ImageEncoder,
    check_available,
    preprocess_images,
    weights_source,
)
from engine.errors import InputError
from engine.pool import first_exchange
from engine.text import strip_answer_format
from engine.vectors import l2_normalize


def has_trained_text_tower(spec: EncoderSpec) -> tuple[bool, str]:
    """Whether CLIP-Score under ``spec`` ranks rows by meaning, and why (or why not)."""
    if spec.kind != "open_clip":
        return False, f"{spec.kind} {spec.model} has no text tower (CLIP-Score needs open_clip)"
    if spec.random_weights:
        return False, (
            f"open_clip {spec.model} has {weights_source(spec)} weights: its text tower is "
            "untrained, so CLIP-Score would rank rows at random"
        )
    try:
        check_available(spec)
    except InputError as err:
        return False, f"open_clip {spec.model}: {err}"
    return True, f"open_clip {spec.model}, trained text tower from {weights_source(spec)}"


def clip_tokenizer(spec: EncoderSpec) -> Callable[[Sequence[str]], Any]:
    """``spec``'s text tokenizer: n strings -> int64 torch (n, context_length), each cut
    to the tower's context (its last token kept as end-of-text).

    A named model gets open_clip's own tokenizer for it. An ``architecture`` (tiny-clip)
    gets CLIP's default BPE at its context length; when its toy vocabulary is smaller
    than the BPE's, ids are folded into it with start- and end-of-text on the two top
    ids, so that the tower's argmax pooling still reads the end-of-text position.
    """
    import open_clip

    if spec.arch is None:
        return open_clip.get_tokenizer(spec.model)
    text_cfg = spec.arch.get("text_cfg", {})
    bpe = open_clip.SimpleTokenizer(
        context_length=int(
            text_cfg.get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH)
        )
    )
    vocab = int(text_cfg.get("vocab_size", bpe.vocab_size))
    if vocab >= bpe.vocab_size:
        return bpe
    if vocab < 3:
        raise InputError(f"open_clip architecture text vocab_size {vocab} is below 3")

    def folded(texts: Sequence[str]):
        ids = bpe(list(texts))  # (n, ctx); 0 is padding
        out = ids % (vocab - 2)  # padding stays 0
        out[ids == bpe.sot_token_id] = vocab - 2
        out[ids == bpe.eot_token_id] = vocab - 1
        return out

    return folded


def row_text(row: Mapping[str, Any]) -> str:
    """What the row says about its image: the first question (image token and LLaVA's
    answer-format suffix removed: they say how to answer, not what is shown) and the
    first answer, joined by a space.

    A pool row's ``question``/``answer`` columns, else its ``conversations`` (pool-
    checked: human first, answer second).
    """
    if row.get("question") is not None:
        question, answer = row["question"], row.get("answer") or ""
    else:
        question, answer = first_exchange(row["conversations"])
    return f"{strip_answer_format(question)} {answer.strip()}".strip()


def clip_scores(
    spec: EncoderSpec, rows: Sequence[Mapping[str, Any]], *, batch_size: int = 256
) -> np.ndarray:
    """CLIP-Score per row: float64 (n,), max(100 * cos, 0) in [0, 100]; NaN for a row
    with no image or an undecodable one (nothing to match the text against, ranked last
    by ``score_selection``).

    ``rows``: mappings with ``image`` (encoded bytes or None) and the text ``row_text``
    reads. Weights are loaded once per call; ``batch_size`` rows go through the towers
    at a time.

    Raises:
        ValueError: ``spec`` is not an open_clip model.
    """
    import torch

    if spec.kind != "open_clip":
        raise ValueError(f"CLIP-Score needs an open_clip model, not {spec.kind}")
    encoder = ImageEncoder(spec)
    tokenize = clip_tokenizer(spec)
    out = np.full(len(rows), np.nan, np.float64)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        pixels, status = preprocess_images([r.get("image") for r in chunk], encoder.prep)
        images = encoder(pixels)  # (b, d) float32, unit rows
        tokens = tokenize([row_text(r) for r in chunk]).to(encoder.device)
        with torch.inference_mode():
            texts = encoder.model.encode_text(tokens).float().cpu().numpy()
        cos = np.einsum("nd,nd->n", images, l2_normalize(texts)).astype(np.float64)
        scores = np.maximum(100.0 * cos, 0.0)
        out[start : start + len(chunk)] = np.where(status == 1, scores, np.nan)
    return out
