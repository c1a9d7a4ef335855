"""``vlselect progress``: PROGRESS, a LoRA fine-tune that selects its own data online.

What it does:
    1. checks in the driver that the pool, the cached base (``vlselect base``) and the
       embeddings exist; clusters the pool if the ``progress`` (K = pool/50 in 10..1000)
       or ``warmup`` (K = pool/10 in 10..5000) clustering is missing (PROGRESS's K=1000
       and K=5000 at 665K rows, scaled to the pool); resolves budget, warm-up and round
       sizes (fractions of the pool or counts) and refuses a run directory of another
       config unless ``--overwrite``;
    2. starts the coordinator (a named Ray actor, ``actors.coordinator``), which owns the
       budget ledger and reveals each selected row's answer once;
    3. selects the warm-up set with COINCIDE's selector over the warm-up clustering
       (Ray Data: per-shard features -> groupby cluster -> density and prototype order)
       and records it as round 0, unless the coordinator already has it (a resumed run);
    4. runs a Ray Train ``TorchTrainer`` (``actors.trainer``): DeepSpeed ZeRO-2 (or 3)
       over PEFT LoRA on transformers' LLaVA, the projector trained fully with its own
       lr, one cosine schedule over the whole budget; round by round it trains on the
       coordinator's selection, checkpoints, scores min(n_k, 100) selected rows per
       cluster (loss, or greedy answers judged by normalized match) and reports them;
       failed workers restart from the last checkpoint (``max_failures``), and a new job
       of the same name resumes from it;
    5. writes ``selected.json`` (LLaVA format), ``ids.txt``, plots (Δk per cluster over
       rounds, picks per cluster, the budget curve), ``meta.json``, and prints a summary.

Output ``<ws>/progress/<name>/``: ``rounds/round-NNNN.parquet`` (the revealed rows),
``rounds.jsonl``, ``coordinator/state.npz``, ``train/`` (Ray Train's checkpoints),
``adapter/`` (the LoRA adapter and projector), ``selected.json``, ``ids.txt``,
``plots/*.png``, ``meta.json``.

Raises:
    InputError: no pool, no base, no embeddings for the clustering spaces, a budget
        of zero or above the pool, a warm-up above the budget, a global batch that the
        workers and micro-batch do not divide, or a run of another config (exit 2).
    RuntimeError: training failed beyond ``max_failures`` (exit 1; rerun to resume).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Any, Literal

import ray
from pydantic import BaseModel, ConfigDict, Field

from actors.coordinator import get_coordinator, start_coordinator
from actors.trainer import round_steps, train_loop_per_worker
from engine.artifacts import BaseModelArtifact, Clustering, Pool, ProgressMeta, ProgressRun
from engine.commit import operational
from engine.config import build_config
from engine.coordinator import ProgressSettings
from engine.errors import InputError
from engine.llava import DEFAULT_NAME, FinetuneConfig, LoraConfig
from engine.progress import round_rows, rows_of
from engine.progress_report import write_outputs
from engine.resources import Resources
from engine.workspace import Workspace
from jobs import cluster
from jobs.progress_warmup import select_warmup_ids
from jobs.runtime import Timer, WorkerProgress, connect, print_summary

STAGE = "progress"
DEFAULT_WORKSPACE = None
log = logging.getLogger("vlselect.progress")


def paper_recipe() -> FinetuneConfig:
    """LLaVA-1.5's LoRA recipe, as PROGRESS trains it (DESIGN.md)."""
    return FinetuneConfig(
        lora=LoraConfig(r=128, alpha=256),
        lr=2e-4,
        projector_lr=2e-5,
        epochs=1,
        batch_size=128,
        warmup=0.03,
    )


class ProgressConfig(BaseModel):
    """Configuration of ``vlselect progress`` (section ``progress``)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = operational(None, description="Run name: <ws>/progress/<name>/.")
    budget: float = Field(
        0.2, gt=0, description="Rows to reveal, warm-up included: a fraction (<= 1) or a count."
    )
    warmup: float = Field(
        0.09, gt=0, description="Warm-up rows (COINCIDE's selector): a fraction or a count."
    )
    round_size: float = Field(
        0.0113,
        gt=0,
        description="Rows per selection round: a fraction or a count (paper 7.5K of 665K).",
    )
    metric: Literal["accuracy", "loss"] = Field(
        "accuracy", description="Cluster score: greedy-answer accuracy, or mean per-token loss."
    )
    temperature: float = Field(1.0, gt=0, description="τ of softmax(Δk / τ) (paper 1.0).")
    explore: float = Field(0.1, ge=0, le=1, description="δ: uniform exploration share.")
    gap: int = Field(1, ge=1, description="γ: Δk compares scores this many rounds apart.")
    eval_per_cluster: int = Field(100, ge=1, description="Rows scored per cluster: min(n_k, this).")
    max_new_tokens: int = Field(25, ge=1, description="Longest greedy answer when scoring.")
    clusters: str = Field("progress", description="Clustering that tracks progress.")
    warmup_clusters: str = Field("warmup", description="Clustering the warm-up selects over.")
    spaces: list[str] = Field(
        default_factory=lambda: ["dino", "text"],
        description="Spaces of both clusterings and of the warm-up's features.",
    )
    warmup_temperature: float = Field(0.1, gt=0, description="COINCIDE's softmax temperature.")
    warmup_sigma: float = Field(1.0, gt=0, description="σ of the Gaussian kernel.")
    max_kernel_rows: int = Field(
        2048, ge=2, description="Largest cluster kernel (a seeded subsample beyond)."
    )
    base: str = Field(DEFAULT_NAME, description="Cached base to start from (<ws>/models/<base>).")
    finetune: FinetuneConfig = Field(
        default_factory=paper_recipe,
        description="LoRA and optimiser recipe; batch_size is the global batch, epochs "
        "the passes over each round's rows.",
    )
    num_workers: int = operational(2, ge=1, description="Ray Train workers.")
    use_gpu: bool = operational(False, description="One GPU per worker, NCCL (else CPU and gloo).")
    worker: Resources = operational(
        default_factory=lambda: Resources(num_cpus=1), description="Resources of one worker."
    )
    micro_batch: int = Field(16, ge=1, description="Samples per worker per forward pass.")
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage (2 saves LoRA safely).")
    torch_threads: int = operational(1, ge=0, description="torch threads per worker (0: torch's).")
    eval_batch: int = operational(64, ge=1, description="Samples per scoring batch.")
    max_failures: int = operational(3, ge=-1, description="Worker failures survived (-1: any).")
    coordinator: Resources = operational(
        default_factory=lambda: Resources(num_cpus=0, max_retries=-1),
        description="The coordinator actor (restarted by Ray when it dies).",
    )
    detached: bool = operational(False, description="Keep the coordinator alive after the driver.")
    seed: int = Field(0, ge=0, description="Seed of the warm-up, every round and the training.")
    overwrite: bool = operational(False, description="Replace a run of this name.")


CONFIG = ProgressConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", help="run name: <ws>/progress/<name>/")
    parser.add_argument("--budget", type=float, help="a fraction of the pool (0.2) or a count")
    parser.add_argument("--metric", choices=["accuracy", "loss"])
    parser.add_argument("--workers", dest="num_workers", type=int, help="Ray Train workers")
    parser.add_argument("--overwrite", action="store_true", default=None)


def overrides_from_args(args: argparse.Namespace) -> dict:
    keys = ("name", "budget", "metric", "num_workers", "overwrite")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


# -- the driver -------------------------------------------------------------------------


def check_inputs(cfg: ProgressConfig, ws: Workspace) -> dict[str, Any]:
    """Everything the run needs, checked before Ray starts; the resolved sizes."""
    if not cfg.name:
        raise InputError("no run name: pass --name NAME (output: <ws>/progress/NAME/)")
    pool = Pool.open(ws)
    BaseModelArtifact.open(ws, cfg.base)
    accumulation, left = divmod(cfg.finetune.batch_size, cfg.micro_batch * cfg.num_workers)
    if left or accumulation < 1:
        raise InputError(
            f"global batch {cfg.finetune.batch_size} is not a multiple of micro_batch "
            f"{cfg.micro_batch} x {cfg.num_workers} workers: change one of them"
        )
    return {"accumulation": accumulation, **resolve_sizes(cfg, pool.rows)}


def resolve_sizes(cfg: ProgressConfig, pool: int) -> dict[str, int]:
    """Budget, warm-up and round size in rows for a pool of ``pool`` rows."""
    budget = rows_of(cfg.budget, pool, "budget")
    if budget > pool:
        raise InputError(
            f"budget {budget} exceeds the clustered pool of {pool} rows: lower --budget"
        )
    warmup = rows_of(cfg.warmup, pool, "warm-up")
    if warmup > budget:
        raise InputError(
            f"warm-up {warmup} rows exceeds the budget of {budget}: lower --set warmup"
        )
    return {
        "pool": pool,
        "budget": budget,
        "warmup": warmup,
        "round_size": rows_of(cfg.round_size, pool, "round size"),
    }


def ensure_clustering(
    cfg: ProgressConfig, ws: Workspace, name: str, k_rule: tuple[int, int, int]
) -> Clustering:
    """The clustering ``name``, clustering the pool first when it is missing."""
    found = Clustering.find(ws, name)
    if found is not None:
        return found
    per_cluster, low, high = k_rule
    k = min(high, max(low, Pool.open(ws).rows // per_cluster))
    log.info("clustering %s missing: running vlselect cluster --name %s --k %d", name, name, k)
    sections = ws.read_config()
    cluster_cfg = build_config(
        cluster.STAGE,
        cluster.CONFIG,
        sections,
        {"cluster": {"name": name, "spaces": cfg.spaces, "k": k, "seed": cfg.seed}},
    )
    cluster.main(cluster_cfg, ws)
    return Clustering.open(ws, name)


def main(cfg: ProgressConfig, ws: Workspace) -> dict:
    """Run PROGRESS on ``ws``; see the module docstring. Returns the summary."""
    timer = Timer()
    sizes = check_inputs(cfg, ws)
    connect()
    clusters = ensure_clustering(cfg, ws, cfg.clusters, (50, 10, 1000))
    warm = ensure_clustering(cfg, ws, cfg.warmup_clusters, (10, 10, 5000))
    base = BaseModelArtifact.open(ws, cfg.base)
    pool = Pool.open(ws)
    # Rows the clustering left out (bad vectors) are not selectable: sizes from its count.
    sizes.update(resolve_sizes(cfg, clusters.meta.rows_assigned))
    budget, warmup, round_size = sizes["budget"], sizes["warmup"], sizes["round_size"]
    inputs = {"clusters": clusters.fingerprint, "warmup clusters": warm.fingerprint,
              "base": base.fingerprint, "pool": pool.fingerprint}  # fmt: skip
    committed = ProgressRun.find(ws, cfg.name)
    actor_name = f"vlselect-progress-{cfg.name}"
    if cfg.overwrite:
        _stop_actor(actor_name)
    plan = ProgressRun.begin(ws, cfg.name, inputs=inputs, config=cfg, overwrite=cfg.overwrite)
    if plan.action == "current":
        _print(committed.meta.summary, committed.dir)
        return committed.meta.summary
    if committed is not None and not cfg.overwrite:
        raise InputError(
            f"{ProgressRun.folder(ws, cfg.name)} holds a run of another config or inputs: pass "
            "--overwrite to replace it or choose another --name"
        )
    attempt = plan.attempt
    run_dir = attempt.dir
    settings = ProgressSettings(
        budget=budget,
        round_size=round_size,
        metric=cfg.metric,
        temperature=cfg.temperature,
        explore=cfg.explore,
        gap=cfg.gap,
        eval_per_cluster=cfg.eval_per_cluster,
        seed=cfg.seed,
    )
    coordinator = start_coordinator(
        ws, run_dir, clusters, pool, settings, actor_name, cfg.coordinator, detached=cfg.detached
    )
    status = ray.get(coordinator.status.remote())
    warm_seconds = 0.0
    if status["rounds"] == 0:
        warm_timer = Timer()
        ids = select_warmup_ids(cfg, ws, warmup)
        ray.get(coordinator.warmup.remote(ids))
        warm_seconds = warm_timer.seconds
    else:
        log.info(
            "resuming %s at round %d (%d of %d spent)",
            cfg.name,
            status["rounds"],
            status["spent"],
            budget,
        )
    plan_rows = round_rows(budget, warmup, round_size)
    total_steps = sum(
        round_steps(n, cfg.finetune.epochs, cfg.finetune.batch_size) for n in plan_rows
    )
    result, train_rounds = _train(
        cfg, ws, run_dir, actor_name, clusters.meta.k, sizes["accumulation"], total_steps
    )
    status = ray.get(coordinator.status.remote())
    outputs = write_outputs(ws, run_dir, ray.get(coordinator.rounds_jsonl.remote()))
    summary = {
        "name": cfg.name,
        "pool": sizes["pool"],
        "budget": budget,
        "spent": status["spent"],
        "revealed": status["revealed"],
        "rounds": status["rounds"],
        "round_rows": plan_rows,
        "k": clusters.meta.k,
        "warmup_k": warm.meta.k,
        "total_steps": total_steps,
        "warmup_seconds": round(warm_seconds, 2),
        "final_metrics": result,
        "train_rounds": train_rounds,
        "seconds": round(timer.seconds, 2),
        "outputs": outputs,
    }
    meta = ProgressMeta(
        name=cfg.name,
        pool=sizes["pool"],
        budget=budget,
        spent=status["spent"],
        rounds=status["rounds"],
        k=clusters.meta.k,
        summary=summary,
        config=cfg.model_dump(mode="json"),
    )
    attempt.commit(meta)
    if not cfg.detached:
        _stop_actor(actor_name)
    _print(summary, run_dir)
    return summary


def _train(cfg, ws, run_dir, actor_name, k, accumulation, total_steps):
    """Fit the TorchTrainer; the last round's metrics and every round's (from the
    checkpoints Ray Train keeps: all of them, so a resumed run lists its earlier rounds)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cfg.worker.num_cpus, **cfg.worker.custom}
    if cfg.use_gpu:
        resources["GPU"] = max(1.0, cfg.worker.num_gpus)
    if cfg.worker.memory_gb:
        resources["memory"] = int(cfg.worker.memory_gb * 1024**3)
    env = {} if cfg.use_gpu else {"DS_ACCELERATOR": "cpu"}
    with WorkerProgress(STAGE) as progress:  # a line per round on this terminal
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "workspace": ws.uri,
                "run_dir": run_dir,
                "coordinator": actor_name,
                "base": cfg.base,
                "finetune": cfg.finetune.model_dump(mode="json"),
                "seed": cfg.seed,
                "metric": cfg.metric,
                "k": k,
                "epochs": cfg.finetune.epochs,
                "global_batch": cfg.finetune.batch_size,
                "micro_batch": cfg.micro_batch,
                "accumulation": accumulation,
                "zero_stage": cfg.zero_stage,
                "total_steps": total_steps,
                "torch_threads": cfg.torch_threads,
                "eval_batch": cfg.eval_batch,
                "max_new_tokens": cfg.max_new_tokens,
                "use_gpu": cfg.use_gpu,
                "progress": progress.queue,
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
            ),
            torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
            run_config=RunConfig(
                name="train",
                storage_path=run_dir,
                storage_filesystem=ws.fs,
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                worker_runtime_env={"env_vars": env},
            ),
        )
        result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(
            f"training failed: {result.error}; run again to resume"
        ) from result.error
    rounds = sorted((m for _, m in result.best_checkpoints or []), key=lambda m: m["round"])
    keys = ("round", "rows", "steps", "train_loss", "score", "train_seconds", "seconds")
    return dict(result.metrics or {}), [{k: m.get(k) for k in keys} for m in rounds]


def _stop_actor(name: str) -> None:
    with contextlib.suppress(ValueError):  # not running
        ray.kill(get_coordinator(name))


def _print(summary: dict, run_dir: str) -> None:
    last = summary["final_metrics"]
    rows = [
        (
            "pool",
            f"{summary['pool']} rows in {summary['k']} clusters ({summary['warmup_k']} for the warm-up)",
        ),
        (
            "budget",
            f"{summary['spent']} of {summary['budget']} spent, {summary['revealed']} answers revealed",
        ),
        (
            "rounds",
            f"{summary['rounds']} (warm-up {summary['round_rows'][0]} rows, then {summary['round_rows'][1:]})",
        ),
        (
            "training",
            f"{summary['total_steps']} steps; last round loss {last.get('train_loss', float('nan')):.4f}, score {last.get('score', float('nan')):.4f}",
        ),
        ("time", f"{summary['seconds']:.1f} s (warm-up selection {summary['warmup_seconds']} s)"),
        ("run", run_dir),
        *[(k, v) for k, v in summary["outputs"].items()],
    ]
    print_summary(
        STAGE,
        rows,
        extra={
            k: summary[k]
            for k in (
                "name",
                "pool",
                "budget",
                "spent",
                "revealed",
                "rounds",
                "seconds",
                "final_metrics",
            )
        },
    )


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main([STAGE, *sys.argv[1:]]))
