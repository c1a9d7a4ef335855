"""``vlselect skills``: an LLM names the visual skills each pool question needs -> ``<ws>/skills``.

What it does:
    1. checks the pool and the backend's config (model, server URL, API key variable)
       in the driver, before Ray starts;
    2. reads ``<ws>/pool`` with Ray Data, computes each sample's instruction text and
       its cache key (question, prompt version, model), and deduplicates by key:
       templated pools repeat questions, so each unique question is asked once (the
       driver holds one row per unique key, nothing per pool row);
    3. skips the keys already in ``<ws>/cache/skills/`` (successes only, written as
       they arrive, so an interrupted run or a dead server loses nothing done);
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

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
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
from engine.commit import Attempt
from engine.config import build_config
from engine.errors import InputError
from engine.resources import Resources
from engine.skills import PROMPT_VERSION, RESULT_SCHEMA
from engine.skills_config import SkillsConfig
from engine.skills_store import (
    CACHE_DIR,
    EXAMPLES,
    CacheWriter,
    UniqueQuestions,
    assemble,
    keyed_questions,
    part_counts,
    part_keys,
    part_slices,
    read_cache,
    results_table,
    unique_questions,
)
from engine.workspace import Workspace, write_table_atomic
from jobs import embed
from jobs.runtime import Timer, bounded_submit, cluster_cpus, connect, print_summary

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


def _unique_questions(batch: pa.Table, prompt_version: str, model: str) -> pa.Table:
    return unique_questions(keyed_questions(batch, prompt_version, model))


def read_questions(cfg: SkillsConfig, pool: Pool, model: str) -> tuple[int, pa.Table]:
    """Pass 1: the pool samples read (the first ``limit``) and ``(key, question)`` once per
    unique key, in order of first appearance; a batch's rows are deduplicated in its task,
    so no id and no repeated question reaches the driver."""
    # Pool order in, pool order out, and --limit takes the *first* N: this cheap pass
    # preserves order (a dataset keeps the context it was created with).
    ctx = ray.data.DataContext.get_current()
    preserve = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        ds = ray.data.read_parquet(pool.shards, filesystem=pool.ws.fs).select_columns(
            ["id", "conversations"]
        )
        if cfg.limit:
            ds = ds.limit(cfg.limit)
        ds = ds.map_batches(
            _unique_questions,
            batch_format="pyarrow",
            fn_kwargs={"prompt_version": PROMPT_VERSION, "model": model},
            num_cpus=0.25,
        )
    finally:
        ctx.execution_options.preserve_order = preserve
    unique = UniqueQuestions()
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        unique.add(batch)
    return unique.samples, unique.table()


@ray.remote(num_cpus=0.25)
def _write_part(fs, ranges: list[tuple[str, int, int]], results: pa.Table, model: str, path: str):
    """Pass 2: one output part from its pool rows (``ranges``: path, begin, end) and the
    answers of the unique keys; returns ``part_counts`` with the path, nothing per row."""
    table = assemble(part_keys(fs, ranges, PROMPT_VERSION, model), results, model)
    write_table_atomic(fs, path, table)
    return {"path": path, **part_counts(table)}


def write_parts(
    cfg: SkillsConfig, pool: Pool, samples: int, results: pa.Table, model: str, attempt: Attempt
) -> list[dict]:
    """Pass 2 in tasks: part-00000.parquet, ... of ``cfg.shard_rows`` rows of the first
    ``samples`` pool rows, in pool order. Returns the parts' ``part_counts`` in part order."""
    files = pool.shards
    sizes = [pq.read_metadata(f, filesystem=pool.ws.fs).num_rows for f in files]
    parts = part_slices(sizes, min(samples, sum(sizes)), cfg.shard_rows)
    results_ref = ray.put(results)  # once into the object store, not once per task
    names = [attempt.path(f"part-{i:05d}.parquet") for i in range(len(parts))]

    def submit(i: int):
        ranges = [(files[f], begin, end) for f, begin, end in parts[i]]
        return _write_part.remote(pool.ws.fs, ranges, results_ref, model, names[i])

    # Results arrive as tasks finish; the failure examples are wanted in pool order.
    counts: dict[str, dict] = {}
    with tqdm(total=samples, unit="row", desc="skills rows", mininterval=1.0) as bar:
        for done in bounded_submit(submit, range(len(parts)), 2 * cluster_cpus()):
            counts[done["path"]] = done
            bar.update(done["rows"])
    return [counts[name] for name in names]


def generate(cfg: SkillsConfig, pending: pa.Table, model: str):
    """Yield ``RESULT_SCHEMA`` tables for the ``(key, question)`` rows of ``pending``."""
    if cfg.backend == "vllm":
        yield from generate_vllm(pending, model, cfg)
        return
    step = max(cfg.batch_size, 1)
    ds = ray.data.from_arrow([pending.slice(i, step) for i in range(0, pending.num_rows, step)])
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
        compute = ray.data.ActorPoolStrategy(size=o.actors)
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
    samples, questions = read_questions(cfg, pool, model)
    keys = questions.column("key").combine_chunks()
    known = read_cache(ws, keys).column("key")
    n_cached = len(known)
    pending = questions.filter(pc.invert(pc.is_in(keys, value_set=known)))
    todo = pending.column("key")
    writer = CacheWriter(ws, model, cfg.cache_flush_rows)
    failures: list[pa.Table] = [RESULT_SCHEMA.empty_table()]
    tokens, reasons = Counter(), Counter()
    gen_timer = Timer()
    try:
        with tqdm(total=len(todo), unit="question", desc="skills", mininterval=1.0) as bar:
            for batch in generate(cfg, pending, model) if len(todo) else ():
                writer.add(batch)
                failed = batch.filter(pc.equal(batch.column("status"), "failed"))
                failures.append(failed)
                reasons.update(r.split(":")[0] for r in failed.column("reason").to_pylist())
                tokens["prompt"] += pc.sum(batch.column("prompt_tokens")).as_py() or 0
                tokens["completion"] += pc.sum(batch.column("completion_tokens")).as_py() or 0
                bar.update(batch.num_rows)
    finally:
        writer.flush()  # what succeeded stays cached, however the loop ended
    gen_seconds = gen_timer.seconds
    results = results_table(read_cache(ws, keys), pa.concat_tables(failures))
    attempt = plan.attempt
    parts = write_parts(cfg, pool, samples, results, model, attempt)
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
        "unique_questions": questions.num_rows,
        "dedup_ratio": round(samples / max(questions.num_rows, 1), 3),
        "ok": status["ok"],
        "failed": status["failed"],
        "cached": n_cached,
        "generated": len(todo),
        "generated_ok": writer.rows,
        "failed_by_reason": dict(sorted(reasons.items())),
        "prompt_tokens": tokens["prompt"],
        "completion_tokens": tokens["completion"],
        "seconds": round(seconds, 2),
        "generate_seconds": round(gen_seconds, 2),
        "samples_per_s": round(samples / max(seconds, 1e-9), 2),
        "generated_per_s": round(len(todo) / max(gen_seconds, 1e-9), 2) if todo else None,
        "tokens_per_s": round(tokens["completion"] / max(gen_seconds, 1e-9), 1) if todo else None,
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
            f"{samples} ({questions.num_rows} unique questions, x{summary['dedup_ratio']})",
        ),
        ("ok / failed", f"{status['ok']} / {status['failed']}"),
        *[(f"  {r} (questions)", n) for r, n in summary["failed_by_reason"].items()],
        ("cached / generated", f"{n_cached} / {len(todo)} questions"),
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
