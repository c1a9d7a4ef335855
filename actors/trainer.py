"""The PROGRESS training loop that runs on every Ray Train worker.

Each worker builds the LoRA LLaVA from the cached base, wraps it in a DeepSpeed engine
(ZeRO-2 or -3; gloo on CPU, NCCL on GPUs) and then, round by round, until the
coordinator has no rows left to give:

    1. asks the coordinator for round t's rows (idempotent: every worker may ask) and
       reads its share of the round file: a seeded permutation of the round's rows,
       the same on every worker, of which worker r takes every world-th micro-batch;
    2. trains ``ceil(epochs * rows / global_batch)`` optimiser steps through the shared
       ``engine.llava.train_step`` (one cosine schedule spans the whole budget);
    3. saves a DeepSpeed checkpoint, scores its share of the evaluation rows (the
       coordinator's min(n_k, 100) selected rows per cluster; loss or accuracy), and
       rank 0 gathers the scores and reports them per cluster to the coordinator;
    4. reports the checkpoint to Ray Train, which restarts failed workers from it
       (``FailureConfig``) and hands it to a new run of the same name.

The scores go to the coordinator before the checkpoint goes to Ray Train, so a run
restarted from round t's checkpoint always finds round t's scores; a round trained
again after a crash draws the same rows (the coordinator is idempotent) and replaces
its scores.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
import ray.train

from actors.coordinator import get_coordinator, round_file
from actors.progress import tell
from engine.coordinator import BASELINE
from engine.llava import (
    answer_correct,
    collate_for,
    load_base,
    param_groups,
    prepare_for_finetune,
    sample_losses,
    train_step,
)
from engine.llava.finetune import steps_for
from engine.llava.train import DeepSpeedStepper, cosine_lambda, deepspeed_config
from engine.progress_config import ProgressConfig, TrainPlan
from engine.workspace import Workspace

CHECKPOINT_TAG = "state"
ROUND_META = "round.json"


def micro_batches(
    rows: int, steps: int, accumulation: int, micro: int, world: int, rank: int, seed: int
) -> list[np.ndarray]:
    """Row indices of each micro-batch worker ``rank`` trains on in a round.

    One seeded stream of row indices (epochs of permutations), identical on every
    worker, is cut into global batches of steps x world x accumulation micro-batches;
    worker r takes micro-batch ``i * world + r`` of each step's slice.
    """
    need = steps * accumulation * world * micro
    rng = np.random.default_rng(seed)
    stream = np.concatenate([rng.permutation(rows) for _ in range(math.ceil(need / rows))])
    stream = stream[:need].reshape(steps * accumulation, world, micro)
    return [stream[i, rank] for i in range(stream.shape[0])]


def _examples(table: pa.Table) -> list[dict]:
    return table.select(["id", "image", "question", "answer", "cluster"]).to_pylist()


class RoundTrainer:
    """One worker's state: the DeepSpeed engine, its coordinator handle, its data."""

    def __init__(self, config: dict):
        import deepspeed
        import torch

        self.cfg = cfg = ProgressConfig.model_validate(config["config"])
        self.plan = plan = TrainPlan.model_validate(config["plan"])
        self.progress = config.get("progress")
        self.ws = Workspace.open(plan.workspace)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.manual_seed(cfg.seed)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.coordinator = get_coordinator(plan.coordinator)
        base = load_base(self.ws, cfg.base)
        self.tokenizer, self.max_length = base.tokenizer, base.max_length
        ft = cfg.finetune
        model = prepare_for_finetune(base.model, ft)
        if torch.cuda.is_available() and cfg.use_gpu:
            model = model.to(f"cuda:{torch.cuda.current_device()}")
        groups = [{k: v for k, v in g.items() if k != "name"} for g in param_groups(model, ft)]
        optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], weight_decay=ft.weight_decay
        )
        schedule = cosine_lambda(plan.total_steps, ft.warmup)
        ds_config = deepspeed_config(
            cfg.micro_batch, plan.accumulation, cfg.zero_stage, ft.max_grad_norm
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=ds_config,
        )
        self.stepper = DeepSpeedStepper(self.engine)

    # -- rounds ----------------------------------------------------------------------------

    def resume_round(self) -> int:
        """The first round to train: after the checkpoint's, or 0 (baseline scored first)."""
        checkpoint = ray.train.get_checkpoint()
        self.started_at = 0
        if checkpoint is None:
            if BASELINE not in ray.get(self.coordinator.status.remote())["scored_rounds"]:
                self.score(BASELINE)
            return 0
        with checkpoint.as_directory() as path:
            self.engine.load_checkpoint(path, tag=CHECKPOINT_TAG)
            with open(os.path.join(path, ROUND_META)) as f:
                done = json.load(f)["round"]
        self.started_at = done + 1
        return done + 1

    def train_round(self, t: int) -> dict | None:
        """Train on round ``t``'s rows; None once the budget is spent."""
        start = time.perf_counter()
        info = ray.get(self.coordinator.next_round.remote(t))
        if info["rows"] == 0:
            return None
        ft = self.cfg.finetune
        steps = steps_for(info["rows"], ft.epochs, ft.batch_size)
        plan = micro_batches(
            info["rows"],
            steps,
            self.plan.accumulation,
            self.cfg.micro_batch,
            self.world,
            self.rank,
            seed=self.cfg.seed * 100_003 + t,
        )
        mine = np.unique(np.concatenate(plan))
        table = pq.read_table(info["path"], filesystem=self.ws.fs).take(pa.array(mine))
        examples = _examples(table)
        where = {int(row): i for i, row in enumerate(mine)}
        losses = []
        for rows in plan:
            batch = [examples[where[int(r)]] for r in rows]
            losses.append(
                train_step(
                    self.stepper, collate_for(self.engine, self.tokenizer, batch, self.max_length)
                )
            )
        train_seconds = time.perf_counter() - start
        score = self.score(t)
        return {
            "round": t,
            "rows": info["rows"],
            "steps": steps,
            "train_loss": float(np.mean(losses)),
            "score": score,
            "spent": info["spent"],
            "budget": info["budget"],
            "started_at_round": self.started_at,  # > 0: this process resumed a checkpoint
            "train_seconds": round(train_seconds, 2),
            "seconds": round(time.perf_counter() - start, 2),
        }

    def score(self, t: int) -> float:
        """Score this worker's share of round t's evaluation rows; rank 0 reports the
        per-cluster means to the coordinator. Returns the mean score over all rows."""
        import torch.distributed as dist

        ids = ray.get(self.coordinator.eval_ids.remote(t))[self.rank :: self.world]
        pairs: list[tuple[int, float]] = []
        if ids:
            # The round files so far, named: never a file the coordinator is writing.
            files = [round_file(self.plan.run_dir, r) for r in range(max(t, 0) + 1)]
            dataset = pads.dataset(files, filesystem=self.ws.fs, format="parquet")
            examples = _examples(dataset.to_table(filter=pc.field("id").isin(ids)))
            if self.cfg.selection.metric == "loss":
                values = sample_losses(
                    self.engine,
                    self.tokenizer,
                    examples,
                    max_length=self.max_length,
                    batch_size=self.cfg.eval_batch,
                )
            else:
                values, _ = answer_correct(
                    self.engine,
                    self.tokenizer,
                    examples,
                    max_length=self.max_length,
                    batch_size=self.cfg.eval_batch,
                    max_new_tokens=self.cfg.max_new_tokens,
                )
            pairs = [(ex["cluster"], float(v)) for ex, v in zip(examples, values, strict=True)]
        gathered: list[list[tuple[int, float]]] = [None] * self.world  # type: ignore[list-item]
        dist.all_gather_object(gathered, pairs)
        everything = [p for part in gathered for p in part if np.isfinite(p[1])]
        if self.rank == 0:
            k = self.plan.k
            clusters = np.array([c for c, _ in everything], np.int64)
            values = np.array([v for _, v in everything], np.float64)
            evaluated = np.bincount(clusters, minlength=k)
            sums = np.bincount(clusters, weights=values, minlength=k)
            scores = np.where(evaluated > 0, sums / np.maximum(evaluated, 1), np.nan)
            ray.get(self.coordinator.report.remote(t, scores.tolist(), evaluated.tolist()))
        return float(np.mean([v for _, v in everything])) if everything else float("nan")

    def tell(self, m: dict) -> None:
        """Rank 0's line per round to the driver's terminal (its ``progress`` queue)."""
        if self.rank != 0:
            return
        line = (
            f"round {m['round']}: {m['rows']} rows, {m['steps']} steps, loss "
            f"{m['train_loss']:.4f}, score {m['score']:.4f}; {m['spent']}/{m['budget']} spent "
            f"({m['seconds']} s)"
        )
        tell(self.progress, line)

    def checkpoint(self, metrics: dict) -> None:
        """Save the engine (every rank its shard) and report it with ``metrics``."""
        with tempfile.TemporaryDirectory() as tmp:
            self.engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG)
            if self.rank == 0:
                with open(os.path.join(tmp, ROUND_META), "w") as f:
                    json.dump({"round": metrics["round"]}, f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def save_adapter(self) -> None:
        """Write the LoRA adapter (and the projector) to ``<run>/adapter`` (rank 0)."""
        import deepspeed

        module = self.engine.module
        params = list(module.parameters())
        gather = self.cfg.zero_stage == 3
        with deepspeed.zero.GatheredParameters(params, enabled=gather):
            if self.rank == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    module.save_pretrained(tmp)
                    target = f"{self.plan.run_dir}/adapter"
                    self.ws.discard(target)
                    for name in os.listdir(tmp):
                        with open(os.path.join(tmp, name), "rb") as f:
                            self.ws.write_bytes(f"{target}/{name}", f.read())


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point on each worker: rounds until the budget is spent."""
    trainer = RoundTrainer(config)
    t = trainer.resume_round()
    while True:
        metrics = trainer.train_round(t)
        if metrics is None:
            break
        trainer.checkpoint(metrics)
        trainer.tell(metrics)
        t += 1
    trainer.save_adapter()
