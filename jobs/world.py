"""``vlselect world``: generate the shapes world (the embedded default pool) into a workspace.

What it does:
    1. validates the world config; refuses a workspace that holds a world made with
       another config (unless ``--overwrite``), and resumes one made with this config;
    2. generates every shard of every split in parallel Ray tasks, skipping shards
       already written (a shard is done when its ground-truth part exists, written last);
    3. writes ``<ws>/world/source/`` (the pool as LLaVA records, images inline as PNG
       bytes in Parquet), ``<ws>/benchmarks/<name>.parquet`` (held-out sets and the
       in-distribution ``test``), ``<ws>/world/truth/<split>/`` (the ground truth:
       skill, concept, answer, scene; evaluation reads it, selection never does),
       ``<ws>/world/meta.json`` and ``<ws>/vlselect.yaml``;
    4. optionally exports the pool as one LLaVA JSON file plus PNG files (``--llava-json``).

Raises:
    InputError: bad config, or a workspace holding a different world (exit 2).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pydantic import Field
from tqdm import tqdm

from actors.adapter import ray_options
from engine.errors import InputError
from engine.resources import Resources
from engine.workspace import META_FILE, Workspace, atomic_output, write_table_atomic
from engine.world.config import WorldConfig
from engine.world.generate import POOL, ShardSpec, generate_rows, plan_shards, world_manifest
from jobs.embed import EMBEDDED_DEFAULT
from jobs.runtime import Timer, bounded_submit, cluster_cpus, connect, print_summary

STAGE = "world"
DEFAULT_WORKSPACE = None
LLAVA_JSON_MAX = 200_000  # one PNG file per sample past this is what Parquet is for


class WorldJobConfig(WorldConfig):
    """``vlselect world``: the world's own fields plus how this run writes them."""

    overwrite: bool = Field(
        False, description="Delete a world made with another config and start over."
    )
    llava_json: bool = Field(
        False,
        description=f"Also export the pool as world/llava/pool.json + PNG files (<= {LLAVA_JSON_MAX} samples).",
    )
    resources: Resources = Field(
        default_factory=Resources, description="Resources of one shard-generation task."
    )

    def world(self) -> WorldConfig:
        return WorldConfig(**self.model_dump(include=set(WorldConfig.model_fields)))


CONFIG = WorldJobConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, help="pool size (samples)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--shard-size", type=int)
    parser.add_argument("--llava-json", action="store_true", default=None)
    parser.add_argument("--overwrite", action="store_true", default=None)


def overrides_from_args(args: argparse.Namespace) -> dict:
    keys = ("size", "seed", "shard_size", "llava_json", "overwrite")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def config_fingerprint(world: WorldConfig) -> str:
    """Hash of everything that changes the bytes (shard_size only changes the file layout)."""
    fields = world.model_dump(mode="json", exclude={"shard_size"})
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


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
    fingerprint = config_fingerprint(world)
    if cfg.llava_json and world.size > LLAVA_JSON_MAX:
        raise InputError(
            f"--llava-json writes one PNG per sample; size {world.size} > {LLAVA_JSON_MAX}: "
            "use the Parquet source (world/source) for large pools"
        )
    _claim_workspace(ws, world, fingerprint, cfg.overwrite)
    connect()

    shards = plan_shards(world)
    parts_dir = {
        s: ws.path("world", "source") if s == POOL else ws.path("world", "parts", s)
        for s in {sh.split for sh in shards}
    }
    todo = [
        sh
        for sh in shards
        if not (sh.split != POOL and ws.exists("benchmarks", f"{sh.split}.parquet"))
        and not ws.exists("world", "truth", sh.split, _part(sh))
    ]
    skipped = len(shards) - len(todo)
    task = _generate_shard.options(**ray_options(cfg.resources))
    world_json = world.model_dump_json()
    with tqdm(
        total=sum(sh.count for sh in todo), unit="sample", desc="world", mininterval=1.0
    ) as bar:
        for result in bounded_submit(
            lambda sh: task.remote(
                world_json, sh, parts_dir[sh.split], ws.path("world", "truth", sh.split), ws.fs
            ),
            todo,
            max_in_flight=2 * cluster_cpus(),
        ):
            bar.update(result["rows"])

    benchmarks = _merge_eval_splits(ws, world)
    llava = _export_llava_json(ws) if cfg.llava_json else None
    manifest = world_manifest(world)
    summary = {
        "pool_size": world.size,
        "seed": world.seed,
        "splits": manifest["splits"],
        "shards": len(shards),
        "shards_skipped": skipped,
        "seconds": round(timer.seconds, 2),
        "source": ws.path("world", "source"),
        "benchmarks": benchmarks,
        "truth": ws.path("world", "truth"),
        "llava_json": llava,
    }
    ws.write_json(
        ws.path("world", META_FILE),
        {
            "stage": STAGE,
            "status": "complete",
            "fingerprint": fingerprint,
            "manifest": manifest,
            **summary,
        },
    )
    _write_workspace_config(ws, world)
    print_summary(
        STAGE,
        [
            ("pool samples", world.size),
            ("splits", ", ".join(f"{k}={v}" for k, v in manifest["splits"].items())),
            ("shards", f"{len(shards)} ({skipped} already done)"),
            ("time", f"{summary['seconds']} s"),
            ("pool source", summary["source"]),
            ("benchmarks", ws.path("benchmarks")),
            ("ground truth", summary["truth"] + "  (evaluation only; selection never reads it)"),
            *([("llava json", llava)] if llava else []),
            ("next", f"vlselect ingest --workspace {ws.uri}"),
        ],
        extra=summary,
    )
    return summary


def _claim_workspace(ws: Workspace, world: WorldConfig, fingerprint: str, overwrite: bool) -> None:
    meta_path = ws.path("world", META_FILE)
    if ws.exists("world", META_FILE):
        previous = ws.read_json(meta_path).get("fingerprint")
        if previous == fingerprint:
            return  # the same world: resume, skipping finished shards
        if not overwrite:
            raise InputError(
                f"{ws.path('world')} holds a world made with another config (fingerprint "
                f"{previous}, this one {fingerprint}): pass --overwrite to replace it, "
                "or use another --out"
            )
    if overwrite:
        for part in ("world", "benchmarks"):
            ws.remove(part)
    elif ws.exists("world") or ws.exists("benchmarks"):
        raise InputError(
            f"{ws.path('world')} exists without a readable meta.json: pass --overwrite to replace it"
        )
    ws.write_json(meta_path, {"stage": STAGE, "status": "running", "fingerprint": fingerprint})


def _merge_eval_splits(ws: Workspace, world: WorldConfig) -> dict[str, str]:
    """One Parquet file per held-out split (they are small), from its generated parts."""
    out = {}
    for split in ["test", *(b.name for b in world.benchmarks)]:
        target = ws.path("benchmarks", f"{split}.parquet")
        if not ws.exists("benchmarks", f"{split}.parquet"):
            parts = ws.list_files("world", "parts", split, suffix=".parquet")
            if not parts:
                continue  # an empty split (test_size 0)
            table = pa.concat_tables(pq.read_table(p, filesystem=ws.fs) for p in parts)
            ws.write_table(target, table)
            ws.remove("world", "parts", split)
        out[split] = target
    ws.remove("world", "parts")
    return out


def _export_llava_json(ws: Workspace) -> str:
    """world/llava/pool.json (one JSON array, written incrementally) and images/<id>.png."""
    out_dir = ws.makedirs("world", "llava", "images")
    json_path = ws.path("world", "llava", "pool.json")
    with atomic_output(ws.fs, json_path) as tmp, ws.fs.open_output_stream(tmp) as f:
        f.write(b"[\n")
        first = True
        for part in ws.list_files("world", "source", suffix=".parquet"):
            for row in pq.read_table(part, filesystem=ws.fs).to_pylist():
                record = {"id": row["id"], "conversations": row["conversations"]}
                if row["image"] is not None:
                    record["image"] = f"images/{row['id']}.png"
                    with ws.fs.open_output_stream(f"{out_dir}/{row['id']}.png") as img:
                        img.write(row["image"])
                f.write((b"" if first else b",\n") + json.dumps(record).encode())
                first = False
        f.write(b"\n]\n")
    return json_path


def _write_workspace_config(ws: Workspace, world: WorldConfig) -> None:
    """Record the embedded default's config so every later stage runs on it as written."""
    sections = ws.read_config()
    sections["world"] = world.model_dump(mode="json")
    ingest = sections.setdefault("ingest", {})
    ingest.setdefault("source", "world/source")
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
    "eval_per_cluster": 20,
}


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main([STAGE, *sys.argv[1:]]))
