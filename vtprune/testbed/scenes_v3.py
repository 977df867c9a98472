"""Built-in benchmark v3 scenes (data version `shapes-v3`): natural-image statistics, procedurally.

LLaVA-1.5 geometry is kept (336x336 px, 14-px patches, 24x24 = 576 visual tokens), but unlike v2 nothing is
aligned to the patch grid:

- 3-14 objects (4 shapes x 6 colours) of side 8-56 px (0.6 to 4 patches), at continuous positions, never
  overlapping; a planted count group (a colour or shape carried by exactly k objects, k uniform in 0..9);
- 2-8 distractors: grey/brown rings, bars and diamonds (never asked about, never counted);
- one framed two-digit number 10-99 (seven-segment digits 14-30 px tall) whose box touches ~11 patches;
- a cluttered background: gradient, one texture (stripes, off-grid checker, blotches), 2-5 large regions
  of another brightness (little chroma: none may look like a coloured object), 15-40 thin strokes, pixel
  noise. Neighbouring background patches are redundant
  but not blank, large objects cover several redundant patches, small ones sit inside a single patch.

A scene is a pure function of (split code, seed, index) (`make_scene`); `render` draws it with PIL primitives
(and the same primitives into an id map, from which `patch_labels` counts per-patch coverage with one
`bincount`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from .scenes import CELL, COLOURS, GRID, IMAGE_SIZE, SHAPES

DATA_VERSION = "shapes-v3"
MAX_COUNT = 9
MIN_OBJECTS, MAX_OBJECTS = 3, 14
MIN_SIZE, MAX_SIZE = 8.0, 56.0  # object side in pixels: 0.57 .. 4 patches
NUMBER_RANGE = (10, 99)
DISTRACTOR_KINDS: tuple[str, ...] = ("ring", "bar", "diamond")
# id map values: 0 background, 1..K objects (index + 1), DISTRACTOR_ID, BOX_ID (paper), DIGIT_ID + position
DISTRACTOR_ID, BOX_ID, DIGIT_ID = 200, 210, 220

# Seven-segment layout on a unit box (x0, y0, x1, y1) as fractions of (width, height).
_SEG = {
    "a": (0.0, 0.0, 1.0, 0.14), "b": (0.78, 0.0, 1.0, 0.55), "c": (0.78, 0.45, 1.0, 1.0),
    "d": (0.0, 0.86, 1.0, 1.0), "e": (0.0, 0.45, 0.22, 1.0), "f": (0.0, 0.0, 0.22, 0.55),
    "g": (0.0, 0.43, 1.0, 0.57),
}
_DIGIT_SEGMENTS = {0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc",
                   5: "afgcd", 6: "afgedc", 7: "abc", 8: "abcdefg", 9: "abcdfg"}


@dataclass(frozen=True)
class Object3:
    """One shape: centre (cx, cy) and side `size` in pixels (continuous, not grid-aligned)."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: float
    angle: float = 0.0  # degrees (squares and triangles are drawn rotated)


@dataclass(frozen=True)
class Distractor:
    """A grey or brown ring / bar / diamond: clutter that looks like an object but is never asked about."""

    kind: str
    cx: float
    cy: float
    size: float
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene3:
    """Scene graph of a v3 scene: the only ground truth answers are derived from."""

    key: tuple[int, int, int]  # (split code, seed, index)
    objects: tuple[Object3, ...]
    distractors: tuple[Distractor, ...]
    number: int
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 of the framed number
    digit_height: float
    count_key: tuple[str, str] = field(default=("shape", "circle"))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["objects"] = [asdict(o) for o in self.objects]
        d["distractors"] = [asdict(o) for o in self.distractors]
        return d


def scene_rng(split_code: int, seed: int, index: int) -> np.random.Generator:
    """Independent generator for scene `index` of stream (split_code, seed)."""
    return np.random.default_rng([int(split_code), int(seed), int(index), 104_723])


def _place(rng: np.random.Generator, radii: np.ndarray, taken: list[tuple[float, float, float]],
           tries: int = 64) -> list[tuple[float, float] | None]:
    """Centres for circles of `radii` (pixels) inside the image, not overlapping `taken` (cx, cy, r) or each
    other (2-px gap); a radius that finds no room in `tries` random candidates gets None."""
    out: list[tuple[float, float] | None] = []
    for r in radii:
        cand = rng.uniform(r + 1, IMAGE_SIZE - r - 1, size=(tries, 2))  # [T, 2]
        if taken:
            t = np.asarray(taken)  # [K, 3]
            d = np.linalg.norm(cand[:, None, :] - t[None, :, :2], axis=-1)  # [T, K]
            ok = (d > t[None, :, 2] + r + 2).all(1)
        else:
            ok = np.ones(tries, bool)
        hit = np.flatnonzero(ok)
        if len(hit) == 0:
            out.append(None)
            continue
        cx, cy = cand[hit[0]]
        taken.append((float(cx), float(cy), float(r)))
        out.append((float(cx), float(cy)))
    return out


def sample_scene(rng: np.random.Generator, key: tuple[int, int, int]) -> Scene3:
    """Sample a scene graph (see the module docstring)."""
    colours, shapes = list(COLOURS), list(SHAPES)
    key_attr = "shape" if rng.random() < 0.5 else "colour"
    key_val = str(rng.choice(shapes if key_attr == "shape" else colours))
    k = int(rng.integers(0, MAX_COUNT + 1))
    n = int(rng.integers(max(MIN_OBJECTS, k + 1), min(MAX_OBJECTS, k + 5) + 1))
    pairs: list[tuple[str, str]] = []  # (colour, shape)
    others = colours if key_attr == "shape" else shapes
    for o in rng.choice(others, size=k, replace=True):
        pairs.append((str(o), key_val) if key_attr == "shape" else (key_val, str(o)))
    pool = [(c, s) for c in colours for s in shapes if (s if key_attr == "shape" else c) != key_val]
    for i in rng.choice(len(pool), size=n - k, replace=n - k > len(pool)):
        pairs.append(pool[int(i)])
    pairs = [pairs[int(i)] for i in rng.permutation(len(pairs))]
    # number box first (it must fit), then objects largest first, then distractors
    h = float(rng.uniform(14, 30))
    w_digit, gap, pad = 0.55 * h, 0.2 * h, 3.0
    bw, bh = 2 * w_digit + gap + 2 * pad, h + 2 * pad
    taken: list[tuple[float, float, float]] = []
    (bx, by), = _place(rng, np.asarray([0.5 * np.hypot(bw, bh)]), taken)
    box = (bx - bw / 2, by - bh / 2, bx + bw / 2, by + bh / 2)
    # sizes: log-uniform, the upper end shrinking with the number of objects so that all fit
    hi = MAX_SIZE if n <= 8 else MAX_SIZE * 8 / n
    sizes = np.exp(rng.uniform(np.log(MIN_SIZE), np.log(hi), size=n))
    order = np.argsort(-sizes)
    spots = _place(rng, sizes[order] * 0.72, taken)  # circumradius of a square of side s ~ 0.71 s
    objects = []
    for j, spot in zip(order, spots, strict=True):
        if spot is None:  # no room: drop it (the count answer is derived from what is drawn)
            continue
        c, s = pairs[int(j)]
        angle = float(rng.uniform(-25, 25)) if s in ("square", "triangle") else 0.0
        objects.append(Object3(shape=s, colour=c, cx=spot[0], cy=spot[1], size=float(sizes[j]), angle=angle))
    objects.sort(key=lambda o: (o.cy, o.cx))
    nd = int(rng.integers(2, 9))
    dsizes = np.exp(rng.uniform(np.log(8), np.log(40), size=nd))
    dspots = _place(rng, dsizes * 0.72, taken)
    distractors = []
    for s, spot in zip(dsizes, dspots, strict=True):
        if spot is None:
            continue
        g = int(rng.integers(60, 200))
        brown = rng.random() < 0.4
        rgb = (g, int(g * 0.8), int(g * 0.6)) if brown else (g, g, g)
        distractors.append(Distractor(kind=str(rng.choice(DISTRACTOR_KINDS)), cx=spot[0], cy=spot[1],
                                      size=float(s), rgb=rgb))
    number = int(rng.integers(NUMBER_RANGE[0], NUMBER_RANGE[1] + 1))
    return Scene3(key=key, objects=tuple(objects), distractors=tuple(distractors), number=number, box=box,
                  digit_height=h, count_key=(key_attr, key_val))


def make_scene(split_code: int, seed: int, index: int) -> Scene3:
    """Scene `index` of the stream (split_code, seed); see `vtprune.testbed.splits` for the codes."""
    return sample_scene(scene_rng(split_code, seed, index), key=(int(split_code), int(seed), int(index)))


def _background(rng: np.random.Generator) -> np.ndarray:
    """Cluttered textured background, float32 [H, W, 3] in 0..255 (vectorised numpy)."""
    h = w = IMAGE_SIZE
    base = rng.uniform(70, 180) + rng.uniform(-15, 15, size=3)
    yy, xx = np.ogrid[0:h, 0:w]
    yy, xx = yy.astype(np.float32) / np.float32(h), xx.astype(np.float32) / np.float32(w)
    img = np.broadcast_to(base.astype(np.float32), (h, w, 3)).copy()
    img += ((rng.uniform(-35, 35) * xx + rng.uniform(-35, 35) * yy)[..., None]).astype(np.float32)
    kind = int(rng.integers(0, 3))
    if kind == 0:  # stripes at any angle and frequency
        ang, freq = rng.uniform(0, np.pi), rng.uniform(5, 30)
        tex = np.sin(2 * np.pi * freq * (np.cos(ang) * xx + np.sin(ang) * yy))
    elif kind == 1:  # checker with a period that is not the patch size, any offset
        p = int(rng.integers(5, 40))
        off = rng.integers(0, p, size=2)
        iy, ix = np.ogrid[0:h, 0:w]
        tex = (((iy + off[0]) // p + (ix + off[1]) // p) % 2) * np.float32(2.0) - np.float32(1.0)
    else:  # blotches: bilinear upsampled coarse noise
        g = int(rng.integers(4, 12))
        coarse = rng.standard_normal(size=(g + 1, g + 1)).astype(np.float32)
        u, v = xx * g, yy * g
        i, j = np.minimum(u.astype(int), g - 1), np.minimum(v.astype(int), g - 1)
        fu, fv = u - i, v - j
        tex = ((1 - fu) * (1 - fv) * coarse[j, i] + fu * (1 - fv) * coarse[j, i + 1]
               + (1 - fu) * fv * coarse[j + 1, i] + fu * fv * coarse[j + 1, i + 1])
    img += (rng.uniform(5, 18) * tex)[..., None] * rng.uniform(0.6, 1.0, size=3).astype(np.float32)
    # large regions (a table, a wall, a shadow): 2-5 ellipses / rectangles of another brightness
    for _ in range(int(rng.integers(2, 6))):
        cx, cy = rng.uniform(0, h, size=2)
        rx, ry = rng.uniform(0.1 * h, 0.45 * h, size=2)
        x0, x1, y0, y1 = (int(np.clip(v, 0, h)) for v in (cx - rx, cx + rx + 1, cy - ry, cy + ry + 1))
        # mostly a brightness change, little chroma: a region must not look like a big coloured object
        delta = (rng.uniform(-28, 28) + rng.uniform(-6, 6, size=3)).astype(np.float32)
        if rng.random() < 0.5:  # ellipse, computed on its bounding box only
            ey, ex = np.ogrid[y0:y1, x0:x1]
            m = ((ex - cx) / rx) ** 2 + ((ey - cy) / ry) ** 2 <= 1
            img[y0:y1, x0:x1] += m[..., None].astype(np.float32) * delta
        else:
            img[y0:y1, x0:x1] += delta
    return img


def _shape_points(o: Object3) -> list[tuple[float, float]] | None:
    """Polygon of a rotated square / triangle (None for circles and crosses)."""
    r = o.size / 2
    if o.shape == "square":
        pts = np.asarray([(-r, -r), (r, -r), (r, r), (-r, r)]) * 0.85
    elif o.shape == "triangle":
        pts = np.asarray([(-r, r * 0.85), (r, r * 0.85), (0.0, -r)])
    else:
        return None
    a = np.deg2rad(o.angle)
    rot = np.asarray([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    pts = pts @ rot.T + (o.cx, o.cy)
    return [tuple(p) for p in pts.tolist()]


def _draw_object(draws: list[ImageDraw.ImageDraw], fills: list, o: Object3) -> None:
    r = o.size / 2
    box = (o.cx - r, o.cy - r, o.cx + r, o.cy + r)
    for d, f in zip(draws, fills, strict=True):
        if o.shape == "circle":
            d.ellipse(box, fill=f)
        elif o.shape == "cross":
            t = max(1.0, o.size * 0.16)
            d.rectangle((o.cx - t, o.cy - r, o.cx + t, o.cy + r), fill=f)
            d.rectangle((o.cx - r, o.cy - t, o.cx + r, o.cy + t), fill=f)
        else:
            d.polygon(_shape_points(o), fill=f)


def _draw_distractor(draws: list[ImageDraw.ImageDraw], fills: list, o: Distractor) -> None:
    r = o.size / 2
    for d, f in zip(draws, fills, strict=True):
        if o.kind == "ring":
            d.ellipse((o.cx - r, o.cy - r, o.cx + r, o.cy + r), outline=f, width=max(1, int(o.size * 0.15)))
        elif o.kind == "bar":
            d.rectangle((o.cx - r, o.cy - r * 0.2, o.cx + r, o.cy + r * 0.2), fill=f)
        else:
            d.polygon([(o.cx, o.cy - r), (o.cx + r * 0.7, o.cy), (o.cx, o.cy + r), (o.cx - r * 0.7, o.cy)], fill=f)


def _digit_cell(scene: Scene3, pos: int) -> tuple[float, float, float, float]:
    """(x, y, width, height) of the cell that digit `pos` (0: tens, 1: units) of the framed number is drawn in."""
    x0, y0 = scene.box[:2]
    h = scene.digit_height
    w = 0.55 * h
    return x0 + 3 + pos * (w + 0.2 * h), y0 + 3, w, h


def digit_centres(scene: Scene3) -> tuple[tuple[float, float], tuple[float, float]]:
    """Pixel centres (x, y) of the framed number's tens and units digit cells."""
    (tx, ty, w, h), (ux, uy, _, _) = (_digit_cell(scene, pos) for pos in (0, 1))
    return (tx + w / 2, ty + h / 2), (ux + w / 2, uy + h / 2)


def _number_rects(scene: Scene3) -> list[tuple[int, tuple[float, float, float, float]]]:
    """(digit position, segment rectangle) of the framed number's seven-segment digits."""
    out = []
    for pos, ch in enumerate(str(scene.number)):
        ox, oy, w, h = _digit_cell(scene, pos)
        for seg in _DIGIT_SEGMENTS[int(ch)]:
            a, b, c, d = _SEG[seg]
            out.append((pos, (ox + a * w, oy + b * h, ox + c * w, oy + d * h)))
    return out


def _draw_ids(draw: ImageDraw.ImageDraw, scene: Scene3) -> None:
    """The id map's drawing (the same primitives, in the same order, as the image's)."""
    for o in scene.distractors:
        _draw_distractor([draw], [DISTRACTOR_ID], o)
    for i, o in enumerate(scene.objects):
        _draw_object([draw], [i + 1], o)
    draw.rectangle(scene.box, fill=BOX_ID)
    for pos, rect in _number_rects(scene):
        draw.rectangle(rect, fill=DIGIT_ID + pos)


def _render(scene: Scene3, image: bool = True) -> tuple[Image.Image | None, np.ndarray]:
    ids = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    _draw_ids(ImageDraw.Draw(ids), scene)
    if not image:
        return None, np.asarray(ids)
    rng = np.random.default_rng([*scene.key, 7_368_787])
    img = Image.fromarray(np.clip(_background(rng), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(15, 41))):  # thin strokes across the background
        p = rng.uniform(0, IMAGE_SIZE, size=2)
        q = p + rng.normal(0, 40, size=2)
        g = int(rng.integers(30, 230))
        col = tuple(int(np.clip(g + v, 0, 255)) for v in rng.integers(-15, 16, size=3))
        draw.line((*p, *q), fill=col, width=int(rng.integers(1, 3)))
    for o in scene.distractors:
        _draw_distractor([draw], [o.rgb], o)
    for o in scene.objects:
        rgb = tuple(int(np.clip(v + d, 0, 255)) for v, d in zip(COLOURS[o.colour], rng.integers(-20, 21, 3),
                                                                 strict=True))
        _draw_object([draw], [rgb], o)
    paper = int(rng.integers(200, 250))
    draw.rectangle(scene.box, fill=(paper,) * 3, outline=(20, 20, 20))
    ink = tuple(int(v) for v in rng.integers(0, 60, size=3))
    for _, rect in _number_rects(scene):
        draw.rectangle(rect, fill=ink)
    arr = np.asarray(img).astype(np.float32)
    arr += rng.standard_normal(size=arr.shape, dtype=np.float32) * np.float32(rng.uniform(3, 9))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), np.asarray(ids)


def render(scene: Scene3) -> Image.Image:
    """Draw a scene into a 336x336 RGB image (deterministic given the scene's key)."""
    return _render(scene)[0]


def id_map(scene: Scene3) -> np.ndarray:
    """[336, 336] uint8: which element each pixel shows (0 background, i+1 object i, DISTRACTOR_ID, BOX_ID,
    DIGIT_ID + digit position), drawn with the same primitives as `render` (without rendering the image)."""
    return _render(scene, image=False)[1]


def patch_coverage(ids: np.ndarray) -> np.ndarray:
    """Pixels of each id value in each patch: [336, 336] uint8 -> [576, 256] int64 (raster patch order)."""
    r = np.arange(IMAGE_SIZE) // CELL
    patch = (r[:, None] * GRID + r[None, :]).reshape(-1)
    return np.bincount(patch * 256 + ids.reshape(-1).astype(np.int64), minlength=GRID * GRID * 256).reshape(-1, 256)


def _object_pixels(cov: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of each of the n objects in each patch [576, n] (float64) and each object's share of its own
    pixels there [576, n] (columns sum to 1; 0 for an object with no visible pixel), from `patch_coverage`."""
    obj = cov[:, 1:n + 1].astype(np.float64)
    return obj, obj / np.maximum(obj.sum(0, keepdims=True), 1)


def patch_labels(scene: Scene3, ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Dense per-patch targets [24, 24] (int64), the same classes as v2: colour / shape index + 1 and digit + 1
    (0 = none), and place: the digit with its place in the number (1 + digit for the tens, 11 + digit for the units;
    0 = none). A patch is labelled with the object covering most of it when that object covers >= 20 % of
    the patch or has >= 40 % of its own pixels in it (so an object smaller than a patch labels its patch);
    with the digit whose ink covers most of it when that is >= 6 pixels."""
    ids = id_map(scene) if ids is None else ids
    cov = patch_coverage(ids)  # [576, 256]
    n = len(scene.objects)
    colour = np.zeros(GRID * GRID, np.int64)
    shape = np.zeros(GRID * GRID, np.int64)
    if n:
        obj, own = _object_pixels(cov, n)  # [576, n] each
        ok = (obj >= 0.2 * CELL * CELL) | (own >= 0.4)
        best = np.where(ok, obj, -1).argmax(1)  # [576]
        has = ok.any(1)
        cidx = np.asarray([list(COLOURS).index(o.colour) + 1 for o in scene.objects])
        sidx = np.asarray([SHAPES.index(o.shape) + 1 for o in scene.objects])
        colour[has], shape[has] = cidx[best[has]], sidx[best[has]]
    ink = cov[:, DIGIT_ID:DIGIT_ID + 2]  # [576, 2]
    digits = np.asarray([int(c) for c in str(scene.number)])
    digit = np.where(ink.max(1) >= 6, digits[ink.argmax(1)] + 1, 0)
    place = np.where(digit > 0, 10 * ink.argmax(1) + digit, 0)  # 1..10: a tens digit 0..9, 11..20: a units digit
    return {k: v.reshape(GRID, GRID) for k, v in (("colour", colour), ("shape", shape), ("digit", digit),
                                                  ("place", place))}


def object_share(scene: Scene3, ids: np.ndarray | None = None) -> np.ndarray:
    """[576, C + S] float32: each object's share of its own pixels in each patch, in the column of its colour
    (first C = len(COLOURS)) and of its shape (last S = len(SHAPES)). Summed over the patches, a column is the
    number of objects of that colour or shape (objects with no visible pixel count 0): the per-patch
    decomposition of every count question (`count_readout.py`)."""
    ids = id_map(scene) if ids is None else ids
    cov = patch_coverage(ids)  # [576, 256]
    out = np.zeros((GRID * GRID, len(COLOURS) + len(SHAPES)), np.float32)
    n = len(scene.objects)
    if n:
        share = _object_pixels(cov, n)[1]  # [576, n]
        colour = np.asarray([list(COLOURS).index(o.colour) for o in scene.objects])
        shape = len(COLOURS) + np.asarray([SHAPES.index(o.shape) for o in scene.objects])
        np.add.at(out.T, colour, share.T.astype(np.float32))
        np.add.at(out.T, shape, share.T.astype(np.float32))
    return out


def object_centres(scene: Scene3, spread: float = 0.0) -> np.ndarray:
    """[576, C + S] float32: one unit per object at the patch that holds its centre, in the column of its colour (first
    C) and of its shape (last S); summed over the patches, a column is the number of objects of that colour or shape.
    Unlike `object_share` the decomposition does not follow the object's area: one patch per object.

    spread > 0 (pixels): the unit is a square of that side centred on the object's centre, split over the patches it
    overlaps in proportion to the overlap (clipped to the image, still one unit per object): a centre within
    spread / 2 of a patch border is shared with the neighbour instead of going all to one side of it. Twentieth
    session: with one patch per object, the tower's centre marks had per-object errors of 0.32 units (standard
    deviation) where the centre lies within 1 px of a border against 0.09 where it lies 4 px or more inside its
    patch: which patch holds a centre on a border is a coin toss the target asks for exactly. Measured (u19 against
    u17, testbed docs): a 7-pixel spread moved that error to where the split happens instead of removing it (the
    tower places a centre only to about 1-2 px), and counting did not change."""
    if spread <= 0 or not scene.objects:
        return object_marks(scene, ("centre",))
    out = np.zeros((GRID * GRID, len(COLOURS) + len(SHAPES)), np.float32)
    colour, shape = _columns(scene)
    cx = np.asarray([o.cx for o in scene.objects])
    cy = np.asarray([o.cy for o in scene.objects])
    mass = (_interval_cover(cy, spread)[:, :, None] * _interval_cover(cx, spread)[:, None, :]).reshape(len(cx), -1)
    np.add.at(out.T, colour, mass.astype(np.float32))  # mass [n, 576]
    np.add.at(out.T, shape, mass.astype(np.float32))
    return out


#: the points an object's count unit can sit at (`mark_points`): its centre, or one of its extreme visible pixels
COUNT_MARKS = ("centre", "top", "bottom", "left", "right")


def mark_points(scene: Scene3, mark: str, ids: np.ndarray | None = None) -> np.ndarray:
    """[n, 2] float64: (x, y) in pixels of each object's `mark`: "centre" its centre; "top" its first visible pixel in
    raster order (topmost row, then leftmost), "bottom" its last (bottommost, then rightmost), "left" its first in
    column order (leftmost column, then topmost), "right" its last in column order (rightmost, then bottommost), from
    the id map (`id_map`; an object with no visible pixel keeps its centre)."""
    if mark not in COUNT_MARKS:
        raise ValueError(f"unknown count mark {mark!r} (accepted: {', '.join(COUNT_MARKS)})")
    n = len(scene.objects)
    out = np.asarray([(o.cx, o.cy) for o in scene.objects], np.float64).reshape(n, 2)
    if mark == "centre" or n == 0:
        return out
    ids = id_map(scene) if ids is None else ids
    order = {"top": ids, "bottom": ids[::-1, ::-1], "left": ids.T, "right": ids.T[::-1, ::-1]}[mark]
    values, first = np.unique(np.ascontiguousarray(order).reshape(-1), return_index=True)  # each id's first pixel
    seen = (values >= 1) & (values <= n)
    a, b = first[seen] // IMAGE_SIZE, first[seen] % IMAGE_SIZE  # row and column in `order`
    last = IMAGE_SIZE - 1
    x, y = {"top": (b, a), "bottom": (last - b, last - a), "left": (a, b), "right": (last - a, last - b)}[mark]
    out[values[seen].astype(np.int64) - 1] = np.stack([x, y], -1)
    return out


def object_marks(scene: Scene3, marks: tuple[str, ...] = ("centre",), ids: np.ndarray | None = None) -> np.ndarray:
    """[576, M (C + S)] float32: for each of the M `marks` in turn, `object_centres`' layout with each object's unit on
    the patch holding that mark's point (`mark_points`); ("centre",) is `object_centres(scene)`. Twenty-first session:
    one-patch marks err where their point lies near a patch border, and an object's marks rarely all do, so the
    count errors of different marks are nearly independent (correlations -0.12 to 0.36 between probes on one tower's
    features, `benchmarks/v3_mark_probe.py`) and their mean counts better than any one of them."""
    c = len(COLOURS) + len(SHAPES)
    out = np.zeros((GRID * GRID, len(marks) * c), np.float32)
    if not scene.objects:
        return out
    ids = id_map(scene) if ids is None and any(m != "centre" for m in marks) else ids
    colour, shape = _columns(scene)
    for m, mark in enumerate(marks):
        if mark == "centre":  # the centre patch exactly as `centre_patch` (and `object_centres`) gives it
            cells = np.asarray([centre_patch(o) for o in scene.objects])
        else:
            xy = mark_points(scene, mark, ids).astype(np.int64) // CELL  # [n, 2] patch column, row
            cells = np.minimum(xy[:, 1], GRID - 1) * GRID + np.minimum(xy[:, 0], GRID - 1)
        np.add.at(out, (cells, m * c + colour), 1.0)
        np.add.at(out, (cells, m * c + shape), 1.0)
    return out


def _columns(scene: Scene3) -> tuple[np.ndarray, np.ndarray]:
    """([n], [n]) int: each object's colour column and shape column in the [C + S] count layout."""
    colour = np.asarray([list(COLOURS).index(o.colour) for o in scene.objects], np.int64)
    return colour, len(COLOURS) + np.asarray([SHAPES.index(o.shape) for o in scene.objects], np.int64)


def _interval_cover(centre: np.ndarray, side: float) -> np.ndarray:
    """[n, GRID]: the share of the interval [c - side / 2, c + side / 2] (clipped to the image) in each patch column
    (or row), for the n centres `centre` [n]; each row sums to 1."""
    lo = np.clip(centre - side / 2, 0.0, IMAGE_SIZE)[:, None]  # [n, 1]
    hi = np.clip(centre + side / 2, 0.0, IMAGE_SIZE)[:, None]
    edges = np.arange(GRID + 1, dtype=np.float64) * CELL  # [GRID + 1]
    cover = np.clip(np.minimum(hi, edges[None, 1:]) - np.maximum(lo, edges[None, :-1]), 0.0, None)  # [n, GRID]
    return cover / cover.sum(1, keepdims=True)


def object_groups(scene: Scene3, ids: np.ndarray | None = None) -> np.ndarray:
    """[576, C + S] uint8: which object each patch belongs to (1 + its index in `scene.objects`; 0 = none), in the
    column of that object's colour (first C) and of its shape (last S), 0 in the other columns. A patch belongs to
    the object with the largest share of its own pixels there (so an object smaller than a patch owns its patch next
    to a large one; every object owns at least one patch in the train scenes measured). The per-object count target
    (`count_attention.py`, unit "object") adds up a head's attention over each counted object's patches: one unit per
    object wherever within it the head looks, so that no patch border decides whether an object counts."""
    ids = id_map(scene) if ids is None else ids
    out = np.zeros((GRID * GRID, len(COLOURS) + len(SHAPES)), np.uint8)
    n = len(scene.objects)
    if not n:
        return out
    obj, own = _object_pixels(patch_coverage(ids), n)  # [576, n] each
    owner = np.where(obj.sum(1) > 0, own.argmax(1) + 1, 0)  # [576]
    colour = np.asarray([0] + [list(COLOURS).index(o.colour) for o in scene.objects])
    shape = len(COLOURS) + np.asarray([0] + [SHAPES.index(o.shape) for o in scene.objects])
    patches = owner.nonzero()[0]
    out[patches, colour[owner[patches]]] = owner[patches]
    out[patches, shape[owner[patches]]] = owner[patches]
    return out


def centre_patch(o: Object3) -> int:
    """Index (row-major, of 576) of the patch that holds an object's centre."""
    return min(GRID - 1, int(o.cy // CELL)) * GRID + min(GRID - 1, int(o.cx // CELL))


def informative_patches(scene: Scene3, ids: np.ndarray | None = None) -> np.ndarray:
    """[576] bool: patches that show part of an object (any pixel) or of the number box."""
    ids = id_map(scene) if ids is None else ids
    cov = patch_coverage(ids)
    return (cov[:, 1:len(scene.objects) + 1].sum(1) > 0) | (cov[:, BOX_ID:DIGIT_ID + 2].sum(1) > 0)


def key_patches(scene: Scene3, digit: np.ndarray) -> np.ndarray:
    """[576] bool: the patch holding each object's centre and every patch with digit ink (`digit`: the [24, 24]
    digit labels of `patch_labels`). Stage B's short-sequence curriculum keeps these first, so that every object
    a question can name and every digit stays visible when only a few tokens are kept."""
    key = (np.asarray(digit) > 0).reshape(-1).copy()
    for o in scene.objects:
        key[centre_patch(o)] = True
    return key


def scene_statistics(scenes: list[Scene3]) -> dict[str, float]:
    """Means over scenes: objects, distractors, object side in patches, patches touched per object, share of
    informative patches, objects smaller than one patch, patches the number spans."""
    objs, dis, side, touched, small, inf, num = [], [], [], [], [], [], []
    for s in scenes:
        ids = id_map(s)
        cov = patch_coverage(ids)
        objs.append(len(s.objects))
        dis.append(len(s.distractors))
        side += [o.size / CELL for o in s.objects]
        touched += list((cov[:, 1:len(s.objects) + 1] > 0).sum(0))
        small += [o.size < CELL for o in s.objects]
        inf.append(informative_patches(s, ids).mean())
        num.append(int((cov[:, BOX_ID:DIGIT_ID + 2].sum(1) > 0).sum()))
    return {"objects": float(np.mean(objs)), "distractors": float(np.mean(dis)),
            "object_side_patches": float(np.mean(side)), "patches_per_object": float(np.mean(touched)),
            "share_objects_under_one_patch": float(np.mean(small)),
            "share_informative_patches": float(np.mean(inf)), "patches_per_number": float(np.mean(num))}
