"""Embedding spaces written straight into a workspace, in the exact layout ``vlselect embed`` leaves.

Tests and benchmarks of the stages that read vectors (cluster, index, search, target)
use them so that they need no encoder run: ``<ws>/embeddings/<space>/part-*.parquet``
of (id string, vector list<float32>) and a complete ``meta.json``, the embed stage's
contract (``engine.embeddings.open_space`` reads them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.vectors import l2_normalize, to_arrow


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


def write_space(
    ws: Path,
    space: str,
    vectors: np.ndarray,
    *,
    ids: list[str] | None = None,
    files: int = 3,
    shard_rows: int | None = None,
    tag: str = "v1",
    drop: frozenset[int] = frozenset(),
) -> list[str]:
    """Write ``vectors`` (n, d) as a complete embedded space; the n ids (``<space>-NNNNNN``
    unless given).

    Shards: ``shard_rows`` rows each when given (aligned across spaces, as the pool's
    shards are), else ``files`` uneven shards so that index shard ranges straddle file
    boundaries. ``drop``: row numbers left out after sharding, as rows a space lacks.
    """
    n, dim = vectors.shape
    ids = ids or [f"{space}-{i:06d}" for i in range(n)]
    if shard_rows:
        cuts = np.r_[np.arange(0, n, shard_rows), n]
    else:
        cuts = np.unique(np.linspace(0, n, files + 1).astype(int) + np.arange(files + 1) % 2)
        cuts[0], cuts[-1] = 0, n
    out = Path(ws) / "embeddings" / space
    out.mkdir(parents=True, exist_ok=True)
    for f, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        rows = [r for r in range(lo, hi) if r not in drop]
        table = pa.table(
            {"id": pa.array([ids[r] for r in rows], pa.string()), "vector": to_arrow(vectors[rows])}
        )
        pq.write_table(table, out / f"part-{f:06d}.parquet")
    meta = {
        "status": "complete",
        "space": space,
        "vectors": n - len(drop),
        "dim": int(dim),
        "fingerprint": {"synthetic": tag},
    }
    (out / "meta.json").write_text(json.dumps(meta))
    return ids


def brute_force(x: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product in float64: (rows (q, k) int64, scores (q, k) float64).

    Ties go to the lower row (a stable sort), as the sharded merge breaks them.
    """
    scores = queries.astype(np.float64) @ x.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, 1)
