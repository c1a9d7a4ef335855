"""The quality benchmark's trainings: one world's pool, evaluation sets, base and recipe
(``Bench``), and its runs trained side by side on Ray actors (``train_all``).

A fine-tune of the tiny LLaVA is small enough that torch's second thread buys little:
on the 2-core machine one 63-step run takes 18.8 s on two threads and 27.1 s on one, so
two one-thread runs at once finish both in ~28 s where one after the other take 37.6 s.
``train_all`` therefore runs one actor per CPU of the Ray cluster (fewer when fewer runs
are left), each with as many torch threads as CPUs it holds. A run's result does not
depend on where or beside what it ran: the same spec gives the same losses and answers
on one thread or two (tests/test_quality_runs.py), so a run cached by one layout is
reused by another.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from benchmarks.tiny_llava import world_examples
from engine.artifacts import EmbeddingSpace, Pool
from engine.llava import FinetuneConfig, load_base
from engine.llava.cache import base_uri
from engine.llava.evaluate import sample_el2n, sample_losses
from engine.llava.finetune import accuracy_by_group, finetune
from engine.workspace import Workspace
from engine.world.config import WorldConfig

WARMUP_SHARE = 0.09


@dataclass(frozen=True)
class RunSpec:
    """One training of the table: ``positions`` (int64 pool positions, sorted) trained
    with ``seed``; ``blank`` trains the text-only prior; ``evals`` names the evaluation
    sets scored (None: all). ``key`` names its cached result."""

    key: str
    positions: np.ndarray
    seed: int
    blank: bool = False
    evals: tuple[str, ...] | None = None


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

    @classmethod
    def open(cls, root: str, recipe: FinetuneConfig, base_root: str) -> Bench:
        """The bench of the world whose workspace is at ``root``."""
        ws = Workspace.open(root)
        world = WorldConfig(**ws.read_config()["world"])
        return cls(ws, world, recipe, Workspace.open(base_root))

    @property
    def model_setting(self) -> list[str]:
        """``--set model=...`` for jobs in a world whose workspace holds no base."""
        if self.base_ws.root == self.ws.root:
            return []
        return ["--set", f"model={base_uri(self.base_ws)}"]

    def train(self, positions: np.ndarray, seed: int, desc: str | None, blank: bool = False):
        cfg = self.recipe.model_copy(update={"seed": seed})
        examples = [self.pool[p] for p in positions]
        model = copy.deepcopy(self.base.model)
        return finetune(
            model, self.base.processor, examples, cfg, self.base.max_length,
            blank_images=blank, log_every=0, progress=desc,
        )  # fmt: skip

    def positions(self, ids: list[str]) -> np.ndarray:
        return np.sort(np.array([self.position[i] for i in ids], np.int64))

    def cached(self, spec: RunSpec) -> dict | None:
        """The stored result of ``spec`` while its recipe, pool, base and rows match."""
        path = self.runs_dir / f"{spec.key}.json"
        if not path.exists():
            return None
        done = json.loads(path.read_text())
        if done["made_of"] == self.made_of and done["ids_hash"] == _ids_hash(spec.positions):
            return done
        return None

    def train_and_score(self, spec: RunSpec, desc: str | None = None) -> dict:
        """Train ``spec`` and score its evaluation sets; the result (not stored)."""
        t0 = time.perf_counter()
        model, losses = self.train(spec.positions, spec.seed, desc, spec.blank)
        t1 = time.perf_counter()
        scores = {
            name: accuracy_by_group(
                model, self.base.processor, examples, families, self.base.max_length,
                blank_images=spec.blank,
            )
            for name, (examples, families) in self.evals.items()
            if spec.evals is None or name in spec.evals
        }  # fmt: skip
        return {
            "key": spec.key, "world": self.world.seed, "rows": len(spec.positions),
            "steps": len(losses), "seed": spec.seed, "train_seconds": round(t1 - t0, 1),
            "eval_seconds": round(time.perf_counter() - t1, 1),
            "final_loss": float(np.mean(losses[-10:])), "accuracy": scores,
            "made_of": self.made_of, "ids_hash": _ids_hash(spec.positions),
        }  # fmt: skip

    def save(self, result: dict) -> None:
        """Store a run's result (whole or not at all: a stopped benchmark resumes)."""
        path = str(self.runs_dir / f"{result['key']}.json")
        self.ws.write_bytes(path, (json.dumps(result, indent=1) + "\n").encode())

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


def coincide_ids(ws: Workspace, count: int, seed: int) -> list[str]:
    """The rows COINCIDE's selector (the warm-up of ``vlselect progress``) picks."""
    from jobs.progress import ProgressConfig
    from jobs.progress_warmup import select_warmup_ids

    return select_warmup_ids(ProgressConfig(name="quality", seed=seed), ws, count)


def _ids_hash(positions: np.ndarray) -> str:
    return hashlib.sha256(np.sort(np.asarray(positions, np.int64)).tobytes()).hexdigest()[:16]


class RunTrainer:
    """A Ray actor holding one world's bench, training specs on ``threads`` torch threads."""

    def __init__(self, root: str, recipe: dict, base_root: str, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.bench = Bench.open(root, FinetuneConfig(**recipe), base_root)

    def run(self, spec: RunSpec) -> dict:
        return self.bench.train_and_score(spec)


def train_all(
    bench: Bench, specs: list[RunSpec], workers: int | None, desc: str
) -> dict[str, dict]:
    """Every spec's result by key: cached ones read, the others trained on up to
    ``workers`` actors at once (None: one per CPU of the Ray cluster) (each stored as it arrives), longest first. The actors
    hold the cluster's CPUs only while they train: they are gone when this returns."""
    import ray
    from ray.util import ActorPool

    results = {s.key: r for s in specs if (r := bench.cached(s)) is not None}
    todo = sorted((s for s in specs if s.key not in results), key=lambda s: -len(s.positions))
    if not todo:
        return results
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    count = max(1, min(workers or cpus, cpus, len(todo)))
    threads = max(1, cpus // count)
    trainer = ray.remote(num_cpus=threads)(RunTrainer)
    recipe = bench.recipe.model_dump(mode="json")
    actors = [
        trainer.remote(bench.ws.root, recipe, bench.base_ws.root, threads) for _ in range(count)
    ]
    try:
        done = ActorPool(actors).map_unordered(lambda a, spec: a.run.remote(spec), todo)
        for result in tqdm(done, total=len(todo), desc=f"{desc} ({count} at once)"):
            bench.save(result)
            results[result["key"]] = result
    finally:
        for actor in actors:
            ray.kill(actor)
    return results
