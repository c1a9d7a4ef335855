"""Ingest's per-split logic: duplicate ids found across the whole source, and the
normalisation of a chunk of records into pool rows and rejects.

Duplicates ("the first occurrence wins") are found without one process seeing every id:
each split's task hashes its ids into ``buckets`` tables (:func:`id_buckets`), one task
per bucket finds the repeated ids among them (:func:`find_duplicates`), and only the
duplicates' record indices come back, so the driver holds O(duplicates), not O(pool).
The readers are ``engine.sources``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from engine.pool import (
    POOL_SCHEMA,
    REJECT_SCHEMA,
    ImagePolicy,
    make_reject,
    normalize_record,
    record_id,
)
from engine.sources import RawItem

# ids as UTF-8 bytes, lone surrogates passed through: such a record is rejected later, but
# its id still counts for "first occurrence wins"
ID_SCHEMA = pa.schema([("id", pa.binary()), ("index", pa.int64())])


def id_buckets(items: Iterable[RawItem], buckets: int) -> tuple[int, list[pa.Table]]:
    """(records read, ``buckets`` tables of (id bytes, index int64)): the ids of the
    parseable records that have one, each in the bucket its hash picks."""
    ids, indices, n = [], [], 0
    for item in items:
        n += 1
        key = None if item.error is not None else record_id(item.record)
        if key is not None:
            ids.append(key.encode("utf-8", "surrogatepass"))
            indices.append(item.index)
    table = pa.table([pa.array(ids, pa.binary()), pa.array(indices, pa.int64())], schema=ID_SCHEMA)
    if buckets == 1:
        return n, [table]
    which = pd.util.hash_array(np.asarray(ids, dtype=object)) % np.uint64(buckets)
    return n, [table.filter(pa.array(which == b)) for b in range(buckets)]


def find_duplicates(tables: Iterable[pa.Table], offsets: Iterable[int] = ()) -> np.ndarray:
    """The repeated ids among one bucket's tables: int64 (d, 2) of (record index, index of
    the first record with that id), sorted by record index. ``offsets``, one per table,
    are added to its indices (a JSONL split learns its first index only after every
    split before it is counted)."""
    tables, offsets = list(tables), list(offsets) or None
    if offsets:
        tables = [t.set_column(1, "index", pc.add(t["index"], o))
                  for t, o in zip(tables, offsets, strict=True)]  # fmt: skip
    every = (
        pa.concat_tables([t.cast(ID_SCHEMA) for t in tables]) if tables else ID_SCHEMA.empty_table()
    )
    firsts = every.group_by("id").aggregate([("index", "min"), ("index", "count")])
    repeated = firsts.filter(pc.greater(firsts["index_count"], 1)).select(["id", "index_min"])
    if not repeated.num_rows:
        return np.empty((0, 2), np.int64)
    joined = every.join(repeated, "id")
    dups = joined.filter(pc.not_equal(joined["index"], joined["index_min"]))
    pairs = np.stack([dups["index"].to_numpy(), dups["index_min"].to_numpy()], axis=1)
    return pairs[np.argsort(pairs[:, 0], kind="stable")]


def mark_duplicates(items: list[RawItem], duplicates: np.ndarray | None = None) -> list[RawItem]:
    """Set ``duplicate_of`` on ``items`` from (record index, first index) pairs; with none
    given, from the items' own ids (one process, first occurrence wins). Returns items."""
    if duplicates is None:
        duplicates = find_duplicates(id_buckets(items, 1)[1])
    first_of = dict(zip(duplicates[:, 0].tolist(), duplicates[:, 1].tolist(), strict=True))
    for item in items:
        item.duplicate_of = first_of.get(item.index)
    return items


def chunked(items: Iterator[RawItem], size: int) -> Iterator[list[RawItem]]:
    """Lists of ``size`` items (the last one shorter)."""
    while chunk := list(islice(items, size)):
        yield chunk


def normalize_chunk(
    items: list[RawItem], source: str, policy: ImagePolicy
) -> tuple[pa.Table, pa.Table]:
    """Normalise a chunk of raw records into (pool rows, rejects); every item lands in one of them."""
    accepted: list[dict] = []
    rejected: list[dict] = []
    for item in items:
        if item.error is not None:
            rejected.append(
                make_reject(item.record, item.index, source, "malformed_json", item.error)
            )
            continue
        if item.duplicate_of is not None:
            rejected.append(
                make_reject(
                    item.record,
                    item.index,
                    source,
                    "duplicate_id",
                    f"duplicate id {record_id(item.record)!r}: first seen at record {item.duplicate_of}",
                )
            )
            continue
        row, reject = normalize_record(item.record, item.index, source, policy)
        if row is not None:
            accepted.append(row)
        else:
            rejected.append(reject)
    return (
        pa.Table.from_pylist(accepted, schema=POOL_SCHEMA),
        pa.Table.from_pylist(rejected, schema=REJECT_SCHEMA),
    )
