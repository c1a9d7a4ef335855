"""Fuzzing every parser a user's input meets: pool records, pool files, benchmark files,
YAML configs and ``--set`` overrides.

The only outcomes allowed: accepted, rejected with a reason (a reject record), or one
``InputError``. Any other exception is a bug. Each test also checks what must hold
whatever the input: rows in = accepted + rejected, no row accepted from outside the
image root, a built config that validates again.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.config import build_config, load_yaml_file, parse_set_overrides
from engine.errors import InputError
from engine.ingest import mark_duplicates, normalize_chunk
from engine.pool import ImagePolicy
from engine.sources import RawItem, detect_format, iter_records
from engine.target_input import read_benchmark, require_usable
from jobs.ingest import IngestConfig
from jobs.registry import STAGES
from jobs.skills import SkillsConfig
from jobs.target import TargetConfig
from jobs.world import WorldJobConfig

FUZZ = settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
EXAMPLES = {"records": 200, "pool files": 150, "benchmark files": 150, "yaml": 150, "set": 150}

# Every reason a pool record can be refused for (README's table).
POOL_CODES = {
    "not_an_object", "missing_id", "bad_id_type", "duplicate_id", "missing_conversations",
    "empty_conversations", "bad_conversations", "image_token_without_image", "multi_image",
    "bad_image_type", "image_escapes_root", "image_not_found", "image_unreadable",
    "malformed_json", "invalid_unicode",
}  # fmt: skip
BENCH_CODES = POOL_CODES | {"missing_image", "missing_question"}
STAGE_MODELS = {
    "world": WorldJobConfig,
    "ingest": IngestConfig,
    "skills": SkillsConfig,
    "target": TargetConfig,
}


def png(color: str, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


GOOD_PNG = png("red", (8, 6))
SECRET_PNG = png("blue", (5, 5))  # outside the root: no accepted row may ever hold it


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """An image root with good, broken and escaping entries, a secret beside it, and a
    scratch folder for the files the examples write."""
    base = tmp_path_factory.mktemp("fuzz")
    root = base / "images"
    (root / "sub").mkdir(parents=True)
    (root / "ok.png").write_bytes(GOOD_PNG)
    (root / "sub" / "ok.png").write_bytes(GOOD_PNG)
    (root / "broken.png").write_bytes(GOOD_PNG[:30])
    (base / "secret.png").write_bytes(SECRET_PNG)
    os.symlink(base / "secret.png", root / "link.png")
    os.symlink(base, root / "updir")
    os.symlink(root / "ok.png", root / "inside-link.png")
    (base / "files").mkdir()
    return base


_names = itertools.count()


def scratch(place: Path, suffix: str) -> Path:
    return place / "files" / f"f{next(_names)}{suffix}"


# -- strategies ---------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["", " ", "x\ud800", "a\x00b", "<image>", "9" * 30])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=10,
)
texts = st.text(max_size=16) | st.sampled_from(
    ["<image>\nWhat colour?", "<image><image>", "<image>", "", "  ", "q\udfff", "What?"]
)
turns = st.fixed_dictionaries(
    {
        "from": st.sampled_from(["human", "gpt", "user", "assistant", "system", "", 3]),
        "value": texts | json_values,
    }
)
good_turns = st.just(
    [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
)
conversations = (
    good_turns
    | st.lists(turns | json_values, max_size=5)
    | st.lists(turns, max_size=4).map(json.dumps)  # Parquet exports' JSON-string turns
    | json_values
)
paths = st.sampled_from(
    [
        "ok.png", "sub/ok.png", "./ok.png", "sub/../ok.png", "inside-link.png", "missing.png",
        "broken.png", "sub", "../secret.png", "sub/../../secret.png", "link.png",
        "updir/secret.png", "file://../secret.png", "/etc/hostname", "s3://bucket/x.png",
        "nosuchfs://x", "ok\x00.png", "ok\ud800.png", "x" * 300, "",
        "data:image/png;base64," + base64.b64encode(GOOD_PNG).decode(), "data:,@@@",
    ]
)  # fmt: skip
images = (
    paths
    | st.binary(max_size=40)
    | st.just(GOOD_PNG)
    | st.fixed_dictionaries(
        {"bytes": st.just(GOOD_PNG) | st.binary(max_size=10) | json_values, "path": paths | scalars}
    )
    | st.lists(paths, max_size=3)
    | json_values
)
ids = st.sampled_from(["a", "b", "c", "", " ", "x\ud800"]) | st.integers(-2, 2) | json_values
records = (
    st.fixed_dictionaries({"id": ids, "conversations": conversations}, optional={"image": images})
    | st.fixed_dictionaries(
        {}, optional={"id": ids, "image": images, "conversations": conversations}
    )
    | json_values
)


def storable(table: pa.Table) -> None:
    """Write ``table`` as the ingest task does: Arrow refuses what Parquet cannot hold."""
    pq.write_table(table, pa.BufferOutputStream())


def check_chunk(items: list[RawItem], root: Path) -> tuple[pa.Table, pa.Table]:
    mark_duplicates(items)
    pool, rejects = normalize_chunk(items, "fuzz", ImagePolicy(str(root)))
    assert pool.num_rows + rejects.num_rows == len(items)  # rows in = accepted + rejected
    indices = pool.column("record_index").to_pylist() + rejects.column("record_index").to_pylist()
    assert sorted(indices) == [item.index for item in items]  # each row lands exactly once
    for row in rejects.to_pylist():
        assert row["reason_code"] in POOL_CODES and row["reason"].strip(), row
    rows = pool.to_pylist()
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert row["question"] and row["answer"].strip(), row
        assert row["image"] != SECRET_PNG and (row["width"], row["height"]) != (5, 5), row
    storable(pool)
    storable(rejects)
    return pool, rejects


# -- pool records -------------------------------------------------------------------------


@settings(FUZZ, max_examples=EXAMPLES["records"])
@given(batch=st.lists(records, min_size=1, max_size=6))
def test_fuzz_pool_records_are_accepted_or_rejected_with_a_reason(batch, place):
    check_chunk([RawItem(i, r) for i, r in enumerate(batch)], place / "images")


# -- pool files ---------------------------------------------------------------------------


def mutate(data: bytes, edits: list[tuple[float, int]], cut: float | None) -> bytes:
    out = bytearray(data)
    for where, byte in edits:
        if out:
            out[int(where * (len(out) - 1))] = byte
    return bytes(out[: int(cut * len(out))] if cut is not None else out)


def _jsonable(value: bytes) -> str:  # JSON has no bytes: a file carries them as base64
    return base64.b64encode(value).decode()


def as_json(batch: list) -> bytes:
    return json.dumps(batch, default=_jsonable).encode()


def as_jsonl(batch: list) -> bytes:
    return b"".join(json.dumps(r, default=_jsonable).encode() + b"\n" for r in batch)


pool_file_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(
        mutate,
        st.lists(records, max_size=4).map(as_json) | st.lists(records, max_size=4).map(as_jsonl),
        st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=3),
        st.none() | st.floats(0, 1),
    ),
)


@settings(FUZZ, max_examples=EXAMPLES["pool files"])
@given(data=pool_file_bytes, suffix=st.sampled_from([".json", ".jsonl"]))
def test_fuzz_pool_files_are_read_row_for_row_or_refused_whole(data, suffix, place):
    path = scratch(place, suffix)
    path.write_bytes(data)
    try:
        fmt = detect_format(str(path))
        items = list(iter_records(str(path), fmt))
    except InputError as err:
        assert str(err).strip()
        return
    if fmt == "jsonl":  # every non-blank line is one row, parsed or not
        assert len(items) == sum(1 for line in data.split(b"\n") if line.strip())
    else:
        try:
            expected = json.loads(data.removeprefix(b"\xef\xbb\xbf"))
        except (ValueError, RecursionError):
            expected = None
        if isinstance(expected, list):
            assert len(items) == len(expected)
    check_chunk(items, place / "images")


# -- benchmark files ----------------------------------------------------------------------

bench_records = (
    st.fixed_dictionaries(
        {},
        optional={
            "id": ids,
            "image": images,
            "question": texts | json_values,
            "text": texts,
            "conversations": conversations,
        },
    )
    | json_values
)
bench_file_bytes = st.one_of(
    st.builds(
        mutate,
        st.lists(bench_records, max_size=4).map(as_json)
        | st.lists(bench_records, max_size=4).map(as_jsonl),
        st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=2),
        st.none() | st.floats(0, 1),
    ),
    st.binary(max_size=200),
)


@settings(FUZZ, max_examples=EXAMPLES["benchmark files"])
@given(data=bench_file_bytes, suffix=st.sampled_from([".json", ".jsonl"]))
def test_fuzz_benchmark_files_give_samples_or_reasons(data, suffix, place):
    path = scratch(place, suffix)
    path.write_bytes(data)
    try:
        bench = read_benchmark(str(path), image_root=str(place / "images"))
    except InputError as err:
        assert str(err).strip()
        return
    assert bench.records == len(bench) + len(bench.rejects)
    if detect_format(str(path)) == "jsonl":
        assert bench.records == sum(1 for line in data.split(b"\n") if line.strip())
    assert len(set(bench.ids)) == len(bench.ids)
    assert all(q.strip() for q in bench.questions)
    assert SECRET_PNG not in bench.images
    for reject in bench.rejects:
        assert reject["reason_code"] in BENCH_CODES and reject["reason"].strip(), reject
        assert reject["id"] is None or reject["id"].encode()  # storable text
    try:
        require_usable(bench)
    except InputError:
        assert len(bench) == 0
    else:
        assert len(bench) > 0


# -- YAML configs and --set ---------------------------------------------------------------

field_names = sorted({name for model in STAGE_MODELS.values() for name in model.model_fields})
keys = st.sampled_from(
    [*field_names, "openai.timeout_s", "openai.api_key_env", "resources.num_cpus",
     "resources.custom.gpu_node", "transformers.device", "families.colour", "sise", ""]
) | st.text(max_size=10)  # fmt: skip
yaml_values = st.sampled_from(
    ["1", "-1", "0.5", "true", "null", "[1, 2]", "{a: 1}", "'x'", "[", "{", ": :", "!!binary aGk=",
     "2020-01-01", "1e400", ".nan", "*alias", "&a [*a]", "!!python/object:os.system x", "~"]
) | st.text(max_size=12)  # fmt: skip
stage_sections = st.dictionaries(
    st.sampled_from([*STAGE_MODELS, *list(STAGES)[:3], "wrld"]) | st.text(max_size=5),
    st.dictionaries(keys, json_values | yaml_values, max_size=4) | json_values,
    max_size=3,
)
yaml_texts = st.one_of(
    st.text(max_size=200),
    stage_sections.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.builds(
        lambda stage, items: f"{stage}:\n" + "".join(f"  {k}: {v}\n" for k, v in items),
        st.sampled_from(list(STAGE_MODELS)),
        st.lists(st.tuples(keys, yaml_values), max_size=4),
    ),
)


def built_or_refused(stage: str, layers: list[dict]) -> None:
    model = STAGE_MODELS[stage]
    try:
        cfg = build_config(stage, model, *layers)
    except InputError as err:
        assert str(err).strip()
        return
    assert isinstance(cfg, model)
    model.model_validate(cfg.model_dump())  # what was accepted is valid as written back


@settings(FUZZ, max_examples=EXAMPLES["yaml"])
@given(text=yaml_texts, raw=st.none() | st.binary(max_size=80))
def test_fuzz_yaml_config_files_build_a_config_or_say_why_not(text, raw, place):
    path = scratch(place, ".yaml")
    path.write_bytes(raw if raw is not None else text.encode("utf-8", "surrogatepass"))
    try:
        sections = load_yaml_file(path, sections=STAGES)
    except InputError as err:
        assert str(err).strip()
        return
    assert isinstance(sections, dict) and set(sections) <= set(STAGES)
    for stage in STAGE_MODELS:
        built_or_refused(stage, [sections])


set_items = st.lists(
    st.text(max_size=30)
    | st.builds(lambda k, v: f"{k}={v}", keys, yaml_values)
    | st.builds(lambda a, b, v: f"{a}.{b}={v}", keys, keys, yaml_values),
    max_size=4,
)


@settings(FUZZ, max_examples=EXAMPLES["set"])
@given(items=set_items, stage=st.sampled_from(list(STAGE_MODELS)))
def test_fuzz_set_overrides_build_a_config_or_say_why_not(items, stage):
    try:
        overrides = parse_set_overrides(items)
    except InputError as err:
        assert str(err).strip()
        return
    assert isinstance(overrides, dict)
    built_or_refused(stage, [{stage: overrides}])
