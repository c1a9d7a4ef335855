"""Configuration of the shapes world: the embedded default pool and its benchmarks.

The name catalogues (families, domains) live here rather than next to their
implementations so that the validators, the renderer and the question families
all agree on one list without importing each other.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.commit import added_later

# Image question families, easiest first: the position in this tuple is the
# difficulty rank reported by the manifest (the tiny LLaVA learned colour, shape
# and glyph almost perfectly, counting barely, left-of and more-than not at all).
IMAGE_FAMILIES: tuple[str, ...] = (
    "colour",
    "shape",
    "glyph",
    "size",
    "existence",
    "position",
    "counting",
    "spatial",
    "compare",
)
# The text-only family: no image, drawn with probability text_only_fraction.
TEXT_FAMILY = "arithmetic"
FAMILIES: tuple[str, ...] = (*IMAGE_FAMILIES, TEXT_FAMILY)

DOMAINS: tuple[str, ...] = ("meadow", "ocean", "desert", "space", "snow")

# Hard families are rarer, as hard skills are in LLaVA-665K.
DEFAULT_FAMILY_WEIGHTS: dict[str, float] = {
    "colour": 0.16,
    "shape": 0.16,
    "glyph": 0.10,
    "size": 0.12,
    "existence": 0.12,
    "position": 0.10,
    "counting": 0.10,
    "spatial": 0.08,
    "compare": 0.06,
}
# Concepts differ in frequency: a benchmark on a rare domain has little pool data.
DEFAULT_DOMAIN_WEIGHTS: dict[str, float] = {
    "meadow": 0.45,
    "ocean": 0.28,
    "desert": 0.15,
    "space": 0.08,
    "snow": 0.04,
}

_RESERVED_SPLITS = ("pool", "test")


def check_weights(
    weights: dict[str, float], known: tuple[str, ...], what: str, allow_empty: bool = False
) -> dict[str, float]:
    """Refuse unknown names and non-positive totals; return the dict unchanged."""
    bad = [k for k in weights if k not in known]
    if bad:
        hint = ""
        if TEXT_FAMILY in bad:
            hint = f" ({TEXT_FAMILY!r} is the text-only family: set text_only_fraction instead)"
        raise ValueError(
            f"unknown {what} name(s) {sorted(bad)}{hint}; known {what}s: {list(known)}"
        )
    if not weights:
        if allow_empty:
            return weights
        raise ValueError(f"{what} weights must not be empty")
    neg = {k: v for k, v in weights.items() if v < 0}
    if neg:
        raise ValueError(f"{what} weights must be >= 0, got {neg}")
    if sum(weights.values()) <= 0:
        raise ValueError(f"{what} weights must have a positive sum, got {weights}")
    return weights


class BenchmarkSpec(BaseModel):
    """A held-out benchmark split that leans on one skill or one concept."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=r"^[a-z0-9_]+$",
        description="Split name, [a-z0-9_]+; also the prefix of its sample ids.",
    )
    size: int = Field(gt=0, le=1_000_000, description="Number of benchmark samples.")
    leans_on: Literal["skill", "concept"] = Field(
        description="Whether the benchmark is dominated by a skill (family) or a concept (domain)."
    )
    families: dict[str, float] = Field(
        default_factory=dict,
        description="Image family -> weight; empty means the pool's family weights.",
    )
    domains: dict[str, float] = Field(
        default_factory=dict,
        description="Domain -> weight; empty means the pool's domain weights.",
    )
    description: str = Field(default="", description="What the benchmark measures, for people.")

    @field_validator("families")
    @classmethod
    def _known_families(cls, v: dict[str, float]) -> dict[str, float]:
        return check_weights(v, IMAGE_FAMILIES, "family", allow_empty=True)

    @field_validator("domains")
    @classmethod
    def _known_domains(cls, v: dict[str, float]) -> dict[str, float]:
        return check_weights(v, DOMAINS, "domain", allow_empty=True)

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v in _RESERVED_SPLITS:
            raise ValueError(f"benchmark name {v!r} is reserved (splits {_RESERVED_SPLITS})")
        return v


def default_benchmarks() -> list[BenchmarkSpec]:
    """Four benchmarks: two lean on a hard skill, two on a rare concept."""
    return [
        BenchmarkSpec(
            name="bench_counting",
            size=300,
            leans_on="skill",
            families={"counting": 0.8, "compare": 0.2},
            description="Counting objects of a shape (and comparing counts), all domains.",
        ),
        BenchmarkSpec(
            name="bench_spatial",
            size=300,
            leans_on="skill",
            families={"spatial": 0.6, "position": 0.4},
            description="Relative and absolute object positions, all domains.",
        ),
        BenchmarkSpec(
            name="bench_space",
            size=300,
            leans_on="concept",
            domains={"space": 1.0},
            description="The pool's question mix, on the rare dark 'space' scenes only.",
        ),
        BenchmarkSpec(
            name="bench_snow",
            size=300,
            leans_on="concept",
            domains={"snow": 1.0},
            description="The pool's question mix, on the rarest pale 'snow' scenes only.",
        ),
    ]


class WorldConfig(BaseModel):
    """Everything that determines the generated world; equal configs give equal bytes."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(default=0, ge=0, description="Master seed of every split.")
    size: int = Field(default=2000, ge=1, le=10_000_000, description="Pool size (samples).")
    image_size: int = Field(default=64, ge=16, le=1024, description="Image side in pixels.")
    grid: int = Field(
        default=4,
        ge=2,
        le=16,
        description="Cells per image side; one object per cell (image_size % grid == 0).",
    )
    families: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_FAMILY_WEIGHTS),
        description="Image family (skill) -> weight in the pool; hard families rarer.",
    )
    domains: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_DOMAIN_WEIGHTS),
        description="Domain (concept) -> weight in the pool; unequal by default.",
    )
    noise_std: float = Field(
        default=6.0, ge=0.0, le=64.0, description="Std of Gaussian pixel noise (0..255 scale)."
    )
    jitter: int = Field(
        default=2,
        ge=0,
        le=16,
        description="Max pixel offset of an object's centre inside its cell (clamped to fit).",
    )
    min_objects: int = Field(default=2, ge=1, description="Fewest objects in an image scene.")
    max_objects: int = Field(
        default=8, ge=2, description="Most objects in an image scene (<= grid * grid)."
    )
    domain_shift: float = Field(
        default=0.6,
        ge=0.0,
        le=1.0,
        description="How strongly a domain transforms object colours (0: not at all).",
    )
    max_count: int = Field(
        default=4, ge=1, description="Counting answers range over 0..max_count (<= max_objects)."
    )
    text_only_fraction: float = Field(
        default=0.02,
        ge=0.0,
        lt=1.0,
        description="Share of pool and test samples that are text-only (arithmetic, no image).",
    )
    turns: int = added_later(
        1,
        ge=1,
        le=6,
        description="Question-answer exchanges per pool sample (1..6): the family's question first, "
        "then turns-1 follow-ups about the same scene (LLaVA-665K packs several turns per "
        "image); test and benchmark samples stay single-turn.",
    )
    shard_size: int = Field(default=5000, ge=1, description="Rows per generated shard.")
    benchmarks: list[BenchmarkSpec] = Field(
        default_factory=default_benchmarks,
        description="Held-out benchmark splits, each leaning on a skill or a concept.",
    )
    test_size: int = Field(
        default=1000, ge=0, le=1_000_000, description="In-distribution test split size."
    )

    @field_validator("families")
    @classmethod
    def _known_families(cls, v: dict[str, float]) -> dict[str, float]:
        return check_weights(v, IMAGE_FAMILIES, "family", allow_empty=False)

    @field_validator("domains")
    @classmethod
    def _known_domains(cls, v: dict[str, float]) -> dict[str, float]:
        return check_weights(v, DOMAINS, "domain", allow_empty=False)

    @model_validator(mode="after")
    def _consistent(self) -> WorldConfig:
        if self.image_size % self.grid:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of grid ({self.grid})"
            )
        if self.image_size // self.grid < 8:
            raise ValueError(
                f"cells of {self.image_size // self.grid} px are too small: need >= 8 px"
            )
        cells = self.grid * self.grid
        if self.max_objects > cells:
            raise ValueError(f"max_objects ({self.max_objects}) > grid cells ({cells})")
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects ({self.min_objects}) > max_objects ({self.max_objects})")
        if self.max_count > self.max_objects:
            raise ValueError(f"max_count ({self.max_count}) > max_objects ({self.max_objects})")
        names = [b.name for b in self.benchmarks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate benchmark names {dup}")
        return self

    def benchmark(self, name: str) -> BenchmarkSpec:
        """The benchmark spec called `name` (KeyError naming the known ones)."""
        for b in self.benchmarks:
            if b.name == name:
                return b
        raise KeyError(f"unknown benchmark {name!r}; known: {[b.name for b in self.benchmarks]}")
