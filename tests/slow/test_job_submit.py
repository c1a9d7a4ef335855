"""A real submission: ``ray start --head`` on loopback, ``ray job submit --working-dir .``.

Ray 2.60 has token authentication on by default, so the head and the client run
with ``RAY_AUTH_MODE=token`` (the token lives in ``~/.ray/auth_token``). The head
gets its own ``--temp-dir`` and is stopped by killing only its processes: ``ray
stop`` would stop every Ray on the machine, the test session's included.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from engine.workspace import read_parquet_dir

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_cluster(temp_dir: str) -> None:
    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                procs.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        proc.kill()


@pytest.fixture
def ray_head():
    import ray

    # The test session's own local Ray holds ports that a second head wants too (its
    # dashboard agent binds 52365 whatever the flags below say); jobs that run later
    # start a fresh local Ray through jobs.runtime.connect().
    if ray.is_initialized():
        ray.shutdown()
        time.sleep(2)
    temp_dir = tempfile.mkdtemp(prefix="vlsr-", dir="/tmp")  # short: Ray's socket paths are limited
    port, dash, agent, agent_grpc, metrics, runtime_env = (free_port() for _ in range(6))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        stop_cluster(temp_dir)


def test_ray_job_submit_world_then_ingest(ray_head, tmp_path):
    address, env = ray_head
    ws = tmp_path / "ws"
    entrypoint = (
        f"python -m jobs.world --out {ws} --size 300 --set test_size=50 && "
        f"vlselect ingest --workspace {ws}"
    )
    deadline = time.time() + 300
    for attempt in range(30):
        proc = subprocess.run(
            [
                str(BIN / "ray"),
                "job",
                "submit",
                "--address",
                address,
                "--working-dir",
                str(ROOT),
                "--submission-id",
                f"vlselect-test-{os.getpid()}-{attempt}",
                "--",
                "bash",
                "-c",
                entrypoint,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=max(60, deadline - time.time()),
            cwd=ROOT,
        )
        logs = proc.stdout + proc.stderr
        if "No available agent" not in logs:  # the head's job agent starts a few seconds late
            break
        time.sleep(2)
    assert proc.returncode == 0, logs[-4000:]
    assert "succeeded" in logs, logs[-4000:]
    summaries = [
        json.loads(line.split(" ", 1)[1])
        for line in logs.splitlines()
        if line.startswith("vlselect-summary ")
    ]
    assert [s["stage"] for s in summaries] == ["world", "ingest"]
    assert summaries[1]["records_in"] == summaries[1]["accepted"] == 300
    assert read_parquet_dir(str(ws / "pool")).num_rows == 300
