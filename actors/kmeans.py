"""The clustering stage's tasks: per-shard feature sampling and nearest-centroid assignment."""

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


def assign_shards(
    ws: Workspace,
    out_dir: str,
    stems: list[str],
    space_dirs: dict[str, str],
    dims: dict[str, int],
    weights: dict[str, float],
    centroids: np.ndarray,
    threads: int,
    gpu: bool = False,
) -> list[tuple[str, int, int]]:
    """One task of the assignment pass: a run of shards against ``centroids`` float32 (K, D).

    Each shard of every space is read, joined by id, and its usable rows assigned to
    their nearest centroid in an exact inner-product index (on the GPU when ``gpu``);
    ``<out>/assignments/<stem>.parquet`` (id, cluster int32, similarity float32) and, if
    any, ``<out>/excluded/<stem>.parquet`` (id, reason) are written atomically, the
    assignments last: they are the shard's completion marker, so a retried task
    rewrites the same files. Returns (stem, rows assigned, rows excluded) per shard.
    """
    faiss.omp_set_num_threads(max(1, threads))
    index = CentroidIndex(centroids, gpu=gpu)
    done = []
    for shard in stems:
        files = {s: f"{d}/{shard}.parquet" for s, d in space_dirs.items()}
        found = shard_features(ws.fs, files, dims, weights)
        cluster, similarity = index.assign(found.features)
        write_shard_assignments(ws, out_dir, shard, found.ids, cluster, similarity, found.rejected)
        done.append((shard, len(found.ids), found.rejected.num_rows))
    return done


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
