"""Follow-up turns of the shapes world's multi-turn samples.

A sample's later exchanges ask about the first turn's scene (or, for a text-only sample,
go on with independent arithmetic, as LLaVA-665K's text-only conversations do); each has
one right answer read off the scene's objects, and none repeats another or the first
question. The first question itself is ``engine.world.families``'.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from engine.world.config import TEXT_FAMILY, WorldConfig
from engine.world.families import PAIR_NAMES, FollowUp, Sample, arithmetic, ask, plural
from engine.world.render import BASIC_SHAPES, SceneObject, randint

# What a follow-up about an image scene can ask; each has exactly one right answer, read
# off the scene's objects. Cells are named as the captions name them ('in row 2 column 3',
# 1-based from the top left), and the other kinds ask as the families of engine.world.families do.
FOLLOW_UP_KINDS: tuple[str, ...] = (
    "colour_at",  # the colour of the object in a given (occupied) cell
    "shape_at",  # its shape (a card is 'card')
    "size_at",  # its size
    "counting",  # how many objects of a basic shape (0 when none)
    "existence",  # whether a colour-shape pair is in the scene (yes half the time)
    "position",  # the row of a colour-shape pair that occurs exactly once
)
_CELL = "the object in row {r} column {c}"
_FOLLOW_UP_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour_at": (
        f"What color is {_CELL}?",
        f"What is the color of {_CELL}?",
        f"Which color does {_CELL} have?",
    ),
    "shape_at": (
        f"What shape is {_CELL}?",
        f"What is the shape of {_CELL}?",
        f"Which shape is {_CELL}?",
    ),
    "size_at": (
        f"Is {_CELL} large or small?",
        f"Is {_CELL} small or large?",
        f"What size is {_CELL}?",
    ),
    "counting": (
        "How many {p} are there?",
        "How many {p} are in the image?",
        "Count the {p} in the image.",
    ),
    "existence": (
        "Is there {a} {c} {s}?",
        "Is there {a} {c} {s} in the image?",
        "Does the image contain {a} {c} {s}?",
    ),
    "position": (
        "Which row is the {c} {s} in, counting from the top?",
        "In which row is the {c} {s}? Rows are numbered from 1 at the top.",
        "Counting rows from the top, which row holds the {c} {s}?",
    ),
}
assert tuple(_FOLLOW_UP_TEMPLATES) == FOLLOW_UP_KINDS


def _first_key(sample: Sample) -> tuple | None:
    """The follow-up key the first question would have, so no follow-up repeats it."""
    q = sample.query
    if sample.family == "counting":
        return ("counting", q["shape"])
    if sample.family in ("existence", "position"):
        return (sample.family, q["shape"], q["colour"])
    if sample.family == TEXT_FAMILY:
        return (TEXT_FAMILY, q["a"], q["op"], q["b"])
    return None


def _image_follow_up(
    rng: np.random.Generator, kind: str, objects: list[SceneObject]
) -> FollowUp | None:
    """One follow-up of `kind` about `objects`, or None when the scene cannot pose it."""
    templates = _FOLLOW_UP_TEMPLATES[kind]
    if kind.endswith("_at"):
        o = objects[randint(rng, len(objects))]
        attr = {"colour_at": o.colour, "shape_at": o.shape, "size_at": o.size}[kind]
        q = ask(rng, templates, r=o.row + 1, c=o.col + 1)
        return FollowUp(kind, q, attr, {"row": o.row, "col": o.col})
    if kind == "counting":
        s = BASIC_SHAPES[randint(rng, len(BASIC_SHAPES))]
        n = sum(o.shape == s for o in objects)
        return FollowUp(kind, ask(rng, templates, p=plural(s)), str(n), {"shape": s})
    pairs = Counter((o.shape, o.colour) for o in objects if o.shape in BASIC_SHAPES)
    if kind == "existence":
        present = sorted(pairs)
        absent = [p for p in PAIR_NAMES if p not in pairs]
        yes = randint(rng, 2) == 1 and bool(present)
        choices = present if yes else absent
        s, c = choices[randint(rng, len(choices))]
        a = "an" if c[0] in "aeiou" else "a"
        q = ask(rng, templates, s=s, c=c, a=a)
        return FollowUp(kind, q, "yes" if yes else "no", {"shape": s, "colour": c})
    # position: only a pair that occurs once has one row
    unique = sorted(p for p, n in pairs.items() if n == 1)
    if not unique:
        return None
    s, c = unique[randint(rng, len(unique))]
    row = next(o.row for o in objects if (o.shape, o.colour) == (s, c))
    q = ask(rng, templates, s=s, c=c)
    return FollowUp(kind, q, str(row + 1), {"shape": s, "colour": c})


def _key(f: FollowUp) -> tuple:
    q = f.query
    if f.kind.endswith("_at"):
        return (f.kind, q["row"], q["col"])
    if f.kind == TEXT_FAMILY:
        return (TEXT_FAMILY, q["a"], q["op"], q["b"])
    return (f.kind, *(q[k] for k in ("shape", "colour") if k in q))


def make_follow_ups(
    rng: np.random.Generator, cfg: WorldConfig, sample: Sample, n: int
) -> list[FollowUp]:
    """`n` follow-up exchanges about `sample`'s scene, each asking something new.

    An image sample gets questions of FOLLOW_UP_KINDS about its objects (kind drawn
    uniformly; none repeats another or the first question); a text-only sample gets
    independent questions of the text family, as LLaVA-665K's text-only conversations
    run on over several turns.
    """
    seen = {_first_key(sample)}
    out: list[FollowUp] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * (n + 1):  # unreachable: every scene has >= 6 counting questions
            raise RuntimeError(f"found {len(out)} of {n} follow-ups for a {sample.family} sample")
        if sample.family == TEXT_FAMILY:
            t = arithmetic(rng, cfg, None)
            f: FollowUp | None = FollowUp(TEXT_FAMILY, t.question, t.answer, dict(t.query))
        else:
            kind = FOLLOW_UP_KINDS[randint(rng, len(FOLLOW_UP_KINDS))]
            f = _image_follow_up(rng, kind, sample.objects)
        if f is not None and _key(f) not in seen:
            seen.add(_key(f))
            out.append(f)
    return out
