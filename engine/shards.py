"""Resumable output shards: one output file per input shard, built from idempotent parts.

A stage that maps an input shard (one Parquet file of the pool) to an output shard
writes the rows as *parts* while they stream out of a pipeline, under
``<out>/_parts/<stem>.<digest>.parquet``; a part's name is a digest of its ids, so a
retried batch overwrites its own part instead of adding a second copy. When every
row of the shard is in, ``finish_shard`` checks the ids against the input, writes
``<out>/<stem>.parquet`` atomically (its existence is the completion marker) and
deletes the parts. A run that restarts keeps finished shards, drops ``_parts`` and
recomputes the rest, so no id is written twice and none is lost.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engine.workspace import write_table_atomic

PARTS_DIR = "_parts"


class ShardMismatch(RuntimeError):
    """An output shard's ids differ from its input shard's: nothing is finished."""


def stem(path: str) -> str:
    """``.../part-000003.parquet`` -> ``part-000003``."""
    return PurePosixPath(path).name.removesuffix(".parquet")


def write_part(fs: pafs.FileSystem, out_dir: str, shard: str, table: pa.Table) -> str:
    """Write the rows of one shard that arrived together; returns the part's path.

    ``table`` must have a string column ``id``. The name digests the ids, so writing
    the same rows again (a retried task) replaces the part rather than duplicating it.
    """
    digest = hashlib.sha1("\x00".join(table.column("id").to_pylist()).encode()).hexdigest()
    path = f"{out_dir}/{PARTS_DIR}/{shard}.{digest[:20]}.parquet"
    write_table_atomic(fs, path, table)
    return path


def part_files(fs: pafs.FileSystem, out_dir: str, shard: str) -> list[str]:
    parts_dir = f"{out_dir}/{PARTS_DIR}"
    if fs.get_file_info(parts_dir).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(parts_dir))
    prefix = f"{shard}."
    return sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and PurePosixPath(i.path).name.startswith(prefix)
        and i.path.endswith(".parquet")
    )


def finish_shard(
    fs: pafs.FileSystem, out_dir: str, shard: str, expected_ids: pa.Array | pa.ChunkedArray
) -> int:
    """Join ``shard``'s parts into ``<out_dir>/<shard>.parquet`` in the order of ``expected_ids``.

    Args:
        expected_ids: string (n,): the input shard's ids that must each appear once.
    Returns:
        n, the rows written.
    Raises:
        ShardMismatch: an id is missing, repeated or foreign (the parts stay for inspection).
    """
    files = part_files(fs, out_dir, shard)
    table = pa.concat_tables(pq.read_table(f, filesystem=fs) for f in files) if files else None
    expected = (
        expected_ids.combine_chunks() if isinstance(expected_ids, pa.ChunkedArray) else expected_ids
    )
    got = table.num_rows if table is not None else 0
    if got != len(expected):
        raise ShardMismatch(
            f"shard {shard}: {got} rows in {len(files)} parts, expected {len(expected)}"
        )
    if got == 0:
        return 0
    position = pc.index_in(expected, value_set=table.column("id"))
    if position.null_count:
        missing = pc.filter(expected, pc.is_null(position)).slice(0, 5).to_pylist()
        raise ShardMismatch(f"shard {shard}: ids missing from the output, e.g. {missing}")
    if len(pc.unique(position)) != got:
        raise ShardMismatch(f"shard {shard}: some ids were written twice")
    write_table_atomic(fs, f"{out_dir}/{shard}.parquet", table.take(position))
    for f in files:
        fs.delete_file(f)
    return got


def finished_shards(fs: pafs.FileSystem, out_dir: str) -> set[str]:
    """Stems of the shards whose final file exists under ``out_dir``."""
    if fs.get_file_info(out_dir).type != pafs.FileType.Directory:
        return set()
    infos = fs.get_file_info(pafs.FileSelector(out_dir))
    return {
        stem(i.path) for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
    }


def read_rows(
    fs: pafs.FileSystem,
    path: str,
    positions: np.ndarray,
    columns: list[str],
    footer: pq.FileMetaData | None = None,
) -> pa.Table:
    """The rows at ``positions`` (int64 (n,), sorted, local to the file) of one Parquet
    file, only ``columns``, reading only the row groups that hold them (``footer``: the
    file's metadata when the caller kept it, saving a read of it).

    Selecting a few rows of a pool shard this way never reads the image bytes of the
    row groups it does not touch (the pool is written in small row groups for it).
    """
    positions = np.asarray(positions, np.int64)
    pf = pq.ParquetFile(path, filesystem=fs, metadata=footer)
    sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    if positions.size and (positions[0] < 0 or positions[-1] >= starts[-1]):
        raise IndexError(f"rows {positions[0]}..{positions[-1]} outside {path}'s {starts[-1]}")
    groups = np.unique(np.searchsorted(starts, positions, side="right") - 1)
    if not groups.size:
        return pf.schema_arrow.empty_table().select(columns)
    table = pf.read_row_groups(groups.tolist(), columns=columns, use_threads=False)
    # Where each wanted row sits in the concatenation of the groups read.
    base = np.cumsum([0] + [sizes[g] for g in groups[:-1]])
    group_of = np.searchsorted(starts, positions, side="right") - 1
    local = positions - starts[group_of] + base[np.searchsorted(groups, group_of)]
    return table.take(pa.array(local))


def read_global_rows(
    fs: pafs.FileSystem,
    files: list[str],
    sizes: list[int],
    rows: np.ndarray,
    columns: list[str],
    threads: int = 1,
    footers: dict[str, pq.FileMetaData] | None = None,
) -> pa.Table:
    """The rows at global positions ``rows`` (int64 (n,), any order, distinct) of the
    Parquet ``files`` read as one table (``sizes``: rows per file), in the order given,
    only ``columns``, through ``read_rows`` (only the row groups that hold them).

    ``threads`` files are read at once (Arrow's decoding releases the GIL: a few hundred
    files' row groups per call, as PROGRESS's reveal asks, decode in parallel);
    ``footers``, a dict the caller keeps between calls, holds each file's metadata once
    read, so a file's footer is fetched once per process, not once per call."""
    rows = np.asarray(rows, np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= sum(sizes)):
        raise IndexError(f"rows outside the {sum(sizes)} rows of the files")
    order = np.argsort(rows, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    cuts = np.searchsorted(rows[order], starts)
    touched = [f for f in range(len(files)) if cuts[f + 1] > cuts[f]]
    if not touched:
        return pq.read_schema(files[0], filesystem=fs).empty_table().select(columns)

    def read(f: int) -> pa.Table:
        path, local = files[f], rows[order[cuts[f] : cuts[f + 1]]] - starts[f]
        if footers is None:
            return read_rows(fs, path, local, columns)
        if path not in footers:
            footers[path] = pq.read_metadata(path, filesystem=fs)
        return read_rows(fs, path, local, columns, footers[path])

    if threads > 1 and len(touched) > 1:
        with ThreadPoolExecutor(min(threads, len(touched))) as pool:
            parts = list(pool.map(read, touched))
    else:
        parts = [read(f) for f in touched]
    table = pa.concat_tables(parts)  # in sorted row order: undo the sort
    return table.take(pa.array(np.argsort(order, kind="stable")))


def with_pool_columns(
    fs: pafs.FileSystem,
    table: pa.Table,
    files: list[str],
    sizes: list[int],
    columns: list[str],
) -> pa.Table:
    """``table`` (with an int64 ``pool_row`` column: global rows of ``files``) with every
    one of ``columns`` it lacks read from the pool rows it names, appended in its order:
    PROGRESS's round files hold ids, rows and answers, and each reader takes the rest
    (image, conversation) of only its own rows."""
    wanted = [c for c in columns if c not in table.column_names]
    if not wanted:
        return table
    rows = table.column("pool_row").to_numpy()
    read = read_global_rows(fs, files, sizes, rows, wanted)
    for column in wanted:
        table = table.append_column(column, read.column(column))
    return table


def rows_of_ids(
    fs: pafs.FileSystem, files: list[str], ids: pa.Array
) -> tuple[list[int], np.ndarray]:
    """Rows per file, and the global row (int64 (n,)) of each of ``ids`` (string (n,)) in
    the Parquet ``files`` read as one table: one hash lookup against the whole id column
    (for many ids: PROGRESS's coordinator maps its clustered pool once per start).

    Raises:
        ValueError: an id the files do not hold.
    """
    columns = [pq.read_table(f, columns=["id"], filesystem=fs).column("id").combine_chunks()
               for f in files]  # fmt: skip
    every = pa.concat_arrays(columns) if columns else pa.array([], pa.string())
    at = pc.index_in(ids, value_set=every)
    if at.null_count:
        missing = pc.filter(ids, pc.is_null(at)).slice(0, 3).to_pylist()
        raise ValueError(f"{at.null_count} ids are not in the pool (e.g. {missing})")
    return [len(c) for c in columns], at.to_numpy(zero_copy_only=False).astype(np.int64)


def find_rows(fs: pafs.FileSystem, files: list[str], ids: list[str]) -> np.ndarray:
    """The global row (int64 (n,)) of each of a few ``ids`` in the Parquet ``files`` read
    as one table, one file's id column at a time (a driver never holds the whole column).

    Raises:
        ValueError: an id the files do not hold.
    """
    wanted = pa.array(list(ids), pa.string())
    rows = np.full(len(wanted), -1, np.int64)
    offset = 0
    for f in files:
        shard = pq.read_table(f, columns=["id"], filesystem=fs).column("id").combine_chunks()
        at = pc.fill_null(pc.index_in(wanted, value_set=shard), -1).to_numpy()
        rows[at >= 0] = at[at >= 0] + offset
        offset += len(shard)
    if (rows < 0).any():
        missing = [ids[i] for i in np.flatnonzero(rows < 0)[:3]]
        raise ValueError(f"{int((rows < 0).sum())} ids are not in the pool (e.g. {missing})")
    return rows
