"""Vectors in memory (numpy) and on disk (Arrow ``list<float32>``)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

VECTOR_TYPE = pa.list_(pa.float32())


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` (n, d) scaled to unit L2 norm, float32 (n, d); an all-zero row stays zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


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
