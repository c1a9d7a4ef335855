"""The embed stage on local Ray: one vector per pool id per space, resume, start-over, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from engine.vectors import from_arrow
from engine.workspace import read_parquet_dir
from jobs.cli import main
from tests.world_workspace import ingested

SHARD_ROWS = 500


@pytest.fixture(scope="module")
def pool_ws(small_world, tmp_path_factory) -> Path:
    """The 2,000-sample world ingested in shards of 500 rows, with the world's embed config."""
    ws = ingested(small_world, tmp_path_factory.mktemp("embed") / "ws", SHARD_ROWS)
    assert main(["embed", "--workspace", str(ws), "--spaces", "clip,dino,text"]) == 0
    return ws


def pool_ids(ws: Path) -> list[str]:
    return read_parquet_dir(str(ws / "pool"), columns=["id"]).column("id").to_pylist()


def space_table(ws: Path, space: str):
    return read_parquet_dir(str(ws / "embeddings" / space))


@pytest.mark.parametrize(("space", "dim"), [("clip", 64), ("dino", 64), ("text", 384)])
def test_one_normalised_vector_per_pool_id_in_pool_order(pool_ws, space, dim):
    table = space_table(pool_ws, space)
    assert table.column("id").to_pylist() == pool_ids(pool_ws)  # each id once, pool order
    vectors = from_arrow(table.column("vector"))
    assert vectors.shape == (2000, dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    meta = yaml.safe_load((pool_ws / "embeddings" / space / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["vectors"] == 2000 and meta["shards"] == 4
    assert meta["weights"] == ("pretrained" if space == "text" else "random")
    assert not (pool_ws / "embeddings" / space / "_parts").exists()


def test_text_space_reads_questions_not_answer_formats(pool_ws):
    table = space_table(pool_ws, "text")
    vectors = from_arrow(table.column("vector"))
    questions = read_parquet_dir(str(pool_ws / "pool"), columns=["question"]).column("question")
    same = [i for i, q in enumerate(questions.to_pylist()) if q == questions[0].as_py()]
    assert len(same) > 1
    np.testing.assert_allclose(vectors[same] @ vectors[same[0]], 1.0, atol=1e-5)


def test_interrupted_run_resumes_finished_shards_and_writes_no_id_twice(pool_ws, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(pool_ws, ws)
    clip = ws / "embeddings" / "clip"
    before = space_table(ws, "clip")
    # What a killed run leaves: one shard never finished, a stray part of it on disk.
    (clip / "part-000002.parquet").unlink()
    (clip / "_parts").mkdir()
    stray = pq.read_table(pool_ws / "embeddings" / "clip" / "part-000002.parquet").slice(0, 7)
    pq.write_table(stray, clip / "_parts" / "part-000002.deadbeef.parquet")
    mtimes = {p.name: p.stat().st_mtime_ns for p in clip.glob("part-*.parquet")}

    # Two actors holding 1.6 of the session's 2 CPUs: the read and decode tasks must
    # still be scheduled (a pipeline that needs a whole CPU for them hangs here).
    pool = ["--set", "clip.min_actors=2", "--set", "clip.max_actors=2"]
    pool += ["--set", "clip.actor.num_cpus=0.8", "--set", "preprocess.num_cpus=0.2"]
    assert main(["embed", "--workspace", str(ws), "--spaces", "clip", *pool]) == 0
    meta = yaml.safe_load((clip / "meta.json").read_text())
    assert (meta["embedded"], meta["resumed"]) == (SHARD_ROWS, 2000 - SHARD_ROWS)
    after = space_table(ws, "clip")
    assert after.column("id").to_pylist() == pool_ids(ws)
    np.testing.assert_allclose(
        from_arrow(after.column("vector")), from_arrow(before.column("vector")), atol=1e-6
    )
    assert {
        p.name: p.stat().st_mtime_ns for p in clip.glob("part-*.parquet") if p.name in mtimes
    } == mtimes


def test_a_changed_encoder_starts_the_space_over(pool_ws, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(pool_ws, ws)
    args = ["embed", "--workspace", str(ws), "--spaces", "dino"]
    assert main([*args, "--set", "dino.encoder.seed=7"]) == 0
    meta = yaml.safe_load((ws / "embeddings" / "dino" / "meta.json").read_text())
    assert (meta["embedded"], meta["resumed"]) == (2000, 0)
    changed = from_arrow(space_table(ws, "dino").column("vector"))
    original = from_arrow(space_table(pool_ws, "dino").column("vector"))
    assert not np.allclose(changed, original)
    assert main([*args, "--set", "dino.encoder.seed=7"]) == 0  # current: nothing recomputed
    meta = yaml.safe_load((ws / "embeddings" / "dino" / "meta.json").read_text())
    assert (meta["embedded"], meta["resumed"]) == (0, 2000)


def test_missing_inputs_and_weights_are_clear_errors(pool_ws, tmp_path, capsys):
    assert main(["embed", "--workspace", str(tmp_path / "empty"), "--spaces", "text"]) == 2
    assert "vlselect ingest" in capsys.readouterr().err
    ws = tmp_path / "ws"
    shutil.copytree(pool_ws / "pool", ws / "pool")
    assert main(["embed", "--workspace", str(ws), "--spaces", "skill"]) == 2
    assert "vlselect skills" in capsys.readouterr().err
    code = main(
        [
            "embed",
            "--workspace",
            str(ws),
            "--spaces",
            "dino",
            "--set",
            "dino.encoder.model=/nowhere/dinov2",
        ]
    )
    assert code == 2 and "/nowhere/dinov2" in capsys.readouterr().err
    assert main(["embed", "--workspace", str(ws), "--spaces", "colour"]) == 2
    assert not (ws / "embeddings").exists()
