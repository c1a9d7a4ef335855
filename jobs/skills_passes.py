"""The skills stage's two reads of the pool, in Ray tasks; the driver holds counts and
object refs, nothing per pool row or per question.

``plan_questions`` (pass 1): the unique questions of the first ``limit`` rows, less
those the answer cache holds, as blocks in the object store. ``answers`` and
``write_parts`` (pass 2): the answer of each of the run's keys, built in a task, and the
``<ws>/skills`` parts, each written by a task that reads its pool rows again.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.aggregate import Count, Max, Min, Sum
from tqdm import tqdm

from engine.artifacts import Pool
from engine.commit import Attempt
from engine.skills import PROMPT_VERSION, RESULT_SCHEMA
from engine.skills_config import SkillsConfig
from engine.skills_store import (
    CACHE_DIR,
    QUESTIONS_SCHEMA,
    QuestionBlocks,
    asked_questions,
    assemble,
    cached_keys,
    part_counts,
    part_keys,
    part_slices,
    question_block_rows,
    read_cache,
    results_table,
)
from engine.workspace import Workspace, write_table_atomic
from jobs.runtime import bounded_submit, cluster_cpus

# Pool rows one pass-1 task reads: its unique questions are a fraction of this.
READ_ROWS = 16_384


def _asked(batch: dict, reads: list, fs, model: str) -> pa.Table:
    tables = [
        asked_questions(fs, ranges, start, PROMPT_VERSION, model)
        for ranges, start in (reads[i] for i in batch["id"])
    ]
    return pa.concat_tables(tables)


def _only(batch: pa.Table, column: str, value: int | None = None) -> pa.Table:
    """Rows whose ``column`` equals ``value`` (is positive when ``value`` is None)."""
    values = batch.column(column)
    keep = pc.greater(values, 0) if value is None else pc.equal(values, value)
    return batch.filter(keep)


@dataclass(frozen=True)
class Questions:
    """Pass 1's outcome: counts, and refs to blocks in the object store (the driver
    holds no question)."""

    samples: int  # pool rows read (the first ``limit``)
    sizes: list[int]  # rows of each pool shard, from their footers (pass 2 slices by them)
    unique: int  # their unique keys
    cached: int  # of which the cache answers
    pending: QuestionBlocks  # the uncached keys, in order of first appearance
    keys: list  # ObjectRefs of tables whose ``key`` column holds the run's unique keys

    @property
    def to_ask(self) -> int:
        return self.unique - self.cached


def plan_questions(cfg: SkillsConfig, pool: Pool, model: str) -> Questions:
    """Pass 1, in Ray Data: read the first ``limit`` pool rows in ``READ_ROWS`` slices,
    deduplicate each slice's questions in its task (``asked_questions``), add the answer
    cache's keys (``cached_keys``), aggregate by key (a hash shuffle: one row per key,
    wherever its rows were), and cut the keys the cache does not answer into blocks of a
    multiple of ``cfg.asked_batch_size`` rows (``question_block_rows``) in order of first
    appearance.

    The blocks are streamed through the driver once, to cut them exactly (a backend
    batching its prompts answers the same questions the same way whatever blocks Ray
    made) and put in the object store; the driver keeps their refs.
    Raises RuntimeError when the aggregated rows do not add up to the rows read.
    """
    fs, files = pool.ws.fs, pool.shards
    sizes = [pq.read_metadata(f, filesystem=fs).num_rows for f in files]
    samples = min(cfg.limit or sum(sizes), sum(sizes))
    reads = [
        ([(files[f], begin, end) for f, begin, end in ranges], i * READ_ROWS)
        for i, ranges in enumerate(part_slices(sizes, samples, READ_ROWS))
    ]
    asked = ray.data.range(len(reads)).map_batches(
        _asked,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"reads": reads, "fs": fs, "model": model},
        num_cpus=0.25,
    )
    shards = pool.ws.list_files(*CACHE_DIR, suffix=".parquet")
    if shards:
        cache = ray.data.read_parquet(shards, filesystem=fs).select_columns(["key"])
        asked = asked.union(cache.map_batches(cached_keys, batch_format="pyarrow", num_cpus=0.25))
    # a partition per read task, up to two per CPU: Ray Data's default of 200 shuffle
    # partitions costs more than it saves on a small pool
    partitions = max(1, min(2 * cluster_cpus(), len(reads)))
    keyed = (
        asked.groupby("key", num_partitions=partitions)
        .aggregate(
            Min("first", alias_name="first"),
            Min("question", alias_name="question"),
            Sum("rows", alias_name="rows"),
            Max("cached", alias_name="cached"),
        )
        .map_batches(_only, batch_format="pyarrow", fn_kwargs={"column": "rows"}, num_cpus=0.25)
        .materialize()
    )
    counts = keyed.aggregate(
        Count(alias_name="unique"),
        Sum("cached", alias_name="cached"),
        Sum("rows", alias_name="samples"),
    )
    if (counts["samples"] or 0) != samples:
        raise RuntimeError(
            f"skills pass 1 counted {counts['samples'] or 0} pool rows of the {samples} read "
            "(rows lost); nothing was asked"
        )
    unique, cached = counts["unique"], counts["cached"] or 0
    to_ask = keyed.map_batches(
        _only, batch_format="pyarrow", fn_kwargs={"column": "cached", "value": 0}, num_cpus=0.25
    ).sort("first")
    rows = question_block_rows(unique - cached, cfg.asked_batch_size, cluster_cpus())
    pending = [
        ray.put(batch.select(["key", "question"]).cast(QUESTIONS_SCHEMA))
        for batch in to_ask.iter_batches(batch_size=rows, batch_format="pyarrow")
    ]
    return Questions(
        samples=samples,
        sizes=sizes,
        unique=unique,
        cached=cached,
        pending=QuestionBlocks(pending, unique - cached),
        keys=keyed.select_columns(["key"]).to_arrow_refs(),
    )


def put_blocks(questions: pa.Table, batch_size: int) -> QuestionBlocks:
    """``questions`` (key, question) cut into blocks (``question_block_rows``) and put in
    the object store: what ``jobs.skills.generate`` reads, for a caller holding a few
    questions in hand (the target job's benchmark questions)."""
    step = question_block_rows(questions.num_rows, batch_size, cluster_cpus())
    refs = [ray.put(questions.slice(i, step)) for i in range(0, questions.num_rows, step)]
    return QuestionBlocks(refs, questions.num_rows)


@ray.remote(num_cpus=0.25)
def answers(ws: Workspace, keys: list, failures: list) -> pa.Table:
    """The answer of each of the run's keys (``results_table``), built in a task: it holds
    a row per unique key, which the driver must not."""
    wanted = pa.concat_arrays(
        [t.column("key").combine_chunks() for t in ray.get(keys)] or [pa.array([], pa.string())]
    )
    failed = pa.concat_tables([RESULT_SCHEMA.empty_table(), *ray.get(failures)])
    return results_table(read_cache(ws, wanted), failed)


@ray.remote(num_cpus=0.25)
def _write_part(fs, ranges: list[tuple[str, int, int]], results: pa.Table, model: str, path: str):
    """Pass 2: one output part from its pool rows (``ranges``: path, begin, end) and the
    answers of the unique keys; returns ``part_counts`` with the path, nothing per row."""
    table = assemble(part_keys(fs, ranges, PROMPT_VERSION, model), results, model)
    write_table_atomic(fs, path, table)
    return {"path": path, **part_counts(table)}


def write_parts(
    cfg: SkillsConfig,
    pool: Pool,
    questions: Questions,
    results: ray.ObjectRef,
    model: str,
    attempt: Attempt,
) -> list[dict]:
    """Pass 2 in tasks: part-00000.parquet, ... of ``cfg.shard_rows`` rows of the first
    ``questions.samples`` pool rows (slices of pass 1's shard sizes, not read again), in
    pool order. Returns the parts' ``part_counts`` in part order."""
    files = pool.shards
    samples = questions.samples
    parts = part_slices(questions.sizes, samples, cfg.shard_rows)
    names = [attempt.path(f"part-{i:05d}.parquet") for i in range(len(parts))]

    def submit(i: int):
        ranges = [(files[f], begin, end) for f, begin, end in parts[i]]
        return _write_part.remote(pool.ws.fs, ranges, results, model, names[i])

    # Results arrive as tasks finish; the failure examples are wanted in pool order.
    counts: dict[str, dict] = {}
    with tqdm(total=samples, unit="row", desc="skills rows", mininterval=1.0) as bar:
        for done in bounded_submit(submit, range(len(parts)), 2 * cluster_cpus()):
            counts[done["path"]] = done
            bar.update(done["rows"])
    return [counts[name] for name in names]
