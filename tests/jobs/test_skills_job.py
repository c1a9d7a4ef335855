"""The skills stage on local Ray: every id once, the cache, failures with reasons, backends.

The openai backend is tested against ``tests.fake_openai.FakeOpenAI``, a real HTTP
server on loopback that answers by rules (well, garbage, refusal, 500, hang, death);
``tests/slow/test_skills_openai.py`` runs the same backend against a real LLM server.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray

from engine.artifacts import EmbeddingSpace, Pool, Skills
from engine.commit import MANIFEST
from engine.skills import PROMPT_VERSION, RESULT_SCHEMA, SKILLS_SCHEMA, cache_key, result_row
from engine.skills_store import read_cache
from engine.text import instruction_text
from engine.workspace import Workspace
from jobs import skills as skills_job
from jobs.cli import main
from tests.engine.skills_reference import assemble as old_assemble
from tests.fake_openai import API_KEY, FakeOpenAI, default_rule
from tests.tiny_llm import tiny_llm_dir
from tests.world_workspace import ingested, world_source


@pytest.fixture(scope="module")
def pool_ws(small_world, tmp_path_factory):
    """A workspace holding the small world's ingested pool (2,000 samples, 648 questions)."""
    ws = tmp_path_factory.mktemp("skills") / "ws"
    assert main(["ingest", "--workspace", str(ws), "--source", world_source(small_world)]) == 0
    return ws


def fresh(pool_ws: Path, tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copytree(pool_ws / "pool", ws / "pool")
    return ws


def skills(ws: Path) -> Skills:
    return Skills.open(Workspace.open(str(ws)))


def run(ws: Path, *args: str, embed: bool = False) -> dict:
    """Run the stage; the committed skills' figures (their meta's summary)."""
    # Embedding the skill space costs an encoder pool's start-up: one test checks it.
    rc = main(["skills", "--workspace", str(ws), "--set", f"embed={str(embed).lower()}", *args])
    assert rc == 0
    found = skills(ws)
    figures = found.meta.summary
    assert (found.meta.ok, found.meta.failed) == (figures["ok"], figures["failed"])
    return found.meta.summary


def openai_args(server: FakeOpenAI, *extra: str) -> list[str]:
    return [
        "--backend", "openai", "--base-url", server.base_url, "--model", "fake-smol",
        "--set", "openai.backoff_s=0", "--set", "openai.concurrency=8", *extra,
    ]  # fmt: skip


def skills_rows(ws: Path) -> list[dict]:
    return skills(ws).read_table().to_pylist()


def pool_ids(ws: Path) -> list[str]:
    return Pool.open(Workspace.open(str(ws))).read_table(["id"]).column("id").to_pylist()


def test_every_pool_id_once_and_a_rerun_regenerates_nothing(pool_ws, tmp_path, monkeypatch, capsys):
    ws = fresh(pool_ws, tmp_path)
    monkeypatch.setenv("VLSELECT_TEST_KEY", API_KEY)
    with FakeOpenAI() as server:
        args = openai_args(server, "--set", "openai.api_key_env=VLSELECT_TEST_KEY")
        meta = run(ws, *args, embed=True)
        first = skills(ws)
        calls = sum(server.calls.values())
        printed = capsys.readouterr().out
        run(ws, *args)  # the same pool and config: current, nothing asked again
        out = capsys.readouterr().out
        printed += out
        assert "current, nothing asked again" in out
        assert skills(ws).manifest == first.manifest
        # Killed before its commit: the rerun asks nothing either, every answer is cached.
        (ws / "skills" / MANIFEST).unlink()
        again = run(ws, *args)
        assert sum(server.calls.values()) == calls  # nothing was asked twice
    ids = pool_ids(ws)
    rows = skills_rows(ws)
    assert [r["id"] for r in rows] == ids  # every id once, in pool order
    assert all(r["status"] == "ok" and r["reason"] is None for r in rows)
    assert rows[0]["skills"] == ["object counting", "object recognition"]
    assert rows[0]["skill_text"] == "object counting; object recognition"
    skill = EmbeddingSpace.open(Workspace.open(str(ws)), "skill")
    skill_space = skill.read_table()
    assert skill_space.column("id").to_pylist() == ids  # one skill vector per id
    assert len(skill_space.column("vector")[0]) == 384
    assert skill.meta.vectors == 2000 and skill.meta.dim == 384
    assert skill.manifest.inputs == {"skills": first.fingerprint}
    assert {r["prompt_version"] for r in rows} == {PROMPT_VERSION} and rows[0][
        "model"
    ] == "fake-smol"
    assert meta["samples"] == 2000 and meta["unique_questions"] == 648 == calls
    assert meta["generated"] == 648 and meta["cached"] == 0 and meta["ok"] == 2000
    assert again["generated"] == 0 and again["cached"] == 648 and again["ok"] == 2000
    assert first.manifest.inputs == {"pool": Pool.open(first.ws).fingerprint}
    assert first.meta.samples == 2000 and first.meta.prompt_version == PROMPT_VERSION
    # The key went to the server, and nowhere else.
    assert server.auth == {f"Bearer {API_KEY}"}
    printed += capsys.readouterr().out
    assert "vlselect-summary" in printed  # the capture holds every run's output
    assert API_KEY not in printed
    assert API_KEY not in (ws / "skills" / MANIFEST).read_text()
    assert skills(ws).meta.config["openai"]["api_key_env"] == "VLSELECT_TEST_KEY"


def failing_rule(question, n):
    if "cross" in question:
        return "ok", "The answer is 10."  # garbage every time
    if "diamond" in question:
        return "status", 500
    if "row" in question:
        return "sleep", 3.0  # past the client's timeout
    if "ring" in question:
        return "ok", "I'm sorry, I can't see images."
    return "ok", "color recognition, shape recognition"


def test_failures_are_recorded_with_reasons_and_only_they_are_retried(pool_ws, tmp_path):
    ws = fresh(pool_ws, tmp_path)
    limit = ["--limit", "300", "--set", "openai.timeout_s=0.5", "--set", "max_attempts=2"]
    with FakeOpenAI(failing_rule) as server:
        meta = run(ws, *openai_args(server, *limit))
    rows = skills_rows(ws)
    assert len(rows) == 300 == len({r["id"] for r in rows})
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and meta["failed"] == len(failed) and meta["ok"] == 300 - len(failed)
    reasons = {r["reason"].split(":")[0] for r in failed}
    assert {"unparseable answer", "HTTP 500", "timeout after 0.5 s"} <= reasons
    assert all(r["skills"] == [] and r["skill_text"] is None for r in failed)
    garbage = next(r for r in failed if r["reason"].startswith("unparseable"))
    assert garbage["raw"] == "The answer is 10."  # what the model said is kept
    assert any("refused" in r["reason"] for r in failed)
    assert server.calls[next(q for q in server.calls if "diamond" in q)] == 2  # max_attempts
    # The server is fixed: a re-run asks only for what failed.
    with FakeOpenAI() as fixed:
        again = run(ws, *openai_args(fixed, "--limit", "300"))
    assert (
        again["cached"] == meta["generated_ok"]
        and again["generated"] == meta["unique_questions"] - meta["generated_ok"]
    )
    assert sum(fixed.calls.values()) == again["generated"]
    assert again["ok"] == 300 and again["failed"] == 0


@pytest.mark.parametrize("in_flight", [2, 1])
def test_a_slow_request_does_not_hold_the_next_batch_back(pool_ws, tmp_path, in_flight):
    """The first request the server gets sleeps; with two batches in flight per actor the
    next batch's requests are served meanwhile (more than the rest of the slow one's
    batch), with one none are (the control: the test can tell the two apart)."""
    ws = fresh(pool_ws, tmp_path)
    arrivals, lock = [], threading.Lock()

    def first_is_slow(question, n):
        with lock:
            arrivals.append(time.monotonic())
            first = len(arrivals) == 1
        return ("sleep", 4.0) if first else default_rule(question, n)

    args = ["--limit", "200", "--set", "batch_size=8", "--set", "openai.concurrency=4"]
    args += ["--set", f"openai.batches_in_flight={in_flight}"]
    with FakeOpenAI(first_is_slow) as server:
        meta = run(ws, *openai_args(server, *args))
    assert meta["ok"] == 200 and meta["generated"] > 3 * 8  # several batches to overlap
    slow_start = arrivals[0]
    meanwhile = sum(slow_start < t < slow_start + 4.0 for t in arrivals[1:])
    if in_flight == 1:
        assert meanwhile <= 8 - 1  # the slow batch's own rows, then nothing until it ends
    else:
        assert meanwhile > 8 - 1


def test_a_server_dying_mid_run_costs_a_rerun_not_data(pool_ws, tmp_path):
    ws = fresh(pool_ws, tmp_path)
    served = []

    def dies_after_40(question, n):
        served.append(question)
        return ("die", None) if len(served) > 40 else default_rule(question, n)

    common = ["--limit", "400", "--set", "openai.concurrency=2", "--set", "openai.breaker_after=2"]
    with FakeOpenAI(dies_after_40) as server:
        meta = run(ws, *openai_args(server, *common))
    assert 0 < meta["generated_ok"] <= 41 and meta["failed"] > 0
    rows = skills_rows(ws)
    assert len(rows) == 400
    reasons = {r["reason"].split(":")[0] for r in rows if r["status"] == "failed"}
    assert reasons <= {"connection failed", "HTTP 503"} and reasons
    # A new server (another port): the cache is keyed by question and model, not URL.
    with FakeOpenAI() as restarted:
        again = run(ws, *openai_args(restarted, *common))
    assert again["cached"] == meta["generated_ok"] and again["failed"] == 0
    assert sum(restarted.calls.values()) == meta["unique_questions"] - meta["generated_ok"]


def test_transformers_backend_on_a_tiny_model(pool_ws, tmp_path):
    tiny_llm = tiny_llm_dir()
    ws = fresh(pool_ws, tmp_path)
    meta = run(ws, "--limit", "12", "--model", tiny_llm, "--set", "max_new_tokens=4")
    rows = skills_rows(ws)
    assert len(rows) == 12 and meta["generated"] == meta["unique_questions"]
    assert all(r["raw"] is not None for r in rows)  # a random model's text, parsed or not
    assert all((r["status"] == "ok") == (r["reason"] is None) for r in rows)
    assert meta["completion_tokens"] > 0 and meta["model"] == tiny_llm
    assert (
        run(ws, "--limit", "12", "--model", tiny_llm)["generated"]
        == meta["unique_questions"] - meta["generated_ok"]
    )


@pytest.mark.slow
def test_transformers_backend_on_the_packaged_smollm2(pool_ws, tmp_path):
    ws = fresh(pool_ws, tmp_path)
    meta = run(ws, "--limit", "40", "--set", "max_new_tokens=16")
    rows = skills_rows(ws)
    assert len(rows) == 40 and meta["model"].startswith("packaged:smollm2/")
    assert meta["ok"] >= 30  # SmolLM2 follows the few-shot format on most questions
    assert run(ws, "--limit", "40")["generated"] == meta["unique_questions"] - meta["generated_ok"]


def test_bad_input_exits_2_and_writes_nothing(pool_ws, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["skills", "--workspace", str(empty)]) == 2
    assert "run `vlselect ingest" in capsys.readouterr().err
    ws = fresh(pool_ws, tmp_path)
    assert main(["skills", "--workspace", str(ws), "--backend", "openai", "--model", "m"]) == 2
    assert "--base-url" in capsys.readouterr().err
    assert main(["skills", "--workspace", str(ws), "--backend", "vllm"]) == 2
    assert "needs a model" in capsys.readouterr().err
    monkeypatch.delenv("VLSELECT_NO_SUCH_KEY", raising=False)
    args = ["--backend", "openai", "--model", "m", "--base-url", "http://127.0.0.1:9/v1"]
    args += ["--set", "openai.api_key_env=VLSELECT_NO_SUCH_KEY"]
    assert main(["skills", "--workspace", str(ws), *args]) == 2
    assert "$VLSELECT_NO_SUCH_KEY" in capsys.readouterr().err
    assert main(["skills", "--workspace", str(ws), "--set", "bogus=1"]) == 2
    assert not (ws / "skills").exists() and not (ws / "cache").exists()
    assert Skills.find(Workspace.open(str(ws))) is None


def old_parts(ws: Path, limit: int | None, failures: pa.Table, model: str, shard_rows: int):
    """The old stage's part files (rows ``[i * shard_rows, ...)`` of the assembled table),
    from the pool and the cache as the run left it."""
    pool = Pool.open(Workspace.open(str(ws)))
    rows = pa.concat_tables(pq.read_table(f, columns=["id", "conversations"]) for f in pool.shards)
    rows = rows.slice(0, limit or rows.num_rows)
    keys = [
        cache_key(instruction_text(c), PROMPT_VERSION, model)
        for c in rows.column("conversations").to_pylist()
    ]
    ids = pa.table({"id": rows.column("id"), "key": pa.array(keys, pa.string())})
    cached = read_cache(Workspace.open(str(ws)), pa.array(sorted(set(keys)), pa.string()))
    table = old_assemble(ids, cached, failures, model)
    parts = [table.slice(s, shard_rows) for s in range(0, max(table.num_rows, 1), shard_rows)]
    return table, parts, list(dict.fromkeys(keys))


def fake_backend(broken: bool, asked: list[pa.Table]):
    """A ``generate`` that answers every question by rule, without a server: with
    ``broken``, "cross" questions fail without an answer (HTTP 500) and "ring" ones get an
    unparseable one; the rest get skills that depend on the question, so a row joined to
    another row's answer shows. Yields ``RESULT_SCHEMA`` batches of 50, records them.
    ``pending``: the question blocks, each but the last a multiple of ``cfg.batch_size``
    rows, so a backend's batches are exact."""

    def generate(cfg, pending, model):
        blocks = ray.get(pending.refs)
        assert all(b.num_rows % cfg.batch_size == 0 for b in blocks[:-1]), "blocks cut exactly"
        assert sum(b.num_rows for b in blocks) == pending.rows
        pending = pa.concat_tables(blocks)
        for start in range(0, pending.num_rows, 50):
            rows = []
            for r in pending.slice(start, 50).to_pylist():
                question = r["question"]
                if broken and "cross" in question:
                    rows.append(result_row(r["key"], None, error="HTTP 500"))
                elif broken and "ring" in question:
                    rows.append(result_row(r["key"], "I'm sorry, I can't see images."))
                else:
                    words = len(question.split())
                    rows.append(result_row(r["key"], f"skill {words}, object recognition"))
            batch = pa.Table.from_pylist(rows, RESULT_SCHEMA)
            asked.append(batch)
            yield batch

    return generate


def test_parts_written_by_tasks_equal_the_old_whole_table_assembly(
    small_world, tmp_path, monkeypatch, capsys
):
    # Pool shards of 300 rows and parts of 450: parts start and end inside pool shards.
    ws = ingested(small_world, tmp_path / "ws", 300)
    args = ["--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", "fake"]
    args += ["--set", "shard_rows=450"]
    answered: set[str] = set()  # what the cache held before each run
    for limit, broken in ((1234, True), (None, False)):
        asked: list[pa.Table] = []
        monkeypatch.setattr(skills_job, "generate", fake_backend(broken, asked))
        capsys.readouterr()
        meta = run(ws, *args, *(["--limit", str(limit)] if limit else []))
        printed = capsys.readouterr().out
        recorded = pa.concat_tables([RESULT_SCHEMA.empty_table(), *asked])
        failures = recorded.filter(pc.equal(recorded.column("status"), "failed"))
        assert (failures.num_rows > 0) == broken
        table, expected, order = old_parts(ws, limit, failures, "fake", 450)
        unique = len(order)
        # each uncached question asked once, in order of first appearance in the pool
        assert recorded.column("key").to_pylist() == [k for k in order if k not in answered]
        answered |= set(
            recorded.filter(pc.equal(recorded.column("status"), "ok"))["key"].to_pylist()
        )
        files = skills(ws).files(suffix=".parquet")
        assert [Path(f).name for f in files] == [
            f"part-{i:05d}.parquet" for i in range(len(expected))
        ]
        for f, part in zip(files, expected, strict=True):
            got = pq.read_table(f)
            assert got.schema == SKILLS_SCHEMA
            assert got.equals(part), f  # every row and column, in pool order
        n = table.num_rows
        assert n == (limit or 2000) and meta["samples"] == n and meta["unique_questions"] == unique
        assert meta["dedup_ratio"] == round(n / unique, 3)
        failed = table.filter(pc.equal(table.column("status"), "failed"))
        assert (meta["ok"], meta["failed"]) == (n - failed.num_rows, failed.num_rows)
        shown = re.findall(r"^  failed ('[^']*'): (.*)$", printed, re.MULTILINE)
        assert shown == [(repr(r["id"]), r["reason"]) for r in failed.slice(0, 5).to_pylist()]
        assert meta["generated"] == recorded.num_rows
    assert meta["failed"] == 0 and meta["cached"] > 0  # the rerun kept the first run's answers
