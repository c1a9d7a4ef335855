"""The workspace: one directory (local path or pyarrow-filesystem URI) through which stages hand over.

Writes are atomic at file level: a file is written under a hidden temporary name
(``.<name>.tmp-<hex>`` beside it) and renamed into place (a copy of one object on an
object store), so a reader never takes a half-written file for a finished one. The
leading dot matters: a writer killed mid-write leaves its temporary behind, and
pyarrow datasets and Ray Data skip hidden files where a ``*.parquet*``-style listing
would not. Whole artifacts are committed by engine.commit: no directory is renamed.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from engine.errors import InputError

CONFIG_FILE = "vlselect.yaml"


def uri_for(base_uri: str, path: str) -> str:
    """``path`` on the filesystem of ``base_uri`` as a URI any process can open: the path
    itself on local disk, else with ``base_uri``'s scheme, credentials and query options."""
    if "://" not in base_uri:
        return path
    parsed = urllib.parse.urlsplit(base_uri)
    query = f"?{parsed.query}" if parsed.query else ""
    user = parsed.netloc.rpartition("@")[0]
    return f"{parsed.scheme}://{user + '@' if user else ''}{path}{query}"


@dataclass(frozen=True)
class Location:
    """A file or folder named by a local path or any pyarrow-filesystem URI (``s3://``,
    ``gs://``, ``hdfs://``, with their query options): the URI as given, its filesystem,
    and the path on it. Sources, image roots, benchmark and query files are Locations."""

    uri: str
    fs: pafs.FileSystem
    path: str

    @classmethod
    def of(cls, uri: str | Location) -> Location:
        """Resolve ``uri`` without reading it; a local path is made absolute.

        Raises:
            InputError: a URI that names no filesystem pyarrow can open.
        """
        if isinstance(uri, Location):
            return uri
        if "://" not in uri:
            path = os.path.abspath(uri)
            return cls(path, pafs.LocalFileSystem(), path)
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, OSError) as err:
            raise InputError(f"URI {uri!r} is not usable: {err}") from None
        return cls(uri, fs, path.rstrip("/"))

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    def uri_of(self, path: str) -> str:
        return uri_for(self.uri, path)

    def kind(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self.kind() != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.kind() == pafs.FileType.Directory

    def files(self, suffix: str = "") -> list[str]:
        """Sorted paths of the files directly in this folder ending with ``suffix``
        (hidden and ``_``-prefixed ones skipped, as pyarrow datasets do)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and i.path.endswith(suffix)
            and not i.base_name.startswith((".", "_"))
        )

    def open(self):
        """A binary input stream of the file (seekable: ijson and Parquet read it)."""
        return self.fs.open_input_file(self.path)


@dataclass(frozen=True)
class Workspace:
    """A workspace root on a pyarrow filesystem; ``uri`` is what the user gave (a local
    path made absolute), the form to hand to Ray workers."""

    uri: str
    fs: pafs.FileSystem
    root: str

    @classmethod
    def open(cls, uri: str) -> Workspace:
        """Resolve ``uri`` (a local path or ``s3://``-style URI) without touching the disk."""
        if not uri:
            raise InputError("no workspace given: pass --workspace PATH (or --out PATH for world)")
        if "://" in uri:
            try:
                fs, root = pafs.FileSystem.from_uri(uri)
            except (pa.ArrowInvalid, OSError) as err:
                raise InputError(f"workspace URI {uri!r} is not usable: {err}") from None
        else:
            # absolute, because Ray workers (Ray Train's above all) run in other directories
            fs, root = pafs.LocalFileSystem(), os.path.abspath(uri)
            uri = root
            if os.path.exists(root) and not os.path.isdir(root):
                raise InputError(
                    f"workspace {root} is a file, not a directory: pass --workspace a directory "
                    "(a new one is created)"
                )
        return cls(uri=uri, fs=fs, root=root.rstrip("/"))

    def path(self, *parts: str) -> str:
        """``parts`` under the root; a first part that is already a path of this
        workspace (as attempts and artifacts hand out) is taken as it is."""
        if parts and (parts[0] == self.root or parts[0].startswith(self.root + "/")):
            return str(PurePosixPath(*parts))
        return str(PurePosixPath(self.root, *parts))

    def uri_of(self, path: str) -> str:
        """An absolute ``path`` of this workspace's filesystem as a URI (see :func:`uri_for`)."""
        return uri_for(self.uri, path)

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def is_dir(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type == pafs.FileType.Directory

    def makedirs(self, *parts: str) -> str:
        path = self.path(*parts)
        self.fs.create_dir(path, recursive=True)
        return path

    def list_files(self, *parts: str, suffix: str = "") -> list[str]:
        """Sorted full paths of the files directly under ``parts`` that end with ``suffix``."""
        if not self.is_dir(*parts):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(*parts), recursive=False))
        return sorted(
            i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
        )

    def parquet_rows(self, path: str) -> int:
        """Rows in the ``*.parquet`` files directly under the absolute ``path``, from their footers."""
        infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return sum(
            pq.ParquetFile(i.path, filesystem=self.fs).metadata.num_rows
            for i in infos
            if i.type == pafs.FileType.File and i.path.endswith(".parquet")
        )

    def remove(self, *parts: str) -> None:
        self.discard(self.path(*parts))

    def discard(self, path: str) -> None:
        """Delete an absolute path inside the workspace if it exists (an attempt, a part)."""
        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(path)

    # -- atomic file writes -------------------------------------------------------------

    def write_bytes(self, path: str, data: bytes) -> None:
        with atomic_output(self.fs, path) as tmp, self.fs.open_output_stream(tmp) as out:
            out.write(data)

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(
            path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
        )

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def read_json(self, path: str) -> Any:
        return json.loads(self.read_bytes(path))

    def write_table(self, path: str, table: pa.Table) -> None:
        write_table_atomic(self.fs, path, table)

    # -- the workspace's own config -----------------------------------------------------

    def read_config(self) -> dict[str, Any]:
        """The workspace's ``vlselect.yaml`` as a mapping of stage sections ({} if absent)."""
        if not self.exists(CONFIG_FILE):
            return {}
        with self.fs.open_input_stream(self.path(CONFIG_FILE)) as f:
            text = f.read()
        try:
            data = yaml.safe_load(text) or {}
        except (yaml.YAMLError, RecursionError) as err:
            problem = "it nests too deeply" if isinstance(err, RecursionError) else err
            raise InputError(
                f"{self.path(CONFIG_FILE)} (the workspace's config) is not valid YAML: {problem}; "
                "fix the YAML"
            ) from None
        if not isinstance(data, dict):
            raise InputError(
                f"{self.path(CONFIG_FILE)} must hold a mapping of stage sections; found a "
                f"{type(data).__name__}"
            )
        return data

    def write_config(self, sections: dict[str, Any]) -> None:
        text = yaml.safe_dump(sections, sort_keys=False)
        self.write_bytes(self.path(CONFIG_FILE), text.encode())


@contextlib.contextmanager
def atomic_output(fs: pafs.FileSystem, path: str) -> Iterator[str]:
    """Yield a hidden temporary path beside ``path``; rename it to ``path`` on success.

    On an exception the temporary is deleted and ``path`` is left as it was; a process
    killed inside the block leaves only a hidden ``.<name>.tmp-<hex>`` that readers skip.
    """
    target = PurePosixPath(path)
    tmp = str(target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    fs.create_dir(str(target.parent), recursive=True)
    try:
        yield tmp
        fs.move(tmp, path)
    except BaseException:
        _quiet_delete(fs, tmp)
        raise


def write_table_atomic(
    fs: pafs.FileSystem, path: str, table: pa.Table, row_group_rows: int | None = None
) -> None:
    """Write ``table`` as Parquet (zstd) to ``path`` through :func:`atomic_output`;
    ``row_group_rows`` caps a row group (None: pyarrow's default, up to 1Mi rows)."""
    with atomic_output(fs, path) as tmp:
        pq.write_table(table, tmp, filesystem=fs, compression="zstd", row_group_size=row_group_rows)


def _quiet_delete(fs: pafs.FileSystem, path: str) -> None:
    with contextlib.suppress(OSError):
        fs.delete_file(path)


def read_parquet_dir(
    path: str, fs: pafs.FileSystem | None = None, columns: list[str] | None = None
) -> pa.Table:
    """All ``*.parquet`` files directly under ``path`` as one table (other files beside them skipped)."""
    fs = fs or pafs.LocalFileSystem()
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    files = sorted(
        i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
    )
    if not files:
        raise FileNotFoundError(f"no .parquet files under {path}")
    return pq.ParquetDataset(files, filesystem=fs).read(columns=columns)
