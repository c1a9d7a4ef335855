"""Resumable shards: idempotent parts, checked completion, vectors on disk."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from engine.shards import ShardMismatch, finish_shard, finished_shards, part_files, write_part
from engine.vectors import from_arrow, l2_normalize, to_arrow


def rows(ids, seed=0):
    vectors = l2_normalize(np.random.default_rng(seed).normal(size=(len(ids), 4)))
    return pa.table({"id": pa.array(ids, pa.string()), "vector": to_arrow(vectors)}), vectors


def test_vectors_round_trip_and_normalise():
    x = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    column = to_arrow(x)
    assert column.type == pa.list_(pa.float32())
    np.testing.assert_array_equal(from_arrow(pa.chunked_array([column[:2], column[2:]])), x)
    np.testing.assert_allclose(np.linalg.norm(l2_normalize(x), axis=1), 1.0, atol=1e-6)
    assert not l2_normalize(np.zeros((1, 3))).any()
    with pytest.raises(ValueError, match="different lengths"):
        from_arrow(pa.array([[1.0, 2.0], [1.0]], pa.list_(pa.float32())))


def test_parts_join_in_input_order_and_retries_do_not_duplicate(tmp_path):
    fs, out = pafs.LocalFileSystem(), str(tmp_path)
    first, v1 = rows(["c", "a"], seed=1)
    second, v2 = rows(["b"], seed=2)
    write_part(fs, out, "part-000001", first)
    write_part(fs, out, "part-000001", first)  # a retried batch: same name, replaced
    write_part(fs, out, "part-000001", second)
    assert len(part_files(fs, out, "part-000001")) == 2
    assert finish_shard(fs, out, "part-000001", pa.array(["a", "b", "c"])) == 3
    table = pq.read_table(tmp_path / "part-000001.parquet")
    assert table.column("id").to_pylist() == ["a", "b", "c"]
    np.testing.assert_array_equal(
        from_arrow(table.column("vector")), np.stack([v1[1], v2[0], v1[0]])
    )
    assert part_files(fs, out, "part-000001") == []
    assert finished_shards(fs, out) == {"part-000001"}


@pytest.mark.parametrize(
    ("parts", "expected", "message"),
    [
        ([["a"]], ["a", "b"], "expected 2"),
        ([["a", "x"]], ["a", "b"], "missing"),
        ([["a", "b"], ["a"]], ["a", "b", "c"], "missing"),  # 'a' twice, 'c' never
    ],
)
def test_a_wrong_shard_is_never_finished(tmp_path, parts, expected, message):
    fs, out = pafs.LocalFileSystem(), str(tmp_path)
    for i, ids in enumerate(parts):
        write_part(fs, out, "s", rows(ids, seed=i)[0])
    with pytest.raises(ShardMismatch, match=message):
        finish_shard(fs, out, "s", pa.array(expected))
    assert finished_shards(fs, out) == set()
    assert part_files(fs, out, "s")  # kept for inspection
