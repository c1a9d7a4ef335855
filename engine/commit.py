"""One resume-and-commit for every stage, correct on local disk, shared file systems and object stores.

An artifact lives in one folder of the workspace (``<ws>/pool``, ``<ws>/embeddings/clip``,
...). A run never writes into what readers read. It writes under a unique attempt prefix::

    <artifact>/_attempts/<attempt>/_attempt.json   who started it, with which fingerprint
    <artifact>/_attempts/<attempt>/...              the artifact's files (each written atomically)
    <artifact>/_manifest.json                       the commit: one small file, written last

and publishes it by writing ``_manifest.json`` in one atomic write (a rename on a POSIX file
system, a single PUT on an object store). The manifest names the attempt and every file of
it with its size; readers open the manifest and read only what it names, so a reader sees
the previous artifact or the new one, never a mix and never half of one. Nothing is ever
renamed as a directory, which object stores cannot do. After the commit every other attempt
is deleted; a run killed before its manifest leaves its attempt for the next run of the same
fingerprint to resume (its finished parts kept), and the previous manifest still current.

The fingerprint is the identity of what a run makes: a sha256 of its upstream artifacts'
fingerprints and the config fields that change the output. A field that does not (where a
stage runs, how fast, whether to overwrite) is declared once on the config model with
:func:`operational`, and :func:`output_config` leaves it out.

One writer per artifact at a time: two runs writing the same artifact concurrently each
commit a whole attempt, and the last manifest wins.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal

import pyarrow.fs as pafs
from pydantic import BaseModel, Field

from engine.errors import InputError
from engine.workspace import Workspace

MANIFEST = "_manifest.json"
ATTEMPTS = "_attempts"
ATTEMPT_FILE = "_attempt.json"
STATE_FILE = "_state.json"
SCRATCH = "_scratch"  # an attempt's work in progress, never committed


# -- what changes the output ------------------------------------------------------------------


def operational(default: Any = ..., *, description: str, **kwargs: Any) -> Any:
    """A pydantic ``Field`` that does not change a stage's output (resources, overwrite, speed).

    :func:`output_config` leaves such fields out of the fingerprint, so changing them resumes
    or reuses the artifact instead of starting over.
    """
    extra = {**kwargs.pop("json_schema_extra", {}), "affects_output": False}
    if "default_factory" not in kwargs:
        kwargs["default"] = default
    return Field(description=description, json_schema_extra=extra, **kwargs)


def added_later(default: Any, *, description: str, **kwargs: Any) -> Any:
    """A pydantic ``Field`` added after artifacts were committed, whose ``default`` makes
    what they were made without it: :func:`output_config` leaves it out at that default, so
    those artifacts keep their fingerprints (and stay current) and any other value counts."""
    extra = {**kwargs.pop("json_schema_extra", {}), "omit_at_default": True}
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


def _omitted_at_default(model: type[BaseModel], field: str, value: Any) -> bool:
    info = model.model_fields[field]
    extra = info.json_schema_extra
    return (
        isinstance(extra, Mapping)
        and bool(extra.get("omit_at_default"))
        and (value == info.default)
    )


def affects_output(model: type[BaseModel], field: str) -> bool:
    extra = model.model_fields[field].json_schema_extra
    return not (isinstance(extra, Mapping) and extra.get("affects_output") is False)


def output_config(config: BaseModel) -> dict[str, Any]:
    """``config`` as JSON data without its :func:`operational` fields (nested models too)."""
    out: dict[str, Any] = {}
    for name in type(config).model_fields:
        value = getattr(config, name)
        if not affects_output(type(config), name) or _omitted_at_default(type(config), name, value):
            continue
        out[name] = _output_value(value)
    return out


def _output_value(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return output_config(value)
    if isinstance(value, list | tuple):
        return [_output_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _output_value(v) for k, v in value.items()}
    return json.loads(json.dumps(value, default=str))


def fingerprint(**parts: Any) -> str:
    """sha256 (hex) of ``parts`` as canonical JSON: config dicts, upstream fingerprints, versions."""
    data = {
        k: output_config(v) if isinstance(v, BaseModel) else v
        for k, v in parts.items()
        if v is not None
    }
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# -- the records ------------------------------------------------------------------------------


class Manifest(BaseModel):
    """The commit of one artifact: the only file a reader trusts."""

    kind: str = Field(description="the artifact's kind (pool, embeddings, clustering, ...)")
    attempt: str = Field(description="the committed attempt's folder under _attempts/")
    fingerprint: str = Field(description="sha256 of the inputs and output-changing config")
    inputs: dict[str, str] = Field(description="the upstream artifacts' fingerprints, by role")
    files: dict[str, int] = Field(
        description="every committed file, relative to the attempt, with its size in bytes"
    )
    meta: dict[str, Any] = Field(description="the artifact's typed meta, as JSON")
    committed_at: str = Field(description="UTC time of the commit, ISO 8601")


class AttemptRecord(BaseModel):
    kind: str
    fingerprint: str
    inputs: dict[str, str]
    started_at: str


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# -- writing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One run's output folder; every path a stage writes comes from :meth:`path`."""

    ws: Workspace
    artifact: str  # absolute path of the artifact folder
    id: str
    kind: str
    fingerprint: str
    inputs: dict[str, str]
    resumed: bool

    @property
    def dir(self) -> str:
        return f"{self.artifact}/{ATTEMPTS}/{self.id}"

    def path(self, *parts: str) -> str:
        return str(PurePosixPath(self.dir, *parts))

    def exists(self, *parts: str) -> bool:
        return self.ws.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def makedirs(self, *parts: str) -> str:
        path = self.path(*parts)
        self.ws.fs.create_dir(path, recursive=True)
        return path

    def remove(self, *parts: str) -> None:
        self.ws.discard(self.path(*parts))

    def read_state(self) -> dict[str, Any]:
        """What a stage saved of its progress in this attempt ({} when nothing)."""
        if not self.exists(STATE_FILE):
            return {}
        return self.ws.read_json(self.path(STATE_FILE))

    def write_state(self, state: Mapping[str, Any]) -> None:
        """Save progress a resumed attempt starts from (a fit's result, rounds done)."""
        self.ws.write_json(self.path(STATE_FILE), dict(state))

    def committed_files(self) -> dict[str, int]:
        """Every file of the attempt with its size, but those whose path has a part starting
        with ``_`` (bookkeeping, scratch) or ``.`` (temporaries of atomic writes)."""
        selector = pafs.FileSelector(self.dir, recursive=True, allow_not_found=True)
        files = {}
        for info in self.ws.fs.get_file_info(selector):
            if info.type != pafs.FileType.File:
                continue
            rel = info.path[len(self.dir) + 1 :]
            if any(p.startswith(("_", ".")) for p in rel.split("/")):
                continue  # bookkeeping, scratch (engine.shards' _parts) and temporaries
            files[rel] = int(info.size or 0)
        return dict(sorted(files.items()))

    def abandon(self) -> None:
        """Delete this attempt, and the folders above it that it leaves empty (the
        artifact's, the workspace's): a run refused for bad input leaves nothing behind."""
        self.ws.discard(self.dir)
        folder = PurePosixPath(self.dir).parent
        while len(folder.parts) >= len(PurePosixPath(self.ws.root).parts):
            if self.ws.fs.get_file_info(pafs.FileSelector(str(folder), allow_not_found=True)):
                return
            with contextlib.suppress(OSError):
                self.ws.fs.delete_dir(str(folder))
            folder = folder.parent

    def commit(self, meta: BaseModel) -> Manifest:
        """Publish this attempt with ``meta``; delete every other attempt of the artifact."""
        self.remove(SCRATCH)
        manifest = Manifest(
            kind=self.kind,
            attempt=self.id,
            fingerprint=self.fingerprint,
            inputs=self.inputs,
            files=self.committed_files(),
            meta=meta.model_dump(mode="json"),
            committed_at=_now(),
        )
        self.ws.write_json(f"{self.artifact}/{MANIFEST}", manifest.model_dump(mode="json"))
        for other in attempt_ids(self.ws, self.artifact):
            if other != self.id:
                self.ws.discard(f"{self.artifact}/{ATTEMPTS}/{other}")
        return manifest


Action = Literal["current", "resume", "start"]


@dataclass(frozen=True)
class Begin:
    """What :func:`begin` decided: reuse the committed artifact, resume an attempt, or start one."""

    action: Action
    manifest: Manifest | None  # the committed artifact, if any
    attempt: Attempt | None  # None when action == "current"


def read_manifest(ws: Workspace, artifact: str) -> Manifest | None:
    """The committed manifest of the artifact folder ``artifact`` (absolute), or None."""
    path = f"{artifact}/{MANIFEST}"
    if ws.fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        return Manifest.model_validate(ws.read_json(path))
    except ValueError as err:  # ValidationError and JSONDecodeError are both ValueErrors
        problem = " ".join(str(err).split())[:300]
        raise InputError(
            f"{path} is not a manifest this version of vlselect reads ({problem}): run the "
            "stage that wrote it again with --overwrite"
        ) from None


def attempt_ids(ws: Workspace, artifact: str) -> list[str]:
    selector = pafs.FileSelector(f"{artifact}/{ATTEMPTS}", allow_not_found=True)
    infos = ws.fs.get_file_info(selector)
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def begin(
    ws: Workspace,
    artifact: str,
    kind: str,
    *,
    inputs: Mapping[str, str] | None = None,
    config: BaseModel | None = None,
    overwrite: bool = False,
    refuse_change: str | None = None,
    **extra: Any,
) -> Begin:
    """Decide how a run of ``kind`` writes the artifact folder ``artifact``.

    Its fingerprint is :func:`fingerprint` of ``inputs`` (upstream fingerprints by role),
    ``config`` (its output-changing fields) and ``extra`` (anything else the output
    depends on: a source's digest, a library's version).

    - ``current``: the committed manifest has this fingerprint (and no ``overwrite``).
    - ``resume``: an uncommitted attempt has it; its finished parts are kept.
    - ``start``: a new attempt; uncommitted attempts of other fingerprints are deleted,
      the committed artifact stays readable until this one commits.

    Raises:
        InputError: ``refuse_change`` (its ``{old}`` and ``{new}`` the fingerprints' heads)
            when a committed artifact of another fingerprint is there and ``overwrite`` is
            not given; nothing is written then.
    """
    inputs = dict(inputs or {})
    made_of = fingerprint(inputs=inputs, config=config, **extra)
    manifest = read_manifest(ws, artifact)
    if manifest is not None and manifest.fingerprint == made_of and not overwrite:
        return Begin("current", manifest, None)
    if manifest is not None and refuse_change is not None and not overwrite:
        message = refuse_change.replace("{old}", manifest.fingerprint[:16])
        raise InputError(message.replace("{new}", made_of[:16]))
    committed = manifest.attempt if manifest is not None else None
    for aid in reversed(attempt_ids(ws, artifact)):  # newest first
        if aid == committed:
            continue
        record = _attempt_record(ws, artifact, aid)
        if not overwrite and record is not None and record.fingerprint == made_of:
            attempt = Attempt(ws, artifact, aid, kind, made_of, inputs, resumed=True)
            return Begin("resume", manifest, attempt)
        ws.discard(f"{artifact}/{ATTEMPTS}/{aid}")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    aid = f"{stamp}-{uuid.uuid4().hex[:8]}"
    attempt = Attempt(ws, artifact, aid, kind, made_of, inputs, resumed=False)
    record = AttemptRecord(kind=kind, fingerprint=made_of, inputs=inputs, started_at=_now())
    ws.write_json(attempt.path(ATTEMPT_FILE), record.model_dump())
    return Begin("start", manifest, attempt)


def _attempt_record(ws: Workspace, artifact: str, aid: str) -> AttemptRecord | None:
    path = f"{artifact}/{ATTEMPTS}/{aid}/{ATTEMPT_FILE}"
    if ws.fs.get_file_info(path).type != pafs.FileType.File:
        return None  # killed before its record landed: nothing to resume
    try:
        return AttemptRecord.model_validate(ws.read_json(path))
    except ValueError:
        return None
