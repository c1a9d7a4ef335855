"""The benchmark reader: what makes a sample, and the reason for every refused record."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from engine.errors import InputError
from engine.target_input import benchmark_name, read_benchmark, require_usable


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    return buf.getvalue()


def test_records_become_samples_or_reasons(tmp_path):
    (tmp_path / "img.png").write_bytes(png())
    (tmp_path / "bad.png").write_bytes(b"nope")
    records = [
        {"id": "q1", "image": "img.png", "conversations": [
            {"from": "human", "value": "<image>\nHow many dogs?\nAnswer the question using a single word."}]},
        {"image": "img.png", "question": "Is it red?"},  # no id: one is made
        {"id": "q1", "image": "img.png", "question": "again"},
        {"id": "q4", "question": "no image"},
        {"id": "q5", "image": "img.png"},
        {"id": "q6", "image": "bad.png", "question": "x?"},
        {"id": "q7", "image": "../escape.png", "question": "x?"},
        {"id": "q8", "image": "img.png", "conversations": [{"from": "gpt", "value": "a"}]},
        ["not", "an", "object"],
    ]  # fmt: skip
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(records))
    bench = read_benchmark(str(path))
    assert bench.name == "bench" and bench.records == 9
    assert bench.ids == ["q1", "bench-1"]
    assert bench.questions == ["How many dogs?", "Is it red?"]
    assert bench.reject_counts() == {
        "duplicate_id": 1, "image_escapes_root": 1, "image_unreadable": 1,
        "missing_image": 1, "missing_question": 2, "not_an_object": 1,
    }  # fmt: skip
    bench.drop([True, False], "skill_description_failed", [None, "timeout"])
    assert bench.ids == ["q1"] and bench.rejects[-1]["reason"].endswith("timeout")


def test_whole_file_problems(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match="is empty"):
        read_benchmark(str(empty))
    blank = tmp_path / "b.json"
    blank.write_text("[]")
    with pytest.raises(InputError, match="holds no records"):
        read_benchmark(str(blank))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n')
    with pytest.raises(InputError, match="none of its 1 records is usable"):
        require_usable(read_benchmark(str(bad)))
    assert benchmark_name("/x/MME.parquet") == "MME"


@pytest.mark.parametrize("batch_rows", [1, 7, 64, 10_000])
def test_vectors_of_some_rows_stream_out_of_one_large_row_group(tmp_path, batch_rows):
    import numpy as np
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from engine.target_input import _vectors_at
    from engine.vectors import to_arrow

    vectors = np.random.default_rng(0).standard_normal((300, 5)).astype(np.float32)
    path = str(tmp_path / "space.parquet")
    pq.write_table(pa.table({"vector": to_arrow(vectors)}), path, row_group_size=300)
    rows = np.array([0, 6, 7, 150, 299], np.int64)
    got = _vectors_at(pafs.LocalFileSystem(), path, rows, batch_rows)
    assert np.array_equal(got, vectors[rows])
