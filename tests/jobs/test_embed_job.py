"""The embed stage on local Ray: one vector per pool id per space, resume, start-over, errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.artifacts import EmbeddingSpace, Pool
from engine.commit import MANIFEST
from engine.shards import PARTS_DIR
from engine.vectors import from_arrow
from engine.workspace import Workspace
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
    return Pool.open(Workspace.open(str(ws))).read_table(["id"]).column("id").to_pylist()


def space(ws: Path, name: str) -> EmbeddingSpace:
    return EmbeddingSpace.open(Workspace.open(str(ws)), name)


def space_table(ws: Path, name: str):
    return space(ws, name).read_table()


def summary(out: str) -> dict:
    """The last run's figures of its only space (its ``vlselect-summary`` line)."""
    line = [x for x in out.splitlines() if x.startswith("vlselect-summary ")][-1]
    (result,) = json.loads(line.removeprefix("vlselect-summary "))["spaces"]
    return result


@pytest.mark.parametrize(("name", "dim"), [("clip", 64), ("dino", 64), ("text", 384)])
def test_one_normalised_vector_per_pool_id_in_pool_order(pool_ws, name, dim):
    table = space_table(pool_ws, name)
    assert table.column("id").to_pylist() == pool_ids(pool_ws)  # each id once, pool order
    vectors = from_arrow(table.column("vector"))
    assert vectors.shape == (2000, dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    found = space(pool_ws, name)
    meta = found.meta
    assert meta.space == name and meta.vectors == 2000 and meta.shards == 4 and meta.dim == dim
    assert meta.weights == ("pretrained" if name == "text" else "random")
    assert len(found.files(suffix=".parquet")) == 4
    assert found.manifest.inputs == {"pool": Pool.open(found.ws).fingerprint}
    assert not [f for f in found.manifest.files if f.startswith(PARTS_DIR)]


def test_a_committed_space_keeps_no_parts_folder(pool_ws):
    assert not os.path.exists(space(pool_ws, "clip").path(PARTS_DIR))


def test_text_space_reads_questions_not_answer_formats(pool_ws):
    table = space_table(pool_ws, "text")
    vectors = from_arrow(table.column("vector"))
    pool = Pool.open(Workspace.open(str(pool_ws)))
    questions = pool.read_table(["question"]).column("question")
    same = [i for i, q in enumerate(questions.to_pylist()) if q == questions[0].as_py()]
    assert len(same) > 1
    np.testing.assert_allclose(vectors[same] @ vectors[same[0]], 1.0, atol=1e-5)


def test_interrupted_run_resumes_finished_shards_and_writes_no_id_twice(pool_ws, tmp_path, capsys):
    ws = tmp_path / "ws"
    shutil.copytree(pool_ws, ws)
    first = space(ws, "clip")
    clip = Path(first.dir)
    before = space_table(ws, "clip")
    # What a killed run leaves: its attempt uncommitted, one shard never finished, a
    # stray part of it on disk.
    (ws / "embeddings" / "clip" / MANIFEST).unlink()
    (clip / "part-000002.parquet").unlink()
    (clip / PARTS_DIR).mkdir(exist_ok=True)
    stray = pq.read_table(space(pool_ws, "clip").path("part-000002.parquet")).slice(0, 7)
    pq.write_table(stray, clip / PARTS_DIR / "part-000002.deadbeef.parquet")
    mtimes = {p.name: p.stat().st_mtime_ns for p in clip.glob("part-*.parquet")}
    assert len(mtimes) == 3

    # Two actors holding 1.6 of the session's 2 CPUs: the read and decode tasks must
    # still be scheduled (a pipeline that needs a whole CPU for them hangs here).
    pool = ["--set", "clip.min_actors=2", "--set", "clip.max_actors=2"]
    pool += ["--set", "clip.actor.num_cpus=0.8", "--set", "preprocess.num_cpus=0.2"]
    capsys.readouterr()
    assert main(["embed", "--workspace", str(ws), "--spaces", "clip", *pool]) == 0
    result = summary(capsys.readouterr().out)
    assert (result["embedded"], result["resumed"]) == (SHARD_ROWS, 2000 - SHARD_ROWS)
    resumed = space(ws, "clip")
    assert resumed.dir == first.dir and resumed.fingerprint == first.fingerprint
    assert resumed.meta.vectors == 2000 and not list(clip.glob(f"{PARTS_DIR}/*"))  # stray gone
    after = space_table(ws, "clip")
    assert after.column("id").to_pylist() == pool_ids(ws)
    np.testing.assert_allclose(
        from_arrow(after.column("vector")), from_arrow(before.column("vector")), atol=1e-6
    )
    assert {
        p.name: p.stat().st_mtime_ns for p in clip.glob("part-*.parquet") if p.name in mtimes
    } == mtimes


def test_a_changed_encoder_starts_the_space_over(pool_ws, tmp_path, capsys):
    ws = tmp_path / "ws"
    shutil.copytree(pool_ws, ws)
    args = ["embed", "--workspace", str(ws), "--spaces", "dino"]
    original = space(ws, "dino")
    capsys.readouterr()
    assert main([*args, "--set", "dino.encoder.seed=7"]) == 0
    result = summary(capsys.readouterr().out)
    assert (result["embedded"], result["resumed"]) == (2000, 0)
    changed = space(ws, "dino")
    assert changed.dir != original.dir and changed.fingerprint != original.fingerprint
    assert not os.path.exists(original.dir)  # the replaced attempt is deleted on commit
    assert not np.allclose(
        from_arrow(changed.read_table().column("vector")),
        from_arrow(space_table(pool_ws, "dino").column("vector")),
    )
    assert main([*args, "--set", "dino.encoder.seed=7"]) == 0  # current: nothing recomputed
    result = summary(capsys.readouterr().out)
    assert (result["embedded"], result["resumed"]) == (0, 2000)
    assert space(ws, "dino").manifest == changed.manifest


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
