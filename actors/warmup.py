"""The warm-up selection's Ray Data stages: per-shard features with their warm-up
cluster, then one task per cluster for its density and prototype order.

The pipeline (wired by ``jobs.progress``) is ``from_items(shard stems)`` ->
``map_batches(shard_cluster_features)`` -> ``groupby("cluster").map_groups(order_cluster)``,
so a million rows are spread over the cluster by Ray Data's shuffle and no process
holds more than one cluster's features. Each cluster's result (its size, density and
the ids in the order they would be taken) stays in the object store; the driver reads
the sizes and densities, then only the head of each order that its quota takes.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.features import shard_features
from engine.warmup import cluster_order, cluster_rng
from engine.workspace import Workspace


def shard_cluster_features(
    batch: dict[str, np.ndarray],
    ws: Workspace,
    space_dirs: dict[str, str],
    dims: dict[str, int],
    weights: dict[str, float],
    assignments_dir: str,
) -> dict[str, np.ndarray]:
    """For each shard stem in ``batch``: its usable rows' ids, warm-up cluster and combined
    feature float32 (n, D), joined by id with ``<assignments_dir>/<stem>.parquet``."""
    ids, clusters, features = [], [], []
    for stem in batch["stem"]:
        files = {s: f"{d}/{stem}.parquet" for s, d in space_dirs.items()}
        found = shard_features(ws.fs, files, dims, weights)
        table = pq.read_table(
            f"{assignments_dir}/{stem}.parquet", columns=["id", "cluster"], filesystem=ws.fs
        )
        where = pc.index_in(found.ids, value_set=table.column("id"))
        keep = where.is_valid().to_numpy(zero_copy_only=False)  # rows the clustering left out
        rows = where.filter(pa.array(keep)).to_numpy().astype(np.int64)
        ids.append(np.asarray(found.ids.filter(pa.array(keep)).to_pylist(), dtype=object))
        clusters.append(table.column("cluster").to_numpy()[rows].astype(np.int32))
        features.append(found.features[keep])
    dim = sum(dims.values())
    return {
        "id": np.concatenate(ids) if ids else np.empty(0, object),
        "cluster": np.concatenate(clusters) if clusters else np.empty(0, np.int32),
        "feature": np.concatenate(features) if features else np.empty((0, dim), np.float32),
    }


def order_cluster(
    group: dict[str, np.ndarray], limit: int, sigma: float, max_kernel_rows: int, seed: int
) -> pa.Table:
    """One warm-up cluster: its size, density and ids in the order they are taken."""
    cluster = int(group["cluster"][0])
    rng = cluster_rng(seed, cluster)
    # Ray Data hands a group's rows in no set order: sort by id so the result is seeded.
    order_by_id = np.argsort(group["id"].astype(str), kind="stable")
    ids = group["id"][order_by_id]
    features = np.asarray(group["feature"], np.float32)[order_by_id]
    density, order = cluster_order(features, limit, sigma, max_kernel_rows, rng)
    return pa.table(
        {
            "cluster": pa.array([cluster], pa.int64()),
            "size": pa.array([len(ids)], pa.int64()),
            "density": pa.array([density], pa.float64()),
            "order": pa.array([ids[order].astype(str).tolist()], pa.list_(pa.string())),
        }
    )
