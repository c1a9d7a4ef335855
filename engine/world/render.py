"""Numpy renderer of shapes-world scenes: one object per grid cell on a domain background.

A grid layout (default 4 x 4 cells of 16 px, matching a patch-16 vision tower)
is what let a tiny LLaVA learn the world on 2 cores, so every object lives
inside one cell. Object masks are cached per (shape, size, offset, cell size):
a scene is a handful of boolean-indexed assignments, no per-pixel Python.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from engine.world.config import DOMAINS

# Object shapes that questions name; "card" (a tile carrying a digit) is used by
# the glyph family only, so that "the card" is always unambiguous.
BASIC_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")
SHAPES: tuple[str, ...] = (*BASIC_SHAPES, "card")
SIZES: tuple[str, ...] = ("small", "large")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
_COLOUR_INDEX = {c: i for i, c in enumerate(COLOUR_NAMES)}
_COLOUR_RGB = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)  # (n_colours, 3)

# Per domain: background base RGB, and an affine colour transform T(c) = c @ M.T + b
# that domain_shift blends in. The transforms move colours enough that a model must
# see a domain to name colours in it, yet keep colours apart from each other and
# from the background (tests check the margins).
_GREY = np.full((3, 3), 1.0 / 3.0, dtype=np.float32)
_DOMAIN_STYLE: dict[str, dict] = {
    "meadow": {"base": (95, 130, 70), "M": np.eye(3), "b": (0, 0, 0)},
    "ocean": {"base": (35, 70, 120), "M": np.diag([0.75, 0.95, 1.0]), "b": (0, 25, 40)},
    "desert": {"base": (200, 170, 115), "M": np.diag([1.0, 0.85, 0.55]), "b": (30, 15, 0)},
    "space": {"base": (14, 14, 32), "M": np.eye(3) * 0.6, "b": (30, 10, 50)},
    "snow": {"base": (185, 195, 210), "M": 0.5 * np.eye(3) + 0.5 * _GREY, "b": (10, 10, 20)},
}
assert tuple(_DOMAIN_STYLE) == DOMAINS

_N_BACKGROUNDS = 8  # cached texture variants per domain; a sample picks one
_N_NOISE = 16  # noise fields in the bank; a sample crops one
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# 3 x 5 bitmap digits, rows top to bottom.
_FONT = {
    0: ("111", "101", "101", "101", "111"),
    1: ("010", "110", "010", "010", "111"),
    2: ("111", "001", "111", "100", "111"),
    3: ("111", "001", "111", "001", "111"),
    4: ("101", "101", "111", "001", "001"),
    5: ("111", "100", "111", "001", "111"),
    6: ("111", "100", "111", "101", "111"),
    7: ("111", "001", "010", "010", "010"),
    8: ("111", "101", "111", "101", "111"),
    9: ("111", "101", "111", "001", "111"),
}
_DIGITS = {d: np.array([[ch == "1" for ch in row] for row in rows]) for d, rows in _FONT.items()}


@dataclass(frozen=True, slots=True)
class SceneObject:
    """One object of a scene: the cell it occupies and its attributes.

    row, col: grid cell (0-based, row 0 at the top); shape in SHAPES; colour in
    COLOURS; size in SIZES; digit 0..9 for a card, else None.
    """

    row: int
    col: int
    shape: str
    colour: str
    size: str
    digit: int | None = None


def randint(rng: np.random.Generator, n: int) -> int:
    """Uniform int in [0, n); a quarter the cost of rng.integers for one scalar."""
    return min(int(rng.random() * n), n - 1)


def _radius(size: str, cell: int) -> float:
    return (0.42 if size == "large" else 0.26) * cell


def max_offset(size: str, cell: int, jitter: int) -> int:
    """Largest centre offset (px) that keeps an object of `size` inside its cell."""
    return max(0, min(jitter, int(cell / 2 - _radius(size, cell))))


@lru_cache(maxsize=8192)
def shape_mask(shape: str, size: str, dy: int, dx: int, cell: int) -> np.ndarray:
    """Boolean (cell, cell) mask of a shape centred at the cell centre + (dy, dx) px."""
    r = _radius(size, cell)
    c = (cell - 1) / 2.0
    yy, xx = np.mgrid[0:cell, 0:cell].astype(np.float32)
    y, x = yy - c - dy, xx - c - dx
    ay, ax = np.abs(y), np.abs(x)
    d = np.sqrt(y * y + x * x)
    if shape == "circle":
        m = d <= r
    elif shape == "square":
        m = np.maximum(ay, ax) <= 0.8 * r
    elif shape == "card":
        m = np.maximum(ay, ax) <= 0.95 * r
    elif shape == "triangle":
        # apex up, base at 0.8 r below the centre
        m = (y >= -r) & (y <= 0.8 * r) & (ax <= (y + r) / 1.8)
    elif shape == "diamond":
        m = ay + ax <= 1.1 * r
    elif shape == "cross":
        w = max(0.3 * r, 0.75)
        m = ((ax <= w) & (ay <= r)) | ((ay <= w) & (ax <= r))
    elif shape == "ring":
        m = (d <= r) & (d >= max(0.55 * r, r - 3.0))
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {list(SHAPES)}")
    m.setflags(write=False)
    return m


@lru_cache(maxsize=4096)
def glyph_mask(digit: int, size: str, dy: int, dx: int, cell: int) -> np.ndarray:
    """Boolean (cell, cell) mask of a digit drawn on a card of `size`, same offset as its tile."""
    half = 0.95 * _radius(size, cell)
    scale = max(1, int((2 * half - 2) // 5))  # the 5-px-high glyph fits in the tile
    g = np.kron(_DIGITS[digit], np.ones((scale, scale), dtype=bool))
    h, w = g.shape
    top = int(round((cell - h) / 2 + dy))
    left = int(round((cell - w) / 2 + dx))
    m = np.zeros((cell, cell), dtype=bool)
    m[top : top + h, left : left + w] = g
    m.setflags(write=False)
    return m


@lru_cache(maxsize=64)
def domain_palette(domain: str, shift: float) -> np.ndarray:
    """Object colours as seen in `domain`: float32 (n_colours, 3), rows in COLOUR_NAMES order."""
    st = _DOMAIN_STYLE[domain]
    t = _COLOUR_RGB @ np.asarray(st["M"], dtype=np.float32).T + np.asarray(st["b"], np.float32)
    out = (1.0 - shift) * _COLOUR_RGB + shift * np.clip(t, 0, 255)
    out = np.clip(out, 0, 255).astype(np.float32)
    out.setflags(write=False)
    return out


def domain_base(domain: str) -> np.ndarray:
    """Background base colour of `domain`: float32 (3,)."""
    return np.asarray(_DOMAIN_STYLE[domain]["base"], dtype=np.float32)


@lru_cache(maxsize=256)
def background(domain: str, image_size: int, variant: int) -> np.ndarray:
    """Textured background: float32 (image_size, image_size, 3), values 0..255.

    Variants are generated from a fixed seed so every run draws the same eight.
    """
    n = image_size
    rng = np.random.default_rng([zlib.crc32(domain.encode()), variant, n])
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n  # (n, n) in [0, 1)
    base = domain_base(domain)
    phase = rng.uniform(0, 2 * np.pi)
    if domain == "meadow":  # grass stripes with scattered blades
        tex = 10 * np.sin(2 * np.pi * 6 * yy + phase) + 18 * (rng.random((n, n)) < 0.04)
    elif domain == "ocean":  # waves
        tex = 14 * np.sin(2 * np.pi * (5 * yy + 0.6 * np.sin(2 * np.pi * 2 * xx + phase)))
    elif domain == "desert":  # light from above, dunes, pebbles
        dunes = 10 * np.sin(2 * np.pi * (2 * xx + 3 * yy) + phase)
        tex = 25 * (0.5 - yy) + dunes - 30 * (rng.random((n, n)) < 0.02)
    elif domain == "space":  # stars of varying brightness
        stars = rng.random((n, n)) < 0.025
        tex = stars * rng.uniform(80, 200, (n, n)) + 8 * xx
    else:  # snow: soft gradient and flakes
        tex = 20 * (yy - 0.5) + 40 * (rng.random((n, n)) < 0.03)
    out = np.clip(base[None, None, :] + tex[:, :, None], 0, 255).astype(np.float32)
    out.setflags(write=False)
    return out


def _flat(mask: np.ndarray, image_size: int) -> np.ndarray:
    yy, xx = np.nonzero(mask)
    idx = (yy * image_size + xx).astype(np.intp)
    idx.setflags(write=False)
    return idx


@lru_cache(maxsize=16384)
def _pixels(shape: str, size: str, dy: int, dx: int, cell: int, image_size: int) -> np.ndarray:
    """Flat pixel indices (n,) intp of a shape mask, relative to its cell's top-left pixel.

    Integer-index assignment is about twice as fast as boolean-mask assignment here.
    """
    return _flat(shape_mask(shape, size, dy, dx, cell), image_size)


@lru_cache(maxsize=16384)
def _glyph_pixels(
    digit: int, size: str, dy: int, dx: int, cell: int, image_size: int
) -> np.ndarray:
    """Flat pixel indices (n,) intp of a card's digit, relative to its cell's top-left pixel."""
    return _flat(glyph_mask(digit, size, dy, dx, cell), image_size)


def _contrast(rgb: np.ndarray) -> np.ndarray:
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    v = 20.0 if lum > 140 else 250.0
    return np.array([v, v, v], dtype=np.float32)


@lru_cache(maxsize=8)
def _noise_bank(image_size: int) -> np.ndarray:
    """Standard normal fields, float32 (_N_NOISE, 2 * image_size, 2 * image_size, 3).

    Drawing 12K normals per sample costs more than the rest of rendering; a random
    crop of a fixed bank gives _N_NOISE * image_size**2 distinct fields at the cost
    of an add.
    """
    n = 2 * image_size
    bank = np.random.default_rng(0x5EED).standard_normal((_N_NOISE, n, n, 3), dtype=np.float32)
    bank.setflags(write=False)
    return bank


def render_scene(
    objects: list[SceneObject],
    domain: str,
    rng: np.random.Generator,
    *,
    image_size: int = 64,
    grid: int = 4,
    jitter: int = 2,
    noise_std: float = 6.0,
    domain_shift: float = 0.6,
) -> np.ndarray:
    """Draw `objects` on a `domain` background.

    Returns uint8 (image_size, image_size, 3) RGB. Uses `rng` for the background
    variant, brightness, per-object jitter and the noise crop, in that order.
    """
    cell = image_size // grid
    img = background(domain, image_size, randint(rng, _N_BACKGROUNDS)) * np.float32(
        rng.uniform(0.92, 1.08)
    )
    flat = img.reshape(-1, 3)  # a view: writes land in img
    palette = domain_palette(domain, float(domain_shift))
    offsets = rng.random((len(objects), 2))  # (n_objects, 2) in [0, 1): one draw per scene
    for ob, (uy, ux) in zip(objects, offsets, strict=True):
        j = max_offset(ob.size, cell, jitter)
        dy, dx = int(uy * (2 * j + 1)) - j, int(ux * (2 * j + 1)) - j
        corner = ob.row * cell * image_size + ob.col * cell
        colour = palette[_COLOUR_INDEX[ob.colour]]
        flat[_pixels(ob.shape, ob.size, dy, dx, cell, image_size) + corner] = colour
        if ob.shape == "card":
            glyph = _glyph_pixels(int(ob.digit or 0), ob.size, dy, dx, cell, image_size)
            flat[glyph + corner] = _contrast(colour)
    if noise_std > 0:
        k, y, x = randint(rng, _N_NOISE), randint(rng, image_size), randint(rng, image_size)
        img += _noise_bank(image_size)[k, y : y + image_size, x : x + image_size] * np.float32(
            noise_std
        )
    return np.clip(img, 0, 255).astype(np.uint8)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(arr: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W, 3) RGB image.

    Written by hand because Pillow's adaptive row filtering costs about 4x the rest
    of a sample; the 'Sub' filter plus Huffman-only deflate is faster than Pillow at
    its fastest and smaller, since noisy pixels leave little for LZ77 to match.
    """
    a = np.ascontiguousarray(arr, dtype=np.uint8)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected a (H, W, 3) array, got shape {a.shape}")
    h, w, _ = a.shape
    rows = a.reshape(h, w * 3)
    raw = np.empty((h, w * 3 + 1), dtype=np.uint8)
    raw[:, 0] = 1  # filter type Sub: each byte minus the same channel one pixel left
    raw[:, 1:4] = rows[:, :3]
    np.subtract(rows[:, 3:], rows[:, :-3], out=raw[:, 4:])  # uint8 wraps mod 256, as PNG wants
    z = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    idat = z.compress(raw.tobytes()) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return _PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def decode_png(data: bytes) -> np.ndarray:
    """uint8 (H, W, 3) RGB array of PNG bytes."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))
