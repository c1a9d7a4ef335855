"""Streaming readers, format detection, duplicate marking and chunk normalisation."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.errors import InputError
from engine.ingest import chunked, mark_duplicates, normalize_chunk
from engine.pool import ImagePolicy
from engine.sources import count_records, detect_format, iter_records, peek_first, source_files

CONV = [{"from": "human", "value": "q?"}, {"from": "gpt", "value": "a"}]


def records(n):
    return [{"id": f"r{i}", "conversations": CONV} for i in range(n)]


def test_json_array_streams_in_order(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records(5)))
    assert detect_format(str(path)) == "json"
    got = list(iter_records(str(path), "json"))
    assert [i.index for i in got] == list(range(5))
    assert got[3].record["id"] == "r3"


def test_truncated_json_array_is_a_file_error(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records(5))[:-20])
    with pytest.raises(InputError, match="not a well-formed JSON array"):
        list(iter_records(str(path), "json"))


def test_json_object_is_read_as_jsonl_and_wrong_json_refused(tmp_path):
    obj = tmp_path / "one.json"
    obj.write_text('{"id": "a", "conversations": []}\n{"id": "b"}\n')
    assert detect_format(str(obj)) == "jsonl"
    text = tmp_path / "t.json"
    text.write_text("hello")
    with pytest.raises(InputError, match="does not start with"):
        detect_format(str(text))


def test_jsonl_bad_line_is_one_item(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": "a"}\n{not json\n\n{"id": "c"}\n')
    got = list(iter_records(str(path), "jsonl"))
    assert [i.index for i in got] == [0, 1, 2]
    assert got[1].error and got[0].error is None and got[2].record == {"id": "c"}


def test_parquet_directory(tmp_path):
    d = tmp_path / "pq"
    d.mkdir()
    for k in range(2):
        pq.write_table(pa.Table.from_pylist(records(3)), d / f"part-{k}.parquet")
    assert detect_format(str(d)) == "parquet"
    got = list(iter_records(str(d), "parquet", batch_rows=2))
    assert [i.index for i in got] == list(range(6))
    assert got[4].record["conversations"][1]["value"] == "a"


def test_a_file_uri_reads_as_its_path(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records(3)))
    uri = f"file://{path}"
    assert detect_format(uri) == "jsonl"
    assert [i.record["id"] for i in iter_records(uri, "jsonl")] == ["r0", "r1", "r2"]


def test_sources_on_an_object_store_read_like_local_ones(s3_server):
    fs = s3_server.fs()
    with fs.open_output_stream("vlbucket/readers/a.json") as out:
        out.write(json.dumps(records(4)).encode())
    with fs.open_output_stream("vlbucket/readers/b.jsonl") as out:
        out.write(("".join(json.dumps(r) + "\n" for r in records(2)) + "{oops\n").encode())
    for k in range(2):
        pq.write_table(
            pa.Table.from_pylist(records(3)), f"vlbucket/readers/pq/part-{k}.parquet", filesystem=fs
        )

    def uri(name: str) -> str:
        return s3_server.uri(f"readers/{name}")

    assert detect_format(uri("a.json")) == "json"
    got = list(iter_records(uri("a.json"), "json"))
    assert [i.record["id"] for i in got] == ["r0", "r1", "r2", "r3"]
    lines = list(iter_records(uri("b.jsonl"), detect_format(uri("b.jsonl"))))
    assert [i.error is None for i in lines] == [True, True, False]
    folder = uri("pq")
    assert detect_format(folder) == "parquet" and count_records(folder, "parquet") == 6
    files = source_files(folder)
    assert [f.name for f in files] == ["part-0.parquet", "part-1.parquet"]
    assert all(f.uri.startswith("s3://vlbucket/readers/pq/part-") for f in files)
    assert all("endpoint_override=" in f.uri for f in files)  # any node can open them
    assert [i.index for i in iter_records(folder, "parquet", batch_rows=2)] == list(range(6))
    with pytest.raises(InputError, match="source not found"):
        detect_format(uri("nope.json"))


def test_missing_and_unreadable_sources(tmp_path):
    with pytest.raises(InputError, match="source not found"):
        detect_format(str(tmp_path / "nope.json"))
    with pytest.raises(InputError, match="URI 'nosuchfs://bucket/x.json' is not usable"):
        detect_format("nosuchfs://bucket/x.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no .parquet"):
        detect_format(str(empty))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="not a readable Parquet"):
        peek_first(str(bad), "parquet")


def test_duplicates_first_wins_and_chunk_keeps_every_row(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = [json.dumps(r) for r in records(4)] + [json.dumps(records(1)[0]), "{oops"]
    path.write_text("\n".join(lines) + "\n")
    items = mark_duplicates(list(iter_records(str(path), "jsonl")))
    assert items[4].duplicate_of == 0 and items[0].duplicate_of is None
    chunks = list(chunked(iter(items), 4))
    assert [len(c) for c in chunks] == [4, 2]
    pool, rejects = normalize_chunk(items, "a.jsonl", ImagePolicy(None))
    assert pool.num_rows + rejects.num_rows == len(items)
    assert sorted(rejects.column("reason_code").to_pylist()) == ["duplicate_id", "malformed_json"]
    dup = rejects.filter(pa.compute.equal(rejects["reason_code"], "duplicate_id")).to_pylist()[0]
    assert "first seen at record 0" in dup["reason"]
