"""Configuration of the tiny LLaVA, its cached base, and the LoRA fine-tuning recipe.

Sizes live here, never in code: a real run names a hub id or local folder for the
tokenizer and sets bigger sizes (or loads a real LLaVA) through the same fields.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.commit import added_later, operational
from engine.world.config import DOMAINS, IMAGE_FAMILIES, check_weights

# Bumped whenever the base's training code changes what a cached base means.
BASE_VERSION = 4


class VisionConfig(BaseModel):
    """The CLIP vision tower (transformers ``CLIPVisionConfig``)."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(64, ge=16, description="Input side in pixels (world images are 64).")
    patch_size: int = Field(
        16, ge=2, description="Patch side; 64 / 16 gives one token per cell of the 4x4 grid."
    )
    hidden_size: int = Field(96, ge=8, description="Width of the tower.")
    num_layers: int = Field(3, ge=1, description="Transformer layers of the tower.")
    num_heads: int = Field(4, ge=1, description="Attention heads (hidden_size % heads == 0).")
    intermediate_size: int = Field(384, ge=8, description="MLP width of each layer.")
    feature_layer: int = Field(
        -1,
        description="Hidden state the projector reads (LLaVA-1.5 takes -2; the tiny tower's "
        "attribute heads train the last one, so -1).",
    )

    @property
    def image_tokens(self) -> int:
        """Image tokens per image: the patches, CLS dropped (LLaVA's 'default' strategy)."""
        return (self.image_size // self.patch_size) ** 2


class TextConfig(BaseModel):
    """The Llama language model (transformers ``LlamaConfig``); vocab comes from the tokenizer."""

    model_config = ConfigDict(extra="forbid")

    hidden_size: int = Field(128, ge=8, description="Width of the language model.")
    num_layers: int = Field(
        3, ge=1, description="Decoder layers (depth helps: 3-4 learn the world, 1-2 do not)."
    )
    num_heads: int = Field(4, ge=1, description="Attention heads (hidden_size % heads == 0).")
    num_kv_heads: int | None = Field(None, ge=1, description="KV heads (GQA); None: num_heads.")
    intermediate_size: int = Field(512, ge=8, description="MLP width of each layer.")
    max_position_embeddings: int = Field(256, ge=16, description="Longest sequence the LM sees.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base.")


class LlavaModelConfig(BaseModel):
    """The whole tiny LLaVA: tower, language model, projector, tokenizer, prompt length."""

    model_config = ConfigDict(extra="forbid")

    vision: VisionConfig = Field(default_factory=VisionConfig, description="Vision tower.")
    text: TextConfig = Field(default_factory=TextConfig, description="Language model.")
    projector_act: str = Field("gelu", description="Activation between the projector's layers.")
    tokenizer: str = Field(
        "world",
        description="'world': the offline word-level tokenizer built from the world's "
        "vocabulary and saved with the base; otherwise a hub id or local folder "
        "(it must know an '<image>' token).",
    )
    max_length: int = Field(
        192, ge=16, description="Longest tokenized example; longer prompts are cut from the left."
    )
    seed: int = Field(0, description="Seed of the random initial weights.")

    @model_validator(mode="after")
    def _fits(self) -> LlavaModelConfig:
        v, t = self.vision, self.text
        if v.image_size % v.patch_size:
            raise ValueError(f"vision.image_size {v.image_size} % patch_size {v.patch_size} != 0")
        for name, width, heads in (
            ("vision", v.hidden_size, v.num_heads),
            ("text", t.hidden_size, t.num_heads),
        ):
            if width % heads:
                raise ValueError(f"{name}.hidden_size {width} is not a multiple of heads {heads}")
        if self.max_length > t.max_position_embeddings:
            raise ValueError(
                f"max_length {self.max_length} > text.max_position_embeddings "
                f"{t.max_position_embeddings}"
            )
        return self


class BaseTrainConfig(BaseModel):
    """How the base is trained once: tower on attributes, then LM + projector on captions."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(
        1_000_003,
        description="Generation seed of the base's own scenes: a world separate from the pool "
        "(the pool uses the world's seed).",
    )
    vision_scenes: int = Field(16384, ge=16, description="Scenes the tower trains on.")
    card_share: float | None = Field(
        0.35,
        ge=0,
        lt=1,
        description="Share of the base's scenes asking about a card (the glyph family, the "
        "only one that draws a card): at the pool's 10% the tower reads few digits and "
        "overfits them. None: the pool's family mix.",
    )
    vision_steps: int = Field(
        2000,
        ge=0,
        description="Attribute-head steps: 2000 reads every attribute at 0.99 or better "
        "(card digits 0.95 after 1000).",
    )
    vision_batch: int = Field(64, ge=1, description="Scenes per attribute step.")
    vision_lr: float = Field(1e-3, gt=0, description="AdamW lr of tower and heads.")
    caption_style: Literal["objects", "rows"] = Field(
        "objects",
        description="'objects': each scene's objects in a random order (teaches the LM to "
        "find a patch by its content: after the same 2k-row LoRA fine-tune, 0.43 overall "
        "against 0.33 with 'rows', colour 0.33 against 0.16); 'rows': row by row, cells "
        "left to right.",
    )
    domains: dict[str, float] | None = added_later(
        None,
        description="Domain (concept) mix of the base's scenes; None: the pool's. A domain "
        "left out is a concept the pretrained model never saw: the fine-tune has to learn "
        "it from the pool's rows of it, so what a selection holds of it matters.",
    )
    language_steps: int = Field(
        3000,
        ge=0,
        description="Steps of the LM's scene-language pretraining (engine.llava.language): "
        "scenes given as their cells' words, every family's questions answered, so the LM "
        "reasons before it sees an image, as LLaVA's LLM does. 0: none (the LM then learns "
        "from captions only; set caption_trains: projector+lm).",
    )
    language_scenes: int = Field(
        40000, ge=16, description="Scenes (one question each) the LM pretrains on."
    )
    language_batch: int = Field(64, ge=1, description="Questions per language step.")
    language_lr: float = Field(2e-3, gt=0, description="AdamW lr of the LM's pretraining.")
    language_caption_share: float = Field(
        0.25,
        ge=0,
        le=1,
        description="Share of each language batch that captions its scene instead of "
        "answering: captions read out every object, the dense signal the LM learns to read "
        "cells from (question-only batches plateaued at chance), and the frozen LM later "
        "teaches the projector by captioning.",
    )
    language_families: dict[str, float] | None = Field(
        None,
        description="Image families (skills) the LM practises, with weights; None: all "
        "alike. A family left out is a skill the fine-tune has to teach from the pool.",
    )
    language_text_share: float = Field(
        0.1, ge=0, lt=1, description="Share of text-only questions (the world's text family)."
    )
    caption_trains: Literal["projector", "projector+lm"] = Field(
        "projector",
        description="What the caption stage trains: the projector alone with the LM frozen "
        "(LLaVA's stage 1, over the pretrained LM), or both (no language pretraining).",
    )
    caption_scenes: int = Field(8192, ge=16, description="Scenes captioned for alignment.")
    caption_steps: int = Field(
        800, ge=0, description="Caption steps (800 learn the captions at the default size)."
    )
    caption_batch: int = Field(32, ge=1, description="Captions per step.")
    caption_lr: float = Field(2e-3, gt=0, description="AdamW lr of LM and projector.")
    eval_scenes: int = Field(256, ge=1, description="Held-out scenes for the measured accuracies.")
    warmup: float = Field(0.03, ge=0, lt=1, description="Share of steps of linear warm-up.")
    device: Literal["auto", "cpu", "cuda"] = operational(
        "auto", description="'auto': CUDA if seen."
    )
    torch_threads: int = operational(0, ge=0, description="torch threads; 0 keeps the process's.")

    @field_validator("domains")
    @classmethod
    def _known_domains(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        return v if v is None else check_weights(v, DOMAINS, "domain")

    @model_validator(mode="after")
    def _lm_is_trained(self) -> BaseTrainConfig:
        if self.language_steps == 0 and self.caption_trains == "projector":
            raise ValueError(
                "language_steps: 0 leaves the language model untrained while "
                "caption_trains: projector keeps it frozen; set caption_trains: projector+lm"
            )
        return self

    @field_validator("language_families")
    @classmethod
    def _known_families(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        return v if v is None else check_weights(v, IMAGE_FAMILIES, "image family")


class LoraConfig(BaseModel):
    """PEFT LoRA on the language model (the projector trains fully, beside it)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(32, ge=1, description="LoRA rank (LLaVA-1.5 recipe: 128 at 7B).")
    alpha: int = Field(64, ge=1, description="LoRA alpha (recipe: 2 r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        description="Linear layers of the language model that get adapters.",
    )
    train_embeddings: bool = Field(
        True,
        description="Also train the LM's input embeddings and head in full: the tiny LM met "
        "only caption words in its base, while a real LLM has seen every word.",
    )


class FinetuneConfig(BaseModel):
    """The QA fine-tuning recipe (LLaVA-1.5's, scaled to the tiny model)."""

    model_config = ConfigDict(extra="forbid")

    lora: LoraConfig | None = Field(
        default_factory=LoraConfig, description="LoRA settings; None: full fine-tuning."
    )
    lr: float = Field(2e-3, gt=0, description="lr of the LoRA adapters (or the full LM).")
    projector_lr: float = Field(1e-3, gt=0, description="lr of the projector, trained fully.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    epochs: float = Field(10, gt=0, description="Passes over the training samples.")
    batch_size: int = Field(64, ge=1, description="Samples per step.")
    warmup: float = Field(0.03, ge=0, lt=1, description="Share of steps of linear warm-up.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping.")
    seed: int = Field(0, description="Seed of shuffling and adapter init.")


def fingerprint(*parts: BaseModel | dict) -> str:
    """Stable short hash of configs (what decides a cached artifact's bytes)."""
    data = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts]
    blob = json.dumps([BASE_VERSION, *data], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
