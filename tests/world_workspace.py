"""A fresh workspace for the session's small world (the ``small_world`` fixture)."""

from __future__ import annotations

from pathlib import Path

import yaml

from jobs.cli import main


def world_workspace(small_world: Path, ws: Path) -> Path:
    """``ws`` made, holding the world's ``vlselect.yaml`` with ingest reading its source."""
    ws.mkdir()
    config = yaml.safe_load((small_world / "vlselect.yaml").read_text())
    config["ingest"]["source"] = str(small_world / "world" / "source")
    (ws / "vlselect.yaml").write_text(yaml.safe_dump(config))
    return ws


def ingested(small_world: Path, ws: Path, chunk_size: int) -> Path:
    """``world_workspace`` with the pool ingested in shards of ``chunk_size`` rows."""
    world_workspace(small_world, ws)
    assert main(["ingest", "--workspace", str(ws), "--chunk-size", str(chunk_size)]) == 0
    return ws
