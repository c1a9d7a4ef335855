"""The vLLM backend of the skills stage: Ray Data LLM's vLLM engine processor (GPU clusters).

``vllm_processor_config`` builds the ``vLLMEngineProcessorConfig`` (continue-on-error,
so an engine error marks its row rather than failing the dataset);
``build_vllm_processor`` wraps it with the skills prompt; ``vllm_rows_to_results``
turns its output into ``engine.skills.RESULT_SCHEMA`` rows. The job retries failed
rows with a pass per attempt. vLLM itself is imported only by Ray Data's engine
actors, on the GPU nodes: building the config needs no vLLM on the driver.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import ray

from engine.skills import RESULT_SCHEMA, build_messages, result_row, try_parse_skills


def vllm_processor_config(
    model_source: str,
    *,
    engine_kwargs: dict | None = None,
    concurrency: int | tuple[int, int] = 1,
    batch_size: int = 64,
    accelerator_type: str | None = None,
    max_concurrent_batches: int = 8,
    runtime_env: dict | None = None,
):
    """Ray Data LLM's ``vLLMEngineProcessorConfig`` for the skills prompt.

    ``should_continue_on_error`` is on, so an engine error marks its row (the job
    records it and retries it) instead of failing the dataset.
    """
    from ray.data.llm import vLLMEngineProcessorConfig

    return vLLMEngineProcessorConfig(
        model_source=model_source,
        engine_kwargs=dict(engine_kwargs or {}),
        concurrency=concurrency,
        batch_size=batch_size,
        accelerator_type=accelerator_type,
        max_concurrent_batches=max_concurrent_batches,
        runtime_env=runtime_env,
        should_continue_on_error=True,
        chat_template_stage=True,
        tokenize_stage=True,
        detokenize_stage=True,
    )


def _vllm_preprocess(row: dict, max_new_tokens: int, temperature: float) -> dict:
    return {
        "messages": build_messages(row["question"] or ""),
        "sampling_params": {"temperature": temperature, "max_tokens": max_new_tokens},
    }


def _vllm_postprocess(row: dict) -> dict:
    return {
        "key": row["key"],
        "generated_text": row.get("generated_text", ""),
        "num_input_tokens": int(row.get("num_input_tokens") or 0),
        "num_generated_tokens": int(row.get("num_generated_tokens") or 0),
    }


def vllm_rows_to_results(batch: dict, attempt: int) -> pa.Table:
    """Normalise a processor's output batch (pandas/dict of columns) to ``RESULT_SCHEMA``."""
    keys = list(batch["key"])
    n = len(keys)
    errors = list(batch.get("__inference_error__", [""] * n))
    texts = list(batch.get("generated_text", [None] * n))
    p_tok = list(batch.get("num_input_tokens", [0] * n))
    c_tok = list(batch.get("num_generated_tokens", [0] * n))
    rows = []
    for key, err, text, p, c in zip(keys, errors, texts, p_tok, c_tok, strict=True):
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


def build_vllm_processor(config, *, max_new_tokens: int, temperature: float, map_cpus: float):
    """A Ray Data processor: (key, question) rows -> messages -> vLLM -> (key, generated_text, ...)."""
    from functools import partial

    from ray.data.llm import build_processor

    return build_processor(
        config,
        preprocess=partial(
            _vllm_preprocess, max_new_tokens=max_new_tokens, temperature=temperature
        ),
        postprocess=_vllm_postprocess,
        preprocess_map_kwargs={"num_cpus": map_cpus},
        postprocess_map_kwargs={"num_cpus": map_cpus},
    )


def generate_vllm(
    pending: pa.Table,
    config,
    *,
    max_new_tokens: int,
    max_attempts: int,
    retry_temperature: float,
    map_cpus: float,
):
    """Yield ``RESULT_SCHEMA`` tables for the ``(key, question)`` rows of ``pending``.

    A pass per attempt: the first greedy, the next ones sampled at
    ``retry_temperature`` over the rows still failing (an engine error or an
    unparseable answer); rows failing the last pass are yielded as failed. The rows to
    retry are taken from ``pending`` (Arrow), not collected back from the cluster.
    """
    todo = ray.data.from_arrow(pending)
    for attempt in range(1, max_attempts + 1):
        processor = build_vllm_processor(
            config,
            max_new_tokens=max_new_tokens,
            temperature=0.0 if attempt == 1 else retry_temperature,
            map_cpus=map_cpus,
        )
        out = processor(todo).map_batches(
            vllm_rows_to_results, batch_format="pandas", fn_kwargs={"attempt": attempt}
        )
        failed: list[pa.Array] = []
        for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
            batch = batch.cast(RESULT_SCHEMA)
            ok = pc.equal(batch.column("status"), "ok")
            if attempt < max_attempts:
                failed.append(batch.filter(pc.invert(ok)).column("key").combine_chunks())
                batch = batch.filter(ok)
            yield batch
        if not sum(len(f) for f in failed):
            return
        again = pc.is_in(pending.column("key"), value_set=pa.concat_arrays(failed))
        todo = ray.data.from_arrow(pending.filter(again))
