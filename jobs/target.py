"""``vlselect target``: a training subset aimed at one or more benchmarks, in concept or skill space.

What it does:
    1. checks in the driver, before Ray starts: the budget (a fraction or a count, within
       the pool), the pool, the ``clip`` and ``skill`` spaces embedded and indexed (each
       missing piece named with the stage to run), and every benchmark file: each record
       becomes a sample (image + question) or a reject with its reason
       (``engine.target_input``); a benchmark with no usable sample refuses the run;
    2. embeds the benchmarks' samples with the pool's own encoders: the CLIP image tower
       of the ``clip`` space, and the skills stage's backend writes each question's skill
       description (cached with the pool's), embedded like the pool's ``skill`` space
       (``jobs.target_embed``: Ray Data, encoder actor pools);
    3. starts one retrieval service per space (shard actors, ``actors.retrieval``) shared by
       every benchmark, and a seeded reference set of pool samples (queries in both
       spaces, themselves left out);
    4. per benchmark: each sample's ``depth`` neighbours in both spaces, the cross-ranks
       R_c|s and R_s|c, the prediction with its confidence (``engine.crossrank``), then
       exactly ``budget`` distinct pool ids in the mode asked (``auto``: the predicted
       space; ``engine.targeted``), deepening the lists until the budget is reached;
    5. writes ``<ws>/selections/<name>/`` (one benchmark) or ``<ws>/selections/<name>/<bench>/``
       (several, plus ``summary.json``): selected.json, ids.txt, report.json,
       crossranks.parquet, crossranks.png, rejects.json; meta.json with a fingerprint, so a
       rerun of the same inputs and config reports the result without recomputing.

Raises:
    InputError: no name, no benchmark, a budget of zero, negative or above the pool, a
        space not embedded or not indexed, a benchmark file missing, empty or with no
        usable sample, an existing selection of another config without ``--overwrite``,
        benchmark vectors of another dim than the index (exit 2).
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from actors.retrieval import RetrievalService, ServiceConfig
from engine.artifacts import EmbeddingSpace, Pool, Ref, Selection, Skills, World
from engine.commit import added_later, operational
from engine.crossrank import CrossRanks, cross_ranks, decide, drop_self, sample_spaces
from engine.embeddings import EmbeddedSpace, open_space
from engine.errors import InputError
from engine.faiss_index import IndexInfo, open_index
from engine.progress import rows_of
from engine.resources import Resources
from engine.shards import find_rows
from engine.sources import source_files
from engine.target_input import (
    Benchmark,
    benchmark_name,
    read_benchmark,
    reference_sample,
    require_usable,
)
from engine.targeted import MODES, fill_at_random, select
from engine.workspace import Workspace
from jobs import target_embed as te
from jobs.flags import path_field
from jobs.runtime import Timer, connect, print_summary
from jobs.target_write import Staged, write_outputs

STAGE = "target"
DEFAULT_WORKSPACE = None
SPACE_OF = {"concept": "clip", "skill": "skill"}
log = logging.getLogger("vlselect.target")


class TargetConfig(BaseModel):
    """Configuration of ``vlselect target`` (section ``target``)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = operational(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Selection name: output goes to <ws>/selections/<name>/.",
    )  # fmt: skip
    benchmarks: list[str] = path_field(
        default_factory=list,
        description="Benchmark files (LLaVA JSON/JSONL/Parquet): paths or URIs.",
    )
    from_world: bool = Field(
        False,
        description="Also every held-out benchmark of the workspace's world (vlselect world), "
        "its in-distribution test split excepted.",
    )
    budget: float | None = Field(
        None, description="Rows per benchmark: a fraction of the pool (0.2) or a count (133000)."
    )
    mode: Literal[MODES] = Field(  # type: ignore[valid-type]
        "auto",
        description="auto (the predicted space), concept, skill, the hybrid baselines "
        "sum, max (fused rankings) and split (half the budget from each space), or sample "
        "(each benchmark sample's own predicted space).",
    )
    images: str | None = Field(
        None, description="Root of the benchmarks' image paths (default: each file's folder)."
    )
    depth: int = Field(
        1000, ge=1, description="Neighbours per sample and space for the cross-ranks; a rank "
        "beyond it is censored at depth + 1.",
    )  # fmt: skip
    max_candidates: int = Field(
        16_000_000, ge=1,
        description="Most neighbour-list entries (samples x depth) one space's lists may "
        "hold while deepening to reach the budget: 12 bytes each in the driver, and the "
        "selection's sort about as much again, so 16M is about 0.4 GB. The deepest list is "
        "max(depth, max_candidates // samples), at most the pool.",
    )  # fmt: skip
    fill: Literal["random", "refuse"] = Field(
        "random",
        description="When the deepest lists hold fewer distinct rows than the budget (a "
        "benchmark on a rare concept): random takes the rest uniformly at random (seeded) "
        "from the pool rows not selected, and the report and summary count them; refuse "
        "stops with the count the lists reach.",
    )
    reference: int = Field(
        200, ge=0, description="Pool samples used as reference queries (0: no calibration)."
    )
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for the confidence.")
    auto_threshold: float = added_later(
        0.0,
        description="The margin (Δ_bench - Δ_ref) above which auto predicts concept: 0 is "
        "uncalibrated; benchmarks/calibrate_auto.py fits it on calibration worlds whose "
        "leaning is known.",
    )
    seed: int = Field(
        0, ge=0, description="Seed of the reference sample, the bootstrap, the random order "
        "of equal-scored neighbours in the selection, and the random fill.",
    )  # fmt: skip
    aggregation: Literal["round_robin", "score"] = Field(
        "round_robin",
        description="round_robin: benchmark samples take turns, each its next-best unselected "
        "neighbour; score: every (sample, neighbour) pair ranked by score.",
    )
    quota: int | None = Field(
        None, ge=1, description="Most pool rows one benchmark sample may contribute (None: no cap)."
    )
    split_share: float = Field(
        0.5, gt=0, lt=1, description="split mode: the concept space's share of the budget."
    )
    service: ServiceConfig = operational(
        default_factory=lambda: ServiceConfig(shard={"num_cpus": 0.25, "max_retries": -1}),
        description="The retrieval services' shard actors and batching (both spaces).",
    )
    preprocess_cpus: float = operational(0.5, gt=0, description="CPUs of a decode-and-resize task.")
    overwrite: bool = operational(False, description="Replace an existing selection of this name.")


CONFIG = TargetConfig
FLAGS = {"benchmark": "benchmarks"}
SPACES = ("clip", "skill")


def reads(cfg: TargetConfig) -> list[Ref]:
    world = [Ref("world")] if cfg.from_world else []
    return [
        Ref("pool"),
        *world,
        *(Ref(kind, s) for s in SPACES for kind in ("embeddings", "index")),
    ]


def writes(cfg: TargetConfig) -> list[Ref]:
    return [Ref("selection", cfg.name)]


def resources(cfg: TargetConfig) -> dict[str, Resources]:
    return {
        "decode task": Resources(num_cpus=cfg.preprocess_cpus),
        "shard actor": cfg.service.shard,
    }


@dataclass
class Plan:
    """What check_inputs found: sizes, spaces, indexes, benchmarks and where outputs go."""

    pool: int
    budget: int
    spaces: dict[str, EmbeddedSpace]
    indexes: dict[str, IndexInfo]
    benchmarks: list[Benchmark]
    inputs: dict[str, str]  # upstream fingerprints by role
    digests: dict[str, str]  # each benchmark file's sha256
    pool_files: list[str]
    pool_rows: list[int]  # rows per pool file, in order (pool rows are global positions)


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    for f in source_files(path):
        with f.open() as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _space(ws: Workspace, space: str) -> tuple[EmbeddedSpace, IndexInfo]:
    missing = EmbeddingSpace.find(ws, "skill") is None
    if space == "skill" and missing and Skills.find(ws) is None:
        raise InputError(
            f"the pool has no skill descriptions: run `vlselect skills --workspace {ws.uri}` "
            f"(it embeds the skill space when done), then `vlselect index --workspace "
            f"{ws.uri} --space skill`"
        )
    embedded = open_space(ws, space)
    try:
        index = open_index(ws, space)
    except InputError as err:
        raise InputError(f"{err} (`vlselect index --workspace {ws.uri} --space {space}`)") from None
    if index.pool != Pool.open(ws).fingerprint:
        raise InputError(
            f"the index of space {space!r} holds the rows of another pool (the pool was "
            f"ingested again since): rebuild it with `vlselect index --workspace {ws.uri} "
            f"--space {space}`"
        )
    if index.built_from != embedded.fingerprint:
        raise InputError(
            f"the index of space {space!r} was built from older embeddings: rebuild it with "
            f"`vlselect index --workspace {ws.uri} --space {space}`"
        )
    return embedded, index


def check_inputs(cfg: TargetConfig, ws: Workspace) -> Plan:
    """Everything the run needs, checked before Ray starts. Raises InputError with the fix."""
    if not cfg.name:
        raise InputError("no selection name: pass --name NAME (output: <ws>/selections/NAME/)")
    files = list(cfg.benchmarks)
    if cfg.from_world:
        held_out = World.open(ws)
        files += [held_out.uri("benchmarks", f"{b}.parquet") for b in held_out.meta.benchmarks
                  if b != "test"]  # fmt: skip
    if not files:
        raise InputError("no benchmark: pass --benchmark FILE (LLaVA JSON, JSONL or Parquet)")
    if cfg.budget is None:
        raise InputError("no budget: pass --budget as a fraction of the pool (0.2) or a count")
    found_pool = Pool.open(ws)
    pool = found_pool.rows
    if cfg.budget <= 0:
        raise InputError(f"budget {cfg.budget:g} is not positive: pass a fraction (0.2) or a count")
    budget = rows_of(cfg.budget, pool, "budget")
    found = {s: _space(ws, s) for s in ("clip", "skill")}
    indexed = min(found["clip"][1].rows, found["skill"][1].rows)
    if budget > indexed:
        raise InputError(
            f"budget {budget} is more than the pool's {pool} rows"
            + (f" ({indexed} indexed in both spaces)" if indexed < pool else "")
            + ": lower --budget"
        )
    names = [benchmark_name(b) for b in files]
    benches = [read_benchmark(b, image_root=cfg.images) for b in files]
    dup = {b.name for b in benches if [x.name for x in benches].count(b.name) > 1}
    if dup:
        raise InputError(f"benchmark files share the name(s) {sorted(dup)}: rename one ({names})")
    for b in benches:
        require_usable(b)
    inputs = {"pool": found_pool.fingerprint}
    for space, (e, i) in found.items():
        inputs.update({f"{space} space": e.fingerprint, f"{space} index": i.fingerprint})
    return Plan(pool, budget, {s: e for s, (e, _) in found.items()},
                {s: i for s, (_, i) in found.items()}, benches, inputs,
                {b.name: _file_digest(b.path) for b in benches}, found_pool.shards,
                [pq.ParquetFile(f, filesystem=ws.fs).metadata.num_rows
                 for f in found_pool.shards])  # fmt: skip


def _lists(services, queries: dict[str, np.ndarray], k: int, spaces=("concept", "skill")):
    return {space: services[space].search(queries[space], k) for space in spaces}


MODE_SPACES = {"concept": ("concept",), "skill": ("skill",), "sum": ("concept", "skill"),
               "max": ("concept", "skill"), "split": ("concept", "skill"),
               "sample": ("concept", "skill")}  # fmt: skip


def run_benchmark(cfg, ws, plan, services, bench: Benchmark, vecs, reference, staged) -> dict:
    """Cross-ranks, decision, selection and outputs of one benchmark; its report.

    The lists are deepened (doubling, only in the spaces the mode reads) until they hold
    the budget or reach ``max(depth, max_candidates // samples)``; what they cannot
    reach is filled by ``cfg.fill`` or refused.
    """
    timer = Timer()
    rows = min(plan.indexes["clip"].rows, plan.indexes["skill"].rows)
    depth = min(cfg.depth, rows)
    lists = _lists(services, vecs, depth)
    top = {space: ids[:, 0].copy() for space, (ids, _) in lists.items()}
    ranks = cross_ranks(*lists["concept"], *lists["skill"])
    decision = decide(ranks, reference, n_boot=cfg.bootstrap, seed=cfg.seed,
                      threshold=cfg.auto_threshold)  # fmt: skip
    mode = decision.prediction if cfg.mode == "auto" else cfg.mode
    by_sample = None
    if mode == "sample":
        by_sample = sample_spaces(ranks, decision.delta_ref, decision.prediction)
    deepest = min(rows, max(depth, cfg.max_candidates // len(bench)))
    k = min(deepest, max(depth, math.ceil(2 * plan.budget / len(bench))))
    while True:
        if k > depth:
            lists = None  # the shallower lists go before the deeper ones arrive
            lists = _lists(services, vecs, k, MODE_SPACES[mode])
        chosen = select(mode, plan.budget, lists, aggregation=cfg.aggregation, quota=cfg.quota,
                        split_share=cfg.split_share, seed=cfg.seed,
                        sample_concept=by_sample)  # fmt: skip
        if len(chosen) == plan.budget or k == deepest:
            break
        k = min(deepest, 2 * k)
    del lists
    reached = len(chosen)
    if reached < plan.budget:
        short = (f"{bench.name}: its neighbour lists at depth {k} ({len(bench)} samples) hold "
                 f"{reached} distinct pool rows, fewer than the budget {plan.budget}")  # fmt: skip
        if cfg.fill == "refuse":
            raise InputError(
                f"{short}: lower --budget to at most {reached}, raise max_candidates (deeper "
                f"lists), or set fill: random to take the rest at random"
            )
        fill_at_random(chosen, plan.pool, plan.budget, cfg.seed)
        log.warning("%s; %d rows filled at random (fill: random)", short, plan.budget - reached)
    staged.put(bench.name, ranks, decision, top, vecs, chosen, reference)
    per = chosen.per_sample(len(bench))
    return {
        "benchmark": bench.name, "file": bench.path, "records": bench.records,
        "usable": len(bench), "rejected": len(bench.rejects),
        "rejected_by_reason": bench.reject_counts(), "mode_requested": cfg.mode, "mode": mode,
        **decision.as_dict(), "ranks": ranks.aggregate(),
        "reference_ranks": reference.aggregate() if reference is not None else None,
        "depth": depth, "selection_depth": k, "budget": plan.budget, "selected": len(chosen),
        "from_lists": reached, "filled_at_random": len(chosen) - reached,
        "aggregation": cfg.aggregation, "quota": cfg.quota, "quota_lifted": chosen.quota_lifted,
        "samples_on_concept": None if by_sample is None else float(by_sample.mean()),
        "picks_per_sample": {"min": int(per.min()), "median": float(np.median(per)),
                             "max": int(per.max())},
        "picks_by_space": chosen.space_counts(),
        "seconds": round(timer.seconds, 2),
    }  # fmt: skip


def main(cfg: TargetConfig, ws: Workspace) -> dict:
    """Select for every benchmark; see the module docstring. Returns the summary."""
    timer = Timer()
    plan = check_inputs(cfg, ws)
    how = {"inputs": plan.inputs, "config": cfg, "benchmarks": plan.digests}
    refuse = (f"selection {cfg.name!r} exists ({Selection.folder(ws, cfg.name)}) from other "
              "inputs or config: pass --overwrite to replace it, or choose another --name")  # fmt: skip
    begun = Selection.begin(ws, cfg.name, overwrite=cfg.overwrite, refuse_change=refuse, **how)
    if begun.action == "current":
        done = Selection.committed(ws, cfg.name, begun.manifest)
        _print(done.meta.summary, done.dir, reused=True)
        return done.meta.summary
    if begun.action == "resume":  # picks are not resumed: a new attempt
        begun = Selection.begin(ws, cfg.name, overwrite=True, **how)
    connect()
    vectors, embed_stats = te.embed_benchmarks(
        ws, plan.benchmarks, plan.indexes, cfg.preprocess_cpus
    )
    reference = None
    svc = {"concept": None, "skill": None}
    attempt = begun.attempt
    staged = Staged(ws, attempt.dir, single=len(plan.benchmarks) == 1)
    try:
        svc["concept"] = RetrievalService.start(ws, "clip", cfg.service)
        svc["skill"] = RetrievalService.start(ws, "skill", cfg.service)
        if cfg.reference:
            reference = _reference(cfg, ws, plan, svc)
        reports = [run_benchmark(cfg, ws, plan, svc, b, vectors[b.name], reference, staged)
                   for b in plan.benchmarks]  # fmt: skip
        for s in svc.values():
            s.stop()
        svc = {}
        summary = write_outputs(cfg, ws, plan, staged, reports, embed_stats, timer, attempt)
    finally:
        for s in svc.values():
            if s is not None:
                s.stop()
    _print(summary, summary["path"], reused=False)
    return summary


def _reference(cfg, ws, plan, svc) -> CrossRanks | None:
    ids, qc, qs = reference_sample(ws, list(plan.spaces["clip"].files),
                                   list(plan.spaces["skill"].files), cfg.reference, cfg.seed)  # fmt: skip
    if not ids:
        return None
    depth = min(cfg.depth, plan.indexes["clip"].rows - 1, plan.indexes["skill"].rows - 1)
    own = find_rows(ws.fs, plan.pool_files, ids)
    c = drop_self(*svc["concept"].search(qc, depth + 1), own, depth)
    s = drop_self(*svc["skill"].search(qs, depth + 1), own, depth)
    return cross_ranks(*c, *s)


def _print(summary: dict, out: str, reused: bool) -> None:
    rows: list[tuple[str, Any]] = [
        ("pool / budget", f"{summary['pool']} rows / {summary['budget']} per benchmark")
    ]
    rows.append(("benchmark", "samples  rejected  prediction (confidence, margin)  mode  selected"))
    for b in summary["benchmarks"]:
        rows.append((b["benchmark"], f"{b['usable']:>7}  {b['rejected']:>8}  {b['prediction']:>7} "
                     f"({b['confidence']:.2f}, {b['margin']:+.3f})  {b['mode']:>7}  {b['selected']}"))  # fmt: skip
    rows.append(("time", "current, nothing recomputed" if reused else f"{summary['seconds']} s"))
    rows.append(("selections", out))
    print_summary(STAGE, rows, extra=summary)


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main([STAGE, *sys.argv[1:]]))
