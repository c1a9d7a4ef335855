"""The skills stage's pure halves: pass 1's dedup by slice and key, pass 2's part slices and the join."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.skills import CACHE_SCHEMA, PROMPT_VERSION, RESULT_SCHEMA, SKILLS_SCHEMA, result_row
from engine.skills_store import (
    ASKED_SCHEMA,
    asked_questions,
    assemble,
    cached_keys,
    keyed_questions,
    part_counts,
    part_slices,
    question_block_rows,
    results_table,
    unique_questions,
)
from tests.engine.skills_reference import assemble as old_assemble


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=0, max_size=8),
    part_rows=st.integers(1, 60),
    cut=st.floats(0, 1),
)
def test_part_slices_are_the_slices_of_the_files_read_as_one_table(sizes, part_rows, cut):
    total = int(sum(sizes) * cut)
    rows = [(f, r) for f, n in enumerate(sizes) for r in range(n)][:total]
    parts = part_slices(sizes, total, part_rows)
    assert len(parts) == max(1, -(-total // part_rows))
    for i, ranges in enumerate(parts):
        got = [(f, r) for f, begin, end in ranges for r in range(begin, end)]
        assert got == rows[i * part_rows : (i + 1) * part_rows]
        assert all(end > begin for _, begin, end in ranges)  # no empty reads
    with pytest.raises(ValueError):
        part_slices(sizes, sum(sizes) + 1, part_rows)


@given(
    questions=st.integers(0, 2_000_000), batch_size=st.integers(1, 512), cpus=st.integers(1, 512)
)
def test_question_blocks_hold_whole_batches_enough_blocks_for_every_cpu_and_few_at_scale(
    questions, batch_size, cpus
):
    rows = question_block_rows(questions, batch_size, cpus)
    assert rows % batch_size == 0 and rows >= batch_size
    blocks = -(-questions // rows)
    cap = max(256 // batch_size, 1) * batch_size
    if batch_size < rows < cap:  # grown past one batch, below the cap: over 2 per CPU
        assert blocks > 2 * cpus
    if rows == batch_size:  # a block per batch: there were few batches to share
        assert blocks <= 4 * cpus or rows == cap
    assert rows <= cap  # a million questions are not a million blocks


def test_question_blocks_of_the_reference_runs():
    assert question_block_rows(193, 32, 2) == 32  # a small run: a block per batch
    assert question_block_rows(1_000, 32, 2) == 4 * 32  # 8 blocks: 4 per CPU
    # LLaVA-665K in batches of 32: 2,598 blocks, not 20,782
    assert question_block_rows(665_000, 32, 16) == 256
    assert question_block_rows(665_000, 512, 16) == 512  # never less than a batch


def keyed(keys: list[str]) -> pa.Table:
    return pa.table({"key": keys, "question": [f"q-{k}" for k in keys]})


def test_unique_questions_keep_first_rows_in_order_with_their_counts():
    got = unique_questions(keyed(["b", "a", "b", "c", "a", "b"]))
    assert got.column("key").to_pylist() == ["b", "a", "c"]
    assert got.column("question").to_pylist() == ["q-b", "q-a", "q-c"]
    assert got.column("first").to_pylist() == [0, 1, 3]
    assert got.column("rows").to_pylist() == [3, 2, 1]
    assert got.schema.field("rows").type == pa.int64()


def conversation(question: str) -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "a"}]


def pool_files(tmp_path, questions: list[str], sizes: list[int]) -> list[str]:
    """Parquet shards of ``sizes`` rows holding LLaVA rows that ask ``questions``."""
    paths, at = [], 0
    for i, n in enumerate(sizes):
        rows = [
            {
                "id": f"id-{at + r}",
                "conversations": conversation(questions[at + r]),
            }
            for r in range(n)
        ]
        path = str(tmp_path / f"shard-{i}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), path)
        paths.append(path)
        at += n
    return paths


def merge_by_key(tables: list[pa.Table]) -> pa.Table:
    """What the job's hash aggregation does to pass 1's rows, in one process."""
    merged = (
        pa.concat_tables(tables)
        .group_by("key", use_threads=False)
        .aggregate([("first", "min"), ("question", "min"), ("rows", "sum"), ("cached", "max")])
    )
    merged = merged.filter(pc.greater(merged.column("rows_sum"), 0))
    return merged.take(pc.sort_indices(merged, [("first_min", "ascending")]))


def test_slices_asked_and_merged_by_key_equal_one_dedup_of_the_pool(tmp_path):
    rng = np.random.default_rng(0)
    questions = [f"what is {v}?" for v in rng.zipf(1.5, 300) % 60]
    sizes = [70, 0, 130, 100]
    files = pool_files(tmp_path, questions, sizes)
    fs = pafs.LocalFileSystem()
    slices = part_slices(sizes, 260, 64)  # the first 260 rows, in slices across shards
    asked = [
        asked_questions(fs, [(files[f], b, e) for f, b, e in ranges], i * 64, "v1", "m")
        for i, ranges in enumerate(slices)
    ]
    assert all(t.schema == ASKED_SCHEMA for t in asked)
    whole = unique_questions(keyed_questions(pa.table({
        "id": [f"id-{i}" for i in range(260)],
        "conversations": [conversation(q) for q in questions[:260]],
    }), "v1", "m"))  # fmt: skip
    cache = cached_keys(pa.table({"key": [whole.column("key")[2].as_py(), "elsewhere"]}))
    merged = merge_by_key([*asked, cache])
    assert merged.column("key").to_pylist() == whole.column("key").to_pylist()
    assert merged.column("question_min").to_pylist() == whole.column("question").to_pylist()
    assert merged.column("first_min").to_pylist() == whole.column("first").to_pylist()
    assert merged.column("rows_sum").to_pylist() == whole.column("rows").to_pylist()
    assert pc.sum(merged.column("rows_sum")).as_py() == 260
    assert merged.column("cached_max").to_pylist() == [int(i == 2) for i in range(len(whole))]


def answers(n_keys: int) -> tuple[pa.Table, pa.Table]:
    """Cached successes for even keys, recorded failures for odd ones (every third odd
    one failed without an answer)."""
    ok, bad = [], []
    for k in range(n_keys):
        if k % 2 == 0:
            ok.append(result_row(f"k{k}", f"skill {k}, object recognition"))
        elif k % 3:
            bad.append(result_row(f"k{k}", "I'm sorry"))  # unparseable: the answer is kept
        else:
            bad.append(result_row(f"k{k}", None, error="HTTP 500"))
    cached = pa.Table.from_pylist(ok, RESULT_SCHEMA).select(["key", "skills", "skill_text", "raw"])
    cached = cached.append_column("prompt_version", pa.repeat(pa.scalar(PROMPT_VERSION), len(ok)))
    cached = cached.append_column("model", pa.repeat(pa.scalar("m"), len(ok))).cast(CACHE_SCHEMA)
    return cached, pa.Table.from_pylist(bad, RESULT_SCHEMA)


def test_parts_joined_one_by_one_equal_the_whole_pool_joined_at_once():
    rng = np.random.default_rng(1)
    keys = [f"k{k}" for k in rng.integers(0, 40, 1000)]
    ids = pa.table({"id": [f"id-{i}" for i in range(1000)], "key": keys})
    cached, failures = answers(40)
    expected = old_assemble(ids, cached, failures, "m")
    results = results_table(cached, failures)
    parts = [assemble(ids.slice(s, 128), results, "m") for s in range(0, 1000, 128)]
    assert pa.concat_tables(parts).equals(expected)
    assert pa.concat_tables(parts).schema == SKILLS_SCHEMA
    counts = [part_counts(p) for p in parts]
    assert sum(c["rows"] for c in counts) == 1000
    failed = expected.filter(pc.equal(expected.column("status"), "failed"))
    assert sum(c["failed"] for c in counts) == failed.num_rows
    assert sum(c["ok"] for c in counts) == 1000 - failed.num_rows
    examples = [e for c in counts for e in c["examples"]][:5]
    assert examples == failed.select(["id", "reason"]).slice(0, 5).to_pylist()


def test_a_key_without_an_answer_is_an_error():
    cached, failures = answers(4)
    ids = pa.table({"id": ["a", "b"], "key": ["k0", "k9"]})
    with pytest.raises(RuntimeError, match="1 pool ids got no skills row"):
        assemble(ids, results_table(cached, failures), "m")
