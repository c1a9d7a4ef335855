"""Generation of shapes-world splits as Arrow tables: LLaVA-style records plus labels.

Every sample has its own random stream, seeded from (seed, split, index), so a
sample is reproducible alone and the output does not depend on shard size or
on how shards are spread over workers. The follow-up turns of a multi-turn pool
sample (``turns`` > 1) come from a second stream, seeded from (seed,
"<split>-turns", index), so that the first exchange, image and labels are the
same bytes whatever ``turns`` is.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from engine.world.answers import family_answers
from engine.world.config import (
    DOMAINS,
    FAMILIES,
    IMAGE_FAMILIES,
    TEXT_FAMILY,
    WorldConfig,
)
from engine.world.families import Sample, make_sample
from engine.world.follow_ups import make_follow_ups
from engine.world.render import (
    BASIC_SHAPES,
    COLOURS,
    SHAPES,
    SIZES,
    encode_png,
    render_scene,
)

POOL, TEST = "pool", "test"
SPLITS: tuple[str, ...] = (POOL, TEST)  # plus one split per benchmark: see splits(cfg)
IMAGE_TOKEN = "<image>"

RECORDS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary()),  # PNG bytes; null for a text-only sample
        pa.field(
            "conversations",
            pa.list_(
                pa.struct(
                    [
                        pa.field("from", pa.string()),
                        pa.field("value", pa.string()),
                    ]
                )
            ),
        ),
    ]
)
OBJECT_TYPE = pa.struct(
    [
        pa.field("row", pa.int8()),
        pa.field("col", pa.int8()),
        pa.field("shape", pa.string()),
        pa.field("colour", pa.string()),
        pa.field("size", pa.string()),
        pa.field("digit", pa.int8()),
    ]
)
LABELS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("family", pa.string()),  # the skill
        pa.field("domain", pa.string()),  # the concept; null for a text-only sample
        pa.field("answer", pa.string()),
        pa.field("n_objects", pa.int32()),
        pa.field("objects", pa.list_(OBJECT_TYPE)),  # the scene, for evaluation and pretraining
    ]
)


@dataclass(frozen=True)
class ShardSpec:
    """Indices [start, start + count) of `split`, written as shard `shard_index` of it."""

    split: str
    shard_index: int
    start: int
    count: int


@dataclass(frozen=True)
class SplitDistribution:
    """What a split draws from: cumulative family and domain weights, text-only share."""

    size: int
    families: tuple[str, ...]
    family_cum: np.ndarray  # float64 (n_families,), cumulative weights
    domains: tuple[str, ...]
    domain_cum: np.ndarray  # float64 (n_domains,), cumulative weights
    text_only: float


def splits(cfg: WorldConfig) -> list[str]:
    """All split names: pool, test, then the benchmarks in config order."""
    return [*SPLITS, *(b.name for b in cfg.benchmarks)]


def split_distribution(cfg: WorldConfig, split: str) -> SplitDistribution:
    """The family/domain mix and size of `split`; a benchmark defaults to the pool's mix."""
    fam, dom, text_only = cfg.families, cfg.domains, cfg.text_only_fraction
    if split == POOL:
        size = cfg.size
    elif split == TEST:
        size = cfg.test_size
    else:
        try:
            b = cfg.benchmark(split)
        except KeyError:
            raise ValueError(f"unknown split {split!r}; known: {splits(cfg)}") from None
        size, fam, dom = b.size, b.families or fam, b.domains or dom
        text_only = 0.0  # benchmarks ask about images, and a concept benchmark needs a domain
    f_names = tuple(f for f in IMAGE_FAMILIES if f in fam)
    d_names = tuple(d for d in DOMAINS if d in dom)
    return SplitDistribution(
        size=size,
        families=f_names,
        family_cum=np.cumsum([fam[f] for f in f_names], dtype=np.float64),
        domains=d_names,
        domain_cum=np.cumsum([dom[d] for d in d_names], dtype=np.float64),
        text_only=text_only,
    )


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of sample `index` of `split`.

    crc32 rather than hash() because Python salts str hashes per process.
    """
    ss = np.random.SeedSequence([int(seed), zlib.crc32(split.encode("utf-8")), int(index)])
    return np.random.Generator(np.random.PCG64(ss))


def _draw(rng: np.random.Generator, names: tuple[str, ...], cum: np.ndarray) -> str:
    i = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
    return names[min(i, len(names) - 1)]


def generate_sample(
    cfg: WorldConfig, split: str, index: int, dist: SplitDistribution | None = None
) -> tuple[Sample, np.ndarray | None]:
    """Sample `index` of `split` and its image, uint8 (H, W, 3), or None if text-only.

    A pool sample of a world with ``turns`` > 1 carries ``turns - 1`` follow-ups.
    """
    dist = dist or split_distribution(cfg, split)
    rng = sample_rng(cfg.seed, split, index)
    if rng.random() < dist.text_only:
        return _with_follow_ups(cfg, split, index, make_sample(rng, cfg, TEXT_FAMILY, None)), None
    family = _draw(rng, dist.families, dist.family_cum)
    domain = _draw(rng, dist.domains, dist.domain_cum)
    sample = _with_follow_ups(cfg, split, index, make_sample(rng, cfg, family, domain))
    image = render_scene(
        sample.objects,
        domain,
        rng,
        image_size=cfg.image_size,
        grid=cfg.grid,
        jitter=cfg.jitter,
        noise_std=cfg.noise_std,
        domain_shift=cfg.domain_shift,
    )
    return sample, image


def _with_follow_ups(cfg: WorldConfig, split: str, index: int, sample: Sample) -> Sample:
    """`sample` with its follow-ups: pool samples only, drawn from their own stream."""
    if split == POOL and cfg.turns > 1:
        rng = sample_rng(cfg.seed, f"{split}-turns", index)  # '-' is in no split name
        sample.follow_ups = make_follow_ups(rng, cfg, sample, cfg.turns - 1)
    return sample


def conversation(sample: Sample, has_image: bool) -> list[dict[str, str]]:
    """LLaVA turns of `sample`: the first human turn carries the image token, if any."""
    human = f"{IMAGE_TOKEN}\n{sample.question}" if has_image else sample.question
    turns = [{"from": "human", "value": human}, {"from": "gpt", "value": sample.answer}]
    for f in sample.follow_ups:
        turns += [{"from": "human", "value": f.question}, {"from": "gpt", "value": f.answer}]
    return turns


def sample_id(split: str, index: int) -> str:
    """The id of sample `index` of `split`, e.g. 'pool-0000042'."""
    return f"{split}-{index:07d}"


def generate_rows(
    cfg: WorldConfig, split: str, start: int, count: int
) -> tuple[pa.Table, pa.Table]:
    """Records (RECORDS_SCHEMA) and labels (LABELS_SCHEMA) of indices [start, start + count).

    Rows are in index order and the two tables align row by row (same ids). A record's
    conversation has cfg.turns exchanges in the pool, one elsewhere; the labels describe
    the first exchange.
    """
    dist = split_distribution(cfg, split)
    if start < 0 or count < 0 or start + count > dist.size:
        raise ValueError(
            f"indices [{start}, {start + count}) outside split {split!r} of size {dist.size}"
        )
    rec: dict[str, list] = {"id": [], "image": [], "conversations": []}
    lab: dict[str, list] = {k: [] for k in LABELS_SCHEMA.names}
    for index in range(start, start + count):
        sample, image = generate_sample(cfg, split, index, dist)
        sid = sample_id(split, index)
        rec["id"].append(sid)
        rec["image"].append(None if image is None else encode_png(image))
        rec["conversations"].append(conversation(sample, image is not None))
        lab["id"].append(sid)
        lab["split"].append(split)
        lab["family"].append(sample.family)
        lab["domain"].append(sample.domain)
        lab["answer"].append(sample.answer)
        lab["n_objects"].append(len(sample.objects))
        lab["objects"].append(
            [
                {
                    "row": o.row,
                    "col": o.col,
                    "shape": o.shape,
                    "colour": o.colour,
                    "size": o.size,
                    "digit": o.digit,
                }
                for o in sample.objects
            ]
        )
    return (
        pa.Table.from_pydict(rec, schema=RECORDS_SCHEMA),
        pa.Table.from_pydict(lab, schema=LABELS_SCHEMA),
    )


def plan_shards(cfg: WorldConfig) -> list[ShardSpec]:
    """Shards of every split, cfg.shard_size rows each (the last one shorter)."""
    out = []
    for split in splits(cfg):
        n = split_distribution(cfg, split).size
        for i, start in enumerate(range(0, n, cfg.shard_size)):
            out.append(ShardSpec(split, i, start, min(cfg.shard_size, n - start)))
    return out


def world_manifest(cfg: WorldConfig) -> dict:
    """JSON-ready description of the world: families (with difficulty rank and answer
    sets), domains, colours, shapes, splits with sizes, benchmarks and the config."""
    answers = family_answers(cfg)
    return {
        "families": [
            {
                "name": f,
                "rank": i,
                "text_only": f == TEXT_FAMILY,
                "pool_weight": cfg.families.get(f, 0.0),
                "answers": answers[f],
            }
            for i, f in enumerate(FAMILIES)
        ],
        "text_only_fraction": cfg.text_only_fraction,
        "domains": [{"name": d, "pool_weight": cfg.domains.get(d, 0.0)} for d in DOMAINS],
        "colours": {c: list(rgb) for c, rgb in COLOURS.items()},
        "shapes": list(SHAPES),
        "question_shapes": list(BASIC_SHAPES),
        "sizes": list(SIZES),
        "splits": {s: split_distribution(cfg, s).size for s in splits(cfg)},
        "benchmarks": [b.model_dump() for b in cfg.benchmarks],
        "id_format": "{split}-{index:07d}",
        "config": cfg.model_dump(),
    }
