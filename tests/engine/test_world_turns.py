"""Tests of multi-turn pool samples of the shapes world (WorldConfig.turns)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ValidationError

from engine.world.config import TEXT_FAMILY, WorldConfig
from engine.world.families import SUFFIX
from engine.world.follow_ups import FOLLOW_UP_KINDS
from engine.world.generate import generate_rows, generate_sample, splits
from engine.world.render import BASIC_SHAPES

IMAGE = "<image>"

# sha256 of the default world's rows as the generator wrote them before `turns` existed
# (see _digest): turns: 1 must keep every existing world, and what was cached from it,
# byte for byte. Do not update these to make a failing test pass: a change here is a
# change of every world already generated.
PINNED = {
    ("pool", 50): "1b36cb20285f588f6b0f8d6f1aa431d6f96726191e68dc3b9441f9824115b6f1",
    ("test", 20): "f0178abe49e820b3005f2564d4af803f271c794e49a8bab1b22518bdfc74b4ca",
    ("bench_counting", 20): "7bb0e7bb479660b687a447b2f12d02d8181a08247d2939de709f44fea4e9b7c0",
}


def _digest(rec: pa.Table, lab: pa.Table, first_exchange_only: bool = False) -> str:
    """sha256 over each row's id, conversation, labels and the sha256 of its PNG bytes."""
    h = hashlib.sha256()
    for r, lab_row in zip(rec.to_pylist(), lab.to_pylist(), strict=True):
        conv = r["conversations"][:2] if first_exchange_only else r["conversations"]
        row = {"id": r["id"], "conv": conv, "label": lab_row}
        h.update(json.dumps(row, sort_keys=True).encode())
        h.update(hashlib.sha256(r["image"] or b"").digest())
    return h.hexdigest()


@pytest.fixture(scope="module")
def cfg3() -> WorldConfig:
    return WorldConfig(turns=3)


@pytest.fixture(scope="module")
def pool3(cfg3: WorldConfig) -> tuple[pa.Table, pa.Table]:
    return generate_rows(cfg3, "pool", 0, 200)


# ---- turns: 1 is today's world ----------------------------------------------------------


@pytest.mark.parametrize(("split", "n"), list(PINNED))
def test_single_turn_world_is_pinned(split: str, n: int) -> None:
    for cfg in (WorldConfig(), WorldConfig(turns=1)):
        assert _digest(*generate_rows(cfg, split, 0, n)) == PINNED[(split, n)]


def test_more_turns_keep_first_exchange_images_labels_and_other_splits() -> None:
    cfg = WorldConfig(turns=4)
    rec, lab = generate_rows(cfg, "pool", 0, 50)
    assert _digest(rec, lab, first_exchange_only=True) == PINNED[("pool", 50)]
    assert _digest(rec, lab) != PINNED[("pool", 50)]
    for split, n in PINNED:
        if split != "pool":
            assert _digest(*generate_rows(cfg, split, 0, n)) == PINNED[(split, n)]


# ---- the shape of a multi-turn conversation -------------------------------------------------


def test_pool_rows_have_alternating_turns_image_token_first_only(pool3) -> None:
    rec, lab = pool3
    families = lab.column("family").to_pylist()
    assert TEXT_FAMILY in families  # the sample below covers text-only rows too
    for conv, image, fam in zip(
        rec.column("conversations").to_pylist(),
        rec.column("image").to_pylist(),
        families,
        strict=True,
    ):
        assert [t["from"] for t in conv] == ["human", "gpt"] * 3
        assert conv[0]["value"].count(IMAGE) == (image is not None)
        assert (image is None) == (fam == TEXT_FAMILY)
        assert all(IMAGE not in t["value"] for t in conv[1:])
        humans = [t["value"] for t in conv[::2]]
        assert all(q.endswith(SUFFIX) for q in humans)
        assert len(set(humans)) == 3  # no follow-up repeats a question
        assert all(t["value"] for t in conv[1::2])


def test_labels_describe_the_first_exchange(pool3) -> None:
    rec, lab = pool3
    for conv, answer in zip(
        rec.column("conversations").to_pylist(), lab.column("answer").to_pylist(), strict=True
    ):
        assert conv[1]["value"] == answer


def _oracle(question: str, objects: list[dict]) -> str:
    """The answer to a follow-up, from the question's words and the scene alone."""
    q = question.removesuffix(SUFFIX)
    if m := re.search(r"(\d+) (plus|minus|times) (\d+)", q):
        a, op, b = int(m[1]), m[2], int(m[3])
        return str({"plus": a + b, "minus": a - b, "times": a * b}[op])
    if m := re.search(r"in row (\d+) column (\d+)", q):
        (o,) = [o for o in objects if (o["row"] + 1, o["col"] + 1) == (int(m[1]), int(m[2]))]
        if "color" in q:
            return o["colour"]
        if "shape" in q:
            return o["shape"]
        assert "size" in q or "large" in q
        return o["size"]
    if m := re.search(r"(?:How many|Count the) (\w+)", q):
        (shape,) = [s for s in BASIC_SHAPES if m[1] in (s + "s", s + "es")]
        return str(sum(o["shape"] == shape for o in objects))
    if m := re.search(r"(?:Is there|contain) an? (\w+) (\w+)", q):
        return "yes" if any((o["colour"], o["shape"]) == (m[1], m[2]) for o in objects) else "no"
    m = re.search(r"row (?:is|holds) the (\w+) (\w+)", q)
    assert m, q
    (o,) = [o for o in objects if (o["colour"], o["shape"]) == (m[1], m[2])]
    return str(o["row"] + 1)


def test_follow_up_answers_are_right_for_the_objects(pool3) -> None:
    rec, lab = pool3
    checked = 0
    for conv, objects in zip(
        rec.column("conversations").to_pylist(), lab.column("objects").to_pylist(), strict=True
    ):
        for q, a in zip(conv[2::2], conv[3::2], strict=True):
            assert _oracle(q["value"], objects) == a["value"], q["value"]
            checked += 1
    assert checked == 2 * rec.num_rows


def test_every_follow_up_kind_appears_and_text_rows_ask_arithmetic(cfg3: WorldConfig) -> None:
    kinds: set[str] = set()
    for i in range(300):
        sample, image = generate_sample(cfg3, "pool", i)
        assert len(sample.follow_ups) == 2
        if image is None:
            assert {f.kind for f in sample.follow_ups} == {TEXT_FAMILY}
        kinds.update(f.kind for f in sample.follow_ups)
    assert kinds == {*FOLLOW_UP_KINDS, TEXT_FAMILY}


def test_multi_turn_rows_are_deterministic_and_shard_independent(cfg3, pool3) -> None:
    rec, lab = pool3
    again = generate_rows(cfg3, "pool", 0, 200)
    assert again[0].equals(rec) and again[1].equals(lab)
    parts = [generate_rows(cfg3, "pool", s, 100)[0] for s in (0, 100)]
    assert pa.concat_tables(parts).equals(rec)
    one, _ = generate_rows(cfg3, "pool", 137, 1)
    assert one.to_pylist()[0] == rec.slice(137, 1).to_pylist()[0]
    other_seed, _ = generate_rows(cfg3.model_copy(update={"seed": 1}), "pool", 0, 200)
    assert other_seed.column("conversations") != rec.column("conversations")


def test_test_split_and_benchmarks_stay_single_turn(cfg3: WorldConfig) -> None:
    for split in splits(cfg3):
        if split == "pool":
            continue
        rec, _ = generate_rows(cfg3, split, 0, 30)
        assert all(len(c) == 2 for c in rec.column("conversations").to_pylist()), split


@pytest.mark.parametrize("turns", [0, 7])
def test_turns_out_of_range_refused(turns: int) -> None:
    with pytest.raises(ValidationError, match="turns"):
        WorldConfig(turns=turns)


# ---- vocabulary -------------------------------------------------------------------------------


def test_follow_ups_are_in_the_world_tokenizer_vocabulary() -> None:
    from engine.llava.tokenizer import build_world_tokenizer

    tok = build_world_tokenizer(WorldConfig())
    unk = tok.unk_token_id
    assert unk in tok("a zebra", add_special_tokens=False)["input_ids"]  # the check can fail
    rec, _ = generate_rows(WorldConfig(turns=6), "pool", 0, 200)
    for conv in rec.column("conversations").to_pylist():
        for t in conv[2:]:
            assert unk not in tok(t["value"], add_special_tokens=False)["input_ids"], t["value"]


# ---- ingest keeps every turn -------------------------------------------------------------------


def test_ingest_of_multi_turn_llava_json_keeps_all_turns(cfg3: WorldConfig, tmp_path: Path) -> None:
    from engine.ingest import normalize_chunk
    from engine.pool import ImagePolicy, llava_record
    from engine.sources import detect_format, iter_records
    from engine.text import instruction_text

    rec, lab = generate_rows(cfg3, "pool", 30, 20)  # holds text-only pool-0000039
    assert TEXT_FAMILY in lab.column("family").to_pylist()
    (tmp_path / "images").mkdir()
    records = []
    for row in rec.to_pylist():
        record = {"id": row["id"], "conversations": row["conversations"]}
        if row["image"] is not None:
            record["image"] = f"images/{row['id']}.png"
            (tmp_path / record["image"]).write_bytes(row["image"])
        records.append(record)
    src = tmp_path / "pool.json"
    src.write_text(json.dumps(records))

    assert detect_format(str(src)) == "json"
    pool, rejects = normalize_chunk(
        list(iter_records(str(src), "json")), "pool.json", ImagePolicy(str(tmp_path))
    )
    assert rejects.num_rows == 0 and pool.num_rows == 20
    for row, want in zip(pool.to_pylist(), rec.to_pylist(), strict=True):
        assert row["conversations"] == want["conversations"]
        assert len(row["conversations"]) == 6
        assert row["question"] == want["conversations"][0]["value"].removeprefix(f"{IMAGE}\n")
        assert row["answer"] == want["conversations"][1]["value"]
        assert row["image"] == want["image"]
        # the text space embeds every human turn, each cut before its answer-format suffix
        assert instruction_text(row["conversations"]).split("\n") == [
            t["value"].removeprefix(f"{IMAGE}\n").removesuffix(SUFFIX)
            for t in want["conversations"][::2]
        ]
        out = llava_record(row, lambda path, data: None)
        assert out["conversations"] == want["conversations"]
