"""Selection quality on the shapes world: the papers' main table, at a scale 2 cores train.

    python benchmarks/quality.py [--workspace ws/quality] [--pool 2000] [--seeds 0,1,2]
                                 [--budgets 0.1,0.2,0.3] [--methods random,coincide,perplexity]

1. Prepares the workspace with the real stages, each skipped when already done:
   ``vlselect world`` (the default world at ``--pool`` rows), ``ingest``, ``embed
   --spaces dino,text``, the warm-up clustering ``vlselect progress`` makes (dino+text,
   K = pool/10), and ``vlselect base`` (about 9 minutes, once per world).
2. Selects, per seed and budget: ``random``; ``coincide`` (COINCIDE's selector, the
   warm-up of ``vlselect progress``, run to the whole budget); ``perplexity`` (the pool
   ranked by the per-token answer loss of a warm-up model, trained with the recipe on
   the seed's 9% COINCIDE warm-up; the middle of the ranking kept, engine.quality);
   ``full``, the whole pool, once per seed.
3. Trains each selection from the cached base with ONE recipe (``FinetuneConfig``
   defaults unless ``--set``: LoRA r=32 on the LM, projector trained fully, batch 64,
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

from benchmarks.common import machine  # noqa: E402
from benchmarks.tiny_llava import world_examples  # noqa: E402
from engine.llava import FinetuneConfig, load_base  # noqa: E402
from engine.llava.evaluate import sample_losses  # noqa: E402
from engine.llava.finetune import accuracy_by_group, finetune  # noqa: E402
from engine.quality import (  # noqa: E402
    markdown_table,
    mean_std,
    random_selection,
    relative_performance,
    score_selection,
)
from engine.workspace import Workspace, read_parquet_dir  # noqa: E402
from engine.world.config import WorldConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
UNTARGETED = ("random", "coincide", "perplexity")
WARMUP_SHARE = 0.09


def prepare(ws: Workspace, pool: int, world_seed: int) -> WorldConfig:
    """Run the stages the selections need (each skips what is done); the world's config."""
    from jobs.cli import main as cli

    steps = []
    if not ws.exists("world", "meta.json"):
        steps.append(["world", "--out", ws.root, "--size", str(pool), "--seed", str(world_seed)])
    if not ws.exists("pool", "meta.json"):
        steps.append(["ingest", "--workspace", ws.root])
    steps += [
        ["embed", "--workspace", ws.root, "--spaces", "dino,text"],
        ["base", "--workspace", ws.root],
    ]
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
        table = read_parquet_dir(ws.path("pool"), columns=["id", "image", "question", "answer"])
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
            "base": self.base.meta["fingerprint"],
        }

    def train(self, positions: np.ndarray, seed: int, desc: str, blank: bool = False):
        cfg = self.recipe.model_copy(update={"seed": seed})
        examples = [self.pool[p] for p in positions]
        model = copy.deepcopy(self.base.model)
        return finetune(
            model, self.base.tokenizer, examples, cfg, self.base.max_length,
            blank_images=blank, log_every=0, progress=desc,
        )  # fmt: skip

    def run(self, key: str, positions: np.ndarray, seed: int, blank: bool = False) -> dict:
        """Train on ``positions`` and score every evaluation set (cached by ``key``)."""
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
                model, self.base.tokenizer, examples, families, self.base.max_length,
                blank_images=blank,
            )
            for name, (examples, families) in self.evals.items()
        }  # fmt: skip
        result = {
            "key": key, "rows": len(positions), "steps": len(losses), "seed": seed,
            "train_seconds": round(t1 - t0, 1), "eval_seconds": round(time.perf_counter() - t1, 1),
            "final_loss": float(np.mean(losses[-10:])), "accuracy": scores,
            "made_of": self.made_of, "ids_hash": _ids_hash(positions),
        }  # fmt: skip
        path.write_text(json.dumps(result, indent=1) + "\n")
        return result

    def perplexity_scores(self, warmup: np.ndarray, seed: int) -> np.ndarray:
        """Per-token answer loss of every pool row under a model trained on ``warmup``."""
        path = self.runs_dir / f"perplexity-scores-s{seed}.npy"
        if path.exists():
            return np.load(path, allow_pickle=False)
        model, _ = self.train(warmup, seed, f"warm-up model s{seed}")
        scores = sample_losses(
            model, self.base.tokenizer, self.pool, max_length=self.base.max_length
        )
        np.save(path, scores, allow_pickle=False)
        return scores


def _ids_hash(positions: np.ndarray) -> str:
    return hashlib.sha256(np.sort(np.asarray(positions, np.int64)).tobytes()).hexdigest()[:16]


def select(bench: Bench, method: str, budget: float, seed: int) -> np.ndarray:
    n = len(bench.ids)
    count = int(round(budget * n))
    if method == "random":
        return random_selection(n, count, seed)
    warm_ids = coincide_ids(bench.ws, int(round(WARMUP_SHARE * n)), seed)
    if method == "coincide":
        ids = coincide_ids(bench.ws, count, seed)
        return np.sort(np.array([bench.position[i] for i in ids], np.int64))
    if method == "perplexity":
        warm = np.array([bench.position[i] for i in warm_ids], np.int64)
        return score_selection(bench.perplexity_scores(warm, seed), count, "middle")
    raise ValueError(f"unknown method {method!r}; known: {UNTARGETED}")


def overall(acc: dict) -> dict[str, float]:
    return {name: a["overall"] for name, a in acc.items()}


def summarize(results: dict, evals: list[str]) -> dict:
    """Mean and std over seeds per (method, budget) and eval set; Rel vs full data."""
    full = {e: mean_std([overall(r["accuracy"])[e] for r in results["full"]])[0] for e in evals}
    out = {}
    for label, runs in results.items():
        per_eval = {e: mean_std([overall(r["accuracy"])[e] for r in runs]) for e in evals}
        rel_per_seed = [relative_performance(overall(r["accuracy"]), full, evals) for r in runs]
        out[label] = {
            "seeds": [r["seed"] for r in runs],
            "accuracy": {e: {"mean": m, "std": s} for e, (m, s) in per_eval.items()},
            "rel": dict(zip(("mean", "std"), mean_std(rel_per_seed), strict=True)),
            "train_seconds": float(np.mean([r["train_seconds"] for r in runs])),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workspace", default=str(ROOT / "ws" / "quality"))
    p.add_argument("--pool", type=int, default=2000)
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budgets", default="0.1,0.2,0.3")
    p.add_argument("--methods", default=",".join(UNTARGETED))
    p.add_argument("--epochs", type=float, default=10)
    p.add_argument("--out", default=str(RESULTS / "quality.json"))
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    methods = args.methods.split(",")
    t0 = time.perf_counter()
    ws = Workspace.open(args.workspace)
    world = prepare(ws, args.pool, args.world_seed)
    setup_seconds = time.perf_counter() - t0
    bench = Bench(ws, world, FinetuneConfig(epochs=args.epochs))
    evals = list(bench.evals)
    everything = np.arange(len(bench.ids))
    plan = [("full", 1.0, s) for s in seeds]
    plan += [(m, b, s) for s in seeds for b in budgets for m in methods]
    results: dict[str, list[dict]] = {}
    for method, budget, seed in tqdm(plan, desc="runs"):
        positions = everything if method == "full" else select(bench, method, budget, seed)
        label = "full" if method == "full" else f"{method}@{budget:g}"
        key = f"{method}-{round(budget * 100)}-s{seed}"
        results.setdefault(label, []).append(bench.run(key, positions, seed))
    prior = bench.run(f"prior-100-s{seeds[0]}", everything, seeds[0], blank=True)
    summary = summarize(results, evals)
    write_report(args.out, summary, results, prior, evals, budgets, methods, {
        "pool": len(bench.ids), "world_seed": args.world_seed, "seeds": seeds,
        "recipe": bench.made_of["recipe"], "setup_seconds": round(setup_seconds, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
    })  # fmt: skip


def _cell(stat: dict, scale: float = 100.0) -> str:
    return f"{stat['mean'] * scale:.1f} ± {stat['std'] * scale:.1f}"


def write_report(out, summary, results, prior, evals, budgets, methods, setting) -> None:
    header = ["method", "budget", *evals, "Rel"]
    rows = [["full data", "100%", *(_cell(summary["full"]["accuracy"][e]) for e in evals),
             "100.0"]]  # fmt: skip
    for b in budgets:
        for m in methods:
            s = summary[f"{m}@{b:g}"]
            rel = f"{s['rel']['mean']:.1f} ± {s['rel']['std']:.1f}"
            rows.append([m, f"{b:.0%}", *(_cell(s["accuracy"][e]) for e in evals), rel])
    prior_acc = overall(prior["accuracy"])
    rows.append(["text-only prior (full, image black)", "100%",
                 *(f"{prior_acc[e] * 100:.1f}" for e in evals), ""])  # fmt: skip
    main_table = markdown_table(header, rows)
    families = [*sorted(set(results["full"][0]["accuracy"]["test"]) - {"overall"}), "overall"]
    fam_header = ["method (test split)", *families]
    fam_rows = []
    for label in ["full", *(f"{m}@0.2" for m in methods if f"{m}@0.2" in results)]:
        runs = results[label]
        fam_rows.append([label, *(f"{np.mean([r['accuracy']['test'][f] for r in runs]) * 100:.1f}"
                                  for f in families)])  # fmt: skip
    fam_rows.append(["text-only prior", *(f"{prior['accuracy']['test'][f] * 100:.1f}"
                                          for f in families)])  # fmt: skip
    fam_table = markdown_table(fam_header, fam_rows)
    text = (
        f"Accuracy (%) mean ± std over seeds {setting['seeds']}; pool {setting['pool']}; "
        f"Rel = 100 x mean over {evals} of accuracy / full data's.\n\n{main_table}\n\n"
        f"Per family, 20% budgets (test split):\n\n{fam_table}\n"
    )
    print("\n" + text)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".md").write_text(text)
    doc = {"benchmark": "quality", "machine": machine(), **setting, "evals": evals,
           "summary": summary, "prior": prior, "runs": results}  # fmt: skip
    path.write_text(json.dumps(doc, indent=1) + "\n")
    plot_budgets(path.with_name(path.stem + "_budget.png"), summary, budgets, methods, prior_acc,
                 evals)  # fmt: skip
    print(f"wrote {path}, {path.with_suffix('.md')} and the budget plot")


def plot_budgets(path: Path, summary, budgets, methods, prior_acc, evals) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean_over_evals(s):
        return np.mean([s["accuracy"][e]["mean"] for e in evals]) * 100

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        ys = [mean_over_evals(summary[f"{m}@{b:g}"]) for b in budgets]
        ax.plot([b * 100 for b in budgets], ys, marker="o", label=m)
    ax.axhline(mean_over_evals(summary["full"]), color="k", label="full data")
    ax.axhline(np.mean([prior_acc[e] for e in evals]) * 100, color="grey", ls="--",
               label="text-only prior")  # fmt: skip
    ax.set_xlabel("budget (% of pool)")
    ax.set_ylabel("accuracy, mean over eval sets (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
