"""The coordinator actor on a local Ray: reveals, checkpoints, restarts, restores."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.coordinator import start_coordinator
from engine.coordinator import ProgressSettings
from engine.pool import POOL_SCHEMA
from engine.resources import Resources
from engine.workspace import Workspace

N, K = 240, 6


def write_pool_and_clusters(root) -> tuple[Workspace, str, str]:
    """A pool of N text rows in two files and a K-cluster assignment of it."""
    ids = [f"p{i:04d}" for i in range(N)]
    rows = {
        "id": ids,
        "image": [None] * N,
        "image_ref": [None] * N,
        "width": [None] * N,
        "height": [None] * N,
        "question": [f"what is {i} + 1?" for i in range(N)],
        "answer": [str(i + 1) for i in range(N)],
        "conversations": [
            [{"from": "human", "value": f"what is {i} + 1?"}, {"from": "gpt", "value": str(i + 1)}]
            for i in range(N)
        ],
        "source": ["test"] * N,
        "record_index": list(range(N)),
    }
    table = pa.Table.from_pydict(rows, schema=POOL_SCHEMA)
    (root / "pool").mkdir(parents=True)
    (root / "clusters" / "c" / "assignments").mkdir(parents=True)
    for f, (lo, hi) in enumerate([(0, 100), (100, N)]):
        pq.write_table(table.slice(lo, hi - lo), root / "pool" / f"part-{f:06d}.parquet")
        labels = (np.arange(lo, hi) * 7) % K
        assignments = pa.table(
            {
                "id": ids[lo:hi],
                "cluster": pa.array(labels, pa.int32()),
                "similarity": pa.array(np.ones(hi - lo), pa.float32()),
            }
        )
        pq.write_table(
            assignments, root / "clusters" / "c" / "assignments" / f"part-{f:06d}.parquet"
        )
    (root / "clusters" / "c" / "meta.json").write_text(json.dumps({"k": K, "status": "complete"}))
    ws = Workspace.open(str(root))
    return ws, ws.path("clusters", "c"), ws.path("pool")


SETTINGS = ProgressSettings(budget=100, round_size=20, metric="accuracy", seed=3)


def start(ws, clusters_dir, pool_dir, name):
    return start_coordinator(
        ws,
        ws.path("progress", name),
        clusters_dir,
        pool_dir,
        SETTINGS,
        name,
        Resources(num_cpus=0, max_retries=-1),
    )


def report(ray, actor, round_index):
    ids = ray.get(actor.eval_ids.remote(round_index))
    labels = np.array(ray.get(actor.labels_of.remote(ids)))
    evaluated = np.bincount(labels, minlength=K)
    # Cluster c's accuracy rises with c: a fixed, known signal.
    acc = np.where(evaluated > 0, 0.3 + 0.05 * (round_index + 1) * np.arange(K), np.nan)
    return ray.get(actor.report.remote(round_index, acc.tolist(), evaluated.tolist()))


def round_rows(ws, run_dir) -> list[pa.Table]:
    files = ws.list_files(run_dir, "rounds", suffix=".parquet")
    return [pq.read_table(f) for f in files]


def test_settings_changed_under_a_run_are_refused(ray_session, tmp_path):
    ray = ray_session
    ws, clusters_dir, pool_dir = write_pool_and_clusters(tmp_path / "ws")
    actor = start(ws, clusters_dir, pool_dir, "run-b")
    ray.get(actor.warmup.remote(["p0000", "p0001"]))
    ray.kill(actor, no_restart=True)
    other = SETTINGS.model_copy(update={"budget": 99})
    actor = start_coordinator(
        ws,
        ws.path("progress", "run-b"),
        clusters_dir,
        pool_dir,
        other,
        "run-b",
        Resources(num_cpus=0, max_retries=0),
    )
    with pytest.raises(ray.exceptions.ActorDiedError, match="use a new run name"):
        ray.get(actor.status.remote())
    with pytest.raises(ray.exceptions.RayTaskError, match="not in the clustered pool"):
        fresh = start(ws, clusters_dir, pool_dir, "run-c")
        ray.get(fresh.warmup.remote(["nope"]))
