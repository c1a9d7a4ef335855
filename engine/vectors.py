"""Vectors in memory (numpy) and on disk (Arrow ``list<float32>``)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

VECTOR_TYPE = pa.list_(pa.float32())


def row_norms(x: np.ndarray) -> np.ndarray:
    """L2 norm of each row of ``x`` (n, d), float32 (n,).

    One pass with no temporary (einsum), unlike ``np.linalg.norm``, which squares into a
    copy: on 20k x 1408 rows that is 3x faster, and clustering reads every row twice.
    """
    return np.sqrt(np.einsum("ij,ij->i", x, x))


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` (n, d) scaled to unit L2 norm, float32 (n, d); an all-zero row stays zero."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d array of rows, got shape {x.shape}")
    return x / np.maximum(row_norms(x), eps)[:, None]


def to_arrow(vectors: np.ndarray) -> pa.ListArray:
    """(n, d) float32 -> an Arrow ``list<float32>`` array of n rows, without a Python loop."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1)))


def from_arrow(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An Arrow ``list<float32>`` column of equal-length rows -> (n, d) float32.

    Raises ValueError when the rows differ in length (vectors of two encoders mixed).
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    d = int(lengths[0])
    if not (lengths == d).all():
        raise ValueError(f"vectors of different lengths in one column: {sorted(set(lengths))}")
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.astype(np.float32, copy=False).reshape(n, d)
