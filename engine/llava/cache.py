"""The base cached in the workspace, built once and reused while its fingerprint matches.

``<ws>/models/<name>/``: ``model/`` (safetensors via ``save_pretrained``), ``tokenizer/``,
``meta.json`` (config, fingerprint, measured accuracies, times). It is written under
``<ws>/.staging/`` and moved into place when complete, so a half-written base is
never taken for a finished one; ``meta.json`` is the last file written.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from engine.errors import InputError
from engine.llava.config import BASE_VERSION, BaseTrainConfig, LlavaModelConfig, fingerprint
from engine.workspace import META_FILE, Workspace
from engine.world.config import WorldConfig

MODELS = "models"
DEFAULT_NAME = "tiny-llava"
# Training knobs that change where or how fast the base trains, not what it is.
_NOT_IDENTITY = {"device", "torch_threads"}
# Knobs added after bases were cached, left out of the fingerprint at these defaults so
# that those bases keep theirs.
_ADDED_LATER = {"domains": None}


@dataclass
class Base:
    """A loaded base: ``LlavaForConditionalGeneration`` (CPU, float32), its tokenizer, meta."""

    model: Any
    tokenizer: Any
    meta: dict
    path: str

    @property
    def max_length(self) -> int:
        return int(self.meta["config"]["model"]["max_length"])


def base_fingerprint(world: WorldConfig, model: LlavaModelConfig, train: BaseTrainConfig) -> str:
    """What decides the base's weights: the world's rendering, sizes, training recipe."""
    world_fields = world.model_dump(
        mode="json", exclude={"size", "shard_size", "benchmarks", "test_size"}
    )
    unset = {k for k, default in _ADDED_LATER.items() if getattr(train, k) == default}
    recipe = train.model_dump(mode="json", exclude=_NOT_IDENTITY | unset)
    return fingerprint(model, recipe, world_fields)


def base_path(ws: Workspace, name: str = DEFAULT_NAME) -> str:
    return ws.path(MODELS, name)


def read_base_meta(ws: Workspace, name: str = DEFAULT_NAME) -> dict | None:
    """The cached base's meta.json, or None when there is no finished base called ``name``."""
    if not ws.exists(MODELS, name, META_FILE):
        return None
    return ws.read_json(ws.path(MODELS, name, META_FILE))


def save_base(ws: Workspace, name: str, model, tokenizer, meta: dict) -> str:
    """Write the base atomically (staged, then moved over any older one). Returns its path."""
    staged = ws.staging_dir(f"model-{name}")
    try:
        with tempfile.TemporaryDirectory(prefix="vlselect-base-") as tmp:
            model.save_pretrained(os.path.join(tmp, "model"))
            tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
            pafs.copy_files(
                tmp,
                staged,
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=ws.fs,
            )
        ws.write_json(f"{staged}/{META_FILE}", meta)  # last: the completion marker
        return ws.promote(staged, MODELS, name)
    except BaseException:
        with contextlib.suppress(OSError):
            ws.discard(staged)
        raise


def _local_copy(ws: Workspace, path: str) -> str:
    """A local folder holding ``path`` (itself when the workspace is local)."""
    if isinstance(ws.fs, pafs.LocalFileSystem):
        return path
    local = tempfile.mkdtemp(prefix="vlselect-base-")
    pafs.copy_files(
        path, local, source_filesystem=ws.fs, destination_filesystem=pafs.LocalFileSystem()
    )
    return local


def load_base(ws: Workspace, name: str = DEFAULT_NAME, fingerprint: str | None = None) -> Base:
    """Load the cached base ``name`` (CPU, float32).

    Raises:
        InputError: no finished base (run ``vlselect base``), or its fingerprint is not
            the one asked for.
    """
    from transformers import LlavaForConditionalGeneration

    from engine.llava.tokenizer import load_tokenizer

    meta = read_base_meta(ws, name)
    if meta is None:
        raise InputError(
            f"no base at {base_path(ws, name)}: build it with `vlselect base --workspace {ws.uri}`"
        )
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise InputError(
            f"the base at {base_path(ws, name)} was built with another config (fingerprint "
            f"{meta.get('fingerprint')}, wanted {fingerprint}): rebuild it with "
            f"`vlselect base --workspace {ws.uri} --overwrite`"
        )
    local = _local_copy(ws, base_path(ws, name))
    model = LlavaForConditionalGeneration.from_pretrained(os.path.join(local, "model"))
    tokenizer = load_tokenizer(os.path.join(local, "tokenizer"))
    return Base(model.float().eval(), tokenizer, meta, base_path(ws, name))


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
    """The cached base when its fingerprint matches, else train and cache it.

    Returns (base, built): built is False when the cache was reused.

    Raises:
        InputError: a base of another config is cached and ``overwrite`` is False.
    """
    from engine.llava.base import train_base

    fp = base_fingerprint(world, model_cfg, train_cfg)
    meta = read_base_meta(ws, name)
    if meta is not None and meta.get("fingerprint") == fp and not overwrite:
        log(f"reusing the base at {base_path(ws, name)} (fingerprint {fp})")
        return load_base(ws, name, fp), False
    if meta is not None and not overwrite:
        raise InputError(
            f"{base_path(ws, name)} holds a base built with another config (fingerprint "
            f"{meta.get('fingerprint')}, this one {fp}): pass --overwrite to replace it, or "
            "give another --name"
        )
    start = time.time()
    model, tokenizer, metrics = train_base(world, model_cfg, train_cfg, log)
    meta = {
        "stage": "base",
        "status": "complete",
        "name": name,
        "fingerprint": fp,
        "version": BASE_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start)),
        "config": {
            "model": model_cfg.model_dump(mode="json"),
            "train": train_cfg.model_dump(mode="json"),
        },
        "world": world.model_dump(mode="json"),
        "metrics": metrics,
        "image_tokens": model_cfg.vision.image_tokens,
        "vocab_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    path = save_base(ws, name, model, tokenizer, meta)
    log(f"base written to {path}")
    return Base(model.eval(), tokenizer, meta, path), True
