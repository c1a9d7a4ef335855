"""Selection quality on shapes worlds: the papers' main table, at a scale 2 cores train.

    python benchmarks/quality.py [--worlds evaluation|calibration|SEED,SEED]
        [--root ws/quality] [--pool 2000] [--seeds 0,1,2] [--budgets 0.2]
        [--methods random,coincide,el2n,clip-score,progress-loss] [--progress-budgets 0.2]
        [--target-modes concept,skill] [--target-budget 0.2] [--auto-threshold X]

Worlds are split in two, and the split is the protocol: rules, thresholds and recipes
are chosen on the *calibration* worlds (``CALIBRATION_WORLDS``; seed 0 is the world
the recipe and the base were developed on), and the *evaluation* worlds
(``EVALUATION_WORLDS``) are only run and reported, never used to choose anything. The
table is mean ± std over every (world, training seed) run; Rel is each run's accuracy
over its own world's full-data mean.

The default (the evaluation worlds; full data, random, COINCIDE, EL2N, CLIP-Score and
PROGRESS-loss at 20%; targeted ``concept`` and ``skill``, whence ``auto``; 3 seeds;
pool 2,000) is the issue's 90-minute run from an empty root. The larger setting adds
``--budgets 0.1,0.2,0.3 --methods random,coincide,perplexity,el2n,progress-loss,progress-accuracy
--target-modes concept,skill,sum,max,split,sample`` (docs/results.md gives its time).

1. Prepares one workspace per world (``<root>/world-<seed>``) with the real stages, each
   skipped when already done: ``vlselect world``, ``ingest``, ``embed --spaces
   dino,text`` (and clip), the warm-up clustering ``vlselect progress`` makes, and for
   targeting ``vlselect skills`` and both indexes. ``vlselect base`` runs once, in the
   first world's workspace (about 30 minutes on 2 cores): the base learns from scenes of
   its own seed, not from any world's pool, so every world fine-tunes the same base, as
   every user's pool fine-tunes the same LLaVA-1.5 checkpoint.
2. Selects, per world, seed and budget: ``random``; ``coincide`` (COINCIDE's selector,
   the warm-up of ``vlselect progress``, run to the whole budget); the static scores of
   a warm-up model (trained with the recipe on the seed's 9% COINCIDE warm-up):
   ``perplexity`` (the middle of the per-token answer loss ranking) and ``el2n`` (the
   highest EL2N, Paul et al. 2021); ``clip-score`` where the workspace's CLIP has a
   trained text tower (the world's random-initialised tiny CLIP has none: the reason is
   printed and recorded); ``full``, the whole pool, once per seed; with ``--methods
   progress-loss`` / ``progress-accuracy`` / ``progress-loss-uncertainty`` (rows inside a
   cluster by the model's uncertainty, ``selection.within``), a ``vlselect progress``
   job's selection; with
   ``--target-modes``, a ``vlselect target`` job per mode over the held-out benchmarks
   (``auto``: each benchmark's predicted space; with ``--auto-threshold``, also
   ``auto-calibrated``, the margin threshold ``benchmarks/calibrate_auto.py`` fitted on
   the calibration worlds), scored on its own benchmark.
3. Trains each selection from the base with ONE recipe (``FinetuneConfig``'s defaults:
   LoRA r=32 on the LM, projector trained fully, batch 64, ``--epochs`` passes over the
   selected rows, one cosine schedule): the papers' rule, the same epochs for every
   selection, so a 20% selection trains 20% of full data's steps. The text-only prior
   is full data with black images, first seed, first world. A world's selections are
   made first; then its trainings run side by side, one Ray actor per CPU
   (``benchmarks/quality_runs.py``: on 2 cores two one-thread runs at once get through
   1.34x the runs of one two-thread run; ``--workers`` caps them).
4. Scores every run on the in-distribution ``test`` split and every held-out benchmark
   (normalized-match accuracy of greedy answers, per family too).

Each run's result is kept in ``<world ws>/quality/runs/`` and reused while its recipe,
pool and base match: a stopped benchmark resumes where it was. Writes
``benchmarks/results/quality.json`` (``quality_calibration.json`` for the calibration
worlds), its ``.md`` (the tables) and ``_budget.png`` (accuracy against budget).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.quality_report import summarize, targeted_summary, write_report  # noqa: E402
from benchmarks.quality_runs import Bench, RunSpec, coincide_ids, train_all  # noqa: E402
from engine.artifacts import EmbeddingSpace, Pool, ProgressRun, Selection, World  # noqa: E402
from engine.llava import FinetuneConfig, load_base  # noqa: E402
from engine.quality import random_selection, score_selection  # noqa: E402
from engine.workspace import Workspace  # noqa: E402
from engine.world.config import WorldConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# The protocol's split (docs/benchmarks.md): choose on these ...
CALIBRATION_WORLDS = (0, 1)
# ... and only report these. Never tune a rule, threshold or recipe on them.
EVALUATION_WORLDS = (101, 102)
UNTARGETED = ("random", "coincide", "perplexity", "el2n", "clip-score")
# a vlselect progress job each; "-uncertainty": selection.within uncertainty (rows inside
# a cluster by the model's uncertainty among MMD prototypes) instead of uniform
PROGRESS = ("progress-loss", "progress-accuracy", "progress-loss-uncertainty")
DEFAULT_METHODS = ("random", "coincide", "el2n", "clip-score", "progress-loss")
TARGET_MODES = ("concept", "skill", "sum", "max", "split", "sample")
# the warm-up model's per-row scores, and which end of their ranking a method keeps
STATIC_SCORES = {"perplexity": ("loss", "middle"), "el2n": ("el2n", "high")}


def world_seeds(spec: str) -> tuple[list[int], str]:
    """``evaluation``, ``calibration`` or a comma list of seeds; (seeds, role)."""
    if spec in ("evaluation", "calibration"):
        return list(EVALUATION_WORLDS if spec == "evaluation" else CALIBRATION_WORLDS), spec
    seeds = [int(x) for x in spec.split(",") if x]
    if set(seeds) <= set(EVALUATION_WORLDS):
        return seeds, "evaluation"
    if set(seeds) & set(EVALUATION_WORLDS):
        raise SystemExit(
            f"worlds {seeds} mix evaluation worlds {EVALUATION_WORLDS} with others: the "
            "evaluation worlds are reported together, never beside what was tuned on"
        )
    return seeds, "calibration" if set(seeds) <= set(CALIBRATION_WORLDS) else "other"


def prepare(
    ws: Workspace, pool: int, world_seed: int, targeted: bool, base: list[str] | None
) -> WorldConfig:
    """Run the stages the selections need (each skips what is done); the world's config.
    ``base``: train the base here (the first world), with these ``--set`` overrides; the
    other worlds (None) use that one."""
    from jobs.cli import main as cli

    steps = []
    if World.find(ws) is None:
        steps.append(["world", "--out", ws.root, "--size", str(pool), "--seed", str(world_seed)])
    if Pool.find(ws) is None:
        steps.append(["ingest", "--workspace", ws.root])
    spaces = "clip,dino,text" if targeted else "dino,text"
    steps.append(["embed", "--workspace", ws.root, "--spaces", spaces])
    if base is not None:
        steps.append(["base", "--workspace", ws.root, *(a for kv in base for a in ("--set", kv))])
    if targeted:  # the skill space (SmolLM2 describes every question: minutes) and indexes
        if EmbeddingSpace.find(ws, "skill") is None:
            steps.append(["skills", "--workspace", ws.root])
        steps += [["index", "--workspace", ws.root, "--space", s] for s in ("clip", "skill")]
    for argv in steps:
        if cli(argv) != 0:
            raise SystemExit(f"`vlselect {' '.join(argv)}` failed")
    world = WorldConfig(**ws.read_config()["world"])
    if world.size != pool or world.seed != world_seed:
        raise SystemExit(
            f"{ws.root} holds a world of {world.size} rows, seed {world.seed}: pass another --root"
        )
    from jobs.progress import ProgressConfig, ensure_clustering
    from jobs.runtime import connect

    connect()
    ensure_clustering(ProgressConfig(name="quality"), ws, "warmup", (10, 10, 5000))
    return world


def select(bench: Bench, method: str, budget: float, seed: int) -> np.ndarray | str:
    """Pool positions of an untargeted baseline's selection, int64 (round(budget * n),),
    or why the method does not apply to this world."""
    n = len(bench.ids)
    count = int(round(budget * n))
    if method == "random":
        return random_selection(n, count, seed)
    if method == "coincide":
        return bench.positions(coincide_ids(bench.ws, count, seed))
    if method in STATIC_SCORES:
        kind, keep = STATIC_SCORES[method]
        return score_selection(bench.warmup_scores(seed, kind), count, keep)
    if method == "clip-score":  # Hessel et al.: image-text agreement, highest kept
        scores = bench.clip_score_scores()
        return scores if isinstance(scores, str) else score_selection(scores, count, "high")
    raise ValueError(f"unknown method {method!r}; known: {UNTARGETED}")


def progress_ids(bench: Bench, method: str, budget: float, seed: int) -> list[str]:
    """The rows a ``vlselect progress`` run of ``method`` (progress-METRIC[-uncertainty])
    chose (the job runs once per base: its name carries the base's fingerprint, as its
    selection depends on it)."""
    from jobs.cli import main as cli

    ws = bench.ws
    variant = method.removeprefix("progress-")
    metric, _, within = variant.partition("-")
    name = f"quality-{variant}-{round(budget * 100)}-s{seed}-{bench.made_of['base'][:8]}"
    argv = ["progress", "--workspace", ws.root, "--name", name, "--budget", str(budget),
            "--metric", metric, "--set", f"seed={seed}", *bench.model_setting]  # fmt: skip
    if within:
        argv += ["--set", f"selection.within={within}"]
    if cli(argv) != 0:
        raise SystemExit(f"`vlselect {' '.join(argv)}` failed")
    return ws.read_bytes(ProgressRun.open(ws, name).path("ids.txt")).decode().split()


def targeted_ids(ws: Workspace, world: WorldConfig, mode: str, budget: float):
    """Per held-out benchmark, the rows ``vlselect target --mode MODE`` chose, and each
    benchmark's margin Δ_bench - Δ_ref (one job per mode, all benchmarks at once)."""
    from jobs.cli import main as cli

    name = f"quality-{mode}-{round(budget * 100)}"
    argv = ["target", "--workspace", ws.root, "--budget", str(budget), "--name", name,
            "--mode", mode]  # fmt: skip
    for b in world.benchmarks:
        argv += ["--benchmark", World.open(ws).benchmark(b.name)]
    if cli(argv) != 0:
        raise SystemExit(f"`vlselect {' '.join(argv)}` failed")
    ids, margins = {}, {}
    for b in world.benchmarks:
        folder = Selection.open(ws, name).benchmark_dir(b.name)
        ids[b.name] = ws.read_bytes(f"{folder}/ids.txt").decode().split()
        margins[b.name] = ws.read_json(f"{folder}/report.json")["margin"]
    return ids, margins


def run_world(bench: Bench, args, plan: dict, prior: bool) -> dict:
    """Every run of one world: {"results": label -> runs, "predictions", "margins",
    "skipped", "prior"}. The selections are made first (their jobs hold the cores), then
    every training runs, side by side (``train_all``). ``prior``: also train the
    text-only prior (full data, black images, the first seed)."""
    world = bench.world
    everything = np.arange(len(bench.ids))
    runs: list[tuple[str, RunSpec]] = []  # (the table's label, the training)
    skipped: dict[str, str] = {}
    jobs = [("full", 1.0, s) for s in plan["seeds"]]
    jobs += [
        (m, b, s)
        for s in plan["seeds"]
        for m in plan["methods"]
        for b in (plan["progress_budgets"] if m in PROGRESS else plan["budgets"])
    ]
    for method, budget, seed in tqdm(jobs, desc=f"world {world.seed}: untargeted selections"):
        if method == "full":
            positions = everything
        elif method in PROGRESS:
            positions = bench.positions(progress_ids(bench, method, budget, seed))
        else:
            positions = select(bench, method, budget, seed)
        if isinstance(positions, str):
            skipped[method] = positions
            continue
        label = "full" if method == "full" else f"{method}@{budget:g}"
        runs.append((label, RunSpec(f"{method}-{round(budget * 100)}-s{seed}", positions, seed)))
    margins = {}
    for mode in tqdm(plan["modes"], desc=f"world {world.seed}: targeted selections"):
        chosen, margins = targeted_ids(bench.ws, world, mode, args.target_budget)
        for b, seed in [(b.name, s) for b in world.benchmarks for s in plan["seeds"]]:
            key = f"target-{mode}-{b}-{round(args.target_budget * 100)}-s{seed}"
            spec = RunSpec(key, bench.positions(chosen[b]), seed, evals=(b,))
            runs.append((f"target:{mode}:{b}", spec))
    seed = plan["seeds"][0]
    prior_spec = RunSpec(f"prior-100-s{seed}", everything, seed, blank=True)
    specs = [spec for _, spec in runs] + ([prior_spec] if prior else [])
    done = train_all(bench, specs, args.workers, f"world {world.seed}: trainings")
    results: dict[str, list[dict]] = {}
    for label, spec in runs:
        results.setdefault(label, []).append(done[spec.key])
    autos = {"auto": 0.0}
    if args.auto_threshold is not None:
        autos["auto-calibrated"] = args.auto_threshold
    predictions = {rule: {b: "concept" if m > threshold else "skill" for b, m in margins.items()}
                   for rule, threshold in autos.items()} if margins else {}  # fmt: skip
    for rule, predicted in predictions.items():  # each benchmark's predicted space's runs
        for b, space in predicted.items():
            results[f"target:{rule}:{b}"] = results[f"target:{space}:{b}"]
    return {"results": results, "predictions": predictions, "margins": margins,
            "skipped": skipped, "prior": done[prior_spec.key] if prior else None}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", default="evaluation",
                   help=f"evaluation {EVALUATION_WORLDS}, calibration {CALIBRATION_WORLDS}, "
                   "or world seeds (comma-separated)")  # fmt: skip
    p.add_argument("--root", default=str(ROOT / "ws" / "quality"),
                   help="folder of the worlds' workspaces (world-<seed>)")  # fmt: skip
    p.add_argument("--pool", type=int, default=2000)
    p.add_argument("--seeds", default="0,1,2", help="training seeds, in every world")
    p.add_argument("--budgets", default="0.2", help="budgets of the untargeted methods")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"of {UNTARGETED + PROGRESS}")  # fmt: skip
    p.add_argument("--target-modes", default="concept,skill",
                   help=f"vlselect target modes at --target-budget, of {TARGET_MODES}; "
                   "auto is scored from concept and skill; '' skips targeting")  # fmt: skip
    p.add_argument("--target-budget", type=float, default=0.2)
    p.add_argument("--auto-threshold", type=float, default=None,
                   help="also score auto-calibrated: auto with this margin threshold, as "
                   "benchmarks/calibrate_auto.py fits it on the calibration worlds")  # fmt: skip
    p.add_argument("--progress-budgets", default="0.2",
                   help="budgets of the PROGRESS runs (a vlselect progress job each)")  # fmt: skip
    p.add_argument("--epochs", type=float, default=10)
    p.add_argument("--workers", type=int, default=None,
                   help="trainings at once (default and at most: one per CPU of the Ray "
                   "cluster; fewer share the CPUs as torch threads)")  # fmt: skip
    p.add_argument("--base-world", type=int, default=None,
                   help="the world whose workspace under --root holds the shared base (default: "
                   "this run's first, which trains it): a calibration run reuses the "
                   "evaluation run's base, or the reverse")  # fmt: skip
    p.add_argument("--base-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a `vlselect base --set` for the shared base (a smoke run's small "
                   "base: train.vision_steps=3 ...)")  # fmt: skip
    p.add_argument("--note", default="",
                   help="provenance kept in the results (e.g. how long the run took from empty "
                   "when this file is rewritten from its cached runs)")  # fmt: skip
    p.add_argument(
        "--out",
        default=None,
        help="default results/quality.json (quality_<role>.json off evaluation)",
    )
    args = p.parse_args()
    worlds, role = world_seeds(args.worlds)
    plan = {
        "seeds": [int(x) for x in args.seeds.split(",")],
        "budgets": [float(b) for b in args.budgets.split(",")],
        "progress_budgets": [float(b) for b in args.progress_budgets.split(",")],
        "methods": [m for m in args.methods.split(",") if m],
        "modes": [m for m in args.target_modes.split(",") if m],
    }
    unknown = set(plan["methods"]) - set(UNTARGETED + PROGRESS)
    unknown |= set(plan["modes"]) - set(TARGET_MODES)
    if unknown or (plan["modes"] and not {"concept", "skill"} <= set(plan["modes"])):
        p.error(f"unknown methods or modes {sorted(unknown)}; target modes need concept,skill")
    out = args.out or str(
        RESULTS / ("quality.json" if role == "evaluation" else f"quality_{role}.json")
    )
    t0 = time.perf_counter()
    recipe = FinetuneConfig(epochs=args.epochs)
    base_world = worlds[0] if args.base_world is None else args.base_world
    base_ws = Workspace.open(str(Path(args.root) / f"world-{base_world}"))
    if base_world not in worlds:  # the base's home is another run's world: it must be there
        load_base(base_ws)
    per_world, setup = {}, {}
    for seed in worlds:
        start = time.perf_counter()
        ws = Workspace.open(str(Path(args.root) / f"world-{seed}"))
        first = ws.root == base_ws.root
        world = prepare(ws, args.pool, seed, bool(plan["modes"]), args.base_set if first else None)
        setup[seed] = round(time.perf_counter() - start, 1)
        bench = Bench(ws, world, recipe, base_ws)
        per_world[seed] = run_world(bench, args, plan, prior=seed == worlds[0])
        if seed == worlds[0]:
            prior = per_world[seed]["prior"]
            benchmarks = [b.name for b in world.benchmarks]
            evals = list(bench.evals)
    results = {w: d["results"] for w, d in per_world.items()}
    summary = summarize(results, benchmarks)
    doc = {
        "role": role, "worlds": worlds, "calibration_worlds": list(CALIBRATION_WORLDS),
        "evaluation_worlds": list(EVALUATION_WORLDS), "pool": args.pool,
        "seeds": plan["seeds"], "budgets": sorted(set(plan["budgets"]) |
                                                 set(plan["progress_budgets"])),
        "methods": [m for m in plan["methods"]
                    if not all(m in d["skipped"] for d in per_world.values())],
        "skipped": {w: d["skipped"] for w, d in per_world.items() if d["skipped"]},
        "evals": evals, "benchmarks": benchmarks, "recipe": recipe.model_dump(mode="json"),
        "target_budget": args.target_budget, "summary": summary, "prior": prior,
        "runs": {str(w): r for w, r in results.items()},
        "setup_seconds": {str(w): s for w, s in setup.items()}, "note": args.note,
    }  # fmt: skip
    if plan["modes"]:
        rules = list(per_world[worlds[0]]["predictions"])
        autos = {r: {w: d["predictions"][r] for w, d in per_world.items()} for r in rules}
        rows, choice = targeted_summary(summary, plan["modes"], autos, benchmarks)
        doc["targeted"] = {
            "margins": {str(w): d["margins"] for w, d in per_world.items()},
            "auto_threshold": args.auto_threshold,
            "predictions": {r: {str(w): v for w, v in p.items()} for r, p in autos.items()},
            "rows": rows, "choice": choice,
        }  # fmt: skip
    doc["total_seconds"] = round(time.perf_counter() - t0, 1)
    print("\n" + write_report(out, doc))
    print(f"wrote {out} (and .md, _budget.png) in {doc['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
