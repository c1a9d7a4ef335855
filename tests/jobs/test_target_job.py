"""``vlselect target`` on local Ray: a small world's pool with synthetic clip and skill spaces
(built into real indexes by ``vlselect index``), real benchmark files embedded by the pool's
encoders, skill descriptions from the skills cache; every bad-input case."""

from __future__ import annotations

import json
import shutil
from dataclasses import astuple
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.retrieval import RetrievalService, ServiceConfig
from engine.artifacts import EmbeddingSpace, Pool, Selection, World
from engine.crossrank import cross_ranks
from engine.skills import PROMPT_VERSION, cache_key
from engine.skills_config import SkillsConfig
from engine.skills_store import CacheWriter
from engine.targeted import select
from engine.text import instruction_text
from engine.vectors import from_arrow
from engine.workspace import Workspace
from jobs import skills
from jobs.cli import main
from jobs.target import SPACE_OF
from tests.engine import targeted_reference as before
from tests.synthetic_space import clustered, write_space
from tests.tiny_llm import tiny_llm_dir

POOL = 200
SERVICE = ["--set", "service.shard.num_cpus=0.1"]


def family(question: str) -> str:
    """A stand-in for the LLM's answer in the skills cache (the tests cannot wait on it)."""
    q = question.lower()
    for word, skill in (("how many", "object counting"), ("more", "quantity comparison"),
                        ("left", "spatial relations"), ("right", "spatial relations"),
                        ("row", "position reading"), ("colour", "color recognition")):  # fmt: skip
        if word in q:
            return skill
    return "object recognition"


def cache_skills(ws: Path, questions: list[str]) -> None:
    model = skills.model_id(SkillsConfig())
    writer = CacheWriter(Workspace.open(str(ws)), model, 10_000)
    keys = {cache_key(q, PROMPT_VERSION, model): q for q in questions}
    writer.add(pa.table({
        "key": list(keys), "skills": [[family(q)] for q in keys.values()],
        "skill_text": [family(q) for q in keys.values()], "raw": [family(q) for q in keys.values()],
        "status": ["ok"] * len(keys),
    }))  # fmt: skip
    writer.flush()


def world_of(ws: Path) -> World:
    return World.open(Workspace.open(str(ws)))


def pool_ids(ws: Path) -> list[str]:
    return Pool.open(Workspace.open(str(ws))).read_table(["id"]).column("id").to_pylist()


def selection_dir(ws: Path, name: str) -> Path:
    """The committed selection's folder (one benchmark's files, or a folder per benchmark)."""
    return Path(Selection.open(Workspace.open(str(ws)), name).dir)


def bench_file(ws: Path, name: str, n: int, out: Path) -> Path:
    table = pq.read_table(world_of(ws).benchmark(name)).slice(0, n)
    pq.write_table(table, out / f"{name}.parquet")
    return out / f"{name}.parquet"


@pytest.fixture(scope="module")
def world(ray_session, tmp_path_factory):
    """A 200-row world, ingested; clip (64-d) and skill (384-d) spaces written as synthetic
    vectors over the pool's ids and indexed for real; skill answers for every benchmark
    question in the cache."""
    root = tmp_path_factory.mktemp("target")
    ws = root / "ws"
    assert main(["world", "--out", str(ws), "--size", str(POOL)]) == 0
    assert main(["ingest", "--workspace", str(ws)]) == 0
    ids = pool_ids(ws)
    write_space(ws, "clip", clustered(POOL, 64, 12, seed=1), ids=ids, shard_rows=70)
    write_space(ws, "skill", clustered(POOL, 384, 6, seed=2), ids=ids, shard_rows=70)
    for space, shards in (("clip", "2"), ("skill", "1")):
        assert main(["index", "--workspace", str(ws), "--space", space, "--shards", shards]) == 0
    questions = []
    for f in world_of(ws).files("benchmarks", ".parquet"):
        for turns in pq.read_table(f, columns=["conversations"]).column(0).to_pylist():
            questions.append(instruction_text(turns))
    cache_skills(ws, questions)
    files = root / "files"
    files.mkdir()
    return ws, files


def target(ws: Path, *args: str) -> int:
    return main(["target", "--workspace", str(ws), *SERVICE, *args])


def test_every_benchmark_gets_exactly_the_budget(world, capsys):
    ws, files = world
    benches = [bench_file(ws, b, 30, files) for b in
               ("bench_counting", "bench_spatial", "bench_space", "bench_snow")]  # fmt: skip
    args = [a for b in benches for a in ("--benchmark", str(b))]
    assert target(ws, *args, "--budget", "0.25", "--name", "all", "--depth", "150") == 0
    order = {pid: i for i, pid in enumerate(pool_ids(ws))}
    in_pool = set(order)
    out = selection_dir(ws, "all")
    summary = json.loads((out / "summary.json").read_text())
    assert [b["benchmark"] for b in summary["benchmarks"]] == [b.stem for b in benches]
    for b in benches:
        d = out / b.stem
        ids = (d / "ids.txt").read_text().split()
        assert len(ids) == len(set(ids)) == 50 and set(ids) <= in_pool
        selected = json.loads((d / "selected.json").read_text())
        # ids.txt in the order taken; selected.json the same rows in pool order (streamed
        # shard by shard, never held whole by the driver).
        assert [r["id"] for r in selected] == sorted(ids, key=order.get)
        assert all(r["conversations"] for r in selected)
        images = [r["image"] for r in selected if "image" in r]  # text-only rows have none
        assert images and all(i.startswith("images/") for i in images)
        assert (d / images[0]).read_bytes()[:4] == b"\x89PNG"
        report = json.loads((d / "report.json").read_text())
        assert report["prediction"] in ("concept", "skill") and 0 <= report["confidence"] <= 1
        assert report["mode"] == report["prediction"] and report["selected"] == 50
        assert report["usable"] == 30 and report["ranks"]["samples"] == 30
        assert report["reference_ranks"]["samples"] > 0
        assert (d / "crossranks.png").read_bytes()[:4] == b"\x89PNG"
        ranks = pq.read_table(d / "crossranks.parquet")
        assert ranks.num_rows == 30 and min(ranks.column("r_cs").to_pylist()) >= 1
    printed = capsys.readouterr().out
    assert "bench_snow" in printed and "prediction" in printed
    # The same inputs and config again: the result is reported, nothing recomputed.
    assert target(ws, *args, "--budget", "0.25", "--name", "all", "--depth", "150") == 0
    assert "nothing recomputed" in capsys.readouterr().out


def test_hybrid_mode_bad_records_and_clusters(world):
    ws, files = world
    assert main(["cluster", "--workspace", str(ws), "--name", "c", "--spaces", "clip",
                 "--k", "4"]) == 0  # fmt: skip
    good = pq.read_table(world_of(ws).benchmark("bench_snow")).slice(0, 12).to_pylist()
    lines = [json.dumps({"id": r["id"], "question": r["conversations"][0]["value"],
                         "image": "data:image/png;base64," + __import__("base64").b64encode(
                             r["image"]).decode()}) for r in good]  # fmt: skip
    lines += [
        json.dumps({"id": "no-image", "question": "How many circles are there?"}),
        json.dumps({"id": "no-question", "image": "x.png"}),
        json.dumps({"id": "missing-file", "question": "What colour?", "image": "gone.png"}),
        json.dumps({"id": "broken", "question": "What colour?", "image": "broken.png"}),
        "{not json",
    ]
    (files / "broken.png").write_bytes(b"not a png")
    jsonl = files / "mixed.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    assert target(ws, "--benchmark", str(jsonl), "--budget", "33", "--name", "mix",
                  "--mode", "split", "--quota", "2") == 0  # fmt: skip
    report = json.loads((selection_dir(ws, "mix") / "report.json").read_text())
    assert report["mode"] == "split" and report["selected"] == 33 and report["usable"] == 12
    assert report["rejected_by_reason"] == {
        "image_not_found": 1, "image_unreadable": 1, "malformed_json": 1,
        "missing_image": 1, "missing_question": 1,
    }  # fmt: skip
    assert report["clusters"]["c"]["rows_with_cluster"] == 33
    rejects = json.loads((selection_dir(ws, "mix") / "rejects.json").read_text())
    assert {r["id"] for r in rejects} >= {"no-image", "no-question", "missing-file", "broken"}


def test_sample_mode_takes_each_samples_own_space(world):
    """--mode sample: every benchmark sample takes the space its own cross-ranks lean on;
    the rows' recorded spaces follow their samples', and the budget is exact."""
    ws, files = world
    bench = bench_file(ws, "bench_counting", 20, files)
    assert target(ws, "--benchmark", str(bench), "--budget", "30", "--name", "per-sample",
                  "--mode", "sample", "--depth", "100") == 0  # fmt: skip
    out = selection_dir(ws, "per-sample")
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "sample" and report["selected"] == 30
    share = report["samples_on_concept"]
    assert 0.0 <= share <= 1.0
    taken = report["picks_by_space"]  # concept rows only where samples lean on concept
    assert (taken.get("concept", 0) > 0) == (share > 0)
    assert (taken.get("skill", 0) > 0) == (share < 1)


def test_uncached_questions_are_described_by_the_skills_backend(world, tmp_path):
    """The workspace's skills model (a tiny random Llama through the transformers backend)
    has answered none of the benchmark's questions: the job asks it, caches what it says,
    and refuses (with the reason) what it could not parse; a rerun asks nothing again."""
    src, files = world
    ws = tmp_path / "ws"
    shutil.copytree(src, ws, ignore=shutil.ignore_patterns("selections"))
    tiny = tiny_llm_dir()
    space = Workspace.open(str(ws))
    space.write_config(space.read_config() | {"skills": {"model": tiny, "max_new_tokens": 4}})
    bench = bench_file(ws, "bench_counting", 8, files)
    args = ["--benchmark", str(bench), "--budget", "10", "--mode", "skill", "--depth", "50"]
    assert target(ws, *args, "--name", "llm") == 0
    report = json.loads((selection_dir(ws, "llm") / "report.json").read_text())
    writer = report["skills"]
    assert writer["backend"] == "transformers" and writer["model"] == tiny
    assert writer["cached"] == 0 and writer["generated"] == writer["unique_questions"] > 0
    assert report["usable"] + report["rejected"] == 8
    assert report["rejected_by_reason"].get("skill_description_failed", 0) == writer["failed"]
    assert report["selected"] == 10
    assert target(ws, *args, "--name", "llm-again") == 0
    again = json.loads((selection_dir(ws, "llm-again") / "report.json").read_text())
    assert again["skills"]["generated"] == writer["failed"]  # only failures are asked again


def test_rows_select_what_the_string_ids_selected_on_the_world(world):
    """The world's two real indexes searched both ways: the rows name the ids, and every
    mode, aggregation and quota picks the same pool samples in the same order, from the
    same benchmark samples and ranks, as the string-id code did; so do the cross-ranks."""
    ws = Workspace.open(str(world[0]))
    pool = np.array(pool_ids(world[0]), dtype=object)
    queries = {}
    for space in ("clip", "skill"):
        table = EmbeddingSpace.open(ws, space).read_table(["vector"]).slice(0, 25)
        queries[space] = from_arrow(table.column("vector")) + 0.05  # not pool rows themselves
    cfg = ServiceConfig(shard={"num_cpus": 0.1, "max_retries": -1}, batch_size=7)
    services = {n: RetrievalService.start(ws, s, cfg) for n, s in SPACE_OF.items()}
    try:
        rows, ids = {}, {}
        for name, space in SPACE_OF.items():
            rows[name] = services[name].search(queries[space], 60)
            ids[name] = services[name].search_ids(queries[space], 60)
            np.testing.assert_array_equal(rows[name][1], ids[name][1])
            assert pool[rows[name][0]].tolist() == ids[name][0].tolist()
    finally:
        for service in services.values():
            service.stop()
    new, old = cross_ranks(*rows["concept"], *rows["skill"]), cross_ranks(*ids["concept"],
                                                                           *ids["skill"])  # fmt: skip
    for a, b in zip(astuple(new), astuple(old), strict=True):
        np.testing.assert_array_equal(a, b)
    for mode in ("concept", "skill", "sum", "max", "split"):
        for aggregation in ("round_robin", "score"):
            for quota in (None, 2):
                args = {"aggregation": aggregation, "quota": quota}
                got = select(mode, 120, rows, **args)
                want = before.select(mode, 120, ids, **args)
                assert pool[got.rows].tolist() == want.ids, (mode, aggregation, quota)
                assert got.sample.tolist() == want.sample and got.rank.tolist() == want.rank
                assert got.space == want.space


def test_a_budget_the_lists_cannot_reach_is_filled_or_refused(world, capsys):
    """Five samples with lists of at most 8 (max_candidates 40) cannot reach 150 rows:
    ``fill: random`` takes the rest at random and says how many; ``refuse`` names the
    count the lists reach and the knobs."""
    ws, files = world
    bench = bench_file(ws, "bench_space", 5, files)
    args = ["--benchmark", str(bench), "--budget", "150", "--depth", "8", "--reference", "0",
            "--set", "max_candidates=40", "--mode", "concept"]  # fmt: skip
    assert target(ws, *args, "--name", "filled") == 0
    report = json.loads((selection_dir(ws, "filled") / "report.json").read_text())
    reached = report["from_lists"]
    assert report["selection_depth"] == 8 and 5 <= reached <= 40
    assert report["filled_at_random"] == 150 - reached and report["selected"] == 150
    assert report["picks_by_space"] == {"concept": reached, "random fill": 150 - reached}
    ids = (selection_dir(ws, "filled") / "ids.txt").read_text().split()
    assert len(ids) == len(set(ids)) == 150
    capsys.readouterr()
    assert target(ws, *args, "--name", "refused", "--set", "fill=refuse") == 2
    err = capsys.readouterr().err
    assert f"hold {reached} distinct pool rows, fewer than the budget 150" in err
    assert "max_candidates" in err and "fill: random" in err
    assert Selection.find(Workspace.open(str(ws)), "refused") is None


def test_bad_input_is_refused_with_the_fix(world, tmp_path, capsys):
    ws, files = world
    bench = bench_file(ws, "bench_space", 5, files)

    def refused(*args: str) -> str:
        assert target(ws, *args) == 2
        return capsys.readouterr().err

    base = ["--benchmark", str(bench), "--name", "bad"]
    assert "not positive" in refused(*base, "--budget", "0")
    assert "not positive" in refused(*base, "--budget", "-3")
    assert "more than the pool's 200 rows" in refused(*base, "--budget", "201")
    assert "no budget" in refused("--benchmark", str(bench), "--name", "bad")
    empty = tmp_path / "empty.json"
    empty.write_text("")
    assert "is empty" in refused("--benchmark", str(empty), "--name", "bad", "--budget", "5")
    useless = tmp_path / "useless.jsonl"
    useless.write_text('{"id": "a", "question": "q?"}\n{"id": "b", "image": "x.png"}\n')
    err = refused("--benchmark", str(useless), "--name", "bad", "--budget", "5")
    assert "none of its 2 records is usable" in err and "1 missing_image" in err
    assert "not found" in refused("--benchmark", str(tmp_path / "nope.json"), "--name", "bad",
                                  "--budget", "5")  # fmt: skip
    assert not (ws / "selections" / "bad").exists()
    assert Selection.find(Workspace.open(str(ws)), "bad") is None
    # A space without its index, then without its vectors: the stage to run is named.
    moved = tmp_path / "index-skill"
    shutil.move(ws / "index" / "skill", moved)
    try:
        err = refused(*base, "--budget", "5")
        assert "vlselect index" in err and "--space skill" in err
    finally:
        shutil.move(moved, ws / "index" / "skill")
    moved = tmp_path / "emb-skill"
    shutil.move(ws / "embeddings" / "skill", moved)
    try:
        assert "vlselect skills" in refused(*base, "--budget", "5")
    finally:
        shutil.move(moved, ws / "embeddings" / "skill")


def test_from_world_selects_for_every_held_out_benchmark(world):
    """``from_world`` (the demo's target step): every held-out set of the workspace's world,
    its in-distribution test split excepted, read from inside the world artifact."""
    ws, _ = world
    assert target(ws, "--from-world", "--budget", "10", "--name", "fw", "--depth", "40") == 0
    summary = json.loads((selection_dir(ws, "fw") / "summary.json").read_text())
    names = sorted(b["benchmark"] for b in summary["benchmarks"])
    assert names == ["bench_counting", "bench_snow", "bench_space", "bench_spatial"]
    assert all(b["selected"] == 10 for b in summary["benchmarks"])
