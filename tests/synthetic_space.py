"""Embedding spaces committed straight into a workspace, as ``vlselect embed`` commits them.

Tests and benchmarks of the stages that read vectors (cluster, index, search, target)
use them so that they need no encoder run: a committed ``EmbeddingSpace`` artifact
(engine.artifacts, engine.commit) whose attempt holds ``part-NNNNNN.parquet`` shards of
(id string, vector list<float32>) and whose manifest carries a full ``SpaceMeta``, the
embed stage's contract (``engine.embeddings.open_space`` reads them). Its fingerprint is
a digest of what was written, so writing the same space again keeps what downstream
stages built on it, and writing other vectors makes them run again. A workspace without
a pool that holds the ids gets one (``ensure_pool``): indexes store pool rows.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from engine.artifacts import EmbeddingSpace, Pool, PoolMeta, SpaceMeta
from engine.pool import POOL_SCHEMA
from engine.vectors import l2_normalize, to_arrow
from engine.workspace import Workspace, write_table_atomic


def clustered_labelled(
    n: int, d: int, centres: int, seed: int = 0, spread: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors float32 (n, d) drawn around ``centres`` random unit centres, and each
    row's centre, int64 (n,).

    Random vectors in many dimensions are all nearly orthogonal, which makes recall and
    clustering meaningless; points around centres have real neighbours and clusters.
    """
    rng = np.random.default_rng(seed)
    means = l2_normalize(rng.standard_normal((centres, d)))
    labels = rng.integers(0, centres, n)
    noise = rng.standard_normal((n, d)).astype(np.float32) * spread / np.sqrt(d)
    return l2_normalize(means[labels] + noise), labels


def clustered(n: int, d: int, centres: int, seed: int = 0, spread: float = 0.3) -> np.ndarray:
    """float32 (n, d): the vectors of ``clustered_labelled``."""
    return clustered_labelled(n, d, centres, seed, spread)[0]


def synthetic_meta(space: str, dim: int, vectors: int, shards: int, tag: str = "v1") -> SpaceMeta:
    """The full ``SpaceMeta`` of a synthetic space of ``vectors`` rows of length ``dim``."""
    return SpaceMeta(
        space=space,
        model=f"synthetic:{tag}",
        weights="random",
        source="tests.synthetic_space",
        dim=int(dim),
        vectors=int(vectors),
        shards=int(shards),
        no_image=0,
        undecodable=0,
        undecodable_examples=[],
        seconds=0.0,
        config={},  # no embed config: readers fall back to the workspace's
    )


def write_space(
    ws: Path | str | Workspace,
    space: str,
    vectors: np.ndarray,
    *,
    ids: list[str] | None = None,
    files: int = 3,
    shard_rows: int | None = None,
    tag: str = "v1",
    drop: frozenset[int] = frozenset(),
) -> list[str]:
    """Commit ``vectors`` (n, d) as the embedded space ``space`` of the workspace ``ws``;
    return the n ids (``<space>-NNNNNN`` unless given).

    Shards: ``shard_rows`` rows each when given (aligned across spaces, as the pool's
    shards are), else ``files`` uneven shards so that index shard ranges straddle file
    boundaries. ``drop``: row numbers left out after sharding, as rows a space lacks.
    """
    workspace = ws if isinstance(ws, Workspace) else Workspace.open(str(ws))
    vectors = np.ascontiguousarray(vectors, np.float32)
    n, dim = vectors.shape
    ids = ids or [f"{space}-{i:06d}" for i in range(n)]
    if shard_rows:
        cuts = np.r_[np.arange(0, n, shard_rows), n]
    else:
        cuts = np.unique(np.linspace(0, n, files + 1).astype(int) + np.arange(files + 1) % 2)
        cuts[0], cuts[-1] = 0, n
    digest = hashlib.sha256(vectors.tobytes())
    digest.update("\n".join(ids).encode())
    digest.update(np.asarray(cuts, np.int64).tobytes())
    digest.update(",".join(map(str, sorted(drop))).encode())
    plan = EmbeddingSpace.begin(
        workspace, space, synthetic=tag, content=digest.hexdigest(), overwrite=True
    )
    attempt = plan.attempt
    shards = 0
    for f, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        rows = [r for r in range(lo, hi) if r not in drop]
        table = pa.table(
            {"id": pa.array([ids[r] for r in rows], pa.string()), "vector": to_arrow(vectors[rows])}
        )
        write_table_atomic(workspace.fs, attempt.path(f"part-{f:06d}.parquet"), table)
        shards += 1
    attempt.commit(synthetic_meta(space, dim, n - len(drop), shards, tag))
    ensure_pool(workspace, ids)
    return ids


def ensure_pool(ws: Workspace, ids: list[str]) -> None:
    """Commit a pool that holds ``ids`` (text-only records, one per id) when the workspace's
    pool lacks any of them: an index stores each vector's pool row, so synthetic vectors
    need pool rows as real ones have. A pool of real records (a world's) is left alone
    when it already holds every id."""
    found = Pool.find(ws)
    have = found.read_table(["id"]).column("id").to_pylist() if found is not None else []
    known = set(have)
    new = [i for i in dict.fromkeys(ids) if i not in known]
    if not new:
        return
    every = have + new
    begun = Pool.begin(ws, synthetic="ids", content=hashlib.sha256("\n".join(every).encode())
                       .hexdigest(), overwrite=True)  # fmt: skip
    turns = [[{"from": "human", "value": f"q {i}"}, {"from": "gpt", "value": f"a {i}"}]
             for i in every]  # fmt: skip
    table = pa.table({
        "id": every, "image": pa.nulls(len(every), pa.binary()),
        "image_ref": pa.nulls(len(every), pa.string()), "width": pa.nulls(len(every), pa.int32()),
        "height": pa.nulls(len(every), pa.int32()), "question": [f"q {i}" for i in every],
        "answer": [f"a {i}" for i in every], "conversations": turns,
        "source": ["synthetic"] * len(every), "record_index": list(range(len(every))),
    }, schema=POOL_SCHEMA)  # fmt: skip
    write_table_atomic(ws.fs, begun.attempt.path("part-000000.parquet"), table)
    begun.attempt.commit(PoolMeta(
        source="synthetic", format="synthetic", image_root=None, records_in=len(every),
        accepted=len(every), rejected=0, rejected_by_reason={}, source_fingerprint={},
        seconds=0.0, config={},
    ))  # fmt: skip


def brute_force(x: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product in float64: (rows (q, k) int64, scores (q, k) float64).

    Ties go to the lower row (a stable sort), as the sharded merge breaks them.
    """
    scores = queries.astype(np.float64) @ x.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, 1)
