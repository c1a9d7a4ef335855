"""normalize_record: every kind of bad record gets its own reason code; good ones normalise."""

from __future__ import annotations

import base64
import io
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.pool import ImagePolicy, normalize_record, raw_snippet


def png_bytes(color=(200, 30, 30), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(png_bytes())
    (root / "broken.png").write_bytes(png_bytes()[:30])  # truncated
    (root / "notimage.png").write_bytes(b"hello, world")
    (tmp_path / "secret.png").write_bytes(png_bytes())
    os.symlink(tmp_path / "secret.png", root / "link.png")
    return root


def conv(q="<image>\nWhat color?", a="red"):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def run(record, root, **kw):
    return normalize_record(record, 7, "src.json", ImagePolicy(str(root), **kw))


def test_good_record_with_path(image_root):
    row, rej = run({"id": "a", "image": "sub/ok.png", "conversations": conv()}, image_root)
    assert rej is None
    assert row["id"] == "a" and row["question"] == "What color?" and row["answer"] == "red"
    assert (row["width"], row["height"]) == (8, 6)
    assert row["image"] == png_bytes() and row["image_ref"] == "sub/ok.png"
    assert row["record_index"] == 7 and row["source"] == "src.json"


def test_by_reference_keeps_no_bytes(image_root):
    row, _ = run(
        {"id": "a", "image": "sub/ok.png", "conversations": conv()}, image_root, inline=False
    )
    assert row["image"] is None and row["image_ref"] == "sub/ok.png"


def test_inline_forms(image_root):
    data = png_bytes()
    for image in (
        data,
        {"bytes": data, "path": None},
        "data:image/png;base64," + base64.b64encode(data).decode(),
    ):
        row, rej = run({"id": "a", "image": image, "conversations": conv()}, image_root)
        assert rej is None, rej
        assert row["image"] == data and row["image_ref"] is None


def test_text_only_and_aliases(image_root):
    turns = [{"from": "user", "value": "What is 2+2?"}, {"from": "assistant", "value": "4"}]
    row, rej = run({"id": 12, "conversations": turns}, image_root)
    assert rej is None
    assert row["id"] == "12" and row["image"] is None
    assert [t["from"] for t in row["conversations"]] == ["human", "gpt"]


def test_image_token_added_when_missing(image_root):
    row, _ = run(
        {"id": "a", "image": "sub/ok.png", "conversations": conv(q="What color?")}, image_root
    )
    assert row["conversations"][0]["value"] == "<image>\nWhat color?"


@pytest.mark.parametrize(
    ("record", "code"),
    [
        ("just a string", "not_an_object"),
        ({"image": "sub/ok.png", "conversations": conv()}, "missing_id"),
        ({"id": "", "conversations": conv("q")}, "missing_id"),
        ({"id": 1.5, "conversations": conv("q")}, "bad_id_type"),
        ({"id": ["x"], "conversations": conv("q")}, "bad_id_type"),
        ({"id": "a", "image": "sub/ok.png"}, "missing_conversations"),
        ({"id": "a", "conversations": []}, "empty_conversations"),
        ({"id": "a", "conversations": {"from": "human"}}, "bad_conversations"),
        ({"id": "a", "conversations": "not json"}, "bad_conversations"),
        ({"id": "a", "conversations": [{"from": "human", "value": "q"}]}, "bad_conversations"),
        (
            {
                "id": "a",
                "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}],
            },
            "bad_conversations",
        ),
        (
            {
                "id": "a",
                "conversations": [{"from": "system", "value": "x"}, {"from": "gpt", "value": "a"}],
            },
            "bad_conversations",
        ),
        (
            {
                "id": "a",
                "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}],
            },
            "bad_conversations",
        ),
        (
            {"id": "a", "image": "sub/ok.png", "conversations": conv(q="<image>\n")},
            "bad_conversations",
        ),
        ({"id": "a", "conversations": conv(a=" ")}, "bad_conversations"),
        ({"id": "a", "conversations": conv()}, "image_token_without_image"),
        ({"id": "a", "image": 42, "conversations": conv()}, "bad_image_type"),
        ({"id": "a", "image": ["a.png", "b.png"], "conversations": conv()}, "multi_image"),
        (
            {"id": "a", "image": "sub/ok.png", "conversations": conv(q="<image><image>")},
            "multi_image",
        ),
        ({"id": "a", "image": "missing.png", "conversations": conv()}, "image_not_found"),
        ({"id": "a", "image": "broken.png", "conversations": conv()}, "image_unreadable"),
        ({"id": "a", "image": "notimage.png", "conversations": conv()}, "image_unreadable"),
        ({"id": "a", "image": "sub", "conversations": conv()}, "image_unreadable"),
        ({"id": "a", "image": "../secret.png", "conversations": conv()}, "image_escapes_root"),
        (
            {"id": "a", "image": "sub/../../secret.png", "conversations": conv()},
            "image_escapes_root",
        ),
        ({"id": "a", "image": "link.png", "conversations": conv()}, "image_escapes_root"),
        ({"id": "a", "image": "s3://bucket/x.png", "conversations": conv()}, "image_escapes_root"),
        (
            {"id": "a", "image": "data:image/png;base64,@@@", "conversations": conv()},
            "image_unreadable",
        ),
    ],
)
def test_rejects(record, code, image_root):
    row, rej = run(record, image_root)
    assert row is None
    assert rej["reason_code"] == code, rej
    assert rej["reason"] and rej["record_index"] == 7 and rej["raw"]


def test_absolute_path_outside_root_rejected(image_root, tmp_path):
    rec = {"id": "a", "image": str(tmp_path / "secret.png"), "conversations": conv()}
    assert run(rec, image_root)[1]["reason_code"] == "image_escapes_root"
    rec["image"] = str(image_root / "sub" / "ok.png")  # absolute but inside: fine
    assert run(rec, image_root)[1] is None


def test_path_without_root_is_rejected():
    row, rej = normalize_record(
        {"id": "a", "image": "x.png", "conversations": conv()}, 0, "s", ImagePolicy(None)
    )
    assert rej["reason_code"] == "image_escapes_root" and "--images" in rej["reason"]


def test_header_check_misses_truncation_decode_catches_it(image_root):
    rec = {"id": "a", "image": "broken.png", "conversations": conv()}
    assert run(rec, image_root, check="decode")[1]["reason_code"] == "image_unreadable"


def test_raw_snippet_shows_bytes_by_size():
    text = raw_snippet({"id": "a", "image": b"\x00" * 500})
    assert "<500 bytes>" in text
    assert len(raw_snippet({"x": "y" * 5000})) == 1000


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
turns = st.lists(
    st.fixed_dictionaries(
        {
            "from": st.sampled_from(["human", "gpt", "user", "assistant", "system", 3]),
            "value": json_values,
        }
    ),
    max_size=4,
)
records = (
    st.fixed_dictionaries(
        {},
        optional={
            "id": json_values,
            "image": json_values | st.binary(max_size=40),
            "conversations": turns | json_values,
        },
    )
    | json_values
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(record=records)
def test_fuzz_every_record_is_accepted_or_rejected_with_a_reason(record, image_root):
    row, rej = normalize_record(record, 0, "fuzz", ImagePolicy(str(image_root)))
    assert (row is None) != (rej is None)
    if rej is not None:
        assert rej["reason_code"] and rej["reason"]
    else:
        assert row["id"] and row["question"] and row["answer"].strip()
