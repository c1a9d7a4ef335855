"""The base's own scenes: images, per-cell attribute labels and captions.

They come from a world of the same rendering config but another generation seed, so
the base never sees a pool, test or benchmark image (and never reads ground truth:
the scenes are regenerated here, objects and all).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.errors import InputError
from engine.llava.language import SceneTexts, caption_of
from engine.llava.tokenizer import CAPTION_PROMPTS
from engine.world.config import IMAGE_FAMILIES, WorldConfig
from engine.world.generate import generate_sample, split_distribution
from engine.world.render import COLOUR_NAMES, SHAPES, SIZES

SPLIT = "pool"  # drawn like the pool (families, domains), from the base's own seed
# Per-cell attributes and their class counts; the last class of colour, shape, size
# and glyph means 'no such thing in this cell'.
ATTRIBUTES: dict[str, int] = {
    "colour": len(COLOUR_NAMES) + 1,
    "shape": len(SHAPES) + 1,
    "size": len(SIZES) + 1,
    "glyph": 11,
}
_COLOUR = {c: i for i, c in enumerate(COLOUR_NAMES)}
_SHAPE = {s: i for i, s in enumerate(SHAPES)}
_SIZE = {s: i for i, s in enumerate(SIZES)}


@dataclass
class Scenes:
    """n scenes of a grid x grid world.

    images: uint8 (n, H, W, 3); labels: attribute -> int64 (n, grid * grid), cells in
    row-major order (patch order of a patch-per-cell tower); captions: n strings.
    """

    images: np.ndarray
    labels: dict[str, np.ndarray]
    captions: list[str]
    grid: int
    prompt: str

    def __len__(self) -> int:
        return len(self.captions)

    def take(self, idx: np.ndarray) -> Scenes:
        return Scenes(
            self.images[idx],
            {k: v[idx] for k, v in self.labels.items()},
            [self.captions[i] for i in idx.tolist()],
            self.grid,
            self.prompt,
        )


def base_world(
    world: WorldConfig,
    seed: int,
    card_share: float | None = None,
    domains: dict[str, float] | None = None,
) -> WorldConfig:
    """The world of the base's scenes: the same rendering, another seed, no text-only;
    with ``card_share``, that share of scenes from the glyph family (the one with a card);
    with ``domains``, that domain mix instead of the pool's."""
    if seed == world.seed:
        raise InputError(
            f"base seed {seed} equals the world's seed: the base would train on pool scenes; "
            "set base.train.seed to another value"
        )
    update: dict = {"seed": seed, "text_only_fraction": 0.0}
    if card_share is not None:
        others = {f: w for f, w in world.families.items() if f != "glyph"}
        total = sum(others.values()) or 1.0
        families = {f: (1 - card_share) * w / total for f, w in others.items()}
        update["families"] = {**families, "glyph": card_share}
    if domains is not None:
        update["domains"] = dict(domains)
    return world.model_copy(update=update)


def generate_scenes(
    world: WorldConfig,
    seed: int,
    start: int,
    count: int,
    card_share: float | None = None,
    caption_style: str = "objects",
    domains: dict[str, float] | None = None,
) -> Scenes:
    """Scenes [start, start + count) of the base world of ``seed`` (see ``base_world``),
    captioned in ``caption_style`` ('objects': each scene's objects in a random order of
    its own; 'rows': row by row); ``domains``: the base's domain mix (None: the pool's)."""
    if caption_style not in CAPTION_PROMPTS:
        raise InputError(
            f"unknown caption style {caption_style!r}; known: {sorted(CAPTION_PROMPTS)}"
        )
    bw = base_world(world, seed, card_share, domains)
    dist = split_distribution(bw, SPLIT)
    g = world.grid
    images = np.empty((count, world.image_size, world.image_size, 3), np.uint8)
    labels = {k: np.empty((count, g * g), np.int64) for k in ATTRIBUTES}
    empty = {k: n - 1 for k, n in ATTRIBUTES.items()}
    captions = []
    for i in range(count):
        sample, image = generate_sample(bw, SPLIT, start + i, dist)
        images[i] = image
        for k in ATTRIBUTES:
            labels[k][i] = empty[k]
        for o in sample.objects:
            cell = o.row * g + o.col
            labels["colour"][i, cell] = _COLOUR[o.colour]
            labels["shape"][i, cell] = _SHAPE[o.shape]
            labels["size"][i, cell] = _SIZE[o.size]
            if o.digit is not None:
                labels["glyph"][i, cell] = int(o.digit)
        order_rng = np.random.default_rng([seed, start + i])
        captions.append(caption_of(sample.objects, caption_style, g, order_rng))
    return Scenes(images, labels, captions, g, CAPTION_PROMPTS[caption_style])


# Language texts are drawn from sample indices far past any scene's, so their random
# streams never repeat the tower's or the captions' scenes.
LANGUAGE_OFFSET = 1 << 40


def generate_scene_texts(
    world: WorldConfig,
    seed: int,
    start: int,
    count: int,
    families: dict[str, float] | None = None,
    text_share: float = 0.0,
    domains: dict[str, float] | None = None,
) -> SceneTexts:
    """Questions [start, start + count) of the base world of ``seed`` as text: each one's
    objects, question, answer and family (images are rendered by the generator, not kept).

    ``families``: image family -> weight (None: every image family alike); ``text_share``:
    the share of text-only questions (the world's text family); ``domains`` as in
    ``base_world``.
    """
    bw = base_world(world, seed, None, domains)
    mix = families if families is not None else dict.fromkeys(IMAGE_FAMILIES, 1.0)
    bw = bw.model_copy(update={"families": mix, "text_only_fraction": text_share})
    dist = split_distribution(bw, SPLIT)
    objects, questions, answers, fams = [], [], [], []
    for i in range(count):
        sample, _ = generate_sample(bw, SPLIT, LANGUAGE_OFFSET + start + i, dist)
        objects.append(sample.objects)
        questions.append(sample.question)
        answers.append(sample.answer)
        fams.append(sample.family)
    return SceneTexts(objects, questions, answers, fams, world.grid)


def check_grid(world: WorldConfig, image_size: int, patch_size: int) -> None:
    """The attribute heads read one patch per cell: the tower's patch grid must be the world's."""
    if world.image_size != image_size or image_size // patch_size != world.grid:
        raise InputError(
            f"the tiny tower sees {image_size // patch_size}x{image_size // patch_size} patches of "
            f"{image_size}px images, the world draws a {world.grid}x{world.grid} grid on "
            f"{world.image_size}px: set model.vision.image_size={world.image_size} and "
            f"patch_size={world.image_size // world.grid}"
        )
