"""Selection quality on the shapes world: the papers' main table, at a scale 2 cores train.

    python benchmarks/quality.py [--workspace ws/quality] [--pool 2000] [--seeds 0,1,2]
        [--budgets 0.1,0.2,0.3] [--methods random,coincide,perplexity,progress-loss,...]
        [--progress-budgets 0.2] [--target-modes concept,skill] [--target-budget 0.2]

The defaults (every method; the untargeted ones at 10/20/30%, PROGRESS at 20%, targeted
``concept`` and ``skill``, whence ``auto``; 3 seeds; pool 2,000) fit the issue's 90 minutes
on 2 cores from an empty workspace, the base's 30 included. The larger setting adds
``--progress-budgets 0.1,0.2,0.3 --target-modes concept,skill,sum,max,split`` (about 40
minutes more) and ``--pool 20000`` (hours).

1. Prepares the workspace with the real stages, each skipped when already done:
   ``vlselect world`` (the default world at ``--pool`` rows), ``ingest``, ``embed
   --spaces dino,text``, the warm-up clustering ``vlselect progress`` makes (dino+text,
   K = pool/10), and ``vlselect base`` (about 30 minutes on 2 cores, once per world); with target
   modes also the clip space, ``vlselect skills`` (SmolLM2: minutes) and both indexes.
2. Selects, per seed and budget: ``random``; ``coincide`` (COINCIDE's selector, the
   warm-up of ``vlselect progress``, run to the whole budget); ``perplexity`` (the pool
   ranked by the per-token answer loss of a warm-up model, trained with the recipe on
   the seed's 9% COINCIDE warm-up; the middle of the ranking kept, engine.quality);
   ``full``, the whole pool, once per seed; with ``--methods progress-loss`` /
   ``progress-accuracy``, a ``vlselect progress`` job's selection; with
   ``--target-modes``, a ``vlselect target`` job per mode over the held-out benchmarks
   (``auto``: each benchmark's predicted space), scored on its own benchmark.
3. Trains each selection from the cached base with ONE recipe (``FinetuneConfig``'s
   defaults: LoRA r=32 on the LM, projector trained fully, batch 64,
   ``--epochs`` passes over the selected rows, one cosine schedule): the papers' rule,
   the same epochs for every selection, so a 20% selection trains 20% of full data's
   steps. The text-only prior is full data with black images, first seed.
4. Scores every run on the in-distribution ``test`` split and every held-out benchmark
   (normalized-match accuracy of greedy answers, per family too).

Each run's result is kept in ``<ws>/quality/runs/`` and reused while its recipe and
pool match: a stopped benchmark resumes where it was. Writes
``benchmarks/results/quality.json``, ``quality.md`` (the tables) and
``quality_budget.png`` (accuracy against budget).
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
from engine.llava.evaluate import sample_losses  # noqa: E402
from engine.llava.finetune import accuracy_by_group, finetune  # noqa: E402
from engine.quality import random_selection, score_selection  # noqa: E402
from engine.workspace import Workspace  # noqa: E402
from engine.world.config import WorldConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
UNTARGETED = ("random", "coincide", "perplexity")
PROGRESS = ("progress-loss", "progress-accuracy")
TARGET_MODES = ("concept", "skill", "sum", "max", "split")
WARMUP_SHARE = 0.09


def prepare(ws: Workspace, pool: int, world_seed: int, targeted: bool) -> WorldConfig:
    """Run the stages the selections need (each skips what is done); the world's config."""
    from jobs.cli import main as cli

    steps = []
    if World.find(ws) is None:
        steps.append(["world", "--out", ws.root, "--size", str(pool), "--seed", str(world_seed)])
    if Pool.find(ws) is None:
        steps.append(["ingest", "--workspace", ws.root])
    spaces = "clip,dino,text" if targeted else "dino,text"
    steps += [
        ["embed", "--workspace", ws.root, "--spaces", spaces],
        ["base", "--workspace", ws.root],
    ]
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
            f"{ws.root} holds a world of {world.size} rows, seed {world.seed}: "
            "pass another --workspace"
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
    """The pool, the evaluation sets, the base and the recipe of one benchmark run."""

    def __init__(self, ws: Workspace, world: WorldConfig, recipe: FinetuneConfig):
        self.ws, self.recipe = ws, recipe
        table = Pool.open(ws).read_table(["id", "image", "question", "answer"])
        self.pool = table.to_pylist()
        self.ids = [r["id"] for r in self.pool]
        self.position = {i: p for p, i in enumerate(self.ids)}
        self.evals = {"test": world_examples(world, "test", world.test_size)}
        for b in world.benchmarks:
            self.evals[b.name] = world_examples(world, b.name, b.size)
        self.base = load_base(ws)
        self.runs_dir = Path(ws.path("quality", "runs"))
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        pool_hash = hashlib.sha256("\n".join(self.ids).encode()).hexdigest()[:12]
        self.made_of = {
            "recipe": recipe.model_dump(mode="json"),
            "pool": pool_hash,
            "base": self.base.fingerprint,
        }

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
        model, losses = self.train(positions, seed, key, blank)
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
            "key": key, "rows": len(positions), "steps": len(losses), "seed": seed,
            "train_seconds": round(t1 - t0, 1), "eval_seconds": round(time.perf_counter() - t1, 1),
            "final_loss": float(np.mean(losses[-10:])), "accuracy": scores,
            "made_of": self.made_of, "ids_hash": _ids_hash(positions),
        }  # fmt: skip
        path.write_text(json.dumps(result, indent=1) + "\n")
        return result

    def perplexity_scores(self, seed: int) -> np.ndarray:
        """Per-token answer loss of every pool row under a model trained on the seed's
        COINCIDE warm-up (selected only when the scores are not cached yet)."""
        made_of = hashlib.sha256(json.dumps(self.made_of, sort_keys=True).encode())
        path = self.runs_dir / f"perplexity-scores-s{seed}-{made_of.hexdigest()[:12]}.npy"
        if path.exists():
            return np.load(path, allow_pickle=False)
        warm_ids = coincide_ids(self.ws, int(round(WARMUP_SHARE * len(self.ids))), seed)
        model, _ = self.train(self.positions(warm_ids), seed, f"warm-up model s{seed}")
        scores = sample_losses(
            model, self.base.processor, self.pool, max_length=self.base.max_length
        )
        np.save(path, scores, allow_pickle=False)
        return scores


def _ids_hash(positions: np.ndarray) -> str:
    return hashlib.sha256(np.sort(np.asarray(positions, np.int64)).tobytes()).hexdigest()[:16]


def select(bench: Bench, method: str, budget: float, seed: int) -> np.ndarray:
    """Pool positions of an untargeted baseline's selection, int64 (round(budget * n),)."""
    n = len(bench.ids)
    count = int(round(budget * n))
    if method == "random":
        return random_selection(n, count, seed)
    if method == "coincide":
        return bench.positions(coincide_ids(bench.ws, count, seed))
    if method == "perplexity":
        return score_selection(bench.perplexity_scores(seed), count, "middle")
    raise ValueError(f"unknown method {method!r}; known: {UNTARGETED}")


def progress_ids(bench: Bench, metric: str, budget: float, seed: int) -> list[str]:
    """The rows a ``vlselect progress`` run of ``metric`` chose (the job runs once per
    base: its name carries the base's fingerprint, as its selection depends on it)."""
    from jobs.cli import main as cli

    ws = bench.ws
    name = f"quality-{metric}-{round(budget * 100)}-s{seed}-{bench.made_of['base'][:8]}"
    argv = ["progress", "--workspace", ws.root, "--name", name, "--budget", str(budget),
            "--metric", metric, "--set", f"seed={seed}"]  # fmt: skip
    if cli(argv) != 0:
        raise SystemExit(f"`vlselect {' '.join(argv)}` failed")
    return ws.read_bytes(ProgressRun.open(ws, name).path("ids.txt")).decode().split()


def targeted_ids(ws: Workspace, world: WorldConfig, mode: str, budget: float):
    """Per held-out benchmark, the rows ``vlselect target --mode MODE`` chose, and each
    benchmark's predicted space (one job per mode, all benchmarks at once)."""
    from jobs.cli import main as cli

    name = f"quality-{mode}-{round(budget * 100)}"
    argv = ["target", "--workspace", ws.root, "--budget", str(budget), "--name", name,
            "--mode", mode]  # fmt: skip
    for b in world.benchmarks:
        argv += ["--benchmark", World.open(ws).benchmark(b.name)]
    if cli(argv) != 0:
        raise SystemExit(f"`vlselect {' '.join(argv)}` failed")
    ids, predictions = {}, {}
    for b in world.benchmarks:
        folder = Selection.open(ws, name).benchmark_dir(b.name)
        ids[b.name] = ws.read_bytes(f"{folder}/ids.txt").decode().split()
        predictions[b.name] = ws.read_json(f"{folder}/report.json")["prediction"]
    return ids, predictions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workspace", default=str(ROOT / "ws" / "quality"))
    p.add_argument("--pool", type=int, default=2000)
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budgets", default="0.1,0.2,0.3", help="budgets of the untargeted methods")
    p.add_argument("--methods", default=",".join(UNTARGETED + PROGRESS),
                   help=f"of {UNTARGETED + PROGRESS}")  # fmt: skip
    p.add_argument("--target-modes", default="concept,skill",
                   help=f"vlselect target modes at --target-budget, of {TARGET_MODES}; "
                   "auto is scored from concept and skill; '' skips targeting")  # fmt: skip
    p.add_argument("--target-budget", type=float, default=0.2)
    p.add_argument("--progress-budgets", default="0.2",
                   help="budgets of the PROGRESS runs (a vlselect progress job each)")  # fmt: skip
    p.add_argument("--epochs", type=float, default=10)
    p.add_argument("--out", default=str(RESULTS / "quality.json"))
    args = p.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    progress_budgets = [float(b) for b in args.progress_budgets.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    modes = [m for m in args.target_modes.split(",") if m]
    unknown = set(methods) - set(UNTARGETED + PROGRESS) | set(modes) - set(TARGET_MODES)
    if unknown or (modes and not {"concept", "skill"} <= set(modes)):
        p.error(f"unknown methods or modes {sorted(unknown)}; target modes need concept,skill")
    t0 = time.perf_counter()
    ws = Workspace.open(args.workspace)
    world = prepare(ws, args.pool, args.world_seed, targeted=bool(modes))
    setup_seconds = time.perf_counter() - t0
    bench = Bench(ws, world, FinetuneConfig(epochs=args.epochs))
    benchmarks = [b.name for b in world.benchmarks]
    everything = np.arange(len(bench.ids))
    results: dict[str, list[dict]] = {}
    plan = [("full", 1.0, s) for s in seeds]
    plan += [
        (m, b, s)
        for s in seeds
        for m in methods
        for b in (progress_budgets if m in PROGRESS else budgets)
    ]
    for method, budget, seed in tqdm(plan, desc="untargeted runs"):
        if method == "full":
            positions = everything
        elif method in PROGRESS:
            positions = bench.positions(progress_ids(bench, method.split("-")[1], budget, seed))
        else:
            positions = select(bench, method, budget, seed)
        label = "full" if method == "full" else f"{method}@{budget:g}"
        key = f"{method}-{round(budget * 100)}-s{seed}"
        results.setdefault(label, []).append(bench.run(key, positions, seed))
    predictions = {}
    for mode in tqdm(modes, desc="targeted selections"):
        chosen, predictions = targeted_ids(ws, world, mode, args.target_budget)
        for b, seed in [(b, s) for b in benchmarks for s in seeds]:
            key = f"target-{mode}-{b}-{round(args.target_budget * 100)}-s{seed}"
            run = bench.run(key, bench.positions(chosen[b]), seed, evals=[b])
            results.setdefault(f"target:{mode}:{b}", []).append(run)
    prior = bench.run(f"prior-100-s{seeds[0]}", everything, seeds[0], blank=True)
    summary = summarize(results, benchmarks)
    doc = {
        "pool": len(bench.ids), "world_seed": args.world_seed, "seeds": seeds,
        "budgets": sorted(set(budgets) | set(progress_budgets)), "methods": methods,
        "evals": list(bench.evals), "benchmarks": benchmarks, "recipe": bench.made_of["recipe"],
        "target_budget": args.target_budget, "summary": summary, "prior": prior,
        "runs": results, "setup_seconds": round(setup_seconds, 1),
    }  # fmt: skip
    if modes:
        rows, choice = targeted_summary(summary, modes, predictions, benchmarks)
        doc["targeted"] = {"predictions": predictions, "rows": rows, "choice": choice}
    doc["total_seconds"] = round(time.perf_counter() - t0, 1)
    print("\n" + write_report(args.out, doc))
    print(f"wrote {args.out} (and .md, _budget.png) in {doc['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
