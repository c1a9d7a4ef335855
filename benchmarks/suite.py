"""The throughput suite behind ``vlselect bench``: every stage at one pool size, each figure
beside a reference measured in the same run.

One ``SizeRun`` builds a workspace of N rows with the real jobs (``vlselect world``,
``ingest``, ``embed``, ``cluster``, ``index``; ``base`` and ``progress`` where training is
measured) and times each against the plainest way to do the same work on this machine:

=============  ==========================================  ===========================================
stage          ours                                        reference (same run, same cores)
=============  ==========================================  ===========================================
world          ``vlselect world`` (Ray tasks, Parquet)     ``generate_rows`` in one process
ingest         ``vlselect ingest`` (validate, normalise)   read the Parquet + PIL decode, one process
embed:<space>  ``vlselect embed`` (Ray Data, actor pool)   read, preprocess, encode in one process
skills         ``vlselect skills --limit`` (the LLM pool)  ``model.generate`` over the same questions
cluster        ``vlselect cluster`` (dino+text)            load features, ``faiss.Kmeans`` + assign
retrieval      ``vlselect index`` + ``RetrievalService``   one in-process faiss index, same factory
coordinator    ``CoordinatorState`` rounds (Δk, draw,      a uniform draw of the round's rows from
               ledger, checkpoint)                         a mask, nothing else
train          ``vlselect progress`` (Ray Train,           ``finetune`` in one process (torch
               DeepSpeed ZeRO-2, 2 workers)                stepper), same rows, epochs, batch
e2e            the jobs above, summed                      the references, as time for N rows
=============  ==========================================  ===========================================

``ratio`` is always ours over the reference as speed: above 1 ours is faster, below 1
it pays for what the reference skips (validation, checkpoints, fault tolerance,
distribution). References that would take long at large N run on the first
``reference_rows`` rows and are reported as rates.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from benchmarks.common import PeakRSS, timed_cli
from benchmarks.progress_round import ROUND
from benchmarks.references import (
    auto_factory,
    bare_embed,
    bare_generate,
    bare_kmeans,
    bare_rounds,
    bare_train,
    clustering_figures,
)
from engine.artifacts import Clustering, EmbeddingSpace, Pool, ProgressRun
from engine.workspace import Workspace

if TYPE_CHECKING:
    from benchmarks.bench import BenchConfig


@dataclass
class Figure:
    """One measured figure and its reference. ``higher_is_better`` orients ``ratio``."""

    stage: str
    n: int
    metric: str
    unit: str
    value: float
    reference: str
    reference_value: float
    higher_is_better: bool = True
    seconds: float | None = None
    peak_driver_mib: float | None = None
    peak_total_mib: float | None = None
    note: str = ""
    ratio: float = field(init=False)

    def __post_init__(self):
        v, r = float(self.value), float(self.reference_value)
        if v <= 0 or r <= 0:
            self.ratio = float("nan")
        else:
            # 3 significant digits: a 0.003 ratio must not round to 0
            self.ratio = float(f"{(v / r if self.higher_is_better else r / v):.3g}")

    def as_dict(self) -> dict:
        return asdict(self)


def _mib(mem: PeakRSS) -> dict:
    return {
        "peak_driver_mib": round(mem.driver / 2**20, 1),
        "peak_total_mib": round(mem.total / 2**20, 1),
    }


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 2) if seconds > 0 else 0.0


class SizeRun:
    """The suite at one pool size, in the local folder ``root`` (made afresh): the
    stages and settings of ``opts`` (``vlselect bench``'s config)."""

    def __init__(self, root: Path, n: int, opts: BenchConfig):
        self.root, self.n, self.opts = root, n, opts
        self.ws = root / "ws"
        self.figures: list[Figure] = []
        self.job_seconds: dict[str, float] = {}
        self.reference_seconds: dict[str, float] = {}

    def _add(self, fig: Figure, *, e2e: str | None = None) -> None:
        """Keep ``fig``; with ``e2e``, its job and reference time count to end-to-end."""
        self.figures.append(fig)
        if e2e and fig.seconds is not None:
            self.job_seconds[e2e] = fig.seconds
            self.reference_seconds[e2e] = self.n / fig.reference_value

    def run(self) -> list[Figure]:
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        steps = {
            "world": self.world,
            "ingest": self.ingest,
            "embed": self.embed,
            "skills": self.skills,
            "cluster": self.cluster,
            "retrieval": self.retrieval,
            "coordinator": self.coordinator,
            "train": self.train,
        }
        needs = {"ingest": ["world"], "embed": ["world", "ingest"]}
        for later in ("skills", "cluster", "retrieval", "train"):
            needs[later] = ["world", "ingest", "embed"]
        wanted = set(self.opts.stages)
        for stage in self.opts.stages:
            wanted.update(needs.get(stage, []))
        for stage, step in steps.items():
            if stage in wanted:
                step()
        if self.job_seconds:
            ours, ref = sum(self.job_seconds.values()), sum(self.reference_seconds.values())
            self.figures.append(
                Figure(
                    "e2e", self.n, "pipeline time", "s", round(ours, 1),
                    "the references' time for N rows", round(ref, 1), higher_is_better=False,
                    seconds=round(ours, 1), note=" + ".join(self.job_seconds),
                )
            )  # fmt: skip
        return self.figures

    # -- stages ----------------------------------------------------------------------------

    def world(self) -> None:
        from engine.world.config import WorldConfig
        from engine.world.generate import generate_rows

        argv = ["world", "--out", str(self.ws), "--size", str(self.n), "--seed", "0"]
        seconds, mem = timed_cli([*argv, "--set", "test_size=0", "--set", "benchmarks=[]"])
        cfg = WorldConfig(**Workspace.open(str(self.ws)).read_config()["world"])
        m = min(self.n, max(200, self.opts.reference_rows // 10))  # the slowest reference
        start = time.perf_counter()
        generate_rows(cfg, "pool", 0, m)
        bare = _rate(m, time.perf_counter() - start)
        self._add(
            Figure(
                "world", self.n, "rows/s", "rows/s", _rate(self.n, seconds),
                "generate_rows, 1 process, nothing written", bare,
                seconds=round(seconds, 2), **_mib(mem),
            ),
            e2e="world",
        )  # fmt: skip

    def ingest(self) -> None:
        from benchmarks.ingest import bare_loop, source_files

        seconds, mem = timed_cli(["ingest", "--workspace", str(self.ws)])
        bare = bare_loop(source_files(self.ws), min(self.n, self.opts.reference_rows))
        self._add(
            Figure(
                "ingest", self.n, "rows/s", "rows/s", _rate(self.n, seconds),
                "read + PIL decode, 1 process", bare["rows_per_s"],
                seconds=round(seconds, 2), **_mib(mem),
            ),
            e2e="ingest",
        )  # fmt: skip

    def embed(self) -> None:
        for space in ("dino", "text"):
            seconds, mem = timed_cli(["embed", "--workspace", str(self.ws), "--spaces", space])
            m, bare_seconds = bare_embed(self.ws, space, min(self.n, self.opts.reference_rows))
            self._add(
                Figure(
                    f"embed:{space}", self.n, "rows/s", "rows/s", _rate(self.n, seconds),
                    "read, preprocess, encode in 1 process", _rate(m, bare_seconds),
                    seconds=round(seconds, 2), **_mib(mem),
                ),
                e2e=f"embed:{space}",
            )  # fmt: skip

    def skills(self) -> None:
        from benchmarks.skills_throughput import measure
        from engine.text import instruction_text

        limit = min(self.n, self.opts.skills_limit)
        args = ["--backend", "transformers", "--limit", str(limit), "--set", "max_new_tokens=24"]
        with PeakRSS() as mem:
            meta = measure(self.ws, "transformers", args)
        table = (
            Pool.open(Workspace.open(str(self.ws))).read_table(["conversations"]).slice(0, limit)
        )
        questions = sorted({instruction_text(c) for c in table.column(0).to_pylist()})
        bare_seconds = bare_generate(questions, max_new_tokens=24)
        self._add(
            Figure(
                "skills", self.n, "unique questions/s", "q/s",
                _rate(meta["unique_questions"], meta["seconds"]),
                "model.generate, batch 8, 1 process", _rate(len(questions), bare_seconds),
                seconds=meta["seconds"], **_mib(mem),
                note=f"first {limit} rows, {meta['unique_questions']} unique questions",
            )
        )  # fmt: skip

    def cluster(self) -> None:
        k = int(np.clip(self.n // 50, 10, 1000))
        argv = ["cluster", "--workspace", str(self.ws), "--name", "bench", "--k", str(k)]
        seconds, mem = timed_cli([*argv, "--spaces", "dino,text", "--seed", str(self.opts.seed)])
        ws = Workspace.open(str(self.ws))
        meta = clustering_figures(Clustering.open(ws, "bench"))
        bare = bare_kmeans(ws, k, meta, self.opts.seed, ["dino", "text"])
        self._add(
            Figure(
                "cluster", self.n, "k-means time", "s", round(seconds, 2),
                "load features + faiss.Kmeans + assign", round(bare, 3),
                higher_is_better=False, seconds=round(seconds, 2), **_mib(mem),
                note=f"K={k}, {len(meta['objective'])} iterations",
            ),
        )  # fmt: skip
        self.job_seconds["cluster"], self.reference_seconds["cluster"] = seconds, bare

    def retrieval(self) -> None:
        from actors.retrieval import RetrievalService, ServiceConfig
        from benchmarks.common import timings
        from engine.faiss_index import build_index, set_search_params
        from engine.vectors import from_arrow

        o = self.opts
        factory = o.factory if o.factory != "auto" else auto_factory(self.n, o.shards)
        table = EmbeddingSpace.open(Workspace.open(str(self.ws)), "dino").read_table(["vector"])
        x = from_arrow(table.column("vector"))
        rng = np.random.default_rng(o.seed)
        queries = x[rng.choice(len(x), size=min(o.queries, len(x)), replace=False)]
        argv = ["index", "--workspace", str(self.ws), "--space", "dino", "--shards", str(o.shards)]
        seconds, mem = timed_cli([*argv, "--factory", factory])
        cfg = ServiceConfig(batch_size=o.query_batch, max_in_flight=4, nprobe=o.nprobe)
        with (
            PeakRSS() as serve_mem,
            RetrievalService.start(Workspace.open(str(self.ws)), "dino", cfg) as svc,
        ):
            ours = timings(
                lambda b: svc.search(b, 10), queries, o.query_batch,
                lambda q: svc.search(q, 10)[0],
            )  # fmt: skip
        start = time.perf_counter()
        index = build_index(x, factory)
        built = time.perf_counter() - start
        set_search_params(index, o.nprobe, None)
        ref = timings(
            lambda b: index.search(b, 10), queries, o.query_batch,
            lambda q: np.concatenate(
                [index.search(q[i : i + o.query_batch], 10)[1]
                 for i in range(0, len(q), o.query_batch)]
            ),
        )  # fmt: skip
        note = f"{factory}, {o.shards} shards, batches of {o.query_batch}"
        common = {"reference": "one in-process faiss index", "note": note}
        mems = {
            "peak_driver_mib": round(serve_mem.driver / 2**20, 1),
            "peak_total_mib": round(max(mem.total, serve_mem.total) / 2**20, 1),
        }
        self.figures += [
            Figure("retrieval", self.n, "build time", "s", round(seconds, 2),
                   reference_value=round(built, 4), higher_is_better=False,
                   seconds=round(seconds, 2), **common, **_mib(mem)),
            Figure("retrieval", self.n, "queries/s", "q/s", ours["qps"],
                   reference_value=ref["qps"], **common, **mems),
            Figure("retrieval", self.n, "p50 latency", "ms", ours["p50_ms"],
                   reference_value=ref["p50_ms"], higher_is_better=False, **common),
            Figure("retrieval", self.n, "p99 latency", "ms", ours["p99_ms"],
                   reference_value=ref["p99_ms"], higher_is_better=False, **common),
        ]  # fmt: skip
        self.job_seconds["index"], self.reference_seconds["index"] = seconds, built

    def coordinator(self) -> None:
        from benchmarks.progress_round import run as coordinator_rounds

        k = int(np.clip(self.n // 50, 10, 5000))
        ours = coordinator_rounds(self.n, k, self.opts.seed)
        bare_ms = bare_rounds(self.n, ours["rounds"], self.opts.seed)
        self.figures.append(
            Figure(
                "coordinator", self.n, "round latency", "ms", ours["round_mean_ms"],
                "uniform draw from a mask", bare_ms, higher_is_better=False,
                note=f"K={k}, {ours['rounds']} rounds of up to {ROUND} picks, "
                f"checkpoint {ours['checkpoint_mb']} MB",
            )
        )  # fmt: skip

    def train(self) -> None:
        budget = min(self.opts.train_budget, self.n // 2)
        base = [*("--set", "train.vision_steps=20", "--set", "train.language_steps=20")]
        base += ["--set", "train.caption_steps=20"]
        timed_cli(["base", "--workspace", str(self.ws), *base])
        recipe = {"batch_size": 64, "epochs": 2}
        argv = ["progress", "--workspace", str(self.ws), "--name", "bench"]
        argv += ["--budget", str(budget), "--metric", "loss"]
        for key, value in {
            "warmup": budget // 2, "round_size": budget // 4, "selection": {"eval_per_cluster": 8},
            "micro_batch": 16, "finetune.batch_size": recipe["batch_size"],
            "finetune.epochs": recipe["epochs"],
        }.items():  # fmt: skip
            argv += ["--set", f"{key}={value}"]
        seconds, mem = timed_cli(argv)
        ws = Workspace.open(str(self.ws))
        run = ProgressRun.open(ws, "bench")
        trained = run.meta.summary["train_rounds"]
        steps = sum(r["steps"] for r in trained)
        train_s = sum(r["train_seconds"] for r in trained)
        ids = ws.read_bytes(run.path("ids.txt")).decode().split()
        bare_steps, bare_s, tokens_per_row = bare_train(self.ws, ids, recipe)
        rows_per_step = recipe["batch_size"]
        note = f"{budget} rows, {steps} steps of {rows_per_step}, ZeRO-2, 2 workers"
        common = {"reference": "finetune, 1 process, torch stepper", "note": note}
        self.figures += [
            Figure("train", self.n, "step time", "ms", round(1000 * train_s / steps, 1),
                   reference_value=round(1000 * bare_s / bare_steps, 1),
                   higher_is_better=False, seconds=round(seconds, 2), **common, **_mib(mem)),
            Figure("train", self.n, "tokens/s", "tok/s",
                   round(steps * rows_per_step * tokens_per_row / train_s, 1),
                   reference_value=round(bare_steps * rows_per_step * tokens_per_row / bare_s, 1),
                   **common),
        ]  # fmt: skip
