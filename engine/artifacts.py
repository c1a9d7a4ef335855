"""Typed artifacts: one class per kind of stage output, its meta a pydantic model.

Every stage reads its inputs through these classes and writes its output through
:mod:`engine.commit`; no stage reads another's files by path or its meta by key.
``Kind.open(ws, name)`` returns the committed artifact (or raises an ``InputError``
naming the command that makes it); ``kind.meta`` is the typed meta; ``kind.path(...)``
and ``kind.files(...)`` are the committed files, and only those. The workspace layout:

====================  ================================================================
``world/``            the shapes world: ``source/`` (pool Parquet), ``benchmarks/``,
                      ``truth/`` (evaluation only), ``llava/`` (optional JSON export)
``pool/``             ingested rows ``part-*.parquet`` and quarantined ``rejects/``
``embeddings/<s>/``   one shard of (id, vector) per pool shard, for space s
``skills/``           the skills of every pool row; ``cache/skills/`` holds the answers
``clusters/<name>/``  ``centroids.npy`` and ``assignments/``
``index/<s>/``        FAISS shards ``shard-*.faiss`` and their ``*.ids.parquet``
``selections/<n>/``   targeted selections, one folder per benchmark
``progress/<name>/``  a PROGRESS run: rounds, the selected ids, Ray Train's storage
``models/<name>/``    a cached base model
====================  ================================================================

each holding ``_manifest.json`` and ``_attempts/<attempt>/`` (see engine.commit).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import PurePosixPath
from typing import Any, ClassVar, Generic, TypeVar

import pyarrow as pa
import pyarrow.dataset as pads
from pydantic import BaseModel, ConfigDict, Field

from engine import commit
from engine.commit import Begin, Manifest
from engine.errors import InputError
from engine.workspace import Workspace

REJECTS = "rejects"  # the pool's quarantine, beside its rows

MetaT = TypeVar("MetaT", bound=BaseModel)
Self = TypeVar("Self", bound="Artifact")


class Meta(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Ref:
    """An artifact a stage reads or writes: its kind and, for named kinds, its name."""

    kind: str
    name: str | None = None

    def __str__(self) -> str:
        return self.kind if self.name is None else f"{self.kind}/{self.name}"

    def artifact(self) -> type[Artifact]:
        return KINDS[self.kind]

    def find(self, ws: Workspace) -> Artifact | None:
        return self.artifact().find(ws, self.name)


class Artifact(Generic[MetaT]):
    """A committed artifact of one kind: its manifest, typed meta and files."""

    KIND: ClassVar[str]
    META: ClassVar[type[BaseModel]]
    FOLDER: ClassVar[tuple[str, ...]]  # under the workspace; the name is appended if named
    NAMED: ClassVar[bool] = False

    def __init__(self, ws: Workspace, name: str | None, manifest: Manifest):
        self.ws, self.name, self.manifest = ws, name, manifest

    # -- where ---------------------------------------------------------------------------

    @classmethod
    def folder(cls, ws: Workspace, name: str | None = None) -> str:
        """Absolute path of the artifact's folder (its manifest and attempts)."""
        parts = (*cls.FOLDER, name) if cls.NAMED else cls.FOLDER
        if cls.NAMED and not name:
            raise InputError(f"a {cls.KIND} needs a name")
        return ws.path(*parts)

    @classmethod
    def describe(cls, name: str | None) -> str:
        return f"{cls.KIND} {name!r}" if cls.NAMED else f"the {cls.KIND}"

    @classmethod
    def missing(cls, name: str | None) -> str:
        """How an absent artifact of this kind is named in errors."""
        return f"{cls.describe(name)} is missing"

    @classmethod
    def command(cls, ws: Workspace, name: str | None) -> str:
        """The command that makes this artifact, for error messages."""
        raise NotImplementedError

    # -- reading -------------------------------------------------------------------------

    @classmethod
    def find(cls: type[Self], ws: Workspace, name: str | None = None) -> Self | None:
        """The committed artifact, or None when there is none."""
        manifest = commit.read_manifest(ws, cls.folder(ws, name))
        if manifest is None:
            return None
        if manifest.kind != cls.KIND:
            raise InputError(
                f"{cls.folder(ws, name)} holds a {manifest.kind}, not a {cls.KIND}: "
                "choose another name"
            )
        return cls(ws, name, manifest)

    @classmethod
    def open(cls: type[Self], ws: Workspace, name: str | None = None) -> Self:
        """The committed artifact.

        Raises:
            InputError: none committed (naming whether a run started and did not finish)
                and the command that makes or resumes it.
        """
        found = cls.find(ws, name)
        if found is not None:
            return found
        folder = cls.folder(ws, name)
        run = cls.command(ws, name)
        if commit.attempt_ids(ws, folder):
            raise InputError(
                f"{cls.describe(name)} did not finish ({folder} holds an unfinished run); "
                f"run `{run}` again to resume it"
            )
        raise InputError(f"{cls.missing(name)} ({folder} holds none); run `{run}` first")

    @cached_property
    def meta(self) -> MetaT:
        return self.META.model_validate(self.manifest.meta)  # type: ignore[return-value]

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def dir(self) -> str:
        """The committed attempt's folder: every committed file is under it."""
        return f"{self.folder(self.ws, self.name)}/{commit.ATTEMPTS}/{self.manifest.attempt}"

    def path(self, *parts: str) -> str:
        return str(PurePosixPath(self.dir, *parts))

    def uri(self, *parts: str) -> str:
        """:meth:`path` as a URI with the workspace's scheme and options (for other tools)."""
        return self.ws.uri_of(self.path(*parts))

    def files(self, under: str = "", suffix: str = "") -> list[str]:
        """Sorted absolute paths of the committed files directly in ``under`` ending with ``suffix``."""
        prefix = f"{under.strip('/')}/" if under else ""
        return [
            self.path(rel)
            for rel in self.manifest.files
            if rel.startswith(prefix) and "/" not in rel[len(prefix) :] and rel.endswith(suffix)
        ]

    def read_table(self, columns: list[str] | None = None, under: str = "") -> pa.Table:
        """The committed ``*.parquet`` files directly in ``under`` as one table."""
        files = self.files(under, ".parquet")
        return pads.dataset(files, filesystem=self.ws.fs, format="parquet").to_table(
            columns=columns
        )

    # -- writing -------------------------------------------------------------------------

    @classmethod
    def begin(cls, ws: Workspace, name: str | None = None, **how: Any) -> Begin:
        """Reuse, resume or start this artifact: :func:`engine.commit.begin` with ``how``
        (``inputs``, ``config``, ``overwrite`` and what else the output depends on)."""
        return commit.begin(ws, cls.folder(ws, name), cls.KIND, **how)

    @classmethod
    def committed(cls: type[Self], ws: Workspace, name: str | None, manifest: Manifest) -> Self:
        return cls(ws, name, manifest)


# -- the kinds ----------------------------------------------------------------------------------


class WorldMeta(Meta):
    world: dict[str, Any] = Field(description="the WorldConfig the world was generated from")
    pool_size: int
    seed: int
    splits: dict[str, int] = Field(description="samples per split (pool, test, benchmarks)")
    shards: int
    benchmarks: list[str] = Field(description="held-out splits written to benchmarks/")
    llava_json: bool = Field(description="whether llava/pool.json and its images exist")
    seconds: float


class World(Artifact[WorldMeta]):
    KIND, META, FOLDER = "world", WorldMeta, ("world",)

    @classmethod
    def command(cls, ws, name):
        return f"vlselect world --out {ws.uri}"

    def benchmark(self, split: str) -> str:
        return self.path("benchmarks", f"{split}.parquet")


class PoolMeta(Meta):
    source: str = Field(description="the source as given (path or URI)")
    format: str
    image_root: str | None
    records_in: int
    accepted: int
    rejected: int
    rejected_by_reason: dict[str, int]
    source_fingerprint: dict[str, Any]
    seconds: float
    config: dict[str, Any]


class Pool(Artifact[PoolMeta]):
    """``part-*.parquet`` rows (engine.pool.POOL_SCHEMA) and ``rejects/*.parquet``."""

    KIND, META, FOLDER = "pool", PoolMeta, ("pool",)

    @classmethod
    def missing(cls, name):
        return "no pool"

    @classmethod
    def command(cls, ws, name):
        return f"vlselect ingest --workspace {ws.uri}"

    @property
    def shards(self) -> list[str]:
        return self.files(suffix=".parquet")

    @property
    def rows(self) -> int:
        return self.meta.accepted

    def rejects(self) -> list[str]:
        return self.files(REJECTS, ".parquet")


class SpaceMeta(Meta):
    space: str
    model: str
    weights: str
    source: str
    dim: int
    vectors: int
    shards: int
    no_image: int
    undecodable: int
    undecodable_examples: list[str]
    seconds: float
    config: dict[str, Any]


class EmbeddingSpace(Artifact[SpaceMeta]):
    """One shard ``<pool stem>.parquet`` of (id string, vector list<float32>) per pool shard."""

    KIND, META, FOLDER, NAMED = "embeddings", SpaceMeta, ("embeddings",), True

    @classmethod
    def describe(cls, name):
        return f"space {name!r}"

    @classmethod
    def missing(cls, name):
        return f"space {name!r} is not embedded"

    @classmethod
    def command(cls, ws, name):
        return f"vlselect embed --workspace {ws.uri} --spaces {name}"


class SkillsMeta(Meta):
    backend: str
    model: str
    prompt_version: str
    samples: int
    ok: int
    failed: int
    summary: dict[str, Any]
    config: dict[str, Any]


class Skills(Artifact[SkillsMeta]):
    """``*.parquet`` rows of engine.skills.SKILLS_SCHEMA, one per pool row."""

    KIND, META, FOLDER = "skills", SkillsMeta, ("skills",)

    @classmethod
    def command(cls, ws, name):
        return f"vlselect skills --workspace {ws.uri}"


class ClusteringMeta(Meta):
    name: str
    k: int = Field(description="clusters after small ones were merged")
    spaces: list[str]
    weights: dict[str, float]
    rows_assigned: int
    summary: dict[str, Any] = Field(description="the run's figures (sizes, fit, objective)")
    config: dict[str, Any]


class Clustering(Artifact[ClusteringMeta]):
    """``centroids.npy`` (k, d) float32 and ``assignments/<stem>.parquet``."""

    KIND, META, FOLDER, NAMED = "clustering", ClusteringMeta, ("clusters",), True

    @classmethod
    def command(cls, ws, name):
        return f"vlselect cluster --workspace {ws.uri} --name {name}"

    @property
    def assignments(self) -> list[str]:
        return self.files("assignments", ".parquet")


class IndexMeta(Meta):
    space: str
    factory: str
    metric: str
    dim: int
    vectors: int
    rows: int
    shards: int
    rows_per_shard: list[int]
    excluded: int
    excluded_per_shard: list[int]
    seconds: float
    config: dict[str, Any]
    pool_rows: bool = Field(
        False,
        description="ids.parquet holds each vector's global pool row (column 'row'); "
        "False: an index of an older vlselect, which searches cannot use",
    )
    trained_once: bool = Field(
        False, description="the shards copy one trained template (shared IVF quantizer, PQ)"
    )


class Index(Artifact[IndexMeta]):
    """FAISS shards ``shard-NNNNN.faiss`` with ``shard-NNNNN.ids.parquet`` (id, pool row)
    beside each."""

    KIND, META, FOLDER, NAMED = "index", IndexMeta, ("index",), True

    @classmethod
    def describe(cls, name):
        return f"the index of space {name!r}"

    @classmethod
    def missing(cls, name):
        return f"no index for space {name!r}"

    @classmethod
    def command(cls, ws, name):
        return f"vlselect index --workspace {ws.uri} --space {name} --shards N"


class SelectionMeta(Meta):
    name: str
    pool: int
    budget: int
    benchmarks: list[str]
    single: bool = Field(description="one benchmark: its files at the top, not in a folder")
    summary: dict[str, Any]
    config: dict[str, Any]


class Selection(Artifact[SelectionMeta]):
    KIND, META, FOLDER, NAMED = "selection", SelectionMeta, ("selections",), True

    @classmethod
    def command(cls, ws, name):
        return f"vlselect target --workspace {ws.uri} --name {name} --benchmark FILE --budget B"

    def benchmark_dir(self, benchmark: str) -> str:
        return self.dir if self.meta.single else self.path(benchmark)


class ProgressMeta(Meta):
    name: str
    pool: int
    budget: int
    spent: int
    rounds: int
    k: int
    summary: dict[str, Any]
    config: dict[str, Any]


class ProgressRun(Artifact[ProgressMeta]):
    """``ids.txt`` (the selection), ``rounds.jsonl``, ``rounds/`` and Ray Train's ``train/``."""

    KIND, META, FOLDER, NAMED = "progress", ProgressMeta, ("progress",), True

    @classmethod
    def command(cls, ws, name):
        return f"vlselect progress --workspace {ws.uri} --name {name}"


class BaseModelMeta(Meta):
    name: str
    recipe: str = Field(description="fingerprint of the world, model and training recipe")
    version: int
    created: str
    config: dict[str, Any]
    world: dict[str, Any]
    metrics: dict[str, Any]
    image_tokens: int
    vocab_size: int
    parameters: int


class BaseModelArtifact(Artifact[BaseModelMeta]):
    """``model/`` (save_pretrained) and ``tokenizer/``."""

    KIND, META, FOLDER, NAMED = "model", BaseModelMeta, ("models",), True

    @classmethod
    def command(cls, ws, name):
        return f"vlselect base --workspace {ws.uri} --name {name}"


KINDS: dict[str, type[Artifact]] = {
    k.KIND: k
    for k in (World, Pool, EmbeddingSpace, Skills, Clustering, Index, Selection, ProgressRun,
              BaseModelArtifact)
}  # fmt: skip
