"""``vlselect cluster``: spherical k-means of the pool over one or more embedding spaces.

What it does:
    1. checks in the driver that every space in ``--spaces`` is embedded and finished,
       that the spaces are sharded alike, and that K fits the rows (before Ray starts);
    2. reads every shard once in parallel tasks: joins the spaces by id, combines each
       row's vectors (``engine.features``: each space normalised, weighted, concatenated,
       normalised again), counts rows missing from a space or holding NaN/inf/zero
       vectors, and keeps a seeded sample of at most ``k * max_points_per_centroid``
       rows (so a million rows never sit in one process);
    3. refuses the run if any row is unusable and ``on_bad_rows`` is ``error`` (the
       message names each space and count); with ``exclude`` those rows are left out,
       counted, and listed with their reason in ``excluded/``;
    4. fits spherical k-means (faiss, on a GPU when ``gpu``) in one Ray task; when the
       sample is every row (pools up to ``k * max_points_per_centroid``), that task also
       assigns them, and the driver writes the shards' assignments (step 5 finds them done);
    5. assigns every row to its nearest centroid in tasks, each a run of shards, one
       output file per shard (resumable: finished shards are kept when the run is
       started again with the same inputs and config);
    6. handles clusters smaller than ``min_cluster_size``: ``keep`` reports them,
       ``merge`` drops their centroids and assigns their rows again to the others;
    7. commits the clustering (engine.artifacts.Clustering: K, sizes, objective per
       iteration, small clusters and what was done with them) and prints a summary.

Output ``<ws>/clusters/<name>/``: ``assignments/<shard>.parquet`` (id, cluster int32,
similarity float32: the cosine to its centroid), ``centroids.npy`` float32 (K, D),
``excluded/<shard>.parquet`` (id, reason) when rows were left out.

Raises:
    InputError: a space not embedded or unfinished, spaces sharded differently, K larger
        than the usable rows, unusable rows with ``on_bad_rows: error`` (exit 2).
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
import ray
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from actors.adapter import ray_options
from actors.kmeans import (
    assign_shards,
    load_centroids,
    sample_shards,
    save_centroids,
    write_shard_assignments,
)
from engine.artifacts import Clustering, ClusteringMeta, Ref
from engine.commit import operational
from engine.embeddings import SPACES, EmbeddedSpace, open_space
from engine.errors import InputError
from engine.kmeans import (
    CentroidIndex,
    assignment_files,
    cluster_sizes,
    describe_assignments,
    sample_positions,
    sample_size,
    small_clusters,
    split_positions,
    train_spherical,
)
from engine.resources import Resources
from engine.workspace import Workspace
from jobs.runtime import Timer, bounded_submit, cluster_cpus, connect, print_summary

STAGE = "cluster"
DEFAULT_WORKSPACE = None
# Most shards one assignment call takes: a retried call redoes this many.
SHARDS_PER_CALL = 16
log = logging.getLogger("vlselect.cluster")


class ClusterConfig(BaseModel):
    """Configuration of ``vlselect cluster`` (section ``cluster``)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = operational(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Name of the clustering: output goes to <ws>/clusters/<name>/.",
    )
    spaces: list[Literal[SPACES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["dino", "text"],
        description="Embedding spaces whose vectors are combined, in order (PROGRESS: dino,text).",
    )
    weights: dict[str, float] = Field(
        default_factory=dict,
        description="Weight per space in the combined cosine (missing spaces weigh 1).",
    )
    k: int = Field(1000, ge=2, le=100_000, description="Number of clusters K.")
    niter: int = Field(50, ge=1, description="k-means iterations (PROGRESS: 50).")
    nredo: int = Field(1, ge=1, description="Fits with different seeds; the best one is kept.")
    init: Literal["random", "kmeans++", "afk-mc2"] = Field(
        "random",
        description="Initial centroids: random rows (faiss's default, as PROGRESS), k-means++ "
        "(fewer bad local optima; K sequential passes over the sample), or AFK-MC2 (cheaper "
        "approximation of k-means++).",
    )
    seed: int = Field(0, description="Seed of the training sample and of faiss's initialisation.")
    max_points_per_centroid: int = Field(
        256, ge=1, description="The fit uses at most K times this many rows, a seeded sample."
    )
    min_points_per_centroid: int = Field(
        39, ge=1, description="Below this many rows per cluster faiss warns the fit is thin."
    )
    max_sample: int | None = Field(
        500_000,
        ge=1,
        description="Cap on the fit's sample whatever K, which bounds the fit's memory "
        "(500k x 1408-d float32 = 2.8 GB); None: K x max_points_per_centroid only.",
    )
    gpu: bool = operational(
        False,
        description="Fit on a GPU (faiss-gpu; needs fit.num_gpus), and assign on GPUs where "
        "assign.num_gpus is given (else on CPUs).",
    )
    fit: Resources = operational(
        default_factory=lambda: Resources(num_cpus=1),
        description="Resources of the fitting task (num_gpus=1 with gpu=true).",
    )
    fit_threads: int = operational(
        0,
        ge=0,
        description="faiss threads of the fit; 0 takes every core of the node it runs on "
        "(nothing else of the stage runs while it fits).",
    )
    read: Resources = operational(
        default_factory=lambda: Resources(num_cpus=0.5),
        description="Resources of one shard-reading task of the sampling pass.",
    )
    assign: Resources = operational(
        default_factory=lambda: Resources(num_cpus=0.5),
        description="Resources of one assignment task, a run of up to 16 shards (its faiss "
        "threads = max(1, num_cpus); with gpu=true and num_gpus it assigns on its GPU).",
    )
    on_bad_rows: Literal["error", "exclude"] = Field(
        "error",
        description="Rows missing from a space or with NaN/inf/zero vectors: refuse the run, "
        "or leave them out (counted in the meta, listed in excluded/).",
    )
    min_cluster_size: int = Field(
        1, ge=1, description="Clusters with fewer rows than this are 'small' (empty included)."
    )
    small_clusters: Literal["keep", "merge"] = Field(
        "keep",
        description="keep: report small clusters; merge: drop their centroids and assign "
        "their rows to the nearest remaining centroid.",
    )
    overwrite: bool = operational(False, description="Start over even if a current result exists.")

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        if len(set(self.spaces)) != len(self.spaces) or not self.spaces:
            raise ValueError(f"spaces must be distinct and non-empty; got {self.spaces}")
        unknown = sorted(set(self.weights) - set(self.spaces))
        if unknown:
            raise ValueError(f"weights given for spaces not clustered: {unknown}")
        if any(w <= 0 for w in self.weights.values()):
            raise ValueError(f"weights must be positive; got {self.weights}")
        if self.gpu and not self.fit.num_gpus:
            # Ray hides the GPUs from a task that asked for none: it would fail on the node
            raise ValueError(
                "gpu=true fits on a GPU, but the fit task asks for none: set fit.num_gpus=1 "
                "(assign.num_gpus=1 puts the assignment on GPUs too)"
            )
        return self

    def weight_of(self, space: str) -> float:
        return float(self.weights.get(space, 1.0))


CONFIG = ClusterConfig


def reads(cfg: ClusterConfig) -> list[Ref]:
    return [Ref("embeddings", s) for s in cfg.spaces]


def writes(cfg: ClusterConfig) -> list[Ref]:
    return [Ref("clustering", cfg.name)]


def resources(cfg: ClusterConfig) -> dict[str, Resources]:
    return {"read task": cfg.read, "fit task": cfg.fit, "assignment task": cfg.assign}


# -- the driver ---------------------------------------------------------------------------


def shard_runs(shards: list) -> list[list]:
    """``shards`` in order, cut into runs of at most SHARDS_PER_CALL, a few runs per CPU of
    the cluster: a 4k-row shard is read or assigned in less time than a task costs."""
    per_task = max(1, min(SHARDS_PER_CALL, -(-len(shards) // (4 * cluster_cpus()))))
    return [shards[i : i + per_task] for i in range(0, len(shards), per_task)]


def check_inputs(cfg: ClusterConfig, ws: Workspace) -> list[EmbeddedSpace]:
    """The spaces, opened and checked to be sharded alike, before Ray starts."""
    if not cfg.name:
        raise InputError("no clustering name: pass --name NAME (output: <ws>/clusters/NAME/)")
    spaces = [open_space(ws, s) for s in cfg.spaces]
    first = spaces[0]
    for other in spaces[1:]:
        if other.stems != first.stems:
            only = sorted(set(first.stems) ^ set(other.stems))[:5]
            raise InputError(
                f"spaces {first.space!r} and {other.space!r} are sharded differently "
                f"({len(first.stems)} vs {len(other.stems)} shards; e.g. {only} in one only); "
                "cluster spaces embedded from the same pool shards (clip, dino, text), or "
                "cluster the skill space on its own"
            )
    if cfg.k > first.rows:
        raise InputError(
            f"k={cfg.k} clusters but space {first.space!r} holds {first.rows} rows; "
            f"choose --k at most {first.rows}"
        )
    return spaces


def main(cfg: ClusterConfig, ws: Workspace) -> dict:
    """Cluster the pool; see the module docstring. Returns the clustering's figures."""
    timer = Timer()
    spaces = check_inputs(cfg, ws)
    inputs = {s.space: s.fingerprint for s in spaces}
    plan = Clustering.begin(ws, cfg.name, inputs=inputs, config=cfg, overwrite=cfg.overwrite)
    if plan.action == "current":
        done = Clustering.committed(ws, cfg.name, plan.manifest)
        _print(done, reused=True)
        return _figures(done)
    attempt = plan.attempt
    out_dir = attempt.dir
    connect()
    state = attempt.read_state()  # the fit of an interrupted attempt: not fitted again
    if not state:
        state = _fit(cfg, ws, spaces, out_dir)
        attempt.write_state(state)
    assign_timer = Timer()
    while True:
        _assign(cfg, ws, spaces, out_dir)
        sizes = cluster_sizes(ws, out_dir, int(state["k"]))
        small = small_clusters(sizes, cfg.min_cluster_size)
        if cfg.small_clusters == "keep" or len(small) == 0:
            break
        # Removing centroids only moves rows onto the others: no new small cluster appears.
        keep = np.setdiff1d(np.arange(int(state["k"])), small)
        centroids = load_centroids(ws, f"{out_dir}/centroids.npy")[keep]
        save_centroids(ws, f"{out_dir}/centroids.npy", centroids)
        state["merged"] = state.get("merged", []) + [
            {"dropped": small.tolist(), "rows_moved": int(sizes[small].sum())}
        ]
        state["k"] = len(keep)
        attempt.remove("assignments")
        attempt.write_state(state)
        log.warning("%d small clusters merged into their neighbours; assigning again", len(small))
    state["assign_seconds"] = round(assign_timer.seconds, 2)
    state.update(
        describe_assignments(ws, out_dir, sizes, small, cfg.min_cluster_size, cfg.small_clusters)
    )
    state["seconds"] = round(timer.seconds, 2)
    meta = ClusteringMeta(
        name=cfg.name,
        k=int(state["k"]),
        spaces=list(state["spaces"]),
        weights=state["weights"],
        rows_assigned=int(state["rows_assigned"]),
        summary={k: v for k, v in state.items() if k not in ClusteringMeta.model_fields},
        config=cfg.model_dump(mode="json"),
    )
    done = Clustering.committed(ws, cfg.name, attempt.commit(meta))
    _print(done, reused=False)
    return _figures(done)


def _figures(done: Clustering) -> dict:
    m = done.meta
    return {**m.summary, **m.model_dump(exclude={"summary"}), "path": done.dir}


def _fit(cfg: ClusterConfig, ws: Workspace, spaces: list[EmbeddedSpace], out_dir: str) -> dict:
    """The sampling pass and the fit; writes centroids.npy. Returns what the meta records."""
    timer = Timer()
    rows = [pq.ParquetFile(f, filesystem=ws.fs).metadata.num_rows for f in spaces[0].files]
    total = sum(rows)
    n_sample = sample_size(total, cfg.k, cfg.max_points_per_centroid, cfg.max_sample)
    per_shard = split_positions(sample_positions(total, n_sample, cfg.seed), rows)
    dims = {s.space: s.dim for s in spaces}
    weights = {s.space: cfg.weight_of(s.space) for s in spaces}
    # When the sample is every row (pools up to K x max_points_per_centroid), the fit
    # holds all features already: it assigns them too, and the streaming pass is skipped.
    whole = n_sample >= total
    task = ray.remote(sample_shards).options(num_returns=2, **ray_options(cfg.read))
    jobs = []
    for i, stem in enumerate(spaces[0].stems):
        files = {s.space: f"{s.dir}/{stem}.parquet" for s in spaces}
        jobs.append((stem, files, per_shard[i]))
    runs = shard_runs(jobs)
    feature_refs = []
    shard_rows: dict[str, dict] = {}

    def submit(run):
        stats_ref, features_ref = task.remote(ws, run, dims, weights, whole)
        feature_refs.append(features_ref)
        return stats_ref

    reasons: dict[str, int] = {}
    examples: list[str] = []
    usable = rows_in = 0
    errors: list[str] = []
    max_in_flight = max(2, 2 * cluster_cpus())
    with tqdm(total=len(jobs), unit="shard", desc=f"cluster {cfg.name}: read") as bar:
        for run_stats in bounded_submit(submit, runs, max_in_flight):
            for stats in run_stats:
                if "error" in stats:
                    errors.append(stats["error"])
                    continue
                rows_in += stats["rows_in"]
                usable += stats["usable"]
                for reason, count in stats["reasons"].items():
                    reasons[reason] = reasons.get(reason, 0) + count
                examples += stats["examples"][: max(0, 10 - len(examples))]
                if whole:
                    shard_rows[stats["stem"]] = stats
            bar.update(len(run_stats))
    if errors:
        raise InputError(
            f"{len(errors)} embedding shard(s) are malformed: {'; '.join(errors[:3])}; "
            "re-run `vlselect embed --overwrite` for the space named"
        )
    if reasons and cfg.on_bad_rows == "error":
        listed = "; ".join(f"{n} rows {r}" for r, n in sorted(reasons.items()))
        raise InputError(
            f"{rows_in - usable} of {rows_in} rows cannot be clustered: {listed} "
            f"(e.g. {examples}). Re-run `vlselect embed` for those spaces, or set "
            "cluster.on_bad_rows=exclude to leave them out (they are counted and listed)"
        )
    if cfg.k > usable:
        raise InputError(f"k={cfg.k} clusters but only {usable} usable rows; lower --k")
    read_seconds = timer.seconds
    fit, assigned = ray.get(
        _fit_task.options(**ray_options(cfg.fit)).remote(cfg, whole, *feature_refs)
    )
    save_centroids(ws, f"{out_dir}/centroids.npy", fit.centroids)
    if assigned is not None:
        # Rows come back in the order the shards were submitted: the stems' order.
        start = 0
        for stem in spaces[0].stems:
            rows = shard_rows[stem]
            stop = start + rows["usable"]
            write_shard_assignments(
                ws,
                out_dir,
                stem,
                rows["ids"],
                assigned[0][start:stop],
                assigned[1][start:stop],
                rows["rejected"],
            )
            start = stop
    return {
        "k": cfg.k,
        "k_requested": cfg.k,
        "dim": int(fit.centroids.shape[1]),
        "spaces": cfg.spaces,
        "weights": weights,
        "rows_in": rows_in,
        "rows_usable": usable,
        "excluded_reasons": reasons,
        "sample_rows": int(sum(len(p) for p in per_shard)),
        "objective": fit.objective,
        "objective_runs": fit.runs,
        "iterations": fit.iterations,
        "fit_device": fit.device,
        "fit_seconds": round(fit.seconds, 2),
        "read_seconds": round(read_seconds, 2),
    }


@ray.remote
def _fit_task(cfg: ClusterConfig, assign_sample: bool, *parts: np.ndarray):
    """(the fit, and (cluster int64 (n,), similarity float32 (n,)) of every sample row
    when ``assign_sample``, else None)."""
    import os

    import faiss

    threads = cfg.fit_threads or len(os.sched_getaffinity(0))
    faiss.omp_set_num_threads(threads)
    sample = np.concatenate(parts) if len(parts) > 1 else parts[0]
    del parts
    fit = train_spherical(
        sample,
        cfg.k,
        niter=cfg.niter,
        seed=cfg.seed,
        nredo=cfg.nredo,
        init=cfg.init,
        max_points_per_centroid=cfg.max_points_per_centroid,
        min_points_per_centroid=cfg.min_points_per_centroid,
        gpu=cfg.gpu,
    )
    assigned = CentroidIndex(fit.centroids, gpu=cfg.gpu).assign(sample) if assign_sample else None
    return fit, assigned


def _assign(cfg: ClusterConfig, ws: Workspace, spaces: list[EmbeddedSpace], out_dir: str) -> None:
    """Assign the unfinished shards in tasks, each a run of shards, the centroids put in
    the object store once. Tasks, not an actor pool: they start on the workers the
    sampling pass warmed (faiss and the readers imported), where new actors pay a
    process start and the imports."""
    done = {f.rsplit("/", 1)[1].removesuffix(".parquet") for f in assignment_files(ws, out_dir)}
    pending = [s for s in spaces[0].stems if s not in done]
    if not pending:
        return
    runs = shard_runs(pending)
    centroids = ray.put(load_centroids(ws, f"{out_dir}/centroids.npy"))
    task = ray.remote(assign_shards).options(**ray_options(cfg.assign))
    space_dirs = {s.space: s.dir for s in spaces}
    dims = {s.space: s.dim for s in spaces}
    weights = {s.space: cfg.weight_of(s.space) for s in spaces}
    threads = max(1, int(cfg.assign.num_cpus))

    def submit(run: list[str]):
        return task.remote(ws, out_dir, run, space_dirs, dims, weights, centroids, threads,
                           cfg.gpu and cfg.assign.num_gpus > 0)  # fmt: skip

    with tqdm(total=len(pending), unit="shard", desc=f"cluster {cfg.name}: assign") as bar:
        for finished in bounded_submit(submit, runs, max(2, 2 * cluster_cpus())):
            bar.update(len(finished))


_NOT_IN_SUMMARY = ("sizes", "iterations", "objective", "objective_runs", "config")


def _print(done: Clustering, reused: bool) -> None:
    meta = _figures(done)
    objective = meta.get("objective") or [0.0]
    small = meta["small_clusters"]
    merged = sum(len(m["dropped"]) for m in meta.get("merged", []))
    rows = [
        ("clusters", f"{meta['k']} (asked {meta['k_requested']}) over {'+'.join(meta['spaces'])}"),
        ("rows", f"{meta['rows_in']} in = {meta['rows_assigned']} assigned + "
                 f"{meta['rows_excluded']} excluded {meta['excluded_reasons'] or ''}".rstrip()),
        ("fit", f"{meta['sample_rows']} sampled rows, {len(objective)} iterations"
                f"{' (converged)' if len(objective) < meta['config']['niter'] else ''}, "
                f"objective {objective[0]:.1f} -> {objective[-1]:.1f}, {meta['fit_seconds']} s "
                f"on {meta['fit_device']}"),
        ("sizes", f"min {meta['size_stats']['min']}, median {meta['size_stats']['median']:.0f}, "
                  f"max {meta['size_stats']['max']}; {len(small['empty'])} empty, "
                  f"{len(small['small'])} below {small['min_cluster_size']} "
                  f"({small['policy']}{f', {merged} merged' if merged else ''})"),
        ("time", "current, nothing recomputed" if reused else f"{meta['seconds']} s"),
        ("clusters", done.dir),
    ]  # fmt: skip
    print_summary(STAGE, rows, extra={k: v for k, v in meta.items() if k not in _NOT_IN_SUMMARY})


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main([STAGE, *sys.argv[1:]]))
