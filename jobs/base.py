"""``vlselect base``: build (or reuse) the tiny LLaVA's base, cached in the workspace.

What it does:
    1. reads the world's config from the workspace (``vlselect world`` writes it) and
       this stage's section ``base`` (model sizes, training recipe, resources);
    2. reuses ``<ws>/models/<name>/`` when its fingerprint (world rendering, sizes,
       recipe) matches; refuses a base of another config unless ``--overwrite``;
    3. otherwise trains it in one Ray task with the declared resources (it lands on a GPU
       node when ``resources.num_gpus`` asks for one): the vision tower on per-patch
       attributes (colour, shape, size, glyph, row, column) of the base's own scenes,
       frozen, then the language model and projector on captions that list each scene's
       objects in a random order (a world of another seed than the pool's: the base never
       sees pool, test or benchmark data);
    4. commits ``model/`` (safetensors) and ``tokenizer/`` with their meta (config,
       fingerprint, accuracies, times) as ``<ws>/models/<name>`` (engine.commit);
    5. prints the tower's per-attribute patch accuracy, the caption loss, time and path.

Raises:
    InputError: no world config in the workspace, a grid the tower cannot read, or a
        cached base of another config without ``--overwrite`` (exit 2).
"""

from __future__ import annotations

import sys

import ray
from pydantic import BaseModel, ConfigDict, Field

from actors.adapter import ray_options
from actors.progress import tell
from engine.artifacts import Ref
from engine.errors import InputError
from engine.llava.cache import (
    DEFAULT_NAME,
    base_fingerprint,
    build_or_load_base,
    find_base,
)
from engine.llava.config import BaseTrainConfig, LlavaModelConfig
from engine.llava.scenes import base_world, check_grid
from engine.resources import Resources
from engine.workspace import Workspace
from engine.world.config import WorldConfig
from jobs.runtime import Timer, WorkerProgress, connect, print_summary

STAGE = "base"
DEFAULT_WORKSPACE = None


class BaseJobConfig(BaseModel):
    """Configuration of ``vlselect base`` (section ``base``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        DEFAULT_NAME,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="The base is cached at <ws>/models/<name>/.",
    )
    model: LlavaModelConfig = Field(
        default_factory=LlavaModelConfig, description="Sizes of the tiny LLaVA and tokenizer."
    )
    train: BaseTrainConfig = Field(
        default_factory=BaseTrainConfig, description="How the base is trained once."
    )
    overwrite: bool = Field(False, description="Replace a cached base of another config.")
    resources: Resources = Field(
        default_factory=lambda: Resources(num_cpus=2, max_retries=1),
        description="Resources of the training task (num_gpus: 1 to train on a GPU node).",
    )


CONFIG = BaseJobConfig


def reads(cfg: BaseJobConfig) -> list[Ref]:
    return [Ref("world")]  # the tiny base learns the world the workspace records


def writes(cfg: BaseJobConfig) -> list[Ref]:
    return [Ref("model", cfg.name)]


def resources(cfg: BaseJobConfig) -> dict[str, Resources]:
    return {"training task": cfg.resources}


def workspace_world(ws: Workspace) -> WorldConfig:
    """The world config a workspace was generated with (its ``vlselect.yaml`` section)."""
    section = ws.read_config().get("world") if ws.exists() else None
    if not section:
        raise InputError(
            f"{ws.uri} holds no world config (vlselect.yaml has no 'world' section): "
            f"generate the world first with `vlselect world --out {ws.uri}`"
        )
    try:
        return WorldConfig.model_validate(section)
    except ValueError as err:
        raise InputError(f"the world section of {ws.uri}/vlselect.yaml is invalid: {err}") from None


@ray.remote
def _build(ws_uri: str, world_json: str, cfg_json: str, progress=None) -> dict:
    """Train (or reuse) the base inside a Ray task; returns its meta. Its progress lines go
    to the driver's ``progress`` queue (``WorkerProgress``) and to the task's log."""
    cfg = BaseJobConfig.model_validate_json(cfg_json)
    base, built = build_or_load_base(
        Workspace.open(ws_uri),
        WorldConfig.model_validate_json(world_json),
        cfg.model,
        cfg.train,
        name=cfg.name,
        overwrite=cfg.overwrite,
        log=lambda line: tell(progress, line),
    )
    return {"path": base.path, "built": built}


def main(cfg: BaseJobConfig, ws: Workspace) -> dict:
    """Build or reuse the base; see the module docstring."""
    timer = Timer()
    world = workspace_world(ws)
    check_grid(world, cfg.model.vision.image_size, cfg.model.vision.patch_size)
    base_world(world, cfg.train.seed)  # refuses a base seed equal to the pool's
    fp = base_fingerprint(world, cfg.model, cfg.train)
    found = find_base(ws, cfg.name)
    if found is not None and found.meta.recipe != fp and not cfg.overwrite:
        raise InputError(
            f"{found.dir} holds a base built with another config (fingerprint "
            f"{found.meta.recipe}, this one {fp}): pass --overwrite to replace it, or "
            "give another --name"
        )
    built = False  # when current: nothing to train, no task, no Ray
    if found is None or found.meta.recipe != fp or cfg.overwrite:
        connect()
        task = _build.options(**ray_options(cfg.resources))
        with WorkerProgress(STAGE) as progress:
            built = ray.get(
                task.remote(ws.uri, world.model_dump_json(), cfg.model_dump_json(), progress.queue)
            )["built"]
        found = find_base(ws, cfg.name)
    meta = found.meta
    metrics = meta.metrics
    vision = metrics["vision_patch_accuracy"]
    summary = {
        "path": found.dir,
        "built": built,
        "fingerprint": fp,
        "vision_patch_accuracy": vision,
        "caption_loss": metrics["caption_loss"],
        "caption_token_accuracy": metrics["caption_token_accuracy"],
        "train_seconds": metrics["seconds"],
        "seconds": round(timer.seconds, 2),
        "parameters": meta.parameters,
    }
    print_summary(
        STAGE,
        [
            ("base", f"{summary['path']} ({'built' if built else 'reused: fingerprint ' + fp})"),
            ("parameters", f"{meta.parameters:,} (vocab {meta.vocab_size})"),
            ("tower patch accuracy", ", ".join(f"{k} {v:.3f}" for k, v in vision.items())),
            ("caption loss", f"{metrics['caption_loss']:.4f} per token (held-out scenes)"),
            ("caption token acc.", f"{metrics['caption_token_accuracy']:.3f}"),
            ("training time", f"{metrics['seconds']['total']} s on {metrics['device']}"),
            ("time", f"{summary['seconds']} s"),
        ],
        extra=summary,
    )
    return summary


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main([STAGE, *sys.argv[1:]]))
