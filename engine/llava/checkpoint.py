"""The one loader of LLaVA models: a Hugging Face ``LlavaForConditionalGeneration``
checkpoint folder, local or at any pyarrow URI (``s3://``...), with its processor.

The layout is llava-hf's (``llava-hf/llava-1.5-7b-hf``): ``config.json`` (model_type
``llava``), the weights (``*.safetensors`` or ``pytorch_model*.bin``), the tokenizer
(``tokenizer.json`` or ``tokenizer.model`` + ``tokenizer_config.json``), the image
processor (``preprocessor_config.json``) and the chat template. The tiny world base is
saved in the same layout (``engine.llava.cache``), so the same code loads both.

A remote checkpoint is copied once per node into a content-keyed cache folder
(``$VLSELECT_MODEL_CACHE``, else ``~/.cache/vlselect/models``) by an atomic rename, then
reused by every worker and every restart on that node: never a temporary copy per
process left behind by a killed worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from engine.errors import InputError
from engine.workspace import Location

WEIGHTS = re.compile(r"(.*\.safetensors|pytorch_model.*\.bin)$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# llava-hf's checkpoints carry preprocessor_config.json; transformers 5 saves the image
# processor inside processor_config.json instead
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
DTYPES = {"float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
          "float16": "float16", "fp32": "float32"}  # fmt: skip


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint folder holds, read without loading weights.

    config: its ``config.json``; files: name -> size in bytes; fingerprint: a hash of
    config.json and the files' names and sizes (what a run's inputs record)."""

    location: Location
    config: dict[str, Any]
    files: dict[str, int]
    fingerprint: str

    @property
    def uri(self) -> str:
        return self.location.uri

    @property
    def weight_bytes(self) -> int:
        return sum(size for name, size in self.files.items() if WEIGHTS.match(name))


def _listing(loc: Location) -> dict[str, int]:
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    return {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}


def inspect_checkpoint(source: str | Location, *, weights: bool = True) -> CheckpointInfo:
    """Check that ``source`` is a LLaVA checkpoint with its weights and processor and read
    its config; ``weights`` False (planning memory) asks for its config.json alone.

    Raises:
        InputError: the folder is missing, has no config.json, is not a LLaVA, or lacks
            its weights, tokenizer or image processor; the message lists what was found.
    """
    loc = Location.of(source)
    if not loc.is_dir():
        raise InputError(f"model folder not found: {loc.uri} (name a Hugging Face LLaVA folder)")
    files = _listing(loc)
    found = ", ".join(sorted(files)[:12]) or "nothing"
    if "config.json" not in files:
        raise InputError(
            f"{loc.uri} has no config.json, so it is not a Hugging Face checkpoint (found: "
            f"{found}); save one with model.save_pretrained(folder)"
        )
    with loc.fs.open_input_file(f"{loc.path}/config.json") as f:
        raw = f.read()
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise InputError(f"{loc.uri}/config.json is not JSON: {err}") from None
    kind = config.get("model_type")
    if kind != "llava":
        arch = ", ".join(config.get("architectures") or []) or "none named"
        raise InputError(
            f"{loc.uri} holds a {kind!r} checkpoint (architectures: {arch}), not a LLaVA "
            "(model_type 'llava', LlavaForConditionalGeneration): name a checkpoint in the "
            "llava-hf layout, e.g. a download of llava-hf/llava-1.5-7b-hf"
        )
    missing = []
    if weights and not any(WEIGHTS.match(n) for n in files):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    tokenizer = any(n in files for n in TOKENIZER_FILES) and "tokenizer_config.json" in files
    if weights and not tokenizer:
        missing.append("the tokenizer (tokenizer.json or tokenizer.model, tokenizer_config.json)")
    if weights and not _has_image_processor(loc, files):
        missing.append("the image processor (preprocessor_config.json)")
    if missing:
        raise InputError(
            f"{loc.uri} is a LLaVA checkpoint without {' and '.join(missing)} (found: {found}); "
            "save the processor beside the model: AutoProcessor.from_pretrained(hub id)"
            ".save_pretrained(folder)"
        )
    digest = hashlib.sha256(raw)
    digest.update(json.dumps(sorted(files.items())).encode())
    return CheckpointInfo(loc, config, files, digest.hexdigest()[:16])


def _has_image_processor(loc: Location, files: dict[str, int]) -> bool:
    if IMAGE_PROCESSOR_FILES[0] in files:
        return True
    if IMAGE_PROCESSOR_FILES[1] not in files:
        return False
    with loc.fs.open_input_file(f"{loc.path}/{IMAGE_PROCESSOR_FILES[1]}") as f:
        try:
            return "image_processor" in json.loads(f.read())
        except json.JSONDecodeError:
            return False


def cache_root() -> str:
    """Where remote checkpoints are cached on this node."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "vlselect", "models")
    return os.environ.get("VLSELECT_MODEL_CACHE", default)


def local_folder(info: CheckpointInfo) -> str:
    """A local folder holding the checkpoint: itself when local, else this node's cached
    copy, made once (copied beside its final name, then renamed into place)."""
    loc = info.location
    if isinstance(loc.fs, pafs.LocalFileSystem):
        return loc.path
    root = cache_root()
    final = os.path.join(root, info.fingerprint)
    if os.path.isdir(final):
        return final
    os.makedirs(root, exist_ok=True)
    for stale in os.listdir(root):  # copies of killed processes: nobody will finish them
        if stale.startswith(f".partial-{info.fingerprint}-") and not _alive(stale):
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    partial = os.path.join(root, f".partial-{info.fingerprint}-{os.getpid()}")
    os.makedirs(partial, exist_ok=True)
    pafs.copy_files(
        loc.path, partial, source_filesystem=loc.fs, destination_filesystem=pafs.LocalFileSystem()
    )
    try:
        os.rename(partial, final)
    except OSError:  # another worker on this node finished first
        shutil.rmtree(partial, ignore_errors=True)
    return final


def _alive(partial_name: str) -> bool:
    pid = int(partial_name.rsplit("-", 1)[-1])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Loaded:
    """A loaded checkpoint: the model (eval mode), its processor, where it came from, and
    the longest sequence it is trained and scored at."""

    model: Any
    processor: Any
    info: CheckpointInfo
    max_length: int

    @property
    def tokenizer(self):
        return self.processor.tokenizer


def declared_max_length(info: CheckpointInfo) -> int:
    """The tokenizer's model_max_length, capped at the text model's positions (llava-hf
    declares a huge model_max_length: 4096 positions are what the model has)."""
    text = info.config.get("text_config") or {}
    positions = int(text.get("max_position_embeddings") or 4096)
    loc = info.location
    if "tokenizer_config.json" not in info.files:  # a config-only folder, for planning
        return positions
    with loc.fs.open_input_file(f"{loc.path}/tokenizer_config.json") as f:
        declared = json.loads(f.read()).get("model_max_length") or positions
    return int(min(float(declared), positions))


def load_checkpoint(
    source: str | Location | CheckpointInfo,
    *,
    dtype: str = "float32",
    attention: str = "sdpa",
    max_length: int | None = None,
) -> Loaded:
    """Load a LLaVA checkpoint and its processor on CPU, in ``dtype`` (float32, bf16,
    fp16), with ``attention`` (sdpa, eager, flash_attention_2).

    Raises:
        InputError: see ``inspect_checkpoint``; a processor whose image token count or
            vocabulary disagrees with the model, or a tokenizer with no chat template.
    """
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from engine.llava.data import image_tokens
    from engine.llava.model import image_tokens_of
    from engine.llava.tokenizer import check_tokenizer

    info = source if isinstance(source, CheckpointInfo) else inspect_checkpoint(source)
    folder = local_folder(info)
    processor = AutoProcessor.from_pretrained(folder)
    model = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype=getattr(torch, DTYPES[dtype]), attn_implementation=attention
    )
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise InputError(
            f"{info.uri}: AutoProcessor loads a {type(processor).__name__}, not a LLaVA "
            "processor with a tokenizer and an image processor"
        )
    tokenizer = processor.tokenizer
    check_tokenizer(tokenizer)
    template = getattr(processor, "chat_template", None) or tokenizer.chat_template
    if not template:
        raise InputError(f"{info.uri} has no chat template (chat_template.jinja or .json)")
    tokenizer.chat_template = template  # the conversation path renders with the tokenizer
    if image_tokens(processor) != image_tokens_of(model):
        raise InputError(
            f"{info.uri}: the processor fills {image_tokens(processor)} placeholders per "
            f"image but the model's tower gives {image_tokens_of(model)} features"
        )
    with contextlib.suppress(AttributeError):  # generation: greedy, this tokenizer's ids
        gen = model.generation_config
        gen.pad_token_id, gen.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    length = max_length or declared_max_length(info)
    return Loaded(model.eval(), processor, info, length)
