"""One shard's faiss index: built from a factory string, loaded, and found on disk.

- ``make_index`` / ``train_index`` / ``build_index`` / ``set_search_params`` / ``to_gpu``:
  one faiss index from a factory string, inner product (vectors are L2-normalised, so IP
  is cosine); a trained empty index is the template every shard of a sharded IVF or PQ
  index copies, so the shards share one coarse quantizer and one codebook.
- ``load_index``: one shard's file, read or memory-mapped.
- ``open_index``: what ``vlselect index`` wrote in ``<ws>/index/<space>/``, checked.

Merging the shards' results is ``engine.knn``'s.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow.fs as pafs

from engine.artifacts import Index, IndexMeta
from engine.embeddings import SPACES
from engine.errors import InputError
from engine.workspace import Workspace

log = logging.getLogger("vlselect.faiss_index")

FACTORY_EXAMPLES = "'Flat', 'IVF1024,Flat', 'HNSW32', 'IVF4096,PQ32'"
FACTORY_DOCS = "https://github.com/facebookresearch/faiss/wiki/The-index-factory"


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
