"""Procedural scenes: grid-aligned shapes, a framed digit, textured noisy background with clutter.

Geometry follows LLaVA-1.5: a 336x336 image is a 24x24 grid of 14-px cells, one cell per CLIP patch.
Every object and the digit box occupy exactly one cell, so each one is visible in exactly one visual
token; clutter lives only in free cells. Everything is a pure function of an integer seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
CELL = 14
GRID = IMAGE_SIZE // CELL  # 24
DATA_VERSION = "shapes-v2"  # v2: spatial questions only about objects on opposite halves

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 220),
    "yellow": (235, 215, 35),
    "purple": (145, 50, 190),
    "orange": (245, 130, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: tuple[str, ...] = ("small", "large")
MAX_COUNT = 4
MIN_OBJECTS, MAX_OBJECTS = 3, 7

# Seven-segment layout: segments a..g as (x0, y0, x1, y1) in a 6x10 box.
_SEGMENTS = {
    "a": (0, 0, 5, 1), "b": (4, 0, 5, 5), "c": (4, 5, 5, 9), "d": (0, 8, 5, 9),
    "e": (0, 5, 1, 9), "f": (0, 0, 1, 5), "g": (0, 4, 5, 5),
}
_DIGIT_SEGMENTS = {
    0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc",
    5: "afgcd", 6: "afgedc", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}


@dataclass(frozen=True)
class SceneObject:
    """One shape in one grid cell (row, col are cell indices, 0..23)."""

    shape: str
    colour: str
    size: str
    row: int
    col: int


@dataclass(frozen=True)
class Scene:
    """Scene graph: the only ground truth that answers are derived from."""

    seed: int
    objects: tuple[SceneObject, ...]
    digit: int
    digit_row: int
    digit_col: int
    count_key: tuple[str, str] = field(default=("shape", "circle"))  # planted (attribute, value) for counts

    def to_dict(self) -> dict:
        d = asdict(self)
        d["objects"] = [asdict(o) for o in self.objects]
        return d


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """Independent generator for scene `index` of a data set with base `seed`."""
    return np.random.default_rng([int(seed), int(index), 7919])


def sample_scene(rng: np.random.Generator, seed: int = 0) -> Scene:
    """Sample a scene graph.

    A count group is planted: an attribute value (a shape or a colour) that exactly k objects carry,
    k uniform in 0..4, so count answers are balanced. All (colour, shape) pairs are distinct, objects
    are never 8-neighbours of each other or of the digit box.
    """
    colours, shapes = list(COLOURS), list(SHAPES)
    key_attr = "shape" if rng.random() < 0.5 else "colour"
    key_val = str(rng.choice(shapes if key_attr == "shape" else colours))
    k = int(rng.integers(0, MAX_COUNT + 1))
    n = int(rng.integers(max(MIN_OBJECTS, k), MAX_OBJECTS + 1))
    pairs: list[tuple[str, str]] = []  # (colour, shape)
    others = colours if key_attr == "shape" else shapes
    for o in rng.permutation(others)[:k]:
        pairs.append((str(o), key_val) if key_attr == "shape" else (key_val, str(o)))
    pool = [(c, s) for c in colours for s in shapes
            if (s if key_attr == "shape" else c) != key_val]
    for i in rng.permutation(len(pool))[: n - k]:
        pairs.append(pool[int(i)])
    cells = _free_cells(rng, len(pairs) + 1)
    objects = tuple(
        SceneObject(shape=s, colour=c, size=str(rng.choice(SIZES)), row=r, col=q)
        for (c, s), (r, q) in zip(pairs, cells[1:], strict=True)
    )
    return Scene(seed=seed, objects=objects, digit=int(rng.integers(0, 10)),
                 digit_row=cells[0][0], digit_col=cells[0][1], count_key=(key_attr, key_val))


def _free_cells(rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    """n distinct cells, pairwise not 8-adjacent."""
    taken: list[tuple[int, int]] = []
    while len(taken) < n:
        r, c = (int(v) for v in rng.integers(0, GRID, size=2))
        if all(max(abs(r - a), abs(c - b)) > 1 for a, b in taken):
            taken.append((r, c))
    return taken


def _background(rng: np.random.Generator) -> np.ndarray:
    """Muted textured background, float32 [H, W, 3] in 0..255."""
    h = w = IMAGE_SIZE
    base = rng.uniform(80, 175) + rng.uniform(-18, 18, size=3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / np.float32(h)
    grad = (rng.uniform(-30, 30) * xx + rng.uniform(-30, 30) * yy)[..., None]
    kind = int(rng.integers(0, 3))
    if kind == 0:  # stripes
        ang, freq = rng.uniform(0, np.pi), rng.uniform(8, 30)
        tex = np.sin(2 * np.pi * freq * (np.cos(ang) * xx + np.sin(ang) * yy))
    elif kind == 1:  # checker, not aligned to the patch grid
        p = int(rng.integers(5, 23))
        off = int(rng.integers(0, p))
        iy, ix = np.mgrid[0:h, 0:w]
        tex = (((iy + off) // p + (ix + off) // p) % 2) * 2.0 - 1.0
    else:  # blotches: upsampled coarse noise
        coarse = rng.standard_normal(size=(8, 8), dtype=np.float32)
        tex = np.kron(coarse, np.ones((h // 8, w // 8), np.float32))
    amp = rng.uniform(6, 18)
    tint = rng.uniform(0.6, 1.0, size=3)
    img = base + grad + amp * tex[..., None] * tint
    return img.astype(np.float32)


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, rgb: tuple[int, int, int],
                rng: np.random.Generator) -> None:
    ext = 11 if obj.size == "large" else 7
    free = CELL - ext
    x0 = obj.col * CELL + int(rng.integers(1, free)) if free > 1 else obj.col * CELL
    y0 = obj.row * CELL + int(rng.integers(1, free)) if free > 1 else obj.row * CELL
    x1, y1 = x0 + ext, y0 + ext
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=rgb)
    elif obj.shape == "square":
        draw.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), fill=rgb)
    elif obj.shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=rgb)
    elif obj.shape == "cross":
        t = 1 if obj.size == "small" else 2
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((cx - t, y0, cx + t, y1), fill=rgb)
        draw.rectangle((x0, cy - t, x1, cy + t), fill=rgb)
    else:
        raise ValueError(obj.shape)


def _draw_digit(draw: ImageDraw.ImageDraw, scene: Scene, rng: np.random.Generator) -> None:
    x0, y0 = scene.digit_col * CELL, scene.digit_row * CELL
    paper = int(rng.integers(215, 250))
    draw.rectangle((x0, y0, x0 + CELL - 1, y0 + CELL - 1), fill=(paper,) * 3, outline=(20, 20, 20))
    ink = tuple(int(v) for v in rng.integers(0, 50, size=3))
    ox, oy = x0 + 4, y0 + 2
    for seg in _DIGIT_SEGMENTS[scene.digit]:
        a, b, c, d = _SEGMENTS[seg]
        draw.rectangle((ox + a, oy + b, ox + c, oy + d), fill=ink)


def _draw_clutter(draw: ImageDraw.ImageDraw, scene: Scene, rng: np.random.Generator) -> None:
    """Thin desaturated strokes and dots, only inside free cells."""
    used = {(o.row, o.col) for o in scene.objects} | {(scene.digit_row, scene.digit_col)}
    for _ in range(int(rng.integers(25, 70))):
        r, c = (int(v) for v in rng.integers(0, GRID, size=2))
        if (r, c) in used:
            continue
        g = int(rng.integers(30, 230))
        col = tuple(int(np.clip(g + d, 0, 255)) for d in rng.integers(-12, 13, size=3))
        x0, y0 = c * CELL, r * CELL
        pts = rng.integers(0, CELL, size=4)
        if rng.random() < 0.6:
            draw.line((x0 + pts[0], y0 + pts[1], x0 + pts[2], y0 + pts[3]), fill=col, width=1)
        else:
            draw.point([(x0 + int(p), y0 + int(q)) for p, q in rng.integers(0, CELL, size=(3, 2))], fill=col)


def render(scene: Scene) -> Image.Image:
    """Draw a scene into a 336x336 RGB image (deterministic given the scene's seed)."""
    rng = np.random.default_rng([scene.seed, 104729])
    img = Image.fromarray(np.clip(_background(rng), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    _draw_clutter(draw, scene, rng)
    for obj in scene.objects:
        rgb = tuple(int(np.clip(v + d, 0, 255)) for v, d in zip(COLOURS[obj.colour], rng.integers(-18, 19, 3),
                                                                 strict=True))
        _draw_shape(draw, obj, rgb, rng)
    _draw_digit(draw, scene, rng)
    arr = np.asarray(img).astype(np.float32)
    arr += rng.standard_normal(size=arr.shape, dtype=np.float32) * np.float32(rng.uniform(4, 10))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def patch_labels(scene: Scene) -> dict[str, np.ndarray]:
    """Dense per-cell targets [24, 24] (int64): colour/shape index+1 (0 = none), digit+1 (0 = none)."""
    colour = np.zeros((GRID, GRID), np.int64)
    shape = np.zeros((GRID, GRID), np.int64)
    digit = np.zeros((GRID, GRID), np.int64)
    cnames = list(COLOURS)
    for o in scene.objects:
        colour[o.row, o.col] = cnames.index(o.colour) + 1
        shape[o.row, o.col] = SHAPES.index(o.shape) + 1
    digit[scene.digit_row, scene.digit_col] = scene.digit + 1
    return {"colour": colour, "shape": shape, "digit": digit}


def make_scene(seed: int, index: int) -> Scene:
    """Scene `index` of the data set with base `seed`."""
    return sample_scene(scene_rng(seed, index), seed=int(seed) * 1_000_003 + int(index))
