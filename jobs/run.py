"""``vlselect run``: the stages a pipeline config names, in dependency order.

A pipeline config lists steps, each one stage and its section (the same fields as that
stage's section of any config file, layered over the workspace's ``vlselect.yaml``)::

    # vlselect run --config configs/pipeline-llava665k.yaml --workspace s3://bucket/ws
    pipeline:
      - ingest: {source: s3://bucket/llava/llava_v1_5_mix665k.json}
      - embed: {spaces: [clip, dino, text]}
      - cluster: {name: progress, spaces: [dino, text], k: 1000}

What it does:
    1. validates every step's section before any work starts (a typo in the last step
       fails in a second, not after hours of the first);
    2. orders the steps by what each reads and writes (``reads``/``writes`` of each stage
       module: engine.artifacts.Ref), keeping the listed order where nothing depends;
    3. checks that every artifact a step reads is written by an earlier step or already
       committed in the workspace, naming the stage that makes it when it is neither
       (``--dry-run`` lists the steps first, then refuses the same way);
    4. ``--dry-run``: prints each step, what it reads and writes, whether its outputs are
       committed (the stage then keeps them if its inputs and config are unchanged), have
       an unfinished attempt (resumed) or are missing (run), and its resources; no Ray;
    5. runs the steps one after another in this process, each stage deciding for itself
       to keep a current artifact, resume an unfinished attempt or start over
       (engine.commit), and prints a summary: each step's time and outputs.

Raises:
    InputError: an empty pipeline, an unknown stage, an invalid section, a cycle, or an
        input that nothing writes and the workspace does not hold (exit 2, nothing run).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine import commit
from engine.artifacts import Ref
from engine.commit import operational
from engine.config import build_config
from engine.errors import InputError
from engine.workspace import Workspace
from jobs.registry import PIPELINE_STAGES, STAGES
from jobs.runtime import Timer, print_summary

STAGE = "run"
DEFAULT_WORKSPACE = None
log = logging.getLogger("vlselect.run")


class RunConfig(BaseModel):
    """``vlselect run``: the pipeline (a config file's ``pipeline:`` list) and how to run it."""

    model_config = ConfigDict(extra="forbid")

    steps: list[dict[str, dict[str, Any]]] = Field(
        default_factory=list,
        description="The pipeline: one {stage: section} per step (a config file's top-level "
        "'pipeline:' list).",
    )
    dry_run: bool = operational(
        False, description="List the steps, their inputs, outputs, state and resources; run none."
    )
    replace: bool = operational(
        False,
        description="A step whose inputs an earlier step of this run recommitted replaces its "
        "output (--overwrite) instead of refusing it; the demo runs so.",
    )

    @field_validator("steps")
    @classmethod
    def _one_stage_per_step(cls, steps):
        for i, step in enumerate(steps, 1):
            if len(step) != 1:
                raise ValueError(f"step {i} names {len(step)} stages; give one: - stage: {{...}}")
            (stage,) = step
            if stage not in PIPELINE_STAGES:
                raise ValueError(
                    f"step {i}: unknown stage {stage!r}; a pipeline's stages are "
                    f"{', '.join(PIPELINE_STAGES)}"
                )
        return steps


CONFIG = RunConfig


def reads(cfg: RunConfig) -> list[Ref]:
    return []


def writes(cfg: RunConfig) -> list[Ref]:
    return []


def resources(cfg: RunConfig) -> dict:
    return {}


@dataclass
class Step:
    index: int  # as listed, from 1
    stage: str
    section: dict[str, Any]
    module: ModuleType
    config: BaseModel

    @property
    def label(self) -> str:
        key = next((str(self.section[k]) for k in ("name", "space") if k in self.section), "")
        if not key and "spaces" in self.section:
            key = ",".join(self.section["spaces"])
        return f"{self.stage}({key})" if key else self.stage


def build_steps(cfg: RunConfig, ws: Workspace) -> list[Step]:
    """Every step's validated config, in dependency order; inputs checked. Raises InputError."""
    if not cfg.steps:
        raise InputError(
            "the pipeline is empty: give a config file with a 'pipeline:' list of steps "
            "(see configs/pipeline-llava665k.yaml)"
        )
    steps, problems = [], []
    for i, step in enumerate(cfg.steps, 1):
        ((stage, section),) = step.items()
        module = STAGES[stage].load()
        try:
            steps.append(Step(i, stage, section or {}, module, step_config(module, ws, section)))
        except InputError as err:
            problems.append(f"step {i} ({stage}): {err}")
    if problems:
        raise InputError("the pipeline's config is invalid:\n" + "\n".join(problems))
    return order(steps)


def step_config(module: ModuleType, ws: Workspace, section: dict[str, Any] | None) -> BaseModel:
    """A step's config: the workspace's section of its stage, then the step's own."""
    base = ws.read_config() if ws.exists() else {}
    return build_config(module.STAGE, module.CONFIG, base, {module.STAGE: section or {}})


def order(steps: list[Step]) -> list[Step]:
    """Steps sorted so that each runs after every step writing what it reads (stable)."""
    writers: dict[Ref, list[Step]] = {}
    for s in steps:
        for ref in s.module.writes(s.config):
            writers.setdefault(ref, []).append(s)
    needs = {
        s.index: {w.index for ref in s.module.reads(s.config) for w in writers.get(ref, [])}
        - {s.index}
        for s in steps
    }
    done: list[Step] = []
    left = list(steps)
    while left:
        ready = next((s for s in left if needs[s.index] <= {d.index for d in done}), None)
        if ready is None:
            cycle = ", ".join(s.label for s in left)
            raise InputError(f"the pipeline's steps depend on each other in a cycle: {cycle}")
        done.append(ready)
        left.remove(ready)
    return done


def missing_inputs(steps: list[Step], ws: Workspace) -> list[str]:
    """Reads that no earlier step writes and the workspace does not hold, with the fix."""
    written: set[Ref] = set()
    missing = []
    for s in steps:
        for ref in s.module.reads(s.config):
            if ref not in written and ref.find(ws) is None:
                maker = ref.artifact().command(ws, ref.name)
                missing.append(f"{s.label} reads {ref}, which no earlier step writes and "
                               f"{ws.uri} does not hold: add a step for it (`{maker}`)")  # fmt: skip
        written.update(s.module.writes(s.config))
    return missing


def state_of(ref: Ref, ws: Workspace) -> str:
    """committed | unfinished | missing: what the workspace holds of ``ref`` now."""
    if ref.find(ws) is not None:
        return "committed"
    folder = ref.artifact().folder(ws, ref.name)
    return "unfinished" if commit.attempt_ids(ws, folder) else "missing"


def dry_run(steps: list[Step], ws: Workspace) -> list[dict]:
    rows = []
    for n, s in enumerate(steps, 1):
        outs = s.module.writes(s.config)
        states = {str(r): state_of(r, ws) for r in outs}
        what = ("kept if current" if states and all(v == "committed" for v in states.values())
                else "resumed" if "unfinished" in states.values() else "run")  # fmt: skip
        rows.append({
            "step": n, "stage": s.stage, "label": s.label,
            "reads": [str(r) for r in s.module.reads(s.config)], "writes": states, "then": what,
            "resources": {k: v.model_dump(exclude_defaults=True) for k, v in
                          s.module.resources(s.config).items()},
        })  # fmt: skip
    return rows


def execute(steps: list[Step], ws: Workspace, *, replace: bool = False) -> list[dict]:
    """Run ``steps`` in order; each stage's summary with its step and time."""
    results = []
    recommitted: set[Ref] = set()
    for n, s in enumerate(steps, 1):
        cfg = step_config(s.module, ws, s.section)  # what earlier steps recorded applies
        # as validated and as now: a source the world recorded meanwhile still reads the world
        inputs = set(s.module.reads(s.config)) | set(s.module.reads(cfg))
        if replace and inputs & recommitted and "overwrite" in type(cfg).model_fields:
            cfg = cfg.model_copy(update={"overwrite": True})
        before = {r: _attempt(r, ws) for r in s.module.writes(cfg)}
        print(f"run: step {n}/{len(steps)}: {s.label}", flush=True)
        timer = Timer()
        summary = s.module.main(cfg, ws)
        recommitted |= {r for r, a in before.items() if _attempt(r, ws) != a}
        results.append({"step": n, "stage": s.stage, "label": s.label,
                        "seconds": round(timer.seconds, 2), "summary": summary})  # fmt: skip
    return results


def _attempt(ref: Ref, ws: Workspace) -> str | None:
    found = ref.find(ws)
    return found.manifest.attempt if found is not None else None


def main(cfg: RunConfig, ws: Workspace) -> list[dict]:
    """Run (or list) the pipeline; see the module docstring."""
    timer = Timer()
    steps = build_steps(cfg, ws)
    missing = missing_inputs(steps, ws)
    if cfg.dry_run:
        rows = dry_run(steps, ws)
        for r in rows:
            outs = ", ".join(f"{k} ({v})" for k, v in r["writes"].items()) or "-"
            print(f"{r['step']:>2}. {r['label']:<22} {r['then']:<16} reads "
                  f"{', '.join(r['reads']) or '-'}; writes {outs}")  # fmt: skip
            for name, res in r["resources"].items():
                print(f"      {name}: {res or 'defaults (1 CPU)'}")
        print_summary(STAGE, [("steps", len(rows)), ("workspace", ws.uri), ("ran", "nothing")],
                      extra={"steps": rows, "missing": missing})  # fmt: skip
    if missing:
        raise InputError("the pipeline cannot start:\n" + "\n".join(missing))
    if cfg.dry_run:
        return rows
    results = execute(steps, ws, replace=cfg.replace)
    rows = [(f"{r['step']}. {r['label']}", f"{r['seconds']} s") for r in results]
    rows += [("time", f"{timer.seconds:.1f} s"), ("workspace", ws.uri)]
    print_summary(STAGE, rows, extra={"steps": [{k: r[k] for k in ("step", "label", "seconds")}
                                                for r in results]})  # fmt: skip
    return results


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main([STAGE, *sys.argv[1:]]))
