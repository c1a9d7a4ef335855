"""The skills stage's storage: the answer cache and the assembly of ``<ws>/skills`` rows.

``<ws>/cache/skills/`` holds Parquet shards of successes only (``CACHE_SCHEMA``),
keyed by ``engine.skills.cache_key``; a run appends shards as answers arrive, so an
interrupted run keeps what it finished, and a key found there is never asked again.
Failures are not cached: the next run retries them.

The stage reads the pool twice and holds nothing per pool row or per question in its
driver. Pass 1 reads the pool in slices (``part_slices``); each slice's task keeps one
row per key with its first position in the pool and its row count (``asked_questions``);
the cache's keys join them as ``cached_keys`` rows, and a hash aggregation by key
(Ray Data's, in the job) leaves one row per key of the run, marked cached or not. Pass 2
rebuilds each output part's (id, key) rows from the pool (``part_slices``,
``part_keys``) and joins them to the answers of the run's keys (``results_table``,
``assemble``).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from engine.shards import read_rows
from engine.skills import CACHE_SCHEMA, PROMPT_VERSION, SKILLS_SCHEMA, cache_key
from engine.text import instruction_text
from engine.workspace import Workspace, read_parquet_dir, write_table_atomic

CACHE_DIR = ("cache", "skills")
KEYS_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("key", pa.string())])
KEYED_SCHEMA = KEYS_SCHEMA.append(pa.field("question", pa.string()))
QUESTIONS_SCHEMA = pa.schema([pa.field("key", pa.string()), pa.field("question", pa.string())])
# Pass 1's rows: a key, its question, its first position in the pool, the pool rows that
# ask it, and whether the cache answers it (question and first are null on cache rows).
ASKED_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("question", pa.string()),
        pa.field("first", pa.int64()),
        pa.field("rows", pa.int64()),
        pa.field("cached", pa.int64()),
    ]
)
RESULT_COLUMNS = ("skills", "skill_text", "raw", "status", "reason")
# Failed rows a part reports back to the driver, which prints the first few of the pool.
EXAMPLES = 5


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


def keyed_questions(batch: pa.Table, prompt_version: str, model: str) -> pa.Table:
    """``(id, key, question)`` strings, one row per row of ``batch`` (columns id and
    conversations, the pool's): the instruction text and its ``cache_key``."""
    questions = [instruction_text(c) for c in batch.column("conversations").to_pylist()]
    keys = [cache_key(q, prompt_version, model) for q in questions]
    return pa.table(
        {"id": batch.column("id"), "key": pa.array(keys, pa.string()), "question": questions}
    )


def unique_questions(keyed: pa.Table) -> pa.Table:
    """``(key, question, first int64, rows int64)``: each key's first row of ``keyed``
    (columns key and question), in order of first appearance, with that row's index and
    how many rows of ``keyed`` hold the key."""
    numbered = pa.table(
        {"key": keyed.column("key"), "row": pa.array(np.arange(keyed.num_rows, dtype=np.int64))}
    )
    groups = numbered.group_by("key", use_threads=False).aggregate(
        [("row", "min"), ("row", "count")]
    )
    order = pc.array_sort_indices(groups.column("row_min"))
    first = groups.column("row_min").take(order)
    unique = keyed.select(["key", "question"]).take(first)
    return unique.append_column("first", first).append_column(
        "rows", groups.column("row_count").take(order).cast(pa.int64())
    )


def asked_questions(
    fs: pafs.FileSystem,
    ranges: list[tuple[str, int, int]],
    start: int,
    prompt_version: str,
    model: str,
) -> pa.Table:
    """``ASKED_SCHEMA``: the unique questions of the pool rows ``[begin, end)`` of each
    ``(path, begin, end)`` (a slice of ``part_slices``), ``first`` their first row's
    position in the pool (``start``: the slice's first position), ``rows`` how many of
    the slice's rows ask them, ``cached`` 0."""
    keyed = part_questions(fs, ranges, prompt_version, model)
    unique = unique_questions(keyed)
    first = pc.add(unique.column("first"), pa.scalar(start, pa.int64()))
    return pa.table(
        {
            "key": unique.column("key"),
            "question": unique.column("question"),
            "first": first,
            "rows": unique.column("rows"),
            "cached": pa.repeat(pa.scalar(0, pa.int64()), unique.num_rows),
        }
    ).cast(ASKED_SCHEMA)


def cached_keys(batch: pa.Table) -> pa.Table:
    """``ASKED_SCHEMA`` rows for cache shards' keys (``batch``: a key column): asked by no
    pool row (rows 0), answered (cached 1). Aggregated by key with ``asked_questions``
    rows (min of question and first, sum of rows, max of cached), they mark the asked
    keys the cache answers; keys the run does not ask keep rows 0 and are dropped."""
    n = batch.num_rows
    return pa.table(
        {
            "key": batch.column("key"),
            "question": pa.nulls(n, pa.string()),
            "first": pa.nulls(n, pa.int64()),
            "rows": pa.repeat(pa.scalar(0, pa.int64()), n),
            "cached": pa.repeat(pa.scalar(1, pa.int64()), n),
        }
    ).cast(ASKED_SCHEMA)


def part_slices(sizes: list[int], total: int, part_rows: int) -> list[list[tuple[int, int, int]]]:
    """Output parts of ``part_rows`` rows over the first ``total`` rows of files holding
    ``sizes`` rows each, in order: per part, its ``(file, begin, end)`` row ranges
    (local to the file, end exclusive). At least one part, empty when ``total`` is 0.

    Part ``i`` holds rows ``[i * part_rows, (i + 1) * part_rows)`` of the files read as
    one table, so the parts are those that slicing that table would give.
    """
    if total > sum(sizes):
        raise ValueError(f"{total} rows asked of files holding {sum(sizes)}")
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    parts = []
    for lo in range(0, max(total, 1), part_rows):
        hi = min(lo + part_rows, total)
        first = int(np.searchsorted(starts, lo, side="right")) - 1
        ranges = []
        for f in range(first, len(sizes)):
            if starts[f] >= hi:
                break
            begin, end = max(lo, starts[f]) - starts[f], min(hi, starts[f + 1]) - starts[f]
            if end > begin:
                ranges.append((f, int(begin), int(end)))
        parts.append(ranges)
    return parts


@dataclass(frozen=True)
class QuestionBlocks:
    """Questions to ask, as blocks in Ray's object store: ``refs`` to QUESTIONS_SCHEMA
    tables (key, question) whose rows add up to ``rows`` (the count travels with them,
    so no reader pays a task per block to learn it). This layer holds the refs only."""

    refs: list
    rows: int


def question_block_rows(questions: int, batch_size: int, cpus: int, most: int = 256) -> int:
    """Rows of each object-store block of the questions to ask: a multiple of
    ``batch_size`` (so the batches a backend cuts from a block are exact, whatever
    blocks its tasks get); about 4 blocks per CPU, so every actor gets some; and at
    most ``most`` rows, or one batch if that is larger.

    Why a ceiling, and why 256: each block costs Ray Data a metadata task and a bundle
    (665k questions in blocks of 32 would be 20,782 of each; in blocks of 256, 2,598),
    but a map task hands on its answers when its whole block is done (Ray Data joins a
    task's small outputs into one block), so a block is also how many answers reach the
    driver, its progress bar and the answer cache at once: 256 is the cache's default
    flush. ``questions``: how many there are to ask; ``cpus``: the cluster's CPUs.
    """
    batch_size = max(batch_size, 1)
    batches = -(-questions // batch_size)
    per_block = -(-batches // max(4 * cpus, 1))
    return batch_size * max(1, min(per_block, most // batch_size))


def part_questions(
    fs: pafs.FileSystem, ranges: list[tuple[str, int, int]], prompt_version: str, model: str
) -> pa.Table:
    """``(id, key, question)`` of the pool rows ``[begin, end)`` of each ``(path, begin,
    end)``, in order (``keyed_questions`` of the rows read)."""
    tables = [KEYED_SCHEMA.empty_table()]
    for path, begin, end in ranges:
        rows = read_rows(fs, path, np.arange(begin, end, dtype=np.int64), ["id", "conversations"])
        tables.append(keyed_questions(rows, prompt_version, model).cast(KEYED_SCHEMA))
    return pa.concat_tables(tables)


def part_keys(
    fs: pafs.FileSystem, ranges: list[tuple[str, int, int]], prompt_version: str, model: str
) -> pa.Table:
    """``KEYS_SCHEMA`` (id, key) of the pool rows ``[begin, end)`` of each ``(path, begin,
    end)``, in order: the pool read again rather than pass 1's keys kept, which would be
    a row per pool sample."""
    return part_questions(fs, ranges, prompt_version, model).select(["id", "key"])


def results_table(cached: pa.Table, failures: pa.Table) -> pa.Table:
    """The answer of each unique key, to join pool rows against: ``(key, skills,
    skill_text, raw, status, reason)``, the cached successes (``CACHE_SCHEMA``) first, then
    the run's failures (``RESULT_SCHEMA``); one row per key of the stage, not per pool row."""
    n_ok, n_bad = cached.num_rows, failures.num_rows

    def both(column: str) -> pa.Array:
        return pa.concat_arrays(
            [cached.column(column).combine_chunks(), failures.column(column).combine_chunks()]
        )

    return pa.table(
        {
            "key": both("key"),
            "skills": both("skills"),
            "skill_text": both("skill_text"),
            "raw": both("raw"),
            "status": pa.concat_arrays(
                [pa.repeat(pa.scalar("ok"), n_ok), pa.repeat(pa.scalar("failed"), n_bad)]
            ),
            "reason": pa.concat_arrays(
                [pa.nulls(n_ok, pa.string()), failures.column("reason").combine_chunks()]
            ),
        }
    )


def assemble(ids: pa.Table, results: pa.Table, model: str) -> pa.Table:
    """One ``SKILLS_SCHEMA`` row per row of ``ids`` (id, key), in its order: its key's row
    of ``results`` (``results_table``: a cached success, else a recorded failure)."""
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
            **{c: out.column(c) for c in RESULT_COLUMNS},
            "prompt_version": pa.repeat(pa.scalar(PROMPT_VERSION), n),
            "model": pa.repeat(pa.scalar(model), n),
        }
    ).cast(SKILLS_SCHEMA)


def part_counts(table: pa.Table) -> dict:
    """What a written part tells the driver: rows, ok, failed, and its first
    ``EXAMPLES`` failed rows as ``{"id", "reason"}`` dicts (``table``: ``SKILLS_SCHEMA``)."""
    failed = table.filter(pc.equal(table.column("status"), "failed"))
    return {
        "rows": table.num_rows,
        "ok": pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0,
        "failed": failed.num_rows,
        "examples": failed.select(["id", "reason"]).slice(0, EXAMPLES).to_pylist(),
    }
