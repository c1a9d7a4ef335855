"""Question families (skills) of the shapes world.

Every family draws its ANSWER first, uniformly over the family's answer set,
then builds a scene consistent with it, so that a text-only model sits at
chance inside each family. Distractors are chosen to make the question need
the image: objects sharing the asked colour but not the shape, and so on.

`derive_answer` recomputes an answer from the scene alone; the tests use it
as an oracle against the generators.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine.world.config import FAMILIES, IMAGE_FAMILIES, TEXT_FAMILY, WorldConfig
from engine.world.render import BASIC_SHAPES, COLOUR_NAMES, SIZES, SceneObject

SUFFIX = "\nAnswer the question using a single word or number."

# All (shape, colour) pairs of basic shapes, as parallel index arrays, so that
# "any pair except these" is one boolean mask and one rng.choice.
_N_S, _N_C = len(BASIC_SHAPES), len(COLOUR_NAMES)
_PAIR_S = np.repeat(np.arange(_N_S), _N_C)  # (n_pairs,) int
_PAIR_C = np.tile(np.arange(_N_C), _N_S)  # (n_pairs,) int


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


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _ask(rng: np.random.Generator, templates: tuple[str, ...], **kw: object) -> str:
    return templates[int(rng.integers(len(templates)))].format(**kw) + SUFFIX


def _pairs(rng: np.random.Generator, n: int, allowed: np.ndarray) -> list[tuple[str, str]]:
    """`n` (shape, colour) pairs drawn with replacement among the `allowed` (n_pairs,) mask."""
    if n <= 0:
        return []
    ok = np.flatnonzero(allowed)
    idx = ok[rng.integers(len(ok), size=n)]
    return [(BASIC_SHAPES[_PAIR_S[i]], COLOUR_NAMES[_PAIR_C[i]]) for i in idx]


def _not_pair(s: int, c: int) -> np.ndarray:
    return ~((_PAIR_S == s) & (_PAIR_C == c))


def _hard_first(s: int, c: int) -> np.ndarray:
    """Pairs sharing exactly one of shape `s`, colour `c`: the hardest negatives."""
    return (_PAIR_S == s) ^ (_PAIR_C == c)


def _n_extra(rng: np.random.Generator, cfg: WorldConfig, required: int) -> int:
    """How many distractors to add to `required` objects, within [min, max] objects."""
    lo = max(cfg.min_objects, required)
    return int(rng.integers(lo, max(lo, cfg.max_objects) + 1)) - required


def _size(rng: np.random.Generator) -> str:
    return SIZES[int(rng.integers(2))]


def _fill(rng: np.random.Generator, cfg: WorldConfig, placed: list[SceneObject],
          pairs: list[tuple[str, str]]) -> list[SceneObject]:
    """`placed` plus one object per pair, each in a random free cell."""
    n_cells = cfg.grid * cfg.grid
    free = np.ones(n_cells, dtype=bool)
    for o in placed:
        free[o.row * cfg.grid + o.col] = False
    ok = np.flatnonzero(free)
    cells = ok[rng.permutation(len(ok))[: len(pairs)]] if pairs else []
    out = list(placed)
    for (s, c), cell in zip(pairs, cells, strict=True):
        out.append(SceneObject(int(cell) // cfg.grid, int(cell) % cfg.grid, s, c, _size(rng)))
    return out


def _obj_at(rng: np.random.Generator, cfg: WorldConfig, s: str, c: str) -> SceneObject:
    cell = int(rng.integers(cfg.grid * cfg.grid))
    return SceneObject(cell // cfg.grid, cell % cfg.grid, s, c, _size(rng))


def _pick(rng: np.random.Generator, n: int) -> tuple[int, int]:
    return int(rng.integers(_N_S)), int(rng.integers(n))


def colour(rng: np.random.Generator, cfg: WorldConfig, domain: str | None) -> Sample:
    """'What color is the {shape}?': the shape is unique in the scene."""
    s, c = _pick(rng, _N_C)
    target = _obj_at(rng, cfg, BASIC_SHAPES[s], COLOUR_NAMES[c])
    objs = _fill(rng, cfg, [target], _pairs(rng, _n_extra(rng, cfg, 1), _PAIR_S != s))
    q = _ask(rng, ("What color is the {s}?", "What is the color of the {s}?",
                   "Which color does the {s} have?"), s=BASIC_SHAPES[s])
    return Sample("colour", q, COLOUR_NAMES[c], objs, domain, {"shape": BASIC_SHAPES[s]})


def shape(rng: np.random.Generator, cfg: WorldConfig, domain: str | None) -> Sample:
    """'What shape is the {colour} object?': the colour is unique in the scene."""
    s, c = _pick(rng, _N_C)
    target = _obj_at(rng, cfg, BASIC_SHAPES[s], COLOUR_NAMES[c])
    objs = _fill(rng, cfg, [target], _pairs(rng, _n_extra(rng, cfg, 1), _PAIR_C != c))
    q = _ask(rng, ("What shape is the {c} object?", "What is the shape of the {c} object?",
                   "Which shape is {c}?"), c=COLOUR_NAMES[c])
    return Sample("shape", q, BASIC_SHAPES[s], objs, domain, {"colour": COLOUR_NAMES[c]})


def glyph(rng: np.random.Generator, cfg: WorldConfig, domain: str | None) -> Sample:
    """'What number is written on the card?': one card, digit 0..9."""
    digit = int(rng.integers(10))
    cell = int(rng.integers(cfg.grid * cfg.grid))
    card = SceneObject(cell // cfg.grid, cell % cfg.grid, "card",
                       COLOUR_NAMES[int(rng.integers(_N_C))], _size(rng), digit)
    objs = _fill(rng, cfg, [card], _pairs(rng, _n_extra(rng, cfg, 1), np.ones_like(_PAIR_S, bool)))
    q = _ask(rng, ("What number is written on the card?", "What digit is shown on the card?",
                   "Which number does the card show?"))
    return Sample("glyph", q, str(digit), objs, domain, {})


def size(rng: np.random.Generator, cfg: WorldConfig, domain: str | None) -> Sample:
    """'Is the {colour} {shape} large or small?': the pair is unique; others of its shape
    or colour come in both sizes."""
    answer = SIZES[int(rng.integers(2))]
    s, c = _pick(rng, _N_C)
    t = _obj_at(rng, cfg, BASIC_SHAPES[s], COLOUR_NAMES[c])
    target = SceneObject(t.row, t.col, t.shape, t.colour, answer)
    n = _n_extra(rng, cfg, 1)
    pairs = _pairs(rng, min(n, 1), _hard_first(s, c)) + _pairs(rng, n - 1, _not_pair(s, c))
    objs = _fill(rng, cfg, [target], pairs)
    q = _ask(rng, ("Is the {c} {s} large or small?", "Is the {c} {s} small or large?",
                   "What size is the {c} {s}?"), s=BASIC_SHAPES[s], c=COLOUR_NAMES[c])
    return Sample("size", q, answer, objs, domain,
                  {"shape": BASIC_SHAPES[s], "colour": COLOUR_NAMES[c]})


def existence(rng: np.random.Generator, cfg: WorldConfig, domain: str | None) -> Sample:
    """'Is there a {colour} {shape}?': yes/no; a 'no' scene holds look-alikes."""
    yes = bool(rng.integers(2))
    s, c = _pick(rng, _N_C)
    placed = [_obj_at(rng, cfg, BASIC_SHAPES[s], COLOUR_NAMES[c])] if yes else []
    n = _n_extra(rng, cfg, len(placed))
    pairs = _pairs(rng, min(n, 1), _hard_first(s, c)) + _pairs(rng, n - 1, _not_pair(s, c))
    objs = _fill(rng, cfg, placed, pairs)
    q = _ask(rng, ("Is there a {c} {s}?", "Is there a {c} {s} in the image?",
                   "Does the image contain a {c} {s}?"), s=BASIC_SHAPES[s], c=COLOUR_NAMES[c])
    return Sample("existence", q, "yes" if yes else "no", objs, domain,
                  {"shape": BASIC_SHAPES[s], "colour": COLOUR_NAMES[c]})


def position(rng: np.random.Generator, cfg: WorldConfig, domain: str | None) -> Sample:
    """'Which row is the {colour} {shape} in?': rows numbered 1..grid from the top."""
    row = int(rng.integers(cfg.grid))
    s, c = _pick(rng, _N_C)
    target = SceneObject(row, int(rng.integers(cfg.grid)), BASIC_SHAPES[s], COLOUR_NAMES[c],
                         _size(rng))
    n = _n_extra(rng, cfg, 1)
    pairs = _pairs(rng, min(n, 1), _hard_first(s, c)) + _pairs(rng, n - 1, _not_pair(s, c))
    objs = _fill(rng, cfg, [target], pairs)
    q = _ask(rng, ("Which row is the {c} {s} in, counting from the top?",
                   "In which row is the {c} {s}? Rows are numbered from 1 at the top.",
                   "Counting rows from the top, where is the {c} {s}?"),
             s=BASIC_SHAPES[s], c=COLOUR_NAMES[c])
    return Sample("position", q, str(row + 1), objs, domain,
                  {"shape": BASIC_SHAPES[s], "colour": COLOUR_NAMES[c]})


def counting(rng: np.random.Generator, cfg: WorldConfig, domain: str | None) -> Sample:
    """'How many {shape}s are there?': 0..max_count; distractors share the colours."""
    k = int(rng.integers(cfg.max_count + 1))
    s = int(rng.integers(_N_S))
    cols = rng.integers(_N_C, size=k)
    counted = [(BASIC_SHAPES[s], COLOUR_NAMES[int(ci)]) for ci in cols]
    others = _pairs(rng, _n_extra(rng, cfg, k), _PAIR_S != s)  # min_objects >= 1
    objs = _fill(rng, cfg, [], counted + others)
    q = _ask(rng, ("How many {p} are there?", "How many {p} are in the image?",
                   "Count the {p} in the image."), p=_plural(BASIC_SHAPES[s]))
    return Sample("counting", q, str(k), objs, domain, {"shape": BASIC_SHAPES[s]})


_RELATIONS = {
    "left": "Is the {c1} {s1} to the left of the {c2} {s2}?",
    "right": "Is the {c1} {s1} to the right of the {c2} {s2}?",
    "above": "Is the {c1} {s1} above the {c2} {s2}?",
    "below": "Is the {c1} {s1} below the {c2} {s2}?",
}


def spatial(rng: np.random.Generator, cfg: WorldConfig, domain: str | None) -> Sample:
    """'Is the {c1} {s1} to the left of the {c2} {s2}?' (or right/above/below): yes/no,
    the two objects in different columns (rows for above/below)."""
    yes = bool(rng.integers(2))
    rel = tuple(_RELATIONS)[int(rng.integers(4))]
    a = int(rng.integers(_N_S * _N_C))
    b = int(rng.choice(np.flatnonzero(np.arange(_N_S * _N_C) != a)))
    lo, hi = sorted(int(v) for v in rng.choice(cfg.grid, size=2, replace=False))
    # A is left of / above B exactly when A takes the lower coordinate.
    a_lo = (rel in ("left", "above")) == yes
    ca, cb = (lo, hi) if a_lo else (hi, lo)
    other = [int(v) for v in rng.integers(cfg.grid, size=2)]
    if rel in ("left", "right"):
        cells = [(other[0], ca), (other[1], cb)]
    else:
        cells = [(ca, other[0]), (cb, other[1])]
    sa, sb = BASIC_SHAPES[_PAIR_S[a]], BASIC_SHAPES[_PAIR_S[b]]
    c_a, c_b = COLOUR_NAMES[_PAIR_C[a]], COLOUR_NAMES[_PAIR_C[b]]
    placed = [SceneObject(*cells[0], sa, c_a, _size(rng)), SceneObject(*cells[1], sb, c_b,
                                                                        _size(rng))]
    allowed = (np.arange(_N_S * _N_C) != a) & (np.arange(_N_S * _N_C) != b)
    objs = _fill(rng, cfg, placed, _pairs(rng, _n_extra(rng, cfg, 2), allowed))
    q = _RELATIONS[rel].format(c1=c_a, s1=sa, c2=c_b, s2=sb) + SUFFIX
    return Sample("spatial", q, "yes" if yes else "no", objs, domain,
                  {"shape": sa, "colour": c_a, "shape2": sb, "colour2": c_b, "relation": rel})


def compare(rng: np.random.Generator, cfg: WorldConfig, domain: str | None) -> Sample:
    """'Are there more {c1} objects than {c2} objects?' (or fewer): yes/no, counts differ."""
    yes = bool(rng.integers(2))
    more = bool(rng.integers(2))
    c1, c2 = (int(v) for v in rng.choice(_N_C, size=2, replace=False))
    cap = min(cfg.max_count, cfg.max_objects - 1)
    pairs_hl = [(h, lo) for h in range(1, cap + 1) for lo in range(h)
                if h + lo <= cfg.max_objects]
    hi, lo = pairs_hl[int(rng.integers(len(pairs_hl)))]
    n1, n2 = (hi, lo) if more == yes else (lo, hi)
    objs_pairs = [(BASIC_SHAPES[int(s)], COLOUR_NAMES[c1]) for s in rng.integers(_N_S, size=n1)]
    objs_pairs += [(BASIC_SHAPES[int(s)], COLOUR_NAMES[c2]) for s in rng.integers(_N_S, size=n2)]
    allowed = (_PAIR_C != c1) & (_PAIR_C != c2)
    objs_pairs += _pairs(rng, _n_extra(rng, cfg, n1 + n2), allowed)
    objs = _fill(rng, cfg, [], objs_pairs)
    word = "more" if more else "fewer"
    q = _ask(rng, ("Are there {w} {c1} objects than {c2} objects?",
                   "Are there {w} {c1} shapes than {c2} shapes?",
                   "Does the image have {w} {c1} objects than {c2} objects?"),
             w=word, c1=COLOUR_NAMES[c1], c2=COLOUR_NAMES[c2])
    return Sample("compare", q, "yes" if yes else "no", objs, domain,
                  {"colour": COLOUR_NAMES[c1], "colour2": COLOUR_NAMES[c2], "word": word})


def arithmetic(rng: np.random.Generator, cfg: WorldConfig, domain: str | None) -> Sample:
    """Text-only 'What is 3 plus 4?': answer 0..18 uniform, operands 0..9; no image."""
    n = int(rng.integers(19))
    ops = ["plus", "minus"] + (["times"] if any(n == a * b for a in range(10)
                                                for b in range(10)) else [])
    op = ops[int(rng.integers(len(ops)))]
    if op == "plus":
        a = int(rng.integers(max(0, n - 9), min(9, n) + 1))
        b = n - a
    elif op == "minus":
        b = int(rng.integers(10))
        a = n + b
    else:
        facts = [(a, b) for a in range(10) for b in range(10) if a * b == n]
        a, b = facts[int(rng.integers(len(facts)))]
    q = _ask(rng, ("What is {a} {op} {b}?", "Compute {a} {op} {b}.",
                   "How much is {a} {op} {b}?"), a=a, op=op, b=b)
    return Sample(TEXT_FAMILY, q, str(n), [], None, {"a": a, "b": b, "op": op})


FAMILY_FUNCS: dict[str, Callable[[np.random.Generator, WorldConfig, str | None], Sample]] = {
    "colour": colour, "shape": shape, "glyph": glyph, "size": size, "existence": existence,
    "position": position, "counting": counting, "spatial": spatial, "compare": compare,
    TEXT_FAMILY: arithmetic,
}
assert tuple(FAMILY_FUNCS) == FAMILIES


def family_answers(cfg: WorldConfig) -> dict[str, list[str]]:
    """Each family's answer set (answers are drawn uniformly from it)."""
    yn = ["yes", "no"]
    return {
        "colour": list(COLOUR_NAMES), "shape": list(BASIC_SHAPES),
        "glyph": [str(d) for d in range(10)], "size": list(SIZES), "existence": yn,
        "position": [str(r + 1) for r in range(cfg.grid)],
        "counting": [str(k) for k in range(cfg.max_count + 1)], "spatial": yn, "compare": yn,
        TEXT_FAMILY: [str(n) for n in range(19)],
    }


def _one(objects: list[SceneObject], pred: Callable[[SceneObject], bool]) -> SceneObject:
    hits = [o for o in objects if pred(o)]
    if len(hits) != 1:
        raise ValueError(f"expected exactly one matching object, found {len(hits)}")
    return hits[0]


def derive_answer(sample: Sample) -> str:
    """The answer implied by `sample.objects` and `sample.query` alone.

    Raises ValueError when the scene makes the question ambiguous (the referred
    object is missing or not unique), which a correct generator never does.
    """
    q, objs, f = sample.query, sample.objects, sample.family
    if len({(o.row, o.col) for o in objs}) != len(objs):
        raise ValueError("two objects share a cell")
    if f == "colour":
        return _one(objs, lambda o: o.shape == q["shape"]).colour
    if f == "shape":
        return _one(objs, lambda o: o.colour == q["colour"]).shape
    if f == "glyph":
        return str(_one(objs, lambda o: o.shape == "card").digit)
    is_t = lambda o: o.shape == q["shape"] and o.colour == q["colour"]  # noqa: E731
    if f == "size":
        return _one(objs, is_t).size
    if f == "existence":
        return "yes" if any(is_t(o) for o in objs) else "no"
    if f == "position":
        return str(_one(objs, is_t).row + 1)
    if f == "counting":
        return str(sum(o.shape == q["shape"] for o in objs))
    if f == "spatial":
        a = _one(objs, is_t)
        b = _one(objs, lambda o: o.shape == q["shape2"] and o.colour == q["colour2"])
        rel = q["relation"]
        key = (a.col, b.col) if rel in ("left", "right") else (a.row, b.row)
        if key[0] == key[1]:
            raise ValueError("spatial objects share the compared coordinate")
        first = key[0] < key[1]
        return "yes" if first == (rel in ("left", "above")) else "no"
    if f == "compare":
        n1 = sum(o.colour == q["colour"] for o in objs)
        n2 = sum(o.colour == q["colour2"] for o in objs)
        if n1 == n2:
            raise ValueError("compare counts are equal")
        return "yes" if (n1 > n2) == (q["word"] == "more") else "no"
    if f == TEXT_FAMILY:
        a, b, op = q["a"], q["b"], q["op"]
        return str({"plus": a + b, "minus": a - b, "times": a * b}[op])
    raise ValueError(f"unknown family {f!r}; known: {list(FAMILIES)}")


def make_sample(rng: np.random.Generator, cfg: WorldConfig, family: str,
                domain: str | None) -> Sample:
    """A sample of `family` (image families need a domain; the text family ignores it)."""
    if family not in FAMILY_FUNCS:
        raise ValueError(f"unknown family {family!r}; known: {list(FAMILIES)}")
    return FAMILY_FUNCS[family](rng, cfg, None if family not in IMAGE_FAMILIES else domain)
