"""LLaVA-format sources: their format, their splits, and the records of one split.

Sources: LLaVA JSON (one array), JSONL (one record per line; a malformed line is one
reject) and Parquet (a file or a directory of files). Ingest parses a source in parallel
tasks, one per :class:`Split`; the splits in order hold every record once, in source
order, so a record's index is its split's first index plus its place in the split.

* Parquet: runs of whole row groups of at least ``split_rows`` rows; record counts come
  from the footers, for free.
* JSONL: byte ranges of ``split_bytes``; a split holds the lines that start inside it.
  Counts are known once a task has read the split.
* JSON array: :func:`scan_json_array` reads the file once, in blocks, and finds the
  commas between top-level records (string and escape state tracked with numpy); splits
  end on such a comma about ``split_bytes`` apart and carry their record counts. The scan
  is the one serial step of a JSON source (docs/ingest.md has its rate); a truncated
  array is refused there, before any task starts.

Nothing here holds more than one block or one split of a source.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any, Literal

import ijson
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engine.errors import InputError
from engine.workspace import Location

SourceFormat = Literal["json", "jsonl", "parquet"]
# LLaVA records nest three levels (record, turns, turn). A deeper one is refused before
# pickling it to a Ray task or rendering it for the rejects file, both of which recurse.
MAX_DEPTH = 64
BOM = b"\xef\xbb\xbf"  # what Windows tools put before UTF-8 JSON
SPLIT_BYTES = 16 << 20
SCAN_BLOCK = 4 << 20  # bytes the JSON scan holds at once (its arrays: ~20x this)


@dataclass
class RawItem:
    """One record as read from the source, before normalisation.

    ``record`` is the parsed value (any JSON type), or a text snippet with ``error`` set
    when it could not be parsed; ``duplicate_of`` is the record index of an earlier
    record with the same id.
    """

    index: int
    record: Any
    error: str | None = None
    duplicate_of: int | None = None


@dataclass(frozen=True)
class Split:
    """The part of a source one task reads: bytes [start, end) of a JSON or JSONL file, or
    row groups [start, end) of a Parquet file. ``records`` is known for JSON and Parquet
    (None for JSONL: a task counts them)."""

    uri: str
    start: int
    end: int
    records: int | None


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
    return sum(_parquet(f).metadata.num_rows for f in source_files(source))


def plan_splits(
    source: str | Location,
    fmt: SourceFormat,
    split_bytes: int = SPLIT_BYTES,
    split_rows: int = 4096,
) -> list[Split]:
    """The source's splits, in source order (see the module docstring).

    Raises:
        InputError: a Parquet file is unreadable, or a JSON array is not well formed as a
            whole (truncated, not an array, data after it).
    """
    splits: list[Split] = []
    for file in source_files(source):
        if fmt == "parquet":
            splits += _parquet_splits(file, split_rows)
        elif fmt == "json":
            splits += scan_json_array(file, split_bytes)
        else:
            size = file.fs.get_file_info(file.path).size or 0
            splits += [Split(file.uri, start, min(start + split_bytes, size), None)
                       for start in range(0, size, split_bytes)]  # fmt: skip
    return splits


def iter_split(split: Split, fmt: SourceFormat, first: int, batch_rows: int = 2048):
    """Yield the split's records as RawItems numbered from ``first``.

    Raises:
        InputError: a JSON split does not parse (ijson's reason, with the record index).
    """
    src = Location.of(split.uri)
    if fmt == "json":
        yield from _json_split(src, split, first)
    elif fmt == "jsonl":
        yield from _jsonl_split(src, split, first)
    else:
        yield from _parquet_split(src, split, first, batch_rows)


def iter_ids(split: Split, fmt: SourceFormat, first: int) -> Iterator[RawItem]:
    """Like :func:`iter_split`, but a Parquet split reads its ``id`` column only."""
    if fmt != "parquet":
        yield from iter_split(split, fmt, first)
        return
    src = Location.of(split.uri)
    pf = _parquet(src)
    index = first
    groups = list(range(split.start, split.end))
    if "id" not in pf.schema_arrow.names:
        for _ in range(split.records or 0):
            yield RawItem(index, {})
            index += 1
        return
    for batch in pf.iter_batches(row_groups=groups, columns=["id"]):
        for value in batch.column(0).to_pylist():
            yield RawItem(index, {"id": value})
            index += 1


def iter_records(
    source: str | Location, fmt: SourceFormat, batch_rows: int = 2048
) -> Iterator[RawItem]:
    """Yield every record of the source in order, numbered from 0: its splits one by one.

    Raises:
        InputError: the file as a whole is not what its format says (a truncated JSON
            array, a JSON object where an array was expected, an unreadable Parquet file).
    """
    first = 0
    for split in plan_splits(source, fmt):
        for item in iter_split(split, fmt, first, batch_rows):
            yield item
            first = item.index + 1


def peek_first(source: str | Location, fmt: SourceFormat) -> Any:
    """The first record, read to fail fast on a file that is wrong as a whole."""
    for item in chain.from_iterable(iter_split(s, fmt, 0, 1) for s in plan_splits(source, fmt)):
        return item.record
    return None


# -- Parquet ---------------------------------------------------------------------------


def _parquet(file: Location) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(file.path, filesystem=file.fs)
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"{file.uri} is not a readable Parquet file: {err}") from None


def _parquet_splits(file: Location, split_rows: int) -> list[Split]:
    meta = _parquet(file).metadata
    splits, start, rows = [], 0, 0
    for g in range(meta.num_row_groups):
        rows += meta.row_group(g).num_rows
        if rows >= split_rows or g == meta.num_row_groups - 1:
            splits.append(Split(file.uri, start, g + 1, rows))
            start, rows = g + 1, 0
    return splits


def _parquet_split(src: Location, split: Split, first: int, batch_rows: int):
    index = first
    groups = list(range(split.start, split.end))
    for batch in _parquet(src).iter_batches(batch_size=batch_rows, row_groups=groups):
        for record in batch.to_pylist():
            yield RawItem(index, record)
            index += 1


# -- JSONL -----------------------------------------------------------------------------


def _jsonl_split(src: Location, split: Split, first: int):
    index = first
    with src.open() as raw:
        # A split holds the lines that start in [start, end): from start - 1, the rest of
        # the line under way belongs to the split before.
        raw.seek(max(split.start - 1, 0))
        with io.BufferedReader(raw) as f:
            if split.start > 0:
                f.readline()
            while f.tell() < split.end and (line := f.readline()):
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


# -- JSON array ------------------------------------------------------------------------

_DEPTH = np.zeros(256, np.int8)
_DEPTH[[ord("["), ord("{")]] = 1
_DEPTH[[ord("]"), ord("}")]] = -1
_STRUCTURAL = _DEPTH != 0
_STRUCTURAL[ord(",")] = True


def scan_json_array(file: Location, split_bytes: int = SPLIT_BYTES) -> list[Split]:
    """Splits of a JSON array file, each ending on a comma between top-level records.

    One pass over the file, ``SCAN_BLOCK`` bytes at a time. Per block (uint8, n): a quote
    counts unless an odd run of backslashes precedes it (runs carried across blocks); the
    string state is the parity of counted quotes; brackets and commas outside strings give
    the depth, and the commas at depth 1 separate records.

    Raises:
        InputError: the file does not hold exactly one array (it ends inside it, or more
            follows it).
    """
    splits: list[Split] = []
    in_string, depth, backslashes = 0, 0, 0
    start = end = None  # byte after the opening '[', byte of the closing ']'
    commas = 0  # top-level commas so far
    split_start, split_first = 0, 0  # byte and record (comma count) the open split starts at
    offset = 0
    with file.open() as f:
        if f.read(len(BOM)) == BOM:
            offset = len(BOM)
        else:
            f.seek(0)
        while block := f.read(SCAN_BLOCK):
            b = np.frombuffer(block, np.uint8)
            n = len(b)
            idx = np.arange(n, dtype=np.int32)
            # last[i]: the last index <= i that is not a backslash (before the block: -1 - run)
            last = np.maximum.accumulate(np.where(b == 92, -1 - backslashes, idx))
            quotes = np.flatnonzero(b == 34)
            before = np.where(quotes > 0, last[np.maximum(quotes - 1, 0)], -1 - backslashes)
            quotes = quotes[(quotes - 1 - before) % 2 == 0]
            backslashes = int(n - 1 - last[-1])
            toggles = np.zeros(n, np.int8)
            toggles[quotes] = 1
            parity = (in_string + np.cumsum(toggles, dtype=np.int32)) & 1
            in_string = int(parity[-1])
            pos = np.flatnonzero(_STRUCTURAL[b] & (parity == 0))
            if not len(pos):
                offset += n
                continue
            deltas = _DEPTH[b[pos]].astype(np.int64)
            after = depth + np.cumsum(deltas)
            if start is None:
                if depth == 0 and not (b[pos[0]] == ord("[") and after[0] == 1):
                    raise InputError(_not_an_array(file, "it does not start with '['"))
                start = offset + int(pos[0]) + 1
                split_start = start
            if end is not None or (after < 0).any() or ((after == 0)[:-1]).any():
                raise InputError(_not_an_array(file, "more follows the closing ']'"))
            top = offset + pos[(b[pos] == ord(",")) & (after == 1)]
            # a split ends on the first top-level comma at least split_bytes past its start
            while len(top):
                j = int(np.searchsorted(top, split_start + split_bytes))
                if j == len(top):
                    break
                at = int(top[j])
                number = commas + j  # this comma's number over the whole array
                splits.append(Split(file.uri, split_start, at, number - split_first + 1))
                split_start, split_first = at + 1, number + 1
                commas += j + 1
                top = top[j + 1 :]
            commas += len(top)
            depth = int(after[-1])
            if depth == 0:
                end = offset + int(pos[-1])
            offset += n
    if end is None:
        raise InputError(
            f"{file.uri} is not a well-formed JSON array (after record {commas}): the file ends "
            "inside it (truncated?); fix or re-export the file, or convert it to JSONL to "
            "reject bad lines one by one"
        )
    records = commas - split_first + 1
    if commas == 0 and not _read(file, split_start, end).strip():
        records = 0  # "[ ]"
    splits.append(Split(file.uri, split_start, end, records))
    return splits


def _not_an_array(file: Location, why: str) -> str:
    return (
        f"{file.uri} is not a well-formed JSON array: {why}; give one JSON array of records, "
        "or JSONL (one record per line)"
    )


def _read(file: Location, start: int, end: int) -> bytes:
    with file.open() as f:
        f.seek(start)
        return f.read(end - start)


def _json_split(src: Location, split: Split, first: int):
    index = first
    try:
        data = io.BytesIO(b"[" + _read(src, split.start, split.end) + b"]")
        for local, record in enumerate(ijson.items(data, "item", use_float=True)):
            index = first + local
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
