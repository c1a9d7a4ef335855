"""Atomic writes: a killed writer leaves nothing a reader takes for a finished file."""

import subprocess
import sys

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from engine.workspace import Workspace, atomic_output, read_parquet_dir

KILLED_MID_WRITE = """
import os, sys
import pyarrow as pa, pyarrow.parquet as pq
from engine.workspace import Workspace, atomic_output
ws = Workspace.open(sys.argv[1])
with atomic_output(ws.fs, ws.path("rounds", "round-0002.parquet")) as tmp:
    writer = pq.ParquetWriter(tmp, pa.schema([("id", pa.string())]))
    writer.write_table(pa.table({"id": ["half"]}))
    os._exit(9)  # killed before the footer and the rename, as ray.kill does
"""


def test_a_writer_killed_mid_write_leaves_only_a_hidden_temporary(tmp_path):
    ws = Workspace.open(str(tmp_path / "ws"))
    ws.write_table(ws.path("rounds", "round-0001.parquet"), pa.table({"id": ["a", "b"]}))
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, ws.root], check=False)
    assert killed.returncode == 9
    left = sorted(p.name for p in (tmp_path / "ws" / "rounds").iterdir())
    assert left[0].startswith(".round-0002.parquet.tmp-") and left[1:] == ["round-0001.parquet"]
    assert not ws.exists("rounds", "round-0002.parquet")
    assert ws.list_files("rounds", suffix=".parquet") == [ws.path("rounds", "round-0001.parquet")]
    assert read_parquet_dir(ws.path("rounds")).column("id").to_pylist() == ["a", "b"]
    # Whole-directory readers skip hidden files, so the half-written one is never opened.
    assert pads.dataset(ws.path("rounds")).to_table().num_rows == 2


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    ws = Workspace.open(str(tmp_path / "ws"))
    path = ws.path("state.json")
    ws.write_json(path, {"round": 1})
    with pytest.raises(RuntimeError, match="disk full"), atomic_output(ws.fs, path) as tmp:
        with ws.fs.open_output_stream(tmp) as out:
            out.write(b'{"round": ')
        raise RuntimeError("disk full")
    assert ws.read_json(path) == {"round": 1}
    assert [p.name for p in (tmp_path / "ws").iterdir()] == ["state.json"]


def test_a_relative_local_workspace_is_absolute_for_workers(tmp_path, monkeypatch):
    """Ray Train's workers run in their own directories: a relative path would name
    another place there (the demo's default ws/demo did)."""
    monkeypatch.chdir(tmp_path)
    ws = Workspace.open("ws/demo")
    assert ws.uri == ws.root == str(tmp_path / "ws" / "demo")
    uri = f"file://{tmp_path}/ws"  # a URI is kept as given: it is absolute already
    assert Workspace.open(uri).uri == uri
