"""The openai backend against a real LLM server on loopback (vLLM CPU serving SmolLM2).

Skips when the server is not installed (``bash scripts/install_llm_server.sh``).
"""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from engine.artifacts import Pool, Skills
from engine.workspace import Workspace
from jobs.cli import main
from tests.llm_server import llm_server
from tests.world_workspace import world_source

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pool_ws(small_world, tmp_path_factory):
    ws = tmp_path_factory.mktemp("skills-openai") / "ws"
    assert main(["ingest", "--workspace", str(ws), "--source", world_source(small_world)]) == 0
    return ws


def fresh(pool_ws, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copytree(pool_ws / "pool", ws / "pool")
    return ws


def run(ws, srv, *extra):
    args = ["skills", "--workspace", str(ws), "--backend", "openai", "--base-url", srv.base_url]
    args += ["--model", srv.model, "--set", "max_new_tokens=24", *extra]
    assert main(args) == 0
    return Skills.open(Workspace.open(str(ws))).meta.summary


def rows_and_ids(ws, count: int) -> tuple[list[dict], list[str]]:
    """The committed skills rows, and the pool's first ``count`` ids."""
    workspace = Workspace.open(str(ws))
    ids = Pool.open(workspace).read_table(["id"]).column("id").to_pylist()[:count]
    return Skills.open(workspace).read_table().to_pylist(), ids


def test_real_server_writes_every_id_once(pool_ws, tmp_path):
    ws = fresh(pool_ws, tmp_path)
    with llm_server() as srv:
        meta = run(ws, srv, "--limit", "120")
        again = run(ws, srv, "--limit", "120")
    rows, ids = rows_and_ids(ws, 120)
    assert [r["id"] for r in rows] == ids
    assert meta["ok"] + meta["failed"] == 120 and meta["ok"] >= 90
    assert all(r["reason"] for r in rows if r["status"] == "failed")
    assert again["generated"] == meta["unique_questions"] - meta["generated_ok"]


def test_killed_server_records_failures_and_a_rerun_after_restart_completes(pool_ws, tmp_path):
    ws = fresh(pool_ws, tmp_path)
    with llm_server() as srv:
        cache = ws / "cache" / "skills"

        def kill_when_some_are_cached():
            # Kill once the first cache shard is written: the run is demonstrably mid-way.
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not any(cache.glob("*.parquet")):
                time.sleep(0.2)
            srv.kill()

        killer = threading.Thread(target=kill_when_some_are_cached, daemon=True)
        killer.start()
        common = [
            "--limit", "300", "--set", "cache_flush_rows=16", "--set", "openai.concurrency=4",
            "--set", "openai.timeout_s=30", "--set", "openai.backoff_s=0.2",
        ]  # fmt: skip
        meta = run(ws, srv, *common)
        killer.join()
        assert meta["generated_ok"] > 0 and meta["failed"] > 0
        rows, _ = rows_and_ids(ws, 300)
        assert len(rows) == 300
        failed = [r for r in rows if r["status"] == "failed"]
        assert all(r["reason"] for r in failed)
        assert {r["reason"].split(":")[0] for r in failed} & {
            "connection failed",
            "timeout after 30 s",
        }
        srv.restart()
        again = run(ws, srv, *common)
    assert again["cached"] == meta["generated_ok"]
    assert again["generated"] == meta["unique_questions"] - meta["generated_ok"]
    assert again["failed"] <= meta["failed"] and again["ok"] + again["failed"] == 300
