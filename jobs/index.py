"""``vlselect index``: one FAISS index per shard of an embedded space, built in parallel.

What it does:
    1. checks in the driver, before Ray starts, that the space is embedded and committed,
       that 1 <= shards <= rows, and that the factory string parses and the space has
       the rows its training needs;
    2. splits the space's N rows (in embedding-file order) into ``--shards`` contiguous,
       balanced ranges and compares the fingerprint (the embeddings' and the pool's
       fingerprints, the factory, the shard count, the bad-row policy, faiss's version;
       engine.commit): a committed index with it is kept, an unfinished attempt with it
       resumes (its finished shards kept), a change or ``--overwrite`` builds a new attempt;
    3. a factory that trains (IVF, PQ) is trained once, in one task, on a seeded sample
       of the whole space (``engine.faiss_index.train_rows``); the empty trained index
       (``trained.faiss``) is the template every shard copies, so the shards share one
       coarse quantizer and recall does not fall with the shard count;
    4. builds each unfinished shard in a Ray task (resources from ``task``): reads only
       the embedding files that hold its range, finds each id's global pool row, refuses
       NaN, inf or all-zero vectors (or leaves them out with ``on_bad_rows: exclude``,
       counted in the meta), adds the vectors to a copy of the template (label i = the
       shard's i-th id), and writes ``shard-XXXX.ids.parquet`` then ``shard-XXXX.faiss``
       (atomically: the ``.faiss`` file marks the shard finished);
    5. commits the index (engine.artifacts.Index: dim, rows per shard, factory, metric,
       seconds) and prints a summary.

Output: ``<ws>/index/<space>/shard-XXXX.faiss`` (``faiss.serialize_index``, inner product:
the vectors are L2-normalised, so scores are cosine similarities),
``shard-XXXX.ids.parquet`` (id string and row int64, the global pool row, in label
order) and, for a trained factory, ``trained.faiss``.

Raises:
    InputError: no finished embeddings for the space, an unknown space, shards < 1 or
        more than the rows, a factory that does not parse or that the space's rows cannot
        train, vectors whose ids are not in the pool, bad vectors (named with their count) when ``on_bad_rows`` is ``error``
        (exit 2; what this run wrote is discarded).
    RuntimeError / a Ray task error: a build failed (exit 1; finished shards are kept
        and a re-run resumes).
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from actors.adapter import ray_options
from engine.artifacts import Index, IndexMeta, Pool, Ref
from engine.commit import Attempt, operational
from engine.embeddings import EmbeddedSpace, open_space, read_vectors, unusable_rows
from engine.errors import InputError
from engine.faiss_index import (
    build_index,
    check_trainable,
    make_index,
    shard_name,
    train_index,
    train_rows,
)
from engine.kmeans import sample_positions, split_positions
from engine.knn import file_slices, pool_positions, shard_ranges
from engine.resources import Resources
from engine.workspace import Workspace
from jobs.runtime import Timer, connect, print_summary

STAGE = "index"
TEMPLATE = "trained.faiss"
DEFAULT_WORKSPACE = None
log = logging.getLogger("vlselect.index")


class IndexConfig(BaseModel):
    """Configuration of ``vlselect index`` (section ``index``)."""

    model_config = ConfigDict(extra="forbid")

    space: str | None = Field(None, description="The space to index: clip, dino, text or skill.")
    shards: int = Field(1, ge=1, description="Index shards (one serving actor each).")
    factory: str = Field(
        "Flat",
        description="faiss index_factory string, inner-product metric: 'Flat' (exact), "
        "'IVF1024,Flat' (trained, needs >= 1024 rows per shard), 'HNSW32', 'IVF4096,PQ32'...",
    )
    on_bad_rows: Literal["error", "exclude"] = Field(
        "error",
        description="NaN, inf or all-zero vectors: 'error' refuses the space (exit 2), "
        "'exclude' leaves those rows out of the index and counts them in the meta.",
    )
    gpu: bool = operational(
        False,
        description="Train and add on the task's GPU (needs faiss-gpu and task.num_gpus); "
        "the index is stored for the CPU either way.",
    )
    threads: int = operational(
        0, ge=0, description="faiss threads per build task; 0: Ray's, floor(task.num_cpus)."
    )
    task: Resources = operational(
        default_factory=lambda: Resources(num_cpus=1.0),
        description="Resources of one shard's build task (num_gpus with gpu: true; "
        "memory_gb about 2-3x the shard's vectors).",
    )
    overwrite: bool = operational(False, description="Rebuild every shard, even if current.")


CONFIG = IndexConfig


def reads(cfg: IndexConfig) -> list[Ref]:
    return [Ref("embeddings", cfg.space)]


def writes(cfg: IndexConfig) -> list[Ref]:
    return [Ref("index", cfg.space)]


def resources(cfg: IndexConfig) -> dict[str, Resources]:
    return {f"build task x{cfg.shards}": cfg.task}


# -- one shard, in a Ray task -------------------------------------------------------------


def build_shard(
    ws: Workspace,
    shard: int,
    files: list[str],
    slices: list[tuple[int, int, int]],
    pool_files: list[str],
    dim: int,
    cfg: dict,
) -> dict:
    """Read a shard's rows, check them, build and write its index. Returns its stats.

    Each vector's global pool row (in ``pool_files`` order) is stored beside its id: the
    row is what searches return, and the one coordinate the spaces share (the skill
    space holds only the rows with a skill description). An input problem (bad vectors,
    a wrong length, ids not in the pool) is returned as ``problem`` with nothing written,
    so the driver can report every shard's at once.
    """
    timer = Timer()
    if cfg["threads"]:
        faiss.omp_set_num_threads(cfg["threads"])
    pool_ids = pa.concat_arrays([
        pq.read_table(f, columns=["id"], filesystem=ws.fs).column("id").combine_chunks()
        for f in pool_files
    ])  # fmt: skip
    id_parts, row_parts, vector_parts = [], [], []
    for f, lo, hi in slices:
        try:
            ids, vectors = read_vectors(ws.fs, files[f], dim)
            ids = ids.slice(lo, hi - lo)
            row_parts.append(pool_positions(ids, pool_ids, 0))
        except ValueError as err:
            return {"shard": shard, "problem": f"{files[f]}: {err}"}
        id_parts.append(ids)
        vector_parts.append(vectors[lo:hi])
    ids = pa.concat_arrays(id_parts)
    rows = np.concatenate(row_parts)
    vectors = np.concatenate(vector_parts)
    bad = unusable_rows(vectors)
    n_bad = int(bad.sum())
    if n_bad and cfg["on_bad_rows"] == "error":
        examples = ids.filter(pa.array(bad)).slice(0, 5).to_pylist()
        return {"shard": shard, "bad": n_bad, "bad_examples": examples}
    if n_bad:
        ids, rows, vectors = ids.filter(pa.array(~bad)), rows[~bad], vectors[~bad]
    template = None
    if cfg["template"]:
        with ws.fs.open_input_stream(cfg["template"]) as fh:
            template = faiss.deserialize_index(np.frombuffer(fh.read(), dtype=np.uint8))
    try:
        index = build_index(vectors, cfg["factory"], gpu=cfg["gpu"], template=template)
    except InputError as err:
        return {"shard": shard, "problem": f"shard {shard}: {err}"}
    name = shard_name(shard)
    out_dir = cfg["out_dir"]
    ws.write_table(f"{out_dir}/{name}.ids.parquet", pa.table({"id": ids, "row": rows}))
    ws.write_bytes(f"{out_dir}/{name}.faiss", memoryview(faiss.serialize_index(index)))
    return {"shard": shard, "rows": len(ids), "excluded": n_bad, "seconds": timer.seconds}


def train_template(
    ws: Workspace, files: list[str], positions: list[np.ndarray], dim: int, cfg: dict
) -> dict:
    """Train the factory once on the sampled rows (``positions``: local rows per file) and
    write the empty trained index to ``cfg['template']``; every shard then copies it."""
    timer = Timer()
    if cfg["threads"]:
        faiss.omp_set_num_threads(cfg["threads"])
    parts = []
    for f, local in zip(files, positions, strict=True):
        if len(local):
            parts.append(read_vectors(ws.fs, f, dim)[1][local])
    sample = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    sample = sample[~unusable_rows(sample)]  # the shards report bad rows; training skips them
    try:
        index = train_index(sample, cfg["factory"], gpu=cfg["gpu"])
    except InputError as err:
        return {"problem": str(err)}
    ws.write_bytes(cfg["template"], memoryview(faiss.serialize_index(index)))
    return {"rows": len(sample), "seconds": timer.seconds}


_build_shard = ray.remote(build_shard)
_train_template = ray.remote(train_template)


# -- the driver ---------------------------------------------------------------------------


def check_inputs(cfg: IndexConfig, ws: Workspace) -> EmbeddedSpace:
    """The space to index, checked before Ray starts. Raises InputError with the fix."""
    if not cfg.space:
        raise InputError("no space to index: pass --space clip|dino|text|skill")
    space = open_space(ws, cfg.space)
    if cfg.shards > space.rows:
        raise InputError(
            f"--shards {cfg.shards} is more than the {space.rows} vectors of space "
            f"{cfg.space!r}; use at most {space.rows} shards"
        )
    check_trainable(cfg.factory, space.dim, space.rows)
    if cfg.gpu and not cfg.task.num_gpus:
        raise InputError("gpu: true needs a GPU per build task: set task.num_gpus (e.g. 1)")
    return space


def main(cfg: IndexConfig, ws: Workspace) -> dict:
    """Build ``<ws>/index/<space>``; see the module docstring. Returns the summary."""
    timer = Timer()
    space = check_inputs(cfg, ws)
    result = build(cfg, ws, space)
    per_shard = result["rows_per_shard"]
    rows = [
        ("space", f"{space.space}: {space.rows} vectors x {space.dim}"),
        ("factory", f"{cfg.factory} (inner product = cosine on normalised vectors)"),
        ("shards", f"{cfg.shards}: {result['built']} built now, {result['kept']} kept"),
        ("rows per shard", f"{min(per_shard)}-{max(per_shard)}; {result['rows']} indexed"),
    ]
    if result["excluded"]:
        rows.append(("excluded", f"{result['excluded']} NaN/inf/zero vectors left out"))
    rows += [("time", f"{timer.seconds:.1f} s"), ("index", result["path"])]
    print_summary(STAGE, rows, extra=result)
    return result


def build(cfg: IndexConfig, ws: Workspace, space: EmbeddedSpace) -> dict:
    """Build the unfinished shards, resuming an attempt of the same fingerprint."""
    timer = Timer()
    name = space.space
    pool = Pool.open(ws)
    plan = Index.begin(
        ws,
        name,
        inputs={"embeddings": space.fingerprint, "pool": pool.fingerprint},
        config=cfg,
        faiss=faiss.__version__,
        overwrite=cfg.overwrite,
    )
    if plan.action == "current":
        done = Index.committed(ws, name, plan.manifest)
        return _result(done, built=0, kept=done.meta.shards, seconds={})
    attempt = plan.attempt
    if plan.action == "start" and plan.manifest is not None:
        log.warning("%s: %s; rebuilding every shard", name,
                    "overwrite" if cfg.overwrite else "embeddings or index config changed")  # fmt: skip
    done_shards = {s for s in range(cfg.shards) if attempt.exists(f"{shard_name(s)}.faiss")}
    pending = [s for s in range(cfg.shards) if s not in done_shards]
    ranges = shard_ranges(space.rows, cfg.shards)
    connect()
    template = _template(cfg, ws, space, attempt) if pending else None
    results = _run(cfg, ws, space, pool.shards, pending, ranges, attempt.dir, template)
    _refuse_problems(ws, name, results, attempt)
    per_shard, excluded = [], []
    for s, (start, stop) in enumerate(ranges):
        rows = pq.ParquetFile(attempt.path(f"{shard_name(s)}.ids.parquet"), filesystem=ws.fs)
        per_shard.append(rows.metadata.num_rows)
        excluded.append(stop - start - per_shard[-1])
    meta = IndexMeta(
        space=name,
        factory=cfg.factory,
        metric="inner_product",
        dim=space.dim,
        vectors=space.rows,
        rows=sum(per_shard),
        shards=cfg.shards,
        rows_per_shard=per_shard,
        excluded=sum(excluded),
        excluded_per_shard=excluded,
        seconds=round(timer.seconds, 2),
        config=cfg.model_dump(mode="json"),
        pool_rows=True,
        trained_once=not make_index(cfg.factory, space.dim).is_trained,
    )
    done = Index.committed(ws, name, attempt.commit(meta))
    seconds = {r["shard"]: round(r["seconds"], 2) for r in results}
    return _result(done, built=len(pending), kept=len(done_shards), seconds=seconds)


def _result(done: Index, built: int, kept: int, seconds: dict) -> dict:
    return {
        **done.meta.model_dump(exclude={"config"}),
        "built": built,
        "kept": kept,
        "build_seconds_per_shard": seconds,
        "path": done.dir,
    }


def _template(cfg: IndexConfig, ws: Workspace, space: EmbeddedSpace, attempt: Attempt):
    """The trained empty index every shard copies (None for a factory that needs no
    training), trained in one task on a seeded sample of the whole space; kept in the
    attempt, so a resumed build adds to the same quantizer."""
    empty = make_index(cfg.factory, space.dim)
    if empty.is_trained:
        return None
    path = attempt.path(TEMPLATE)
    if attempt.exists(TEMPLATE):
        return path
    rows_per_file = _rows_per_file(ws, space)
    wanted = sample_positions(space.rows, train_rows(empty, space.rows), seed=0)
    per_file = split_positions(wanted, rows_per_file)
    files = [f for f, p in zip(space.files, per_file, strict=True) if len(p)]
    local = [p for p in per_file if len(p)]
    task_cfg = {"factory": cfg.factory, "gpu": cfg.gpu, "threads": cfg.threads, "template": path}
    log.info("%s: training %s once on %d of %d rows", space.space, cfg.factory, len(wanted),
             space.rows)  # fmt: skip
    done = ray.get(
        _train_template.options(**ray_options(cfg.task)).remote(
            ws, files, local, space.dim, task_cfg
        )
    )
    _refuse_problems(ws, space.space, [done], attempt)
    return path


def _rows_per_file(ws: Workspace, space: EmbeddedSpace) -> list[int]:
    return [pq.ParquetFile(f, filesystem=ws.fs).metadata.num_rows for f in space.files]


def _run(cfg, ws, space, pool_files, pending, ranges, out_dir: str, template) -> list[dict]:
    rows_per_file = _rows_per_file(ws, space)
    task_cfg = {
        "space": space.space,
        "factory": cfg.factory,
        "on_bad_rows": cfg.on_bad_rows,
        "gpu": cfg.gpu,
        "threads": cfg.threads,
        "out_dir": out_dir,
        "template": template,
    }
    opts = ray_options(cfg.task)
    refs = []
    for s in pending:
        slices = file_slices(rows_per_file, *ranges[s])
        files = [space.files[f] for f, _, _ in slices]
        local = [(i, lo, hi) for i, (_, lo, hi) in enumerate(slices)]
        refs.append(
            _build_shard.options(**opts).remote(ws, s, files, local, pool_files, space.dim,
                                                task_cfg)
        )  # fmt: skip
    results = []
    with tqdm(total=len(refs), unit="shard", desc=f"index {space.space}") as bar:
        while refs:
            ready, refs = ray.wait(refs, num_returns=1)
            results.append(ray.get(ready[0]))
            bar.update(1)
    return results


def _refuse_problems(ws: Workspace, name: str, results: list[dict], attempt: Attempt) -> None:
    """Bad input found by the tasks: discard this attempt (a committed index stays as it
    was), then one InputError."""
    bad = [r for r in results if r.get("bad")]
    problems = [r["problem"] for r in results if r.get("problem")]
    if not bad and not problems:
        return
    ws.discard(attempt.dir)
    if problems:
        raise InputError(f"space {name!r}: " + "; ".join(sorted(set(problems))))
    count = sum(r["bad"] for r in bad)
    examples = [e for r in sorted(bad, key=lambda r: r["shard"]) for e in r["bad_examples"]]
    raise InputError(
        f"space {name!r} holds {count} unusable vectors (NaN, inf or all zero), e.g. ids "
        f"{examples[:5]}; re-embed them (`vlselect embed --workspace {ws.uri} --spaces "
        f"{name} --overwrite`) or leave them out with `--set on_bad_rows=exclude`"
    )


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main([STAGE, *sys.argv[1:]]))
