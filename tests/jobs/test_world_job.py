"""The world stage on local Ray: layout, determinism across shard sizes, resume, refusal."""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

import yaml

from engine.artifacts import World
from engine.commit import ATTEMPTS, MANIFEST, SCRATCH
from engine.workspace import Workspace
from jobs.cli import main


def world(ws: Path) -> World:
    return World.open(Workspace.open(str(ws)))


def table(found: World, under: str):
    return found.read_table(under=under).sort_by("id")


def test_layout_and_workspace_config(small_world):
    ws = small_world
    found = world(ws)
    meta = found.meta
    assert meta.splits["pool"] == meta.pool_size == 2000 and meta.llava_json
    assert table(found, "source").num_rows == 2000
    truth = table(found, "truth/pool")
    assert truth.num_rows == 2000 and set(truth.column("split").to_pylist()) == {"pool"}
    assert len(set(truth.column("family").to_pylist())) >= 9
    assert len(set(d for d in truth.column("domain").to_pylist() if d)) >= 4
    benches = {PurePosixPath(p).stem for p in found.files("benchmarks", ".parquet")}
    assert {"test", "bench_counting", "bench_spatial", "bench_space", "bench_snow"} <= benches
    assert set(meta.benchmarks) == benches
    assert os.path.isfile(found.benchmark("test"))
    # The generated parts of the held-out splits were scratch: neither kept nor committed.
    assert not os.path.exists(found.path(SCRATCH))
    assert not [f for f in found.manifest.files if f.startswith(("_", "."))]
    assert os.listdir(ws / "world" / ATTEMPTS) == [found.manifest.attempt]
    cfg = yaml.safe_load((ws / "vlselect.yaml").read_text())
    assert cfg["world"]["size"] == 2000
    assert cfg["ingest"]["source"] == found.uri("source") == found.path("source")
    assert os.path.isabs(cfg["ingest"]["source"]) and os.path.isdir(cfg["ingest"]["source"])
    llava = json.loads(Path(found.path("llava", "pool.json")).read_text())
    assert len(llava) == 2000
    with_image = [r for r in llava if "image" in r]
    assert all(os.path.isfile(found.path("llava", r["image"])) for r in with_image[:50])


def test_same_seed_same_bytes_whatever_the_shard_size(ray_session, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    base = ["--size", "300", "--set", "test_size=50", "--set", "benchmarks=[]"]
    assert main(["world", "--out", str(a), *base, "--shard-size", "300"]) == 0
    assert main(["world", "--out", str(b), *base, "--shard-size", "70"]) == 0
    wa, wb = world(a), world(b)
    assert len(wb.files("source", ".parquet")) == 5
    assert table(wa, "source").equals(table(wb, "source"))
    test_a = wa.read_table(under="benchmarks").sort_by("id")
    assert test_a.num_rows == 50 and wa.files("benchmarks") == [wa.benchmark("test")]
    assert test_a.equals(wb.read_table(under="benchmarks").sort_by("id"))
    c = tmp_path / "c"
    assert main(["world", "--out", str(c), *base, "--seed", "1"]) == 0
    assert not table(wa, "source").equals(table(world(c), "source"))


def test_resume_skips_finished_shards_and_refuses_another_config(ray_session, tmp_path, capsys):
    ws = tmp_path / "ws"
    args = [
        "world",
        "--out",
        str(ws),
        "--size",
        "400",
        "--shard-size",
        "100",
        "--set",
        "test_size=0",
        "--set",
        "benchmarks=[]",
    ]
    assert main(args) == 0
    first = world(ws)
    before = table(first, "source")
    capsys.readouterr()
    # The same inputs and config: the committed world, nothing recomputed.
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "current, nothing recomputed" in out and "4 (4 already done)" in out
    assert world(ws).manifest == first.manifest
    # As if killed mid-shard, before the commit: no manifest, one shard unfinished.
    stamps = {Path(p).name: os.stat(p).st_mtime_ns for p in first.files("source")}
    (ws / "world" / MANIFEST).unlink()
    Path(first.path("truth", "pool", "part-00002.parquet")).unlink()
    assert World.find(Workspace.open(str(ws))) is None
    assert main(args) == 0
    assert "4 (3 already done)" in capsys.readouterr().out
    resumed = world(ws)
    assert resumed.dir == first.dir and resumed.fingerprint == first.fingerprint
    assert table(resumed, "source").equals(before)
    after = {Path(p).name: os.stat(p).st_mtime_ns for p in resumed.files("source")}
    redone = {name for name in stamps if after[name] != stamps[name]}
    assert redone == {"part-00002.parquet"}  # the finished shards were kept, not rewritten
    # Another config is refused, and the committed world stays as it was.
    assert main([*args, "--seed", "9"]) == 2
    assert "another config" in capsys.readouterr().err
    assert world(ws).manifest == resumed.manifest
    # --overwrite starts a new attempt, which replaces the old one once committed.
    assert main([*args, "--seed", "9", "--overwrite"]) == 0
    replaced = world(ws)
    assert replaced.meta.seed == 9 and replaced.fingerprint != first.fingerprint
    assert replaced.dir != first.dir and not os.path.exists(first.dir)
    assert os.listdir(ws / "world" / ATTEMPTS) == [replaced.manifest.attempt]
    assert not table(replaced, "source").equals(before)


def test_bad_world_config_exits_2_before_writing(ray_session, tmp_path, capsys):
    ws = tmp_path / "ws"
    assert main(["world", "--out", str(ws), "--set", "families={telepathy: 1}"]) == 2
    assert "telepathy" in capsys.readouterr().err
    assert main(["world", "--out", str(ws), "--set", "sise=10"]) == 2
    assert "unknown key 'sise'" in capsys.readouterr().err
    assert not ws.exists()
