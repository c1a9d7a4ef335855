"""``vlselect bench``: the throughput suite, every stage at each pool size, beside its reference.

What it does, for each size N in ``sizes`` (smallest first), in ``<ws>/n<N>/``:
    1. builds a shapes world of N rows and runs the real jobs on it: ``world``, ``ingest``,
       ``embed`` (dino, text), ``cluster`` (dino+text, K = N/50), ``index`` (dino, 2
       shards; exact below 50k rows a shard, IVF above) and a query stream through the
       retrieval service;
    2. times the coordinator's rounds at N (Δk, the draw, the ledger, the checkpoint);
    3. at the smallest size only (``once``: their cost does not grow with the pool),
       ``skills`` on the first ``skills_limit`` rows and ``train``: a tiny base, then a
       ``vlselect progress`` run of ``train_budget`` rows (Ray Train, DeepSpeed ZeRO-2);
    4. beside each, a reference measured in the same run: the same work done the
       plainest way in one process (benchmarks/suite.py lists them); the ratio says how
       much the distributed job gains or pays;
then writes ``<ws>/report/bench.json``, ``bench.md`` (every figure with its reference
and ratio, the growth with N as log-log exponents, where the artifacts are) and
``bench_scaling.png`` (seconds for N rows against N, log-log), and prints the table.

On a cluster: ``ray job submit --working-dir . -- vlselect bench --workspace
/mnt/shared/bench --sizes 100000,1000000``; the workspace must be a path every node
sees (a shared mount), as the references read it from the driver's disk.

Raises:
    InputError: a workspace that is not a local or mounted path, unknown stages, or
        sizes below 1,000 rows (exit 2).
    RuntimeError: a stage's job failed (exit 1).
"""

from __future__ import annotations

import datetime
import logging
import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.errors import InputError
from engine.workspace import Workspace
from jobs.runtime import Timer, connect, print_summary

STAGE = "bench"
DEFAULT_WORKSPACE = "ws/bench"
log = logging.getLogger("vlselect.bench")
Stage = Literal[
    "world", "ingest", "embed", "skills", "cluster", "retrieval", "coordinator", "train"
]
ALL_STAGES = list(Stage.__args__)  # type: ignore[attr-defined]


class BenchConfig(BaseModel):
    """Configuration of ``vlselect bench`` (section ``bench``)."""

    model_config = ConfigDict(extra="forbid")

    sizes: list[int] = Field(
        default_factory=lambda: [10_000],
        description="Pool sizes to measure, each in its own workspace <ws>/n<N>.",
    )
    stages: list[Stage] = Field(
        default_factory=lambda: list(ALL_STAGES),
        description="Stages to measure; the jobs they need (world, ingest, embed) run "
        "and are measured too.",
    )
    once: list[Stage] = Field(
        default_factory=lambda: ["skills", "train"],
        description="Stages measured at the smallest size only: their cost does not grow "
        "with the pool (skills runs on skills_limit rows, train on train_budget rows).",
    )
    reference_rows: int = Field(
        20_000, ge=100, description="Rows the one-process references run on, at most."
    )
    queries: int = Field(2_000, ge=10, description="Queries streamed to the retrieval service.")
    query_batch: int = Field(32, ge=1, description="Queries per request.")
    shards: int = Field(2, ge=1, description="Index shards (shard actors) of the dino index.")
    factory: str = Field(
        "auto", description="FAISS factory of the index; auto: Flat below 50k rows a shard, "
        "else IVF<suggest_nlist(rows a shard)>,Flat (1,024 lists at 50k)."
    )  # fmt: skip
    nprobe: int = Field(16, ge=1, description="IVF lists searched per query.")
    skills_limit: int = Field(
        24, ge=1, description="Pool rows the skills LLM describes (SmolLM2 on CPU: seconds each)."
    )
    train_budget: int = Field(
        512, ge=64, description="Rows the timed PROGRESS run reveals and trains on."
    )
    keep: bool = Field(
        False, description="Keep each size's workspace (else removed once measured)."
    )
    seed: int = Field(0, ge=0, description="Seed of the sampling in every stage.")

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if not v or min(v) < 1000:
            raise ValueError(f"sizes must be at least 1,000 rows each, got {v}")
        return sorted(set(v))


CONFIG = BenchConfig


def reads(cfg: BenchConfig) -> list:
    return []  # it makes its own worlds, one workspace per size


def writes(cfg: BenchConfig) -> list:
    return []


def resources(cfg: BenchConfig) -> dict:
    return {}


def main(cfg: BenchConfig, ws: Workspace) -> dict:
    """Measure every stage at every size; see the module docstring. Returns the report's
    document."""
    from benchmarks.common import machine
    from benchmarks.suite import SizeRun
    from benchmarks.suite_report import write_report

    if "://" in ws.uri:
        raise InputError(
            f"vlselect bench needs a local or mounted workspace path (its references read "
            f"the pool from the driver's disk), got {ws.uri!r}: pass --workspace /a/path"
        )
    timer = Timer()
    connect()
    root = Path(ws.root)
    figures = []
    for i, n in enumerate(cfg.sizes):
        stages = [s for s in cfg.stages if i == 0 or s not in cfg.once]
        log.info("bench: N=%d, stages %s", n, ",".join(stages))
        run = SizeRun(root / f"n{n}", n, cfg.model_copy(update={"stages": stages}))
        figures += [f.as_dict() for f in run.run()]
        if not cfg.keep:
            shutil.rmtree(run.root, ignore_errors=True)
    out = root / "report"
    doc = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "sizes": cfg.sizes,
        "config": cfg.model_dump(mode="json"),
        "seconds": round(timer.seconds, 1),
        "figures": figures,
        "artifacts": {
            "report": str(out / "bench.md"),
            "json": str(out / "bench.json"),
            "plot": str(out / "bench_scaling.png"),
            "workspaces": ", ".join(str(root / f"n{n}") for n in cfg.sizes)
            if cfg.keep
            else "removed after measuring (keep: true keeps them)",
        },
    }
    print("\n" + write_report(out, doc))
    print_summary(
        "bench",
        [
            ("sizes", ", ".join(f"{n:,}" for n in cfg.sizes)),
            ("figures", f"{len(figures)} (each with its reference)"),
            ("time", f"{timer.seconds:.0f} s"),
            ("report", str(out / "bench.md")),
        ],
        {"figures": len(figures), "seconds": round(timer.seconds, 1)},
    )
    return doc


if __name__ == "__main__":
    import sys

    from jobs.cli import main as cli_main

    sys.exit(cli_main([STAGE, *sys.argv[1:]]))
