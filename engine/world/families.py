"""Question families (skills) of the shapes world.

Every family draws its ANSWER first, uniformly over the family's answer set,
then builds a scene consistent with it, so that a text-only model sits at
chance inside each family. Distractors are chosen to make the question need
the image: objects sharing the asked colour but not the shape, and so on.

`engine.world.answers.derive_answer` recomputes an answer from the scene
alone; the tests use it as an oracle against these generators.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from engine.world.config import FAMILIES, IMAGE_FAMILIES, TEXT_FAMILY, WorldConfig
from engine.world.render import BASIC_SHAPES, COLOUR_NAMES, SIZES, SceneObject, randint

SUFFIX = "\nAnswer the question using a single word or number."

# All (shape, colour) pairs of basic shapes, as parallel index arrays; a family's
# "any pair except these" is an index array of allowed pairs, cached per query.
_N_S, _N_C = len(BASIC_SHAPES), len(COLOUR_NAMES)
_N_PAIRS = _N_S * _N_C
_PAIR_S = np.repeat(np.arange(_N_S), _N_C)  # (n_pairs,) int
_PAIR_C = np.tile(np.arange(_N_C), _N_S)  # (n_pairs,) int
PAIR_NAMES = [(BASIC_SHAPES[i], COLOUR_NAMES[j]) for i, j in zip(_PAIR_S, _PAIR_C, strict=True)]


@dataclass(slots=True)
class Sample:
    """One generated question: the scene (empty for text-only), the question and answer.

    question excludes the "<image>\\n" token; query holds the question's parameters
    (shape, colour, relation, ...) so the answer can be re-derived from `objects`.
    """

    family: str
    question: str
    answer: str
    objects: list[SceneObject]
    domain: str | None
    query: dict = field(default_factory=dict)
    follow_ups: list[FollowUp] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class FollowUp:
    """A later exchange of a multi-turn sample: a question (no '<image>' token) about the
    first turn's scene and its one right answer, derived from the objects.

    kind is one of ``engine.world.follow_ups.FOLLOW_UP_KINDS`` (TEXT_FAMILY for a
    text-only sample's follow-up); query holds its parameters (row and col 0-based, shape, colour; a, b, op).
    """

    kind: str
    question: str
    answer: str
    query: dict = field(default_factory=dict)


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def ask(rng: np.random.Generator, templates: tuple[str, ...], **kw: object) -> str:
    return templates[randint(rng, len(templates))].format(**kw) + SUFFIX


@lru_cache(maxsize=4096)
def _allowed(kind: str, s: int = -1, c: int = -1, s2: int = -1, c2: int = -1) -> np.ndarray:
    """Indices (k,) intp of the (shape, colour) pairs a distractor may take.

    kind: "all"; "not_shape" (shape != s); "not_colour" (colour not in {c, c2});
    "not_pair" (pair != (s, c) and != (s2, c2)); "hard" (shares exactly one of s, c).
    """
    ps, pc = _PAIR_S, _PAIR_C
    if kind == "all":
        m = np.ones(_N_PAIRS, dtype=bool)
    elif kind == "not_shape":
        m = ps != s
    elif kind == "not_colour":
        m = (pc != c) & (pc != c2)
    elif kind == "not_pair":
        m = ~((ps == s) & (pc == c)) & ~((ps == s2) & (pc == c2))
    elif kind == "hard":
        m = (ps == s) ^ (pc == c)
    else:
        raise ValueError(f"unknown distractor kind {kind!r}")
    idx = np.flatnonzero(m)
    idx.setflags(write=False)
    return idx


def _pairs(rng: np.random.Generator, n: int, allowed: np.ndarray) -> list[tuple[str, str]]:
    """`n` (shape, colour) name pairs drawn with replacement among `allowed` pair indices."""
    if n <= 0:
        return []
    picks = (rng.random(n) * len(allowed)).astype(np.intp)
    return [PAIR_NAMES[allowed[i]] for i in picks.tolist()]


def _distractors(rng: np.random.Generator, n: int, s: int, c: int) -> list[tuple[str, str]]:
    """`n` objects that are not the ({s}, {c}) pair, the first sharing its shape or colour."""
    return _pairs(rng, min(n, 1), _allowed("hard", s, c)) + _pairs(
        rng, n - 1, _allowed("not_pair", s, c)
    )


def _n_extra(rng: np.random.Generator, cfg: WorldConfig, required: int) -> int:
    """How many distractors to add to `required` objects, for a total in [min, max] objects."""
    lo = max(cfg.min_objects, required)
    return lo + randint(rng, max(lo, cfg.max_objects) - lo + 1) - required


def _size(rng: np.random.Generator) -> str:
    return SIZES[randint(rng, 2)]


def _fill(
    rng: np.random.Generator,
    cfg: WorldConfig,
    placed: list[SceneObject],
    pairs: list[tuple[str, str]],
) -> list[SceneObject]:
    """`placed` plus one object of random size per pair, each in a random free cell."""
    if not pairs:
        return list(placed)
    g = cfg.grid
    taken = {o.row * g + o.col for o in placed}
    free = [i for i in range(g * g) if i not in taken]
    order = np.argsort(rng.random(len(free)))[: len(pairs)].tolist()  # a random subset
    big = (rng.random(len(pairs)) < 0.5).tolist()
    out = list(placed)
    for (s, c), k, z in zip(pairs, order, big, strict=True):
        out.append(SceneObject(free[k] // g, free[k] % g, s, c, SIZES[z]))
    return out


def _obj_at(rng: np.random.Generator, cfg: WorldConfig, s: int, c: int) -> SceneObject:
    cell = randint(rng, cfg.grid * cfg.grid)
    return SceneObject(
        cell // cfg.grid, cell % cfg.grid, BASIC_SHAPES[s], COLOUR_NAMES[c], _size(rng)
    )


def _pick(rng: np.random.Generator) -> tuple[int, int]:
    return randint(rng, _N_S), randint(rng, _N_C)


def _two(rng: np.random.Generator, n: int) -> tuple[int, int]:
    """Two distinct ints in [0, n), in random order."""
    a = randint(rng, n)
    return a, (a + 1 + randint(rng, n - 1)) % n


def _names(s: int, c: int) -> dict[str, str]:
    return {"shape": BASIC_SHAPES[s], "colour": COLOUR_NAMES[c]}


def colour(rng: np.random.Generator, cfg: WorldConfig, domain: str | None) -> Sample:
    """'What color is the {shape}?': the shape is unique in the scene."""
    s, c = _pick(rng)
    pairs = _pairs(rng, _n_extra(rng, cfg, 1), _allowed("not_shape", s))
    objs = _fill(rng, cfg, [_obj_at(rng, cfg, s, c)], pairs)
    q = ask(
        rng,
        (
            "What color is the {s}?",
            "What is the color of the {s}?",
            "Which color does the {s} have?",
        ),
        s=BASIC_SHAPES[s],
    )
    return Sample("colour", q, COLOUR_NAMES[c], objs, domain, {"shape": BASIC_SHAPES[s]})


def shape(rng: np.random.Generator, cfg: WorldConfig, domain: str | None) -> Sample:
    """'What shape is the {colour} object?': the colour is unique; its shape recurs in
    other colours."""
    s, c = _pick(rng)
    pairs = _pairs(rng, _n_extra(rng, cfg, 1), _allowed("not_colour", c=c))
    objs = _fill(rng, cfg, [_obj_at(rng, cfg, s, c)], pairs)
    q = ask(
        rng,
        (
            "What shape is the {c} object?",
            "What is the shape of the {c} object?",
            "Which shape is {c}?",
        ),
        c=COLOUR_NAMES[c],
    )
    return Sample("shape", q, BASIC_SHAPES[s], objs, domain, {"colour": COLOUR_NAMES[c]})


def glyph(rng: np.random.Generator, cfg: WorldConfig, domain: str | None) -> Sample:
    """'What number is written on the card?': one card, digit 0..9, among other shapes."""
    digit = randint(rng, 10)
    t = _obj_at(rng, cfg, 0, randint(rng, _N_C))
    card = SceneObject(t.row, t.col, "card", t.colour, t.size, digit)
    objs = _fill(rng, cfg, [card], _pairs(rng, _n_extra(rng, cfg, 1), _allowed("all")))
    q = ask(
        rng,
        (
            "What number is written on the card?",
            "What digit is shown on the card?",
            "Which number does the card show?",
        ),
    )
    return Sample("glyph", q, str(digit), objs, domain, {})


def size(rng: np.random.Generator, cfg: WorldConfig, domain: str | None) -> Sample:
    """'Is the {colour} {shape} large or small?': the pair is unique; look-alikes sharing
    its shape or colour come in both sizes."""
    answer = SIZES[randint(rng, 2)]
    s, c = _pick(rng)
    t = _obj_at(rng, cfg, s, c)
    target = SceneObject(t.row, t.col, t.shape, t.colour, answer)
    objs = _fill(rng, cfg, [target], _distractors(rng, _n_extra(rng, cfg, 1), s, c))
    q = ask(
        rng,
        (
            "Is the {c} {s} large or small?",
            "Is the {c} {s} small or large?",
            "What size is the {c} {s}?",
        ),
        s=BASIC_SHAPES[s],
        c=COLOUR_NAMES[c],
    )
    return Sample("size", q, answer, objs, domain, _names(s, c))


def existence(rng: np.random.Generator, cfg: WorldConfig, domain: str | None) -> Sample:
    """'Is there a {colour} {shape}?': yes/no; every scene holds a look-alike."""
    yes = randint(rng, 2) == 1
    s, c = _pick(rng)
    placed = [_obj_at(rng, cfg, s, c)] if yes else []
    objs = _fill(rng, cfg, placed, _distractors(rng, _n_extra(rng, cfg, len(placed)), s, c))
    q = ask(
        rng,
        (
            "Is there {a} {c} {s}?",
            "Is there {a} {c} {s} in the image?",
            "Does the image contain {a} {c} {s}?",
        ),
        s=BASIC_SHAPES[s],
        c=COLOUR_NAMES[c],
        a="an" if COLOUR_NAMES[c][0] in "aeiou" else "a",
    )
    return Sample("existence", q, "yes" if yes else "no", objs, domain, _names(s, c))


def position(rng: np.random.Generator, cfg: WorldConfig, domain: str | None) -> Sample:
    """'Which row is the {colour} {shape} in?': rows numbered 1..grid from the top."""
    row = randint(rng, cfg.grid)
    s, c = _pick(rng)
    target = SceneObject(row, randint(rng, cfg.grid), BASIC_SHAPES[s], COLOUR_NAMES[c], _size(rng))
    objs = _fill(rng, cfg, [target], _distractors(rng, _n_extra(rng, cfg, 1), s, c))
    q = ask(
        rng,
        (
            "Which row is the {c} {s} in, counting from the top?",
            "In which row is the {c} {s}? Rows are numbered from 1 at the top.",
            "Counting rows from the top, which row holds the {c} {s}?",
        ),
        s=BASIC_SHAPES[s],
        c=COLOUR_NAMES[c],
    )
    return Sample("position", q, str(row + 1), objs, domain, _names(s, c))


def counting(rng: np.random.Generator, cfg: WorldConfig, domain: str | None) -> Sample:
    """'How many {shape}s are there?': 0..max_count; distractors are other shapes in the
    same colours."""
    k = randint(rng, cfg.max_count + 1)
    s = randint(rng, _N_S)
    counted = [(BASIC_SHAPES[s], COLOUR_NAMES[randint(rng, _N_C)]) for _ in range(k)]
    others = _pairs(rng, _n_extra(rng, cfg, k), _allowed("not_shape", s))
    objs = _fill(rng, cfg, [], counted + others)
    q = ask(
        rng,
        (
            "How many {p} are there?",
            "How many {p} are in the image?",
            "Count the {p} in the image.",
        ),
        p=plural(BASIC_SHAPES[s]),
    )
    return Sample("counting", q, str(k), objs, domain, {"shape": BASIC_SHAPES[s]})


_RELATIONS = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}
_SPATIAL_TEMPLATES = (
    "Is the {c1} {s1} {rel} the {c2} {s2}?",
    "Is the {c1} {s1} located {rel} the {c2} {s2}?",
    "In the image, is the {c1} {s1} {rel} the {c2} {s2}?",
)
_REL_NAMES = tuple(_RELATIONS)


def spatial(rng: np.random.Generator, cfg: WorldConfig, domain: str | None) -> Sample:
    """'Is the {c1} {s1} to the left of the {c2} {s2}?' (or right/above/below): yes/no,
    the two objects in different columns (rows for above/below), each unique."""
    yes = randint(rng, 2) == 1
    rel = _REL_NAMES[randint(rng, 4)]
    a, b = _two(rng, _N_PAIRS)
    lo, hi = sorted(_two(rng, cfg.grid))
    # A is left of / above B exactly when A takes the lower coordinate.
    ca, cb = (lo, hi) if (rel in ("left", "above")) == yes else (hi, lo)
    oa, ob = randint(rng, cfg.grid), randint(rng, cfg.grid)
    cells = [(oa, ca), (ob, cb)] if rel in ("left", "right") else [(ca, oa), (cb, ob)]
    (sa, c_a), (sb, c_b) = PAIR_NAMES[a], PAIR_NAMES[b]
    placed = [
        SceneObject(*cells[0], sa, c_a, _size(rng)),
        SceneObject(*cells[1], sb, c_b, _size(rng)),
    ]
    allowed = _allowed(
        "not_pair", int(_PAIR_S[a]), int(_PAIR_C[a]), int(_PAIR_S[b]), int(_PAIR_C[b])
    )
    objs = _fill(rng, cfg, placed, _pairs(rng, _n_extra(rng, cfg, 2), allowed))
    q = ask(rng, _SPATIAL_TEMPLATES, c1=c_a, s1=sa, rel=_RELATIONS[rel], c2=c_b, s2=sb)
    return Sample(
        "spatial",
        q,
        "yes" if yes else "no",
        objs,
        domain,
        {"shape": sa, "colour": c_a, "shape2": sb, "colour2": c_b, "relation": rel},
    )


@lru_cache(maxsize=64)
def _count_pairs(max_count: int, max_objects: int) -> tuple[tuple[int, int], ...]:
    """(high, low) count pairs with high > low, high <= max_count, sum <= max_objects."""
    cap = min(max_count, max_objects - 1)
    return tuple((h, lo) for h in range(1, cap + 1) for lo in range(h) if h + lo <= max_objects)


def compare(rng: np.random.Generator, cfg: WorldConfig, domain: str | None) -> Sample:
    """'Are there more {c1} objects than {c2} objects?' (or fewer): yes/no, counts differ,
    other objects in other colours."""
    yes = randint(rng, 2) == 1
    more = randint(rng, 2) == 1
    c1, c2 = _two(rng, _N_C)
    pairs_hl = _count_pairs(cfg.max_count, cfg.max_objects)
    hi, lo = pairs_hl[randint(rng, len(pairs_hl))]
    n1, n2 = (hi, lo) if more == yes else (lo, hi)
    pairs = [(BASIC_SHAPES[randint(rng, _N_S)], COLOUR_NAMES[c1]) for _ in range(n1)]
    pairs += [(BASIC_SHAPES[randint(rng, _N_S)], COLOUR_NAMES[c2]) for _ in range(n2)]
    pairs += _pairs(rng, _n_extra(rng, cfg, n1 + n2), _allowed("not_colour", c=c1, c2=c2))
    objs = _fill(rng, cfg, [], pairs)
    word = "more" if more else "fewer"
    q = ask(
        rng,
        (
            "Are there {w} {c1} objects than {c2} objects?",
            "Are there {w} {c1} shapes than {c2} shapes?",
            "Does the image have {w} {c1} objects than {c2} objects?",
        ),
        w=word,
        c1=COLOUR_NAMES[c1],
        c2=COLOUR_NAMES[c2],
    )
    return Sample(
        "compare",
        q,
        "yes" if yes else "no",
        objs,
        domain,
        {"colour": COLOUR_NAMES[c1], "colour2": COLOUR_NAMES[c2], "word": word},
    )


_PRODUCTS = {n: [(a, b) for a in range(10) for b in range(10) if a * b == n] for n in range(19)}


def arithmetic(rng: np.random.Generator, cfg: WorldConfig, domain: str | None) -> Sample:
    """Text-only 'What is 3 plus 4?': answer 0..18 uniform, operands 0..9; no image."""
    n = randint(rng, 19)
    ops = ("plus", "minus", "times") if _PRODUCTS[n] else ("plus", "minus")
    op = ops[randint(rng, len(ops))]
    if op == "plus":
        lo = max(0, n - 9)
        a = lo + randint(rng, min(9, n) - lo + 1)
        b = n - a
    elif op == "minus":
        b = randint(rng, 10)
        a = n + b
    else:
        a, b = _PRODUCTS[n][randint(rng, len(_PRODUCTS[n]))]
    q = ask(
        rng,
        ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?"),
        a=a,
        op=op,
        b=b,
    )
    return Sample(TEXT_FAMILY, q, str(n), [], None, {"a": a, "b": b, "op": op})


FAMILY_FUNCS: dict[str, Callable[[np.random.Generator, WorldConfig, str | None], Sample]] = {
    "colour": colour,
    "shape": shape,
    "glyph": glyph,
    "size": size,
    "existence": existence,
    "position": position,
    "counting": counting,
    "spatial": spatial,
    "compare": compare,
    TEXT_FAMILY: arithmetic,
}
assert tuple(FAMILY_FUNCS) == FAMILIES


def make_sample(
    rng: np.random.Generator, cfg: WorldConfig, family: str, domain: str | None
) -> Sample:
    """A sample of `family` (image families need a domain; the text family ignores it)."""
    if family not in FAMILY_FUNCS:
        raise ValueError(f"unknown family {family!r}; known: {list(FAMILIES)}")
    return FAMILY_FUNCS[family](rng, cfg, None if family not in IMAGE_FAMILIES else domain)
