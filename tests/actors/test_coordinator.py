"""The coordinator actor on a local Ray: reveals, checkpoints, restarts, restores."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.coordinator import round_file, start_coordinator
from engine.artifacts import Clustering, ClusteringMeta, Pool, PoolMeta
from engine.pool import POOL_SCHEMA
from engine.resources import Resources
from engine.selection_rule import ProgressSettings, SelectionRule
from engine.workspace import Workspace

N, K = 240, 6


def write_pool_and_clusters(root) -> tuple[Workspace, Clustering, Pool]:
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
    ws = Workspace.open(str(root))
    pool = Pool.begin(ws).attempt
    clusters = Clustering.begin(ws, "c", inputs={"pool": "synthetic"}).attempt
    for f, (lo, hi) in enumerate([(0, 100), (100, N)]):
        ws.write_table(pool.path(f"part-{f:06d}.parquet"), table.slice(lo, hi - lo))
        labels = (np.arange(lo, hi) * 7) % K
        assignments = pa.table(
            {
                "id": ids[lo:hi],
                "cluster": pa.array(labels, pa.int32()),
                "similarity": pa.array(np.ones(hi - lo), pa.float32()),
            }
        )
        ws.write_table(clusters.path("assignments", f"part-{f:06d}.parquet"), assignments)
    pool.commit(
        PoolMeta(source="test", format="parquet", image_root=None, records_in=N, accepted=N,
                 rejected=0, rejected_by_reason={}, source_fingerprint={}, seconds=0, config={})
    )  # fmt: skip
    clusters.commit(
        ClusteringMeta(name="c", k=K, spaces=["text"], weights={"text": 1.0}, rows_assigned=N,
                       summary={}, config={})
    )  # fmt: skip
    return ws, Clustering.open(ws, "c"), Pool.open(ws)


SETTINGS = ProgressSettings(
    budget=100, round_size=20, seed=3, rule=SelectionRule(metric="accuracy")
)


def start(ws, clustering, pool, name):
    return start_coordinator(
        ws,
        ws.path("progress", name),
        clustering,
        pool,
        SETTINGS,
        name,
        Resources(num_cpus=0, max_retries=-1),
    )


def report(ray, actor, round_index):
    ids = ray.get(actor.eval_ids.remote(round_index))
    labels = np.array(ray.get(actor.labels_of.remote(ids)))
    # Cluster c's accuracy rises with c: a fixed, known signal.
    acc = (0.3 + 0.05 * (round_index + 1) * np.arange(K))[labels]
    return ray.get(actor.report.remote(round_index, acc.tolist()))


def round_rows(ws, run_dir) -> list[pa.Table]:
    files = ws.list_files(run_dir, "rounds", suffix=".parquet")
    return [pq.read_table(f) for f in files]


def test_settings_changed_under_a_run_are_refused(ray_session, tmp_path):
    ray = ray_session
    ws, clustering, pool = write_pool_and_clusters(tmp_path / "ws")
    actor = start(ws, clustering, pool, "run-b")
    ray.get(actor.warmup.remote(["p0000", "p0001"]))
    ray.kill(actor, no_restart=True)
    other = SETTINGS.model_copy(update={"budget": 99})
    actor = start_coordinator(
        ws,
        ws.path("progress", "run-b"),
        clustering,
        pool,
        other,
        "run-b",
        Resources(num_cpus=0, max_retries=0),
    )
    with pytest.raises(ray.exceptions.ActorDiedError, match="use a new run name"):
        ray.get(actor.status.remote())
    with pytest.raises(ray.exceptions.RayTaskError, match="not in the clustered pool"):
        fresh = start(ws, clustering, pool, "run-c")
        ray.get(fresh.warmup.remote(["nope"]))


def test_a_round_file_holds_the_rows_answers_and_nothing_more(ray_session, tmp_path):
    """The reveal reads one column: the round file is (id, pool_row, cluster, answer), the
    answers and rows those of the pool for exactly the ids the state drew."""
    ray = ray_session
    ws, clustering, pool = write_pool_and_clusters(tmp_path / "ws")
    actor = start(ws, clustering, pool, "run-reveal")
    ray.get(actor.warmup.remote(["p0003", "p0150", "p0099"]))
    report(ray, actor, -1)
    report(ray, actor, 0)
    got = ray.get(actor.next_round.remote(1))
    table = pq.read_table(got["path"])
    assert table.column_names == ["id", "pool_row", "cluster", "answer"]
    assert table.num_rows == got["rows"] == SETTINGS.round_size
    ids = table.column("id").to_pylist()
    rows = table.column("pool_row").to_pylist()
    assert ids == [f"p{r:04d}" for r in rows]  # pool row i holds id p{i}
    assert table.column("answer").to_pylist() == [str(r + 1) for r in rows]
    assert table.column("cluster").to_pylist() == [(r * 7) % K for r in rows]
    warm = pq.read_table(round_file(ws.path("progress", "run-reveal"), 0))
    assert sorted(warm.column("id").to_pylist()) == ["p0003", "p0099", "p0150"]
    assert not set(ids) & set(warm.column("id").to_pylist())
    ray.kill(actor, no_restart=True)


def test_the_reveal_count_is_what_was_read_not_what_was_picked(ray_session, tmp_path):
    """``revealed`` is the ledger's count of answers read from the pool: a retried round
    or a restarted coordinator reads nothing new, scoring reads nothing, and a round
    whose answers were written before a crash lost the checkpoint counts once."""
    ray = ray_session
    ws, clustering, pool = write_pool_and_clusters(tmp_path / "ws")
    run_dir = ws.path("progress", "run-count")
    actor = start(ws, clustering, pool, "run-count")
    assert ray.get(actor.status.remote())["revealed"] == 0
    ray.get(actor.warmup.remote(["p0001", "p0002", "p0003", "p0004"]))
    report(ray, actor, -1)
    report(ray, actor, 0)
    assert ray.get(actor.status.remote())["revealed"] == 4  # scoring read no answer
    ray.get(actor.next_round.remote(1))
    again = ray.get(actor.next_round.remote(1))  # retried: the same file, no reads
    assert again["revealed"] == again["spent"] == 24
    # A crash between the reveal and the checkpoint: the state of before round 2 is back
    # on disk, round 2's file is not; the new coordinator draws round 2 again, finds the
    # file and counts its answers as read (they are out), once.
    report(ray, actor, 1)
    from actors.coordinator import STATE_FILE

    before = ws.read_bytes(f"{run_dir}/{STATE_FILE}")
    got = ray.get(actor.next_round.remote(2))
    ray.kill(actor, no_restart=True)
    ws.write_bytes(f"{run_dir}/{STATE_FILE}", before)
    actor = start(ws, clustering, pool, "run-count")
    redrawn = ray.get(actor.next_round.remote(2))
    assert redrawn["path"] == got["path"] and redrawn["revealed"] == redrawn["spent"] == 44
    files = [pq.read_table(round_file(run_dir, r)).num_rows for r in range(3)]
    assert sum(files) == redrawn["revealed"]
    ray.kill(actor, no_restart=True)
