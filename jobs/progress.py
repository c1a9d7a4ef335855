"""``vlselect progress``: PROGRESS, a LoRA fine-tune that selects its own data online.

What it does:
    1. checks in the driver that the model is a LLaVA checkpoint with its processor (a
       Hugging Face folder or URI, or a base committed by ``vlselect base``), plans the
       GPU memory per worker (``--plan`` prints the plan and stops) and refuses a plan
       that does not fit, naming the knob to turn; checks that the pool and the
       embeddings exist; clusters the pool if the ``progress`` (K = pool/50 in 10..1000)
       or ``warmup`` (K = pool/10 in 10..5000) clustering is missing (PROGRESS's K=1000
       and K=5000 at 665K rows, scaled to the pool); resolves budget, warm-up and round
       sizes (fractions of the pool or counts) and refuses a run directory of another
       config unless ``--overwrite``;
    2. with ``selection.within: uncertainty``, orders every progress cluster's rows by
       greedy MMD prototypes (the warm-up's Ray Data pipeline on the progress
       clustering; ``<run>/diversity``); starts the coordinator (a named Ray actor,
       ``actors.coordinator``), which owns the budget ledger and reveals each selected
       row's answer once;
    3. selects the warm-up set with COINCIDE's selector over the warm-up clustering
       (Ray Data: per-shard features -> groupby cluster -> density and prototype order)
       and records it as round 0, unless the coordinator already has it (a resumed run);
    4. runs a Ray Train ``TorchTrainer`` (``actors.trainer``): DeepSpeed ZeRO-2 (or 3)
       in bf16/fp16/fp32 over PEFT LoRA on transformers' LLaVA, the projector trained
       fully with its own lr, one cosine schedule over the whole budget; round by round
       it trains on the coordinator's selection (drawn, with ``within: uncertainty``,
       by the model's uncertainty on candidates it answers from image and question
       alone: engine.within) (whole conversations, the loss on the
       assistant's tokens), scores each cluster's fixed probe set (up to 100 rows
       selected in earlier rounds, never the round just trained on: engine.probes) by
       the loss over every assistant turn, or the first turn's greedy answer judged by
       normalized match, reports them and checkpoints the trainable weights (``checkpoints_to_keep``
       kept); failed workers restart from the last checkpoint (``max_failures``), and a
       new job of the same name resumes from it;
    5. writes ``selected.json`` (LLaVA format), ``ids.txt``, plots (Δk per cluster over
       rounds, picks per cluster, the budget curve), commits the run (engine.artifacts.ProgressRun)
       and prints a summary.

Output ``<ws>/progress/<name>/``: ``rounds/round-NNNN.parquet`` (the revealed rows),
``rounds.jsonl``, ``coordinator/state.npz``, ``train/`` (Ray Train's checkpoints),
``adapter/`` (the LoRA adapter and projector), ``selected.json``, ``ids.txt``,
``plots/*.png``, in the run's attempt (an interrupted run resumes it).

Raises:
    InputError: a model that is not a LLaVA checkpoint with its processor (or no such
        workspace base), a memory plan above the worker's GPU, no pool, no embeddings
        for the clustering spaces, a budget
        of zero or above the pool, a warm-up above the budget, a global batch that the
        workers and micro-batch do not divide, or a run of another config (exit 2).
    RuntimeError: training failed beyond ``max_failures`` (exit 1; rerun to resume).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any

import ray

from actors.adapter import train_worker_resources
from actors.coordinator import get_coordinator, start_coordinator
from actors.trainer import train_loop_per_worker
from engine.artifacts import Clustering, Pool, ProgressMeta, ProgressRun, Ref
from engine.config import build_config
from engine.errors import InputError
from engine.llava.cache import BASE_NAME, ModelSource, model_source
from engine.llava.finetune import steps_for
from engine.llava.memory import MemoryPlan, format_plan, gpu_memory_of, plan_memory
from engine.progress import round_rows, rows_of
from engine.progress_config import ProgressConfig, TrainPlan
from engine.progress_report import write_outputs
from engine.resources import Resources
from engine.selection_rule import ProgressSettings
from engine.within import DIVERSITY_FOLDER, DIVERSITY_MARKER
from engine.workspace import Workspace
from jobs import cluster
from jobs.progress_warmup import select_warmup_ids, write_diversity
from jobs.runtime import Timer, WorkerProgress, connect, print_summary

STAGE = "progress"
DEFAULT_WORKSPACE = None
log = logging.getLogger("vlselect.progress")


CONFIG = ProgressConfig
FLAGS = {"workers": "num_workers", "metric": "selection.metric"}


def reads(cfg: ProgressConfig) -> list[Ref]:
    # the clusterings are made here when missing, from the spaces' vectors; a model named
    # by a folder or URI is outside the workspace
    model = [Ref("model", cfg.model)] if BASE_NAME.match(cfg.model) else []
    return [Ref("pool"), *model, *(Ref("embeddings", s) for s in cfg.spaces)]


def writes(cfg: ProgressConfig) -> list[Ref]:
    return [Ref("progress", cfg.name), Ref("clustering", cfg.clusters),
            Ref("clustering", cfg.warmup_clusters)]  # fmt: skip


def resources(cfg: ProgressConfig) -> dict[str, Resources]:
    return {f"Ray Train worker x{cfg.num_workers}": cfg.worker, "coordinator": cfg.coordinator}


# -- the driver -------------------------------------------------------------------------


def check_inputs(cfg: ProgressConfig, ws: Workspace) -> dict[str, Any]:
    """Everything the run needs, checked before Ray starts; the resolved sizes."""
    if not cfg.name:
        raise InputError("no run name: pass --name NAME (output: <ws>/progress/NAME/)")
    pool = Pool.open(ws)
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


def plan_for(cfg: ProgressConfig, source: ModelSource) -> MemoryPlan:
    """The memory plan of this run's workers (a GPU run in 'auto' precision is planned
    in bf16, what the GPUs it runs on have)."""
    from transformers import LlavaConfig

    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if cfg.use_gpu else "fp32"
    gpu = cfg.gpu_memory_gib
    if gpu is None and cfg.use_gpu:
        gpu = gpu_memory_of(cfg.worker.accelerator_type)
    return plan_memory(
        LlavaConfig.from_dict(source.config),
        cfg.finetune,
        zero_stage=cfg.zero_stage,
        micro_batch=cfg.micro_batch,
        seq_len=cfg.max_length or source.max_length,
        workers=cfg.num_workers,
        precision=precision,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gpu_memory_gib=gpu,
    )


def check_memory(cfg: ProgressConfig, source: ModelSource) -> MemoryPlan:
    """The plan, printed with ``--plan``; a GPU plan that does not fit is refused."""
    plan = plan_for(cfg, source)
    if cfg.plan:
        print(format_plan(plan))
    elif cfg.use_gpu and plan.fits is False:
        raise InputError(
            f"the memory plan needs {plan.total_gib:.1f} GiB per GPU, more than the "
            f"workers' {plan.gpu_memory_gib:.0f} GiB. Turn one of these knobs: "
            + "; ".join(plan.advice or ["a larger GPU"])
            + " (`vlselect progress ... --plan` prints the whole plan)"
        )
    return plan


def main(cfg: ProgressConfig, ws: Workspace) -> dict:
    """Run PROGRESS on ``ws``; see the module docstring. Returns the summary."""
    timer = Timer()
    # the plan needs the config alone: a run too big for its GPUs is told so first
    memory = check_memory(cfg, model_source(ws, cfg.model, weights=False))
    if cfg.plan:
        return {"plan": memory.model_dump()}
    source = model_source(ws, cfg.model)
    sizes = check_inputs(cfg, ws)
    connect()
    clusters = ensure_clustering(cfg, ws, cfg.clusters, (50, 10, 1000))
    warm = ensure_clustering(cfg, ws, cfg.warmup_clusters, (10, 10, 5000))
    pool = Pool.open(ws)
    # Rows the clustering left out (bad vectors) are not selectable: sizes from its count.
    sizes.update(resolve_sizes(cfg, clusters.meta.rows_assigned))
    budget, warmup, round_size = sizes["budget"], sizes["warmup"], sizes["round_size"]
    inputs = {"clusters": clusters.fingerprint, "warmup clusters": warm.fingerprint,
              "model": source.fingerprint, "pool": pool.fingerprint}  # fmt: skip
    committed = ProgressRun.find(ws, cfg.name)
    actor_name = f"vlselect-progress-{cfg.name}"
    if cfg.overwrite:
        _stop_actor(actor_name)
    plan = ProgressRun.begin(
        ws,
        cfg.name,
        inputs=inputs,
        config=cfg,
        overwrite=cfg.overwrite,
        refuse_change=f"{ProgressRun.folder(ws, cfg.name)} holds a run of another config or "
        "inputs: pass --overwrite to replace it or choose another --name",
    )
    if plan.action == "current":
        _print(committed.meta.summary, committed.dir)
        return committed.meta.summary
    attempt = plan.attempt
    run_dir = attempt.dir
    settings = ProgressSettings(
        budget=budget,
        round_size=round_size,
        seed=cfg.seed,
        rule=cfg.selection,
    )
    if cfg.selection.within == "uncertainty":
        folder = f"{run_dir}/{DIVERSITY_FOLDER}"
        if not ws.exists(f"{folder}/{DIVERSITY_MARKER}"):
            write_diversity(cfg, ws, clusters, folder)
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
    total_steps = sum(steps_for(n, cfg.finetune.epochs, cfg.finetune.batch_size) for n in plan_rows)
    plan = TrainPlan(workspace=ws.uri, run_dir=run_dir, coordinator=actor_name,
                     k=clusters.meta.k, accumulation=sizes["accumulation"],
                     total_steps=total_steps, model_uri=source.uri,
                     max_length=cfg.max_length or source.max_length,
                     planned_gib=memory.total_gib if cfg.use_gpu else None)  # fmt: skip
    result = _train(cfg, plan)
    train_rounds = ray.get(coordinator.training_rounds.remote())
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


def _train(cfg: ProgressConfig, plan: TrainPlan) -> dict:
    """Fit the TorchTrainer; the last round's metrics (every round's are the
    coordinator's, so a resumed run lists its earlier rounds too)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ws = Workspace.open(plan.workspace)
    resources = train_worker_resources(cfg.worker, cfg.use_gpu)
    env = {} if cfg.use_gpu else {"DS_ACCELERATOR": "cpu"}
    with WorkerProgress(STAGE) as progress:  # a line per round on this terminal
        trainer = TorchTrainer(
            train_loop_per_worker,
            # the config whole, and what the driver resolved: never copied field by field
            train_loop_config={
                "config": cfg.model_dump(mode="json"),
                "plan": plan.model_dump(),
                "progress": progress.queue,
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.num_workers,
                use_gpu=cfg.use_gpu,
                resources_per_worker=resources,
                accelerator_type=cfg.worker.accelerator_type,
            ),
            torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
            run_config=RunConfig(
                name="train",
                storage_path=plan.run_dir,
                storage_filesystem=ws.fs,
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep),
                worker_runtime_env={"env_vars": env},
            ),
        )
        result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(
            f"training failed: {result.error}; run again to resume"
        ) from result.error
    return dict(result.metrics or {})


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
