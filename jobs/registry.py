"""The stages, in one place: name, module, one-line summary and where the workspace flag goes.

Importing this module imports no stage (and so neither Ray nor torch): ``vlselect --help``
and the config layers read the names from here, and a stage's module is imported only when
that stage is run or asked for its help. Each stage module provides:

- ``CONFIG``: its pydantic config model (section ``<name>`` of a config file);
- ``main(cfg, ws)``: runs it; returns its summary;
- ``reads(cfg)`` / ``writes(cfg)``: the artifacts it needs and makes, as
  ``engine.artifacts.Ref``s (the runner orders a pipeline by them);
- ``resources(cfg)``: what each of its Ray tasks or actors asks for (``--dry-run`` shows it);
- optionally ``FLAGS``: extra command-line spellings of config fields (``jobs.flags``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    summary: str
    workspace_flags: tuple[str, ...] = ("--workspace",)
    needs_workspace: bool = True

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("world", "jobs.world", "generate the shapes world (the embedded default pool) "
              "into a workspace", ("--workspace", "--out")),
        Stage("ingest", "jobs.ingest", "LLaVA JSON / JSONL / Parquet (path or URI) -> <ws>/pool, "
              "bad records -> its rejects/"),
        Stage("embed", "jobs.embed", "pool -> <ws>/embeddings/<space> (clip, dino, text; skill "
              "from <ws>/skills)"),
        Stage("skills", "jobs.skills", "an LLM names the visual skills each question needs -> "
              "<ws>/skills (cached, resumable)"),
        Stage("cluster", "jobs.cluster", "spherical k-means over embedding spaces -> "
              "<ws>/clusters/<name>"),
        Stage("index", "jobs.index", "a space's vectors -> sharded FAISS indexes in "
              "<ws>/index/<space> (resumable)"),
        Stage("search", "jobs.search", "nearest pool ids of a .npy file of query vectors, "
              "through the shard actors"),
        Stage("target", "jobs.target", "select for benchmarks: predict concept or skill from "
              "cross-ranks, then retrieve"),
        Stage("base", "jobs.base", "build (or reuse) the tiny LLaVA's base, committed in "
              "<ws>/models/<name>"),
        Stage("progress", "jobs.progress", "PROGRESS: a LoRA fine-tune (Ray Train, DeepSpeed) "
              "that selects its own data online"),
        Stage("run", "jobs.run", "run a pipeline config's stages in dependency order, "
              "skipping finished ones (--dry-run lists them)", needs_workspace=False),
        Stage("demo", "jobs.demo", "the whole pipeline on the embedded default (a run of "
              "configs/pipeline-demo.yaml)", needs_workspace=False),
        Stage("bench", "benchmarks.bench", "the throughput suite: every stage at pool sizes "
              "from --sizes, beside its reference", needs_workspace=False),
    )
}  # fmt: skip

# Stages a pipeline config may list (run, demo and bench compose others).
PIPELINE_STAGES = tuple(n for n in STAGES if n not in ("run", "demo", "bench"))


def stage(name: str) -> Stage:
    return STAGES[name]
