"""The clustering stage's workers: per-shard feature sampling (a task) and the assignment pool."""

from __future__ import annotations

import io
import logging

import faiss
import numpy as np
import pyarrow as pa

from engine.features import shard_features
from engine.kmeans import CentroidIndex
from engine.workspace import Workspace

log = logging.getLogger("vlselect.cluster")


def load_centroids(ws: Workspace, path: str) -> np.ndarray:
    """float32 (k, d) from a ``.npy`` in the workspace (no pickle allowed)."""
    with ws.fs.open_input_stream(path) as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


def save_centroids(ws: Workspace, path: str, centroids: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(centroids, dtype=np.float32), allow_pickle=False)
    ws.write_bytes(path, buf.getvalue())


def write_shard_assignments(
    ws: Workspace,
    out_dir: str,
    stem: str,
    ids: pa.Array,
    cluster: np.ndarray,
    similarity: np.ndarray,
    rejected: pa.Table,
) -> None:
    """``<out>/excluded/<stem>.parquet`` (id, reason) if any rows were left out, then
    ``<out>/assignments/<stem>.parquet`` (id, cluster int32, similarity float32), each
    atomically: the assignments file is the shard's completion marker, so it goes last."""
    excluded_path = f"{out_dir}/excluded/{stem}.parquet"
    if rejected.num_rows:
        ws.write_table(excluded_path, rejected)
    else:
        ws.discard(excluded_path)  # left by an earlier pass over other centroids
    table = pa.table(
        {
            "id": ids,
            "cluster": pa.array(cluster, pa.int32()),
            "similarity": pa.array(similarity, pa.float32()),
        }
    )
    ws.write_table(f"{out_dir}/assignments/{stem}.parquet", table)


class CentroidAssigner:
    """A Ray Data callable class: one batch = one shard stem; writes that shard's assignments.

    The centroids load once per actor, from ``centroids_path`` in the workspace, into an
    exact inner-product index (on the GPU when ``gpu``). Each call reads the shard of
    every space, joins them by id, assigns the usable rows, and writes
    ``<out>/assignments/<stem>.parquet`` (id, cluster int32, similarity float32) and,
    if any, ``<out>/excluded/<stem>.parquet`` (id, reason), each atomically: the
    assignments file is the shard's completion marker, so it is written last.
    """

    def __init__(
        self,
        ws: Workspace,
        out_dir: str,
        space_dirs: dict[str, str],
        dims: dict[str, int],
        weights: dict[str, float],
        threads: int,
        gpu: bool = False,
    ):
        faiss.omp_set_num_threads(max(1, threads))
        self.ws, self.out_dir = ws, out_dir
        self.space_dirs, self.dims, self.weights = space_dirs, dims, weights
        self.index = CentroidIndex(load_centroids(ws, f"{out_dir}/centroids.npy"), gpu=gpu)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stems = list(batch["stem"])
        rows, excluded = [], []
        for shard in stems:
            files = {s: f"{d}/{shard}.parquet" for s, d in self.space_dirs.items()}
            found = shard_features(self.ws.fs, files, self.dims, self.weights)
            cluster, similarity = self.index.assign(found.features)
            write_shard_assignments(
                self.ws, self.out_dir, shard, found.ids, cluster, similarity, found.rejected
            )
            rows.append(len(found.ids))
            excluded.append(found.rejected.num_rows)
        return {
            "stem": np.array(stems, dtype=object),
            "rows": np.array(rows),
            "excluded": np.array(excluded),
        }


def sample_shard(
    ws: Workspace,
    stem: str,
    files: dict[str, str],
    dims: dict[str, int],
    weights: dict[str, float],
    positions: np.ndarray,
    keep_rows: bool = False,
) -> tuple[dict, np.ndarray]:
    """Validate one shard and return (its rejection counts and rows, features at ``positions``).

    ``positions`` are int64 row numbers among the shard's *usable* rows; the features
    returned are float32 (len(positions), D). ``keep_rows`` (when every row is in the
    sample) adds the usable ids and the rejected rows to the stats, so the fit can
    write the assignments without a second pass.
    """
    try:
        found = shard_features(ws.fs, files, dims, weights)
    except ValueError as err:  # a malformed shard: the driver refuses the run, naming it
        return {"stem": stem, "error": str(err)}, np.zeros((0, sum(dims.values())), np.float32)
    stats = {
        "stem": stem,
        "rows_in": found.rows_in,
        "usable": len(found.ids),
        "reasons": found.reason_counts(),
        "examples": found.rejected.column("id").slice(0, 5).to_pylist(),
    }
    if keep_rows:
        stats["ids"], stats["rejected"] = found.ids, found.rejected
    positions = positions[positions < len(found.ids)]
    return stats, np.ascontiguousarray(found.features[positions])


def sample_shards(
    ws: Workspace,
    run: list[tuple[str, dict[str, str], np.ndarray]],
    dims: dict[str, int],
    weights: dict[str, float],
    keep_rows: bool = False,
) -> tuple[list[dict], np.ndarray]:
    """``sample_shard`` over a run of (stem, files, positions): the shards' stats, and
    their sampled features float32 (sum of positions, D) concatenated in run order."""
    found = [sample_shard(ws, stem, files, dims, weights, at, keep_rows) for stem, files, at in run]
    return [stats for stats, _ in found], np.concatenate([features for _, features in found])
