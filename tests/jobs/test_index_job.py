"""``vlselect index`` and ``vlselect search`` on local Ray: exactness, recall, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from actors.retrieval import RetrievalService, ServiceConfig
from engine.artifacts import EmbeddingSpace, Index
from engine.commit import MANIFEST
from engine.workspace import Workspace
from jobs.cli import main
from tests.synthetic_space import brute_force, clustered, write_space

N, DIM = 1203, 32
# Small shards: 8 of them must fit the test session's 2 CPUs beside anything else.
SERVICE = ServiceConfig(batch_size=37, shard={"num_cpus": 0.1, "max_retries": -1})
SHARD_CPUS = ["--set", "shard.num_cpus=0.1"]


@pytest.fixture(scope="module")
def data():
    return clustered(N, DIM, 40, seed=0), clustered(150, DIM, 40, seed=1)


def make_ws(tmp_path: Path, x: np.ndarray, space: str = "text") -> tuple[Path, list[str]]:
    ws = tmp_path / "ws"
    return ws, write_space(ws, space, x)


def index(ws: Path, *args: str) -> int:
    return main(["index", "--workspace", str(ws), "--space", "text", *args])


def committed(ws: Path, space: str = "text") -> Index:
    return Index.open(Workspace.open(str(ws)), space)


def meta(ws: Path, space: str = "text") -> dict:
    return committed(ws, space).meta.model_dump()


def summary(capsys) -> dict:
    """The last ``vlselect-summary`` line the command printed."""
    out = capsys.readouterr().out
    line = [x for x in out.splitlines() if x.startswith("vlselect-summary ")][-1]
    return json.loads(line.removeprefix("vlselect-summary "))


def assert_exact_topk(got_ids, got_scores, ids, x, q, k, tol):
    """``got`` is an exact top-k of ``q`` over ``x``: numpy's scores, and every id it must hold.

    Ties (equal within ``tol``) may be ordered either way; queries with no near-tie in the
    top k+1 must match numpy's ids position by position, and most queries are such.
    """
    ids = np.array(ids, dtype=object)
    position = {v: i for i, v in enumerate(ids)}
    exact = q.astype(np.float64) @ x.astype(np.float64).T
    rows, best = brute_force(x, q, k + 1)
    clear = 0
    for i in range(len(q)):
        got_rows = np.array([position[v] for v in got_ids[i]])
        assert len(set(got_rows)) == k
        np.testing.assert_allclose(got_scores[i], best[i, :k], rtol=0, atol=tol)
        np.testing.assert_allclose(got_scores[i], exact[i, got_rows], rtol=0, atol=tol)
        assert set(np.flatnonzero(exact[i] > best[i, k - 1] + tol)) <= set(got_rows)
        if np.all(-np.diff(best[i]) > max(tol, 1e-6)):
            assert got_ids[i].tolist() == ids[rows[i, :k]].tolist()
            clear += 1
    return clear


@pytest.mark.parametrize("shards", [2, 4, 8])
def test_flat_shards_answer_exactly_like_brute_force(ray_session, tmp_path, data, shards):
    x, q = data
    ws, ids = make_ws(tmp_path, x)
    assert index(ws, "--shards", str(shards)) == 0
    m = meta(ws)
    assert m["rows"] == N and m["shards"] == shards
    assert sum(m["rows_per_shard"]) == N
    assert max(m["rows_per_shard"]) - min(m["rows_per_shard"]) <= 1

    with RetrievalService.start(Workspace.open(str(ws)), "text", SERVICE) as service:
        got_ids, got_scores = service.search_ids(q, 10)
        got_rows, row_scores = service.search(q, 10)
    assert got_scores.dtype == np.float32 and got_ids.dtype == object
    # Rows are the pool's rows (write_space made the pool from these ids, in order).
    assert got_rows.dtype == np.int64 and np.array(ids, dtype=object)[got_rows].tolist() == (
        got_ids.tolist()
    )
    np.testing.assert_array_equal(row_scores, got_scores)
    stored = pq.read_table(committed(ws).dir + "/shard-0000.ids.parquet")
    assert stored.column_names == ["id", "row"] and stored["row"].type == "int64"
    # numpy's answer up to float32 rounding; ids exact wherever there is no near-tie.
    assert assert_exact_topk(got_ids, got_scores, ids, x, q, 10, tol=2e-7) > 0.9 * len(q)
    # Bit-equal to one exact faiss index over all vectors, searched in the same batches.
    whole = faiss.IndexFlatIP(DIM)
    whole.add(x)
    step = SERVICE.batch_size
    want = [whole.search(q[i : i + step], 10) for i in range(0, len(q), step)]
    np.testing.assert_array_equal(got_scores, np.concatenate([w[0] for w in want]))


def test_flat_shards_are_exact_on_integer_vectors_with_ties(ray_session, tmp_path):
    # Small integers: every dot product is exact in float32, and ties abound.
    rng = np.random.default_rng(7)
    x, q = (rng.integers(-2, 3, (n, DIM)).astype(np.float32) for n in (N, 60))
    ws, ids = make_ws(tmp_path, x)
    assert index(ws, "--shards", "3") == 0
    with RetrievalService.start(Workspace.open(str(ws)), "text", SERVICE) as service:
        got_ids, got_scores = service.search_ids(q, 10)
    assert_exact_topk(got_ids, got_scores, ids, x, q, 10, tol=0)


def test_search_cli_writes_query_rank_id_score(ray_session, tmp_path, data):
    x, q = data
    ws, ids = make_ws(tmp_path, x)
    assert index(ws, "--shards", "3") == 0
    queries = tmp_path / "q.npy"
    np.save(queries, q * 3.0)  # not normalised: the job normalises
    out = tmp_path / "out" / "hits.parquet"
    argv = ["search", "--workspace", str(ws), "--space", "text", "--queries", str(queries)]
    assert main([*argv, "-k", "5", "--out", str(out), "--batch-size", "16", *SHARD_CPUS]) == 0
    table = pq.read_table(out)
    assert table.schema.names == ["query", "rank", "id", "score"]
    assert str(table.schema.field("score").type) == "float"
    rows, exact = brute_force(x, q, 5)
    assert table.num_rows == len(q) * 5
    got = table.to_pandas().sort_values(["query", "rank"])
    assert got["id"].tolist() == np.array(ids, dtype=object)[rows].reshape(-1).tolist()
    np.testing.assert_allclose(got["score"].to_numpy(), exact.reshape(-1), atol=2e-7)
    assert not list(out.parent.glob(".*.tmp-*"))


@pytest.mark.parametrize(
    ("factory", "params"), [("IVF16,Flat", {"nprobe": 8}), ("HNSW16", {"ef_search": 48})]
)
def test_ivf_and_hnsw_shards_have_high_recall(ray_session, tmp_path, factory, params):
    x = clustered(4000, DIM, 60, seed=5)
    q = clustered(200, DIM, 60, seed=6)
    ws, ids = make_ws(tmp_path, x)
    assert index(ws, "--shards", "2", "--factory", factory) == 0
    assert meta(ws)["factory"] == factory
    cfg = SERVICE.model_copy(update=params)
    with RetrievalService.start(Workspace.open(str(ws)), "text", cfg) as service:
        assert all(i["params"] for i in service.shard_info())
        got, _ = service.search_ids(q, 10)
    rows, _ = brute_force(x, q, 10)
    truth = np.array(ids, dtype=object)[rows]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth, strict=True)])
    assert recall > 0.9, recall


def test_ivf_shards_share_one_quantizer_and_answer_as_one_index(ray_session, tmp_path):
    """Trained once (trained.faiss), the 4 IVF shards answer what one IVF index of the same
    template answers at the same nprobe: recall no longer falls with the shard count.
    Memory-mapped shards answer the same."""
    x = clustered(4000, DIM, 60, seed=5)
    q = clustered(200, DIM, 60, seed=6)
    ws, _ = make_ws(tmp_path, x)
    assert index(ws, "--shards", "4", "--factory", "IVF32,Flat") == 0
    done = committed(ws)
    assert done.meta.trained_once and done.meta.pool_rows
    with Workspace.open(str(ws)).fs.open_input_stream(done.dir + "/trained.faiss") as f:
        template = faiss.deserialize_index(np.frombuffer(f.read(), dtype=np.uint8))
    whole = faiss.clone_index(template)
    whole.add(x)
    faiss.extract_index_ivf(whole).nprobe = 4
    want_scores, want = whole.search(q, 10)
    for mmap in (False, True):
        cfg = SERVICE.model_copy(update={"nprobe": 4, "mmap": mmap})
        with RetrievalService.start(Workspace.open(str(ws)), "text", cfg) as service:
            assert {i["mmap"] for i in service.shard_info()} == {mmap}
            got, scores = service.search(q, 10)
        np.testing.assert_array_equal(scores, want_scores)
        assert got.tolist() == want.tolist()


def test_k_above_rows_pads_and_the_job_writes_only_real_hits(ray_session, tmp_path):
    x = clustered(12, 8, 3)
    ws, _ = make_ws(tmp_path, x)
    assert index(ws, "--shards", "4") == 0
    with RetrievalService.start(Workspace.open(str(ws)), "text", SERVICE) as service:
        got, scores = service.search_ids(x[:2], 20)
    assert (got[:, :12] != None).all() and (got[:, 12:] == None).all()  # noqa: E711
    assert np.isneginf(scores[:, 12:]).all()
    np.save(tmp_path / "q.npy", x[:2])
    out = tmp_path / "o.parquet"
    argv = ["search", "--workspace", str(ws), "--space", "text", "--queries"]
    assert main([*argv, str(tmp_path / "q.npy"), "-k", "20", "--out", str(out), *SHARD_CPUS]) == 0
    assert pq.read_table(out).num_rows == 24


def test_resume_keeps_finished_shards_and_a_change_rebuilds(ray_session, tmp_path, data, capsys):
    x, _ = data
    ws, _ = make_ws(tmp_path, x)
    assert index(ws, "--shards", "4") == 0
    folder = Path(committed(ws).dir)
    # What a killed run leaves: one shard unfinished, nothing committed.
    (folder / "shard-0002.faiss").unlink()
    (folder.parent.parent / MANIFEST).unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.faiss")}
    capsys.readouterr()
    assert index(ws, "--shards", "4") == 0
    s = summary(capsys)
    assert s["built"] == 1 and s["kept"] == 3 and committed(ws).dir == str(folder)
    assert {
        p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.faiss") if p.name in mtimes
    } == mtimes
    assert (folder / "shard-0002.faiss").exists()

    assert index(ws, "--shards", "4") == 0 and summary(capsys)["built"] == 0
    assert index(ws, "--shards", "4", "--overwrite") == 0 and summary(capsys)["built"] == 4
    assert index(ws, "--shards", "2") == 0
    assert summary(capsys)["built"] == 2
    assert sorted(Path(f).name for f in committed(ws).files(suffix=".faiss")) == [
        "shard-0000.faiss",
        "shard-0001.faiss",
    ]
    assert not folder.exists()  # the replaced attempt is cleaned up after the commit


def test_bad_vectors_are_refused_or_excluded_and_counted(ray_session, tmp_path, data, capsys):
    x, _ = data
    x = x.copy()
    x[[5, 600, 1100]] = np.nan
    x[700, 3] = np.inf
    x[900] = 0
    ws, ids = make_ws(tmp_path, x)
    assert index(ws, "--shards", "3") == 2
    err = capsys.readouterr().err
    assert "space 'text' holds 5 unusable vectors" in err and "on_bad_rows=exclude" in err
    assert ids[5] in err
    assert not (ws / "index").exists() or not list((ws / "index").rglob("*.faiss"))
    assert Index.find(Workspace.open(str(ws)), "text") is None

    assert index(ws, "--shards", "3", "--set", "on_bad_rows=exclude") == 0
    m = meta(ws)
    assert m["excluded"] == 5 and m["rows"] == N - 5 and sum(m["excluded_per_shard"]) == 5
    bad_ids = {ids[i] for i in (5, 600, 700, 900, 1100)}
    with RetrievalService.start(Workspace.open(str(ws)), "text", SERVICE) as service:
        got, _ = service.search_ids(clustered(50, DIM, 40, seed=1), N)
    assert not bad_ids & set(got.reshape(-1)) and (got[:, : N - 5] != None).all()  # noqa: E711


def bad_index_cases(ws: Path) -> list[tuple[list[str], str]]:
    return [
        (["--space", "dino"], "space 'dino' is not embedded"),
        (["--space", "colour"], "unknown space 'colour'"),
        ([], "no space to index"),
        (["--space", "text", "--shards", "0"], "shards"),
        (["--space", "text", "--shards", "5000"], "more than the 1203 vectors"),
        (["--space", "text", "--factory", "bogus"], "'bogus' does not parse"),
        (["--space", "text", "--shards", "2", "--factory", "IVF4096,Flat"], "needs at least 4096"),
        (["--space", "text", "--set", "gpu=true"], "task.num_gpus"),
    ]


def test_bad_index_input_exits_2_with_the_problem_named(tmp_path, data, capsys):
    ws, _ = make_ws(tmp_path, data[0])
    for args, words in bad_index_cases(ws):
        assert main(["index", "--workspace", str(ws), *args]) == 2, args
        assert words in capsys.readouterr().err, args
    assert not (ws / "index").exists()


def test_mismatched_vector_lengths_exit_2(ray_session, tmp_path, data, capsys):
    ws, _ = make_ws(tmp_path, data[0])
    write_space(tmp_path / "other", "text", clustered(50, DIM + 1, 3))
    space = EmbeddingSpace.open(Workspace.open(str(ws)), "text")
    other = EmbeddingSpace.open(Workspace.open(str(tmp_path / "other")), "text")
    Path(other.path("part-000000.parquet")).replace(space.path("part-000001.parquet"))
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in space.files(suffix=".parquet"))
    manifest = space.manifest.model_copy(update={"meta": {**space.manifest.meta, "vectors": rows}})
    Path(space.folder(space.ws, "text"), MANIFEST).write_text(manifest.model_dump_json())
    assert index(ws, "--shards", "2") == 2
    assert f"length {DIM + 1}, expected {DIM}" in capsys.readouterr().err


def test_bad_search_input_exits_2_with_the_problem_named(ray_session, tmp_path, data, capsys):
    x, q = data
    ws, _ = make_ws(tmp_path, x)

    def search(*args: str) -> tuple[int, str]:
        out = str(tmp_path / "out.parquet")
        code = main(["search", "--workspace", str(ws), "--out", out, *args])
        return code, capsys.readouterr().err

    def save(name: str, array) -> str:
        np.save(tmp_path / name, array)
        return str(tmp_path / name)

    good = save("q.npy", q)
    code, err = search("--space", "text", "--queries", good)
    assert code == 2 and "no index for space 'text'" in err and "vlselect index" in err
    assert index(ws, "--shards", "2") == 0
    nan = q.copy()
    nan[3, 0] = np.nan
    cases = [
        (["--space", "colour", "--queries", good], "unknown space 'colour'"),
        (["--space", "clip", "--queries", good], "no index for space 'clip'"),
        (["--space", "text", "--queries", save("d.npy", q[:, :16])], "16-d queries"),
        (["--space", "text", "--queries", save("nan.npy", nan)], "1 of 150 queries hold NaN"),
        (["--space", "text", "--queries", good, "-k", "0"], "k: Input should be greater"),
        (["--space", "text", "--queries", save("one.npy", q[0])], "must be 2-D"),
        (["--space", "text", "--queries", save("three.npy", q[None])], "must be 2-D"),
        (["--space", "text", "--queries", save("obj.npy", np.array([{}], object))], ".npy"),
        (["--space", "text", "--queries", str(tmp_path / "none.npy")], "not found"),
        (["--space", "text"], "no queries"),
    ]
    for args, words in cases:
        code, err = search(*args)
        assert code == 2 and words in err, (args, err)
    (ws / "index" / "text" / MANIFEST).unlink()  # as if killed before its commit
    code, err = search("--space", "text", "--queries", good)
    assert code == 2 and "did not finish" in err
    assert not (tmp_path / "out.parquet").exists()
