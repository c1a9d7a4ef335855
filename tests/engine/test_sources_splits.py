"""Splits of a source: read one by one, they give every record once, in order, whatever
the split size; the JSON scan keeps its string and escape state across blocks; duplicate
ids found bucket by bucket are those one process finds."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine import sources
from engine.errors import InputError
from engine.ingest import find_duplicates, id_buckets, mark_duplicates
from engine.sources import RawItem, iter_split, plan_splits

# Text that a naive splitter would cut at: commas, brackets and quotes inside strings,
# escaped quotes after runs of backslashes, a backslash ending a string, non-ASCII.
TRICKY = ["a, b", "[x]", '{"y": 1}', 'say "hi"', "back\\", "\\\\\\", 'q\\"q', "é ∑ 漢", ""]


def tricky_records(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = "".join(rng.choice(TRICKY) for _ in range(rng.randint(0, 6)))
        turns = [{"from": "human", "value": text}, {"from": "gpt", "value": rng.choice(TRICKY)}]
        out.append({"id": f"r{i}", "conversations": turns, "n": [[i, [text]], {}]})
    out.append(5)  # a record that is not an object still counts (and is rejected later)
    return out


def read_all(path, fmt: str, **kw) -> list[RawItem]:
    items, first = [], 0
    for split in plan_splits(str(path), fmt, **kw):
        got = list(iter_split(split, fmt, first))
        if split.records is not None:
            assert len(got) == split.records, split
        items += got
        first += len(got)
    return items


@pytest.mark.parametrize("block", [7, 64, 1 << 22])
@pytest.mark.parametrize("split_bytes", [1, 600, 1 << 30])
def test_a_json_array_read_split_by_split_is_the_array(tmp_path, monkeypatch, block, split_bytes):
    monkeypatch.setattr(sources, "SCAN_BLOCK", block)  # carries state across many blocks
    records = tricky_records(40)
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1 if block == 7 else None))
    splits = plan_splits(str(path), "json", split_bytes=split_bytes)
    assert len(splits) == {1: len(records), 1 << 30: 1}.get(split_bytes, len(splits))
    assert 1 < len(splits) < len(records) or split_bytes != 600
    items = read_all(path, "json", split_bytes=split_bytes)
    assert [i.record for i in items] == records
    assert [i.index for i in items] == list(range(len(records)))


def test_a_json_array_with_a_byte_order_mark_and_an_empty_one(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(tricky_records(3)).encode())
    assert [i.record for i in read_all(path, "json", split_bytes=10)] == tricky_records(3)
    empty = tmp_path / "empty.json"
    empty.write_text("[ \n ]")
    assert read_all(empty, "json") == []


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('[{"id": "a"}, {"id": "b"', "ends inside it"),
        ('[{"id": "a"}, "unterminated', "ends inside it"),
        ('[{"id": "a"}] [{"id": "b"}]', "more follows"),
        ('[{"id": "a"}]]', "more follows"),
    ],
)
def test_a_json_array_that_is_not_one_array_is_refused_by_the_scan(tmp_path, text, why):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(InputError, match=f"not a well-formed JSON array.*{why}"):
        plan_splits(str(path), "json")


@pytest.mark.parametrize("split_bytes", [1, 5, 37, 1 << 30])
def test_jsonl_split_by_bytes_holds_each_line_once(tmp_path, split_bytes):
    lines = [json.dumps(r) for r in tricky_records(30)]
    lines[3], lines[17] = "{not json", "   "  # one malformed line, one blank one
    lines.insert(9, "")
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(lines))  # no newline after the last line
    splits = plan_splits(str(path), "jsonl", split_bytes=split_bytes)
    assert [s.start for s in splits[1:]] == [s.end for s in splits[:-1]]  # they tile the file
    assert splits[0].start == 0 and splits[-1].end == path.stat().st_size
    items = read_all(path, "jsonl", split_bytes=split_bytes)
    kept = [line for line in lines if line.strip()]
    assert [i.index for i in items] == list(range(len(kept)))
    for item, line in zip(items, kept, strict=True):
        assert (item.error is not None) == (line == "{not json")
        if item.error is None:
            assert item.record == json.loads(line)


def test_parquet_splits_are_runs_of_row_groups(tmp_path):
    table = pa.table({"id": [f"p{i}" for i in range(100)], "x": list(range(100))})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=7)
    splits = plan_splits(str(tmp_path / "a.parquet"), "parquet", split_rows=20)
    assert [s.records for s in splits] == [21, 21, 21, 21, 16]
    assert [
        i.record["x"] for i in read_all(tmp_path / "a.parquet", "parquet", split_rows=20)
    ] == list(range(100))


def test_duplicates_found_bucket_by_bucket_are_the_first_wins_rule():
    rng = np.random.default_rng(0)
    ids = [f"id{v}" for v in rng.integers(0, 300, 1000)] + ["x\ud800", "x\ud800"]
    items = [RawItem(i, {"id": v}) for i, v in enumerate(ids)]
    items[5] = RawItem(5, "text", error="malformed")  # no id: never a duplicate
    first, want = {}, {}
    for item in items:
        if item.error is None:
            f = first.setdefault(item.record["id"], item.index)
            if f != item.index:
                want[item.index] = f
    # split the records into uneven parts, each hashed into 4 buckets, as the ingest tasks do
    cuts = [0, 1, 250, 251, 700, len(items)]
    parts = [id_buckets(items[a:b], 4)[1] for a, b in zip(cuts, cuts[1:], strict=False)]
    found = np.concatenate([find_duplicates([p[b] for p in parts]) for b in range(4)])
    assert dict(map(tuple, found.tolist())) == want
    # JSONL parts learn their first index late: local indices plus offsets give the same
    local = [
        id_buckets([RawItem(i - a, it.record, it.error) for i, it in enumerate(items[a:b], a)], 4)[
            1
        ]
        for a, b in zip(cuts, cuts[1:], strict=False)
    ]
    late = np.concatenate([find_duplicates([p[b] for p in local], cuts[:-1]) for b in range(4)])
    assert sorted(map(tuple, late.tolist())) == sorted(want.items())
    marked = mark_duplicates([RawItem(i.index, i.record, i.error) for i in items])
    assert {i.index: i.duplicate_of for i in marked if i.duplicate_of is not None} == want
