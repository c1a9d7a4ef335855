"""The retrieval service: one FAISS shard actor per index shard, and the client that fans out.

``IndexShard`` (a Ray actor) loads ``<ws>/index/<space>/shard-XXXX.faiss`` and its pool
rows in its constructor (or memory-maps the index, ``mmap``) and answers searches with
global pool rows: int64 labels, mapped through a table built once, two flat arrays on
the wire. ``RetrievalService`` is the client: it holds the shard handles, sends each
batch of queries to every shard and merges the per-shard top-k lists exactly
(``engine.knn.merge_topk``); ``search_ids`` answers with string ids for people.

Why a client and not a router actor: each caller fans out from its own process, so the
merge is spread over the callers and nothing sits between a caller and the shards. Several clients (threads, tasks, other jobs) share the
shards, each of which answers ``max_concurrency`` calls at once. A ``RetrievalService``
pickles, so it can be handed to Ray tasks; with ``name`` set the shard actors are named
(namespace ``vlselect``) and another job finds them with ``RetrievalService.connect``.

Fault tolerance: shard actors are created with ``max_restarts`` and ``max_task_retries``
from ``shard.max_retries`` (-1: without limit). An actor that dies is restarted by Ray,
its constructor reloads the shard from the workspace, and the calls that were in flight
are retried by Ray, so a caller sees a slower answer, never a lost or different one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator

import faiss
import numpy as np
import pyarrow.parquet as pq
import ray
from pydantic import BaseModel, ConfigDict, Field

from actors.adapter import NAMESPACE, ray_options
from engine.errors import InputError
from engine.faiss_index import (
    IndexInfo,
    load_index,
    open_index,
    set_search_params,
    shard_name,
    to_gpu,
)
from engine.knn import id_table, labels_to_ids, labels_to_rows, merge_topk, row_table
from engine.resources import Resources
from engine.workspace import Workspace

log = logging.getLogger("vlselect.retrieval")

INLINE_BYTES = 100 * 1024


class ServiceConfig(BaseModel):
    """How the shard actors run and how a client batches (the ``search`` section holds it)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(256, ge=1, description="Queries per request sent to every shard.")
    max_in_flight: int = Field(
        4, ge=1, description="Batches one client has in flight at once (pipelining)."
    )
    nprobe: int | None = Field(
        16,
        ge=1,
        description="IVF lists probed per query (recall against speed); ignored by "
        "indexes without lists; None keeps the index's own (1).",
    )
    ef_search: int | None = Field(
        64,
        ge=1,
        description="HNSW search beam (efSearch; >= k for good recall); ignored by others; "
        "None keeps the index's own (16).",
    )
    shard: Resources = Field(
        default_factory=lambda: Resources(num_cpus=0.25, max_retries=-1),
        description="Resources of one shard actor; max_retries sets its restarts and the "
        "retries of its calls in flight (-1: without limit). Every shard holds its CPUs "
        "while the service runs, so shards x num_cpus must fit the cluster.",
    )
    threads: int = Field(
        0,
        ge=0,
        description="faiss (OpenMP) threads per shard actor; 0: the shard's CPUs, "
        "floor(shard.num_cpus) but at least 1.",
    )
    mmap: bool = Field(
        False,
        description="Memory-map each shard's index instead of reading it into memory, for "
        "indexes larger than a node's RAM (the page cache keeps what queries touch); a "
        "shard on an object store is first copied to the node's local disk.",
    )
    max_concurrency: int = Field(
        4, ge=1, description="Calls one shard actor answers at once (several clients)."
    )
    gpu: bool = Field(
        False,
        description="Serve each shard from GPU 0 of its node (needs faiss-gpu and "
        "shard.num_gpus > 0); HNSW stays on the CPU.",
    )
    name: str | None = Field(
        None,
        description="Name the shard actors (namespace 'vlselect') so that another job can "
        "connect to them; start() with a name reuses a running service of that name.",
    )
    detached: bool = Field(
        False, description="With a name: the shard actors outlive the job that started them."
    )
    start_timeout_s: float = Field(
        300.0, gt=0, description="How long start() waits for every shard to load."
    )


class IndexShard:
    """One shard's faiss index and ids, loaded from the workspace; answers top-k searches.

    Created as a Ray actor by ``RetrievalService``; the constructor runs again on every
    restart, so a restarted actor serves the same shard from the same files.
    """

    def __init__(
        self,
        ws: Workspace,
        space: str,
        shard: int,
        *,
        gpu: bool = False,
        nprobe: int | None = None,
        ef_search: int | None = None,
        threads: int = 1,
        mmap: bool = False,
    ):
        start = time.perf_counter()
        faiss.omp_set_num_threads(max(1, threads))
        info = open_index(ws, space)
        index = load_index(ws, info.index_file(shard), mmap=mmap)
        # ParquetFile, not read_table: it spares each actor pyarrow.dataset's import (0.4 s).
        table = pq.ParquetFile(info.ids_file(shard), filesystem=ws.fs).read(columns=["id", "row"])
        self._rows = row_table(table.column("row").to_numpy())
        self._ids = table.column("id")  # Arrow; the object table is built on first use
        self._id_table: np.ndarray | None = None
        if index.ntotal != table.num_rows:
            raise RuntimeError(
                f"{info.index_file(shard)} holds {index.ntotal} vectors but its ids file "
                f"{table.num_rows}; rebuild with `vlselect index --space {space} --overwrite`"
            )
        self.params = set_search_params(index, nprobe, ef_search)
        self.index, self._gpu = to_gpu(index, gpu)
        # faiss GPU indexes are not safe to search from several threads at once.
        self._lock = threading.Lock() if self._gpu is not None else None
        self.shard, self.space, self.fingerprint = shard, space, info.fingerprint
        self.threads, self.mmap = faiss.omp_get_max_threads(), mmap
        self.load_seconds = time.perf_counter() - start

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self._lock is None:
            return self.index.search(queries, k)
        with self._lock:
            return self.index.search(queries, k)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``queries`` float32 (q, d) -> ``(scores (q, k) float32, rows (q, k) int64)``.

        ``rows`` are global pool rows, best first; a shard with fewer than k rows pads
        with score -FLT_MAX and row -1. Two flat arrays: nothing per result is pickled.
        """
        scores, labels = self._search(queries, k)
        return scores, labels_to_rows(labels, self._rows)

    def search_ids(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Like ``search``, with the pool's string ids (object, None = missing) for rows."""
        if self._id_table is None:
            self._id_table = id_table(self._ids.to_pylist())
        scores, labels = self._search(queries, k)
        return scores, labels_to_ids(labels, self._id_table)

    def info(self) -> dict:
        """Which shard this is, its size, where it runs, and whether Ray restarted it."""
        context = ray.get_runtime_context()
        with warnings.catch_warnings():  # Ray 2.60 reads its own deprecated actor_id inside
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = bool(context.was_current_actor_reconstructed)
        return {
            "space": self.space,
            "shard": self.shard,
            "rows": int(self.index.ntotal),
            "dim": int(self.index.d),
            "params": self.params,
            "device": "cpu" if self._gpu is None else "gpu",
            "threads": self.threads,
            "mmap": self.mmap,
            "fingerprint": self.fingerprint,
            "pid": os.getpid(),
            "node": context.get_node_id(),
            "restarted": restarted,
            "load_seconds": round(self.load_seconds, 3),
        }


ShardActor = ray.remote(IndexShard)


def actor_name(name: str, space: str, shard: int) -> str:
    return f"{name}/{space}/{shard_name(shard)}"


class RetrievalService:
    """A client of the shard actors of one space's index: ``search`` fans out and merges.

    ``start(ws, space, cfg)`` creates (or, with ``cfg.name``, finds) the shard actors and
    waits until each has loaded; ``search(queries, k)`` answers; ``stop()`` ends the actors.
    Usable as a context manager; it pickles (handles and config), so Ray tasks can use it.
    """

    def __init__(self, info: IndexInfo, shards: list, cfg: ServiceConfig):
        self.info, self.shards, self.cfg = info, shards, cfg

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def rows(self) -> int:
        return self.info.rows

    @classmethod
    def start(cls, ws: Workspace, space: str, cfg: ServiceConfig | None = None) -> RetrievalService:
        """Start one shard actor per shard of ``<ws>/index/<space>`` and wait until all loaded.

        Raises:
            InputError: no finished index for ``space``; gpu asked with no GPU per shard.
            RuntimeError: a shard failed to load, or not every shard was scheduled within
                ``start_timeout_s`` (the message names the resources asked for).
        """
        cfg = cfg or ServiceConfig()
        info = open_index(ws, space)
        if cfg.gpu and not cfg.shard.num_gpus:
            raise InputError("gpu: true needs a GPU per shard actor: set shard.num_gpus (e.g. 1)")
        opts = {**ray_options(cfg.shard, actor=True), "max_concurrency": cfg.max_concurrency}
        if cfg.detached and not cfg.name:
            raise InputError("detached: true needs a name for the shard actors (set name)")
        args = {
            "gpu": cfg.gpu,
            "nprobe": cfg.nprobe,
            "ef_search": cfg.ef_search,
            "threads": cfg.threads or max(1, int(cfg.shard.num_cpus)),
            "mmap": cfg.mmap,
        }
        shards = []
        for s in range(info.shards):
            named = {}
            if cfg.name:
                named = {"name": actor_name(cfg.name, space, s), "namespace": NAMESPACE}
                named["get_if_exists"] = True
                if cfg.detached:
                    named["lifetime"] = "detached"
            shards.append(ShardActor.options(**opts, **named).remote(ws, space, s, **args))
        service = cls(info, shards, cfg)
        loaded = service._wait_loaded(timeout=cfg.start_timeout_s)
        stale = [i["shard"] for i in loaded if i["fingerprint"] != info.fingerprint]
        if stale:  # a named service of an index rebuilt since: restart those shards
            log.warning("shards %s of %r serve an older index; restarting them", stale, cfg.name)
            for s in stale:
                ray.kill(shards[s], no_restart=False)
            service._wait_loaded(timeout=cfg.start_timeout_s)
        log.info(
            "retrieval service for %s: %d shards, %d rows, factory %s",
            space,
            info.shards,
            info.rows,
            info.factory,
        )
        return service

    @classmethod
    def connect(
        cls, ws: Workspace, space: str, name: str, cfg: ServiceConfig | None = None
    ) -> RetrievalService:
        """A client of a running named service (started elsewhere with ``name``).

        Raises:
            InputError: no finished index for ``space``, or no running shard of that name.
        """
        info = open_index(ws, space)
        cfg = (cfg or ServiceConfig()).model_copy(update={"name": name})
        shards = []
        for s in range(info.shards):
            try:
                shards.append(ray.get_actor(actor_name(name, space, s), namespace=NAMESPACE))
            except ValueError:
                raise InputError(
                    f"no running shard {actor_name(name, space, s)!r} in namespace "
                    f"{NAMESPACE!r}: start the service with RetrievalService.start and "
                    f"name={name!r} (detached: true to outlive its job)"
                ) from None
        return cls(info, shards, cfg)

    def _wait_loaded(self, timeout: float) -> list[dict]:
        refs = [h.info.remote() for h in self.shards]
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            r = self.cfg.shard
            raise RuntimeError(
                f"the {len(self.shards)} shard actors of {self.info.space} did not all start "
                f"within {timeout:.0f} s; each asks for num_cpus={r.num_cpus}, "
                f"num_gpus={r.num_gpus} (the cluster has {ray.cluster_resources()}): lower "
                f"shard.num_cpus, use fewer shards, or add nodes"
            ) from None
        except ray.exceptions.RayActorError as err:
            raise RuntimeError(f"a shard of {self.info.space} failed to load: {err}") from None

    def shard_info(self) -> list[dict]:
        """Each shard actor's ``IndexShard.info()``, in shard order."""
        return ray.get([h.info.remote() for h in self.shards])

    def _submit(self, batch: np.ndarray, k: int, method: str) -> list:
        # A large batch goes to the object store once, read by every shard; a small one
        # travels inline with each call, which costs less than a store round trip.
        arg = ray.put(batch) if batch.nbytes > INLINE_BYTES else batch
        return [getattr(h, method).remote(arg, k) for h in self.shards]

    def _collect(self, refs: list, k: int) -> tuple[np.ndarray, np.ndarray]:
        parts = ray.get(refs)
        scores, found = merge_topk([p[0] for p in parts], [p[1] for p in parts], k)
        return found, scores

    def iter_search(
        self, queries: np.ndarray, k: int, *, ids: bool = False
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Answer ``queries`` batch by batch, in order: yields ``(start, found, scores)``.

        ``found`` int64 (b, k) pool rows (-1 = missing), or with ``ids`` object (b, k)
        string ids (None = missing), and ``scores`` float32 (b, k) answer queries
        ``[start, start + b)``. At most ``max_in_flight`` batches are pending at a time.
        """
        queries = self._check(queries, k)
        method = "search_ids" if ids else "search"
        pending: deque = deque()
        step = self.cfg.batch_size
        for start in range(0, len(queries), step):
            pending.append((start, self._submit(queries[start : start + step], k, method)))
            if len(pending) >= self.cfg.max_in_flight:
                first, refs = pending.popleft()
                yield (first, *self._collect(refs, k))
        while pending:
            first, refs = pending.popleft()
            yield (first, *self._collect(refs, k))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact merge of every shard's top-k for each query, as pool rows.

        Args:
            queries: float32 (q, d), d = the index's dim; searched as given (L2-normalise
                them first for cosine scores).
            k: results per query, >= 1.
        Returns:
            ``(rows (q, k) int64, scores (q, k) float32)``: global pool rows (the pool's
            row order, the same in every space), best first (ties: lower shard, then the
            shard's rank). Where the index holds fewer than k rows (or an IVF probe finds
            fewer) the tail is row -1, score -inf.
        """
        return self._gather(queries, k, np.int64)

    def search_ids(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``search`` with the pool's string ids: ``(ids (q, k) object, scores (q, k))``,
        None where ``search`` has -1. For callers that hand ids to people; selection
        works on rows."""
        return self._gather(queries, k, object)

    def _gather(self, queries: np.ndarray, k: int, kind) -> tuple[np.ndarray, np.ndarray]:
        queries = self._check(queries, k)
        found = np.empty((len(queries), k), dtype=kind)
        scores = np.empty((len(queries), k), dtype=np.float32)
        for start, part, part_scores in self.iter_search(queries, k, ids=kind is object):
            found[start : start + len(part)] = part
            scores[start : start + len(part)] = part_scores
        return found, scores

    def _check(self, queries: np.ndarray, k: int) -> np.ndarray:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(
                f"queries must be (q, {self.dim}) for the {self.info.space} index; "
                f"got shape {queries.shape}"
            )
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return queries

    def stop(self) -> None:
        """End the shard actors (for every client of a named service too)."""
        for h in self.shards:
            ray.kill(h, no_restart=True)
        self.shards = []

    def __enter__(self) -> RetrievalService:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
