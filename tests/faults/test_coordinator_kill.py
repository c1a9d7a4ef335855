"""The PROGRESS coordinator SIGKILLed: Ray restarts it and it restores its ledger from the
checkpoint it writes every round, so no row is selected or revealed twice and the budget
is spent exactly; on its own (calls retried by Ray, and a new actor of the same name
after the driver is gone) and in the middle of a ``vlselect progress`` run."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pyarrow.parquet as pq

from actors.coordinator import BASELINE, get_coordinator, round_file
from engine.artifacts import ProgressRun
from engine.workspace import Workspace
from jobs.cli import main
from tests.actors.test_coordinator import N, report, round_rows, start, write_pool_and_clusters
from tests.faults.chaos import sigkill, wait_for
from tests.jobs.test_progress_job import summary_of


def pid_of(ray, actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda _: os.getpid()))


def test_rounds_are_revealed_once_and_survive_a_killed_coordinator(
    ray_session, tmp_path, fault_report
):
    ray = ray_session
    ws, clustering, pool = write_pool_and_clusters(tmp_path / "ws")
    actor = start(ws, clustering, pool, "run-a")
    warm = [f"p{i:04d}" for i in range(0, N, 8)]  # 30 rows
    out = ray.get(actor.warmup.remote(warm))
    assert out["rows"] == 30 and out["spent"] == 30 and out["revealed"] == 30
    report(ray, actor, BASELINE)
    report(ray, actor, 0)
    first = ray.get(actor.next_round.remote(1))
    assert first["rows"] == 20 and first["spent"] == 50
    report(ray, actor, 1)
    sigkill([pid_of(ray, actor)])  # a crash: Ray restarts it; it restores from the checkpoint
    second = ray.get(actor.next_round.remote(2))
    assert second["spent"] == 70 and second["rounds"] == 3
    assert ray.get(actor.next_round.remote(2))["spent"] == 70  # a retried call spends nothing
    report(ray, actor, 2)
    # The driver goes away too: a new actor of the same name restores the same ledger.
    ray.kill(actor, no_restart=True)
    actor = start(ws, clustering, pool, "run-a")
    assert ray.get(actor.status.remote())["spent"] == 70
    third = ray.get(actor.next_round.remote(3))
    assert third["spent"] == 90
    report(ray, actor, 3)
    last = ray.get(actor.next_round.remote(4))
    assert last["rows"] == 10 and last["spent"] == 100 and last["finished"]

    run_dir = ws.path("progress", "run-a")
    tables = round_rows(ws, run_dir)
    ids = [i for t in tables for i in t.column("id").to_pylist()]
    assert len(ids) == len(set(ids)) == 100  # nothing revealed twice, budget exact
    answers = {r["id"]: r["answer"] for t in tables for r in t.to_pylist()}
    assert all(answers[i] == str(int(i[1:]) + 1) for i in ids)
    lines = [json.loads(x) for x in Path(run_dir, "rounds.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0, 1, 2, 3, 4]
    assert [x["spent"] for x in lines] == [30, 50, 70, 90, 100]
    assert lines[2]["delta"] and lines[2]["probabilities"]
    assert round_file(run_dir, 4).endswith("round-0004.parquet")
    ray.kill(actor, no_restart=True)
    fault_report(
        injected="SIGKILL of the coordinator actor, then its driver gone and a new actor",
        outcome="ledger restored from the checkpoint both times, a retried call spent "
        "nothing: 100 of 100 spent, 100 distinct rows revealed",
        lost=0,
        budget=100,
    )


def test_a_progress_run_survives_its_coordinator_killed_mid_run(
    ray_session, progress_ws, capsys, fault_report
):
    ws, config = progress_ws
    seen = {}

    def crash_the_coordinator():
        wait_for(
            lambda: any(
                (ws / "progress" / "coordinator-kill").glob("_attempts/*/rounds/round-0001.parquet")
            ),
            900,
            "round 1",
        )
        actor = get_coordinator("vlselect-progress-coordinator-kill")
        seen["killed"] = pid_of(ray_session, actor)
        sigkill([seen["killed"]])
        seen["restarted"] = pid_of(ray_session, actor)  # waits for Ray's restart

    chaos = threading.Thread(target=crash_the_coordinator, daemon=True)
    chaos.start()
    args = ["--config", str(config), "--name", "coordinator-kill"]
    code = main(["progress", "--workspace", str(ws), *args])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    chaos.join(timeout=60)
    assert seen.get("restarted") not in (None, seen.get("killed")), seen

    summary = summary_of(out)
    assert summary["spent"] == summary["budget"] == 60 and summary["revealed"] == 60
    run = ProgressRun.open(Workspace.open(str(ws)), "coordinator-kill")
    run_dir = Path(run.dir)
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4]
    assert [r["spent"] for r in rounds] == [27, 37, 47, 57, 60]
    files = sorted((run_dir / "rounds").glob("round-*.parquet"))
    assert len(files) == 5
    ids = [i for f in files for i in pq.read_table(f).column("id").to_pylist()]
    assert len(ids) == len(set(ids)) == 60  # nothing selected or revealed twice
    fault_report(
        injected="SIGKILL of the coordinator during a vlselect progress run (after round 1)",
        outcome="restarted by Ray, ledger restored: rounds 0-4 once, 60 of 60 spent, "
        "60 distinct rows revealed",
        lost=0,
        budget=60,
    )
