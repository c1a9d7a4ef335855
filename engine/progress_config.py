"""The configuration of ``vlselect progress``: one model, built once in the driver and
received whole by the coordinator (its ``selection`` rule) and by every Ray Train worker."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.commit import operational
from engine.llava.cache import DEFAULT_NAME
from engine.llava.config import FinetuneConfig, LoraConfig
from engine.resources import Resources
from engine.selection_rule import SelectionRule


class TrainPlan(BaseModel):
    """What the driver resolved for the Ray Train workers, beside the config itself."""

    model_config = ConfigDict(extra="forbid")

    workspace: str = Field(description="The workspace URI, as every worker opens it.")
    run_dir: str = Field(description="The run's attempt folder (rounds, adapter, checkpoints).")
    coordinator: str = Field(description="The coordinator actor's name.")
    k: int = Field(description="Clusters of the progress clustering (its committed meta).")
    accumulation: int = Field(description="Gradient accumulation steps per optimiser step.")
    total_steps: int = Field(description="Optimiser steps over the whole budget.")
    model_uri: str = Field(description="The checkpoint folder every worker loads (a URI).")
    max_length: int = Field(description="Longest tokenized conversation, resolved.")
    planned_gib: float | None = Field(
        None, description="The memory plan's total per GPU, checked by each GPU worker."
    )


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
    model: str = Field(
        DEFAULT_NAME,
        description="The LLaVA to fine-tune: a Hugging Face checkpoint folder or URI in the "
        "llava-hf layout (config.json, weights, tokenizer, image processor, chat template; "
        "e.g. a download of llava-hf/llava-1.5-7b-hf), or the name of a base committed in "
        "the workspace by `vlselect base` (<ws>/models/<name>). A bare name is a workspace "
        "base; write ./name for a folder here.",
    )
    max_length: int | None = Field(
        None,
        ge=16,
        description="Longest tokenized conversation; longer ones lose their last turns (never "
        "the image's tokens). None: the workspace base's, or for a checkpoint its "
        "tokenizer's model_max_length capped at its positions (LLaVA-1.5 trains at 2048).",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Weights and compute: bf16 (fp32 master weights in the optimizer), fp16 "
        "with dynamic loss scaling where a GPU lacks bf16, or fp32. 'auto': bf16 on GPUs "
        "that have it, fp16 on older ones, fp32 on CPU.",
    )
    gradient_checkpointing: bool = operational(
        False,
        description="Recompute each decoder layer in the backward pass instead of keeping its "
        "activations (about a third more compute, activations cut to one layer's: what lets "
        "a 7B LLaVA train at micro-batch 16 x 2048 tokens).",
    )
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = operational(
        "auto",
        description="Attention kernel: 'auto' takes flash_attention_2 on a GPU in 16 bit when "
        "flash-attn is installed, else PyTorch's SDPA.",
    )
    gpu_memory_gib: float | None = operational(
        None,
        gt=0,
        description="Memory of one worker's GPU, for the memory plan's verdict before launch; "
        "None: looked up from the worker's accelerator_type resource when it names one, "
        "and always checked by each worker against its own GPU before it loads the model.",
    )
    checkpoints_to_keep: int = operational(
        2,
        ge=1,
        description="Ray Train checkpoints kept (each the LoRA adapters, projector and their "
        "optimizer state; the frozen base is never in them): the latest resumes a run.",
    )
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
    micro_batch: int = Field(
        16, ge=1, description="Samples per worker per forward pass (the memory plan sizes it)."
    )
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
    plan: bool = operational(
        False,
        description="Print the memory plan per GPU worker (model states by DeepSpeed's "
        "estimators, activations, logits; the verdict against the worker's GPU, what fits "
        "on 40 GB) and stop without launching.",
    )
