"""``vlselect ingest``: a LLaVA JSON / JSONL / Parquet source (path or URI) -> ``<ws>/pool``.

What it does:
    1. checks the source, its format, the image root and the workspace in the driver,
       and splits the source (Parquet row groups, JSONL byte ranges, a JSON array's
       records found by one scan: engine.sources); a pool committed from the same source
       and config is kept as it is;
    2. reads each split's ids in parallel tasks, hashed into buckets, and finds the
       duplicate ids per bucket (the first occurrence wins): the driver holds only the
       duplicates and a count per split, never a record;
    3. parses and normalises each split in parallel tasks (image read and decode check),
       each writing its pool shards and rejects shards into the pool's new attempt;
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
from itertools import accumulate
from typing import Literal

import numpy as np
import ray
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from actors.adapter import ray_options
from engine.artifacts import REJECTS, Pool, PoolMeta, Ref
from engine.commit import operational
from engine.errors import InputError
from engine.ingest import chunked, find_duplicates, id_buckets, mark_duplicates, normalize_chunk
from engine.pool import POOL_ROW_GROUP_ROWS, ImagePolicy
from engine.resources import Resources
from engine.sources import (
    SPLIT_BYTES,
    SourceFormat,
    Split,
    detect_format,
    iter_ids,
    iter_split,
    plan_splits,
    source_files,
)
from engine.workspace import Location, Workspace, write_table_atomic
from jobs.flags import path_field
from jobs.runtime import (
    Timer,
    bounded_submit,
    cluster_cpus,
    connect,
    print_summary,
    unwrap_input_errors,
)

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
    chunk_size: int = Field(
        4096, ge=1, description="Records per pool shard, and the least rows of a Parquet split."
    )
    split_bytes: int = operational(
        SPLIT_BYTES,
        ge=1,
        description="Bytes of a JSON or JSONL source one task parses (a split).",
    )
    max_in_flight: int = operational(
        0, ge=0, description="Splits submitted but not finished; 0 means twice the cluster's CPUs."
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
def _read_ids(split: Split, fmt: SourceFormat, first: int, buckets: int):
    """Pass 1: (records, *bucket tables of (id, index)) of one split; see engine.ingest."""
    n, tables = id_buckets(iter_ids(split, fmt, first), buckets)
    return (n, *tables)


@ray.remote
def _find_duplicates(offsets: list[int], *tables):
    return find_duplicates(tables, offsets)


@ray.remote
def _normalize_and_write(
    split: Split,
    first_shard: int,
    fmt: SourceFormat,
    first: int,
    duplicates,
    chunk_size: int,
    source_name: str,
    policy_args: dict,
    out_dir: str,
    fs,
) -> dict:
    """Pass 2: parse one split and write its pool and rejects shards, numbered from
    ``first_shard`` (a shard of ``chunk_size`` records, the split's last one shorter)."""
    policy = ImagePolicy(**policy_args)
    result = {"records": 0, "accepted": 0, "rejected": 0, "reasons": Counter(), "examples": []}
    for j, items in enumerate(chunked(iter_split(split, fmt, first), chunk_size)):
        pool, rejects = normalize_chunk(mark_duplicates(items, duplicates), source_name, policy)
        name = f"part-{first_shard + j:06d}.parquet"
        if pool.num_rows:
            write_table_atomic(fs, f"{out_dir}/{name}", pool, POOL_ROW_GROUP_ROWS)
        if rejects.num_rows:
            write_table_atomic(fs, f"{out_dir}/{REJECTS}/{name}", rejects)
        result["records"] += len(items)
        result["accepted"] += pool.num_rows
        result["rejected"] += rejects.num_rows
        result["reasons"].update(rejects.column("reason_code").to_pylist())
        room = max(0, 5 - len(result["examples"]))
        result["examples"] += (
            rejects.select(["record_index", "id", "reason"]).slice(0, room).to_pylist()
        )
    return result


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
    try:
        splits = plan_splits(source, fmt, cfg.split_bytes, cfg.chunk_size)
        if not any(s.records for s in splits) and not _any_jsonl_record(splits, fmt):
            raise InputError(
                f"source {source.uri} holds no records: pass --source a LLaVA JSON array, JSONL "
                "or Parquet file with at least one record"
            )
        connect()
        with unwrap_input_errors():
            counts, duplicates = _count_and_find_duplicates(cfg, splits, fmt)
            totals, reasons, examples = _normalize(cfg, ws, source, splits, fmt, counts,
                                                   duplicates, policy_args, attempt.dir)  # fmt: skip
    except InputError:
        attempt.abandon()  # the source is broken as a whole: nothing is kept
        raise
    # Three independent counts must agree: records the ids pass read, rows the
    # normalising tasks reported, rows in the files on disk (from their footers).
    on_disk = ws.parquet_rows(attempt.dir) + ws.parquet_rows(attempt.path(REJECTS))
    read = sum(counts)
    if not read == totals["accepted"] + totals["rejected"] == on_disk:
        raise RuntimeError(
            f"ingest lost rows: read {read}, tasks reported {dict(totals)}, "
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


def _any_jsonl_record(splits: list[Split], fmt: SourceFormat) -> bool:
    return fmt == "jsonl" and any(next(iter_split(s, fmt, 0), None) for s in splits)


def _count_and_find_duplicates(cfg: IngestConfig, splits: list[Split], fmt: SourceFormat):
    """Pass 1 and the duplicate search: (records of each split, int64 (d, 2) duplicates
    as (record index, index of the first record with that id))."""
    buckets = min(64, cluster_cpus(), len(splits))
    known = fmt != "jsonl"  # JSON and Parquet splits know their counts before they are read
    starts = [0] * len(splits)
    if known:
        starts = [0, *accumulate(s.records for s in splits)][:-1]
    task = _read_ids.options(num_returns=1 + buckets, **ray_options(cfg.resources))
    refs = [task.remote(s, fmt, first, buckets) for s, first in zip(splits, starts, strict=True)]
    counts = _gather([r[0] for r in refs], "ingest: ids", sum(s.records or 0 for s in splits))
    if known and counts != [s.records for s in splits]:
        raise RuntimeError(f"ingest: the splits' record counts {[s.records for s in splits]} "
                           f"differ from what their tasks read {counts}")  # fmt: skip
    firsts = [0, *accumulate(counts)][:-1]
    offsets = [0] * len(splits) if known else firsts
    found = ray.get([_find_duplicates.remote(offsets, *[r[1 + b] for r in refs])
                     for b in range(buckets)])  # fmt: skip
    del refs  # the id tables leave the object store
    duplicates = np.concatenate(found)
    return counts, duplicates[np.argsort(duplicates[:, 0], kind="stable")]


def _gather(refs: list, desc: str, total: int) -> list:
    """``ray.get(refs)`` in order, with a progress bar of the values as they finish."""
    with tqdm(total=total or None, unit="rec", desc=desc, mininterval=1.0) as bar:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            bar.update(sum(ray.get(done)))
    return ray.get(refs)


def _normalize(cfg, ws, source, splits, fmt, counts, duplicates, policy_args, out_dir):
    """Pass 2: every split parsed and normalised by its task; (totals, reasons, examples).
    Its shards are numbered on from those of the splits before it, so the pool's shards
    are part-000000, part-000001, ... in source order."""
    firsts = [0, *accumulate(counts)][:-1]
    shard_bases = [0, *accumulate(-(-c // cfg.chunk_size) for c in counts)][:-1]
    source_name = cfg.source_name or source.name
    max_in_flight = cfg.max_in_flight or 2 * cluster_cpus()
    task = _normalize_and_write.options(**ray_options(cfg.resources))
    bounds = np.searchsorted(duplicates[:, 0], [*firsts, np.iinfo(np.int64).max])
    totals, reasons, examples = Counter(), Counter(), []

    def submit(i: int):
        mine = duplicates[bounds[i] : bounds[i + 1]]
        return task.remote(splits[i], shard_bases[i], fmt, firsts[i], mine, cfg.chunk_size, source_name,
                           policy_args, out_dir, ws.fs)  # fmt: skip

    with tqdm(total=sum(counts), unit="rec", desc="ingest", mininterval=1.0) as bar:
        for result in bounded_submit(submit, range(len(splits)), max_in_flight):
            totals.update({k: result[k] for k in ("records", "accepted", "rejected")})
            reasons.update(result["reasons"])
            examples.extend(result["examples"][: max(0, 20 - len(examples))])
            bar.update(result["records"])
    return totals, reasons, examples


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
