"""The configuration of ``vlselect progress``: one model, built once in the driver and
received whole by the coordinator (its ``selection`` rule) and by every Ray Train worker."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.commit import operational
from engine.coordinator import SelectionRule
from engine.llava.cache import DEFAULT_NAME
from engine.llava.config import FinetuneConfig, LoraConfig
from engine.resources import Resources


class TrainPlan(BaseModel):
    """What the driver resolved for the Ray Train workers, beside the config itself."""

    model_config = ConfigDict(extra="forbid")

    workspace: str = Field(description="The workspace URI, as every worker opens it.")
    run_dir: str = Field(description="The run's attempt folder (rounds, adapter, checkpoints).")
    coordinator: str = Field(description="The coordinator actor's name.")
    k: int = Field(description="Clusters of the progress clustering (its committed meta).")
    accumulation: int = Field(description="Gradient accumulation steps per optimiser step.")
    total_steps: int = Field(description="Optimiser steps over the whole budget.")


def paper_recipe() -> FinetuneConfig:
    """LLaVA-1.5's LoRA recipe, as PROGRESS trains it (lr 2e-4, projector 2e-5, r=128)."""
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
    selection: SelectionRule = Field(
        default_factory=SelectionRule,
        description="How each round picks: the coordinator draws by it, the trainer scores by "
        "its metric (both receive this one model).",
    )
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
