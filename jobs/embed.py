"""``vlselect embed``: the pool's spaces (clip, dino, text; skill from ``<ws>/skills``) as vectors.

What it does, for each space in ``--spaces``:
    1. checks in the driver that the input exists (``<ws>/pool``, or ``<ws>/skills`` for
       the skill space) and that the encoder's weights can be had here;
    2. fingerprints the input artifact and the encoder (engine.commit): a space committed
       with it is kept, an unfinished attempt with it resumes (finished shards kept), a
       change starts a new attempt while the committed space stays readable;
    3. streams the unfinished shards through Ray Data: read Parquet -> decode and
       preprocess in CPU tasks -> an encoder actor pool (``ActorPoolStrategy``; GPUs,
       dtype, batch size, pool size from the config) -> parts written as they come;
    4. finishes each shard once all its rows are in (ids checked against the input),
       then commits the space (engine.artifacts.EmbeddingSpace) and prints a summary.

Output: ``<ws>/embeddings/<space>/``, one ``part-*.parquet`` (id, vector list<float32>,
L2-normalised) per pool shard, in pool order.

Raises:
    InputError: no pool or skills, an unknown space, weights that cannot be had (exit 2).
    ShardMismatch: a shard's ids came out missing or twice (exit 1; finished shards kept).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from actors.adapter import ray_data_options
from actors.encoder import EmbedActor
from engine.artifacts import EmbeddingSpace, Pool, Ref, Skills, SpaceMeta
from engine.commit import operational
from engine.encoders import (
    EncoderSpec,
    ImagePreprocess,
    check_available,
    preprocess_for,
    preprocess_images,
    weights_source,
)
from engine.errors import InputError
from engine.pool import ImagePolicy, Rejected
from engine.resources import Resources
from engine.shards import PARTS_DIR, finish_shard, finished_shards, stem, write_part
from engine.text import instruction_text
from engine.vectors import to_arrow
from engine.workspace import Workspace
from jobs.runtime import Timer, connect, print_summary

STAGE = "embed"
DEFAULT_WORKSPACE = None
Space = Literal["clip", "dino", "text", "skill"]
IMAGE_SPACES = ("clip", "dino")
log = logging.getLogger("vlselect.embed")


class SpaceConfig(BaseModel):
    """One space: its encoder and how its actor pool runs."""

    model_config = ConfigDict(extra="forbid")

    encoder: EncoderSpec = Field(description="The model that embeds this space.")
    batch_size: int = operational(64, ge=1, description="Rows per encoder call.")
    min_actors: int = operational(1, ge=1, description="Smallest size of the encoder actor pool.")
    max_actors: int = operational(
        1, ge=1, description="Largest size of the pool (Ray Data scales between the two)."
    )
    actor: Resources = operational(
        default_factory=lambda: Resources(num_cpus=0.5),
        description="Resources of one encoder actor: num_gpus=1 on GPU nodes; fractional "
        "num_cpus so that the decode tasks keep CPUs (on 2 cores 1 CPU per actor starves them).",
    )


def _space(kind: str, model: str, **encoder: Any) -> SpaceConfig:
    return SpaceConfig(encoder=EncoderSpec(kind=kind, model=model, **encoder))


class EmbedConfig(BaseModel):
    """Configuration of ``vlselect embed`` (section ``embed``). Defaults are the real models."""

    model_config = ConfigDict(extra="forbid")

    spaces: list[Space] = Field(
        default_factory=lambda: ["clip", "dino", "text"], description="Spaces to embed, in order."
    )
    clip: SpaceConfig = Field(
        default_factory=lambda: _space("open_clip", "ViT-L-14-336", pretrained="openai"),
        description="Concept space: the CLIP image tower (open_clip).",
    )
    dino: SpaceConfig = Field(
        default_factory=lambda: _space("dinov2", "facebook/dinov2-large"),
        description="DINOv2 image space, the CLS pooler output (PROGRESS's image feature).",
    )
    text: SpaceConfig = Field(
        default_factory=lambda: _space(
            "sentence_transformers", "sentence-transformers/all-MiniLM-L6-v2"
        ),
        description="Question text space: MiniLM of the human turns (PROGRESS's text feature).",
    )
    skill: SpaceConfig = Field(
        default_factory=lambda: _space(
            "sentence_transformers", "sentence-transformers/all-MiniLM-L6-v2"
        ),
        description="Skill space: MiniLM of the skills stage's descriptions (<ws>/skills).",
    )
    preprocess_batch_size: int = operational(
        256, ge=1, description="Rows per decode-and-resize task batch."
    )
    preprocess: Resources = operational(
        default_factory=lambda: Resources(num_cpus=1.0),
        description="Resources of one decode-and-resize task.",
    )
    overwrite: bool = operational(False, description="Start every space over, even if current.")


CONFIG = EmbedConfig


def reads(cfg: EmbedConfig) -> list[Ref]:
    return list(dict.fromkeys(Ref("skills") if s == "skill" else Ref("pool") for s in cfg.spaces))


def writes(cfg: EmbedConfig) -> list[Ref]:
    return [Ref("embeddings", s) for s in dict.fromkeys(cfg.spaces)]


def resources(cfg: EmbedConfig) -> dict[str, Resources]:
    encoders = {f"{s} encoder actor": getattr(cfg, s).actor for s in dict.fromkeys(cfg.spaces)}
    return {"preprocess task": cfg.preprocess, **encoders}


# The embedded default (written into a world's vlselect.yaml): tiny architectures with
# seeded random weights for the image spaces (no CLIP or DINO weights install offline;
# summaries and meta.json say so) and the packaged all-MiniLM-L6-v2 for text.
EMBEDDED_DEFAULT = {
    "clip": {"encoder": {"kind": "open_clip", "model": "tiny-clip", "weights": "random"}},
    "dino": {"encoder": {"kind": "dinov2", "model": "tiny-dinov2", "weights": "random"}},
    "preprocess": {"num_cpus": 0.5},
}


# -- the pipeline's CPU steps (Ray Data tasks) ----------------------------------------------


def _read_shards(batch: pa.Table, columns: list[str], fs, rows: int):
    """Stream the rows of the shards named in ``batch['path']``, with the shard's path."""
    for path in batch.column("path").to_pylist():
        for records in pq.ParquetFile(path, filesystem=fs).iter_batches(rows, columns=columns):
            table = pa.Table.from_batches([records])
            yield table.append_column("path", pa.array([path] * table.num_rows, pa.string()))


def _prepare_images(batch: dict[str, np.ndarray], prep: dict, image_root: str | None) -> dict:
    policy = ImagePolicy(root=image_root, check="none")

    def load(data, ref):
        if data is not None or not ref:
            return data
        try:
            return policy.read(ref)
        except Rejected:  # gone since ingest: counted as undecodable, not a failed run
            return b""

    images = [load(d, r) for d, r in zip(batch["image"], batch["image_ref"], strict=True)]
    pixels, status = preprocess_images(images, ImagePreprocess(**prep))
    return {"id": batch["id"], "path": batch["path"], "status": status, "pixels": pixels}


def _prepare_text(batch: dict[str, np.ndarray]) -> dict:
    texts = np.array([instruction_text(c) for c in batch["conversations"]], dtype=object)
    return {"id": batch["id"], "path": batch["path"], "text": texts}


def _prepare_skill_text(batch: pa.Table) -> pa.Table:
    ok = batch.filter(pc.equal(batch.column("status"), "ok"))
    return pa.table({"id": ok["id"], "path": ok["path"], "text": ok["skill_text"]})


def _write_parts(batch: dict[str, np.ndarray], out_dir: str, fs) -> dict:
    """Write one batch's rows as parts, one per input shard; report rows per shard."""
    paths = batch["path"]
    shards, counts, no_image, broken = [], [], [], []
    for path in np.unique(paths):
        rows = paths == path
        table = pa.table({"id": pa.array(batch["id"][rows], pa.string())})
        table = table.append_column("vector", to_arrow(np.stack(batch["vector"][rows])))
        write_part(fs, out_dir, stem(path), table)
        shards.append(stem(path))
        counts.append(int(rows.sum()))
        status = batch.get("status")
        no_image.append(int((status[rows] == 0).sum()) if status is not None else 0)
        broken.append(
            ",".join(batch["id"][rows][status[rows] < 0][:5]) if status is not None else ""
        )
    return {
        "shard": np.array(shards, dtype=object),
        "rows": np.array(counts),
        "no_image": np.array(no_image),
        "undecodable": np.array(broken, dtype=object),
    }


@ray.remote(num_cpus=0.25)
def _finish(fs, out_dir: str, shard: str, source_file: str, space: str) -> int:
    expected = _expected_ids(fs, source_file, space)
    return finish_shard(fs, out_dir, shard, expected)


def _expected_ids(fs, source_file: str, space: str) -> pa.ChunkedArray:
    if space == "skill":
        t = pq.read_table(source_file, columns=["id", "status"], filesystem=fs)
        return t.filter(pc.equal(t["status"], "ok")).column("id")
    return pq.read_table(source_file, columns=["id"], filesystem=fs).column("id")


# -- the driver ---------------------------------------------------------------------------


def upstream(ws: Workspace, space: str) -> Pool | Skills:
    """The artifact a space embeds: the skills for ``skill``, else the pool."""
    return Skills.open(ws) if space == "skill" else Pool.open(ws)


def expected_rows(ws: Workspace, space: str, files: list[str]) -> dict[str, int]:
    """Rows each input shard must produce: from footers, or the ok rows of the skills."""
    if space == "skill":
        return {stem(f): len(_expected_ids(ws.fs, f, space)) for f in files}
    return {stem(f): pq.ParquetFile(f, filesystem=ws.fs).metadata.num_rows for f in files}


def check_inputs(cfg: EmbedConfig, ws: Workspace) -> dict[str, tuple[Pool | Skills, list[str]]]:
    """Input files per space, checked before Ray starts. Raises InputError with the fix."""
    if not cfg.spaces:
        raise InputError("no spaces to embed: pass --spaces clip,dino,text[,skill]")
    inputs = {}
    for space in dict.fromkeys(cfg.spaces):
        source = upstream(ws, space)
        files = source.files(suffix=".parquet")
        if not files:
            raise InputError(
                f"space {space!r} needs rows and {source.dir} holds no Parquet files: "
                f"run `{source.command(ws, None)} --overwrite`"
            )
        need = (
            {"id", "status", "skill_text"} if space == "skill" else {"id", "image", "conversations"}
        )
        have = set(pq.read_schema(files[0], filesystem=ws.fs).names)
        if need - have:
            raise InputError(
                f"{files[0]} lacks column(s) {sorted(need - have)} that space {space!r} "
                f"reads (it has {sorted(have)}); re-run the stage that wrote it"
            )
        check_available(getattr(cfg, space).encoder)
        inputs[space] = (source, files)
    return inputs


def main(cfg: EmbedConfig, ws: Workspace) -> dict:
    """Embed every space in ``cfg.spaces``; see the module docstring. Returns the summary."""
    timer = Timer()
    inputs = check_inputs(cfg, ws)
    results = [embed_space(cfg, ws, space, *found) for space, found in inputs.items()]
    rows: list[tuple[str, Any]] = []
    for r in results:
        weights = f", {r['weights']} weights" if r["weights"] == "random" else ""
        rows.append(
            (
                r["space"],
                f"{r['vectors']} vectors x {r['dim']} ({r['model']} from {r['source']}{weights}); "
                f"{r['embedded']} embedded now, {r['resumed']} kept; {r['seconds']} s",
            )
        )
        if r["no_image"] or r["undecodable"]:
            rows.append(
                ("", f"{r['no_image']} text-only, {r['undecodable']} undecodable: black image")
            )
    rows += [("time", f"{timer.seconds:.1f} s")]
    rows += [(f"  {r['space']}", r["path"]) for r in results]
    summary = {"spaces": results, "seconds": round(timer.seconds, 2)}
    print_summary(STAGE, rows, extra=summary)
    return summary


def embed_space(
    cfg: EmbedConfig, ws: Workspace, space: str, source: Pool | Skills, files: list[str]
) -> dict:
    """Embed one space, resuming its finished shards when its fingerprint is unchanged."""
    timer = Timer()
    space_cfg: SpaceConfig = getattr(cfg, space)
    spec = space_cfg.encoder
    plan = EmbeddingSpace.begin(
        ws,
        space,
        inputs={source.KIND: source.fingerprint},
        encoder=spec.fingerprint(),
        overwrite=cfg.overwrite,
    )
    if plan.action == "current":
        done = EmbeddingSpace.committed(ws, space, plan.manifest)
        return _result(done, embedded=0, resumed=done.meta.vectors, seconds=timer.seconds)
    attempt = plan.attempt
    out_dir = attempt.dir
    attempt.remove(PARTS_DIR)  # parts of unfinished shards: recomputed
    expected = expected_rows(ws, space, files)
    done_shards = finished_shards(ws.fs, out_dir) & set(expected)
    if done_shards:
        log.info("%s: resuming, %d of %d shards kept", space, len(done_shards), len(expected))
    pending = [f for f in files if stem(f) not in done_shards]
    stats = {"no_image": 0, "undecodable_ids": []}
    image_root = source.meta.image_root if isinstance(source, Pool) else None
    if pending:
        connect()  # only when there is work: a current space needs no Ray
        _run(
            _pipeline(cfg, ws, space, pending, out_dir, image_root),
            ws,
            out_dir,
            space,
            pending,
            expected,
            stats,
        )
    if len(finished_shards(ws.fs, out_dir) & set(expected)) != len(expected):
        raise RuntimeError(f"{space}: not every shard finished; run again to resume")
    attempt.remove(PARTS_DIR)  # every shard finished: its parts are gone, and so is the folder
    vectors = sum(expected.values())
    meta = SpaceMeta(
        space=space,
        model=spec.model,
        weights="random" if spec.random_weights else "pretrained",
        source=weights_source(spec),
        dim=_dim(ws, out_dir, files) if vectors else 0,
        vectors=vectors,
        shards=len(expected),
        no_image=stats["no_image"],
        undecodable=len(stats["undecodable_ids"]),
        undecodable_examples=stats["undecodable_ids"][:20],
        seconds=round(timer.seconds, 2),
        config=space_cfg.model_dump(mode="json"),
    )
    done = EmbeddingSpace.committed(ws, space, attempt.commit(meta))
    return _result(
        done,
        embedded=sum(expected[stem(f)] for f in pending),
        resumed=sum(expected[s] for s in done_shards),
        seconds=timer.seconds,
    )


def _result(done: EmbeddingSpace, embedded: int, resumed: int, seconds: float) -> dict:
    m = done.meta
    return {
        **m.model_dump(exclude={"config", "seconds"}),
        "embedded": embedded,
        "resumed": resumed,
        "seconds": round(seconds, 2),
        "path": done.dir,
    }


def _dim(ws: Workspace, out_dir: str, files: list[str]) -> int:
    """The vectors' length, from the first row on disk (not a whole shard read for it)."""
    for f in files:
        shard = pq.ParquetFile(f"{out_dir}/{stem(f)}.parquet", filesystem=ws.fs)
        for batch in shard.iter_batches(batch_size=1, columns=["vector"]):
            return len(batch.column(0)[0])
    return 0


def _pipeline(
    cfg: EmbedConfig, ws: Workspace, space: str, files: list[str], out_dir: str, image_root
):
    space_cfg: SpaceConfig = getattr(cfg, space)
    pre = ray_data_options(cfg.preprocess)
    if space in IMAGE_SPACES:
        columns = ["id", "image", "image_ref"]
    else:
        columns = ["id", "status", "skill_text"] if space == "skill" else ["id", "conversations"]
    # The shard list is built in the driver and each shard read in a task whose CPUs the
    # config sets. (read_parquet's file-listing task always takes 1 CPU in Ray 2.60:
    # beside an actor pool that holds most CPUs of a small node it is never scheduled.)
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    ds = ds.map_batches(
        _read_shards,
        fn_kwargs={"columns": columns, "fs": ws.fs, "rows": cfg.preprocess_batch_size},
        batch_size=1,
        batch_format="pyarrow",
        **pre,
    )
    if space in IMAGE_SPACES:
        prep = preprocess_for(space_cfg.encoder).__dict__
        ds = ds.map_batches(
            _prepare_images,
            fn_kwargs={"prep": prep, "image_root": image_root},
            batch_size=cfg.preprocess_batch_size,
            **pre,
        )
        column = "pixels"
    elif space == "skill":
        ds = ds.map_batches(
            _prepare_skill_text, batch_format="pyarrow", batch_size=cfg.preprocess_batch_size, **pre
        )
        column = "text"
    else:
        ds = ds.map_batches(_prepare_text, batch_size=cfg.preprocess_batch_size, **pre)
        column = "text"
    ds = encoder_stage(ds, space_cfg, column)
    return ds.map_batches(
        _write_parts, fn_kwargs={"out_dir": out_dir, "fs": ws.fs}, batch_size=None, **pre
    )


def encoder_stage(ds, space_cfg: SpaceConfig, column: str):
    """``ds`` through a pool of ``EmbedActor`` with the space's encoder, batch size and
    resources: adds ``vector`` float32 (n, dim) from ``column``."""
    actors = max(space_cfg.min_actors, space_cfg.max_actors)
    return ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs={
            "spec": space_cfg.encoder.model_dump(),
            "input_column": column,
            "actors": actors,
        },
        compute=ray.data.ActorPoolStrategy(min_size=space_cfg.min_actors, max_size=actors),
        batch_size=space_cfg.batch_size,
        **ray_data_options(space_cfg.actor),
    )


def _run(ds, ws, out_dir, space, pending, expected, stats) -> None:
    """Drive the pipeline: tally rows per shard, finish each shard as its last row lands."""
    source = {stem(f): f for f in pending}
    tally = dict.fromkeys(source, 0)
    finishing = []
    for shard in [s for s in source if expected[s] == 0]:
        finishing.append(_finish.remote(ws.fs, out_dir, shard, source[shard], space))
    batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
    try:
        with tqdm(total=sum(expected[s] for s in source), unit="row", desc=f"embed {space}") as bar:
            for batch in batches:
                for shard, n, blank, broken in zip(
                    batch["shard"],
                    batch["rows"],
                    batch["no_image"],
                    batch["undecodable"],
                    strict=True,
                ):
                    tally[shard] += int(n)
                    stats["no_image"] += int(blank)
                    if broken:
                        stats["undecodable_ids"].extend(broken.split(","))
                    bar.update(int(n))
                    if tally[shard] == expected[shard]:
                        finishing.append(
                            _finish.remote(ws.fs, out_dir, shard, source[shard], space)
                        )
    finally:
        # Every finishing task ends before the command does, whether the run failed in the
        # pipeline or in another finishing task: nothing writes into the workspace after
        # the command has returned. The pipeline stops first: its actors hold the CPUs the
        # finishing tasks wait for.
        batches.close()
        if finishing:
            ray.wait(finishing, num_returns=len(finishing), timeout=120)
    ray.get(finishing)
    over = {s: (tally[s], expected[s]) for s in source if tally[s] != expected[s]}
    if over:
        raise RuntimeError(f"{space}: rows per shard (written, expected) differ: {over}")


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main([STAGE, *sys.argv[1:]]))
