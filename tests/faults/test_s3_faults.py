"""Faults on an ``s3://`` workspace (the loopback S3 server, tests/s3_server.py): a stage
killed while it writes leaves the committed artifact readable and the rerun completes; an
object store that stops answering mid-stage costs retries, not data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from engine.artifacts import EmbeddingSpace, Pool, World
from engine.commit import ATTEMPTS, attempt_ids
from engine.shards import PARTS_DIR
from engine.workspace import Workspace
from jobs.cli import main
from tests.faults.chaos import wait_for

ROOT = Path(__file__).resolve().parents[2]


def _parts_of_a_new_attempt(ws: Workspace, old: str) -> bool:
    folder = Pool.folder(ws)
    for aid in attempt_ids(ws, folder):
        if aid != old and ws.list_files(f"{folder}/{ATTEMPTS}/{aid}", suffix=".parquet"):
            return True
    return False


def test_an_ingest_killed_while_it_writes_leaves_the_pool_readable(
    ray_session, small_world, s3_server, tmp_path, fault_report
):
    uri = s3_server.uri("killed")
    ws = Workspace.open(uri)
    source = World.open(Workspace.open(str(small_world))).path("llava", "pool.json")
    argv = ["ingest", "--workspace", uri, "--source", source, "--chunk-size", "50"]
    assert main(argv) == 0
    before = Pool.open(ws)
    rows = before.read_table(["id"]).num_rows
    # the same source again with --overwrite, in its own process, SIGKILLed mid-write
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.ingest", *argv[1:], "--overwrite"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: _parts_of_a_new_attempt(ws, before.manifest.attempt), 300,
                 "the new attempt's first shards")  # fmt: skip
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    still = Pool.open(ws)
    assert still.manifest == before.manifest  # readers see the old pool, whole
    assert still.read_table(["id"]).num_rows == rows
    left = attempt_ids(ws, Pool.folder(ws))
    assert len(left) == 2  # the committed attempt and the killed one
    assert main([*argv, "--overwrite"]) == 0
    after = Pool.open(ws)
    assert after.manifest.attempt not in left and after.read_table(["id"]).num_rows == rows
    assert attempt_ids(ws, Pool.folder(ws)) == [after.manifest.attempt]  # both cleaned up
    fault_report(
        injected="SIGKILL of `vlselect ingest --overwrite` on an s3:// workspace while its "
        "tasks wrote the new attempt",
        outcome=f"the committed pool stayed readable ({rows} rows, same manifest); the rerun "
        "committed a new attempt and deleted the old and the killed one",
        lost=0,
    )


def test_an_object_store_that_stops_answering_mid_stage_costs_retries_not_rows(
    ray_session, small_world, s3_server, tmp_path, fault_report
):
    uri = s3_server.uri("stalled")
    ws = Workspace.open(uri)
    source = World.open(Workspace.open(str(small_world))).path("source")
    assert main(["ingest", "--workspace", uri, "--source", source]) == 0
    rows = Pool.open(ws).meta.accepted
    seen: dict[str, float] = {}

    def stall_the_server():
        # once the text space's first parts are on the bucket, freeze the server for 5 s:
        # every request in flight or made meanwhile times out and is retried
        folder = EmbeddingSpace.folder(ws, "text")
        wait_for(lambda: any(i.base_name == PARTS_DIR for aid in attempt_ids(ws, folder)
                             for i in ws.fs.get_file_info(_selector(ws, folder, aid))),
                 600, "the text space's first parts")  # fmt: skip
        os.kill(s3_server.proc.pid, signal.SIGSTOP)
        seen["stopped"] = time.monotonic()
        time.sleep(5)
        os.kill(s3_server.proc.pid, signal.SIGCONT)
        seen["resumed"] = time.monotonic()

    chaos = threading.Thread(target=stall_the_server, daemon=True)
    chaos.start()
    try:
        code = main(["embed", "--workspace", uri, "--spaces", "text",
                     "--set", "preprocess_batch_size=64"])  # fmt: skip
    finally:
        chaos.join(timeout=60)
        os.kill(s3_server.proc.pid, signal.SIGCONT)
    assert code == 0
    assert "stopped" in seen, "the embed stage ended before the server could be stalled"
    space = EmbeddingSpace.open(ws, "text")
    ids = space.read_table(["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == rows == space.meta.vectors
    fault_report(
        injected="the S3 server frozen (SIGSTOP) for 5 s while `vlselect embed` wrote the "
        "text space's parts to the bucket",
        outcome=f"requests in flight waited (or timed out and were retried) and the stage went "
        f"on when it answered again: {rows} of {rows} vectors, each once",
        lost=0,
    )


def _selector(ws: Workspace, folder: str, aid: str):
    import pyarrow.fs as pafs

    return pafs.FileSelector(f"{folder}/{ATTEMPTS}/{aid}", allow_not_found=True)
