"""Reading a target benchmark: image + question per sample, each bad record with its reason.

A benchmark file is LLaVA JSON, JSONL or Parquet (the ingest readers, ``engine.sources``).
A record needs an image and a question; its answer is not read. The question is
``question`` (or ``text`` / ``prompt``) when the record has one, else the human turns of
``conversations`` (an answer turn is optional), cleaned as the pool's are
(``engine.text.instruction_text``: the skill prompt sees the same text for both). Its
image is resolved and decoded by the pool's own rules (``engine.pool``): a path under the
image root, a URI, a ``data:`` URI, inline bytes, or a ``{bytes, path}`` object. A record
without an id gets ``<benchmark>-<record index>``.

Reject codes: ``malformed_json``, ``not_an_object``, ``duplicate_id``, ``missing_image``,
``missing_question``, ``bad_conversations``, ``invalid_unicode``, and the pool's image codes
(``bad_image_type``, ``multi_image``, ``image_escapes_root``, ``image_not_found``,
``image_unreadable``).
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engine.errors import InputError
from engine.pool import (
    ImagePolicy,
    Rejected,
    _check_image,
    _image_bytes,
    _storable,
    _unicode,
    raw_snippet,
    record_id,
)
from engine.sources import detect_format, iter_records
from engine.text import instruction_text
from engine.workspace import Location

QUESTION_KEYS = ("question", "text", "prompt")


@dataclass
class Benchmark:
    """The usable samples of one benchmark file, in file order, and what was refused.

    ids / images / questions: one entry per usable sample (images: encoded bytes).
    rejects: one dict per refused record: record_index, id, reason_code, reason, raw.
    """

    name: str
    path: str
    records: int = 0
    ids: list[str] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    questions: list[str] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def reject_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(r["reason_code"] for r in self.rejects).items()))

    def drop(self, keep: list[bool], code: str, reasons: list[str | None]) -> None:
        """Refuse the usable samples where ``keep`` is False, with ``code`` and their reason."""
        kept = ([], [], [])
        for i, ok in enumerate(keep):
            if ok:
                kept[0].append(self.ids[i])
                kept[1].append(self.images[i])
                kept[2].append(self.questions[i])
            else:
                reason = f"{code}: {reasons[i]}" if reasons[i] else code
                self.rejects.append(
                    {"record_index": -1, "id": self.ids[i], "reason_code": code,
                     "reason": reason, "raw": self.questions[i][:200]}
                )  # fmt: skip
        self.ids, self.images, self.questions = kept


def benchmark_name(path: str) -> str:
    """The name a benchmark file goes by: its file name without extension."""
    if "://" in path:
        path = urllib.parse.urlsplit(path).path  # without a URI's query options
    base = os.path.basename(path.rstrip("/"))
    for ext in (".parquet", ".jsonl", ".ndjson", ".json"):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return base


def _question(record: dict) -> str:
    for key in QUESTION_KEYS:
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return instruction_text([{"from": "human", "value": value}])
    turns = record.get("conversations")
    if turns is None:
        raise Rejected("missing_question", "record has no question and no conversations")
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            raise Rejected("bad_conversations", "'conversations' is not a JSON list") from None
    if not isinstance(turns, list) or not all(
        isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns
    ):
        raise Rejected("bad_conversations", "'conversations' is not a list of {from, value}")
    human = [t for t in turns if t.get("from") in ("human", "user")]
    text = instruction_text({"from": "human", "value": t["value"]} for t in human)
    if not text:
        raise Rejected("missing_question", "the record's human turns hold no question")
    return text


def read_benchmark(
    path: str, *, name: str | None = None, image_root: str | None = None
) -> Benchmark:
    """Every record of ``path`` as a usable sample or a reject (never raises for a record).

    Args:
        path: a LLaVA JSON / JSONL / Parquet file (or a directory of Parquet files).
        name: the benchmark's name (default: the file name without extension).
        image_root: where image paths resolve (default: the file's folder).
    Raises:
        InputError: the file is missing, empty, or not readable as a whole (named).
    """
    name = name or benchmark_name(path)
    where = Location.of(path)
    info = where.fs.get_file_info(where.path)
    if info.type == pafs.FileType.NotFound:  # detect_format's words are ingest's
        raise InputError(
            f"benchmark file not found: {path} (pass --benchmark a LLaVA JSON, JSONL or "
            "Parquet file: a local path or a URI such as s3://bucket/bench.json)"
        )
    if info.type == pafs.FileType.File and info.size == 0:
        raise InputError(f"benchmark file {path} is empty: it holds no records")
    fmt = detect_format(where)
    root = image_root or where.uri_of(PurePosixPath(where.path).parent.as_posix())
    policy = ImagePolicy(root=root, check="decode")
    out = Benchmark(name=name, path=path)
    seen: dict[str, int] = {}
    for item in iter_records(where, fmt):
        out.records += 1
        record = item.record
        try:
            if item.error is not None:
                raise Rejected("malformed_json", item.error)
            if not isinstance(record, dict):
                raise Rejected("not_an_object", f"record is a {type(record).__name__}")
            sample_id = _unicode(record_id(record) or f"{name}-{item.index}", "'id'")
            if sample_id in seen:
                raise Rejected(
                    "duplicate_id", f"id {sample_id!r} first seen at record {seen[sample_id]}"
                )
            question = _unicode(_question(record), "the question")
            if record.get("image") is None:
                raise Rejected("missing_image", "record names no image")
            data, ref = _image_bytes(record["image"], policy)
            _check_image(data, "decode", ref or "inline image")
        except Rejected as rej:
            sample_id = record_id(record)
            out.rejects.append(
                {"record_index": item.index, "reason_code": rej.code, "reason": rej.reason,
                 "id": None if sample_id is None else _storable(sample_id),
                 "raw": raw_snippet(record, 300)}
            )  # fmt: skip
            continue
        seen[sample_id] = item.index
        out.ids.append(sample_id)
        out.images.append(data)
        out.questions.append(question)
    if out.records == 0:
        raise InputError(f"benchmark file {path} holds no records")
    return out


def require_usable(bench: Benchmark) -> None:
    """Raise InputError when no sample of ``bench`` is usable, with the reasons counted."""
    if len(bench):
        return
    counts = ", ".join(f"{n} {code}" for code, n in bench.reject_counts().items())
    example = bench.rejects[0]["reason"] if bench.rejects else ""
    raise InputError(
        f"benchmark {bench.name!r} ({bench.path}): none of its {bench.records} records is "
        f"usable ({counts}; e.g. {example}); each sample needs an image and a question"
    )


def reference_sample(
    ws, clip_files: list[str], skill_files: list[str], n: int, seed: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Up to ``n`` pool samples with a vector in both spaces, seeded, as reference queries.

    Reads the ids of skill shards in a seeded order until it has ``4n`` candidates (the
    skill space may lack rows whose description failed), draws ``n`` of them, then
    streams the vectors of only the drawn rows from each space, shard by shard: the
    driver holds O(n) vectors and one shard's ids, never a whole space.
    Returns ``(ids, concept (m, d_c) float32, skill (m, d_s) float32)``, m <= n.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    rng = np.random.default_rng(seed)
    id_parts, files, count = [], [], 0
    for f in rng.permutation(len(skill_files)):
        id_parts.append(_id_column(ws.fs, skill_files[f]))
        files.append(skill_files[f])
        count += len(id_parts[-1])
        if count >= 4 * n:
            break
    if not count:
        return [], np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    pick = np.sort(rng.choice(count, min(n, count), replace=False))
    wanted = pa.concat_arrays(id_parts).take(pa.array(pick))
    starts = np.cumsum([0] + [len(c) for c in id_parts])
    per_file = [
        pick[(pick >= a) & (pick < b)] - a for a, b in zip(starts[:-1], starts[1:], strict=True)
    ]
    skill = np.concatenate(
        [_vectors_at(ws.fs, f, rows) for f, rows in zip(files, per_file, strict=True) if rows.size]
    )
    concept = None
    found = np.zeros(len(pick), bool)
    for f in clip_files:
        at = pc.index_in(_id_column(ws.fs, f), value_set=wanted)  # place among the drawn
        rows = np.flatnonzero(at.is_valid().to_numpy(zero_copy_only=False))
        if not rows.size:
            continue
        got = _vectors_at(ws.fs, f, rows)
        if concept is None:
            concept = np.zeros((len(pick), got.shape[1]), np.float32)
        places = at.take(pa.array(rows)).to_numpy()
        concept[places], found[places] = got, True
    keep = np.flatnonzero(found)
    if concept is None:
        return [], np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return wanted.take(pa.array(keep)).to_pylist(), concept[keep], skill[keep]


def _id_column(fs: pafs.FileSystem, path: str):
    return pq.read_table(path, columns=["id"], filesystem=fs).column("id").combine_chunks()


def _vectors_at(fs: pafs.FileSystem, path: str, rows: np.ndarray, batch_rows: int = 16_384):
    """float32 (len(rows), d) vectors of one embedding shard at the sorted local ``rows``
    (int64), streamed a batch at a time: a shard may be one row group of 200k x 384."""
    import pyarrow as pa

    from engine.vectors import from_arrow

    pf = pq.ParquetFile(path, filesystem=fs, buffer_size=1 << 20, pre_buffer=False)
    parts, start = [], 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=["vector"]):
        lo, hi = np.searchsorted(rows, [start, start + batch.num_rows])
        if hi > lo:
            taken = batch.column(0).take(pa.array(rows[lo:hi] - start))
            parts.append(from_arrow(taken).reshape(hi - lo, -1))
        start += batch.num_rows
        if hi == len(rows):
            break
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
