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
   is full data with black images, first seed, first world.
4. Scores every run on the in-distribution ``test`` split and every held-out benchmark
   (normalized-match accuracy of greedy answers, per family too).

Each run's result is kept in ``<world ws>/quality/runs/`` and reused while its recipe,
pool and base match: a stopped benchmark resumes where it was. Writes
``benchmarks/results/quality.json`` (``quality_calibration.json`` for the calibration
worlds), its ``.md`` (the tables) and ``_budget.png`` (accuracy against budget).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.quality_report import summarize, targeted_summary, write_report  # noqa: E402
from benchmarks.tiny_llava import world_examples  # noqa: E402
from engine.artifacts import EmbeddingSpace, Pool, ProgressRun, Selection, World  # noqa: E402
from engine.llava import FinetuneConfig, load_base  # noqa: E402
from engine.llava.cache import base_uri  # noqa: E402
from engine.llava.evaluate import sample_el2n, sample_losses  # noqa: E402
from engine.llava.finetune import accuracy_by_group, finetune  # noqa: E402
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
WARMUP_SHARE = 0.09
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


def coincide_ids(ws: Workspace, count: int, seed: int) -> list[str]:
    from jobs.progress import ProgressConfig
    from jobs.progress_warmup import select_warmup_ids

    return select_warmup_ids(ProgressConfig(name="quality", seed=seed), ws, count)


class Bench:
    """The pool, the evaluation sets, the base and the recipe of one world's runs.

    ws: the world's workspace; base_ws: the workspace holding the base (the first world's).
    """

    def __init__(
        self, ws: Workspace, world: WorldConfig, recipe: FinetuneConfig, base_ws: Workspace
    ):
        self.ws, self.world, self.recipe = ws, world, recipe
        self.base_ws = base_ws
        table = Pool.open(ws).read_table(["id", "image", "question", "answer"])
        self.pool = table.to_pylist()
        self.ids = [r["id"] for r in self.pool]
        self.position = {i: p for p, i in enumerate(self.ids)}
        self.evals = {"test": world_examples(world, "test", world.test_size)}
        for b in world.benchmarks:
            self.evals[b.name] = world_examples(world, b.name, b.size)
        self.base = load_base(base_ws)
        self.runs_dir = Path(ws.path("quality", "runs"))
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        pool_hash = hashlib.sha256("\n".join(self.ids).encode()).hexdigest()[:12]
        self.made_of = {
            "recipe": recipe.model_dump(mode="json"),
            "pool": pool_hash,
            "base": self.base.fingerprint,
        }

    @property
    def model_setting(self) -> list[str]:
        """``--set model=...`` for jobs in a world whose workspace holds no base."""
        if self.base_ws.root == self.ws.root:
            return []
        return ["--set", f"model={base_uri(self.base_ws)}"]

    def train(self, positions: np.ndarray, seed: int, desc: str, blank: bool = False):
        cfg = self.recipe.model_copy(update={"seed": seed})
        examples = [self.pool[p] for p in positions]
        model = copy.deepcopy(self.base.model)
        return finetune(
            model, self.base.processor, examples, cfg, self.base.max_length,
            blank_images=blank, log_every=0, progress=desc,
        )  # fmt: skip

    def positions(self, ids: list[str]) -> np.ndarray:
        return np.sort(np.array([self.position[i] for i in ids], np.int64))

    def run(
        self,
        key: str,
        positions: np.ndarray,
        seed: int,
        blank: bool = False,
        evals: list[str] | None = None,
    ) -> dict:
        """Train on ``positions``, score ``evals`` (default all; cached by ``key``)."""
        path = self.runs_dir / f"{key}.json"
        if path.exists():
            done = json.loads(path.read_text())
            if done["made_of"] == self.made_of and done["ids_hash"] == _ids_hash(positions):
                return done
        t0 = time.perf_counter()
        model, losses = self.train(positions, seed, f"w{self.world.seed} {key}", blank)
        t1 = time.perf_counter()
        scores = {
            name: accuracy_by_group(
                model, self.base.processor, examples, families, self.base.max_length,
                blank_images=blank,
            )
            for name, (examples, families) in self.evals.items()
            if evals is None or name in evals
        }  # fmt: skip
        result = {
            "key": key, "world": self.world.seed, "rows": len(positions), "steps": len(losses),
            "seed": seed, "train_seconds": round(t1 - t0, 1),
            "eval_seconds": round(time.perf_counter() - t1, 1),
            "final_loss": float(np.mean(losses[-10:])), "accuracy": scores,
            "made_of": self.made_of, "ids_hash": _ids_hash(positions),
        }  # fmt: skip
        path.write_text(json.dumps(result, indent=1) + "\n")
        return result

    def warmup_scores(self, seed: int, kind: str) -> np.ndarray:
        """A static score of every pool row, float64 (n,), under a model trained on the
        seed's COINCIDE warm-up: ``loss`` (per-token answer loss, log-perplexity) or
        ``el2n``. The model is trained once per seed for whichever are not cached."""
        made_of = hashlib.sha256(json.dumps(self.made_of, sort_keys=True).encode())
        path = {k: self.runs_dir / f"{k}-scores-s{seed}-{made_of.hexdigest()[:12]}.npy"
                for k in ("loss", "el2n")}  # fmt: skip
        if not path[kind].exists():
            warm_ids = coincide_ids(self.ws, int(round(WARMUP_SHARE * len(self.ids))), seed)
            model, _ = self.train(self.positions(warm_ids), seed, f"warm-up model s{seed}")
            score = {"loss": sample_losses, "el2n": sample_el2n}
            for k, file in path.items():
                if not file.exists():
                    values = score[k](model, self.base.processor, self.pool,
                                      max_length=self.base.max_length)  # fmt: skip
                    np.save(file, np.asarray(values, np.float64), allow_pickle=False)
        return np.load(path[kind], allow_pickle=False)

    def clip_score_scores(self) -> np.ndarray | str:
        """CLIP-Score of every pool row under the workspace's CLIP, float64 (n,), or the
        reason it is not computed (a CLIP without a trained text tower)."""
        from engine.clip_score import clip_scores, has_trained_text_tower
        from engine.encoders import EncoderSpec

        spec = EncoderSpec(**EmbeddingSpace.open(self.ws, "clip").meta.config["encoder"])
        trained, reason = has_trained_text_tower(spec)
        if not trained:
            return reason
        path = self.runs_dir / "clip-score-scores.npy"
        if not path.exists():
            np.save(path, clip_scores(spec, self.pool, batch_size=64), allow_pickle=False)
        return np.load(path, allow_pickle=False)


def _ids_hash(positions: np.ndarray) -> str:
    return hashlib.sha256(np.sort(np.asarray(positions, np.int64)).tobytes()).hexdigest()[:16]


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


def run_world(bench: Bench, args, plan: dict) -> dict:
    """Every run of one world: {"results": label -> runs, "predictions", "skipped"}."""
    world = bench.world
    everything = np.arange(len(bench.ids))
    results: dict[str, list[dict]] = {}
    skipped: dict[str, str] = {}
    jobs = [("full", 1.0, s) for s in plan["seeds"]]
    jobs += [
        (m, b, s)
        for s in plan["seeds"]
        for m in plan["methods"]
        for b in (plan["progress_budgets"] if m in PROGRESS else plan["budgets"])
    ]
    for method, budget, seed in tqdm(jobs, desc=f"world {world.seed}: untargeted runs"):
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
        key = f"{method}-{round(budget * 100)}-s{seed}"
        results.setdefault(label, []).append(bench.run(key, positions, seed))
    margins = {}
    for mode in tqdm(plan["modes"], desc=f"world {world.seed}: targeted selections"):
        chosen, margins = targeted_ids(bench.ws, world, mode, args.target_budget)
        for b, seed in [(b.name, s) for b in world.benchmarks for s in plan["seeds"]]:
            key = f"target-{mode}-{b}-{round(args.target_budget * 100)}-s{seed}"
            run = bench.run(key, bench.positions(chosen[b]), seed, evals=[b])
            results.setdefault(f"target:{mode}:{b}", []).append(run)
    autos = {"auto": 0.0}
    if args.auto_threshold is not None:
        autos["auto-calibrated"] = args.auto_threshold
    predictions = {rule: {b: "concept" if m > threshold else "skill" for b, m in margins.items()}
                   for rule, threshold in autos.items()} if margins else {}  # fmt: skip
    for rule, predicted in predictions.items():  # each benchmark's predicted space's runs
        for b, space in predicted.items():
            results[f"target:{rule}:{b}"] = results[f"target:{space}:{b}"]
    return {"results": results, "predictions": predictions, "margins": margins,
            "skipped": skipped}  # fmt: skip


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
        per_world[seed] = run_world(bench, args, plan)
        if seed == worlds[0]:
            everything = np.arange(len(bench.ids))
            prior = bench.run(f"prior-100-s{plan['seeds'][0]}", everything, plan["seeds"][0],
                              blank=True)  # fmt: skip
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
