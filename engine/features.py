"""Clustering features: several embedding spaces of the same samples joined into one vector.

The PROGRESS reference concatenates raw DINO and MiniLM vectors and
normalises once, so the larger norm dominates. Here each space is L2-normalised
first, scaled by ``sqrt(w_i / sum(w))``, concatenated, and normalised again, which
makes the cosine of two combined vectors the weighted mean of the spaces' cosines:

    cos(x, y) = sum_i w_i * cos_i(x_i, y_i) / sum_i w_i

(exactly, when every part is non-zero; the final normalisation only matters then for
rounding). Equal weights give each space the same say whatever its dimension.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from engine.embeddings import read_vectors, unusable_rows
from engine.vectors import row_norms


def combine_spaces(parts: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Join per-space vectors of the same rows into one unit vector per row.

    Args:
        parts: one float (n, d_i) array per space, rows aligned.
        weights: one positive weight per space (their scale does not matter).
    Returns:
        float32 (n, sum(d_i)), L2-normalised rows.
    Raises:
        ValueError: counts of parts and weights differ, rows differ, or a weight <= 0.
    """
    if len(parts) != len(weights) or not parts:
        raise ValueError(f"{len(parts)} spaces but {len(weights)} weights")
    if any(w <= 0 for w in weights):
        raise ValueError(f"weights must be positive; got {list(weights)}")
    if len({p.shape[0] for p in parts}) != 1:
        raise ValueError(f"spaces hold different row counts: {[p.shape[0] for p in parts]}")
    total = float(sum(weights))
    n = parts[0].shape[0]
    out = np.empty((n, sum(p.shape[1] for p in parts)), np.float32)
    start = 0
    # Each part goes straight into its columns of the output, normalised and scaled in
    # one multiply: no per-space copies and no concatenation.
    for p, w in zip(parts, weights, strict=True):
        p = np.asarray(p, np.float32)
        scale = np.float32(np.sqrt(w / total)) / np.maximum(row_norms(p), np.float32(1e-12))
        np.multiply(p, scale[:, None], out=out[:, start : start + p.shape[1]])
        start += p.shape[1]
    # Rows with every part non-zero already have unit norm (up to rounding); only rows
    # with a zero part need the final normalisation.
    norms = row_norms(out)
    off = np.flatnonzero(np.abs(norms - 1) > 1e-5)
    if off.size:
        out[off] /= np.maximum(norms[off], np.float32(1e-12))[:, None]
    return out


@dataclass
class ShardFeatures:
    """One shard's usable rows and the rows left out, with their reasons.

    ``ids`` string (n,), ``features`` float32 (n, D); ``rejected`` a table (id, reason).
    ``rows_in`` = n + rejected rows: every id seen in any space, once.
    """

    ids: pa.Array
    features: np.ndarray
    rejected: pa.Table

    @property
    def rows_in(self) -> int:
        return len(self.ids) + self.rejected.num_rows

    def reason_counts(self) -> dict[str, int]:
        if not self.rejected.num_rows:
            return {}
        counts = pc.value_counts(self.rejected.column("reason")).to_pylist()
        return {c["values"]: c["counts"] for c in counts}


def shard_features(
    fs: pafs.FileSystem,
    files: Mapping[str, str],
    dims: Mapping[str, int],
    weights: Mapping[str, float],
) -> ShardFeatures:
    """Read one shard of each space, join by id, and combine the usable rows.

    Args:
        files: space -> that space's Parquet shard (id, vector) for the same samples.
        dims: space -> expected vector length.
        weights: space -> weight in ``combine_spaces``.
    Returns:
        The rows present and usable in every space, in the first space's order, and the
        rest with a reason: ``missing in <space>`` or ``NaN, inf or zero vector in <space>``.
    Raises:
        ValueError: a shard's vectors have the wrong length or an id appears twice.
    """
    spaces = list(files)
    loaded = {s: read_vectors(fs, files[s], dims[s]) for s in spaces}
    for s, (ids, _) in loaded.items():
        if len(pc.unique(ids)) != len(ids):
            raise ValueError(f"{files[s]}: an id appears twice in space {s!r}")
    union = loaded[spaces[0]][0]
    for s in spaces[1:]:
        extra = pc.filter(loaded[s][0], pc.invert(pc.is_in(loaded[s][0], value_set=union)))
        if len(extra):
            union = pa.concat_arrays([union, extra])
    n = len(union)
    reason = np.full(n, None, dtype=object)
    positions = {}
    for s in spaces:
        ids, vectors = loaded[s]
        pos = pc.index_in(union, value_set=ids)
        missing = pos.is_null().to_numpy(zero_copy_only=False)
        reason[missing & (reason == None)] = f"missing in {s}"  # noqa: E711 - elementwise
        pos_np = pos.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        bad = np.zeros(n, dtype=bool)
        if len(ids):
            bad[~missing] = unusable_rows(vectors)[pos_np[~missing]]
        reason[bad & (reason == None)] = f"NaN, inf or zero vector in {s}"  # noqa: E711
        positions[s] = pos_np
    keep = reason == None  # noqa: E711
    identity = np.arange(n)
    parts = []
    for s in spaces:
        vectors, pos = loaded[s][1], positions[s]
        # The common case, every row present and usable in the same order, needs no gather.
        same = keep.all() and len(vectors) == n and np.array_equal(pos, identity)
        parts.append(vectors if same else vectors[pos[keep]])
    dim = sum(dims[s] for s in spaces)
    features = (
        combine_spaces(parts, [weights[s] for s in spaces])
        if keep.any()
        else np.zeros((0, dim), np.float32)
    )
    rejected = pa.table(
        {
            "id": union.filter(pa.array(~keep)),
            "reason": pa.array(reason[~keep].tolist(), pa.string()),
        }
    )
    return ShardFeatures(union.filter(pa.array(keep)), features, rejected)
