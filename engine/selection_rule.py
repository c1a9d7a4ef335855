"""PROGRESS's selection rule and the coordinator's settings: the config a run's
coordinator draws by and its trainer scores by (``progress.selection``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.commit import added_later
from engine.progress import Metric


class SelectionRule(BaseModel):
    """How a PROGRESS round picks clusters from the score history (PROGRESS, Alg. 1)."""

    model_config = ConfigDict(extra="forbid")

    metric: Metric = Field(
        "accuracy", description="Cluster score: greedy-answer accuracy, or mean per-token loss."
    )
    temperature: float = Field(
        1.0,
        gt=0,
        description="τ of softmax(Δk / τ); with scale 'std' in units of Δk's spread over "
        "the clusters, so one τ means the same for both metrics (paper 1.0 on raw Δk).",
    )
    scale: Literal["std", "none"] = Field(
        "std",
        description="Δk before the softmax: 'std' divides it by its standard deviation over "
        "the clusters; 'none' is the paper's raw Δk (accuracy's counts make the softmax "
        "nearly an argmax, loss's fractions nearly uniform).",
    )
    prior: float = Field(
        1.0,
        ge=0,
        description="a of the Beta(a, a) prior on a cluster's accuracy: (correct + a) / "
        "(n + 2a); 0 is the raw share. Unused with metric loss.",
    )
    explore: float = Field(
        0.1, ge=0, le=1, description="δ: share of a round drawn uniformly from the other clusters."
    )
    gap: int = Field(1, ge=1, description="γ: Δk compares scores this many rounds apart.")
    within: Literal["uniform", "uncertainty"] = added_later(
        "uniform",
        description="Rows inside a cluster: 'uniform' draws them (the paper); 'uncertainty' "
        "offers diverse candidates (MMD prototypes) that the model answers without their "
        "answers, and takes those whose uncertainty lies in the band (engine.within).",
    )
    candidates: float = added_later(
        3.0,
        ge=1,
        description="With within 'uncertainty': candidates offered per row a cluster takes; "
        "1 is pure diversity (the prototypes in order), more leaves more to uncertainty.",
    )
    band: float = added_later(
        0.5,
        ge=0,
        le=1,
        description="With within 'uncertainty': the quantile of the candidates' uncertainty "
        "that a cluster's picks lie nearest (0.5: the middle band; 1: the most uncertain).",
    )
    eval_per_cluster: int = Field(
        100,
        ge=1,
        description="Rows of a cluster's fixed probe set, scored every round: min(selected "
        "rows before the round, this); a row that joins it stays.",
    )


class ProgressSettings(BaseModel):
    """What the coordinator needs: the resolved sizes, the seed, and the run's selection
    rule (the very sub-model of ``vlselect progress``'s config the trainer also receives)."""

    model_config = ConfigDict(extra="forbid")

    budget: int = Field(ge=1, description="Rows whose answers may be revealed, warm-up included.")
    round_size: int = Field(ge=1, description="Rows picked per selection round.")
    seed: int = Field(0, ge=0, description="Seed of every draw (round t uses (seed, t)).")
    rule: SelectionRule = Field(default_factory=SelectionRule, description="How rounds pick.")
