"""A Ray Train worker SIGKILLed mid-round: Ray Train (``FailureConfig``) restarts the
worker group from the last round's checkpoint and the run completes with the same
budget accounting: every round once, no row selected or revealed twice, spent = budget."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pyarrow.parquet as pq

from engine.artifacts import ProgressRun
from engine.workspace import Workspace
from jobs.cli import main
from tests.faults.chaos import ray_worker_pids, sigkill, wait_for
from tests.jobs.test_progress_job import summary_of

# Ray Train's worker actors; their process title carries the class name.
TRAIN_WORKER = "RayTrainWorker"


def test_a_killed_train_worker_resumes_from_the_last_checkpoint(progress_ws, capsys, fault_report):
    ws, config = progress_ws
    seen = {}

    def crash_a_worker():
        # Round 2's rows are revealed: the workers are now training on them.
        wait_for(
            lambda: any(
                (ws / "progress" / "worker-kill").glob("_attempts/*/rounds/round-0002.parquet")
            ),
            900,
            "round 2",
        )
        victims = wait_for(lambda: ray_worker_pids(TRAIN_WORKER), 60, "a train worker")
        sigkill(victims[:1])
        seen["killed"] = victims[:1]

    chaos = threading.Thread(target=crash_a_worker, daemon=True)
    chaos.start()
    args = ["--config", str(config), "--name", "worker-kill", "--set", "max_failures=2"]
    code = main(["progress", "--workspace", str(ws), *args])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    chaos.join(timeout=60)
    assert seen.get("killed"), "no Ray Train worker was found to kill"

    summary = summary_of(out)
    assert summary["spent"] == summary["budget"] == 60 and summary["revealed"] == 60
    run = ProgressRun.open(Workspace.open(str(ws)), "worker-kill")
    run_dir = Path(run.dir)
    # The restarted workers began from a checkpoint, not from the base.
    assert summary["final_metrics"]["started_at_round"] >= 1
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4]
    assert [r["spent"] for r in rounds] == [27, 37, 47, 57, 60]
    files = sorted((run_dir / "rounds").glob("round-*.parquet"))
    ids = [i for f in files for i in pq.read_table(f).column("id").to_pylist()]
    assert len(ids) == len(set(ids)) == 60  # nothing selected or revealed twice
    trained = run.meta.summary["train_rounds"]
    assert [r["round"] for r in trained] == [0, 1, 2, 3, 4]
    assert sum(r["rows"] for r in trained) == 60  # each revealed row trained in one round
    start = summary["final_metrics"]["started_at_round"]
    fault_report(
        injected="SIGKILL of a Ray Train worker (DeepSpeed ZeRO-2, 2 workers) in round 2",
        outcome=f"FailureConfig restarted the group from round {start}'s checkpoint: rounds "
        "0-4 trained once, 60 of 60 spent, 60 distinct rows",
        lost=0,
        budget=60,
    )
