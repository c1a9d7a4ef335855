"""Bad input where docs/bad_input.md found no test: each case ends in a reject with its
reason, or in one InputError (exit 2) that names the problem and the fix.

Engine-level first (no Ray); the CLI cases at the end use the session's local Ray.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine.artifacts import Pool
from engine.config import build_config, load_yaml_file, parse_set_overrides
from engine.errors import InputError
from engine.ingest import mark_duplicates, normalize_chunk
from engine.pool import REJECT_SCHEMA, ImagePolicy, normalize_record
from engine.sources import MAX_DEPTH, detect_format, iter_records
from engine.target_input import read_benchmark
from engine.workspace import Workspace
from jobs.cli import main
from jobs.ingest import IngestConfig

CONV = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
TEXT_CONV = [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.png").write_bytes(png())
    return images


def reject(record, root: Path) -> dict:
    row, rej = normalize_record(record, 0, "src", ImagePolicy(str(root)))
    assert row is None, row
    assert rej["reason"], rej
    return rej


def nested(depth: int):
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def ingest_chunk(path: Path, root: Path | None = None) -> tuple[int, pa.Table, pa.Table]:
    """Read ``path`` as ingest does (format, records, duplicates) and normalise one chunk."""
    items = mark_duplicates(list(iter_records(str(path), detect_format(str(path)))))
    pool, rejects = normalize_chunk(items, path.name, ImagePolicy(str(root) if root else None))
    assert len(items) == pool.num_rows + rejects.num_rows  # rows in = accepted + rejected
    return len(items), pool, rejects


def codes(rejects: pa.Table) -> list[str]:
    return rejects.column("reason_code").to_pylist()


# -- pool records -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [10**12, -1, "aGVsbG8=", [300], 1.5])
def test_an_image_object_whose_bytes_are_not_bytes_is_rejected(value, root):
    # bytes(10**12) used to allocate a terabyte; bytes("...") raised TypeError and failed the chunk.
    rej = reject({"id": "a", "image": {"bytes": value, "path": None}, "conversations": CONV}, root)
    assert rej["reason_code"] == "bad_image_type"
    assert f"'bytes' is a {type(value).__name__}" in rej["reason"]


def test_lone_surrogates_are_rejected_and_the_chunk_survives(tmp_path, root):
    # "\ud800" is a valid JSON escape but not text: Arrow refused the whole chunk before.
    source = tmp_path / "s.jsonl"
    lines = [
        {"id": "good", "image": "ok.png", "conversations": CONV},
        {"id": "bad\ud800id", "conversations": TEXT_CONV},
        {"id": "t", "conversations": [{"from": "human", "value": "q\udfff"}, TEXT_CONV[1]]},
        {"id": "p", "image": "ok\udc80.png", "conversations": CONV},
        {"id": 1.5, "note": "raw\ud801"},  # rejected for another reason, raw kept
    ]
    source.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    n, pool, rejects = ingest_chunk(source, root)
    assert (n, pool.column("id").to_pylist()) == (5, ["good"])
    assert codes(rejects) == ["invalid_unicode"] * 3 + ["bad_id_type"]
    reasons = rejects.column("reason").to_pylist()
    assert "'id' holds a lone UTF-16 surrogate" in reasons[0]
    assert "turn 0 'value'" in reasons[1] and "'image'" in reasons[2]
    assert all("\\uD800-\\uDFFF" in r for r in reasons[:3])  # says how to fix it
    assert rejects.column("id").to_pylist()[0] == "bad\\ud800id"  # escaped, so storable
    assert "raw\\ud801" in rejects.column("raw").to_pylist()[3]
    pq.write_table(rejects, tmp_path / "rejects.parquet")  # what the ingest task writes
    assert pq.read_table(tmp_path / "rejects.parquet").num_rows == 4


def test_image_paths_that_no_file_can_have_are_rejected(root):
    rej = reject({"id": "a", "image": "ok\x00.png", "conversations": CONV}, root)
    assert rej["reason_code"] == "image_not_found" and "NUL byte" in rej["reason"]
    long_name = "x" * 5000 + ".png"  # ENAMETOOLONG from stat() used to escape as OSError
    rej = reject({"id": "a", "image": long_name, "conversations": CONV}, root)
    assert rej["reason_code"] in {"image_not_found", "image_unreadable"}


def test_an_unknown_uri_scheme_under_a_uri_root_is_an_escape():
    policy = ImagePolicy("mock:///images")  # pyarrow's in-memory filesystem stands for s3://
    record = {"id": "a", "image": "nosuchfs://bucket/x.png", "conversations": CONV}
    row, rej = normalize_record(record, 0, "src", policy)
    assert row is None and rej["reason_code"] == "image_escapes_root"
    assert "outside the image root" in rej["reason"]


def test_an_unusable_image_root_uri_is_an_input_error():
    with pytest.raises(InputError, match=r"image root 'nosuchfs://x'.*pass --images"):
        ImagePolicy("nosuchfs://x")


# -- pool files ---------------------------------------------------------------------------


def test_jsonl_lines_python_cannot_parse_are_one_reject_each(tmp_path):
    good = json.dumps({"id": "g", "conversations": TEXT_CONV})
    source = tmp_path / "s.jsonl"
    source.write_text(
        "\n".join(
            [
                good,
                '{"id": ' + "9" * 5000 + "}",  # ValueError: past Python's 4300-digit limit
                "[" * 100_000 + "]" * 100_000,  # RecursionError inside json.loads
                json.dumps({"id": "deep", "conversations": nested(MAX_DEPTH + 1)}),
            ]
        )
        + "\n"
    )
    n, pool, rejects = ingest_chunk(source)
    assert n == 4 and pool.column("id").to_pylist() == ["g"]
    assert codes(rejects) == ["malformed_json"] * 3
    reasons = rejects.column("reason").to_pylist()
    assert "4300 digits" in reasons[0] and "recursion" in reasons[1]
    assert f"nested more than {MAX_DEPTH} levels" in reasons[2]


def test_a_json_array_record_nested_too_deep_is_one_reject(tmp_path):
    # ijson builds it fine; pickling it to a Ray task or rendering it for rejects recursed.
    source = tmp_path / "s.json"
    good = json.dumps({"id": "g", "conversations": TEXT_CONV})
    source.write_text(f'[{good}, {{"id": "deep", "x": {"[" * 2000}{"]" * 2000}}}]')
    items = list(iter_records(str(source), "json"))
    pickle.dumps(items)  # what submitting the chunk to a Ray task does
    n, pool, rejects = ingest_chunk(source)
    assert n == 2 and pool.num_rows == 1 and codes(rejects) == ["malformed_json"]


def test_a_json_array_with_a_byte_order_mark_is_read(tmp_path):
    source = tmp_path / "windows.json"
    source.write_bytes(
        b"\xef\xbb\xbf" + json.dumps([{"id": "g", "conversations": TEXT_CONV}]).encode()
    )
    assert detect_format(str(source)) == "json"
    n, pool, _ = ingest_chunk(source)
    assert n == 1 and pool.column("id").to_pylist() == ["g"]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("pretty.json", json.dumps({"id": "a", "conversations": TEXT_CONV}, indent=2)),
        ("pretty.jsonl", json.dumps([{"id": "a", "conversations": TEXT_CONV}], indent=2)),
    ],
)
def test_pretty_printed_json_is_not_read_line_by_line(tmp_path, name, text):
    # Read as JSONL, every line of it would be its own malformed_json reject.
    (tmp_path / name).write_text(text)
    with pytest.raises(InputError, match=r"pretty-printed JSON.*jq -c"):
        detect_format(str(tmp_path / name))


def test_an_integer_too_large_in_a_json_array_is_a_file_error(tmp_path):
    source = tmp_path / "s.json"
    source.write_text('[{"id": ' + "9" * 400 + ', "conversations": []}]')
    with pytest.raises(InputError, match="not a well-formed JSON array.*integer overflow"):
        list(iter_records(str(source), "json"))


def test_a_json_array_holding_text_that_is_not_unicode_is_a_file_error(tmp_path):
    # ijson raised UnicodeDecodeError on a lone-surrogate escape (the fuzzer found it).
    source = tmp_path / "s.json"
    source.write_text('[{"id": "a", "conversations": []}, {"id": "q\\udfff"}]')
    with pytest.raises(InputError, match=r"not Unicode after record 0 .*convert the file to JSONL"):
        list(iter_records(str(source), "json"))


# -- benchmark files ----------------------------------------------------------------------


def test_benchmark_records_with_unstorable_text_or_odd_images_are_rejected(tmp_path):
    (tmp_path / "img.png").write_bytes(png())
    records = [
        {"id": "ok", "image": "img.png", "question": "How many?"},
        {"id": "s", "image": "img.png", "question": "How many\ud800?"},
        {"id": "s\udc00", "image": "img.png", "question": "What?"},
        {"id": "b", "image": {"bytes": "not bytes"}, "question": "What?"},
        {"id": "n", "image": "img\x00.png", "question": "What?"},
        {"id": "d", "image": "img.png", "question": "What?", "x": nested(MAX_DEPTH + 1)},
    ]
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    bench = read_benchmark(str(path))
    assert bench.ids == ["ok"] and bench.records == len(bench) + len(bench.rejects) == 6
    assert [r["reason_code"] for r in bench.rejects] == [
        "invalid_unicode", "invalid_unicode", "bad_image_type", "image_not_found",
        "malformed_json",
    ]  # fmt: skip
    assert all(r["reason"] for r in bench.rejects)
    assert bench.rejects[1]["id"] == "s\\udc00"  # escaped: the report stores it


def test_a_missing_benchmark_file_names_the_benchmark_flag(tmp_path, s3_server):
    # detect_format's message told the user to pass --source, a flag target does not have.
    for path in (str(tmp_path / "nope.jsonl"), s3_server.uri("bad-input/bench.jsonl")):
        with pytest.raises(InputError, match=r"benchmark file not found: .*pass --benchmark"):
            read_benchmark(path)


# -- YAML configs and --set ---------------------------------------------------------------


def test_a_config_file_that_is_not_utf8_too_deep_or_a_directory_is_refused(tmp_path):
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("world:\n  size: 5  # größe\n".encode("latin-1"))
    with pytest.raises(InputError, match="is not UTF-8 text.*save it as UTF-8"):
        load_yaml_file(latin)
    deep = tmp_path / "deep.yaml"
    deep.write_text("world: " + "[" * 5000)
    with pytest.raises(InputError, match="not valid YAML: it nests too deeply"):
        load_yaml_file(deep)
    with pytest.raises(InputError, match="holds a directory"):
        load_yaml_file(tmp_path)


@pytest.mark.parametrize("item", [".size=3", "size.=3", "a..b=1", " =1"])
def test_set_with_an_empty_key_part_is_refused(item):
    with pytest.raises(InputError, match="no empty parts"):
        parse_set_overrides([item])


def test_two_sets_that_collide_are_refused():
    with pytest.raises(InputError, match=r"--set 'a.b=2' conflicts with another --set for 'a'"):
        parse_set_overrides(["a=1", "a.b=2"])


def test_set_values_that_are_not_the_fields_type_name_key_and_value():
    with pytest.raises(InputError, match=r"chunk_size: .*got 'many'"):
        build_config("ingest", IngestConfig, {"ingest": parse_set_overrides(["chunk_size=many"])})
    with pytest.raises(InputError, match=r"not valid YAML: it nests too deeply"):
        parse_set_overrides(["chunk_size=" + "[" * 5000])


# -- workspace paths ----------------------------------------------------------------------


def test_a_workspace_that_is_a_file_or_an_unknown_uri_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file, not a directory"):
        Workspace.open(str(tmp_path / "file"))
    with pytest.raises(InputError, match="workspace URI 'nosuchfs://ws' is not usable"):
        Workspace.open("nosuchfs://ws")


@pytest.mark.parametrize(
    ("text", "words"),
    [("ingest: [unclosed\n", "is not valid YAML"), ("- 1\n- 2\n", "found a list")],
)
def test_a_workspace_config_that_is_not_a_yaml_mapping_is_refused(tmp_path, text, words):
    (tmp_path / "vlselect.yaml").write_text(text)
    with pytest.raises(InputError, match=words):
        Workspace.open(str(tmp_path)).read_config()


# -- the command line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["ingest", "--workspace", "ws", "--bogus"], "unrecognized arguments: --bogus"),
        (["ingest", "--workspace", "ws", "--image-check", "all"], "invalid choice: 'all'"),
        (["ingest", "--workspace", "ws", "--chunk-size", "big"], "invalid int value: 'big'"),
        (["ingest"], "the following arguments are required: --workspace"),
        (["ingset", "--workspace", "ws"], "invalid choice: 'ingset'"),
    ],
)
def test_flags_argparse_refuses_exit_2_naming_the_flag(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and words in capsys.readouterr().err


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return err


def bad_whole_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"id": "g", "conversations": TEXT_CONV}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps({"id": "g", "conversations": TEXT_CONV}, indent=2))
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("ingest:\n  chunk_size: 5  # größe\n".encode("latin-1"))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    broken_ws = tmp_path / "broken-ws"
    broken_ws.mkdir()
    (broken_ws / "vlselect.yaml").write_text("ingest: {source: [\n")
    return {
        "empty source": (["--source", str(empty)], "holds no records"),
        "pretty-printed JSON": (["--source", str(pretty)], "pretty-printed JSON"),
        "config not UTF-8": (["--source", str(good), "--config", str(latin)], "not UTF-8"),
        "image root URI": (["--source", str(good), "--images", "nosuchfs://img"], "image root"),
        "chunk size 0": (["--source", str(good), "--chunk-size", "0"], "chunk_size"),
        "workspace is a file": (["--workspace", str(a_file), "--source", str(good)], "a file"),
        "workspace config": (["--workspace", str(broken_ws)], "is not valid YAML"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "empty source",
        "pretty-printed JSON",
        "config not UTF-8",
        "image root URI",
        "chunk size 0",
        "workspace is a file",
        "workspace config",
    ],
)
def test_ingest_refuses_a_bad_whole_input_with_one_message_and_exit_2(
    case, tmp_path, ray_session, capsys
):
    args, words = bad_whole_inputs(tmp_path)[case]
    ws = tmp_path / "ws"
    argv = ["ingest", *(() if "--workspace" in args else ("--workspace", str(ws))), *args]
    assert main(argv) == 2
    assert words in one_error(capsys)
    assert not ws.exists()  # nothing written
    assert not (tmp_path / "broken-ws" / "pool").exists()


def test_ingest_quarantines_each_new_bad_record_kind_and_keeps_every_row(
    tmp_path, ray_session, capsys
):
    root = tmp_path / "images"
    root.mkdir()
    (root / "ok.png").write_bytes(png())
    lines = [
        json.dumps({"id": f"g{i}", "image": "ok.png", "conversations": CONV}) for i in range(3)
    ]
    bad = [
        ({"id": "s\ud800", "conversations": TEXT_CONV}, "invalid_unicode"),
        ({"id": "hf", "image": {"bytes": 10**12}, "conversations": CONV}, "bad_image_type"),
        ({"id": "nul", "image": "ok\x00.png", "conversations": CONV}, "image_not_found"),
        ({"id": "deep", "conversations": TEXT_CONV, "x": nested(MAX_DEPTH + 1)}, "malformed_json"),
    ]
    lines += [json.dumps(record) for record, _ in bad]
    lines.append('{"id": ' + "9" * 5000 + "}")
    source = tmp_path / "pool.jsonl"
    source.write_text("\n".join(lines) + "\n")
    ws = tmp_path / "ws"
    argv = ["ingest", "--workspace", str(ws), "--source", str(source), "--images", str(root)]
    assert main([*argv, "--chunk-size", "2"]) == 0
    pool = Pool.open(Workspace.open(str(ws)))
    meta = pool.meta
    rejects = pool.read_table(under="rejects").to_pylist()
    assert meta.records_in == 8 == meta.accepted + meta.rejected == 3 + len(rejects)
    assert pool.read_table().column("id").to_pylist() == ["g0", "g1", "g2"]
    got = {r["record_index"]: r["reason_code"] for r in rejects}
    assert got == {3 + i: code for i, (_, code) in enumerate(bad)} | {7: "malformed_json"}
    assert all(r["reason"] for r in rejects)
    assert pa.Table.from_pylist(rejects).schema.names == REJECT_SCHEMA.names
