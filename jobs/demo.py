"""``vlselect demo``: the whole pipeline on the embedded default, one summary, one HTML report.

It is a ``vlselect run`` of ``jobs/pipeline-demo.yaml`` with the demo's settings applied
(size, seed, budgets, ``targeted``, ``progress``, and any stage's section in ``stages``):
    1. ``world``: generates the shapes world (pool and held-out benchmarks); one of
       another size or seed is replaced, and every later step then replaces its output;
    2. ``ingest``: normalises the pool into ``<ws>/pool``;
    3. ``embed``: the clip, dino and text spaces with the world's offline encoders;
    4. ``skills``: the packaged SmolLM2 names each question's skills (on CPU: about 6
       minutes at 2,000 rows; successes are cached, so a second demo asks nothing) and
       the skill space is embedded;
    5. ``cluster``: spherical k-means of dino+text into ``progress`` (K = pool / 50);
    6. ``index``: the clip (concept) and skill spaces, 2 exact shards each;
    7. ``target``: one selection per held-out benchmark (``target_mode``, default
       ``auto``: the space each benchmark's cross-ranks predict) into
       ``<ws>/selections/demo/``;
    8. ``base`` then ``progress``: the tiny LLaVA's base (``base_recipe: quick`` trains a
       third of the full recipe's steps; built once per world and recipe, reused after)
       and a PROGRESS run of ``progress_budget`` into ``<ws>/progress/demo/``;
    9. writes ``<ws>/report/index.html`` (every figure inlined: cluster sizes, word clouds
       of the largest clusters' questions, each benchmark's cross-rank scatter, Δk over
       rounds, picks per cluster, the budget curve) and ``report/summary.json``, and
       prints one table: each stage's counts, time and where its artifacts are.

A step whose inputs and config are unchanged keeps its committed output: a second demo
on the same workspace recomputes nothing but the report. ``targeted: false`` skips 4,
the skill index and 7; ``progress: false`` skips 8.

Raises:
    InputError: bad config (exit 2).
    RuntimeError: a stage lost rows or failed past its retries (exit 1).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.artifacts import World
from engine.config import deep_merge, load_yaml_file
from engine.demo_report import (
    Figure,
    Section,
    cluster_questions,
    cluster_sizes_png,
    cluster_words_png,
    render_html,
)
from engine.targeted import MODES
from engine.workspace import Workspace
from jobs import run
from jobs.runtime import Timer, print_summary, worker_log_dir

STAGE = "demo"
DEFAULT_WORKSPACE = "ws/demo"
RUN_NAME = "demo"
# A third of the base recipe's steps: the demo shows the pipeline, not the model's quality.
QUICK_BASE = {"train": {"vision_steps": 700, "language_steps": 1000, "caption_steps": 300}}
STAGES = ("world", "ingest", "embed", "skills", "cluster", "index", "target", "base", "progress")
log = logging.getLogger("vlselect.demo")


class DemoConfig(BaseModel):
    """``vlselect demo``: the embedded default's size and which selection stages run."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(2000, ge=100, le=1_000_000, description="Pool size of the generated world.")
    seed: int = Field(0, ge=0, description="World seed.")
    targeted: bool = Field(
        True, description="Run skills, the skill index and targeted selection per benchmark."
    )
    target_budget: float = Field(
        0.2, gt=0, description="Rows per benchmark: a fraction of the pool or a count."
    )
    target_mode: Literal[MODES] = Field(  # type: ignore[valid-type]
        "auto", description="Targeted selection's mode (auto: the predicted space)."
    )
    progress: bool = Field(True, description="Build the base and run PROGRESS.")
    base_recipe: Literal["quick", "full"] = Field(
        "quick",
        description="quick: the base trains on fewer steps (QUICK_BASE: minutes, enough to "
        "show the pipeline); full: `vlselect base`'s recipe, as the quality benchmark uses.",
    )
    progress_budget: float = Field(
        0.2, gt=0, description="PROGRESS's budget: a fraction of the pool or a count."
    )
    clouds: int = Field(6, ge=1, le=12, description="Clusters shown as word clouds.")
    stages: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Sections of the stages the demo runs (base, skills, progress, ...), "
        "applied over the workspace's vlselect.yaml as `vlselect <stage> --config` would; "
        "the demo's own settings (size, names, budgets) still win.",
    )

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        unknown = sorted(set(v) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stages {unknown}; the demo runs {sorted(STAGES)}")
        return v


CONFIG = DemoConfig


PIPELINE = Path(__file__).with_name("pipeline-demo.yaml")


def demo_steps(cfg: DemoConfig) -> list[dict[str, dict]]:
    """jobs/pipeline-demo.yaml's steps with the demo's settings and ``stages`` sections."""
    steps = []
    for step in load_yaml_file(PIPELINE, sections=["pipeline"])["pipeline"]:
        ((stage, section),) = step.items()
        skill_index = stage == "index" and section.get("space") == "skill"
        if not cfg.targeted and (stage in ("skills", "target") or skill_index):
            continue
        if not cfg.progress and stage in ("base", "progress"):
            continue
        if stage == "base" and cfg.base_recipe == "quick":
            section = deep_merge(QUICK_BASE, section)
        if stage == "world":
            section.update(size=cfg.size, seed=cfg.seed)
        elif stage == "cluster":
            section["k"] = min(1000, max(10, cfg.size // 50))
        elif stage == "target":
            section.update(budget=cfg.target_budget, mode=cfg.target_mode)
        elif stage == "progress":
            section["budget"] = cfg.progress_budget
        # a stage's own section, given in the demo's ``stages``, has the last word
        steps.append({stage: deep_merge(section, cfg.stages.get(stage, {}))})
    return steps


def main(cfg: DemoConfig, ws: Workspace) -> dict:
    """Run the demo's pipeline on ``ws``; see the module docstring. Returns the summary."""
    timer = Timer()
    # every section is validated before the first step starts (jobs.run)
    steps = run.build_steps(run.RunConfig(steps=demo_steps(cfg)), ws)
    _replace_a_changed_world(cfg, ws)
    # a regenerated world makes every later step replace its output (run's ``replace``)
    results = run.execute(steps, ws, replace=True)
    s: dict[str, Any] = {}
    for r in results:
        if r["stage"] == "index":
            s.setdefault("index", []).append(r["summary"])
        else:
            s[r["stage"]] = r["summary"]
    s["seconds"] = round(timer.seconds, 2)
    s["report"] = write_report(cfg, ws, s)
    _print(ws, s)
    return s


def _replace_a_changed_world(cfg: DemoConfig, ws: Workspace) -> None:
    """The demo's world is the embedded default: one of another size or seed is replaced
    (``vlselect world`` alone refuses that without --overwrite)."""
    found = World.find(ws)
    if found is not None and (found.meta.pool_size, found.meta.seed) != (cfg.size, cfg.seed):
        log.warning("the workspace's world has another size or seed: generating it again")
        ws.discard(World.folder(ws))


def _stage_rows(s: dict) -> list[list[str]]:
    w, i = s["world"], s["ingest"]
    rows = [
        ["world", f"{w['pool_size']} pool samples, {len(w['benchmarks'])} held-out sets",
         w["seconds"]],
        ["ingest", f"{i['records_in']} in = {i['accepted']} accepted + {i['rejected']} rejected",
         i["seconds"]],
    ]  # fmt: skip
    rows += [
        [f"embed {r['space']}", f"{r['vectors']} x {r['dim']} ({r['model']})", r["seconds"]]
        for r in s["embed"]["spaces"]
    ]
    if "skills" in s:
        k = s["skills"]
        rows.append(["skills", f"{k['ok']} ok, {k['failed']} failed; {k['unique_questions']} "
                     f"unique questions, {k['generated']} generated", k["seconds"]])  # fmt: skip
    c = s["cluster"]
    rows.append(["cluster progress", f"{c['k']} clusters of dino+text, sizes "
                 f"{c['size_stats']['min']}-{c['size_stats']['max']}", c["seconds"]])  # fmt: skip
    rows += [
        [f"index {r['space']}", f"{r['rows']} vectors, {r['shards']} {r['factory']} shards",
         r["seconds"]]
        for r in s["index"]
    ]  # fmt: skip
    if "target" in s:
        t = s["target"]
        rows.append(["target", f"{len(t['benchmarks'])} benchmarks x {t['budget']} rows",
                     t["seconds"]])  # fmt: skip
    if "base" in s:
        b = s["base"]
        rows.append(["base", "built" if b["built"] else "reused (same world and recipe)",
                     b["seconds"]])  # fmt: skip
    if "progress" in s:
        p = s["progress"]
        rows.append(["progress", f"{p['spent']} of {p['budget']} rows in {p['rounds']} rounds, "
                     f"{p['total_steps']} steps", p["seconds"]])  # fmt: skip
    return [[name, what, f"{sec:.1f}"] for name, what, sec in rows]


def _selection_dir(t: dict, b: dict) -> str:
    """Where ``vlselect target`` wrote one benchmark's selection (no subfolder for one)."""
    return t["path"] if len(t["benchmarks"]) == 1 else f"{t['path']}/{b['benchmark']}"


def _png_figures(ws: Workspace, folder: str, names: list[tuple[str, str]]) -> list[Figure]:
    return [
        Figure(name, caption, ws.read_bytes(f"{folder}/{name}"))
        for name, caption in names
        if ws.fs.get_file_info(f"{folder}/{name}").size
    ]


def report_sections(cfg: DemoConfig, ws: Workspace, s: dict) -> list[Section]:
    """The report's sections from the stages' summaries and their artifacts."""
    sections = [
        Section(
            "Pipeline",
            f"{s['world']['pool_size']} pool samples, end to end in {s['seconds']} s.",
            [["stage", "what", "seconds"], *_stage_rows(s)],
        )
    ]
    sizes, questions = cluster_questions(ws, "progress", cfg.clouds)
    sections.append(
        Section(
            "Skill clusters (dino + text, the clusters PROGRESS tracks)",
            f"{len(sizes)} clusters; the word clouds show the questions of the "
            f"{len(questions)} largest, as PROGRESS's paper shows what a cluster holds.",
            figures=[
                Figure(
                    "cluster_sizes.png",
                    "Rows per cluster, largest first.",
                    cluster_sizes_png(sizes, f"{len(sizes)} clusters"),
                ),
                Figure(
                    "cluster_words.png",
                    "Words of each cluster's questions.",
                    cluster_words_png(questions, sizes),
                ),
            ],
        )  # fmt: skip
    )
    if "target" in s:
        t = s["target"]
        table = [["benchmark", "samples", "rejected", "prediction", "confidence", "margin",
                  "mode", "selected"]]  # fmt: skip
        table += [
            [b["benchmark"], b["usable"], b["rejected"], b["prediction"],
             f"{b['confidence']:.2f}", f"{b['margin']:+.3f}", b["mode"], b["selected"]]
            for b in t["benchmarks"]
        ]  # fmt: skip
        figures = [
            Figure(f"crossranks_{b['benchmark']}.png",
                   f"{b['benchmark']}: cross-ranks of its samples, concept vs skill space "
                   f"(predicted: {b['prediction']}).",
                   ws.read_bytes(f"{_selection_dir(t, b)}/crossranks.png"))
            for b in t["benchmarks"]
        ]  # fmt: skip
        sections.append(
            Section(
                "Targeted selection: concepts or skills?",
                f"{t['budget']} pool rows per benchmark in mode {cfg.target_mode}; "
                f"selections under {t['path']}.",
                table,
                figures,
            )
        )
    if "progress" in s:
        p = s["progress"]
        last = p["final_metrics"]
        table = [["budget", "spent", "rounds", "rows per round", "steps", "last score"],
                 [p["budget"], p["spent"], p["rounds"], " ".join(map(str, p["round_rows"])),
                  p["total_steps"], f"{last.get('score', float('nan')):.4f}"]]  # fmt: skip
        plots = p["outputs"].get("plots", "")
        figures = _png_figures(ws, plots, [
            ("delta.png", "Δk per cluster over rounds: the clusters improving fastest."),
            ("picks.png", "Rows picked per cluster."),
            ("budget.png", "Budget spent over rounds."),
        ]) if plots else []  # fmt: skip
        sections.append(
            Section(
                "PROGRESS",
                f"A LoRA fine-tune of the tiny LLaVA that picks its own data; run under "
                f"{ws.path('progress', RUN_NAME)}.",
                table,
                figures,
            )
        )
    return sections


def write_report(cfg: DemoConfig, ws: Workspace, s: dict) -> str:
    """``<ws>/report/index.html`` and ``summary.json``; returns the HTML's path."""
    sections = report_sections(cfg, ws, s)
    artifacts = [["artifact", "where"], *_artifacts(ws, s)]
    sections.append(Section("Artifacts", table=artifacts))
    path = ws.path("report", "index.html")
    ws.makedirs("report")
    ws.write_bytes(path, render_html("vlselect demo", sections).encode())
    ws.write_json(ws.path("report", "summary.json"), {**s, "report": path})
    return path


def _artifacts(ws: Workspace, s: dict) -> list[list[str]]:
    rows = [["workspace", ws.root], ["pool", s["ingest"]["pool"]],
            ["benchmarks", ws.path("benchmarks")], ["embeddings", ws.path("embeddings")],
            ["clusters", ws.path("clusters")], ["index", ws.path("index")]]  # fmt: skip
    if "skills" in s:
        rows.append(["skills", s["skills"]["skills"]])
    if "target" in s:
        rows.append(["selections", s["target"]["path"]])
    if "base" in s:
        rows.append(["base", s["base"]["path"]])
    if "progress" in s:
        rows.append(["progress", ws.path("progress", RUN_NAME)])
    return rows


def _print(ws: Workspace, s: dict) -> None:
    rows: list[tuple[str, Any]] = [(n, f"{what} ({sec} s)") for n, what, sec in _stage_rows(s)]
    rows.append(("total time", f"{s['seconds']} s"))
    rows += [(name, where) for name, where in _artifacts(ws, s)]
    rows.append(("report", s["report"]))
    rows.append(("Ray worker logs", worker_log_dir() or "the Ray dashboard"))
    print_summary(STAGE, rows, extra={"seconds": s["seconds"], "workspace": ws.root,
                                      "report": s["report"]})  # fmt: skip


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main([STAGE, *sys.argv[1:]]))
