"""``vlselect demo``: the whole pipeline on the embedded default, then one summary.

What it does (the stages that exist so far; later stages join as they land):
    1. ``world``: generates the shapes world into the workspace (resumes if present);
    2. ``ingest``: normalises the world's pool into ``<ws>/pool`` (replacing an old one);
    3. ``embed``: the clip, dino and text spaces with the world's offline encoders;
    4. ``cluster``: spherical k-means of dino+text into ``progress`` (K = pool size / 50,
       between 10 and 1000: PROGRESS's clusters, scaled to the pool);
    5. ``index``: the clip (concept) space in 2 exact Flat shards, which targeted
       selection queries;
    6. prints one table: each stage's counts, time and where its artifacts are.

Raises:
    InputError: bad config (exit 2).
"""

from __future__ import annotations

import argparse
import sys

from pydantic import BaseModel, ConfigDict, Field

from engine.config import build_config
from engine.workspace import Workspace
from jobs import cluster, embed, index, ingest, world
from jobs.runtime import Timer, print_summary

STAGE = "demo"
DEFAULT_WORKSPACE = "ws/demo"


class DemoConfig(BaseModel):
    """``vlselect demo``: the size of the embedded default it runs on."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(2000, ge=100, le=1_000_000, description="Pool size of the generated world.")
    seed: int = Field(0, ge=0, description="World seed.")


CONFIG = DemoConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, help="pool size of the generated world")
    parser.add_argument("--seed", type=int)


def overrides_from_args(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ("size", "seed") if getattr(args, k, None) is not None}


def main(cfg: DemoConfig, ws: Workspace) -> dict:
    """Run each stage in turn on ``ws``; see the module docstring."""
    timer = Timer()
    layers = [ws.read_config() if ws.exists() else {}]
    world_cfg = build_config(
        world.STAGE,
        world.CONFIG,
        *layers,
        {"world": {"size": cfg.size, "seed": cfg.seed, "overwrite": True}},
    )
    world_summary = world.main(world_cfg, ws)
    ingest_cfg = build_config(
        ingest.STAGE, ingest.CONFIG, ws.read_config(), {"ingest": {"overwrite": True}}
    )
    ingest_summary = ingest.main(ingest_cfg, ws)
    embed_summary = embed.main(build_config(embed.STAGE, embed.CONFIG, ws.read_config()), ws)
    k = min(1000, max(10, cfg.size // 50))
    cluster_cfg = build_config(
        cluster.STAGE,
        cluster.CONFIG,
        ws.read_config(),
        {"cluster": {"name": "progress", "spaces": ["dino", "text"], "k": k}},
    )
    cluster_summary = cluster.main(cluster_cfg, ws)
    index_cfg = build_config(
        index.STAGE, index.CONFIG, ws.read_config(), {"index": {"space": "clip", "shards": 2}}
    )
    index_summary = index.main(index_cfg, ws)
    summary = {
        "world": world_summary,
        "ingest": ingest_summary,
        "embed": embed_summary,
        "cluster": cluster_summary,
        "index": index_summary,
        "seconds": round(timer.seconds, 2),
    }
    print_summary(
        STAGE,
        [
            (
                "world",
                f"{world_summary['pool_size']} pool samples, "
                f"{len(world_summary['benchmarks'])} held-out sets, {world_summary['seconds']} s",
            ),
            (
                "ingest",
                f"{ingest_summary['records_in']} in = {ingest_summary['accepted']} accepted + "
                f"{ingest_summary['rejected']} rejected, {ingest_summary['seconds']} s",
            ),
            *[
                (
                    f"embed {r['space']}",
                    f"{r['vectors']} x {r['dim']} ({r['model']}, {r['weights']} weights), "
                    f"{r['seconds']} s",
                )
                for r in embed_summary["spaces"]
            ],
            (
                "cluster progress",
                f"{cluster_summary['k']} clusters of dino+text, sizes "
                f"{cluster_summary['size_stats']['min']}-{cluster_summary['size_stats']['max']}, "
                f"{cluster_summary['seconds']} s",
            ),
            (
                "index clip",
                f"{index_summary['rows']} vectors in {index_summary['shards']} "
                f"{index_summary['factory']} shards, {index_summary['seconds']} s",
            ),
            ("total time", f"{summary['seconds']} s"),
            ("workspace", ws.root),
            ("pool", ingest_summary["pool"]),
            ("benchmarks", ws.path("benchmarks")),
            ("embeddings", ws.path("embeddings")),
            ("clusters", ws.path("clusters")),
            ("index", ws.path("index")),
        ],
        extra={"seconds": summary["seconds"], "workspace": ws.root},
    )
    return summary


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main([STAGE, *sys.argv[1:]]))
