"""The warm-up selection of ``vlselect progress``, wired on Ray Data.

``select_warmup_ids`` streams the pool's shards through ``actors.warmup``: each shard's
combined features joined with its warm-up cluster, a shuffle by cluster, and one task
per cluster for its density and prototype order. The orders stay in the object store;
the driver reads each cluster's size and density, scores the clusters (transferability
over density, from the centroids), apportions the warm-up count
(``engine.warmup.cluster_quotas``), and reads back only each order's head up to its
quota: what reaches the driver is K figures and the warm-up's ids.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from actors.adapter import ray_data_options
from actors.kmeans import load_centroids
from actors.warmup import order_cluster, shard_cluster_features
from engine.artifacts import Clustering
from engine.embeddings import open_space
from engine.resources import Resources
from engine.shards import stem
from engine.warmup import cluster_quotas, warmup_scores
from engine.workspace import Workspace
from jobs.runtime import cluster_cpus


def select_warmup_ids(cfg, ws: Workspace, total: int) -> list[str]:
    """``total`` pool ids chosen by COINCIDE's selector over ``cfg.warmup_clusters``."""
    clustering = Clustering.open(ws, cfg.warmup_clusters)
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
            "limit": total,
            "sigma": cfg.warmup_sigma,
            "max_kernel_rows": cfg.max_kernel_rows,
            "seed": cfg.seed,
        },
    )
    # The orders stay in the object store: every cluster's whole order is about one id per
    # pool row, and only the quotas' heads (the warm-up) come to the driver.
    groups = groups.materialize()
    figures = groups.select_columns(["cluster", "size", "density"]).to_pandas()
    centroids = load_centroids(ws, clustering.path("centroids.npy"))
    k = centroids.shape[0]
    sizes, density = np.zeros(k, np.int64), np.zeros(k)
    clusters = figures["cluster"].to_numpy(np.int64)
    sizes[clusters], density[clusters] = figures["size"], figures["density"]
    quotas = cluster_quotas(warmup_scores(centroids, density), sizes, total, cfg.warmup_temperature)
    heads = groups.map_batches(
        _heads, fn_kwargs={"quotas": quotas}, batch_format="pyarrow", batch_size=None
    )
    taken: dict[int, list[str]] = {}
    for batch in heads.iter_batches(batch_format="pyarrow", batch_size=None):
        for c, ids in zip(batch["cluster"].to_pylist(), batch["ids"].to_pylist(), strict=True):
            taken[c] = ids
    return [i for c in sorted(taken) for i in taken[c]]


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
