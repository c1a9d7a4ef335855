"""A fresh workspace for the session's small world (the ``small_world`` fixture)."""

from __future__ import annotations

from pathlib import Path

import yaml

from engine.artifacts import World
from engine.workspace import Workspace
from jobs.cli import main


def world_source(small_world: Path) -> str:
    """The small world's committed ``source/`` folder (the pool as Parquet)."""
    return World.open(Workspace.open(str(small_world))).uri("source")


def world_workspace(small_world: Path, ws: Path) -> Path:
    """``ws`` made, holding the world's ``vlselect.yaml`` with ingest reading its source."""
    ws.mkdir()
    config = yaml.safe_load((small_world / "vlselect.yaml").read_text())
    assert config["ingest"]["source"] == world_source(small_world)  # absolute: usable from ws
    (ws / "vlselect.yaml").write_text(yaml.safe_dump(config))
    return ws


def ingested(small_world: Path, ws: Path, chunk_size: int) -> Path:
    """``world_workspace`` with the pool ingested in shards of ``chunk_size`` rows."""
    world_workspace(small_world, ws)
    assert main(["ingest", "--workspace", str(ws), "--chunk-size", str(chunk_size)]) == 0
    return ws
