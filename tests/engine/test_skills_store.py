"""The skills stage's pure halves: pass 1's dedup, pass 2's part slices and the join."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.skills import CACHE_SCHEMA, PROMPT_VERSION, RESULT_SCHEMA, SKILLS_SCHEMA, result_row
from engine.skills_store import (
    UniqueQuestions,
    assemble,
    first_rows,
    part_counts,
    part_slices,
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


def keyed(keys: list[str]) -> pa.Table:
    return pa.table({"key": keys, "question": [f"q-{k}" for k in keys]})


def test_unique_questions_keep_first_rows_in_order_with_their_counts():
    got = unique_questions(keyed(["b", "a", "b", "c", "a", "b"]))
    assert got.column("key").to_pylist() == ["b", "a", "c"]
    assert got.column("question").to_pylist() == ["q-b", "q-a", "q-c"]
    assert got.column("rows").to_pylist() == [3, 2, 1]
    assert got.schema.field("rows").type == pa.int64()


@pytest.mark.parametrize("compact_rows", [1, 7, 10_000])
def test_unique_questions_accumulated_equal_one_dedup_of_every_row(compact_rows, monkeypatch):
    monkeypatch.setattr(UniqueQuestions, "MIN_COMPACT_ROWS", compact_rows)
    rng = np.random.default_rng(0)
    keys = [f"k{v}" for v in rng.zipf(1.5, 3000) % 500]
    acc = UniqueQuestions()
    for start in range(0, len(keys), 97):
        acc.add(unique_questions(keyed(keys[start : start + 97])))
    whole = keyed(keys)
    expected = whole.take(first_rows(whole.column("key")))
    assert acc.samples == len(keys)
    assert acc.table().equals(expected)
    assert acc.table().equals(expected)  # table() twice: the same rows


def test_no_batches_give_no_questions():
    acc = UniqueQuestions()
    assert acc.samples == 0 and acc.table().num_rows == 0
    assert acc.table().schema.names == ["key", "question"]


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
