"""``vlselect ingest``: a LLaVA JSON / JSONL / Parquet source (path or URI) -> ``<ws>/pool``.

What it does:
    1. checks the source, its format, the image root and the workspace in the driver;
       a pool committed from the same source and config is kept as it is;
    2. streams records (ijson for a JSON array: never loaded whole), marks duplicate ids;
    3. normalises chunks in parallel Ray tasks (image read and decode check), each
       writing one pool shard and one rejects shard into the pool's new attempt;
    4. checks rows in = accepted + rejected, commits the pool (its rows and its
       ``rejects/``) and prints a summary with per-reason counts.

Raises:
    InputError: the source, image root, workspace or config is wrong as a whole
        (exit 2; nothing is written to the workspace).
    RuntimeError: the counts do not add up (exit 1; nothing is committed).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import Counter
from typing import Literal

import ray
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from actors.adapter import ray_options
from engine.artifacts import REJECTS, Pool, PoolMeta, Ref
from engine.commit import operational
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
from engine.pool import POOL_ROW_GROUP_ROWS, ImagePolicy
from engine.resources import Resources
from engine.workspace import Location, Workspace, write_table_atomic
from jobs.flags import path_field
from jobs.runtime import Timer, bounded_submit, cluster_cpus, connect, print_summary

STAGE = "ingest"
DEFAULT_WORKSPACE = None


class IngestConfig(BaseModel):
    """Configuration of ``vlselect ingest`` (section ``ingest`` of a config file)."""

    model_config = ConfigDict(extra="forbid")

    source: str | None = path_field(
        None,
        description="LLaVA JSON (array), JSONL or Parquet file, or a directory of Parquet "
        "files: a path or URI (s3://, gs://, with their query options).",
    )
    images: str | None = path_field(
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
    max_in_flight: int = operational(
        0, ge=0, description="Chunks submitted but not finished; 0 means twice the cluster's CPUs."
    )
    overwrite: bool = operational(False, description="Replace an existing pool in the workspace.")
    resources: Resources = operational(
        default_factory=Resources, description="Resources of one normalisation task."
    )


CONFIG = IngestConfig


def reads(cfg: IngestConfig) -> list[Ref]:
    # No source named: the workspace's world records its own (vlselect world).
    return [] if cfg.source else [Ref("world")]


def writes(cfg: IngestConfig) -> list[Ref]:
    return [Ref("pool")]


def resources(cfg: IngestConfig) -> dict[str, Resources]:
    return {"normalisation task": cfg.resources}


@ray.remote
def _normalize_and_write(
    items: list[RawItem], index: int, source_name: str, policy_args: dict, out_dir: str, fs
) -> dict:
    pool, rejects = normalize_chunk(items, source_name, ImagePolicy(**policy_args))
    name = f"part-{index:06d}.parquet"
    if pool.num_rows:
        write_table_atomic(fs, f"{out_dir}/{name}", pool, POOL_ROW_GROUP_ROWS)
    if rejects.num_rows:
        write_table_atomic(fs, f"{out_dir}/{REJECTS}/{name}", rejects)
    return {
        "records": len(items),
        "accepted": pool.num_rows,
        "rejected": rejects.num_rows,
        "reasons": Counter(rejects.column("reason_code").to_pylist()),
        "examples": rejects.select(["record_index", "id", "reason"]).slice(0, 5).to_pylist(),
    }


def resolve_paths(cfg: IngestConfig, ws: Workspace) -> tuple[Location, str | None]:
    """The source and the image root as URIs; relative paths are relative to the workspace."""
    if not cfg.source:
        raise InputError(
            "no source to ingest: pass --source FILE (LLaVA JSON, JSONL or Parquet), or run "
            "`vlselect world --out WS` first, which records its source in WS/vlselect.yaml"
        )

    def absolute(path: str) -> str:
        return path if "://" in path or os.path.isabs(path) else ws.uri_of(ws.path(path))

    source = Location.of(absolute(cfg.source))
    if cfg.images:
        images = absolute(cfg.images)
    else:
        images = source.uri_of(source.path if source.is_dir() else os.path.dirname(source.path))
    return source, images


def source_fingerprint(source: Location) -> dict:
    """Size, mtime and a hash of the first MiB of each file: cheap, and changes when the file does."""
    digest = hashlib.sha256()
    size = n = 0
    for file in source_files(source):
        info = file.fs.get_file_info(file.path)
        size += info.size or 0
        n += 1
        digest.update(f"{file.name}:{info.size}:{info.mtime_ns}".encode())
        with file.open() as f:
            digest.update(f.read(1 << 20))
    return {"path": source.uri, "files": n, "bytes": size, "sha256_head": digest.hexdigest()}


def main(cfg: IngestConfig, ws: Workspace) -> dict:
    """Run the ingest stage; see the module docstring. Returns the summary dict."""
    timer = Timer()
    source, images = resolve_paths(cfg, ws)
    fmt = detect_format(source)
    if next(iter_records(source, fmt, batch_rows=1), None) is None:
        raise InputError(
            f"source {source.uri} holds no records: pass --source a LLaVA JSON array, JSONL or "
            "Parquet file with at least one record"
        )
    if images and "://" not in images and not os.path.isdir(images):
        raise InputError(f"image root not found: {images} (pass --images DIR)")
    policy_args = {"root": images, "check": cfg.image_check, "inline": cfg.inline_images}
    ImagePolicy(**policy_args)  # an unusable image root URI is refused here, not in every task
    plan = Pool.begin(
        ws,
        source=source_fingerprint(source),
        config=cfg,
        overwrite=cfg.overwrite,
        refuse_change=f"{Pool.folder(ws)} already holds a pool of another source or config: "
        "pass --overwrite to replace it, or use another --workspace",
    )
    if plan.action == "current":
        pool = Pool.committed(ws, None, plan.manifest)
        _print(pool, reused=True, examples=[])
        return _summary(pool)
    attempt = plan.attempt
    source_name = cfg.source_name or source.name
    connect()
    max_in_flight = cfg.max_in_flight or 2 * cluster_cpus()
    task = _normalize_and_write.options(**ray_options(cfg.resources))
    totals: Counter = Counter()
    reasons: Counter = Counter()
    examples: list[dict] = []
    dedup = DuplicateTracker()
    read = Counter()

    def marked():
        for item in iter_records(source, fmt):
            dedup.mark(item)
            read["records"] += 1
            yield item

    chunks = enumerate(chunked(marked(), cfg.chunk_size))
    try:
        with tqdm(
            total=count_records(source, fmt), unit="rec", desc="ingest", mininterval=1.0
        ) as bar:
            for result in bounded_submit(
                lambda ic: task.remote(ic[1], ic[0], source_name, policy_args, attempt.dir, ws.fs),
                chunks,
                max_in_flight,
            ):
                totals.update({k: result[k] for k in ("records", "accepted", "rejected")})
                reasons.update(result["reasons"])
                examples.extend(result["examples"][: max(0, 20 - len(examples))])
                bar.update(result["records"])
    except InputError:
        # the source is broken as a whole (found while streaming it): nothing is kept
        attempt.abandon()
        raise
    # Three independent counts must agree: records the driver read, rows the tasks
    # reported, rows in the files on disk (from their footers).
    on_disk = ws.parquet_rows(attempt.dir) + ws.parquet_rows(attempt.path(REJECTS))
    if not read["records"] == totals["accepted"] + totals["rejected"] == on_disk:
        raise RuntimeError(
            f"ingest lost rows: read {read['records']}, tasks reported {dict(totals)}, "
            f"files hold {on_disk}; nothing was committed"
        )
    meta = PoolMeta(
        source=source.uri,
        format=fmt,
        image_root=images,
        records_in=totals["records"],
        accepted=totals["accepted"],
        rejected=totals["rejected"],
        rejected_by_reason=dict(sorted(reasons.items())),
        source_fingerprint=source_fingerprint(source),
        seconds=round(timer.seconds, 2),
        config=cfg.model_dump(mode="json"),
    )
    pool = Pool.committed(ws, None, attempt.commit(meta))
    _print(pool, reused=False, examples=examples)
    return _summary(pool)


def _summary(pool: Pool) -> dict:
    m = pool.meta
    return {
        "source": m.source,
        "format": m.format,
        "image_root": m.image_root,
        "records_in": m.records_in,
        "accepted": m.accepted,
        "rejected": m.rejected,
        "rejected_by_reason": m.rejected_by_reason,
        "seconds": m.seconds,
        "pool": pool.dir,
        "rejects": pool.path(REJECTS),
    }


def _print(pool: Pool, reused: bool, examples: list[dict]) -> None:
    m = pool.meta
    rate = f" ({m.records_in / max(m.seconds, 1e-9):.0f} rec/s)"
    rows = [
        ("records in", m.records_in),
        ("accepted", m.accepted),
        ("rejected", m.rejected),
        *[(f"  {code}", n) for code, n in m.rejected_by_reason.items()],
        ("time", "current, nothing recomputed" if reused else f"{m.seconds} s{rate}"),
        ("pool", pool.dir),
        ("rejects", pool.path(REJECTS)),
    ]
    print_summary(STAGE, rows, extra=_summary(pool))
    for ex in sorted(examples, key=lambda e: e["record_index"]):
        print(f"  rejected record {ex['record_index']} (id {ex['id']!r}): {ex['reason']}")


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main([STAGE, *sys.argv[1:]]))
