"""Streaming readers for LLaVA-format sources and the per-chunk normalisation of ingestion.

Sources: LLaVA JSON (one array, parsed incrementally with ijson so a 1 GB file is
never held whole), JSONL (one record per line; a malformed line is one reject),
and Parquet (a file or a directory of files, read batch by batch).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal

import ijson
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engine.errors import InputError
from engine.pool import (
    POOL_SCHEMA,
    REJECT_SCHEMA,
    ImagePolicy,
    make_reject,
    normalize_record,
    record_id,
)
from engine.workspace import Location

SourceFormat = Literal["json", "jsonl", "parquet"]
MALFORMED = object()  # stands in for a JSONL line that does not parse
# LLaVA records nest three levels (record, turns, turn). A deeper one is refused before
# pickling it to a Ray task or rendering it for the rejects file, both of which recurse.
MAX_DEPTH = 64
BOM = b"\xef\xbb\xbf"  # what Windows tools put before UTF-8 JSON


@dataclass
class RawItem:
    """One record as read from the source, before normalisation.

    ``record`` is the parsed value (any JSON type) or MALFORMED with ``error`` set;
    ``duplicate_of`` is the record index of an earlier record with the same id.
    """

    index: int
    record: Any
    error: str | None = None
    duplicate_of: int | None = None


def detect_format(source: str | Location) -> SourceFormat:
    """Guess the source format from its name and first bytes; InputError if it is none of them."""
    src = Location.of(source)
    kind = src.kind()
    if kind == pafs.FileType.NotFound:
        raise InputError(
            f"source not found: {src.uri} (pass --source with a LLaVA JSON, JSONL or Parquet "
            "path or URI)"
        )
    if kind == pafs.FileType.Directory:
        if not source_files(src):
            raise InputError(f"source directory {src.uri} holds no .parquet files")
        return "parquet"
    lower = src.path.lower()
    if lower.endswith(".parquet"):
        return "parquet"
    with src.open() as f:
        head = f.read(4096).removeprefix(BOM).lstrip()
    path = src.uri
    if lower.endswith((".jsonl", ".ndjson")) or head.startswith(b"{"):
        first_line = head.split(b"\n", 1)[0].strip()
        if first_line in (b"{", b"["):
            # Pretty-printed JSON read line by line would reject every line on its own.
            raise InputError(
                f"{path} is read as JSONL (one record per line), but its first line is a lone "
                f"{first_line.decode()!r}: it looks like pretty-printed JSON; write one record "
                "per line (jq -c '.[]' FILE > FILE.jsonl) or give a JSON array of records as .json"
            )
        return "jsonl"
    if head.startswith(b"["):
        return "json"
    if lower.endswith(".json"):
        shown = head[:40].decode("utf-8", "replace")
        raise InputError(
            f"{path} does not start with '[' or '{{': expected a LLaVA JSON array of records or "
            f"JSONL; it starts with {shown!r}"
        )
    raise InputError(f"cannot tell the format of {path}: name it .json, .jsonl or .parquet")


def source_files(source: str | Location) -> list[Location]:
    """The files a source consists of: itself, or the sorted ``*.parquet`` files of a folder."""
    src = Location.of(source)
    if src.is_dir():
        return [Location(src.uri_of(p), src.fs, p) for p in src.files(".parquet")]
    return [src]


def count_records(source: str | Location, fmt: SourceFormat) -> int | None:
    """Rows in a Parquet source from its footers (free); None for JSON, which must be parsed."""
    if fmt != "parquet":
        return None
    return sum(
        pq.ParquetFile(f.path, filesystem=f.fs).metadata.num_rows for f in source_files(source)
    )


def iter_records(
    source: str | Location, fmt: SourceFormat, batch_rows: int = 2048
) -> Iterator[RawItem]:
    """Yield every record of the source in order, numbered from 0.

    Raises:
        InputError: the file as a whole is not what its format says (a truncated JSON
            array, a JSON object where an array was expected, an unreadable Parquet file).
    """
    src = Location.of(source)
    if fmt == "json":
        yield from _iter_json_array(src)
    elif fmt == "jsonl":
        yield from _iter_jsonl(src)
    else:
        yield from _iter_parquet(src, batch_rows)


def _iter_json_array(src: Location) -> Iterator[RawItem]:
    index = 0
    try:
        with src.open() as f:
            if f.read(len(BOM)) != BOM:
                f.seek(0)
            for index, record in enumerate(ijson.items(f, "item", use_float=True)):  # noqa: B007
                yield _checked_depth(RawItem(index, record))
    except ijson.JSONError as err:
        raise InputError(
            f"{src.uri} is not a well-formed JSON array (after record {index}): "
            f"{' '.join(str(err).split())}; "
            "fix or re-export the file, or convert it to JSONL to reject bad lines one by one"
        ) from None
    except UnicodeDecodeError as err:  # ijson cannot go on past it, so the file is refused
        raise InputError(
            f"{src.uri} holds text that is not Unicode after record {index} ({err}): bytes that "
            "are not UTF-8, or a \\u escape of a lone surrogate (\\uD800-\\uDFFF); fix them, "
            "or convert the file to JSONL, where only the records holding them are rejected"
        ) from None


def _iter_jsonl(src: Location) -> Iterator[RawItem]:
    index = 0
    with src.open() as raw, io.BufferedReader(raw) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                item = _checked_depth(RawItem(index, json.loads(line)))
            # ValueError: an integer of more than 4,300 digits; RecursionError: deep nesting.
            except (ValueError, RecursionError) as err:
                text = line[:200].decode("utf-8", "replace")
                item = RawItem(index, text, error=f"line is not valid JSON: {err}")
            yield item
            index += 1


def _checked_depth(item: RawItem) -> RawItem:
    """``item``, or an error item in its place when its record nests deeper than MAX_DEPTH."""
    level, depth = [item.record], 0
    while level:  # breadth first, one level at a time: about 5 us for a LLaVA record
        depth += 1
        if depth > MAX_DEPTH:
            return RawItem(
                item.index,
                f"<a record nested more than {MAX_DEPTH} levels deep>",
                error=f"record is nested more than {MAX_DEPTH} levels deep (a LLaVA record "
                "nests 3: record, turns, turn)",
            )
        level = [
            child
            for value in level
            if type(value) in (dict, list)
            for child in (value.values() if type(value) is dict else value)
            if type(child) in (dict, list)
        ]
    return item


def _iter_parquet(src: Location, batch_rows: int) -> Iterator[RawItem]:
    index = 0
    for file in source_files(src):
        try:
            reader = pq.ParquetFile(file.path, filesystem=file.fs)
        except (pa.ArrowInvalid, OSError) as err:
            raise InputError(f"{file.uri} is not a readable Parquet file: {err}") from None
        for batch in reader.iter_batches(batch_size=batch_rows):
            for record in batch.to_pylist():
                yield RawItem(index, record)
                index += 1


def peek_first(source: str | Location, fmt: SourceFormat) -> Any:
    """The first record, read to fail fast on a file that is wrong as a whole."""
    for item in iter_records(source, fmt, batch_rows=1):
        return item.record
    return None


class DuplicateTracker:
    """Marks records whose id was already seen; the first occurrence wins.

    Holds one Python string per distinct id (about 80 MB per million ids).
    """

    def __init__(self) -> None:
        self._first: dict[str, int] = {}

    def mark(self, item: RawItem) -> None:
        if item.error is not None:
            return
        key = record_id(item.record)
        if key is None:
            return
        first = self._first.setdefault(key, item.index)
        if first != item.index:
            item.duplicate_of = first


def chunked(items: Iterator[RawItem], size: int) -> Iterator[list[RawItem]]:
    while chunk := list(islice(items, size)):
        yield chunk


def normalize_chunk(
    items: list[RawItem], source: str, policy: ImagePolicy
) -> tuple[pa.Table, pa.Table]:
    """Normalise a chunk of raw records into (pool rows, rejects); every item lands in one of them."""
    accepted: list[dict] = []
    rejected: list[dict] = []
    for item in items:
        if item.error is not None:
            rejected.append(
                make_reject(item.record, item.index, source, "malformed_json", item.error)
            )
            continue
        if item.duplicate_of is not None:
            rejected.append(
                make_reject(
                    item.record,
                    item.index,
                    source,
                    "duplicate_id",
                    f"duplicate id {record_id(item.record)!r}: first seen at record {item.duplicate_of}",
                )
            )
            continue
        row, reject = normalize_record(item.record, item.index, source, policy)
        if row is not None:
            accepted.append(row)
        else:
            rejected.append(reject)
    return (
        pa.Table.from_pylist(accepted, schema=POOL_SCHEMA),
        pa.Table.from_pylist(rejected, schema=REJECT_SCHEMA),
    )
