"""The base committed in the workspace, built once and reused while its fingerprint matches.

``<ws>/models/<name>/`` (engine.artifacts.BaseModelArtifact): ``model/``, a Hugging Face
LLaVA checkpoint in llava-hf's layout (the model's and its processor's ``save_pretrained``:
safetensors, tokenizer, image processor, chat template), loaded by the one loader of
every checkpoint (``engine.llava.checkpoint``); its meta holds the config, the recipe's
fingerprint, measured accuracies and times. Written as an attempt and published by
its manifest (engine.commit), so a half-written base is never taken for a finished one.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from engine.artifacts import BaseModelArtifact, BaseModelMeta
from engine.commit import output_config
from engine.errors import InputError
from engine.llava.checkpoint import declared_max_length, inspect_checkpoint, load_checkpoint
from engine.llava.config import BASE_VERSION, BaseTrainConfig, LlavaModelConfig, fingerprint
from engine.workspace import Workspace
from engine.world.config import WorldConfig

MODELS = "models"
MODEL_FOLDER = "model"
DEFAULT_NAME = "tiny-llava"


@dataclass
class Base:
    """A loaded base: ``LlavaForConditionalGeneration`` (CPU), its processor, meta."""

    model: Any
    processor: Any
    meta: BaseModelMeta
    path: str

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def max_length(self) -> int:
        return int(self.meta.config["model"]["max_length"])

    @property
    def fingerprint(self) -> str:
        return self.meta.recipe


def base_fingerprint(world: WorldConfig, model: LlavaModelConfig, train: BaseTrainConfig) -> str:
    """What decides the base's weights: the world's rendering, sizes, training recipe."""
    world_fields = world.model_dump(
        # the base learns from scenes of its own, not the pool's samples or their turns
        mode="json",
        exclude={"size", "shard_size", "benchmarks", "test_size", "turns"},
    )
    # where and how fast it trains (operational) and knobs added later at their defaults
    # (commit.added_later) leave the key alone, as the workspace's artifacts' keys
    return fingerprint(model, output_config(train), world_fields)


def find_base(ws: Workspace, name: str = DEFAULT_NAME) -> BaseModelArtifact | None:
    """The committed base called ``name``, or None."""
    return BaseModelArtifact.find(ws, name)


def save_base(ws: Workspace, name: str, model, processor, meta: BaseModelMeta) -> str:
    """Commit the base (engine.commit: a new attempt, then its manifest) as a checkpoint
    folder ``model/`` with its processor. Returns the attempt's path."""
    attempt = BaseModelArtifact.begin(ws, name, recipe=meta.recipe, overwrite=True).attempt
    try:
        with tempfile.TemporaryDirectory(prefix="vlselect-base-") as tmp:
            model.save_pretrained(os.path.join(tmp, MODEL_FOLDER))
            processor.save_pretrained(os.path.join(tmp, MODEL_FOLDER))
            pafs.copy_files(
                tmp,
                attempt.dir,
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=ws.fs,
            )
    except BaseException:
        with contextlib.suppress(OSError):  # a save is not resumed: nothing worth keeping
            attempt.abandon()
        raise
    attempt.commit(meta)
    return attempt.dir


def base_uri(ws: Workspace, name: str = DEFAULT_NAME) -> str:
    """The checkpoint folder of the committed base ``name``, as a URI any worker opens.

    Raises:
        InputError: no committed base of that name (run ``vlselect base``).
    """
    return BaseModelArtifact.open(ws, name).uri(MODEL_FOLDER)


BASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ModelSource:
    """Where a run's model comes from, resolved in the driver before anything starts.

    uri: the checkpoint folder; fingerprint: what the run's inputs record; max_length:
    the sequence length it trains at by default (the workspace base's, or the
    checkpoint's declared one); base: the workspace base's name, or None; config: its
    config.json."""

    uri: str
    fingerprint: str
    max_length: int
    base: str | None
    config: dict


def model_source(ws: Workspace, model: str, *, weights: bool = True) -> ModelSource:
    """Resolve a ``model`` setting: a bare name is a base committed in the workspace,
    anything else a checkpoint folder or URI (checked to be a LLaVA with its processor).

    Raises:
        InputError: no such base (naming ``vlselect base``), or a folder that is not a
            LLaVA checkpoint (``engine.llava.checkpoint.inspect_checkpoint``).
    """
    if BASE_NAME.match(model):
        found = BaseModelArtifact.open(ws, model)
        info = inspect_checkpoint(found.uri(MODEL_FOLDER), weights=weights)
        length = int(found.meta.config["model"]["max_length"])
        return ModelSource(info.uri, found.fingerprint, length, model, info.config)
    info = inspect_checkpoint(model, weights=weights)
    return ModelSource(info.uri, info.fingerprint, declared_max_length(info), None, info.config)


def load_base(
    ws: Workspace,
    name: str = DEFAULT_NAME,
    fingerprint: str | None = None,
    *,
    dtype: str = "float32",
    attention: str = "sdpa",
) -> Base:
    """Load the committed base ``name`` through the checkpoint loader.

    Raises:
        InputError: no committed base (run ``vlselect base``), or its fingerprint is not
            the one asked for.
    """
    found = BaseModelArtifact.open(ws, name)
    meta = found.meta
    if fingerprint is not None and meta.recipe != fingerprint:
        raise InputError(
            f"the base at {found.dir} was built with another config (fingerprint "
            f"{meta.recipe}, wanted {fingerprint}): rebuild it with "
            f"`vlselect base --workspace {ws.uri} --overwrite`"
        )
    loaded = load_checkpoint(
        found.uri(MODEL_FOLDER),
        dtype=dtype,
        attention=attention,
        max_length=int(meta.config["model"]["max_length"]),
    )
    return Base(loaded.model, loaded.processor, meta, found.dir)


def build_or_load_base(
    ws: Workspace,
    world: WorldConfig,
    model_cfg: LlavaModelConfig,
    train_cfg: BaseTrainConfig,
    *,
    name: str = DEFAULT_NAME,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[Base, bool]:
    """The committed base when its fingerprint matches, else train and commit one.

    Returns (base, built): built is False when the committed base was reused.

    Raises:
        InputError: a base of another config is committed and ``overwrite`` is False.
    """
    from engine.llava.base import train_base

    fp = base_fingerprint(world, model_cfg, train_cfg)
    found = find_base(ws, name)
    if found is not None and found.meta.recipe == fp and not overwrite:
        log(f"reusing the base at {found.dir} (fingerprint {fp})")
        return load_base(ws, name, fp), False
    if found is not None and not overwrite:
        raise InputError(
            f"{found.dir} holds a base built with another config (fingerprint "
            f"{found.meta.recipe}, this one {fp}): pass --overwrite to replace it, or "
            "give another --name"
        )
    start = time.time()
    model, processor, metrics = train_base(world, model_cfg, train_cfg, log)
    meta = BaseModelMeta(
        name=name,
        recipe=fp,
        version=BASE_VERSION,
        created=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start)),
        config={
            "model": model_cfg.model_dump(mode="json"),
            "train": train_cfg.model_dump(mode="json"),
        },
        world=world.model_dump(mode="json"),
        metrics=metrics,
        image_tokens=model_cfg.vision.image_tokens,
        vocab_size=len(processor.tokenizer),
        parameters=sum(p.numel() for p in model.parameters()),
    )
    path = save_base(ws, name, model, processor, meta)
    log(f"base written to {path}")
    return Base(model.eval(), processor, meta, path), True
