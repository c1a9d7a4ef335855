"""``vlselect ingest``: a LLaVA JSON / JSONL / Parquet source -> ``<ws>/pool`` and ``<ws>/rejects``.

What it does:
    1. checks the source, its format, the image root and the workspace in the driver;
    2. streams records (ijson for a JSON array: never loaded whole), marks duplicate ids;
    3. normalises chunks in parallel Ray tasks (image read and decode check), each
       writing one pool shard and one rejects shard into a staging directory;
    4. checks rows in = accepted + rejected, moves the staging directories into place,
       writes ``meta.json`` and prints a summary with per-reason counts.

Raises:
    InputError: the source, image root, workspace or config is wrong as a whole
        (exit 2; nothing is written to the workspace).
    RuntimeError: the counts do not add up (exit 1; nothing is promoted).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections import Counter
from typing import Literal

import ray
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from actors.adapter import ray_options
from engine.errors import InputError
from engine.ingest import (
    DuplicateTracker,
    RawItem,
    chunked,
    count_records,
    detect_format,
    iter_records,
    normalize_chunk,
    source_files,
)
from engine.pool import ImagePolicy
from engine.resources import Resources
from engine.workspace import META_FILE, Workspace, write_table_atomic
from jobs.runtime import Timer, bounded_submit, cluster_cpus, connect, print_summary

STAGE = "ingest"
DEFAULT_WORKSPACE = None


class IngestConfig(BaseModel):
    """Configuration of ``vlselect ingest`` (section ``ingest`` of a config file)."""

    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(
        None,
        description="LLaVA JSON (array), JSONL or Parquet file, or a directory of Parquet files.",
    )
    images: str | None = Field(
        None,
        description="Image root (local directory or URI); every image path must resolve inside it. "
        "Default: the source's directory.",
    )
    source_name: str | None = Field(
        None, description="Value of the pool's 'source' column; default: the source's file name."
    )
    image_check: Literal["decode", "header", "none"] = Field(
        "decode",
        description="'decode' fully decodes every image (catches truncated files), 'header' "
        "only parses headers, 'none' trusts them.",
    )
    inline_images: bool = Field(
        True,
        description="Store image bytes in the pool (self-contained); False keeps references only.",
    )
    chunk_size: int = Field(4096, ge=1, description="Records per Ray task and per pool shard.")
    max_in_flight: int = Field(
        0, ge=0, description="Chunks submitted but not finished; 0 means twice the cluster's CPUs."
    )
    overwrite: bool = Field(False, description="Replace an existing pool in the workspace.")
    resources: Resources = Field(
        default_factory=Resources, description="Resources of one normalisation task."
    )


CONFIG = IngestConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", help="LLaVA JSON / JSONL / Parquet file or Parquet directory")
    parser.add_argument(
        "--images", help="image root directory or URI (default: the source's folder)"
    )
    parser.add_argument("--image-check", choices=["decode", "header", "none"])
    parser.add_argument("--chunk-size", type=int)
    parser.add_argument("--overwrite", action="store_true", default=None)


def overrides_from_args(args: argparse.Namespace) -> dict:
    out = {}
    if args.source:
        out["source"] = os.path.abspath(args.source) if "://" not in args.source else args.source
    if args.images:
        out["images"] = os.path.abspath(args.images) if "://" not in args.images else args.images
    for key in ("image_check", "chunk_size", "overwrite"):
        if getattr(args, key, None) is not None:
            out[key] = getattr(args, key)
    return out


@ray.remote
def _normalize_and_write(
    items: list[RawItem], index: int, source_name: str, policy_args: dict, staging: str, fs
) -> dict:
    pool, rejects = normalize_chunk(items, source_name, ImagePolicy(**policy_args))
    name = f"part-{index:06d}.parquet"
    if pool.num_rows:
        write_table_atomic(fs, f"{staging}/pool/{name}", pool)
    if rejects.num_rows:
        write_table_atomic(fs, f"{staging}/rejects/{name}", rejects)
    return {
        "records": len(items),
        "accepted": pool.num_rows,
        "rejected": rejects.num_rows,
        "reasons": Counter(rejects.column("reason_code").to_pylist()),
        "examples": rejects.select(["record_index", "id", "reason"]).slice(0, 5).to_pylist(),
    }


def resolve_paths(cfg: IngestConfig, ws: Workspace) -> tuple[str, str | None]:
    """Absolute source path and image root; relative paths are relative to the workspace."""
    if not cfg.source:
        raise InputError(
            "no source to ingest: pass --source FILE (LLaVA JSON, JSONL or Parquet), or run "
            "`vlselect world --out WS` first, which records its source in WS/vlselect.yaml"
        )

    def absolute(path: str) -> str:
        return path if "://" in path or os.path.isabs(path) else ws.path(path)

    source = absolute(cfg.source)
    images = (
        absolute(cfg.images)
        if cfg.images
        else (source if os.path.isdir(source) else os.path.dirname(source))
    )
    return source, images


def main(cfg: IngestConfig, ws: Workspace) -> dict:
    """Run the ingest stage; see the module docstring. Returns the summary dict."""
    timer = Timer()
    source, images = resolve_paths(cfg, ws)
    fmt = detect_format(source)
    if next(iter_records(source, fmt, batch_rows=1), None) is None:
        raise InputError(
            f"source {source} holds no records: pass --source a LLaVA JSON array, JSONL or "
            "Parquet file with at least one record"
        )
    if images and "://" not in images and not os.path.isdir(images):
        raise InputError(f"image root not found: {images} (pass --images DIR)")
    if ws.exists("pool") and not cfg.overwrite:
        raise InputError(
            f"{ws.path('pool')} already holds a pool: pass --overwrite to replace it, "
            "or use another --workspace"
        )
    source_name = cfg.source_name or os.path.basename(source.rstrip("/"))
    policy_args = {"root": images, "check": cfg.image_check, "inline": cfg.inline_images}
    ImagePolicy(**policy_args)  # an unusable image root URI is refused here, not in every task
    connect()
    max_in_flight = cfg.max_in_flight or 2 * cluster_cpus()
    staging = ws.staging_dir(STAGE)
    for sub in ("pool", "rejects"):
        ws.fs.create_dir(f"{staging}/{sub}")
    task = _normalize_and_write.options(**ray_options(cfg.resources))
    totals: Counter = Counter()
    reasons: Counter = Counter()
    examples: list[dict] = []
    try:
        dedup = DuplicateTracker()
        read = Counter()

        def marked():
            for item in iter_records(source, fmt):
                dedup.mark(item)
                read["records"] += 1
                yield item

        chunks = enumerate(chunked(marked(), cfg.chunk_size))
        with tqdm(
            total=count_records(source, fmt), unit="rec", desc="ingest", mininterval=1.0
        ) as bar:
            for result in bounded_submit(
                lambda ic: task.remote(ic[1], ic[0], source_name, policy_args, staging, ws.fs),
                chunks,
                max_in_flight,
            ):
                totals.update({k: result[k] for k in ("records", "accepted", "rejected")})
                reasons.update(result["reasons"])
                examples.extend(result["examples"][: max(0, 20 - len(examples))])
                bar.update(result["records"])
        # Three independent counts must agree: records the driver read, rows the tasks
        # reported, rows in the files on disk (from their footers).
        on_disk = ws.parquet_rows(f"{staging}/pool") + ws.parquet_rows(f"{staging}/rejects")
        if not read["records"] == totals["accepted"] + totals["rejected"] == on_disk:
            raise RuntimeError(
                f"ingest lost rows: read {read['records']}, tasks reported {dict(totals)}, "
                f"files hold {on_disk}; nothing was promoted"
            )
        pool_dir = ws.promote(f"{staging}/pool", "pool")
        rejects_dir = ws.promote(f"{staging}/rejects", "rejects")
    finally:
        ws.discard(staging)
    summary = {
        "source": source,
        "format": fmt,
        "image_root": images,
        "records_in": totals["records"],
        "accepted": totals["accepted"],
        "rejected": totals["rejected"],
        "rejected_by_reason": dict(sorted(reasons.items())),
        "seconds": round(timer.seconds, 2),
        "pool": pool_dir,
        "rejects": rejects_dir,
    }
    meta = {
        "stage": STAGE,
        "config": cfg.model_dump(),
        "source_fingerprint": fingerprint(source),
        **summary,
    }
    ws.write_json(f"{pool_dir}/{META_FILE}", meta)
    ws.write_json(f"{rejects_dir}/{META_FILE}", meta)
    rows = [
        ("records in", summary["records_in"]),
        ("accepted", summary["accepted"]),
        ("rejected", summary["rejected"]),
        *[(f"  {code}", n) for code, n in summary["rejected_by_reason"].items()],
        (
            "time",
            f"{summary['seconds']} s ({summary['records_in'] / max(timer.seconds, 1e-9):.0f} rec/s)",
        ),
        ("pool", pool_dir),
        ("rejects", rejects_dir),
    ]
    print_summary(STAGE, rows, extra=summary)
    for ex in sorted(examples, key=lambda e: e["record_index"]):
        print(f"  rejected record {ex['record_index']} (id {ex['id']!r}): {ex['reason']}")
    return summary


def fingerprint(path: str) -> dict:
    """Size, mtime and a hash of the first MiB of each file: cheap, and changes when the file does."""
    files = source_files(path)
    digest = hashlib.sha256()
    size = 0
    for file in files:
        stat = os.stat(file)
        size += stat.st_size
        digest.update(f"{os.path.basename(file)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        with open(file, "rb") as f:
            digest.update(f.read(1 << 20))
    return {"path": path, "files": len(files), "bytes": size, "sha256_head": digest.hexdigest()}


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main([STAGE, *sys.argv[1:]]))
