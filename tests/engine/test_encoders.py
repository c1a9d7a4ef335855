"""Encoders without Ray: preprocessing, seeded random weights, normalisation, weight checks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine import encoders
from engine.encoders import (
    EncoderSpec,
    ImagePreprocess,
    check_available,
    load_encoder,
    preprocess_for,
    preprocess_images,
    weights_source,
)
from engine.errors import InputError

TINY = {
    "clip": EncoderSpec(kind="open_clip", model="tiny-clip", weights="random"),
    "dino": EncoderSpec(kind="dinov2", model="tiny-dinov2", weights="random"),
}


def png(width: int, height: int, colour=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_preprocess_resizes_crops_and_reports_status():
    prep = ImagePreprocess(crop=32, resize=40, mean=(0, 0, 0), std=(1, 1, 1))
    wide = png(120, 60, (0, 255, 0))
    pixels, status = preprocess_images([wide, None, b"not an image", png(32, 32)], prep)
    assert pixels.shape == (4, 32, 32, 3) and pixels.dtype == np.uint8
    assert status.tolist() == [1, 0, -1, 1]
    assert (pixels[0, :, :, 1] == 255).all() and (pixels[0, :, :, 0] == 0).all()
    assert not pixels[1].any() and not pixels[2].any()  # black, as the reference feeds
    assert (pixels[3, :, :, 0] == 255).all()


@pytest.mark.parametrize("space", ["clip", "dino"])
def test_tiny_image_encoders_are_seeded_and_normalised(space):
    spec = TINY[space]
    images = [png(64, 64, (i * 20, 255 - i * 20, 90)) for i in range(6)] + [None]
    pixels, _ = preprocess_images(images, preprocess_for(spec))
    first, second = load_encoder(spec), load_encoder(spec)
    a, b = first(pixels), second(pixels)
    assert a.shape == (7, 64) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(a, b)  # two actors, identical random weights
    assert first.info.weights == "random" and "random init" in weights_source(spec)
    other = load_encoder(spec.model_copy(update={"seed": 1}))(pixels)
    assert not np.allclose(a, other)


def test_text_encoder_is_the_packaged_minilm_offline(monkeypatch):
    monkeypatch.setattr(encoders, "hub_reachable", lambda: False)
    spec = EncoderSpec(kind="sentence_transformers", model="sentence-transformers/all-MiniLM-L6-v2")
    check_available(spec)
    encoder = load_encoder(spec)
    v = encoder(["How many cubes are there?", "Count the cubes.", "What colour is the sky?"])
    assert v.shape == (3, 384) and encoder.info.source.startswith("packaged:")
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2  # real weights: counting questions sit together


def test_weight_checks_name_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(encoders, "hub_reachable", lambda: False)
    with pytest.raises(InputError, match="weights: random"):
        check_available(EncoderSpec(kind="dinov2", model="facebook/dinov2-large"))
    with pytest.raises(InputError, match="weights: random"):
        check_available(EncoderSpec(kind="open_clip", model="ViT-B-32", pretrained="openai"))
    with pytest.raises(InputError, match="not found"):
        check_available(EncoderSpec(kind="dinov2", model=str(tmp_path / "missing")))
    with pytest.raises(InputError, match="packaged"):
        check_available(
            EncoderSpec(kind="sentence_transformers", model="all-MiniLM-L6-v2", weights="random")
        )
    check_available(EncoderSpec(kind="open_clip", model="ViT-B-32", weights="random"))
    with pytest.raises(InputError, match="without pretrained weights"):
        check_available(EncoderSpec(kind="open_clip", model="tiny-clip"))
    with pytest.raises(InputError, match="unknown open_clip model"):
        preprocess_for(EncoderSpec(kind="open_clip", model="ViT-Nope", weights="random"))


def test_preprocessing_follows_the_model():
    dino = preprocess_for(EncoderSpec(kind="dinov2", model="facebook/dinov2-large"))
    assert (dino.crop, dino.resize) == (224, 256)
    clip = preprocess_for(EncoderSpec(kind="open_clip", model="ViT-L-14-336", pretrained="openai"))
    assert (clip.crop, clip.resize) == (336, 336)


def test_fingerprint_changes_with_what_decides_the_vectors():
    spec = TINY["clip"]
    assert spec.fingerprint() == spec.model_copy().fingerprint()
    assert spec.fingerprint() != spec.model_copy(update={"seed": 3}).fingerprint()
    assert spec.fingerprint() == spec.model_copy(update={"torch_threads": 2}).fingerprint()
