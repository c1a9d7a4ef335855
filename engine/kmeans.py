"""Spherical k-means with faiss: a seeded training sample, the fit, and nearest-centroid assignment.

The fit runs on a sample of at most ``k * max_points_per_centroid`` rows (faiss's
own rule, applied before the rows are read so that a million rows never need to be
in one process); assignment then streams every row past the centroids. Centroids are
unit vectors and the objective is the sum of the sample's cosine similarities to
their centroids (higher is better), one value per iteration.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from engine.workspace import Workspace

log = logging.getLogger("vlselect.kmeans")


INIT_METHODS = {
    "random": faiss.ClusteringInitMethod_RANDOM,
    "kmeans++": faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
    "afk-mc2": faiss.ClusteringInitMethod_AFK_MC2,
}


def sample_size(total: int, k: int, max_points_per_centroid: int, cap: int | None = None) -> int:
    """Rows to fit on: all of them, or ``k * max_points_per_centroid`` (and ``cap``) if fewer."""
    n = min(total, k * max_points_per_centroid)
    return min(n, cap) if cap else n


def sample_positions(total: int, n: int, seed: int) -> np.ndarray:
    """``n`` distinct row positions in ``[0, total)``, sorted, int64 (n,); the same for a seed."""
    if n >= total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=n, replace=False)).astype(np.int64)


def split_positions(positions: np.ndarray, rows_per_shard: list[int]) -> list[np.ndarray]:
    """Global row positions (sorted int64) -> one array of local positions per shard."""
    bounds = np.concatenate([[0], np.cumsum(rows_per_shard)]).astype(np.int64)
    cuts = np.searchsorted(positions, bounds)
    return [positions[cuts[i] : cuts[i + 1]] - bounds[i] for i in range(len(rows_per_shard))]


@dataclass
class KMeansFit:
    """``centroids`` float32 (k, d) unit rows; ``objective`` per iteration of the kept fit."""

    centroids: np.ndarray
    objective: list[float]
    iterations: list[dict] = field(default_factory=list)
    runs: list[list[float]] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"


def use_gpu(requested: bool) -> bool:
    """Whether the fit and assignment run on GPUs: asked for, and faiss sees one."""
    if not requested:
        return False
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpus == 0:
        raise RuntimeError(
            "gpu=true but faiss sees no GPU on this node: install faiss-gpu (the 'gpu' extra) "
            "and give the task num_gpus, or set gpu=false"
        )
    return True


def train_spherical(
    x: np.ndarray,
    k: int,
    *,
    niter: int = 50,
    seed: int = 0,
    nredo: int = 1,
    init: str = "random",
    max_points_per_centroid: int = 256,
    min_points_per_centroid: int = 39,
    gpu: bool = False,
    verbose: bool = False,
) -> KMeansFit:
    """Fit ``k`` unit centroids to the rows of ``x`` (n, d) float32 (unit rows expected).

    ``init``: ``random`` (faiss's default, as the PROGRESS code), ``kmeans++`` (better
    starts, one sequential pass per centroid), or ``afk-mc2`` (an approximation of it).
    ``nredo`` fits with seeds ``seed, seed+1, ...`` and keeps the highest final objective;
    ``runs`` holds every fit's objective curve. faiss stops a fit early once its
    objective no longer changes, so a curve can be shorter than ``niter``.

    faiss splits empty clusters during training (``nsplit`` in ``iterations``), so every
    centroid ends the fit with members of the sample.

    Raises:
        ValueError: fewer rows than clusters.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if k < 1 or n < k:
        raise ValueError(f"k-means needs at least k={k} rows to fit; got {n}")
    if n < k * min_points_per_centroid:
        log.warning(
            "fitting %d clusters on %d rows (%.1f per cluster; faiss advises >= %d)",
            k,
            n,
            n / k,
            min_points_per_centroid,
        )
    gpu = use_gpu(gpu)
    start = time.perf_counter()
    best, runs = None, []
    # nredo by hand, not faiss's: faiss concatenates every run's statistics into one list,
    # and the meta should show the objective curve of the fit that was kept.
    for run in range(nredo):
        kmeans = faiss.Kmeans(
            d,
            k,
            niter=niter,
            seed=seed + run,
            spherical=True,
            init_method=INIT_METHODS[init],
            max_points_per_centroid=max_points_per_centroid,
            min_points_per_centroid=min_points_per_centroid,
            gpu=gpu,
            verbose=verbose,
        )
        kmeans.train(x)
        runs.append([float(v) for v in kmeans.obj])
        if best is None or runs[-1][-1] > best.obj[-1]:
            best = kmeans
    return KMeansFit(
        centroids=np.ascontiguousarray(best.centroids, dtype=np.float32),
        objective=[float(v) for v in best.obj],
        iterations=best.iteration_stats,
        runs=runs,
        seconds=time.perf_counter() - start,
        device="gpu" if gpu else "cpu",
    )


class CentroidIndex:
    """Exact nearest-centroid search (inner product on unit vectors = cosine)."""

    def __init__(self, centroids: np.ndarray, gpu: bool = False):
        """``centroids`` float32 (k, d)."""
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.k, self.d = centroids.shape
        index = faiss.IndexFlatIP(self.d)
        index.add(centroids)
        if use_gpu(gpu):
            self._gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
        self.index = index

    def assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``x`` (n, d) float32 -> (cluster int32 (n,), cosine similarity float32 (n,))."""
        if len(x) == 0:
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        sims, labels = self.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
        return labels[:, 0].astype(np.int32), sims[:, 0].astype(np.float32)


def small_clusters(sizes: np.ndarray, min_size: int) -> np.ndarray:
    """Cluster numbers (int64) whose size (int (k,)) is below ``min_size``: empty ones too."""
    return np.flatnonzero(np.asarray(sizes) < min_size)


def assignment_files(ws: Workspace, out_dir: str) -> list[str]:
    """The finished per-shard assignment files of the clustering at ``out_dir``."""
    return ws.list_files(out_dir, "assignments", suffix=".parquet")


def _assignment_batches(ws: Workspace, out_dir: str, column: str):
    """One column of every assignment file, streamed in record batches: files are read
    ahead on Arrow's threads (hundreds of small files), and memory stays a few batches."""
    files = assignment_files(ws, out_dir)
    if not files:
        return
    dataset = pads.dataset(files, filesystem=ws.fs, format="parquet")
    for batch in dataset.to_batches(columns=[column]):
        yield batch.column(0)


def cluster_sizes(ws: Workspace, out_dir: str, k: int) -> np.ndarray:
    """Rows per cluster, int64 (k,), from the assignment files (one int32 column read)."""
    sizes = np.zeros(k, dtype=np.int64)
    for labels in _assignment_batches(ws, out_dir, "cluster"):
        sizes += np.bincount(labels.to_numpy(), minlength=k)[:k]
    return sizes


def describe_assignments(
    ws: Workspace,
    out_dir: str,
    sizes: np.ndarray,
    small: np.ndarray,
    min_cluster_size: int,
    policy: str,
) -> dict:
    """Counts of the finished clustering at ``out_dir`` for its meta: rows assigned
    and excluded, sizes (int64 (k,)) and their spread, mean similarity to the centroid,
    empty and ``small`` clusters (int (m,)) under ``policy``."""
    excluded = sum(
        pq.ParquetFile(f, filesystem=ws.fs).metadata.num_rows
        for f in ws.list_files(out_dir, "excluded", suffix=".parquet")
    )
    similarity = [
        float(pc.sum(column.cast(pa.float64())).as_py() or 0.0)
        for column in _assignment_batches(ws, out_dir, "similarity")
    ]
    assigned = int(sizes.sum())
    return {
        "rows_assigned": assigned,
        "rows_excluded": int(excluded),
        "sizes": sizes.tolist(),
        "size_stats": {
            "min": int(sizes.min()),
            "median": float(np.median(sizes)),
            "max": int(sizes.max()),
        },
        "mean_similarity": float(sum(similarity) / assigned) if assigned else None,
        "small_clusters": {
            "min_cluster_size": min_cluster_size,
            "policy": policy,
            "empty": np.flatnonzero(sizes == 0).tolist(),
            "small": small.tolist(),
        },
    }
