"""The shapes world: the generated default pool, test split and benchmarks."""

from engine.world.config import BenchmarkSpec, WorldConfig
from engine.world.generate import (
    LABELS_SCHEMA,
    RECORDS_SCHEMA,
    ShardSpec,
    generate_rows,
    generate_sample,
    plan_shards,
    sample_rng,
    splits,
    world_manifest,
)

__all__ = [
    "LABELS_SCHEMA",
    "RECORDS_SCHEMA",
    "BenchmarkSpec",
    "ShardSpec",
    "WorldConfig",
    "generate_rows",
    "generate_sample",
    "plan_shards",
    "sample_rng",
    "splits",
    "world_manifest",
]
