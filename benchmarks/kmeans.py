"""Clustering benchmark: ``vlselect cluster`` against faiss called directly and scikit-learn.

Case ``compare`` (default 200k rows of dino 1024-d + text 384-d = 1408-d, K=1000, 50
iterations): the same workspace is clustered three ways on the same cores:
  * ``job``: ``vlselect cluster`` end to end (Ray: read and validate every shard, fit
    on the seeded sample in a task, assign every row (in the fit's task when the sample
    is the whole pool, else with the actor pool), write);
  * ``faiss``: the combined features already in memory, ``faiss.Kmeans(spherical=True)``
    on the same sample with the same seed and iterations, then every row assigned with
    an exact inner-product search: the reference (it skips reading and writing).
    ``load_s`` is what loading those features from the workspace's Parquet takes in
    one process, which calling faiss directly on the workspace needs first:
    ``vs_faiss_with_load`` = job / (faiss + load), ``vs_faiss`` = job / faiss;
  * ``sklearn``: ``KMeans(algorithm="lloyd", init="random", n_init=1, tol=0)`` on the
    same sample and iterations, threads limited to the same cores.
Objective, for all three: the sample's mean cosine similarity to its nearest
(normalised) centroid after the fit, computed by the same code.

Case ``million`` (default 1M rows, K=1000): the whole job on a generated workspace;
time per phase and peak RSS (driver, and driver plus every Ray process; shared memory
of the object store is counted in each process that maps it, so the total overstates).

    python benchmarks/kmeans.py --rows 200000 --k 1000 --million 1000000 \\
        --out benchmarks/results/kmeans.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.kmeans import load_centroids  # noqa: E402
from benchmarks.common import PeakRSS, report  # noqa: E402
from benchmarks.references import clustering_figures, space_features  # noqa: E402
from engine.artifacts import Clustering, EmbeddingSpace  # noqa: E402
from engine.kmeans import CentroidIndex, sample_positions, sample_size  # noqa: E402
from engine.vectors import l2_normalize, to_arrow  # noqa: E402
from engine.workspace import Workspace, write_table_atomic  # noqa: E402
from tests.synthetic_space import synthetic_meta  # noqa: E402

CPUS = os.cpu_count() or 2
SHARD_ROWS = 20_000
DIMS = {"dino": 1024, "text": 384}


def generate(ws: Workspace, rows: int, centres: int, seed: int) -> None:
    """Commit ``rows`` samples as the dino and text spaces, shard by shard (bounded memory).

    Both spaces follow one latent cluster label per row, so the combined space has
    structure for k-means to find (random vectors would make the objective flat).
    """
    rng = np.random.default_rng(seed)
    means = {s: l2_normalize(rng.standard_normal((centres, d))) for s, d in DIMS.items()}
    made_of = {"rows": rows, "centres": centres, "seed": seed, "shard_rows": SHARD_ROWS}
    attempts = {
        space: EmbeddingSpace.begin(
            ws, space, synthetic="benchmarks.kmeans", dim=d, overwrite=True, **made_of
        ).attempt
        for space, d in DIMS.items()
    }
    shards = 0
    for i, start in enumerate(range(0, rows, SHARD_ROWS)):
        n = min(SHARD_ROWS, rows - start)
        labels = rng.integers(0, centres, n)
        ids = pa.array([f"s{j:08d}" for j in range(start, start + n)], pa.string())
        for space, d in DIMS.items():
            noise = rng.standard_normal((n, d), dtype=np.float32) * (0.6 / np.sqrt(d))
            vectors = l2_normalize(means[space][labels] + noise)
            table = pa.table({"id": ids, "vector": to_arrow(vectors)})
            write_table_atomic(ws.fs, attempts[space].path(f"part-{i:06d}.parquet"), table)
        shards += 1
    for space, d in DIMS.items():
        attempts[space].commit(synthetic_meta(space, d, rows, shards, f"seed {seed}"))


def load_features(ws: Workspace) -> np.ndarray:
    """Every row's combined feature, float32 (n, 1408), as the job computes it."""
    return space_features(ws, list(DIMS))


def mean_cosine(sample: np.ndarray, centroids: np.ndarray) -> float:
    _, similarity = CentroidIndex(l2_normalize(centroids)).assign(sample)
    return float(similarity.mean())


def run_job(ws: Workspace, name: str, k: int, niter: int, seed: int) -> tuple[dict, float, PeakRSS]:
    from jobs.cli import main as cli

    flags = [
        *("--set", f"niter={niter}", "--set", f"fit_threads={CPUS}"),
        *("--set", "assign.num_cpus=0.5"),
    ]
    start = time.perf_counter()
    with PeakRSS() as peak:
        code = cli(
            ["cluster", "--workspace", ws.root, "--name", name, "--k", str(k), "--seed", str(seed)]
            + flags
        )
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"vlselect cluster failed with exit code {code}")
    return clustering_figures(Clustering.open(ws, name)), seconds, peak


def compare(ws: Workspace, rows: int, k: int, niter: int, seed: int, sklearn: bool) -> list[dict]:
    import faiss

    meta, job_seconds, peak = run_job(ws, "bench", k, niter, seed)
    start = time.perf_counter()
    x = load_features(ws)  # what calling faiss on the workspace's Parquet needs first
    load_seconds = time.perf_counter() - start
    positions = sample_positions(len(x), sample_size(len(x), k, 256), seed)
    sample = np.ascontiguousarray(x[positions])
    job_centroids = load_centroids(ws, Clustering.open(ws, "bench").path("centroids.npy"))
    out = [
        {
            "case": f"{rows // 1000}k x {x.shape[1]}, K={k}",
            "method": "vlselect cluster (Ray job)",
            "seconds": round(job_seconds, 1),
            "fit_s": meta["fit_seconds"],
            "iterations": len(meta["objective"]),
            "objective": round(mean_cosine(sample, job_centroids), 5),
            "peak_rss_gib": round(peak.total / 2**30, 2),
        }
    ]
    faiss.omp_set_num_threads(CPUS)
    start = time.perf_counter()
    kmeans = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True)
    kmeans.train(sample)
    fit_seconds = time.perf_counter() - start
    CentroidIndex(kmeans.centroids).assign(x)
    direct_seconds = time.perf_counter() - start
    out.append(
        {
            "case": out[0]["case"],
            "method": "faiss.Kmeans directly (fit + assign, data in memory)",
            "seconds": round(direct_seconds, 1),
            "fit_s": round(fit_seconds, 1),
            "iterations": len(kmeans.obj),
            "objective": round(mean_cosine(sample, kmeans.centroids), 5),
        }
    )
    if sklearn:
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits

        with threadpool_limits(CPUS):
            start = time.perf_counter()
            model = KMeans(
                k, init="random", n_init=1, max_iter=niter, tol=0.0, random_state=seed
            ).fit(sample)
            sk_fit = time.perf_counter() - start
        out.append(
            {
                "case": out[0]["case"],
                "method": "scikit-learn KMeans (Lloyd, fit only)",
                "seconds": round(sk_fit, 1),
                "fit_s": round(sk_fit, 1),
                "iterations": int(model.n_iter_),
                "objective": round(mean_cosine(sample, model.cluster_centers_), 5),
            }
        )
    out[1]["load_s"] = round(load_seconds, 1)
    for r in out:
        r["vs_faiss"] = round(r["seconds"] / direct_seconds, 3)
    # The job reads the Parquet shards itself; faiss called directly must load them too.
    out[0]["vs_faiss_with_load"] = round(job_seconds / (direct_seconds + load_seconds), 3)
    return out


def million(ws: Workspace, rows: int, k: int, niter: int, seed: int) -> dict:
    meta, seconds, peak = run_job(ws, "million", k, niter, seed)
    return {
        "case": f"{rows // 1000}k x 1408, K={k}",
        "method": "vlselect cluster (whole job)",
        "seconds": round(seconds, 1),
        "read_s": meta["read_seconds"],
        "fit_s": meta["fit_seconds"],
        "assign_s": meta["assign_seconds"],
        "sample_rows": meta["sample_rows"],
        "iterations": len(meta["objective"]),
        "peak_rss_driver_gib": round(peak.driver / 2**30, 2),
        "peak_rss_total_gib": round(peak.total / 2**30, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the compare case")
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--niter", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--million", type=int, default=1_000_000, help="0 skips the case")
    parser.add_argument("--no-sklearn", action="store_true")
    parser.add_argument("--work", default="/tmp/vlselect-bench-kmeans")
    parser.add_argument("--out", default="benchmarks/results/kmeans.json")
    args = parser.parse_args()

    import ray

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
    rows = []
    ws = Workspace.open(str(work / "compare"))
    generate(ws, args.rows, centres=4 * args.k, seed=args.seed)
    rows += compare(ws, args.rows, args.k, args.niter, args.seed, not args.no_sklearn)
    shutil.rmtree(ws.root)
    if args.million:
        ws = Workspace.open(str(work / "million"))
        start = time.perf_counter()
        generate(ws, args.million, centres=4 * args.k, seed=args.seed)
        print(f"generated {args.million} rows in {time.perf_counter() - start:.0f} s")
        rows.append(million(ws, args.million, args.k, args.niter, args.seed))
        shutil.rmtree(ws.root)
    ray.shutdown()
    header = ["case", "method", "seconds", "vs_faiss", "vs_faiss_with_load", "load_s"]
    header += ["fit_s", "iterations", "objective"]
    header += ["read_s", "assign_s", "peak_rss_driver_gib", "peak_rss_total_gib"]
    report("kmeans", rows, header, args.out, cpus=CPUS, niter=args.niter)


if __name__ == "__main__":
    main()
