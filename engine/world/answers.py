"""Answer sets, an answer oracle and scene captions of the shapes world.

`derive_answer` recomputes a sample's answer from its scene and question
parameters only, independently of the generator that drew the answer first;
tests hold the two against each other, and evaluation code can use it to
re-label scenes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from engine.world.config import FAMILIES, TEXT_FAMILY, WorldConfig
from engine.world.families import Sample
from engine.world.render import BASIC_SHAPES, COLOUR_NAMES, SIZES, SceneObject


def family_answers(cfg: WorldConfig) -> dict[str, list[str]]:
    """Each family's answer set (answers are drawn uniformly from it)."""
    yn = ["yes", "no"]
    return {
        "colour": list(COLOUR_NAMES),
        "shape": list(BASIC_SHAPES),
        "glyph": [str(d) for d in range(10)],
        "size": list(SIZES),
        "existence": yn,
        "position": [str(r + 1) for r in range(cfg.grid)],
        "counting": [str(k) for k in range(cfg.max_count + 1)],
        "spatial": yn,
        "compare": yn,
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


def _object_name(o: SceneObject) -> str:
    return f"{o.size} {o.colour} " + (f"card showing {o.digit}" if o.shape == "card" else o.shape)


def object_caption(objects: list[SceneObject], order: Sequence[int]) -> str:
    """The objects of a scene in ``order``, e.g. 'large red circle in row 1 column 2. ...'.

    Meant for pretraining a language model on the world. A random order per scene makes
    the model find, for the attributes it has written so far, the patch that holds them
    and read the rest there: the content-addressed lookup that questions ask for ('What
    color is the circle?'), which a fixed reading order never trains.
    """
    return " ".join(
        f"{_object_name(objects[i])} in row {objects[i].row + 1} column {objects[i].col + 1}."
        for i in order
    )


def scene_caption(objects: list[SceneObject], grid: int) -> str:
    """Row-by-row description of a scene, e.g. 'Row 1: large red circle, empty, ...'.

    Meant for pretraining a language model on the world (cells left to right,
    'empty' where no object sits; a card names its digit).
    """
    cells: dict[tuple[int, int], SceneObject] = {(o.row, o.col): o for o in objects}
    rows = []
    for r in range(grid):
        parts = []
        for c in range(grid):
            o = cells.get((r, c))
            if o is None:
                parts.append("empty")
            else:
                parts.append(_object_name(o))
        rows.append(f"Row {r + 1}: " + ", ".join(parts) + ".")
    return "\n".join(rows)
