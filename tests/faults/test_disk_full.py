"""The workspace's disk full or read-only during a write: the stage fails with one clear
message (exit 1, no traceback), nothing half-written is left looking finished, and the
same command completes once there is room again, keeping what had finished.

The workspace sits on its own small tmpfs, so ENOSPC and EROFS are the kernel's own.
Mounting needs CAP_SYS_ADMIN (root in the project's containers); elsewhere these skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine.artifacts import EmbeddingSpace, Pool
from engine.commit import ATTEMPTS
from engine.workspace import Workspace
from jobs.cli import main
from tests.faults.chaos import wait_for
from tests.world_workspace import world_workspace

ROWS = 2000


class Tmpfs:
    def __init__(self, path: Path):
        self.path = path

    def mount(self, *options: str) -> None:
        opts = ",".join(options)
        cmd = ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(self.path)]
        if self.mounted():
            cmd = ["mount", "-o", f"remount,{opts}", str(self.path)]
        subprocess.run(cmd, check=True, capture_output=True)

    def mounted(self) -> bool:
        return os.path.ismount(self.path)

    def free(self) -> int:
        return shutil.disk_usage(self.path).free


@pytest.fixture
def tmpfs(tmp_path):
    fs = Tmpfs(tmp_path / "disk")
    fs.path.mkdir()
    try:
        fs.mount("size=64m")
    except (subprocess.CalledProcessError, FileNotFoundError) as err:
        pytest.skip(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {err}")
    yield fs
    subprocess.run(["umount", "-l", str(fs.path)], check=False)


def files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def summary(out: str) -> dict:
    """The figures of the only space of the last embed run (its ``vlselect-summary`` line)."""
    line = [x for x in out.splitlines() if x.startswith("vlselect-summary ")][-1]
    (result,) = json.loads(line.removeprefix("vlselect-summary "))["spaces"]
    return result


def failed_for_disk(capsys, what: str) -> None:
    err = capsys.readouterr().err
    assert what in err and "run the same command again" in err, err[-2000:]
    # No traceback of ours (a third-party logger may report its own closed-stream errors
    # into the captured stderr; those are the test harness's, not the run's).
    assert "jobs/cli.py" not in err and "failed: RayTaskError" not in err


def test_ingest_onto_a_full_disk_fails_clearly_and_leaves_no_pool(
    small_world, tmpfs, capsys, fault_report
):
    ws = world_workspace(small_world, tmpfs.path / "ws")
    tmpfs.mount("size=256k")  # the pool needs more than this
    assert main(["ingest", "--workspace", str(ws)]) == 1
    failed_for_disk(capsys, "the disk is full")
    assert Pool.find(Workspace.open(str(ws))) is None  # nothing committed
    left = files(ws)
    # Only the uncommitted attempt, for the next run to resume; no temporary left behind.
    assert [f for f in left if not f.startswith(f"pool/{ATTEMPTS}/")] == ["vlselect.yaml"]
    assert not [f for f in left if any(part.startswith(".") for part in f.split("/"))]

    tmpfs.mount("size=64m")
    assert main(["ingest", "--workspace", str(ws)]) == 0
    pool = Pool.open(Workspace.open(str(ws)))
    meta = pool.meta
    assert meta.accepted + meta.rejected == meta.records_in == ROWS
    assert pool.read_table(["id"]).num_rows == meta.accepted
    assert [p.name for p in (ws / "pool" / ATTEMPTS).iterdir()] == [pool.manifest.attempt]
    fault_report(
        injected="ingest onto a 256 KiB disk (ENOSPC)",
        outcome="exit 1, one message; no pool committed, no temporary left; after room: "
        f"{meta.accepted} + {meta.rejected} = {ROWS} rows",
        lost=ROWS - meta.accepted - meta.rejected,
    )


def test_embed_that_fills_the_disk_keeps_only_finished_shards(
    small_world, tmpfs, capsys, fault_report
):
    ws = world_workspace(small_world, tmpfs.path / "ws")
    assert main(["ingest", "--workspace", str(ws), "--chunk-size", "100"]) == 0
    clip = ws / "embeddings" / "clip"
    shards = f"{ATTEMPTS}/*/part-*.parquet"  # the run's finished shards, in its attempt
    args = ["embed", "--workspace", str(ws), "--spaces", "clip"]
    ballast = tmpfs.path / "ballast"

    def fill_the_disk():
        # Once the first shard is finished, take every byte left: the run is mid-way.
        wait_for(lambda: list(clip.glob(shards)), 300, "the first finished shard")
        with contextlib.suppress(OSError), open(ballast, "wb") as f:
            f.write(b"\0" * tmpfs.free())
            f.write(b"\0" * 2**20)  # what the free count did not show (tmpfs pages)

    filler = threading.Thread(target=fill_the_disk, daemon=True)
    filler.start()
    assert main(args) == 1
    filler.join(timeout=60)
    failed_for_disk(capsys, "the disk is full")
    workspace = Workspace.open(str(ws))
    assert EmbeddingSpace.find(workspace, "clip") is None  # nothing committed
    finished = sorted(clip.glob(shards))
    assert 0 < len(finished) < 20, "the disk must fill between the first and the last shard"
    pool_artifact = Pool.open(workspace)
    for shard in finished:  # what looks finished is finished: the whole input shard
        pool_shard = pool_artifact.path(shard.name)
        ids = pq.read_table(shard, columns=["id"]).column("id").to_pylist()
        assert ids == pq.read_table(pool_shard, columns=["id"]).column("id").to_pylist()

    ballast.unlink()
    assert main(args) == 0
    result = summary(capsys.readouterr().out)
    assert result["resumed"] == 100 * len(finished)
    assert result["embedded"] + result["resumed"] == ROWS
    space = EmbeddingSpace.open(workspace, "clip")
    assert space.dir == str(finished[0].parent)  # the interrupted attempt, finished
    ids = space.read_table(["id"]).column("id").to_pylist()
    pool = pool_artifact.read_table(["id"]).column("id").to_pylist()
    assert ids == pool
    fault_report(
        injected="embed fills the disk mid-run (ENOSPC)",
        outcome=f"exit 1, one message; {len(finished)} whole shards kept, none partial; after "
        f"room: resumed {result['resumed']}, embedded {result['embedded']}, {len(ids)} ids once",
        lost=len(set(pool) - set(ids)),
    )


def test_a_read_only_workspace_fails_clearly_and_changes_nothing(
    small_world, tmpfs, capsys, fault_report
):
    ws = world_workspace(small_world, tmpfs.path / "ws")
    assert main(["ingest", "--workspace", str(ws), "--chunk-size", "500"]) == 0
    before = files(ws)
    tmpfs.mount("ro")
    assert main(["embed", "--workspace", str(ws), "--spaces", "clip"]) == 1
    failed_for_disk(capsys, "the filesystem is read-only")
    assert files(ws) == before

    tmpfs.mount("rw")
    assert main(["embed", "--workspace", str(ws), "--spaces", "clip"]) == 0
    space = EmbeddingSpace.open(Workspace.open(str(ws)), "clip")
    assert space.meta.vectors == ROWS == space.read_table(["id"]).num_rows
    fault_report(
        injected="embed into a read-only workspace (EROFS)",
        outcome=f"exit 1, one message, {len(before)} files unchanged; after rw: {ROWS} vectors",
        lost=ROWS - space.meta.vectors,
    )
