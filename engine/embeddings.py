"""Reading what ``vlselect embed`` committed: ``<ws>/embeddings/<space>/`` shards and their meta.

A space is usable once committed (engine.commit); its shards are Parquet
files of (id string, vector list<float32>) and its vectors are L2-normalised.
Stages that read vectors (cluster, index, target) open spaces through here, so a
missing, unfinished or malformed space is refused the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engine.artifacts import EmbeddingSpace, SpaceMeta
from engine.errors import InputError
from engine.shards import stem
from engine.vectors import from_arrow
from engine.workspace import Workspace

SPACES = ("clip", "dino", "text", "skill")


@dataclass(frozen=True)
class EmbeddedSpace:
    """One committed space: its shard files (sorted), vector length, row count and meta."""

    space: str
    dir: str
    files: tuple[str, ...]
    dim: int
    rows: int
    meta: SpaceMeta
    fingerprint: str  # what the vectors were made from: downstream stages key on it

    @property
    def stems(self) -> tuple[str, ...]:
        return tuple(stem(f) for f in self.files)


def open_space(ws: Workspace, space: str) -> EmbeddedSpace:
    """Check that ``space`` is embedded and committed; return its shards and shape.

    Raises:
        InputError: an unknown space name, a space never embedded, one whose run did not
            finish, or shards whose row count differs from the meta; each names the fix.
    """
    if space not in SPACES:
        raise InputError(f"unknown space {space!r}; the spaces are {', '.join(SPACES)}")
    found = EmbeddingSpace.open(ws, space)
    files = tuple(found.files(suffix=".parquet"))
    rows = sum(pq.ParquetFile(f, filesystem=ws.fs).metadata.num_rows for f in files)
    if rows != found.meta.vectors:
        raise InputError(
            f"space {space!r}: its meta counts {found.meta.vectors} vectors but its "
            f"{len(files)} shards hold {rows}; run `{EmbeddingSpace.command(ws, space)} --overwrite`"
        )
    return EmbeddedSpace(
        space, found.dir, files, found.meta.dim, rows, found.meta, found.fingerprint
    )


def read_vectors(
    fs: pafs.FileSystem, path: str, dim: int | None = None
) -> tuple[pa.Array, np.ndarray]:
    """One shard's ids (string, n) and vectors (n, d) float32.

    Raises:
        ValueError: the shard's vectors are not all of length ``dim`` (when given).
    """
    table = pq.read_table(path, columns=["id", "vector"], filesystem=fs)
    ids = table.column("id").combine_chunks()
    vectors = from_arrow(table.column("vector"))
    if len(ids) and dim is not None and vectors.shape[1] != dim:
        raise ValueError(f"{path}: vectors of length {vectors.shape[1]}, expected {dim}")
    return ids, vectors.reshape(len(ids), -1) if len(ids) else np.zeros((0, dim or 0), np.float32)


def unusable_rows(vectors: np.ndarray) -> np.ndarray:
    """bool (n,): rows of ``vectors`` (n, d) that hold NaN or inf, or are all zero."""
    if vectors.shape[0] == 0:
        return np.zeros(0, bool)
    # The row maximum of |x| is NaN if any entry is NaN (max propagates it), inf if any
    # is inf, and 0 only for an all-zero row: one pass instead of three.
    peak = np.abs(vectors).max(axis=1, initial=0)
    return ~(np.isfinite(peak) & (peak > 0))
