"""``vlselect search``: the pool's nearest neighbours of a file of query vectors.

What it does:
    1. checks in the driver, before Ray starts, that ``<ws>/index/<space>`` is finished,
       and loads ``--queries`` (a ``.npy`` file, ``np.load(allow_pickle=False)``): it must
       be one 2-D numeric array of the index's dim with no NaN, inf or all-zero row;
    2. L2-normalises the queries (the pool's vectors are, so the scores are cosine
       similarities);
    3. starts the retrieval service (one shard actor per index shard,
       ``actors.retrieval``), sends the queries in batches of ``batch_size`` to every
       shard and merges the per-shard top-k exactly;
    4. writes ``--out`` (Parquet, atomically): ``query`` (row of the queries file),
       ``rank`` (0 = nearest), ``id`` (pool id), ``score`` (float32), and prints a summary
       with queries/s.

A query gets fewer than k rows only where the index has fewer than k rows, or an IVF
probe (``nprobe``) finds fewer; the summary counts them.

Raises:
    InputError: no index for the space (run ``vlselect index``), an unknown space, an
        unfinished index, a missing or unreadable queries file, a queries array that is
        not 2-D, of another dim than the index, or with NaN/inf/zero rows, k < 1 (exit 2).
    RuntimeError: the shard actors could not start or load (exit 1).
"""

from __future__ import annotations

import io
import logging
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import Field

from actors.retrieval import RetrievalService, ServiceConfig
from engine.artifacts import EmbeddingSpace, Ref
from engine.embeddings import unusable_rows
from engine.errors import InputError
from engine.faiss_index import IndexInfo, open_index
from engine.resources import Resources
from engine.vectors import l2_normalize
from engine.workspace import Location, Workspace, atomic_output
from jobs.flags import path_field
from jobs.runtime import Timer, connect, print_summary

STAGE = "search"
DEFAULT_WORKSPACE = None
log = logging.getLogger("vlselect.search")

RESULT_SCHEMA = pa.schema(
    [("query", pa.int64()), ("rank", pa.int64()), ("id", pa.string()), ("score", pa.float32())]
)


class SearchConfig(ServiceConfig):
    """Configuration of ``vlselect search`` (section ``search``): the query and the service."""

    space: str | None = Field(None, description="The indexed space to search.")
    queries: str | None = path_field(
        None, description="A .npy file of query vectors (q, d): a path or URI."
    )
    out: str | None = path_field(None, description="The Parquet file to write (path or URI).")
    k: int = Field(10, ge=1, description="Neighbours per query.")


CONFIG = SearchConfig
FLAGS = {"k": "k"}


def reads(cfg: SearchConfig) -> list[Ref]:
    return [Ref("index", cfg.space)]


def writes(cfg: SearchConfig) -> list[Ref]:
    return []  # a file of the user's (--out), not an artifact of the workspace


def resources(cfg: SearchConfig) -> dict[str, Resources]:
    return {"shard actor": cfg.shard}


def load_queries(path: str, info: IndexInfo) -> np.ndarray:
    """The queries file (a path or URI) as float32 (q, d), unnormalised. Raises InputError."""
    where = Location.of(path)
    if where.kind() != pafs.FileType.File:
        raise InputError(f"queries file not found: {path} (pass a .npy file to --queries)")
    with where.open() as f:
        data = io.BytesIO(f.read())
    try:
        loaded = np.load(data, allow_pickle=False)
    except ValueError as err:
        raise InputError(
            f"{path} cannot be read as a numeric .npy array ({err}); save the queries with "
            f"np.save(path, array.astype('float32'))"
        ) from None
    except OSError as err:
        raise InputError(f"{path} is not a .npy file ({err}); save it with np.save") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        names = list(loaded.files)
        loaded.close()
        raise InputError(
            f"{path} is an .npz archive (arrays {names}); save one (q, d) array with np.save"
        )
    if loaded.dtype.kind not in "fiu":
        raise InputError(f"{path} holds a {loaded.dtype} array; query vectors must be numbers")
    if loaded.ndim != 2:
        raise InputError(
            f"{path} holds an array of shape {loaded.shape}; queries must be 2-D (q, "
            f"{info.dim}) (one query: array.reshape(1, -1))"
        )
    if loaded.shape[0] == 0:
        raise InputError(f"{path} holds no queries (shape {loaded.shape})")
    if loaded.shape[1] != info.dim:
        raise InputError(
            f"{path} holds {loaded.shape[1]}-d queries but the index of space "
            f"{info.space!r} is {info.dim}-d; embed the queries with the space's encoder"
        )
    queries = loaded.astype(np.float32)
    bad = np.flatnonzero(unusable_rows(queries))
    if len(bad):
        raise InputError(
            f"{path}: {len(bad)} of {len(queries)} queries hold NaN or inf or are all zero "
            f"(rows {bad[:5].tolist()}); drop or fix them"
        )
    return queries


def check_inputs(cfg: SearchConfig, ws: Workspace) -> tuple[IndexInfo, np.ndarray]:
    """The index and the normalised queries, before Ray starts. Raises InputError."""
    if not cfg.space:
        raise InputError("no space to search: pass --space clip|dino|text|skill")
    if not cfg.queries:
        raise InputError("no queries: pass --queries FILE.npy (float32, shape (q, d))")
    if not cfg.out:
        raise InputError("no output: pass --out FILE.parquet")
    info = open_index(ws, cfg.space)
    queries = load_queries(cfg.queries, info)
    embedded = EmbeddingSpace.find(ws, cfg.space)
    if embedded is not None and embedded.fingerprint != info.built_from:
        log.warning(
            "the index of %s was built from older embeddings; rebuild it with "
            "`vlselect index --workspace %s --space %s`",
            cfg.space,
            ws.uri,
            cfg.space,
        )
    return info, l2_normalize(queries)


def _output(out: str) -> tuple[pafs.FileSystem, str]:
    if "://" in out:
        return pafs.FileSystem.from_uri(out)
    return pafs.LocalFileSystem(), os.path.abspath(out)


def main(cfg: SearchConfig, ws: Workspace) -> dict:
    """Answer ``cfg.queries`` into ``cfg.out``; see the module docstring. Returns the summary."""
    timer = Timer()
    info, queries = check_inputs(cfg, ws)
    fs, out = _output(cfg.out)
    connect()
    short = 0
    with RetrievalService.start(ws, cfg.space, cfg) as service:
        started = timer.seconds
        search = Timer()
        with (
            atomic_output(fs, out) as tmp,
            pq.ParquetWriter(tmp, RESULT_SCHEMA, filesystem=fs) as writer,
        ):
            for start, ids, scores in service.iter_search(queries, cfg.k, ids=True):
                found = ~np.equal(ids, None)
                short += int((~found).any(axis=1).sum())
                rows, ranks = np.nonzero(found)
                table = pa.table(
                    {
                        "query": rows + start,
                        "rank": ranks,
                        "id": pa.array(ids[found], pa.string()),
                        "score": scores[found],
                    },
                    schema=RESULT_SCHEMA,
                )
                writer.write_table(table)
        seconds = search.seconds
    qps = len(queries) / seconds if seconds else float("inf")
    result = {
        "space": cfg.space,
        "queries": len(queries),
        "k": cfg.k,
        "shards": info.shards,
        "factory": info.factory,
        "rows": info.rows,
        "short_of_k": short,
        "start_seconds": round(started, 2),
        "search_seconds": round(seconds, 3),
        "queries_per_s": round(qps, 1),
        "out": out,
    }
    rows = [
        (
            "index",
            f"{cfg.space}: {info.rows} rows x {info.dim}, {info.shards} shards, {info.factory}",
        ),
        ("queries", f"{len(queries)} (L2-normalised), k={cfg.k}, batches of {cfg.batch_size}"),
        ("search", f"{seconds:.2f} s, {qps:.0f} queries/s (service start {started:.1f} s)"),
    ]
    if short:
        rows.append(("short of k", f"{short} queries got fewer than {cfg.k} results"))
    rows.append(("out", out))
    print_summary(STAGE, rows, extra=result)
    return result


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main([STAGE, *sys.argv[1:]]))
