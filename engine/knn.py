"""Sharded nearest-neighbour search: the maths, without Ray or faiss.

- ``merge_topk``: per-shard top-k lists -> the exact global top-k (ties: shard order, then rank).
- ``labels_to_ids`` / ``labels_to_rows``: a shard's faiss labels (its own row positions) ->
  the pool's string ids, or the pool's global row positions (int64: what travels).
- ``pool_positions``: a shard's ids -> their global row positions in the pool (the
  common coordinate of every space: the concept and skill indexes hold different rows).
- ``shard_ranges`` / ``file_slices``: N rows -> contiguous balanced shards -> the embedding
  files and row slices each shard reads.

The faiss side (building, loading and opening one shard's index) is ``engine.faiss_index``.

Scores are float32 inner products; a missing result (faiss label -1, score -FLT_MAX:
a shard with fewer than k rows, or an IVF probe that found too few) becomes id None
(row -1) and score -inf and sorts after every real result.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MISSING_LABEL = -1


# -- merging per-shard results --------------------------------------------------------------


def _missing(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """bool (q, k): entries that hold no result (id None or label -1, or a -inf/NaN score)."""
    empty = np.equal(ids, None) if ids.dtype == object else ids == MISSING_LABEL
    return empty | np.isnan(scores) | np.isneginf(scores)


def merge_topk(
    scores: Sequence[np.ndarray], ids: Sequence[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The exact global top-k of per-shard top-k lists.

    Args:
        scores: one float32 (q, k_i) array per shard, each row sorted best first (faiss order).
        ids: matching (q, k_i) arrays, object (string ids, None = missing) or integer
            (labels, -1 = missing); all of one kind.
        k: results per query (k >= 1).
    Returns:
        ``(scores (q, k) float32, ids (q, k))``: best first; ties keep shard order, then
        the shard's own rank, so with contiguous shards in row order the result equals one
        index over all rows. Missing results (fewer than k rows in all) are score -inf
        and id None (object) or -1 (integer), last.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(scores) != len(ids) or not scores:
        raise ValueError(f"need one ids array per scores array, got {len(scores)} and {len(ids)}")
    q = scores[0].shape[0]
    as_object = any(i.dtype == object for i in ids)
    all_scores = np.concatenate([np.asarray(s, dtype=np.float32).reshape(q, -1) for s in scores], 1)
    all_ids = np.concatenate(
        [np.asarray(i, dtype=object if as_object else np.int64).reshape(q, -1) for i in ids], 1
    )
    all_scores = np.where(_missing(all_scores, all_ids), np.float32(-np.inf), all_scores)
    if as_object:
        all_ids = np.where(np.isneginf(all_scores), None, all_ids)
    else:
        all_ids = np.where(np.isneginf(all_scores), MISSING_LABEL, all_ids)
    width = all_scores.shape[1]
    if width < k:
        pad = k - width
        all_scores = np.concatenate([all_scores, np.full((q, pad), -np.inf, np.float32)], 1)
        fill = np.full((q, pad), None if as_object else MISSING_LABEL, dtype=all_ids.dtype)
        all_ids = np.concatenate([all_ids, fill], 1)
    # Negating a float32 is exact, and a stable sort keeps shard-then-rank order for ties.
    order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
    return (
        np.take_along_axis(all_scores, order, 1).astype(np.float32, copy=False),
        np.take_along_axis(all_ids, order, 1),
    )


def labels_to_ids(labels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """A shard's faiss labels int64 (q, k) (row positions, -1 = none) -> object (q, k) ids.

    ``table`` is ``id_table(ids)``: object (n + 1,), the shard's string ids in the order
    the vectors were added, then None (what label -1 becomes). Built once per shard.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(table) - 1
    if labels.size and labels.max(initial=-1) >= n:
        raise ValueError(f"label {labels.max()} out of range for a shard of {n} ids")
    return table[np.where(labels < 0, n, labels)]


def id_table(ids: Sequence[str | None]) -> np.ndarray:
    """object (n + 1,): ``ids`` then None, the lookup ``labels_to_ids`` takes."""
    table = np.empty(len(ids) + 1, dtype=object)
    table[:-1] = ids
    table[-1] = None
    return table


def labels_to_rows(labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A shard's faiss labels int64 (q, k) (-1 = none) -> int64 (q, k) pool row positions.

    ``rows`` is int64 (n + 1,): the pool row of each of the shard's vectors, then -1
    (``row_table``). One gather, no Python objects.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(rows) - 1
    if labels.size and labels.max(initial=-1) >= n:
        raise ValueError(f"label {labels.max()} out of range for a shard of {n} rows")
    return rows[np.where(labels < 0, n, labels)]


def row_table(rows: np.ndarray) -> np.ndarray:
    """int64 (n + 1,): a shard's pool rows then -1, the lookup ``labels_to_rows`` takes."""
    return np.append(np.asarray(rows, np.int64), np.int64(MISSING_LABEL))


def pool_positions(ids: pa.Array, pool_ids: pa.Array, offset: int = 0) -> np.ndarray:
    """int64 (n,): the global pool row of each of ``ids`` (string (n,)), found in
    ``pool_ids`` (string (m,): the pool's ids from global row ``offset`` on).

    Raises:
        ValueError: an id that shard does not hold (the embeddings are of another pool).
    """
    local = pc.index_in(ids, value_set=pool_ids)
    if local.null_count:
        missing = pc.filter(ids, pc.is_null(local)).slice(0, 3).to_pylist()
        raise ValueError(
            f"{local.null_count} ids are not in the pool (e.g. {missing}): the space was "
            f"embedded from another pool; embed it again"
        )
    return local.to_numpy(zero_copy_only=False).astype(np.int64) + np.int64(offset)


# -- splitting rows into shards ------------------------------------------------------------


def shard_ranges(rows: int, shards: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of ``shards`` contiguous ranges covering ``rows``; sizes differ by <= 1.

    The first ``rows % shards`` ranges hold one row more.
    """
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    base, extra = divmod(rows, shards)
    out, start = [], 0
    for s in range(shards):
        stop = start + base + (1 if s < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def file_slices(rows_per_file: Sequence[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """The files and rows that hold global rows ``[start, stop)``.

    Files are concatenated in order; returns ``(file_index, lo, hi)`` with rows ``[lo, hi)``
    of that file, in order, skipping files that contribute nothing.
    """
    out, offset = [], 0
    for f, n in enumerate(rows_per_file):
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            out.append((f, lo - offset, hi - offset))
        offset += n
    if stop > offset:
        raise ValueError(f"rows [{start}, {stop}) reach past the {offset} rows of the files")
    return out
