"""A real submission: ``ray start --head`` on loopback, ``ray job submit --working-dir .``.

Ray 2.60 has token authentication on by default, so the head and the client run
with ``RAY_AUTH_MODE=token`` (the token lives in ``~/.ray/auth_token``). The head
gets its own ``--temp-dir`` and is stopped by killing only its processes: ``ray
stop`` would stop every Ray on the machine, the test session's included.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from engine.workspace import read_parquet_dir
from tests.engine.test_llava import TINY, TINY_TRAIN
from tests.jobs.test_progress_job import TINY_RUN

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
    # the raylet's agents retitle themselves (ray::DashboardAgent) and lose the temp dir
    # from their command line; left alive they hold the next head's agent port
    for proc in list(procs):
        with contextlib.suppress(psutil.NoSuchProcess):
            procs += proc.children(recursive=True)
    procs = list({p.pid: p for p in procs}.values())
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
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
            f"--metrics-export-port={metrics}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    try:
        yield f"http://127.0.0.1:{dash}", env, metrics
    finally:
        stop_cluster(temp_dir)


def submit(address: str, env: dict, entrypoint: str, timeout: float, *extra: str):
    """``ray job submit`` (it follows the job's logs to the end); retried while the head's
    job agent is still starting. Returns the finished process (stdout + stderr: the logs)."""
    deadline = time.time() + timeout
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
                f"vlselect-test-{os.getpid()}-{time.time_ns()}-{attempt}",
                *extra,
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
            return proc, logs
        time.sleep(2)
    return proc, logs


def summaries_of(logs: str) -> list[dict]:
    return [
        json.loads(line.split(" ", 1)[1])
        for line in logs.splitlines()
        if line.startswith("vlselect-summary ")
    ]


def test_ray_job_submit_world_then_ingest(ray_head, tmp_path):
    address, env, _ = ray_head
    ws = tmp_path / "ws"
    entrypoint = (
        f"python -m jobs.world --out {ws} --size 300 --set test_size=50 && "
        f"vlselect ingest --workspace {ws}"
    )
    proc, logs = submit(address, env, entrypoint, 300)
    assert proc.returncode == 0, logs[-4000:]
    assert "succeeded" in logs, logs[-4000:]
    summaries = summaries_of(logs)
    assert [s["stage"] for s in summaries] == ["world", "ingest"]
    assert summaries[1]["records_in"] == summaries[1]["accepted"] == 300
    assert read_parquet_dir(str(ws / "pool")).num_rows == 300


def test_ray_job_submit_the_demo_with_a_runtime_env(ray_head, tmp_path):
    """The demo (no LLM stages; the tiny base and PROGRESS recipe) submitted with a
    runtime environment: JSON logs followed to the end, every artifact written, and the
    stages' counters on the head's Prometheus endpoint."""
    address, env, metrics_port = ray_head
    ws, config = tmp_path / "ws", tmp_path / "demo.yaml"
    stages = {"base": {"model": TINY, "train": TINY_TRAIN}, "progress": TINY_RUN}
    config.write_text(yaml.safe_dump(
        {"demo": {"size": 300, "targeted": False, "stages": stages}}
    ))  # fmt: skip
    runtime_env = json.dumps({"env_vars": {"VLSELECT_LOG_FORMAT": "json"}})
    proc, logs = submit(
        address, env, f"vlselect demo --workspace {ws} --config {config}", 900,
        "--runtime-env-json", runtime_env,
    )  # fmt: skip
    assert proc.returncode == 0 and "succeeded" in logs, logs[-4000:]
    stages_run = [s["stage"] for s in summaries_of(logs)]
    assert stages_run[-1] == "demo" and {"base", "progress", "cluster", "index"} <= set(stages_run)
    logged = [json.loads(x) for x in logs.splitlines() if x.startswith('{"ts"')]
    assert logged and all({"level", "logger", "msg"} <= set(r) for r in logged)
    report = json.loads((ws / "report" / "summary.json").read_text())
    assert report["progress"]["spent"] == report["progress"]["budget"] == 60
    assert (ws / "report" / "index.html").stat().st_size > 10_000
    assert (ws / "progress" / "demo" / "ids.txt").read_text().count("\n") == 60
    seen = ""
    for _ in range(30):  # the metrics agent exports every few seconds
        seen = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
        if "vlselect_stage_rows" in seen and "vlselect_progress_budget_spent" in seen:
            break
        time.sleep(2)
    assert "vlselect_stage_rows" in seen and 'stage="ingest"' in seen, seen[-2000:]
    assert "vlselect_progress_budget_spent" in seen
