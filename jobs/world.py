"""``vlselect world``: generate the shapes world (the embedded default pool) into a workspace.

What it does:
    1. validates the world config; refuses a workspace that holds a world made with
       another config (unless ``--overwrite``), and resumes one made with this config;
    2. generates every shard of every split in parallel Ray tasks, skipping shards
       already written (a shard is done when its ground-truth part exists, written last);
    3. writes, in the world artifact (engine.artifacts.World), ``source/`` (the pool as
       LLaVA records, images inline as PNG bytes in Parquet), ``benchmarks/<name>.parquet``
       (held-out sets and the in-distribution ``test``), ``truth/<split>/`` (the ground
       truth: skill, concept, answer, scene; evaluation reads it, selection never does),
       optionally ``llava/`` (the pool as one LLaVA JSON file plus PNGs, ``--llava-json``);
    4. commits it and records the source's URI in ``<ws>/vlselect.yaml``.

Raises:
    InputError: bad config, or a workspace holding a different world (exit 2).
"""

from __future__ import annotations

import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pydantic import Field
from tqdm import tqdm

from actors.adapter import ray_options
from engine.artifacts import Ref, World, WorldMeta
from engine.commit import SCRATCH, Attempt, operational
from engine.errors import InputError
from engine.resources import Resources
from engine.workspace import Workspace, atomic_output, write_table_atomic
from engine.world.config import WorldConfig
from engine.world.generate import POOL, ShardSpec, generate_rows, plan_shards, world_manifest
from jobs.embed import EMBEDDED_DEFAULT
from jobs.runtime import Timer, bounded_submit, cluster_cpus, connect, print_summary

STAGE = "world"
DEFAULT_WORKSPACE = None
LLAVA_JSON_MAX = 200_000  # one PNG file per sample past this is what Parquet is for
SOURCE, BENCHMARKS, TRUTH, LLAVA_JSON = "source", "benchmarks", "truth", "llava/pool.json"


class WorldJobConfig(WorldConfig):
    """``vlselect world``: the world's own fields plus how this run writes them."""

    overwrite: bool = operational(
        False, description="Delete a world made with another config and start over."
    )
    llava_json: bool = Field(
        False,
        description=f"Also export the pool as world/llava/pool.json + PNG files (<= {LLAVA_JSON_MAX} samples).",
    )
    resources: Resources = operational(
        default_factory=Resources, description="Resources of one shard-generation task."
    )

    def world(self) -> WorldConfig:
        return WorldConfig(**self.model_dump(include=set(WorldConfig.model_fields)))


CONFIG = WorldJobConfig


def reads(cfg: WorldJobConfig) -> list[Ref]:
    return []


def writes(cfg: WorldJobConfig) -> list[Ref]:
    return [Ref("world")]


def resources(cfg: WorldJobConfig) -> dict[str, Resources]:
    return {"shard task": cfg.resources}


def _part(shard: ShardSpec) -> str:
    return f"part-{shard.shard_index:05d}.parquet"


@ray.remote
def _generate_shard(world_json: str, shard: ShardSpec, out_dir: str, truth_dir: str, fs) -> dict:
    world = WorldConfig.model_validate_json(world_json)
    records, labels = generate_rows(world, shard.split, shard.start, shard.count)
    write_table_atomic(fs, f"{out_dir}/{_part(shard)}", records)
    write_table_atomic(fs, f"{truth_dir}/{_part(shard)}", labels)  # last: the completion marker
    return {"split": shard.split, "rows": shard.count}


def main(cfg: WorldJobConfig, ws: Workspace) -> dict:
    """Generate (or finish generating) the world; see the module docstring."""
    timer = Timer()
    world = cfg.world()
    if cfg.llava_json and world.size > LLAVA_JSON_MAX:
        raise InputError(
            f"--llava-json writes one PNG per sample; size {world.size} > {LLAVA_JSON_MAX}: "
            "use the Parquet source (world/source) for large pools"
        )
    plan = World.begin(
        ws,
        config=cfg,
        overwrite=cfg.overwrite,
        refuse_change=f"{World.folder(ws)} holds a world made with another config (fingerprint "
        "{old}, this one {new}): pass --overwrite to replace it, or use another --out",
    )
    if plan.action == "current":
        done = World.committed(ws, None, plan.manifest)
        _write_workspace_config(ws, world, done)
        return _print(done, 0, reused=True)
    attempt = plan.attempt
    connect()
    shards = plan_shards(world)
    parts_dir = {
        s: attempt.path(SOURCE) if s == POOL else attempt.path(SCRATCH, "parts", s)
        for s in {sh.split for sh in shards}
    }
    todo = [
        sh
        for sh in shards
        if not (sh.split != POOL and attempt.exists(BENCHMARKS, f"{sh.split}.parquet"))
        and not attempt.exists(TRUTH, sh.split, _part(sh))
    ]
    skipped = len(shards) - len(todo)
    task = _generate_shard.options(**ray_options(cfg.resources))
    world_json = world.model_dump_json()
    with tqdm(
        total=sum(sh.count for sh in todo), unit="sample", desc="world", mininterval=1.0
    ) as bar:
        for result in bounded_submit(
            lambda sh: task.remote(
                world_json, sh, parts_dir[sh.split], attempt.path(TRUTH, sh.split), ws.fs
            ),
            todo,
            max_in_flight=2 * cluster_cpus(),
        ):
            bar.update(result["rows"])

    benchmarks = _merge_eval_splits(ws, attempt, world)
    if cfg.llava_json:
        _export_llava_json(ws, attempt)
    meta = WorldMeta(
        world=world.model_dump(mode="json"),
        pool_size=world.size,
        seed=world.seed,
        splits=world_manifest(world)["splits"],
        shards=len(shards),
        benchmarks=benchmarks,
        llava_json=cfg.llava_json,
        seconds=round(timer.seconds, 2),
    )
    done = World.committed(ws, None, attempt.commit(meta))
    _write_workspace_config(ws, world, done)
    return _print(done, skipped, reused=False)


def _print(world: World, skipped: int, reused: bool) -> dict:
    m = world.meta
    summary = {
        "pool_size": m.pool_size,
        "seed": m.seed,
        "splits": m.splits,
        "shards": m.shards,
        "shards_skipped": m.shards if reused else skipped,
        "seconds": m.seconds,
        "source": world.uri(SOURCE),
        "benchmarks": {b: world.uri(BENCHMARKS, f"{b}.parquet") for b in m.benchmarks},
        "truth": world.uri(TRUTH),
        "llava_json": world.uri(LLAVA_JSON) if m.llava_json else None,
    }
    print_summary(
        STAGE,
        [
            ("pool samples", m.pool_size),
            ("splits", ", ".join(f"{k}={v}" for k, v in m.splits.items())),
            ("shards", f"{m.shards} ({summary['shards_skipped']} already done)"),
            ("time", "current, nothing recomputed" if reused else f"{m.seconds} s"),
            ("pool source", summary["source"]),
            ("benchmarks", world.uri(BENCHMARKS)),
            ("ground truth", summary["truth"] + "  (evaluation only; selection never reads it)"),
            *([("llava json", summary["llava_json"])] if m.llava_json else []),
            ("next", f"vlselect ingest --workspace {world.ws.uri}"),
        ],
        extra=summary,
    )
    return summary


def _merge_eval_splits(ws: Workspace, attempt: Attempt, world: WorldConfig) -> list[str]:
    """One Parquet file per held-out split (they are small), from its generated parts."""
    out = []
    for split in ["test", *(b.name for b in world.benchmarks)]:
        if not attempt.exists(BENCHMARKS, f"{split}.parquet"):
            parts = ws.list_files(attempt.path(SCRATCH, "parts", split), suffix=".parquet")
            if not parts:
                continue  # an empty split (test_size 0)
            table = pa.concat_tables(pq.read_table(p, filesystem=ws.fs) for p in parts)
            ws.write_table(attempt.path(BENCHMARKS, f"{split}.parquet"), table)
        out.append(split)
    return out


def _export_llava_json(ws: Workspace, attempt: Attempt) -> None:
    """llava/pool.json (one JSON array, written incrementally) and llava/images/<id>.png."""
    out_dir = attempt.makedirs("llava", "images")
    with atomic_output(ws.fs, attempt.path(LLAVA_JSON)) as tmp, ws.fs.open_output_stream(tmp) as f:
        f.write(b"[\n")
        first = True
        for part in ws.list_files(attempt.path(SOURCE), suffix=".parquet"):
            for row in pq.read_table(part, filesystem=ws.fs).to_pylist():
                record = {"id": row["id"], "conversations": row["conversations"]}
                if row["image"] is not None:
                    record["image"] = f"images/{row['id']}.png"
                    ws.write_bytes(f"{out_dir}/{row['id']}.png", row["image"])
                f.write((b"" if first else b",\n") + json.dumps(record).encode())
                first = False
        f.write(b"\n]\n")


def _write_workspace_config(ws: Workspace, world: WorldConfig, done: World) -> None:
    """Record the embedded default's config so every later stage runs on it as written;
    the source as a URI with the workspace's scheme and options, which any node opens."""
    sections = ws.read_config()
    sections["world"] = world.model_dump(mode="json")
    ingest = sections.setdefault("ingest", {})
    ingest["source"] = done.uri(SOURCE)
    sections.setdefault("embed", EMBEDDED_DEFAULT)
    sections.setdefault("progress", TINY_PROGRESS)
    ws.write_config(sections)


# The tiny LLaVA's recipe for ``vlselect progress`` on the embedded default: the paper's
# (LoRA r=128, lr 2e-4, global batch 128, one pass) would not move a model this small in
# minutes; this one learns the world (benchmarks/tiny_llava.py). Every field can be set
# again with --set progress.finetune.lr=... .
TINY_PROGRESS = {
    "finetune": {
        "lora": {"r": 32, "alpha": 64},
        "lr": 2e-3,
        "projector_lr": 1e-3,
        "epochs": 10,
        "batch_size": 32,
        "warmup": 0.03,
    },
    "micro_batch": 16,
    "num_workers": 2,
    "worker": {"num_cpus": 1},
    "round_size": 0.03,
    "selection": {"eval_per_cluster": 20},
}


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main([STAGE, *sys.argv[1:]]))
