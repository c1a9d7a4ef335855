"""How a job joins Ray: workers get the warning policy, and their output stays in Ray's logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from jobs.runtime import WORKER_SETUP_HOOK, worker_runtime_env

ROOT = Path(__file__).resolve().parents[2]

# A fresh local Ray per run: the job's own connect(), a worker that prints and warns.
SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    import ray
    from jobs import runtime

    runtime.connect()

    @ray.remote(num_cpus=0.1)
    def chatter():
        print("chatter-from-a-worker", flush=True)
        warnings.warn_explicit("old call", FutureWarning, "x.py", 1, module="engine.pool")
        return "no error"

    try:
        print("task:", ray.get(chatter.remote()))
    except ray.exceptions.RayTaskError as err:
        print("task: raised", type(err.cause).__name__)
    print("logs:", runtime.worker_log_dir())
    ray.shutdown()
    """
)


def _run(**env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VLSELECT_"))}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**base, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", **env},
        timeout=180,
    )


def test_worker_output_stays_in_rays_logs_unless_asked_and_the_hook_runs_in_workers():
    quiet = _run(VLSELECT_STRICT_WARNINGS="1")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "task: raised FutureWarning" in quiet.stdout  # the setup hook ran in the worker
    assert "chatter-from-a-worker" not in quiet.stdout + quiet.stderr
    logs = Path(quiet.stdout.split("logs:")[1].split()[0])
    assert any(
        "chatter-from-a-worker" in p.read_text(errors="replace") for p in logs.glob("worker-*.out")
    )

    loud = _run(VLSELECT_WORKER_LOGS="1")
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "task: no error" in loud.stdout  # not strict: a warning, shown once
    assert "chatter-from-a-worker" in loud.stdout + loud.stderr


def test_the_setup_hook_yields_to_a_submitted_jobs_own(monkeypatch):
    assert worker_runtime_env() == {"worker_process_setup_hook": WORKER_SETUP_HOOK}
    job = {"runtime_env": {"worker_process_setup_hook": "mine.setup", "working_dir": "."}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert worker_runtime_env() == {}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"pip": ["x"]}}))
    assert worker_runtime_env() == {"worker_process_setup_hook": WORKER_SETUP_HOOK}


def _steps(progress, n: int) -> int:
    from actors.progress import tell

    for i in range(n):
        tell(progress, f"step {i + 1}/{n}")
    return n


def test_worker_progress_brings_a_tasks_lines_to_this_terminal(ray_session, capsys):
    from jobs.runtime import WorkerProgress

    task = ray_session.remote(num_cpus=0.1)(_steps)
    with WorkerProgress("base") as progress:
        assert ray_session.get(task.remote(progress.queue, 3)) == 3
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "step" in line] == [
        "  base: step 1/3",
        "  base: step 2/3",
        "  base: step 3/3",
    ]
    assert ray_session.get(task.remote(None, 2)) == 2  # no queue: the worker's log only
