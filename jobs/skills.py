"""``vlselect skills``: an LLM names the visual skills each pool question needs -> ``<ws>/skills``.

What it does:
    1. checks the pool and the backend's config (model, server URL, API key variable)
       in the driver, before Ray starts;
    2. reads the first ``limit`` rows of ``<ws>/pool`` in Ray Data tasks, computes each
       sample's instruction text and its cache key (question, prompt version, model),
       and deduplicates by key, first in each task, then across the pool with a hash
       aggregation: templated pools repeat questions, so each unique question is asked
       once (the driver holds counts and object refs, nothing per row or question);
    3. skips the keys already in ``<ws>/cache/skills/`` (their keys join the same
       aggregation; successes only, written as they arrive, so an interrupted run or a
       dead server loses nothing done);
    4. generates the rest through the backend (``transformers`` | ``openai`` | ``vllm``);
       every row ends "ok" or "failed" with its reason after ``max_attempts`` tries;
    5. writes one row per pool id to ``<ws>/skills/`` (id, skills, skill_text, raw,
       status, reason, prompt_version, model) in pool order, ``shard_rows`` rows per
       part file, each part built by a task that reads its pool rows again and joins
       them to the answers of the unique keys; committed (engine.artifacts.Skills),
       and prints counts: ok / failed / cached / generated, samples/s, tokens/s.

A re-run regenerates nothing that succeeded; it retries only what failed or was
never reached. Then, unless ``embed: false``, the embed stage embeds ``skill_text`` of
the rows with status ok into ``<ws>/embeddings/skill`` (``vlselect embed --spaces skill``
does the same on its own; it resumes, so an unchanged skills table is not re-embedded).

Raises:
    InputError: no pool, or a backend config that cannot work (exit 2, nothing written).
    RuntimeError: a pool id got no row, i.e. rows were lost (exit 1, nothing committed).
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from urllib.parse import urlsplit

import pyarrow.compute as pc
import ray
from tqdm import tqdm

from actors.adapter import ray_data_options
from actors.llm import (
    PACKAGED_SMOLLM2,
    HTTPSkillWriter,
    Secret,
    TransformersSkillWriter,
    resolve_transformers_model,
)
from actors.vllm import generate_vllm, local_paths
from engine.artifacts import Pool, Ref, Skills, SkillsMeta
from engine.config import build_config
from engine.errors import InputError
from engine.resources import Resources
from engine.skills import PROMPT_VERSION, RESULT_SCHEMA
from engine.skills_config import SkillsConfig
from engine.skills_store import CACHE_DIR, EXAMPLES, CacheWriter, QuestionBlocks
from engine.workspace import Workspace
from jobs import embed
from jobs.runtime import Timer, connect, print_summary
from jobs.skills_passes import answers, plan_questions, write_parts

STAGE = "skills"
DEFAULT_WORKSPACE = None


CONFIG = SkillsConfig
FLAGS = {"base-url": "openai.base_url"}


def reads(cfg: SkillsConfig) -> list[Ref]:
    return [Ref("pool")]


def writes(cfg: SkillsConfig) -> list[Ref]:
    return [Ref("skills"), *([Ref("embeddings", "skill")] if cfg.embed else [])]


def resources(cfg: SkillsConfig) -> dict[str, Resources]:
    if cfg.backend == "transformers":
        return {"transformers model actor": cfg.transformers.resources}
    if cfg.backend == "openai":
        return {"openai client actor": cfg.openai.resources}
    held = cfg.vllm.engine_resources()
    engine = Resources(
        num_cpus=held.pop("CPU", 0.0),
        num_gpus=held.pop("GPU", 0.0),
        accelerator_type=cfg.vllm.accelerator_type,
        custom=held,
    )
    return {f"vLLM engine x{cfg.vllm.concurrency}": engine}


def model_id(cfg: SkillsConfig) -> str:
    """The model's name in the cache key and the output: stable across machines."""
    if cfg.backend == "transformers":
        if cfg.model in (None, "", PACKAGED_SMOLLM2):
            try:
                _, gguf = resolve_transformers_model(None, cfg.transformers.gguf_file)
            except FileNotFoundError as err:
                raise InputError(str(err)) from None
            return f"{PACKAGED_SMOLLM2}/{gguf}"
        return cfg.model + (f"#{cfg.transformers.gguf_file}" if cfg.transformers.gguf_file else "")
    if not cfg.model:
        raise InputError(
            f"the {cfg.backend} backend needs a model: pass --model NAME "
            "(the served model's name for openai, a model source for vllm)"
        )
    return cfg.model


ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def api_key(cfg: SkillsConfig) -> Secret | None:
    name = cfg.openai.api_key_env
    if not name:
        return None
    value = os.environ.get(name)
    if not value:
        # A key pasted here by mistake must not reach the terminal or a CI log: only a
        # conventional upper-case variable name is shown.
        shown = f"${name}" if ENV_NAME.fullmatch(name) else "a variable (name not shown)"
        raise InputError(
            f"skills.openai.api_key_env names {shown}, which is not set: export it before "
            "running (the key is read from the environment only; api_key_env holds the "
            "variable's NAME, such as OPENAI_API_KEY, never the key)"
        )
    return Secret(value)


def check_input(cfg: SkillsConfig, ws: Workspace) -> Pool:
    pool = Pool.open(ws)
    if cfg.backend == "vllm":
        try:
            local_paths(cfg.model or "", cfg.vllm)
        except FileNotFoundError as err:
            raise InputError(str(err)) from None
    if cfg.backend == "openai" and not cfg.openai.base_url:
        raise InputError(
            "the openai backend needs the server's URL: pass --base-url http://HOST:PORT/v1 "
            "(or set skills.openai.base_url)"
        )
    if cfg.backend == "openai":
        try:
            parts = urlsplit(cfg.openai.base_url)
        except ValueError as err:
            raise InputError(
                f"skills.openai.base_url is not a URL ({err}): pass --base-url http://HOST:PORT/v1"
            ) from None
        if parts.username or parts.password:
            # meta.json and the logs carry the URL, so it must not carry a key; not shown.
            raise InputError(
                "skills.openai.base_url carries credentials (user:password@host): drop them, "
                "export the key as an environment variable and name it in "
                "skills.openai.api_key_env"
            )
    return pool


def generate(cfg: SkillsConfig, pending: QuestionBlocks, model: str):
    """Yield ``RESULT_SCHEMA`` tables for the ``(key, question)`` blocks of ``pending``."""
    if cfg.backend == "vllm":
        yield from generate_vllm(pending, model, cfg)
        return
    ds = ray.data.from_arrow_refs(pending.refs)
    if cfg.backend == "transformers":
        t = cfg.transformers
        cls, kwargs = TransformersSkillWriter, {
            "model": cfg.model, "gguf_file": t.gguf_file, "device": t.device, "dtype": t.dtype,
            "generate_batch_size": t.generate_batch_size, "torch_threads": t.torch_threads,
            "prefix_cache": t.prefix_cache,
        }  # fmt: skip
        compute = ray.data.ActorPoolStrategy(min_size=t.min_actors, max_size=t.max_actors)
        opts = ray_data_options(t.resources)
    else:
        o = cfg.openai
        rate = o.max_requests_per_s / o.actors if o.max_requests_per_s else None
        cls, kwargs = HTTPSkillWriter, {
            "base_url": o.base_url, "model": model, "api_key": api_key(cfg),
            "concurrency": o.concurrency, "max_requests_per_s": rate, "timeout_s": o.timeout_s,
            "backoff_s": o.backoff_s, "backoff_max_s": o.backoff_max_s,
            "breaker_after": o.breaker_after, "extra_body": o.extra_body,
        }  # fmt: skip
        # The client is thread-safe (one request pool, per-thread sessions), so its calls
        # may overlap: the threads never wait for a batch's slowest request.
        compute = ray.data.ActorPoolStrategy(
            size=o.actors,
            max_concurrent_calls_per_actor=o.batches_in_flight,
            enable_true_multi_threading=True,
        )
        opts = ray_data_options(o.resources)
    kwargs.update(
        max_new_tokens=cfg.max_new_tokens,
        max_attempts=cfg.max_attempts,
        retry_temperature=cfg.retry_temperature,
    )
    out = ds.map_batches(
        cls,
        batch_format="pyarrow",
        batch_size=cfg.batch_size,
        compute=compute,
        fn_constructor_kwargs=kwargs,
        **opts,
    )
    for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
        yield batch.cast(RESULT_SCHEMA)


def main(cfg: SkillsConfig, ws: Workspace) -> dict:
    """Run the skills stage; see the module docstring. Returns the summary dict."""
    timer = Timer()
    pool = check_input(cfg, ws)
    model = model_id(cfg)
    if cfg.backend == "openai":
        api_key(cfg)  # refuse a missing key variable before Ray starts
    how = {"inputs": {"pool": pool.fingerprint}, "config": cfg, "model": model}
    plan = Skills.begin(ws, prompt=PROMPT_VERSION, overwrite=cfg.overwrite, **how)
    if plan.action == "current" and Skills.committed(ws, None, plan.manifest).meta.failed:
        plan = Skills.begin(ws, prompt=PROMPT_VERSION, overwrite=True, **how)  # retry failures
    if plan.action == "current":
        done = Skills.committed(ws, None, plan.manifest)
        print_summary(STAGE, [("skills", f"current, nothing asked again ({done.dir})")])
        return _then_embed(cfg, ws, done.meta.summary, done.meta.ok)
    connect()
    questions = plan_questions(cfg, pool, model)
    samples = questions.samples
    writer = CacheWriter(ws, model, cfg.cache_flush_rows)
    failures: list[ray.ObjectRef] = []
    tokens, reasons = Counter(), Counter()
    gen_timer = Timer()
    try:
        with tqdm(total=questions.to_ask, unit="question", desc="skills", mininterval=1.0) as bar:
            for batch in generate(cfg, questions.pending, model) if questions.to_ask else ():
                writer.add(batch)
                failed = batch.filter(pc.equal(batch.column("status"), "failed"))
                if failed.num_rows:
                    failures.append(ray.put(failed))
                reasons.update(r.split(":")[0] for r in failed.column("reason").to_pylist())
                tokens["prompt"] += pc.sum(batch.column("prompt_tokens")).as_py() or 0
                tokens["completion"] += pc.sum(batch.column("completion_tokens")).as_py() or 0
                bar.update(batch.num_rows)
    finally:
        writer.flush()  # what succeeded stays cached, however the loop ended
    gen_seconds = gen_timer.seconds
    results = answers.remote(ws, questions.keys, failures)
    attempt = plan.attempt
    parts = write_parts(cfg, pool, questions, results, model, attempt)
    if ws.parquet_rows(attempt.dir) != samples:
        raise RuntimeError(
            f"skills wrote {ws.parquet_rows(attempt.dir)} rows for {samples} ids; "
            "nothing was committed"
        )
    status = Counter({s: sum(p[s] for p in parts) for s in ("ok", "failed")})
    seconds = timer.seconds
    summary = {
        "backend": cfg.backend,
        "model": model,
        "prompt_version": PROMPT_VERSION,
        "samples": samples,
        "unique_questions": questions.unique,
        "dedup_ratio": round(samples / max(questions.unique, 1), 3),
        "ok": status["ok"],
        "failed": status["failed"],
        "cached": questions.cached,
        "generated": questions.to_ask,
        "generated_ok": writer.rows,
        "failed_by_reason": dict(sorted(reasons.items())),
        "prompt_tokens": tokens["prompt"],
        "completion_tokens": tokens["completion"],
        "seconds": round(seconds, 2),
        "generate_seconds": round(gen_seconds, 2),
        "samples_per_s": round(samples / max(seconds, 1e-9), 2),
        "generated_per_s": round(questions.to_ask / max(gen_seconds, 1e-9), 2)
        if questions.to_ask
        else None,
        "tokens_per_s": round(tokens["completion"] / max(gen_seconds, 1e-9), 1)
        if questions.to_ask
        else None,
        "cache": ws.path(*CACHE_DIR),
    }
    meta = SkillsMeta(
        backend=cfg.backend,
        model=model,
        prompt_version=PROMPT_VERSION,
        samples=samples,
        ok=status["ok"],
        failed=status["failed"],
        summary=summary,
        config=cfg.model_dump(mode="json"),
    )
    out_dir = Skills.committed(ws, None, attempt.commit(meta)).dir
    summary["skills"] = out_dir
    rows = [
        ("backend / model", f"{cfg.backend} / {model}"),
        ("prompt", PROMPT_VERSION),
        (
            "samples",
            f"{samples} ({questions.unique} unique questions, x{summary['dedup_ratio']})",
        ),
        ("ok / failed", f"{status['ok']} / {status['failed']}"),
        *[(f"  {r} (questions)", n) for r, n in summary["failed_by_reason"].items()],
        ("cached / generated", f"{questions.cached} / {questions.to_ask} questions"),
        ("time", f"{summary['seconds']} s ({summary['samples_per_s']} samples/s)"),
        (
            "generation",
            f"{summary['generate_seconds']} s, {summary['generated_per_s']} questions/s, {summary['tokens_per_s']} tokens/s",
        ),
        ("skills", out_dir),
    ]
    print_summary(STAGE, rows, extra=summary)
    for row in [e for p in parts for e in p["examples"]][:EXAMPLES]:
        print(f"  failed {row['id']!r}: {row['reason']}")
    return _then_embed(cfg, ws, summary, status["ok"])


def _then_embed(cfg: SkillsConfig, ws: Workspace, summary: dict, ok: int) -> dict:
    if cfg.embed and ok:
        embed_cfg = build_config(
            embed.STAGE,
            embed.CONFIG,
            ws.read_config(),
            {"embed": {"spaces": ["skill"], "overwrite": cfg.overwrite}},
        )
        summary = {**summary, "embed": embed.main(embed_cfg, ws)["spaces"][0]}
    return summary


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main([STAGE, *sys.argv[1:]]))
