"""``vlselect cluster`` on local Ray: planted clusters found, every row once, resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.artifacts import Clustering, EmbeddingSpace
from engine.commit import MANIFEST, STATE_FILE
from engine.vectors import l2_normalize
from engine.workspace import Workspace
from jobs.cli import main
from tests.synthetic_space import write_space

ROWS, SHARD_ROWS, PLANTED = 1200, 400, 8


def planted_spaces(seed: int = 0):
    """ids, dino (n, 32), text (n, 16), planted label (n,): both spaces follow the labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, PLANTED, ROWS)
    spaces = {}
    for name, dim in (("dino", 32), ("text", 16)):
        means = l2_normalize(rng.standard_normal((PLANTED, dim)))
        noise = rng.standard_normal((ROWS, dim)) * 0.2 / np.sqrt(dim)
        spaces[name] = l2_normalize(means[labels] + noise)
    return [f"s{i:05d}" for i in range(ROWS)], spaces["dino"], spaces["text"], labels


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    ws = tmp_path_factory.mktemp("cluster") / "ws"
    ids, dino, text, labels = planted_spaces()
    write_space(ws, "dino", dino, ids=ids, shard_rows=SHARD_ROWS)
    write_space(ws, "text", text, ids=ids, shard_rows=SHARD_ROWS)
    return ws, ids, dino, text, labels


def clustering(ws: Path, name: str) -> Clustering:
    return Clustering.open(Workspace.open(str(ws)), name)


def figures(found: Clustering) -> dict:
    """The clustering's meta and its run's figures in one mapping."""
    return {**found.meta.summary, **found.meta.model_dump(exclude={"summary"})}


def run(ws: Path, *flags: str) -> int:
    return main(["cluster", "--workspace", str(ws), *flags])


def copy_ws(planted, tmp_path) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(planted[0] / "embeddings", ws / "embeddings")
    return ws


@pytest.mark.parametrize(
    "max_sample",
    [ROWS, 600],
    ids=["sample-is-the-pool: the fit assigns", "partial-sample: streamed assignment"],
)
def test_planted_clusters_are_found_and_every_row_is_assigned_once(
    ray_session, planted, max_sample
):
    ws, ids, dino, text, labels = planted
    name = f"p{max_sample}"
    flags = ("--set", "init=kmeans++", "--set", f"max_sample={max_sample}")
    assert run(ws, "--name", name, "--k", "8", *flags) == 0
    out = clustering(ws, name)
    table = out.read_table(under="assignments")
    assert table.column("id").to_pylist() == ids  # each id once, in pool order
    cluster = table.column("cluster").to_numpy()
    for c in range(PLANTED):
        assert np.bincount(cluster[labels == c]).max() == (labels == c).sum()
    centroids = np.load(out.path("centroids.npy"), allow_pickle=False)
    assert centroids.shape == (8, 48) and centroids.dtype == np.float32
    combined = np.concatenate([dino, text], axis=1) / np.sqrt(2)
    np.testing.assert_allclose(
        table.column("similarity").to_numpy(),
        (combined * centroids[cluster]).sum(axis=1),
        atol=1e-5,
    )
    meta = figures(out)
    assert meta["k"] == 8 and meta["sample_rows"] == max_sample
    assert sum(meta["sizes"]) == meta["rows_assigned"] == meta["rows_in"] == ROWS
    assert meta["rows_excluded"] == 0 and meta["small_clusters"]["empty"] == []
    assert 1 <= len(meta["objective"]) <= 50 and meta["objective"][-1] >= meta["objective"][0]


def test_a_rerun_is_current_and_a_lost_shard_is_redone_alone(ray_session, planted, tmp_path):
    ws = copy_ws(planted, tmp_path)
    assert run(ws, "--name", "r", "--k", "4") == 0
    first = clustering(ws, "r")
    out = Path(first.dir)
    before = {p.name: p.read_bytes() for p in (out / "assignments").iterdir()}
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "assignments").iterdir()}
    assert run(ws, "--name", "r", "--k", "4") == 0  # current: nothing rewritten
    assert clustering(ws, "r").manifest == first.manifest
    assert {p.name: p.stat().st_mtime_ns for p in (out / "assignments").iterdir()} == stamps
    # A run killed while assigning: fitted (its state saved), one shard not yet written,
    # nothing committed.
    (out.parent.parent / MANIFEST).unlink()
    (out / "assignments" / "part-000001.parquet").unlink()
    fit = json.loads((out / STATE_FILE).read_text())
    assert run(ws, "--name", "r", "--k", "4") == 0
    resumed = clustering(ws, "r")
    assert resumed.dir == first.dir  # the same attempt, finished
    assert resumed.meta.summary["fit_seconds"] == fit["fit_seconds"]  # not fitted again
    after = {p.name: p.read_bytes() for p in (out / "assignments").iterdir()}
    assert after == before
    assert (out / "assignments" / "part-000000.parquet").stat().st_mtime_ns == stamps[
        "part-000000.parquet"
    ]
    # A different seed is a different clustering: started over.
    assert run(ws, "--name", "r", "--k", "4", "--seed", "7") == 0
    again = clustering(ws, "r")
    assert again.meta.config["seed"] == 7 and again.fingerprint != first.fingerprint


def test_unusable_rows_refused_or_excluded_and_counted(ray_session, planted, tmp_path, capsys):
    ws = copy_ws(planted, tmp_path)
    ids, text = planted[1], planted[3]
    text = text.copy()
    text[5] = np.nan
    shutil.rmtree(ws / "embeddings" / "text")
    write_space(ws, "text", text, ids=ids, shard_rows=SHARD_ROWS, drop=frozenset({10, 11, 12}))
    assert run(ws, "--name", "bad", "--k", "4") == 2
    err = capsys.readouterr().err
    assert "4 of 1200 rows cannot be clustered" in err
    assert "3 rows missing in text" in err and "1 rows NaN, inf or zero vector in text" in err
    assert Clustering.find(Workspace.open(str(ws)), "bad") is None

    assert run(ws, "--name", "bad", "--k", "4", "--set", "on_bad_rows=exclude") == 0
    out = clustering(ws, "bad")
    meta = figures(out)
    assert meta["rows_in"] == ROWS == meta["rows_assigned"] + meta["rows_excluded"]
    assert meta["rows_excluded"] == 4
    excluded = out.read_table(under="excluded").to_pydict()
    assert dict(zip(excluded["id"], excluded["reason"], strict=True)) == {
        ids[5]: "NaN, inf or zero vector in text",
        ids[10]: "missing in text",
        ids[11]: "missing in text",
        ids[12]: "missing in text",
    }


def test_small_clusters_merged_into_their_neighbours(ray_session, planted, tmp_path):
    ws = copy_ws(planted, tmp_path)
    flags = ["--name", "m", "--k", "12", "--set", "min_cluster_size=100"]
    assert run(ws, *flags, "--set", "small_clusters=merge") == 0
    merged = clustering(ws, "m")
    meta = figures(merged)
    assert meta["k_requested"] == 12 and meta["k"] < 12
    assert min(meta["sizes"]) >= 100 and sum(meta["sizes"]) == ROWS
    dropped = [c for m in meta["merged"] for c in m["dropped"]]
    assert len(dropped) == 12 - meta["k"]
    table = merged.read_table(under="assignments")
    assert table.num_rows == ROWS and table.column("cluster").to_numpy().max() == meta["k"] - 1
    assert np.load(merged.path("centroids.npy")).shape[0] == meta["k"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--name", "x", "--spaces", "clip"], "space 'clip' is not embedded"),
        (["--name", "x", "--k", "5000"], "k=5000 clusters but space 'dino' holds 1200 rows"),
        (["--k", "4"], "no clustering name"),
        (["--name", "x", "--spaces", "dino,nope"], "invalid cluster config"),
        (["--name", "x", "--set", "weights={clip: 2}"], "weights given for spaces not clustered"),
        (["--name", "x", "--set", "gpu=true"], "the fit task asks for none: set fit.num_gpus=1"),
    ],
)
def test_bad_input_exits_2_with_the_reason(ray_session, planted, flags, message, capsys):
    assert run(planted[0], *flags) == 2
    assert message in capsys.readouterr().err


def test_spaces_sharded_differently_or_unfinished_are_refused(planted, tmp_path, capsys):
    ws = copy_ws(planted, tmp_path)
    ids, _, text = planted[1], planted[2], planted[3]
    shutil.rmtree(ws / "embeddings" / "text")
    write_space(ws, "text", text, ids=ids, shard_rows=300)
    assert run(ws, "--name", "x") == 2
    assert "sharded differently (3 vs 4 shards" in capsys.readouterr().err
    (ws / "embeddings" / "dino" / MANIFEST).unlink()  # as if killed before its commit
    assert run(ws, "--name", "x") == 2
    assert "space 'dino' did not finish" in capsys.readouterr().err


def test_wrong_dimension_in_one_shard_is_named(ray_session, planted, tmp_path, capsys):
    ws = copy_ws(planted, tmp_path)
    shard = Path(EmbeddingSpace.open(Workspace.open(str(ws)), "text").path("part-000002.parquet"))
    table = pq.read_table(shard)
    ids = table.column("id").to_pylist()
    write_space(tmp_path / "short", "text", np.ones((400, 8)), ids=ids, shard_rows=400)
    short = EmbeddingSpace.open(Workspace.open(str(tmp_path / "short")), "text")
    shutil.copy(short.path("part-000000.parquet"), shard)
    assert run(ws, "--name", "x", "--k", "4") == 2
    err = capsys.readouterr().err
    assert "malformed" in err and "part-000002.parquet: vectors of length 8, expected 16" in err
