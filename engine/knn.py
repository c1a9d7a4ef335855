"""Sharded nearest-neighbour search: the maths and the on-disk contract, without Ray.

- ``merge_topk``: per-shard top-k lists -> the exact global top-k (ties: shard order, then rank).
- ``labels_to_ids`` / ``labels_to_rows``: a shard's faiss labels (its own row positions) ->
  the pool's string ids, or the pool's global row positions (int64: what travels).
- ``pool_positions``: a shard's ids -> their global row positions in the pool (the
  common coordinate of every space: the concept and skill indexes hold different rows).
- ``shard_ranges`` / ``file_slices``: N rows -> contiguous balanced shards -> the embedding
  files and row slices each shard reads.
- ``make_index`` / ``train_index`` / ``build_index`` / ``set_search_params`` / ``to_gpu``:
  one faiss index from a factory string, inner product (vectors are L2-normalised, so IP
  is cosine); a trained empty index is the template every shard of a sharded IVF or PQ
  index copies, so the shards share one coarse quantizer and one codebook.
- ``load_index``: one shard's file, read or memory-mapped.
- ``open_index``: what ``vlselect index`` wrote in ``<ws>/index/<space>/``, checked.

Scores are float32 inner products; a missing result (faiss label -1, score -FLT_MAX:
a shard with fewer than k rows, or an IVF probe that found too few) becomes id None
(row -1) and score -inf and sorts after every real result.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

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


def check_trainable(factory: str, dim: int, rows: int) -> faiss.Index:
    """Parse ``factory`` and check that ``rows`` can train it (the shards share one
    trained template, so the whole space trains it, not each shard).

    Returns the empty index (for its ``is_trained``). Raises InputError naming the
    factory, the rows and the fix.
    """
    index = make_index(factory, dim)
    need = min_train_rows(index)
    if need > rows:
        raise InputError(too_few_rows_message(factory, rows, need))
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and rows < 39 * ivf.nlist:
        log.warning(
            "%s: %d training rows for %d lists; faiss trains best with >= %d",
            factory,
            rows,
            ivf.nlist,
            39 * ivf.nlist,
        )
    return index


def too_few_rows_message(factory: str, have: int, need: int) -> str:
    fixes = []
    if "IVF" in factory:
        fixes.append(f"fewer IVF lists (e.g. 'IVF{suggest_nlist(have)},...')")
    fixes.append("or 'Flat' / 'HNSW32', which need no training")
    return (
        f"factory {factory!r} needs at least {need} training rows, but the space holds "
        f"{have}; use " + ", ".join(fixes)
    )


def train_index(vectors: np.ndarray, factory: str, *, gpu: bool = False) -> faiss.Index:
    """An empty CPU index of ``factory``, trained on ``vectors`` float32 (n, d).

    The template of a sharded index: every shard copies it and only adds, so an IVF's
    shards share one coarse quantizer (a query probes the same lists in every shard, and
    the shards together answer as one index would) and a PQ's one codebook.

    Raises:
        InputError: a bad factory string, or fewer rows than training needs.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    index = make_index(factory, dim)
    need = min_train_rows(index)
    if need > n:
        raise InputError(too_few_rows_message(factory, n, need))
    if index.is_trained:
        return index
    work, resources = to_gpu(index, gpu)
    try:
        work.train(vectors)
    except RuntimeError as err:
        raise InputError(
            f"factory {factory!r} could not train on {n} rows ({_faiss_message(err)}); "
            f"train on more rows or use a factory that needs fewer"
        ) from None
    return faiss.index_gpu_to_cpu(work) if resources is not None else work


def train_rows(index: faiss.Index, rows: int) -> int:
    """How many rows to train ``index`` on, of ``rows``: all of them up to what faiss
    uses (256 points per IVF list, 256 per PQ centroid, at least 65,536), since faiss
    subsamples beyond that anyway."""
    ivf = faiss.try_extract_index_ivf(index)
    return min(rows, max(256 * (ivf.nlist if ivf is not None else 1), 65_536))


def build_index(
    vectors: np.ndarray, factory: str, *, gpu: bool = False, template: faiss.Index | None = None
) -> faiss.Index:
    """A CPU faiss index over ``vectors`` float32 (n, d); label i = row i.

    ``template``: a trained empty index (``train_index``) to copy instead of training on
    ``vectors``. With ``gpu`` (and faiss sees one) training and adding run on GPU 0; the
    index returned is on the CPU either way, ready for ``faiss.serialize_index``.

    Raises:
        InputError: a bad factory string, or fewer rows than training needs (named, with
            the fix).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.clone_index(template) if template is not None else None
    if index is None:
        index = train_index(vectors, factory, gpu=gpu)
    work, resources = to_gpu(index, gpu)
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


# -- loading a shard ----------------------------------------------------------------------


def index_cache_root() -> str:
    """Where a node keeps local copies of object-store shards it memory-maps."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "vlselect", "index")
    return os.environ.get("VLSELECT_INDEX_CACHE", default)


def local_copy(fs: pafs.FileSystem, path: str) -> str:
    """A local file with the bytes of ``path``: itself on a local filesystem, else this
    node's copy, keyed by the URI and size, written beside its name and renamed in."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    size = fs.get_file_info(path).size
    key = hashlib.sha256(f"{fs.type_name}:{path}:{size}".encode()).hexdigest()[:24]
    final = os.path.join(index_cache_root(), f"{key}-{os.path.basename(path)}")
    if os.path.exists(final) and os.path.getsize(final) == size:
        return final
    os.makedirs(index_cache_root(), exist_ok=True)
    partial = f"{final}.partial-{os.getpid()}"
    pafs.copy_files(path, partial, source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())  # fmt: skip
    os.replace(partial, final)
    return final


def load_index(ws: Workspace, path: str, *, mmap: bool = False) -> faiss.Index:
    """The faiss index in ``path``: read into memory, or with ``mmap`` memory-mapped
    (``IO_FLAG_MMAP_IFC``: the codes and inverted lists stay on disk, paged in as
    queries touch them), from a node-local copy when ``path`` is on an object store."""
    if not mmap:
        with ws.fs.open_input_stream(path) as f:
            return faiss.deserialize_index(np.frombuffer(f.read(), dtype=np.uint8))
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
    return faiss.read_index(local_copy(ws.fs, path), flags)


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
    pool: str | None = None  # the fingerprint of the pool whose rows it holds

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
    if not meta.pool_rows:
        raise InputError(
            f"the index of space {space!r} ({found.dir}) was built by an older vlselect "
            f"without pool rows: rebuild it with `vlselect index --workspace {ws.uri} "
            f"--space {space} --shards {meta.shards} --overwrite`"
        )
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
        found.manifest.inputs.get("pool"),
    )
