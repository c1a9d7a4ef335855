"""Sharded nearest-neighbour search: the maths and the on-disk contract, without Ray.

- ``merge_topk``: per-shard top-k lists -> the exact global top-k (ties: shard order, then rank).
- ``labels_to_ids``: a shard's faiss labels (row positions) -> the pool's string ids.
- ``shard_ranges`` / ``file_slices``: N rows -> contiguous balanced shards -> the embedding
  files and row slices each shard reads.
- ``make_index`` / ``build_index`` / ``set_search_params`` / ``to_gpu``: one faiss index
  from a factory string, inner product (vectors are L2-normalised, so IP is cosine).
- ``open_index``: what ``vlselect index`` wrote in ``<ws>/index/<space>/``, checked.

Scores are float32 inner products; a missing result (faiss label -1, score -FLT_MAX:
a shard with fewer than k rows, or an IVF probe that found too few) becomes id None
and score -inf and sorts after every real result.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from engine.artifacts import Index, IndexMeta
from engine.embeddings import SPACES
from engine.errors import InputError
from engine.workspace import Workspace

log = logging.getLogger("vlselect.knn")

MISSING_LABEL = -1
FACTORY_EXAMPLES = "'Flat', 'IVF1024,Flat', 'HNSW32', 'IVF4096,PQ32'"
FACTORY_DOCS = "https://github.com/facebookresearch/faiss/wiki/The-index-factory"


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


def labels_to_ids(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """A shard's faiss labels int64 (q, k) (row positions, -1 = none) -> object (q, k) ids.

    ``ids`` is the shard's object (n,) array of string pool ids, in the order the vectors
    were added. A label of -1 becomes None.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and labels.max(initial=-1) >= len(ids):
        raise ValueError(f"label {labels.max()} out of range for a shard of {len(ids)} ids")
    table = np.empty(len(ids) + 1, dtype=object)
    table[:-1] = ids
    table[-1] = None
    return table[np.where(labels < 0, len(ids), labels)]


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


# -- building one index ------------------------------------------------------------------


def _faiss_message(err: Exception) -> str:
    """faiss's own words, without the C++ signature and source location."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
    match = re.search(r"at \S+:\d+: (.*)$", text)
    return match.group(1) if match else text


def make_index(factory: str, dim: int) -> faiss.Index:
    """An empty, inner-product faiss index for ``dim``-d float32 vectors from ``factory``.

    Raises:
        InputError: the string does not parse, or asks for something the service cannot
            use (an IDMap: labels are row positions; an IVF with no lists).
    """
    if not factory or not factory.strip():
        raise InputError(f"empty faiss factory string; use one of {FACTORY_EXAMPLES}")
    if "IDMap" in factory:
        raise InputError(
            f"factory {factory!r}: leave IDMap out; the shards map row positions to pool ids "
            f"themselves (use e.g. {FACTORY_EXAMPLES})"
        )
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise InputError(
            f"faiss factory string {factory!r} does not parse for {dim}-d vectors "
            f"({_faiss_message(err)}); use e.g. {FACTORY_EXAMPLES} ({FACTORY_DOCS})"
        ) from None
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and ivf.nlist < 1:
        raise InputError(f"factory {factory!r}: an IVF needs at least 1 list, e.g. 'IVF1024,Flat'")
    return index


def min_train_rows(index: faiss.Index) -> int:
    """Training rows ``index`` needs at the least (0 when it needs no training).

    An IVF needs one row per list; a product quantizer 2**nbits per sub-quantizer.
    Other trainable parts (scalar quantizers, PCA) need few; faiss refuses the rest.
    """
    if index.is_trained:
        return 0
    need = 1
    ivf = faiss.try_extract_index_ivf(index)
    parts = [faiss.downcast_index(index)] + ([ivf] if ivf is not None else [])
    if ivf is not None:
        need = max(need, ivf.nlist)
    for part in parts:
        pq = getattr(part, "pq", None)
        if pq is not None:
            need = max(need, int(pq.ksub))
    return need


def suggest_nlist(rows: int) -> int:
    """A list count that ``rows`` can train well (faiss asks for ~39 rows per list)."""
    return max(1, 2 ** int(math.log2(max(1, rows // 39))))


def check_trainable(factory: str, dim: int, rows: int, shards: int) -> faiss.Index:
    """Parse ``factory`` and check that the smallest shard of ``rows`` can train it.

    Returns the empty index (for its ``is_trained``). Raises InputError naming the
    factory, the rows per shard and the fix.
    """
    index = make_index(factory, dim)
    need = min_train_rows(index)
    smallest = rows // shards
    if need > smallest:
        raise InputError(too_few_rows_message(factory, smallest, need, rows, shards))
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and smallest < 39 * ivf.nlist:
        log.warning(
            "%s: %d training rows per shard for %d lists; faiss trains best with >= %d",
            factory,
            smallest,
            ivf.nlist,
            39 * ivf.nlist,
        )
    return index


def too_few_rows_message(factory: str, have: int, need: int, rows: int, shards: int) -> str:
    fixes = [f"use fewer shards (at most {rows // need})" if rows >= need else None]
    if "IVF" in factory:
        fixes.append(f"fewer IVF lists (e.g. 'IVF{suggest_nlist(have)},...')")
    fixes.append("or 'Flat' / 'HNSW32', which need no training")
    return (
        f"factory {factory!r} needs at least {need} training rows per shard, but a shard of "
        f"{rows} rows split {shards} ways holds {have}; " + ", ".join(f for f in fixes if f)
    )


def build_index(vectors: np.ndarray, factory: str, *, gpu: bool = False) -> faiss.Index:
    """A CPU faiss index over ``vectors`` float32 (n, d), trained where needed; label i = row i.

    With ``gpu`` (and faiss sees one) training and adding run on GPU 0; the index returned
    is on the CPU either way, ready for ``faiss.serialize_index``.

    Raises:
        InputError: a bad factory string, or fewer rows than training needs (named, with
            the fix).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    index = make_index(factory, dim)
    need = min_train_rows(index)
    if need > n:
        raise InputError(too_few_rows_message(factory, n, need, n, 1))
    work, resources = to_gpu(index, gpu)
    if not work.is_trained:
        try:
            work.train(vectors)
        except RuntimeError as err:
            raise InputError(
                f"factory {factory!r} could not train on {n} rows ({_faiss_message(err)}); "
                f"give each shard more rows (fewer shards) or use a factory that needs fewer"
            ) from None
    work.add(vectors)
    if resources is not None:
        work = faiss.index_gpu_to_cpu(work)
    return work


# -- where an index runs, and how it searches ----------------------------------------------


def is_hnsw(index: faiss.Index) -> bool:
    return isinstance(faiss.downcast_index(index), faiss.IndexHNSW)


def to_gpu(index: faiss.Index, gpu: bool) -> tuple[faiss.Index, object | None]:
    """``(index on GPU 0, its StandardGpuResources)`` when ``gpu``, else ``(index, None)``.

    HNSW has no GPU version in faiss: it stays on the CPU with a warning.

    Raises:
        InputError: ``gpu`` is asked for but faiss sees no GPU here (faiss-cpu, or a
            worker given no GPU).
    """
    if not gpu:
        return index, None
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpus == 0 or not hasattr(faiss, "StandardGpuResources"):
        raise InputError(
            "gpu: true but faiss sees no GPU on this worker: install faiss-gpu (the 'gpu' "
            "extra) on GPU nodes and give the shard num_gpus >= 1, or set gpu: false"
        )
    if is_hnsw(index):
        log.warning("HNSW indexes have no faiss GPU version; this one stays on the CPU")
        return index, None
    resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(resources, 0, index), resources


def set_search_params(
    index: faiss.Index, nprobe: int | None = None, ef_search: int | None = None
) -> dict[str, int]:
    """Set ``nprobe`` (IVF lists probed) and ``efSearch`` (HNSW beam) where the index has them.

    Returns the parameters that applied; the others are ignored (a Flat index has neither).
    """
    applied: dict[str, int] = {}
    ivf = faiss.try_extract_index_ivf(index)
    if nprobe is not None and ivf is not None:
        ivf.nprobe = int(nprobe)
        applied["nprobe"] = int(nprobe)
    if ef_search is not None:
        inner = faiss.downcast_index(index)
        if isinstance(inner, faiss.IndexPreTransform):
            inner = faiss.downcast_index(inner.index)
        if isinstance(inner, faiss.IndexHNSW):
            inner.hnsw.efSearch = int(ef_search)
            applied["efSearch"] = int(ef_search)
    return applied


# -- the index on disk ---------------------------------------------------------------------


def shard_name(shard: int) -> str:
    return f"shard-{shard:04d}"


@dataclass(frozen=True)
class IndexInfo:
    """A committed ``<ws>/index/<space>/``: its shards' files, shape and meta."""

    space: str
    dir: str
    dim: int
    rows: int
    shards: int
    factory: str
    meta: IndexMeta
    fingerprint: str
    built_from: str | None  # the fingerprint of the embeddings it was built from

    def index_file(self, shard: int) -> str:
        return f"{self.dir}/{shard_name(shard)}.faiss"

    def ids_file(self, shard: int) -> str:
        return f"{self.dir}/{shard_name(shard)}.ids.parquet"


def open_index(ws: Workspace, space: str) -> IndexInfo:
    """Check that ``vlselect index`` committed ``space``; return its layout.

    Raises:
        InputError: an unknown space, no index for it, or one whose build did not finish
            (each names the command that fixes it).
    """
    if space not in SPACES:
        raise InputError(f"unknown space {space!r}; the spaces are {', '.join(SPACES)}")
    found = Index.open(ws, space)
    meta = found.meta
    return IndexInfo(
        space,
        found.dir,
        meta.dim,
        meta.rows,
        meta.shards,
        meta.factory,
        meta,
        found.fingerprint,
        found.manifest.inputs.get("embeddings"),
    )
