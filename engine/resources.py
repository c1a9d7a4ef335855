"""Resources a stage's tasks or actors need, declared as data (mapped to Ray options in ``actors``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Resources(BaseModel):
    """Per-task or per-actor resources; ``actors.adapter.ray_options`` turns them into Ray options."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(
        1.0, ge=0, description="CPUs reserved per task or actor (fractions allowed)."
    )
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs per task or actor (fractions share a GPU)."
    )
    memory_gb: float | None = Field(
        None, gt=0, description="Memory reserved per task or actor in GiB; None reserves none."
    )
    accelerator_type: str | None = Field(
        None,
        description="Ray accelerator type the work must run on (A100-80G, H100, L4, ...: "
        "Ray schedules it only on nodes of that type); the memory plan reads the GPU's "
        "memory from it. None: any GPU.",
    )
    custom: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources, e.g. {'gpu_node': 1} to pin work to a node type.",
    )
    max_retries: int = Field(
        3,
        ge=-1,
        description="Retries of a failed task (a lost node included); for an actor, its "
        "restarts and the retries of its calls in flight. -1: without limit.",
    )
