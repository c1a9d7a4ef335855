"""A killed embed driver, started again, keeps its finished shards and writes no id twice."""

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
import yaml

from engine.workspace import read_parquet_dir
from jobs.cli import main
from tests.slow.test_job_submit import stop_cluster

pytestmark = pytest.mark.slow


def embed_process(ws: Path, temp_dir: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_TMPDIR": temp_dir, "RAY_ADDRESS": ""}
    cmd = [sys.executable, "-m", "jobs.embed", "--workspace", str(ws), "--spaces", "clip"]
    cmd += ["--set", "clip.batch_size=16", "--set", "preprocess_batch_size=16"]
    return subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def test_killed_embed_resumes_without_duplicates(small_world, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    config = yaml.safe_load((small_world / "vlselect.yaml").read_text())
    config["ingest"]["source"] = str(small_world / "world" / "source")
    (ws / "vlselect.yaml").write_text(yaml.safe_dump(config))
    assert main(["ingest", "--workspace", str(ws), "--chunk-size", "100"]) == 0
    clip = ws / "embeddings" / "clip"
    temp_dir = tempfile.mkdtemp(prefix="ray-kill-", dir="/tmp")
    try:
        proc = embed_process(ws, temp_dir)
        deadline = time.monotonic() + 300
        while len(list(clip.glob("part-*.parquet"))) < 3:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no shard finished in 300 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-run, no clean-up
        proc.wait()
        finished = len(list(clip.glob("part-*.parquet")))
        assert 3 <= finished < 20, "the kill came too late to interrupt anything"
        stop_cluster(temp_dir)

        proc = embed_process(ws, temp_dir)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out.decode()[-3000:]
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    meta = json.loads((clip / "meta.json").read_text())
    assert meta["resumed"] >= finished * 100 and meta["embedded"] + meta["resumed"] == 2000
    ids = read_parquet_dir(str(clip), columns=["id"]).column("id").to_pylist()
    pool = read_parquet_dir(str(ws / "pool"), columns=["id"]).column("id").to_pylist()
    assert ids == pool  # every pool id once, none twice, in pool order
