"""The one place where declared ``Resources`` become Ray options."""

from __future__ import annotations

from typing import Any

from engine.resources import Resources

# The namespace of every named actor (coordinators, index shards): Ray's default is a
# fresh namespace per job, where a named actor started by one job is invisible to the next.
NAMESPACE = "vlselect"


def ray_options(resources: Resources, *, actor: bool = False) -> dict[str, Any]:
    """Options for ``ray.remote(...).options(**opts)``: tasks retry, actors restart."""
    opts: dict[str, Any] = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus}
    if resources.memory_gb:
        opts["memory"] = int(resources.memory_gb * 1024**3)
    if resources.custom:
        opts["resources"] = dict(resources.custom)
    if resources.accelerator_type:
        opts["accelerator_type"] = resources.accelerator_type
    if actor:
        opts["max_restarts"] = resources.max_retries
        opts["max_task_retries"] = resources.max_retries
    else:
        opts["max_retries"] = resources.max_retries
    return opts


def ray_data_options(resources: Resources) -> dict[str, Any]:
    """Keyword arguments for ``Dataset.map_batches``: the resources of one task or pool actor.

    Retries are left to Ray Data, which restarts pool actors and retries their batches
    without limit by default: a dead actor costs a retry, not rows.
    """
    opts: dict[str, Any] = {"num_cpus": resources.num_cpus}
    if resources.num_gpus:
        opts["num_gpus"] = resources.num_gpus
    if resources.memory_gb:
        opts["memory"] = int(resources.memory_gb * 1024**3)
    if resources.custom:
        opts["resources"] = dict(resources.custom)
    if resources.accelerator_type:
        opts["accelerator_type"] = resources.accelerator_type
    return opts


def train_worker_resources(resources: Resources, use_gpu: bool) -> dict[str, float]:
    """Ray Train's ``ScalingConfig(resources_per_worker=...)``: one worker's resources by
    their resource names (CPU, GPU, memory in bytes, custom)."""
    out: dict[str, float] = {"CPU": resources.num_cpus, **resources.custom}
    if use_gpu:
        out["GPU"] = max(1.0, resources.num_gpus)
    if resources.memory_gb:
        out["memory"] = int(resources.memory_gb * 1024**3)
    return out
