"""The skills backends as plain objects: the HTTP client against a loopback server, the
transformers writer on a tiny random model, the vLLM processor built (not run)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow as pa
import pytest
import ray

from actors.llm import (
    HTTPSkillWriter,
    Secret,
    TransformersSkillWriter,
    resolve_transformers_model,
)
from actors.vllm import _vllm_preprocess, vllm_processor_config, vllm_rows_to_results
from engine.skills import RESULT_SCHEMA, build_messages, result_row
from engine.skills_config import SkillsConfig, VLLMBackend
from engine.skills_store import QuestionBlocks
from tests.fake_openai import API_KEY, FakeOpenAI
from tests.tiny_llm import tiny_llm_dir


def batch(*questions: str) -> pa.Table:
    return pa.table({"key": [f"k{i}" for i in range(len(questions))], "question": list(questions)})


def writer(server: FakeOpenAI, **kw) -> HTTPSkillWriter:
    args = dict(base_url=server.base_url, model="fake", backoff_s=0.0, timeout_s=2.0)
    return HTTPSkillWriter(**{**args, **kw})


def test_http_rows_end_ok_or_failed_with_their_reason():
    def rule(q, n):
        return {
            "good": ("ok", "Skills: counting, OCR"),
            "garbage": ("ok", "The answer is 10."),
            "refuse": ("ok", "I'm sorry, I cannot help with that."),
            "err500": ("status", 500),
            "err404": ("status", 404),
            "broken": ("broken", "{not json"),
            "flaky": ("status", 503) if n == 1 else ("ok", "counting"),
            "bad-then-good": ("ok", "???") if n == 1 else ("ok", "spatial relations"),
        }[q]

    questions = [
        "good",
        "garbage",
        "refuse",
        "err500",
        "err404",
        "broken",
        "flaky",
        "bad-then-good",
    ]
    with FakeOpenAI(rule) as server:
        out = writer(server, max_attempts=3)(batch(*questions))
    assert out.schema == RESULT_SCHEMA
    rows = {q: r for q, r in zip(questions, out.to_pylist(), strict=True)}
    assert rows["good"]["skills"] == ["counting", "ocr"] and rows["good"]["status"] == "ok"
    assert rows["good"]["completion_tokens"] == 6 and rows["good"]["attempts"] == 1
    assert "unparseable answer" in rows["garbage"]["reason"] and rows["garbage"]["attempts"] == 3
    assert rows["garbage"]["raw"] == "The answer is 10."
    assert "refused" in rows["refuse"]["reason"]
    assert rows["err500"]["reason"].startswith("HTTP 500") and rows["err500"]["attempts"] == 3
    # A client error is not retried: the same request would fail the same way.
    assert rows["err404"]["reason"].startswith("HTTP 404") and rows["err404"]["attempts"] == 1
    assert rows["broken"]["reason"].startswith("malformed response")
    assert rows["flaky"]["status"] == "ok" and rows["flaky"]["attempts"] == 2
    assert rows["bad-then-good"]["skills"] == ["spatial relations"]
    assert server.calls["garbage"] == 3 and server.calls["err404"] == 1
    # The first try is greedy, retries sample.
    assert set(server.temperatures) == {0.0, 0.7}


def test_http_timeout_is_a_reason_not_an_exception():
    with FakeOpenAI(lambda q, n: ("sleep", 3.0)) as server:
        start = time.monotonic()
        out = writer(server, timeout_s=0.3, max_attempts=2)(batch("slow"))
    row = out.to_pylist()[0]
    assert row["status"] == "failed" and row["reason"] == "timeout after 0.3 s"
    assert row["attempts"] == 2 and time.monotonic() - start < 2.5


def test_http_dead_server_fails_fast_through_the_breaker():
    server = FakeOpenAI()
    with server:
        url = server.base_url
    client = HTTPSkillWriter(
        base_url=url, model="m", backoff_s=0.2, max_attempts=3, breaker_after=2, concurrency=1
    )
    start = time.monotonic()
    rows = client(batch(*[f"q{i}" for i in range(10)])).to_pylist()
    assert all(r["status"] == "failed" and "connection failed" in r["reason"] for r in rows)
    # Two rows pay the backoff until the breaker opens; the other eight get one try each.
    assert [r["attempts"] for r in rows[-8:]] == [1] * 8
    assert time.monotonic() - start < 3


def test_http_key_is_sent_but_never_shown():
    with FakeOpenAI(lambda q, n: ("status", 401)) as server:
        client = writer(server, api_key=Secret(API_KEY), max_attempts=1)
        out = client(batch("q"))
    assert server.auth == {f"Bearer {API_KEY}"}
    assert API_KEY not in repr(Secret(API_KEY)) and API_KEY not in str(out.to_pylist())


def test_http_rate_limit():
    with FakeOpenAI() as server:
        start = time.monotonic()
        writer(server, max_requests_per_s=20, concurrency=4)(batch(*[f"q{i}" for i in range(10)]))
    assert time.monotonic() - start >= 0.45


def test_packaged_model_resolves_without_importing_it():
    folder, gguf = resolve_transformers_model(None, None)
    assert gguf.endswith(".gguf") and os.path.isfile(os.path.join(folder, gguf))
    assert resolve_transformers_model("org/model", None) == ("org/model", None)
    assert resolve_transformers_model(os.path.join(folder, gguf), None) == (folder, gguf)


@pytest.fixture(scope="session")
def tiny_llm():
    return tiny_llm_dir()


def test_transformers_writer_prefix_cache_gives_the_same_answers(tiny_llm):
    questions = batch(
        "How many cubes?", "What colour is the big star on the left?", "Is there a cat?"
    )
    kw = dict(model=tiny_llm, gguf_file=None, max_new_tokens=6, max_attempts=1, device="cpu")
    cached = TransformersSkillWriter(**kw, prefix_cache=True)
    plain = TransformersSkillWriter(**kw, prefix_cache=False)
    assert cached.prefix_ids is not None and plain.prefix_ids is None
    a, b = cached(questions), plain(questions)
    assert a.schema == RESULT_SCHEMA and a.num_rows == 3
    assert a.column("raw").to_pylist() == b.column("raw").to_pylist()
    for row in a.to_pylist():
        assert row["status"] in ("ok", "failed") and (row["status"] == "ok") == (
            row["reason"] is None
        )
        assert 0 < row["completion_tokens"] <= 6 and row["prompt_tokens"] > 200


def test_vllm_config_and_processor_are_built_with_the_settings(ray_session, tiny_llm):
    from actors.vllm import build_vllm_processor

    backend = VLLMBackend(
        engine_kwargs={"max_model_len": 2048, "tensor_parallel_size": 1},
        concurrency=2,
        batch_size=16,
        accelerator_type="A10G",
        max_concurrent_batches=4,
        placement_group_config={"bundles": [{"CPU": 1}]},
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
        map_cpus=0.5,
    )
    config = vllm_processor_config(tiny_llm, backend, backend.runtime_env)
    assert config.should_continue_on_error and config.model_source == tiny_llm
    assert config.engine_kwargs["max_model_len"] == 2048 and config.accelerator_type == "A10G"
    # Ray fills the bundle in: one CPU, and no GPU for the engine to wait for
    (bundle,) = config.placement_group_config["bundles"]
    assert bundle["CPU"] == 1 and not bundle.get("GPU")
    processor = build_vllm_processor(config, max_new_tokens=24, retry_temperature=0.7, map_cpus=0.5)
    names = processor.list_stage_names()
    assert names[-2:] == ["vLLMEngineStage", "DetokenizeStage"] and "ChatTemplateStage" in names
    engine = processor.get_stage_by_name("vLLMEngineStage")
    assert engine.fn_constructor_kwargs["model"] == tiny_llm
    assert engine.fn_constructor_kwargs["batch_size"] == 16
    assert engine.fn_constructor_kwargs["should_continue_on_error"] is True
    assert engine.map_batches_kwargs["accelerator_type"] == "A10G"
    assert engine.map_batches_kwargs["runtime_env"] == backend.runtime_env
    assert engine.map_batches_kwargs["compute"].max_size == 2
    # every stage runs in the engine's environment; the CPU stages at map_cpus each
    tokenizer = processor.get_stage_by_name("TokenizeStage")
    assert tokenizer.map_batches_kwargs["runtime_env"] == backend.runtime_env
    assert tokenizer.map_batches_kwargs["num_cpus"] == 0.5
    assert processor.preprocess_map_kwargs == {"num_cpus": 0.5}
    first = _vllm_preprocess({"key": "k", "question": "How many?", "attempt": 1}, 24, 0.0, 0.7)
    assert first["messages"] == build_messages("How many?")
    assert first["sampling_params"] == {"temperature": 0.0, "max_tokens": 24}
    retry = _vllm_preprocess({"key": "k", "question": "How many?", "attempt": 2}, 24, 0.0, 0.7)
    assert retry["sampling_params"] == {"temperature": 0.7, "max_tokens": 24}


def test_vllm_local_paths_are_made_absolute_and_a_missing_interpreter_named(tmp_path, monkeypatch):
    import actors.vllm
    from actors.vllm import local_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / ".venv-llm" / "bin").mkdir(parents=True)
    (tmp_path / ".venv-llm" / "bin" / "python").touch()
    env = {"py_executable": ".venv-llm/bin/python", "env_vars": {"A": "1"}}
    source, got = local_paths("model", VLLMBackend(runtime_env=env))
    assert source == str(tmp_path / "model")
    project = str(Path(actors.vllm.__file__).resolve().parents[1])
    assert got == {
        "py_executable": str(tmp_path / ".venv-llm/bin/python"),
        "env_vars": {"A": "1", "PYTHONPATH": project},  # the workers' setup hook is ours
    }
    # a hub id and an interpreter on the cluster's nodes pass as they are
    remote = {"py_executable": "/opt/vllm/bin/python", "env_vars": {"PYTHONPATH": "/opt/x"}}
    source, got = local_paths("Qwen/Qwen2.5-7B", VLLMBackend(runtime_env=remote))
    assert source == "Qwen/Qwen2.5-7B" and got["py_executable"] == "/opt/vllm/bin/python"
    assert got["env_vars"]["PYTHONPATH"] == f"{project}:/opt/x"
    with pytest.raises(FileNotFoundError, match="install_llm_server.sh"):
        local_paths("model", VLLMBackend(runtime_env={"py_executable": "nope/bin/python"}))


@pytest.mark.parametrize(
    "pg, kwargs, held",
    [
        (None, {}, {"GPU": 1.0}),
        (None, {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}, {"GPU": 4.0}),
        ({"bundles": [{"CPU": 1}]}, {}, {"CPU": 1.0}),
        ({"bundles": [{"GPU": 1, "CPU": 2}] * 2}, {}, {"GPU": 2.0, "CPU": 4.0}),
        ({"bundle_per_worker": {"GPU": 1, "llm_node": 0.25}}, {}, {"GPU": 1.0, "llm_node": 0.25}),
    ],
)
def test_an_engine_holds_its_placement_groups_bundles(pg, kwargs, held):
    backend = VLLMBackend(placement_group_config=pg, engine_kwargs=kwargs)
    assert backend.engine_resources() == held


def test_vllm_rows_normalise_errors_and_answers():
    import pandas as pd

    frame = pd.DataFrame(
        {
            "key": ["a", "b", "c"],
            "question": ["How many?", "What color?", "Which one?"],
            "attempt": [2, 2, 2],
            "__inference_error__": ["", "CUDA out of memory", ""],
            "generated_text": ["counting, ocr", None, "The answer is 3."],
            "num_input_tokens": [100, float("nan"), 90],
            "num_generated_tokens": [5, float("nan"), 6],
        }
    )
    rows = vllm_rows_to_results(frame).to_pylist()
    assert rows[0]["skills"] == ["counting", "ocr"] and rows[0]["completion_tokens"] == 5
    assert rows[1]["status"] == "failed" and rows[1]["reason"] == "vLLM: CUDA out of memory"
    assert rows[2]["reason"].startswith("unparseable answer") and rows[2]["attempts"] == 2
    # each row keeps its question, which a retry pass asks again
    assert [r["question"] for r in rows] == ["How many?", "What color?", "Which one?"]


@pytest.mark.gpu
def test_vllm_backend_runs_on_a_gpu(ray_session):
    """On a GPU node with vLLM: VLSELECT_VLLM_MODEL (a hub id or local folder) answers."""
    pytest.importorskip("vllm")

    from actors.vllm import generate_vllm

    model = os.environ.get("VLSELECT_VLLM_MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct")
    cfg = SkillsConfig(
        backend="vllm", model=model, max_new_tokens=24, max_attempts=2,
        vllm={"engine_kwargs": {"max_model_len": 2048}, "batch_size": 8},
    )  # fmt: skip
    pending = batch("How many dogs are there?", "What does the sign say?")
    out = pa.concat_tables(generate_vllm(QuestionBlocks([ray.put(pending)], 2), model, cfg))
    assert out.num_rows == 2 and set(out.column("status").to_pylist()) <= {"ok", "failed"}
    assert out.column("completion_tokens").to_pylist()[0] > 0


BATCH = 4  # rows the rule engine's stage gathers per task, as the vLLM stages do


class RuleEngine:
    """Stands where the vLLM engine stage stands: an actor holding most of the CPUs.
    "bad" questions never get a usable answer, "flaky" ones only from their second
    attempt."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for row in batch.to_pylist():
            q, attempt = row["question"], row["attempt"]
            text = "I'm sorry" if "bad" in q or ("flaky" in q and attempt == 1) else "ocr"
            out.append(
                {**result_row(row["key"], text, attempts=attempt), "question": q,
                 "filler": row["filler"]}
            )  # fmt: skip
        schema = RESULT_SCHEMA.append(pa.field("question", pa.string()))
        return pa.Table.from_pylist(out, schema.append(pa.field("filler", pa.bool_())))


def answer_by_rule(rows: ray.data.Dataset) -> ray.data.Dataset:
    """The vLLM processor's shape on the 2-CPU test cluster: CPU-stage tasks around an
    engine actor holding most of the CPUs."""
    return (
        rows.map_batches(lambda b: b, batch_format="pyarrow", num_cpus=0.25)
        .map_batches(
            RuleEngine,
            batch_format="pyarrow",
            batch_size=BATCH,
            num_cpus=1.5,
            compute=ray.data.ActorPoolStrategy(size=1),
        )
        .map_batches(lambda b: b, batch_format="pyarrow", num_cpus=0.25)
    )


def test_each_first_attempt_block_stays_a_block_of_its_own(ray_session):
    """Ray Data joins a read task's small blocks into one: were the first attempt one
    task, all of a run's questions would reach a single engine as one block."""
    from actors.vllm import AttemptFeed

    refs = [ray.put(batch(f"q{i}a", f"q{i}b")) for i in range(6)]
    feed = ray.data.read_datasource(AttemptFeed(refs, [], 2), override_num_blocks=len(refs))
    blocks = [ray.get(ref) for ref in feed.materialize().to_arrow_refs()]
    assert sorted(b.num_rows for b in blocks) == [2] * 6
    assert {a for b in blocks for a in b.column("attempt").to_pylist()} == {1}
    assert not any(f for b in blocks for f in b.column("filler").to_pylist())


def test_failed_rows_are_asked_again_in_the_same_pass_until_their_last_attempt(ray_session):
    from actors.vllm import ask_with_retries

    questions = [f"{kind} {i}" for i in range(10) for kind in ("good", "flaky", "bad")]
    blocks = [
        ray.put(pa.table({"key": [f"k-{q}" for q in chunk], "question": chunk}))
        for chunk in (questions[:13], questions[13:])
    ]
    out = pa.concat_tables(
        ask_with_retries(answer_by_rule, QuestionBlocks(blocks, len(questions)), 3, BATCH)
    )
    rows = {r["key"]: r for r in out.to_pylist()}
    assert out.num_rows == len(rows) == 30  # every row once: its final answer
    for q in questions:
        row = rows[f"k-{q}"]
        if q.startswith("good"):
            assert (row["status"], row["attempts"]) == ("ok", 1)
        elif q.startswith("flaky"):
            assert (row["status"], row["attempts"]) == ("ok", 2)
        else:
            assert (row["status"], row["attempts"]) == ("failed", 3)
            assert "refused" in row["reason"]  # the reason of its last attempt
    assert list(ask_with_retries(answer_by_rule, QuestionBlocks([], 0), 3, BATCH)) == []


@pytest.mark.timeout(180)
def test_a_short_block_or_a_few_retries_do_not_wait_for_a_whole_batch(ray_session):
    """The engine stage gathers BATCH rows per task and keeps fewer until its input ends,
    which is after the last attempt: a 1-row first block and a 1-row retry would wait
    for themselves (they hung before the feed padded them to whole batches)."""
    from actors.vllm import ask_with_retries

    blocks = [
        ray.put(pa.table({"key": [f"k{i}" for i in range(5)], "question": ["good"] * 5})),
        ray.put(pa.table({"key": ["k-flaky"], "question": ["flaky"]})),
    ]
    out = pa.concat_tables(ask_with_retries(answer_by_rule, QuestionBlocks(blocks, 6), 3, BATCH))
    assert sorted(out.column("key").to_pylist()) == sorted(
        [f"k{i}" for i in range(5)] + ["k-flaky"]
    )
    assert out.column("status").to_pylist() == ["ok"] * 6  # no filler among them
