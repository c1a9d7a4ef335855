"""The embed and skills drivers SIGKILLed mid-run (with their Ray) and started again: the
finished shards and cached answers are kept, nothing is computed twice, no id is written
twice and none is missing."""

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

import pytest

from engine.artifacts import EmbeddingSpace, Pool, Skills
from engine.commit import ATTEMPTS
from engine.workspace import Workspace
from tests.fake_openai import FakeOpenAIProcess
from tests.faults.chaos import wait_for
from tests.slow.test_job_submit import stop_cluster
from tests.world_workspace import ingested

pytestmark = pytest.mark.slow


def stage_process(stage: str, ws: Path, temp_dir: str, *args: str) -> subprocess.Popen:
    # Its own Ray temp dir, so that the killed driver's Ray can be stopped alone.
    env = {**os.environ, "RAY_TMPDIR": temp_dir, "RAY_ADDRESS": ""}
    cmd = [sys.executable, "-m", f"jobs.{stage}", "--workspace", str(ws), *args]
    return subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def kill_then_rerun(
    stage: str, ws: Path, args: list[str], started, between=lambda: None, *, timeout_s=300
) -> str:
    """Run ``stage``, SIGKILL its process group once ``started()`` holds, call ``between()``
    once that Ray is stopped too, then run the stage again to its end; its output."""
    temp_dir = tempfile.mkdtemp(prefix=f"ray-kill-{stage}-", dir="/tmp")
    try:
        proc = stage_process(stage, ws, temp_dir, *args)

        def progressed():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            return started()

        wait_for(progressed, timeout_s, f"{stage} to make progress")
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-run, no clean-up
        proc.wait()
        stop_cluster(temp_dir)
        between()
        proc = stage_process(stage, ws, temp_dir, *args)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out.decode()[-3000:]
        return out.decode()
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def settled(server: FakeOpenAIProcess, quiet_s: float = 2.0) -> list[str]:
    """What ``server`` served once nobody has asked it anything for ``quiet_s``.

    Killing the driver's process group orphans the Ray workers it started; one busy with
    a batch finishes that batch before it sees that its raylet is gone.
    """
    served = server.served()
    while True:
        time.sleep(quiet_s)
        now = server.served()
        if len(now) == len(served):
            return now
        served = now


def pool_ids(ws: Path) -> list[str]:
    return Pool.open(Workspace.open(str(ws))).read_table(["id"]).column("id").to_pylist()


def summary(out: str) -> dict:
    line = [x for x in out.splitlines() if x.startswith("vlselect-summary ")][-1]
    return json.loads(line.removeprefix("vlselect-summary "))


def test_killed_embed_resumes_without_duplicates(small_world, tmp_path, fault_report):
    ws = ingested(small_world, tmp_path / "ws", 100)
    clip = ws / "embeddings" / "clip"
    args = ["--spaces", "clip", "--set", "clip.batch_size=16", "--set", "preprocess_batch_size=16"]
    finished = []

    def three_shards_done():
        # the killed run's finished shards, in its uncommitted attempt
        finished[:] = list(clip.glob(f"{ATTEMPTS}/*/part-*.parquet"))
        return len(finished) >= 3

    out = kill_then_rerun("embed", ws, args, three_shards_done)
    assert 3 <= len(finished) < 20, "the kill came too late to interrupt anything"
    (meta,) = summary(out)["spaces"]
    assert meta["resumed"] >= len(finished) * 100 and meta["embedded"] + meta["resumed"] == 2000
    space = EmbeddingSpace.open(Workspace.open(str(ws)), "clip")
    assert space.dir == str(finished[0].parent)  # the killed run's attempt, resumed
    assert space.meta.vectors == 2000
    ids = space.read_table(["id"]).column("id").to_pylist()
    assert ids == pool_ids(ws)  # every pool id once, none twice, in pool order
    fault_report(
        injected=f"SIGKILL of the embed driver and its Ray ({len(finished)} of 20 shards done)",
        outcome=f"rerun kept {meta['resumed']} rows of finished shards, embedded the other "
        f"{meta['embedded']}: 2000 ids once",
        lost=2000 - len(set(ids)),
        rows=2000,
    )


def test_killed_skills_keeps_its_cached_answers_and_asks_each_question_once(
    small_world, tmp_path, fault_report
):
    ws = ingested(small_world, tmp_path / "ws", 500)
    cache = ws / "cache" / "skills"
    log = tmp_path / "served.jsonl"
    killed_run = []
    left = []

    def after_the_kill(server):
        killed_run.extend(settled(server))
        left.extend(p.name for p in (ws / "skills" / ATTEMPTS).iterdir())

    with FakeOpenAIProcess(str(log), delay_s=0.05) as server:
        args = ["--backend", "openai", "--base-url", server.base_url, "--model", "fake-smol"]
        args += ["--set", "embed=false", "--set", "cache_flush_rows=16"]
        args += ["--set", "openai.concurrency=4"]
        kill_then_rerun(
            "skills",
            ws,
            args,
            started=lambda: len(list(cache.glob("*.parquet"))) >= 2,
            between=lambda: after_the_kill(server),
        )
        rerun = server.served()[len(killed_run) :]
    found = Skills.open(Workspace.open(str(ws)))
    assert left == [found.manifest.attempt]  # the killed run's attempt, resumed
    meta = found.meta.summary
    assert meta["failed"] == 0 and meta["ok"] == meta["samples"] == 2000
    assert 32 <= meta["cached"] < meta["unique_questions"], "the kill did not land mid-run"
    # The rerun asks each question the killed run left uncached exactly once, and no cached
    # one: answers still in the pipeline at the kill (not yet cached) are the only loss.
    assert meta["generated"] == meta["unique_questions"] - meta["cached"]
    assert len(rerun) == len(set(rerun)) == meta["generated"]
    assert len(set(killed_run) | set(rerun)) == meta["unique_questions"]
    rows = found.read_table(["id"]).column("id").to_pylist()
    assert rows == pool_ids(ws)
    fault_report(
        injected="SIGKILL of the skills driver and its Ray mid-generation",
        outcome=f"rerun kept {meta['cached']} cached answers, asked each of the other "
        f"{meta['generated']} questions once ({len(set(killed_run)) - meta['cached']} answers "
        "in flight at the kill asked again): 2000 ids once",
        lost=2000 - len(set(rows)),
        rows=2000,
    )
