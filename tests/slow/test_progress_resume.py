"""``vlselect progress`` killed mid-run (the driver, its coordinator and its Ray Train
workers with it) and started again: it continues from the last round's checkpoint with
the same ledger, selects no row twice and reveals no answer twice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from engine.workspace import read_parquet_dir
from tests.engine.test_llava import TINY, TINY_TRAIN
from tests.jobs.test_progress_job import POOL, TINY_RUN
from tests.slow.test_job_submit import stop_cluster
from tests.synthetic_space import clustered_labelled, write_space

ROOT = Path(__file__).resolve().parents[2]


def vlselect(*args: str, temp_dir: str = "", **kw) -> subprocess.Popen:
    # Its own Ray temp dir, so that the killed run's Ray can be stopped alone.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    if temp_dir:
        env["RAY_TMPDIR"] = temp_dir
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,
    )


def run_to_end(*args: str, temp_dir: str = "") -> str:
    proc = vlselect(*args, temp_dir=temp_dir)
    out, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_a_killed_run_resumes_with_the_ledger_exact(tmp_path):
    ws = tmp_path / "ws"
    run_to_end("world", "--out", str(ws), "--size", str(POOL))
    run_to_end("ingest", "--workspace", str(ws))
    ids = read_parquet_dir(str(ws / "pool"), columns=["id"]).column("id").to_pylist()
    for space, dim, seed in (("dino", 24, 1), ("text", 16, 2)):
        write_space(
            ws, space, clustered_labelled(len(ids), dim, 12, seed=seed)[0], ids=ids, shard_rows=100
        )
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump({"base": {"model": TINY, "train": TINY_TRAIN}, "progress": TINY_RUN})
    )
    run_to_end("base", "--workspace", str(ws), "--config", str(config))

    args = ("progress", "--workspace", str(ws), "--config", str(config), "--name", "r")
    run_dir = ws / "progress" / "r"
    temp_dir = tempfile.mkdtemp(prefix="ray-progress-", dir="/tmp")
    try:
        proc = vlselect(*args, temp_dir=temp_dir)
        target = run_dir / "rounds" / "round-0002.parquet"
        deadline = time.time() + 900
        while not target.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert target.exists(), proc.communicate()[0][-4000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-run, no clean-up
        proc.wait()
        stop_cluster(temp_dir)
        before = (run_dir / "rounds.jsonl").read_text().splitlines()
        assert 2 <= len(before) < 5
        out = run_to_end(*args, temp_dir=temp_dir)
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    summary = json.loads(
        [x for x in out.splitlines() if x.startswith("vlselect-summary ")][-1][17:]
    )
    assert summary["spent"] == summary["budget"] == 60 and summary["revealed"] == 60
    assert "resuming r at round" in out
    assert summary["final_metrics"]["started_at_round"] >= 2  # Ray Train restored a checkpoint
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4]
    assert rounds[: len(before)] == [json.loads(x) for x in before]  # history kept as it was
    files = sorted((run_dir / "rounds").glob("round-*.parquet"))
    picked = [i for f in files for i in pq.read_table(f).column("id").to_pylist()]
    assert len(picked) == len(set(picked)) == 60
