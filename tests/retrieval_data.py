"""Test data for the index and search stages: clustered unit vectors written as an embedded space.

``write_space`` writes exactly what ``engine.embeddings.open_space`` reads
(``<ws>/embeddings/<space>/part-*.parquet`` of id, vector list<float32>, and a complete
``meta.json``), so the index tests need no encoder and take a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.vectors import to_arrow


def clustered(n: int, dim: int, centres: int, seed: int = 0, spread: float = 0.3) -> np.ndarray:
    """float32 (n, dim) unit vectors drawn around ``centres`` random directions.

    Random vectors in many dimensions are all nearly orthogonal, which makes recall
    meaningless; points around centres have real nearest neighbours.
    """
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, centres, n)] + spread * rng.standard_normal((n, dim)).astype(
        np.float32
    ) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_space(
    ws: Path,
    space: str,
    vectors: np.ndarray,
    files: int = 3,
    ids: list[str] | None = None,
    fingerprint: str = "test-v1",
) -> list[str]:
    """Write ``vectors`` (n, d) as a complete embedded space in ``files`` uneven shards; ids."""
    n, dim = vectors.shape
    ids = ids or [f"{space}-{i:06d}" for i in range(n)]
    out = Path(ws) / "embeddings" / space
    out.mkdir(parents=True, exist_ok=True)
    # Uneven cuts, so that shard ranges straddle file boundaries.
    cuts = np.unique(np.linspace(0, n, files + 1).astype(int) + np.arange(files + 1) % 2)
    cuts[0], cuts[-1] = 0, n
    for f, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        table = pa.table(
            {"id": pa.array(ids[lo:hi], pa.string()), "vector": to_arrow(vectors[lo:hi])}
        )
        pq.write_table(table, out / f"part-{f:06d}.parquet")
    meta = {"status": "complete", "vectors": n, "dim": dim, "fingerprint": fingerprint}
    (out / "meta.json").write_text(json.dumps(meta))
    return ids


def brute_force(x: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product in float64: (rows (q, k) int64, scores (q, k) float64).

    Ties go to the lower row (a stable sort), as the sharded merge breaks them.
    """
    scores = queries.astype(np.float64) @ x.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, 1)
