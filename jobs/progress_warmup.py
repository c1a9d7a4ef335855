"""The warm-up selection of ``vlselect progress``, wired on Ray Data.

``select_warmup_ids`` streams the pool's shards through ``actors.warmup``: each shard's
combined features joined with its warm-up cluster, a shuffle by cluster, and one task
per cluster for its density and prototype order. The orders stay in the object store;
the driver reads each cluster's size and density, scores the clusters (transferability
over density, from the centroids), apportions the warm-up count
(``engine.warmup.cluster_quotas``), and reads back only each order's head up to its
quota: what reaches the driver is K figures and the warm-up's ids.

``write_diversity`` runs the same pipeline on the progress clustering with no limit, for
rule ``within: uncertainty`` (``engine.within``): the Ray Data tasks write every row's
place in its cluster's order, and the coordinator reads it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from actors.adapter import ray_data_options
from actors.kmeans import load_centroids
from actors.warmup import order_cluster, shard_cluster_features
from engine.artifacts import Clustering
from engine.embeddings import open_space
from engine.resources import Resources
from engine.shards import stem
from engine.warmup import cluster_quotas, warmup_scores
from engine.within import DIVERSITY_MARKER
from engine.workspace import Workspace
from jobs.runtime import cluster_cpus


def cluster_orders(cfg, ws: Workspace, clustering: Clustering, limit: int) -> ray.data.Dataset:
    """One row per cluster of ``clustering``: its size, density and its ids in greedy MMD
    prototype order (at most ``limit``), materialized in the object store."""
    meta = clustering.meta
    spaces = [open_space(ws, s) for s in meta.spaces]
    weights = meta.weights
    stems = [stem(f) for f in clustering.assignments]
    ds = ray.data.from_items([{"stem": s} for s in stems], override_num_blocks=len(stems))
    ds = ds.map_batches(
        shard_cluster_features,
        batch_size=1,
        fn_kwargs={
            "ws": ws,
            "space_dirs": {s.space: s.dir for s in spaces},
            "dims": {s.space: s.dim for s in spaces},
            "weights": {s.space: float(weights[s.space]) for s in spaces},
            "assignments_dir": clustering.path("assignments"),
        },
        **ray_data_options(Resources(num_cpus=0.5)),
    )
    # Ray Data's default of 200 shuffle partitions costs seconds of task overhead on a
    # small pool; a few per CPU keeps every core busy at any size.
    partitions = max(1, min(meta.k, 4 * cluster_cpus()))
    groups = ds.groupby("cluster", num_partitions=partitions).map_groups(
        order_cluster,
        batch_format="numpy",
        fn_kwargs={
            "limit": limit,
            "sigma": cfg.warmup_sigma,
            "max_kernel_rows": cfg.max_kernel_rows,
            "seed": cfg.seed,
        },
    )
    return groups.materialize()


def select_warmup_ids(cfg, ws: Workspace, total: int) -> list[str]:
    """``total`` pool ids chosen by COINCIDE's selector over ``cfg.warmup_clusters``."""
    clustering = Clustering.open(ws, cfg.warmup_clusters)
    groups = cluster_orders(cfg, ws, clustering, total)
    # The orders stay in the object store: every cluster's whole order is about one id per
    # pool row, and only the quotas' heads (the warm-up) come to the driver.
    figures = _arrow(groups.select_columns(["cluster", "size", "density"]))
    centroids = load_centroids(ws, clustering.path("centroids.npy"))
    k = centroids.shape[0]
    sizes, density = np.zeros(k, np.int64), np.zeros(k)
    clusters = figures["cluster"].to_numpy().astype(np.int64)
    sizes[clusters] = figures["size"].to_numpy()
    density[clusters] = figures["density"].to_numpy()
    quotas = cluster_quotas(warmup_scores(centroids, density), sizes, total, cfg.warmup_temperature)
    heads = groups.map_batches(
        _heads, fn_kwargs={"quotas": quotas}, batch_format="pyarrow", batch_size=None
    )
    taken: dict[int, list[str]] = {}
    for batch in heads.iter_batches(batch_format="pyarrow", batch_size=None):
        for c, ids in zip(batch["cluster"].to_pylist(), batch["ids"].to_pylist(), strict=True):
            taken[c] = ids
    return [i for c in sorted(taken) for i in taken[c]]


def _arrow(ds: ray.data.Dataset) -> pa.Table:
    """A small dataset (a row per cluster or per part) as one Arrow table in the driver
    (``to_pandas`` would go through pandas blocks, which warn on today's pandas)."""
    return pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))


def _heads(batch: pa.Table, quotas: np.ndarray) -> pa.Table:
    """Each cluster's first ``quotas[cluster]`` ids of its order; clusters with none left out."""
    clusters = batch.column("cluster").to_numpy().astype(np.int64)
    keep = quotas[clusters] > 0
    ids = [
        order[: int(quotas[c])]
        for c, order, kept in zip(clusters, batch.column("order").to_pylist(), keep, strict=True)
        if kept
    ]
    return pa.table({"cluster": clusters[keep], "ids": pa.array(ids, pa.list_(pa.string()))})


def write_diversity(cfg, ws: Workspace, clustering: Clustering, folder: str) -> dict:
    """Every clustered row's place in its cluster's prototype order (``engine.within``),
    written to ``folder`` as Parquet parts (id string, rank int32) by the Ray Data tasks
    themselves (no id reaches the driver), then ``folder/diversity.json`` naming the
    parts, written last: a reader that finds it finds every part. Returns its content."""
    groups = cluster_orders(cfg, ws, clustering, clustering.meta.rows_assigned)
    parts = _arrow(groups.map_batches(_write_ranks, fn_kwargs={"ws": ws, "folder": folder},
                                      batch_format="pyarrow", batch_size=None))  # fmt: skip
    marker = {"parts": sorted(parts["path"].to_pylist()),
              "rows": int(pc.sum(parts["rows"]).as_py() or 0)}  # fmt: skip
    if marker["rows"] != clustering.meta.rows_assigned:
        raise RuntimeError(
            f"the prototype orders hold {marker['rows']} rows but the clustering "
            f"{clustering.name!r} assigned {clustering.meta.rows_assigned}"
        )
    ws.write_json(f"{folder}/{DIVERSITY_MARKER}", marker)
    return marker


def _write_ranks(batch: pa.Table, ws: Workspace, folder: str) -> pa.Table:
    """One Parquet part of (id, rank) for the clusters in ``batch``; its path and rows."""
    orders = batch.column("order").to_pylist()
    ids = [i for order in orders for i in order]
    ranks = np.concatenate([np.arange(len(o), dtype=np.int32) for o in orders] or [[]])
    first = int(batch.column("cluster")[0].as_py()) if batch.num_rows else -1
    path = f"{folder}/part-{first:06d}.parquet"
    ws.write_table(path, pa.table({"id": pa.array(ids, pa.string()),
                                   "rank": pa.array(ranks, pa.int32())}))  # fmt: skip
    return pa.table({"path": [path], "rows": pa.array([len(ids)], pa.int64())})
