"""The skills stage's storage: the answer cache and the assembly of ``<ws>/skills`` rows.

``<ws>/cache/skills/`` holds Parquet shards of successes only (``CACHE_SCHEMA``),
keyed by ``engine.skills.cache_key``; a run appends shards as answers arrive, so an
interrupted run keeps what it finished, and a key found there is never asked again.
Failures are not cached: the next run retries them.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.skills import CACHE_SCHEMA, PROMPT_VERSION, SKILLS_SCHEMA
from engine.workspace import Workspace, read_parquet_dir, write_table_atomic

CACHE_DIR = ("cache", "skills")


def read_cache(ws: Workspace, keys: pa.Array | set[str] | None = None) -> pa.Table:
    """Cached successes (``CACHE_SCHEMA``), one row per key (its first), optionally only
    ``keys`` (string array or set). Arrow throughout: no Python object per row."""
    if not ws.list_files(*CACHE_DIR, suffix=".parquet"):
        return CACHE_SCHEMA.empty_table()
    table = read_parquet_dir(ws.path(*CACHE_DIR), ws.fs).cast(CACHE_SCHEMA)
    if keys is not None:
        wanted = keys if isinstance(keys, pa.Array) else pa.array(sorted(keys), pa.string())
        table = table.filter(pc.is_in(table.column("key"), value_set=wanted))
    return table.take(first_rows(table.column("key")))


def first_rows(keys: pa.Array | pa.ChunkedArray) -> pa.Array:
    """int64: the row of each distinct key's first occurrence, in row order."""
    numbered = pa.table({"key": keys, "row": pa.array(np.arange(len(keys), dtype=np.int64))})
    first = numbered.group_by("key", use_threads=False).aggregate([("row", "min")])
    first_row = first.column("row_min").combine_chunks()
    return first_row.take(pc.array_sort_indices(first_row))


class CacheWriter:
    """Buffers successes and writes them as cache shards, so an interruption keeps them."""

    def __init__(self, ws: Workspace, model: str, flush_rows: int):
        self.ws, self.model, self.flush_rows = ws, model, flush_rows
        self.run = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.buffer: list[pa.Table] = []
        self.rows = self.shards = 0

    def add(self, results: pa.Table) -> None:
        ok = results.filter(pc.equal(results.column("status"), "ok"))
        if ok.num_rows:
            n = ok.num_rows
            self.buffer.append(
                ok.select(["key", "skills", "skill_text", "raw"])
                .append_column("prompt_version", pa.repeat(pa.scalar(PROMPT_VERSION), n))
                .append_column("model", pa.repeat(pa.scalar(self.model), n))
                .cast(CACHE_SCHEMA)
            )
            self.rows += n
        if sum(t.num_rows for t in self.buffer) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.ws.path(*CACHE_DIR, f"part-{self.run}-{self.shards:05d}.parquet")
        write_table_atomic(self.ws.fs, path, pa.concat_tables(self.buffer))
        self.buffer, self.shards = [], self.shards + 1


def assemble(ids: pa.Table, cached: pa.Table, failures: pa.Table, model: str) -> pa.Table:
    """One ``SKILLS_SCHEMA`` row per id: its key's cached success, else its recorded failure."""
    n_ok, n_bad = cached.num_rows, failures.num_rows
    results = pa.table(
        {
            "key": pa.concat_arrays(
                [cached.column("key").combine_chunks(), failures.column("key").combine_chunks()]
            ),
            "skills": pa.concat_arrays(
                [
                    cached.column("skills").combine_chunks(),
                    failures.column("skills").combine_chunks(),
                ]
            ),
            "skill_text": pa.concat_arrays(
                [
                    cached.column("skill_text").combine_chunks(),
                    failures.column("skill_text").combine_chunks(),
                ]
            ),
            "raw": pa.concat_arrays(
                [cached.column("raw").combine_chunks(), failures.column("raw").combine_chunks()]
            ),
            "status": pa.concat_arrays(
                [pa.repeat(pa.scalar("ok"), n_ok), pa.repeat(pa.scalar("failed"), n_bad)]
            ),
            "reason": pa.concat_arrays(
                [pa.nulls(n_ok, pa.string()), failures.column("reason").combine_chunks()]
            ),
        }
    )
    # index_in finds a key's first row: a key is in cached once, and failures are not cached.
    rows = pc.index_in(ids.column("key"), value_set=results.column("key"))
    if rows.null_count:
        raise RuntimeError(
            f"{rows.null_count} pool ids got no skills row (rows lost); nothing was committed"
        )
    out = results.take(rows)
    n = ids.num_rows
    return pa.table(
        {
            "id": ids.column("id"),
            **{c: out.column(c) for c in ("skills", "skill_text", "raw", "status", "reason")},
            "prompt_version": pa.repeat(pa.scalar(PROMPT_VERSION), n),
            "model": pa.repeat(pa.scalar(model), n),
        }
    ).cast(SKILLS_SCHEMA)
