"""The world stage on local Ray: layout, determinism across shard sizes, resume, refusal."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import yaml

from jobs.cli import main


def table(path):
    return pq.read_table(path).sort_by("id")


def test_layout_and_workspace_config(small_world):
    ws = small_world
    meta = json.loads((ws / "world" / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["splits"]["pool"] == 2000
    assert table(ws / "world" / "source").num_rows == 2000
    truth = table(ws / "world" / "truth" / "pool")
    assert truth.num_rows == 2000 and set(truth.column("split").to_pylist()) == {"pool"}
    assert len(set(truth.column("family").to_pylist())) >= 9
    assert len(set(d for d in truth.column("domain").to_pylist() if d)) >= 4
    benches = {p.stem for p in (ws / "benchmarks").glob("*.parquet")}
    assert {"test", "bench_counting", "bench_spatial", "bench_space", "bench_snow"} <= benches
    assert not (ws / "world" / "parts").exists()
    cfg = yaml.safe_load((ws / "vlselect.yaml").read_text())
    assert cfg["world"]["size"] == 2000 and cfg["ingest"]["source"] == "world/source"
    llava = json.loads((ws / "world" / "llava" / "pool.json").read_text())
    assert len(llava) == 2000
    with_image = [r for r in llava if "image" in r]
    assert all((ws / "world" / "llava" / r["image"]).is_file() for r in with_image[:50])


def test_same_seed_same_bytes_whatever_the_shard_size(ray_session, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    base = ["--size", "300", "--set", "test_size=50", "--set", "benchmarks=[]"]
    assert main(["world", "--out", str(a), *base, "--shard-size", "300"]) == 0
    assert main(["world", "--out", str(b), *base, "--shard-size", "70"]) == 0
    assert len(list((b / "world" / "source").glob("*.parquet"))) == 5
    assert table(a / "world" / "source").equals(table(b / "world" / "source"))
    assert table(a / "benchmarks" / "test.parquet").equals(table(b / "benchmarks" / "test.parquet"))
    c = tmp_path / "c"
    assert main(["world", "--out", str(c), *base, "--seed", "1"]) == 0
    assert not table(a / "world" / "source").equals(table(c / "world" / "source"))


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
    before = table(ws / "world" / "source")
    (ws / "world" / "truth" / "pool" / "part-00002.parquet").unlink()  # as if killed mid-shard
    capsys.readouterr()
    assert main(args) == 0
    assert "4 (3 already done)" in capsys.readouterr().out
    assert table(ws / "world" / "source").equals(before)
    assert main([*args, "--seed", "9"]) == 2
    assert "another config" in capsys.readouterr().err
    assert main([*args, "--seed", "9", "--overwrite"]) == 0


def test_bad_world_config_exits_2_before_writing(ray_session, tmp_path, capsys):
    ws = tmp_path / "ws"
    assert main(["world", "--out", str(ws), "--set", "families={telepathy: 1}"]) == 2
    assert "telepathy" in capsys.readouterr().err
    assert main(["world", "--out", str(ws), "--set", "sise=10"]) == 2
    assert "unknown key 'sise'" in capsys.readouterr().err
    assert not ws.exists()
