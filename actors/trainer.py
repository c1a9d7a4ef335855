"""The PROGRESS training loop that runs on every Ray Train worker.

Each worker loads the run's LLaVA checkpoint (a Hugging Face folder or the workspace's
base, through ``engine.llava.checkpoint``) in the run's precision, turns on gradient
checkpointing when asked, wraps the LM in LoRA and the whole in a DeepSpeed engine
(ZeRO-2 or -3, bf16/fp16/fp32; gloo on CPU, NCCL on GPUs) and then, round by round,
until the coordinator has no rows left to give:

    0. with rule ``within: uncertainty``, scores the round's candidates first (rows not
       selected yet, offered by the coordinator: each rank answers its share greedily
       from the image and the question alone and reports its uncertainty; the answers
       stay unread), so that the coordinator can draw round t by them;
    1. asks the coordinator for round t's rows (idempotent: every worker may ask) and
       reads its share of the round file: a seeded permutation of the round's rows,
       the same on every worker, of which worker r takes every world-th micro-batch;
    2. trains ``ceil(epochs * rows / global_batch)`` optimiser steps through the shared
       ``engine.llava.train_step`` on whole conversations (one cosine schedule spans the
       whole budget);
    3. scores an equal share of the evaluation rows on every rank (the coordinator's
       min(n_k, 100) selected rows per cluster, short ranks topped up with repeats that
       are not counted, so that every rank runs as many forwards and, under ZeRO-3,
       generation steps in lockstep); rank 0 gathers the scores, reports them per
       cluster with the round's training figures, and every rank waits at a barrier
       until it has, so no rank asks for round t + 1 before round t is scored;
    4. saves a DeepSpeed checkpoint of the trainable weights only (adapters, projector,
       their optimizer state; the frozen base is excluded) and reports it to Ray Train,
       which keeps ``checkpoints_to_keep`` of them, restarts failed workers from the
       latest (``FailureConfig``) and hands it to a new run of the same name.

The scores go to the coordinator before the checkpoint goes to Ray Train, so a run
restarted from round t's checkpoint always finds round t's scores; a round trained
again after a crash draws the same rows (the coordinator is idempotent) and replaces
its scores.
"""

from __future__ import annotations

import json
import math
import os
import shutil
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
from engine.artifacts import Pool
from engine.coordinator import BASELINE
from engine.llava import (
    answer_correct,
    answer_uncertainty,
    collate,
    load_checkpoint,
    prepare_for_finetune,
    sample_losses,
    train_step,
)
from engine.llava.finetune import steps_for
from engine.llava.train import deepspeed_stepper, resolve_attention, resolve_precision
from engine.progress import balanced_share
from engine.progress_config import ProgressConfig, TrainPlan
from engine.shards import with_pool_columns
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


def _examples(table: pa.Table, ws: Workspace, pool: tuple[list[str], list[int]]) -> list[dict]:
    """Chat examples of round-file rows: the image and the whole conversation, which
    each worker reads for its own rows from the pool (a round file holds ids, pool rows
    and answers: the reveal reads no more)."""
    table = with_pool_columns(ws.fs, table, *pool, ["image", "conversations"])
    return table.select(["id", "image", "conversations", "cluster"]).to_pylist()


class RoundTrainer:
    """One worker's state: the DeepSpeed engine, its coordinator handle, its data."""

    def __init__(self, config: dict):
        import torch

        self.cfg = cfg = ProgressConfig.model_validate(config["config"])
        self.plan = plan = TrainPlan.model_validate(config["plan"])
        self.progress = config.get("progress")
        self.ws = Workspace.open(plan.workspace)
        shards = Pool.open(self.ws).shards
        self.pool = (shards, [pq.ParquetFile(f, filesystem=self.ws.fs).metadata.num_rows
                              for f in shards])  # fmt: skip
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.manual_seed(cfg.seed)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.coordinator = get_coordinator(plan.coordinator)
        cuda = torch.cuda.is_available() and cfg.use_gpu
        precision = resolve_precision(cfg.precision, cuda)
        if cuda:
            check_gpu_memory(plan.planned_gib)
        loaded = load_checkpoint(
            plan.model_uri,
            dtype=precision,
            attention=resolve_attention(cfg.attention, cuda, precision),
            max_length=plan.max_length,
        )
        self.processor, self.max_length = loaded.processor, loaded.max_length
        model = loaded.model
        if cfg.gradient_checkpointing:
            # non-reentrant: works with frozen inputs (LoRA) and needs no input grads
            model.gradient_checkpointing_enable({"use_reentrant": False})
        model.config.text_config.use_cache = False  # training forwards keep no KV cache
        ft = cfg.finetune
        model = prepare_for_finetune(model, ft)
        if cuda:
            model = model.to(f"cuda:{torch.cuda.current_device()}")
        self.stepper = deepspeed_stepper(
            model, ft, micro_batch=cfg.micro_batch, accumulation=plan.accumulation,
            zero_stage=cfg.zero_stage, precision=precision, total_steps=plan.total_steps,
        )  # fmt: skip
        self.engine = self.stepper.model

    # -- rounds ----------------------------------------------------------------------------

    def resume_round(self) -> int:
        """The first round to train: after the checkpoint's, or 0 (baseline scored first)."""
        checkpoint = ray.train.get_checkpoint()
        self.started_at = 0
        if checkpoint is None:
            if BASELINE not in ray.get(self.coordinator.status.remote())["scored_rounds"]:
                self.score(BASELINE, None)
            return 0
        with checkpoint.as_directory() as path:
            # the checkpoint holds the trainable weights only: the base comes from the model
            self.engine.load_checkpoint(path, tag=CHECKPOINT_TAG, load_module_strict=False)
            with open(os.path.join(path, ROUND_META)) as f:
                done = json.load(f)["round"]
        self.started_at = done + 1
        return done + 1

    def train_round(self, t: int) -> dict | None:
        """Train on round ``t``'s rows and score; None once the budget is spent."""
        start = time.perf_counter()
        uncertainty = self.score_candidates(t) if self.cfg.selection.within != "uniform" else None
        info = ray.get(self.coordinator.next_round.remote(t, uncertainty))
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
        examples = _examples(table, self.ws, self.pool)
        where = {int(row): i for i, row in enumerate(mine)}
        losses = []
        for rows in plan:
            batch = [examples[where[int(r)]] for r in rows]
            batch = collate(batch, self.processor, max_length=self.max_length)
            losses.append(train_step(self.stepper, batch))
        training = {
            "round": t,
            "rows": info["rows"],
            "steps": steps,
            "train_loss": float(np.mean(losses)),
            "train_seconds": round(time.perf_counter() - start, 2),
            "started_at_round": self.started_at,  # > 0: this process resumed a checkpoint
        }
        score = self.score(t, training)
        return {
            **training,
            "score": score,
            "spent": info["spent"],
            "budget": info["budget"],
            "seconds": round(time.perf_counter() - start, 2),
        }

    def score(self, t: int, training: dict | None) -> float:
        """Score this worker's equal share of round t's probe rows; rank 0 reports every
        row's value, in the coordinator's order (and ``training``, the round's figures,
        its loss averaged over the ranks), and every rank waits until it has. Returns
        the mean score over all rows."""
        import torch.distributed as dist

        every = ray.get(self.coordinator.eval_ids.remote(t))
        ids, real = balanced_share(every, self.rank, self.world)
        mine = np.full(real, np.nan)
        if ids:  # every rank has ids, or none has: the forwards stay in lockstep
            # The round files so far, named: never a file the coordinator is writing.
            files = [round_file(self.plan.run_dir, r) for r in range(max(t, 0) + 1)]
            dataset = pads.dataset(files, filesystem=self.ws.fs, format="parquet")
            wanted = dataset.to_table(filter=pc.field("id").isin(sorted(set(ids))))
            found = _examples(wanted, self.ws, self.pool)
            by_id = {ex["id"]: ex for ex in found}
            mine = np.asarray(self._values([by_id[i] for i in ids]), np.float64)[:real]
        loss = training["train_loss"] if training else float("nan")
        values, losses = self._gather_shares(mine, len(every), loss)
        if self.rank == 0:
            if training is not None:
                training = {**training, "train_loss": float(np.mean(losses))}
            ray.get(self.coordinator.report.remote(t, values.tolist(), training))
        dist.barrier()  # round t is reported before any rank asks for round t + 1
        finite = values[np.isfinite(values)]
        return float(finite.mean()) if finite.size else float("nan")

    def score_candidates(self, t: int) -> list[float] | None:
        """Every rank's share of round t's candidates answered greedily from the image
        and the first question alone (the answer is not read), gathered: the model's
        uncertainty on each, in the coordinator's order; None when there are none (the
        round is drawn already, or the budget is spent). Every rank returns the same."""

        offered = ray.get(self.coordinator.candidates.remote(t))
        if not offered["ids"]:
            return None
        rows = list(zip(offered["ids"], offered["pool_rows"], strict=True))
        mine, real = balanced_share(rows, self.rank, self.world)
        table = pa.table({"id": [i for i, _ in mine],
                          "pool_row": pa.array([r for _, r in mine], pa.int64())})  # fmt: skip
        # the pool's question column: its first human turn; the answer stays unread
        questions = with_pool_columns(self.ws.fs, table, *self.pool, ["image", "question"])
        questions = questions.select(["id", "image", "question"]).to_pylist()
        values = answer_uncertainty(
            self.engine,
            self.processor,
            questions,
            max_length=self.max_length,
            batch_size=self.cfg.eval_batch,
            max_new_tokens=self.cfg.max_new_tokens,
            synced=self.cfg.zero_stage == 3 and self.world > 1,
        )[:real]
        return self._gather_shares(values, len(rows))[0].tolist()

    def _gather_shares(self, mine: np.ndarray, n: int, extra=None) -> tuple[np.ndarray, list]:
        """Every rank's ``balanced_share`` of n rows put back in order: (float64 (n,), each
        rank's ``extra``). A collective: every rank calls it."""
        import torch.distributed as dist

        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, (mine, extra))
        values = np.full(n, np.nan)
        for rank, (part, _) in enumerate(gathered):
            values[rank :: self.world] = part  # balanced_share's every world-th row
        return values, [e for _, e in gathered]

    def _values(self, examples: list[dict]) -> np.ndarray:
        """Per-example scores by the run's metric: the loss over every assistant turn, or
        whether the first turn's greedy answer matches."""
        if self.cfg.selection.metric == "loss":
            return sample_losses(
                self.engine,
                self.processor,
                examples,
                max_length=self.max_length,
                batch_size=self.cfg.eval_batch,
            )
        values, _ = answer_correct(
            self.engine,
            self.processor,
            examples,
            max_length=self.max_length,
            batch_size=self.cfg.eval_batch,
            max_new_tokens=self.cfg.max_new_tokens,
            synced=self.cfg.zero_stage == 3 and self.world > 1,
        )
        return values

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
        """Save the trainable weights and their optimizer state (every rank its shard)
        and report them to Ray Train with ``metrics``. The local folder is one per run
        and rank, emptied first: a killed worker's leftovers are replaced, not piled up."""
        folder = os.path.join(
            tempfile.gettempdir(),
            f"vlselect-ckpt-{os.path.basename(self.plan.run_dir)}-{self.rank}",
        )
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        self.engine.save_checkpoint(folder, tag=CHECKPOINT_TAG, exclude_frozen_parameters=True)
        if self.rank == 0:
            with open(os.path.join(folder, ROUND_META), "w") as f:
                json.dump({"round": metrics["round"]}, f)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            delete_local_checkpoint_after_upload=True,
        )

    def save_adapter(self) -> None:
        """Write the LoRA adapter (and the projector) to ``<run>/adapter`` (rank 0),
        gathering only the trainable weights under ZeRO-3."""
        import deepspeed

        module = self.engine.module
        trainable = [p for p in module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, enabled=self.cfg.zero_stage == 3):
            if self.rank == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    module.save_pretrained(tmp)
                    target = f"{self.plan.run_dir}/adapter"
                    self.ws.discard(target)
                    for name in os.listdir(tmp):
                        with open(os.path.join(tmp, name), "rb") as f:
                            self.ws.write_bytes(f"{target}/{name}", f.read())


def check_gpu_memory(planned_gib: float | None) -> None:
    """Refuse, before the model loads, a GPU worker that sees no GPU or a plan larger
    than its GPU (``planned_gib`` is None for a CPU run)."""
    import os

    import torch

    if planned_gib is None:
        return
    if not torch.cuda.is_available():
        raise RuntimeError(
            "use_gpu is set but this worker sees no CUDA device (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch {torch.__version__}): "
            "check the node's driver, or pass --no-use-gpu"
        )
    have = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    if planned_gib > have:
        raise RuntimeError(
            f"the memory plan needs {planned_gib:.1f} GiB per GPU but this worker's GPU has "
            f"{have:.1f} GiB: run `vlselect progress ... --plan` for the knobs that fit"
        )


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
