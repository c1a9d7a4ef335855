"""The whole pipeline on an ``s3://`` workspace (a real S3-compatible server on loopback,
tests/s3_server.py) and on local disk, artifact by artifact equal.

world, ingest, embed (clip, text), skills (and its skill space), cluster, index, search,
target, base and progress (Ray Train's storage on the bucket) run through the CLI as a
user runs them; every input a stage takes by path (the world's source, the benchmark,
the query file, search's output) is a URI on the bucket in the S3 run.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from engine.artifacts import (
    BaseModelArtifact,
    Clustering,
    EmbeddingSpace,
    Index,
    Pool,
    ProgressRun,
    Selection,
    Skills,
    World,
)
from engine.workspace import Location, Workspace
from jobs.cli import main
from tests.engine.test_llava import TINY, TINY_TRAIN
from tests.jobs.test_progress_job import TINY_RUN

# The module's fixture runs every stage twice (about 6 min a pass on 2 CPUs, the skills LLM
# and target's benchmark descriptions most of it): above the suite's 600 s a test.
pytestmark = pytest.mark.timeout(1500)

POOL = 200
SKILL_ROWS = 40  # the skills LLM on CPU is the slow stage: the first rows only
BUDGET = 20


def run(argv: list[str]) -> dict:
    """``vlselect ARGV`` in this process; its summary. Fails with the command's stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == 0, f"vlselect {' '.join(argv)}\n{err.getvalue()[-3000:]}"
    line = [x for x in out.getvalue().splitlines() if x.startswith("vlselect-summary ")][-1]
    return json.loads(line.removeprefix("vlselect-summary "))


def pipeline(uri: str, files: str, tmp_path) -> Workspace:
    """Every stage on the workspace ``uri``; ``files`` is where the user's own files go
    (the query vectors, search's output): a folder path or URI prefix."""
    ws = Workspace.open(uri)
    config = tmp_path / "pipeline.yaml"
    progress = {**TINY_RUN, "spaces": ["clip", "text"], "budget": 0.2}
    config.write_text(yaml.safe_dump({"base": {"model": TINY, "train": TINY_TRAIN},
                                      "progress": progress}))  # fmt: skip
    common = ["--workspace", uri, "--config", str(config)]
    run(["world", "--out", uri, "--size", str(POOL)])
    run(["ingest", *common])
    run(["embed", *common, "--spaces", "clip,text"])
    run(["skills", *common, "--limit", str(SKILL_ROWS)])
    run(["cluster", *common, "--set", "name=c", "--set", "k=5", "--set", "spaces=[clip,text]"])
    run(["index", *common, "--space", "clip", "--set", "shards=2"])
    run(["index", *common, "--space", "skill"])
    queries = Location.of(_join(files, "queries.npy"))
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(0).standard_normal((7, 64)).astype(np.float32))
    with queries.fs.open_output_stream(queries.path) as f:
        f.write(buffer.getvalue())
    out = _join(files, "neighbours.parquet")
    run(["search", *common, "--space", "clip", "--queries", queries.uri, "--out", out,
         "-k", "5"])  # fmt: skip
    # a benchmark of the user's own: 12 questions (the LLM describes each one's skills)
    bench = Location.of(_join(files, "bench.parquet"))
    held_out = pq.read_table(World.open(ws).benchmark("bench_space"), filesystem=ws.fs)
    pq.write_table(held_out.slice(0, 12), bench.path, filesystem=bench.fs)
    run(["target", *common, "--name", "t", "--benchmark", bench.uri, "--budget", str(BUDGET)])
    run(["base", *common])
    run(["progress", *common, "--name", "p"])
    return ws


def _join(prefix: str, name: str) -> str:
    if "?" in prefix:
        path, query = prefix.split("?", 1)
        return f"{path}/{name}?{query}"
    return f"{prefix}/{name}"


@pytest.fixture(scope="module")
def both(ray_session, s3_server, tmp_path_factory):
    """(local workspace, S3 workspace, local files, S3 files) after the whole pipeline."""
    local_files = str(tmp_path_factory.mktemp("files"))
    local = pipeline(str(tmp_path_factory.mktemp("local") / "ws"), local_files,
                     tmp_path_factory.mktemp("cfg"))  # fmt: skip
    s3_files = s3_server.uri("files")
    remote = pipeline(s3_server.uri("ws"), s3_files, tmp_path_factory.mktemp("cfg"))
    return local, remote, local_files, s3_files


def _table(found, columns=None, under=""):
    return found.read_table(columns, under=under).sort_by("id")


def test_world_pool_and_rejects_are_equal(both):
    local, remote, *_ = both
    for ws in (local, remote):
        assert World.open(ws).meta.pool_size == POOL
    a, b = World.open(local), World.open(remote)
    assert _table(a, under="source").equals(_table(b, under="source"))
    assert _table(Pool.open(local)).equals(_table(Pool.open(remote)))
    assert Pool.open(remote).meta.accepted + Pool.open(remote).meta.rejected == POOL
    assert Pool.open(local).meta.rejected_by_reason == Pool.open(remote).meta.rejected_by_reason


@pytest.mark.parametrize("space", ["clip", "text", "skill"])
def test_embedding_spaces_hold_the_same_ids_and_vectors(both, space):
    local, remote, *_ = both
    a = _table(EmbeddingSpace.open(local, space))
    b = _table(EmbeddingSpace.open(remote, space))
    assert a.column("id").equals(b.column("id"))
    va = np.stack(a.column("vector").to_numpy(zero_copy_only=False))
    vb = np.stack(b.column("vector").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(va, vb, atol=1e-5)
    expected = SKILL_ROWS if space == "skill" else POOL
    assert EmbeddingSpace.open(remote, space).meta.vectors == expected


def test_skills_are_equal(both):
    local, remote, *_ = both
    a, b = Skills.open(local), Skills.open(remote)
    assert a.meta.ok == b.meta.ok == SKILL_ROWS
    columns = ["id", "skills", "skill_text", "status"]
    assert _table(a, columns).equals(_table(b, columns))


def test_clustering_index_and_search_are_equal(both):
    local, remote, local_files, s3_files = both
    a, b = Clustering.open(local, "c"), Clustering.open(remote, "c")
    assert _table(a, ["id", "cluster"], "assignments").equals(
        _table(b, ["id", "cluster"], "assignments")
    )
    for space in ("clip", "skill"):
        ia, ib = Index.open(local, space), Index.open(remote, space)
        assert ia.meta.rows_per_shard == ib.meta.rows_per_shard
        for fa, fb in zip(ia.files(suffix=".ids.parquet"), ib.files(suffix=".ids.parquet"),
                          strict=True):  # fmt: skip
            assert pq.read_table(fa).equals(pq.read_table(fb, filesystem=remote.fs))
    out_a = Location.of(_join(local_files, "neighbours.parquet"))
    out_b = Location.of(_join(s3_files, "neighbours.parquet"))
    ta = pq.read_table(out_a.path, filesystem=out_a.fs)
    tb = pq.read_table(out_b.path, filesystem=out_b.fs)
    assert ta.num_rows == 7 * 5
    assert ta.column("id").equals(tb.column("id"))
    np.testing.assert_allclose(ta.column("score").to_numpy(), tb.column("score").to_numpy(),
                               atol=1e-5)  # fmt: skip


def test_targeted_selection_is_equal(both):
    local, remote, *_ = both
    a, b = Selection.open(local, "t"), Selection.open(remote, "t")
    ids_a = local.read_bytes(a.path("ids.txt")).decode().split()
    ids_b = remote.read_bytes(b.path("ids.txt")).decode().split()
    assert len(ids_a) == BUDGET and ids_a == ids_b
    assert (
        a.meta.summary["benchmarks"][0]["prediction"]
        == (b.meta.summary["benchmarks"][0]["prediction"])
    )


def test_base_and_progress_run_on_the_bucket(both):
    local, remote, *_ = both
    ba, bb = (
        BaseModelArtifact.open(local, "tiny-llava"),
        BaseModelArtifact.open(remote, "tiny-llava"),
    )
    assert ba.meta.recipe == bb.meta.recipe and ba.meta.parameters == bb.meta.parameters
    assert set(ba.manifest.files) == set(bb.manifest.files)
    pa_, pb = ProgressRun.open(local, "p"), ProgressRun.open(remote, "p")
    assert pb.meta.spent == pb.meta.budget == pa_.meta.budget == 40
    selected = remote.read_bytes(pb.path("ids.txt")).decode().split()
    assert len(selected) == len(set(selected)) == 40
    # Ray Train kept its checkpoints on the bucket, inside the committed attempt
    assert any(f.startswith("train/") for f in pb.manifest.files)
