"""Tests of the shapes-world generator (engine/world): determinism, schema, balance, oracle."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pydantic import ValidationError

from engine.world.answers import derive_answer, family_answers, object_caption, scene_caption
from engine.world.config import (
    DEFAULT_DOMAIN_WEIGHTS,
    DOMAINS,
    FAMILIES,
    IMAGE_FAMILIES,
    TEXT_FAMILY,
    BenchmarkSpec,
    WorldConfig,
)
from engine.world.families import SUFFIX, make_sample
from engine.world.generate import (
    LABELS_SCHEMA,
    RECORDS_SCHEMA,
    generate_rows,
    generate_sample,
    plan_shards,
    sample_rng,
    splits,
    world_manifest,
)
from engine.world.render import (
    BASIC_SHAPES,
    COLOUR_NAMES,
    SIZES,
    background,
    decode_png,
    domain_base,
    domain_palette,
    encode_png,
    glyph_mask,
    shape_mask,
)

REPO = Path(__file__).resolve().parents[2]
POOL_N = 3000


@pytest.fixture(scope="module")
def cfg() -> WorldConfig:
    return WorldConfig(size=POOL_N)


@pytest.fixture(scope="module")
def pool(cfg: WorldConfig) -> tuple[pa.Table, pa.Table]:
    return generate_rows(cfg, "pool", 0, POOL_N)


def _chi2_999(df: int) -> float:
    """Upper 0.1% point of chi-square(df), Wilson-Hilferty approximation."""
    z = 3.09
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _samples(cfg: WorldConfig, family: str, n: int, seed: int = 0) -> list:
    rng = np.random.default_rng([seed, FAMILIES.index(family)])
    return [make_sample(rng, cfg, family, DOMAINS[i % len(DOMAINS)]) for i in range(n)]


# ---- determinism ------------------------------------------------------------------------


def test_same_seed_same_bytes_and_shard_independence(cfg: WorldConfig) -> None:
    rec_a, lab_a = generate_rows(cfg, "pool", 0, 100)
    rec_b, lab_b = generate_rows(cfg, "pool", 0, 100)
    assert rec_a.equals(rec_b) and lab_a.equals(lab_b)
    parts = [generate_rows(cfg, "pool", s, 50) for s in (0, 50)]
    assert pa.concat_tables([p[0] for p in parts]).equals(rec_a)
    assert pa.concat_tables([p[1] for p in parts]).equals(lab_a)
    # a single sample regenerated on its own matches its row inside the batch
    one, _ = generate_rows(cfg, "pool", 37, 1)
    assert one.to_pylist()[0] == rec_a.slice(37, 1).to_pylist()[0]


def test_different_seed_or_split_differs(cfg: WorldConfig) -> None:
    rec_a, _ = generate_rows(cfg, "pool", 0, 50)
    rec_b, _ = generate_rows(cfg.model_copy(update={"seed": 1}), "pool", 0, 50)
    rec_t, _ = generate_rows(cfg, "test", 0, 50)
    a, b, t = (r.column("conversations").to_pylist() for r in (rec_a, rec_b, rec_t))
    assert sum(x != y for x, y in zip(a, b, strict=True)) > 40
    assert sum(x != y for x, y in zip(a, t, strict=True)) > 40


def test_sample_rng_is_seedsequence_of_crc32() -> None:
    ref = np.random.Generator(np.random.PCG64(np.random.SeedSequence([3, zlib.crc32(b"pool"), 9])))
    assert sample_rng(3, "pool", 9).random() == ref.random()


def test_output_stable_across_processes(cfg: WorldConfig) -> None:
    """No salted hash() or set order leaks into the output: another process agrees."""
    code = (
        "import hashlib; from engine.world.config import WorldConfig; "
        "from engine.world.generate import generate_rows; "
        "r, l = generate_rows(WorldConfig(size=3000), 'pool', 0, 30); "
        "h = hashlib.sha256(); [h.update(str(t.to_pylist()).encode()) for t in (r, l)]; "
        "print(h.hexdigest())"
    )
    digests = set()
    for hashseed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        digests.add(out.stdout.strip())
    assert len(digests) == 1


# ---- schema -----------------------------------------------------------------------------


def test_schema_ids_and_conversations(cfg: WorldConfig, pool: tuple[pa.Table, pa.Table]) -> None:
    rec, lab = pool
    assert rec.schema.equals(RECORDS_SCHEMA) and lab.schema.equals(LABELS_SCHEMA)
    assert rec.num_rows == lab.num_rows == POOL_N
    ids = rec.column("id").to_pylist()
    assert ids == lab.column("id").to_pylist()
    assert ids[:2] == ["pool-0000000", "pool-0000001"] and len(set(ids)) == POOL_N
    assert set(lab.column("split").to_pylist()) == {"pool"}
    answers = lab.column("answer").to_pylist()
    for conv, ans, img in zip(
        rec.column("conversations").to_pylist(),
        answers,
        rec.column("image").to_pylist(),
        strict=True,
    ):
        assert [t["from"] for t in conv] == ["human", "gpt"]
        assert conv[1]["value"] == ans
        assert conv[0]["value"].endswith(SUFFIX)
        assert conv[0]["value"].startswith("<image>\n") == (img is not None)


def test_images_decode_to_configured_size(pool: tuple[pa.Table, pa.Table]) -> None:
    images = [b for b in pool[0].column("image").to_pylist()[:50] if b is not None]
    for data in images:
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG" and im.size == (64, 64) and im.mode == "RGB"


def test_png_roundtrip_exact_and_other_geometry() -> None:
    cfg = WorldConfig(size=10, image_size=96, grid=6, max_objects=12, max_count=5)
    sample, img = generate_sample(cfg, "pool", 1)
    while img is None:  # skip a text-only draw
        sample, img = generate_sample(cfg, "pool", 2)
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8
    assert np.array_equal(decode_png(encode_png(img)), img)
    rec, _ = generate_rows(cfg, "pool", 0, 10)
    for data in rec.column("image").to_pylist():
        if data is not None:
            assert decode_png(data).shape == (96, 96, 3)


def test_text_only_rows(pool: tuple[pa.Table, pa.Table]) -> None:
    rec, lab = pool
    text = [i for i, f in enumerate(lab.column("family").to_pylist()) if f == TEXT_FAMILY]
    assert 0.005 * POOL_N < len(text) < 0.05 * POOL_N  # text_only_fraction 0.02
    images, convs = rec.column("image").to_pylist(), rec.column("conversations").to_pylist()
    domains, n_obj = lab.column("domain").to_pylist(), lab.column("n_objects").to_pylist()
    for i in text:
        assert images[i] is None and domains[i] is None and n_obj[i] == 0
        assert all("<image>" not in t["value"] for t in convs[i])
    assert all(images[i] is not None for i in range(POOL_N) if i not in set(text))


# ---- distributions ----------------------------------------------------------------------


def test_every_family_and_domain_appears(pool: tuple[pa.Table, pa.Table]) -> None:
    lab = pool[1]
    assert set(lab.column("family").to_pylist()) == set(FAMILIES)
    assert set(lab.column("domain").to_pylist()) - {None} == set(DOMAINS)


def test_domain_frequencies_follow_weights(pool: tuple[pa.Table, pa.Table]) -> None:
    domains = [d for d in pool[1].column("domain").to_pylist() if d is not None]
    n, counts = len(domains), Counter(domains)
    total = sum(DEFAULT_DOMAIN_WEIGHTS.values())
    for d, w in DEFAULT_DOMAIN_WEIGHTS.items():
        p = w / total
        assert abs(counts[d] / n - p) < 4 * math.sqrt(p * (1 - p) / n), (d, counts[d] / n, p)
    assert counts["meadow"] > counts["ocean"] > counts["desert"] > counts["space"]


@pytest.mark.parametrize("family", FAMILIES)
def test_answers_balanced_within_family(cfg: WorldConfig, family: str) -> None:
    answers = family_answers(cfg)[family]
    counts = Counter(s.answer for s in _samples(cfg, family, 120 * len(answers)))
    assert set(counts) == set(answers)
    n, k = sum(counts.values()), len(answers)
    chi2 = sum((counts[a] - n / k) ** 2 / (n / k) for a in answers)
    assert chi2 < _chi2_999(k - 1), (family, counts)


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_text_only_prior_near_chance(cfg: WorldConfig, family: str) -> None:
    """A question -> majority-answer lookup learned on one half scores near chance on the other."""
    samples = _samples(cfg, family, 2000, seed=5)
    train, test = samples[:1000], samples[1000:]
    table: dict[str, Counter] = {}
    for s in train:
        table.setdefault(s.question, Counter())[s.answer] += 1
    overall = Counter(s.answer for s in train).most_common(1)[0][0]
    hits = sum(
        (table[s.question].most_common(1)[0][0] if s.question in table else overall) == s.answer
        for s in test
    )
    chance = 1 / len(family_answers(cfg)[family])
    assert hits / len(test) < chance + 0.07, (family, hits / len(test), chance)


# ---- answers agree with the scenes ------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_answers_consistent_with_scene(cfg: WorldConfig, family: str) -> None:
    for s in _samples(cfg, family, 300, seed=9):
        assert derive_answer(s) == s.answer, (s.question, s.objects)
        assert s.family == family and s.question.endswith(SUFFIX)
        if family == TEXT_FAMILY:
            assert s.objects == [] and s.domain is None
            continue
        assert cfg.min_objects <= len(s.objects) <= cfg.max_objects
        assert all(0 <= o.row < cfg.grid and 0 <= o.col < cfg.grid for o in s.objects)
        cards = [o for o in s.objects if o.shape == "card"]
        assert len(cards) == (1 if family == "glyph" else 0)


def test_counting_label_matches_objects(cfg: WorldConfig, pool: tuple[pa.Table, pa.Table]) -> None:
    lab = pool[1].to_pylist()
    convs = pool[0].column("conversations").to_pylist()
    seen = 0
    for row, conv in zip(lab, convs, strict=True):
        if row["family"] != "counting":
            continue
        q = conv[0]["value"]
        shape = next(s for s in BASIC_SHAPES if f" {s}" in q)
        assert int(row["answer"]) == sum(o["shape"] == shape for o in row["objects"])
        assert row["n_objects"] == len(row["objects"])
        seen += 1
    assert seen > 50


def test_distractors_make_questions_non_trivial(cfg: WorldConfig) -> None:
    # existence: every "no" scene holds an object sharing the asked shape or colour
    for s in _samples(cfg, "existence", 200):
        if s.answer == "no":
            q = s.query
            assert any((o.shape == q["shape"]) != (o.colour == q["colour"]) for o in s.objects)
    # counting: some scenes hold other shapes in the colour of a counted object
    shared = 0
    for s in _samples(cfg, "counting", 200):
        counted = {o.colour for o in s.objects if o.shape == s.query["shape"]}
        shared += any(o.shape != s.query["shape"] and o.colour in counted for o in s.objects)
    assert shared > 40


def test_questions_use_several_templates(cfg: WorldConfig) -> None:
    names = sorted(
        [*COLOUR_NAMES, *BASIC_SHAPES, "more", "fewer", "plus", "minus", "times"],
        key=len,
        reverse=True,
    )
    for family in FAMILIES:
        templates = set()
        for s in _samples(cfg, family, 200):
            q = s.question
            for name in names:
                q = q.replace(name, "X")
            templates.add("".join("X" if ch.isdigit() else ch for ch in q))
        assert len(templates) >= 3, (family, templates)


# ---- splits, shards, benchmarks, manifest -----------------------------------------------


def test_plan_shards_cover_every_split_once() -> None:
    cfg = WorldConfig(size=2500, shard_size=1000, test_size=300)
    shards = plan_shards(cfg)
    for split in splits(cfg):
        mine = [s for s in shards if s.split == split]
        assert [s.shard_index for s in mine] == list(range(len(mine)))
        assert mine[0].start == 0 and all(s.count <= 1000 for s in mine)
        assert all(a.start + a.count == b.start for a, b in zip(mine, mine[1:], strict=False))
    pool = [s.count for s in shards if s.split == "pool"]
    assert pool == [1000, 1000, 500]
    assert WorldConfig(test_size=0).model_dump() and "test" not in {
        s.split for s in plan_shards(WorldConfig(test_size=0))
    }


def test_benchmarks_lean_on_their_skill_or_concept(cfg: WorldConfig) -> None:
    assert len(cfg.benchmarks) >= 4
    assert {b.leans_on for b in cfg.benchmarks} == {"skill", "concept"}
    _, counting = generate_rows(cfg, "bench_counting", 0, 200)
    fams = Counter(counting.column("family").to_pylist())
    assert set(fams) <= {"counting", "compare"} and fams["counting"] > fams["compare"]
    _, space = generate_rows(cfg, "bench_space", 0, 200)
    assert set(space.column("domain").to_pylist()) == {"space"}
    assert len(set(space.column("family").to_pylist())) >= 6  # the pool's family mix
    assert space.column("id").to_pylist()[0] == "bench_space-0000000"
    with pytest.raises(ValueError, match="outside split"):
        generate_rows(cfg, "bench_space", 250, 100)
    with pytest.raises(ValueError, match="unknown split"):
        generate_rows(cfg, "nope", 0, 1)


def test_manifest_is_json_and_complete(cfg: WorldConfig) -> None:
    m = json.loads(json.dumps(world_manifest(cfg)))
    assert [f["name"] for f in m["families"]] == list(FAMILIES)
    assert [f["rank"] for f in m["families"]] == list(range(len(FAMILIES)))
    assert [d["name"] for d in m["domains"]] == list(DOMAINS)
    assert m["splits"]["pool"] == POOL_N and m["splits"]["test"] == cfg.test_size
    assert set(m["splits"]) == set(splits(cfg)) and len(m["colours"]) >= 6
    assert len(m["shapes"]) >= 7


def test_scene_caption_lists_rows(cfg: WorldConfig) -> None:
    s = _samples(cfg, "glyph", 1)[0]
    text = scene_caption(s.objects, cfg.grid)
    assert text.count("Row ") == cfg.grid and "card showing" in text


def test_object_caption_names_every_object_once_in_the_given_order(cfg: WorldConfig) -> None:
    objs = _samples(cfg, "glyph", 1)[0].objects
    order = list(reversed(range(len(objs))))
    sentences = object_caption(objs, order).removesuffix(".").split(". ")
    assert len(sentences) == len(objs)
    for sentence, i in zip(sentences, order, strict=True):
        o = objs[i]
        assert sentence.startswith(f"{o.size} {o.colour} {o.shape}")
        assert sentence.endswith(f"in row {o.row + 1} column {o.col + 1}")
        if o.shape == "card":
            assert f"card showing {o.digit}" in sentence


# ---- rendering --------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [0.0, 0.6, 1.0])
def test_colours_stay_distinguishable_in_every_domain(shift: float) -> None:
    for d in DOMAINS:
        pal = domain_palette(d, shift)
        dist = np.linalg.norm(pal[:, None] - pal[None], axis=-1) + np.eye(len(pal)) * 1e9
        assert dist.min() > 45, (d, shift)
        bg = background(d, 64, 0).reshape(-1, 3).mean(0)
        assert np.linalg.norm(pal - bg, axis=1).min() > 45, (d, shift)


def test_rare_domains_shift_colours() -> None:
    """At the default shift, colours in the rare domains look unlike their meadow selves."""
    meadow = domain_palette("meadow", 0.6)
    for d in ("space", "snow", "desert"):
        assert np.linalg.norm(domain_palette(d, 0.6) - meadow, axis=1).mean() > 30, d
    bases = np.stack([domain_base(d) for d in DOMAINS])
    assert (np.linalg.norm(bases[:, None] - bases[None], axis=-1) + np.eye(5) * 1e9).min() > 40


def test_shape_and_glyph_masks_are_distinct() -> None:
    for size in SIZES:
        masks = [shape_mask(s, size, 0, 0, 16) for s in BASIC_SHAPES]
        assert all(m.sum() > 4 for m in masks)
        assert len({m.tobytes() for m in masks}) == len(BASIC_SHAPES)
        digits = [glyph_mask(d, size, 0, 0, 16) for d in range(10)]
        assert len({m.tobytes() for m in digits}) == 10
        card = shape_mask("card", size, 0, 0, 16)
        assert all((g & ~card).sum() == 0 for g in digits)  # the digit sits on its card


# ---- config validation ------------------------------------------------------------------


def test_config_refuses_unknown_keys_and_names() -> None:
    with pytest.raises(ValidationError, match="colour_count"):
        WorldConfig(colour_count=3)
    with pytest.raises(ValidationError) as e:
        WorldConfig(families={"colour": 1.0, "juggling": 2.0})
    assert "juggling" in str(e.value) and "counting" in str(e.value)
    with pytest.raises(ValidationError) as e:
        WorldConfig(domains={"jungle": 1.0})
    assert "jungle" in str(e.value) and "meadow" in str(e.value)
    with pytest.raises(ValidationError, match="text_only_fraction"):
        WorldConfig(families={TEXT_FAMILY: 1.0})
    with pytest.raises(ValidationError, match="tundra"):
        BenchmarkSpec(name="b", size=10, leans_on="concept", domains={"tundra": 1.0})
    with pytest.raises(ValidationError, match="extra"):
        BenchmarkSpec(name="b", size=10, leans_on="skill", weight=2)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"families": {"colour": -1.0, "shape": 2.0}}, ">= 0"),
        ({"domains": {"meadow": 0.0}}, "positive sum"),
        ({"image_size": 60, "grid": 8}, "multiple of grid"),
        ({"max_count": 9}, "max_count"),
        ({"max_objects": 20}, "grid cells"),
        ({"benchmarks": [{"name": "pool", "size": 5, "leans_on": "skill"}]}, "reserved"),
        ({"benchmarks": [{"name": "Bad-Name", "size": 5, "leans_on": "skill"}]}, "pattern"),
    ],
)
def test_config_refuses_inconsistent_values(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        WorldConfig(**kwargs)


def test_config_accepts_partial_weights_and_roundtrips() -> None:
    cfg = WorldConfig(families={"counting": 1.0}, domains={"snow": 1.0}, text_only_fraction=0)
    _, lab = generate_rows(cfg, "pool", 0, 40)
    assert set(lab.column("family").to_pylist()) == {"counting"}
    assert set(lab.column("domain").to_pylist()) == {"snow"}
    assert WorldConfig.model_validate(json.loads(cfg.model_dump_json())) == cfg
    assert COLOUR_NAMES and len(BASIC_SHAPES) >= 6
