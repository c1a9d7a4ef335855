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


def _numbered_files(tmp_path, sizes: list[int], group: int) -> list[str]:
    files, start = [], 0
    for i, n in enumerate(sizes):
        path = str(tmp_path / f"part-{i:06d}.parquet")
        rows = np.arange(start, start + n)
        table = pa.table({"id": [f"r{r}" for r in rows], "pool_row": rows, "answer": rows * 3})
        pq.write_table(table, path, row_group_size=group)
        files.append(path)
        start += n
    return files


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_global_rows_read_in_threads_with_kept_footers_equal_a_plain_read(tmp_path, threads):
    from engine.shards import read_global_rows

    sizes = [5, 0, 17, 1, 40]
    files = _numbered_files(tmp_path, sizes, group=4)
    fs, footers = pafs.LocalFileSystem(), {}
    rng = np.random.default_rng(0)
    for _ in range(3):  # footers kept from the first call serve the later ones
        rows = rng.choice(sum(sizes), size=20, replace=False)
        got = read_global_rows(fs, files, sizes, rows, ["id", "answer"], threads, footers)
        assert got.column("id").to_pylist() == [f"r{r}" for r in rows]
        assert got.column("answer").to_pylist() == (rows * 3).tolist()
    assert set(footers) <= set(files) and footers
    with pytest.raises(IndexError):
        read_global_rows(fs, files, sizes, np.array([sum(sizes)]), ["id"], threads, footers)


def test_pool_columns_are_joined_by_pool_row_in_the_tables_order(tmp_path):
    from engine.shards import with_pool_columns

    sizes = [6, 9]
    files = _numbered_files(tmp_path, sizes, group=2)
    rows = np.array([11, 0, 7, 3], np.int64)
    table = pa.table({"pool_row": rows, "cluster": [1, 2, 3, 4]})
    got = with_pool_columns(pafs.LocalFileSystem(), table, files, sizes, ["id", "cluster"])
    assert got.column_names == ["pool_row", "cluster", "id"]  # what it had is kept
    assert got.column("id").to_pylist() == [f"r{r}" for r in rows]
