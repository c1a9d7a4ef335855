"""Embedding spaces written straight into a workspace, in the exact layout ``vlselect embed`` leaves.

Tests of the stages that read vectors (cluster, index, search, target) use them so
that they need no encoder run; the shapes and meta.json are the embed stage's contract
(``engine.embeddings.open_space`` reads them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.vectors import l2_normalize, to_arrow


def clustered(n: int, d: int, centres: int, seed: int = 0, spread: float = 0.15):
    """Unit vectors float32 (n, d) drawn around ``centres`` random unit centres; and the
    centre of each row, int (n,)."""
    rng = np.random.default_rng(seed)
    means = l2_normalize(rng.standard_normal((centres, d)))
    labels = rng.integers(0, centres, n)
    noise = rng.standard_normal((n, d)).astype(np.float32) * spread / np.sqrt(d)
    return l2_normalize(means[labels] + noise), labels


def write_space(
    ws: Path,
    space: str,
    ids: list[str],
    vectors: np.ndarray,
    shard_rows: int,
    tag: str = "v1",
    drop: frozenset[int] = frozenset(),
) -> Path:
    """Write ``ids`` and ``vectors`` (n, d) as ``<ws>/embeddings/<space>/part-*.parquet`` + meta.

    ``drop``: row numbers left out after sharding, as rows a space lacks (shards stay aligned).
    """
    out = Path(ws) / "embeddings" / space
    out.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, len(ids), shard_rows)):
        rows = [r for r in range(start, min(start + shard_rows, len(ids))) if r not in drop]
        table = pa.table(
            {"id": pa.array([ids[r] for r in rows], pa.string()), "vector": to_arrow(vectors[rows])}
        )
        pq.write_table(table, out / f"part-{i:06d}.parquet")
    meta = {
        "status": "complete",
        "space": space,
        "vectors": len(ids) - len(drop),
        "dim": int(vectors.shape[1]),
        "fingerprint": {"synthetic": tag},
    }
    (out / "meta.json").write_text(json.dumps(meta))
    return out
