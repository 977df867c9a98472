"""`vtprune show`: the kept visual tokens of one image drawn over it, one column per method, one panel per
pruning event (PIL only, no matplotlib).

Where each kept index lands (indices into the image's candidates, as `vtprune.last_run(model)` gives them):

- LLaVA-1.5: cell (row, col) of the side×side grid (24×24) over the square the model sees, i.e. the
  processor's resized and center-cropped image (recovered exactly from `pixel_values`);
- LLaVA-NeXT: crop 0 = the base view, side×side cells over the whole image (the model sees it squashed
  to one tile); crop 1 = the unpadded tile area, one grid in packed raster order (as the adapter's
  `image_layout`), mapped through the processor's resize-to-pinpoint, centred padding and the model's
  `unpad_image` back onto the image; the two are drawn side by side ("base" | "tiles");
- Qwen2.5-VL / Qwen3-VL: merged cells (patch × spatial merge) over the image resized to the processor's
  `image_grid_thw` size;
- LLaVA-OneVision: as NeXT (base view | unpadded AnyRes tile area, the same resize / centred padding /
  `unpad_image`), and when the model's `anyres_max_N` bilinear down-sizing shrank the tile grid, each token
  covers the rows/h × cols/w block of the unpadded grid it was interpolated from;
- Gemma 3: side×side pooled soft tokens over the whole image (the processor squashes it to the square tile);
  with pan-and-scan, each crop's side×side grid over the part of the image the processor cut it from (the
  crops follow the image in the prompt, each its own engine image; drawn on a second view "crops");
- InternVL: every dynamic tile's side×side grid (after the pixel shuffle) placed on the image at the tile's
  place in the processor's cols×rows canvas (the image squashed onto it), then the thumbnail's grid over the
  whole image: two views ("tiles" | "thumbnail"), several crops drawn on one view (`Layout.view_of`).

Kept cells show the image as is with a green outline around each kept area; pruned cells are faded
(`dim_colour`: half way to grey, so objects stay recognisable). Kept tokens that carry merged features get a
magenta dot at their centre; pooling methods (`pool`, `downsample`: every kept token is the average of a
window) draw each window as a magenta frame and do not fade the cells it covers. The title gives the
question and, when known, the expected answer; each method's answer is green when it matches, red when not.
`ShowResult.panels[i].cells` / `.covered` / `.boxes` expose what was drawn, in PNG pixel coordinates, so
tests (and users) can check the picture against the record.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

DIM = 0.5  # pruned cells: DIM · pixel + (1 − DIM) · FADE
FADE = 128
MERGED = (255, 0, 255)
KEPT_EDGE = (0, 190, 0)
RIGHT, WRONG, NEUTRAL = (0, 130, 0), (200, 0, 0), (60, 60, 60)
GAP, PAD, MIN_SIDE, MAX_SIDE = 6, 12, 320, 768

Cell = tuple[int, int, int]  # (crop, row, col)
Box = tuple[float, float, float, float]  # (x0, y0, x1, y1), x1/y1 exclusive


@dataclass
class Layout:
    """Where an image's candidate tokens lie: one background view per crop and a box per (crop, row, col)."""

    family: str
    grids: list[tuple[int, int]]  # (rows, cols) per crop, candidates in crop order, raster order within
    views: list[Image.Image]  # background image per crop
    view_names: list[str]
    box: Callable[[int, int, int], Box]  # (crop, row, col) -> box in that view's pixels
    view_of: list[int] | None = None  # crop -> the view it is drawn on (None: crop i on view i)

    def view(self, crop: int) -> int:
        """The view crop `crop` is drawn on."""
        return crop if self.view_of is None else self.view_of[crop]

    @property
    def n(self) -> int:
        return sum(h * w for h, w in self.grids)

    def cell(self, index: int) -> Cell:
        """Candidate index -> (crop, row, col)."""
        for crop, (h, w) in enumerate(self.grids):
            if index < h * w:
                return crop, index // w, index % w
            index -= h * w
        raise IndexError(f"index beyond the {self.n} candidates")

    def cells(self, indices: Sequence[int] | torch.Tensor) -> list[Cell]:
        return [self.cell(int(i)) for i in indices]

    def all_cells(self) -> list[Cell]:
        return [(c, r, q) for c, (h, w) in enumerate(self.grids) for r in range(h) for q in range(w)]


@dataclass
class Panel:
    """One pruning event of one method, as drawn. boxes: every candidate cell -> its (clipped) box in PNG
    pixels (x1/y1 exclusive); cells: the kept ones (keep_idx order); merged_cells: kept ones that are merges."""

    method: str
    budget: object
    event: int
    stage: str
    cells: list[Cell]
    merged_cells: list[Cell]
    boxes: dict[Cell, tuple[int, int, int, int]] = field(default_factory=dict)
    covered: set[Cell] = field(default_factory=set)  # pruned cells inside a kept pooling window (not faded)
    windows: list[tuple[Cell, Cell]] = field(default_factory=list)  # pooling windows: (top-left, bottom-right)

    def centre(self, cell: Cell) -> tuple[int, int]:
        x0, y0, x1, y1 = self.boxes[cell]
        return (x0 + x1 - 1) // 2, (y0 + y1 - 1) // 2


@dataclass
class ShowResult:
    path: Path | None
    image: Image.Image
    panels: list[Panel]
    results: list[dict]
    layout: Layout


# --- layouts --------------------------------------------------------------------------------------------
def _unnormalise(pixels: torch.Tensor, image_processor) -> Image.Image:
    """(3, H, W) processor output -> the RGB image the model sees."""
    x = pixels.detach().float().cpu()
    if getattr(image_processor, "do_normalize", True):
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(image_processor.image_std, dtype=torch.float32)[:, None, None]
        x = x * std + mean
    if getattr(image_processor, "do_rescale", True):
        x = x / float(getattr(image_processor, "rescale_factor", 1 / 255))
    arr = x.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def llava_layout(model, image_processor, inputs: dict) -> Layout:
    """LLaVA-1.5: side×side cells over the processed square (from `pixel_values[0]`)."""
    vc = model.config.vision_config
    side = int(vc.image_size) // int(vc.patch_size)
    view = _unnormalise(inputs["pixel_values"][0], image_processor)
    cw, ch = view.width / side, view.height / side
    return Layout(
        "llava",
        [(side, side)],
        [view],
        ["model input"],
        lambda crop, r, c: (c * cw, r * ch, (c + 1) * cw, (r + 1) * ch),
    )


def next_tile_geometry(model, image_size: Sequence[int]) -> dict:
    """LLaVA-NeXT tile area of one image of `image_size` (H, W): the unpadded grid (rows, cols), its offset in
    the full tile grid, and the processor's resize/paste of the image into the pinpoint canvas."""
    from transformers.image_processing_utils import select_best_resolution

    cfg = model.config
    tile = int(cfg.vision_config.image_size)
    side = tile // int(cfg.vision_config.patch_size)
    h_img, w_img = (int(v) for v in image_size)
    ph, pw = select_best_resolution((h_img, w_img), cfg.image_grid_pinpoints)
    # processor: resize keeping the aspect ratio (get_patch_output_size), paste centred
    scale_w, scale_h = pw / w_img, ph / h_img
    if scale_w < scale_h:
        new_w, new_h = pw, min(math.ceil(h_img * scale_w), ph)
    else:
        new_h, new_w = ph, min(math.ceil(w_img * scale_h), pw)
    paste_x, paste_y = (pw - new_w) // 2, (ph - new_h) // 2
    # model: feature grid of (ph/tile·side) × (pw/tile·side), then unpad_image
    fh, fw = ph // tile * side, pw // tile * side
    row_off = col_off = 0
    rows, cols = fh, fw
    if w_img / h_img > fw / fh:
        pad = (fh - int(round(h_img * (fw / w_img), 7))) // 2
        row_off, rows = pad, fh - 2 * pad
    else:
        pad = (fw - int(round(w_img * (fh / h_img), 7))) // 2
        col_off, cols = pad, fw - 2 * pad
    return {
        "side": side, "rows": rows, "cols": cols, "row_off": row_off, "col_off": col_off,
        "cell_px": tile / side, "paste": (paste_x, paste_y), "resized": (new_w, new_h), "image": (w_img, h_img),
    }  # fmt: skip


def llava_next_layout(model, image: Image.Image, inputs: dict) -> Layout:
    """LLaVA-NeXT: base view (side×side over the whole image) and the unpadded tile grid over the image."""
    size = [int(v) for v in inputs["image_sizes"][0]]
    geo = next_tile_geometry(model, size)
    view = image.convert("RGB")
    if (view.height, view.width) != tuple(size):
        view = view.resize((size[1], size[0]), Image.BICUBIC)
    s, (w_img, h_img) = geo["side"], geo["image"]
    (new_w, new_h), (px, py), p = geo["resized"], geo["paste"], geo["cell_px"]
    sx, sy = w_img / new_w, h_img / new_h

    def box(crop: int, r: int, c: int) -> Box:
        if crop == 0:
            return c * w_img / s, r * h_img / s, (c + 1) * w_img / s, (r + 1) * h_img / s
        x0 = ((c + geo["col_off"]) * p - px) * sx
        y0 = ((r + geo["row_off"]) * p - py) * sy
        x0c, y0c = min(max(x0, 0.0), w_img), min(max(y0, 0.0), h_img)
        return x0c, y0c, min(max(x0 + p * sx, 0.0), w_img), min(max(y0 + p * sy, 0.0), h_img)

    return Layout("llava_next", [(s, s), (geo["rows"], geo["cols"])], [view, view], ["base view", "tiles"], box)


def qwen_layout(model, image: Image.Image, inputs: dict) -> Layout:
    """Qwen2.5-VL: merged (patch·merge)-px cells over the image resized to `image_grid_thw`."""
    vc = model.config.vision_config
    _, gh, gw = (int(v) for v in inputs["image_grid_thw"][0])
    m, p = int(vc.spatial_merge_size), int(vc.patch_size)
    view = image.convert("RGB").resize((gw * p, gh * p), Image.BICUBIC)
    cell = p * m
    return Layout(
        "qwen2_5_vl",
        [(gh // m, gw // m)],
        [view],
        ["resized"],
        lambda crop, r, c: (c * cell, r * cell, (c + 1) * cell, (r + 1) * cell),
    )


def _original_view(image: Image.Image, size: Sequence[int] | None = None) -> Image.Image:
    """The image in RGB, resized to `size` (H, W) when given and different."""
    view = image.convert("RGB")
    if size is not None and (view.height, view.width) != tuple(size):
        view = view.resize((int(size[1]), int(size[0])), Image.BICUBIC)
    return view


def onevision_layout(model, image: Image.Image, inputs: dict) -> Layout:
    """LLaVA-OneVision: base view (side×side over the whole image) and the AnyRes tile area (NeXT geometry; a grid
    down-sized by `anyres_max_N` maps each token to the block of the unpadded grid it interpolates)."""
    from vtprune.models.llava_onevision import LlavaOnevisionAdapter

    size = [int(v) for v in inputs["image_sizes"][0]]
    counts = inputs.get("batch_num_images")
    patched = counts is None or int(counts[0]) == 1
    grids = list(LlavaOnevisionAdapter(model)._image_layout(size, patched).grids)
    geo = next_tile_geometry(model, size)
    view = _original_view(image, size)
    s, (w_img, h_img) = geo["side"], geo["image"]
    (new_w, new_h), (px, py), p = geo["resized"], geo["paste"], geo["cell_px"]
    sx, sy = w_img / new_w, h_img / new_h
    if len(grids) > 1:
        h, w = grids[1]
        fr, fc = geo["rows"] / h, geo["cols"] / w  # unpadded cells per token (1 unless down-sized)

    def box(crop: int, r: int, c: int) -> Box:
        if crop == 0:
            return c * w_img / s, r * h_img / s, (c + 1) * w_img / s, (r + 1) * h_img / s
        x0 = ((c * fc + geo["col_off"]) * p - px) * sx
        y0 = ((r * fr + geo["row_off"]) * p - py) * sy
        x1, y1 = x0 + fc * p * sx, y0 + fr * p * sy
        return (min(max(x0, 0.0), w_img), min(max(y0, 0.0), h_img), min(max(x1, 0.0), w_img),
                min(max(y1, 0.0), h_img))  # fmt: skip

    names = ["base view", "tiles"][: len(grids)]
    return Layout("llava_onevision", grids, [view] * len(grids), names, box)


def gemma3_crops(image_processor, image_size: Sequence[int]) -> list[Box]:
    """Gemma 3 pan-and-scan crops of an image of `image_size` (H, W), as the processor cuts them -> their boxes
    (x0, y0, x1, y1) on the image ([] when pan-and-scan is off or does not trigger)."""
    if not getattr(image_processor, "do_pan_and_scan", False):
        return []
    h, w = (int(v) for v in image_size)
    grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"))  # (2, H, W): each pixel's (y, x)
    crops = image_processor.pan_and_scan(
        grid,
        pan_and_scan_min_crop_size=image_processor.pan_and_scan_min_crop_size,
        pan_and_scan_max_num_crops=image_processor.pan_and_scan_max_num_crops,
        pan_and_scan_min_ratio_to_activate=image_processor.pan_and_scan_min_ratio_to_activate,
    )
    return [(float(c[1].min()), float(c[0].min()), float(c[1].max() + 1), float(c[0].max() + 1)) for c in crops]


def gemma3_layout(model, image_processor, image: Image.Image, inputs: dict) -> Layout:
    """Gemma 3: side×side pooled soft tokens over the whole image (squashed to the square tile by the processor),
    then, with pan-and-scan, the same grid over each crop's part of the image (views "image" | "crops")."""
    side = int(round(int(model.config.mm_tokens_per_image) ** 0.5))
    view = _original_view(image)
    crops = [(0.0, 0.0, float(view.width), float(view.height))]
    crops += gemma3_crops(image_processor, (view.height, view.width))
    got = int(inputs["pixel_values"].shape[0])
    if got != len(crops):
        from vtprune.errors import VtpruneError

        raise VtpruneError(
            f"Gemma 3 show: the inputs hold {got} images (image + pan-and-scan crops) but the image processor cuts "
            f"{len(crops)}; pass the image processor that made the inputs"
        )

    def box(crop: int, r: int, c: int) -> Box:
        x0, y0, x1, y1 = crops[crop]
        cw, ch = (x1 - x0) / side, (y1 - y0) / side
        return x0 + c * cw, y0 + r * ch, x0 + (c + 1) * cw, y0 + (r + 1) * ch

    many = len(crops) > 1
    views, names = ([view, view], ["image", f"pan-and-scan crops ({len(crops) - 1})"]) if many else ([view], ["image"])
    return Layout("gemma3", [(side, side)] * len(crops), views, names, box, [0] + [1] * (len(crops) - 1))


def internvl_canvas(image_processor, image_size: Sequence[int]) -> tuple[int, int, bool]:
    """InternVL processor (GotOcr2) tiling of an image of `image_size` (H, W) -> (cols, rows, thumbnail)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    if not getattr(image_processor, "crop_to_patches", False):
        return 1, 1, False
    size = image_processor.size
    tile = (int(size["height"]), int(size["width"])) if isinstance(size, dict) else (size.height, size.width)
    lo, hi = int(image_processor.min_patches), int(image_processor.max_patches)
    cols, rows = get_optimal_tiled_canvas(tuple(int(v) for v in image_size), tile, lo, hi)
    return int(cols), int(rows), cols * rows != 1


def internvl_layout(model, image_processor, image: Image.Image, inputs: dict) -> Layout:
    """InternVL: each dynamic tile's side×side grid at its place on the image, then the thumbnail over the image."""
    side = int(round(int(model.config.image_seq_length) ** 0.5))
    view = _original_view(image)
    w_img, h_img = view.width, view.height
    cols, rows, thumb = internvl_canvas(image_processor, (h_img, w_img))
    tiles = cols * rows
    n_crops = tiles + int(thumb)
    got = int(inputs["pixel_values"].shape[0])
    if got != n_crops:
        from vtprune.errors import VtpruneError

        raise VtpruneError(
            f"InternVL show: the processor made {got} tiles but its {cols}×{rows} canvas (+ thumbnail) gives "
            f"{n_crops}; pass the image processor that made the inputs"
        )
    tw, th = w_img / cols, h_img / rows

    def box(crop: int, r: int, c: int) -> Box:
        if crop == tiles:  # the thumbnail: the whole image
            cw, ch = w_img / side, h_img / side
            return c * cw, r * ch, (c + 1) * cw, (r + 1) * ch
        ox, oy = (crop % cols) * tw, (crop // cols) * th
        cw, ch = tw / side, th / side
        return ox + c * cw, oy + r * ch, ox + (c + 1) * cw, oy + (r + 1) * ch

    views, names = [view], [f"tiles ({cols}x{rows})"]
    if thumb:
        views.append(view)
        names.append("thumbnail")
    return Layout("internvl", [(side, side)] * n_crops, views, names, box, [0] * tiles + [1] * int(thumb))


def layout_for(loaded, image: Image.Image, inputs: dict) -> Layout:
    """The layout of the (single) image of `inputs` for the loaded model's family."""
    family = loaded.family
    if family == "llava":
        return llava_layout(loaded.model, loaded.image_processor, inputs)
    if family == "llava_next":
        return llava_next_layout(loaded.model, image, inputs)
    if family == "llava_onevision":
        return onevision_layout(loaded.model, image, inputs)
    if family == "gemma3":
        return gemma3_layout(loaded.model, loaded.image_processor, image, inputs)
    if family == "internvl":
        return internvl_layout(loaded.model, loaded.image_processor, image, inputs)
    if family in ("qwen2_5_vl", "qwen3_vl"):
        return qwen_layout(loaded.model, image, inputs)
    from vtprune.errors import UnsupportedModelError

    raise UnsupportedModelError(f"vtprune show has no layout for {family!r}")


# --- drawing --------------------------------------------------------------------------------------------
def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


def _scale(view: Image.Image) -> float:
    side = max(view.width, view.height)
    if side < MIN_SIDE:
        return float(math.ceil(MIN_SIDE / side))
    return min(1.0, MAX_SIDE / side)


def _ibox(box: Box, f: float) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (int(round(v * f)) for v in box)
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def dim_colour(pixels):
    """Faded colour of pruned cells: half way to grey (uint8 array or an RGB tuple)."""
    if isinstance(pixels, tuple):
        return tuple(int(round(DIM * c + (1 - DIM) * FADE)) for c in pixels)
    return (pixels.astype(np.float32) * DIM + (1 - DIM) * FADE).round().astype(np.uint8)


def pool_windows(layout: Layout, kept: Sequence[Cell]) -> list[tuple[Cell, Cell]] | None:
    """The adaptive-pooling window of every kept cell when the kept cells are exactly a pooling lattice (its
    window centres, as `pool` keeps them) -> [(top-left, bottom-right) inclusive] in `kept` order; else None."""
    from vtprune.methods.pool import cell_bounds

    by_crop: dict[int, list[Cell]] = {}
    for c in kept:
        by_crop.setdefault(c[0], []).append(c)
    window_of: dict[Cell, tuple[Cell, Cell]] = {}
    for crop, cells in by_crop.items():
        h, w = layout.grids[crop]
        rows, cols = sorted({r for _, r, _ in cells}), sorted({q for _, _, q in cells})
        if len(rows) * len(cols) != len(cells):
            return None
        rb, cb = cell_bounds(h, len(rows)), cell_bounds(w, len(cols))
        if [(a + b - 1) // 2 for a, b in rb] != rows or [(a + b - 1) // 2 for a, b in cb] != cols:
            return None
        for (r0, r1), r in zip(rb, rows, strict=True):
            for (c0, c1), q in zip(cb, cols, strict=True):
                window_of[(crop, r, q)] = ((crop, r0, c0), (crop, r1 - 1, c1 - 1))
    return [window_of[c] for c in kept]


def _draw_view(view: Image.Image, f: float, boxes: dict[Cell, tuple], kept: set[Cell], merged: set[Cell],
               covered: set[Cell] = frozenset(), windows: Sequence[tuple[Cell, Cell]] = ()):  # fmt: skip
    """One crop's view scaled by f: pruned cells faded, kept areas outlined, merged cells dotted, windows framed."""
    size = (max(1, round(view.width * f)), max(1, round(view.height * f)))
    base = np.asarray(view.resize(size, Image.NEAREST if f >= 1 else Image.BICUBIC).convert("RGB")).copy()
    dimmed = dim_colour(base)
    out = base.copy()
    for cell, (x0, y0, x1, y1) in boxes.items():
        if cell not in kept and cell not in covered:
            out[y0:y1, x0:x1] = dimmed[y0:y1, x0:x1]
    img = Image.fromarray(out)
    draw = ImageDraw.Draw(img)
    if not windows:  # outline the kept areas: edges between a kept cell and a pruned (or no) neighbour
        for cell in kept & boxes.keys():
            x0, y0, x1, y1 = boxes[cell]
            crop, r, c = cell
            for (dr, dc), line in (((-1, 0), (x0, y0, x1 - 1, y0)), ((1, 0), (x0, y1 - 1, x1 - 1, y1 - 1)),
                                   ((0, -1), (x0, y0, x0, y1 - 1)), ((0, 1), (x1 - 1, y0, x1 - 1, y1 - 1))):
                if (crop, r + dr, c + dc) not in kept:
                    draw.line(line, fill=KEPT_EDGE, width=1)  # fmt: skip
    for top_left, bottom_right in windows:
        if top_left in boxes and bottom_right in boxes:
            x0, y0 = boxes[top_left][:2]
            x1, y1 = boxes[bottom_right][2:]
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=MERGED, width=1)
    for cell in merged & boxes.keys():
        x0, y0, x1, y1 = boxes[cell]
        cx, cy = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
        rad = max(1.5, min(2.0 if windows else 4.0, min(x1 - x0, y1 - y0) / 5))
        draw.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), fill=MERGED)
    return img


def _fit(text: str, font, width: int) -> str:
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _wrap(text: str, font, width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if current and font.getlength(trial) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    return [*lines, current] if current else lines


def _is_pooling(method: str) -> bool:
    try:
        from vtprune.methods import method_class
        from vtprune.methods.pool import Pool2D

        return issubclass(method_class(method), Pool2D)
    except Exception:  # noqa: BLE001 - an unregistered test method: no windows
        return False


def render(
    layout: Layout,
    results: Sequence[dict],
    out: str | Path | None = None,
    title: str = "",
    question: str | None = None,
    expected: str | None = None,
) -> ShowResult:
    """Draw `run_one` results (one column each, one panel per event) over `layout`; write a PNG to `out`.

    title: first header line (e.g. the model); question / expected: printed under it, and each column's answer is
    green when it matches `expected` (case and punctuation ignored), red when it does not."""
    from vtprune.cli import answers_match

    font, small = _font(14), _font(12)
    line = 18
    scales = [_scale(v) for v in layout.views]
    sizes = [(round(v.width * f), round(v.height * f)) for v, f in zip(layout.views, scales, strict=True)]
    panel_w = sum(w for w, _ in sizes) + GAP * (len(sizes) - 1)
    panel_h = max(h for _, h in sizes)
    all_cells = layout.all_cells()
    cell_boxes = [_ibox(layout.box(*c), scales[layout.view(c[0])]) for c in all_cells]
    x_crop = [sum(w for w, _ in sizes[:i]) + GAP * i for i in range(len(sizes))]

    columns = []
    for res in results:
        if "error" in res:
            columns.append((res, []))
            continue
        n = res["n_visual"]
        if n != layout.n:
            raise ValueError(f"{res['method']}: the record has {n} visual tokens, the image layout {layout.n}")
        events = res["events"] or [{"stage": "no pruning", "keep_idx": torch.arange(n), "merged_idx": []}]
        columns.append((res, events))
    col_w = max(panel_w, 220)
    caption_lines = 2
    header = 2 * line
    col_h = header + max([1, *(len(ev) for _, ev in columns)]) * (caption_lines * line + panel_h + PAD)
    width = PAD + len(columns) * (col_w + PAD)
    head_lines = [(t, c) for t, c in ((title, (0, 0, 0)), (f"question: {question}" if question else "", (0, 0, 0)),
                                      (f"expected answer: {expected!r}" if expected is not None else "", NEUTRAL))
                  if t]  # fmt: skip
    wrapped = [(chunk, c) for t, c in head_lines for chunk in _wrap(t, font, width - 2 * PAD)]
    top = PAD + len(wrapped) * line + (PAD // 2 if wrapped else 0)
    legend = (
        f"views: {' | '.join(layout.view_names)} · kept: as is, green outline · pruned: faded · merged token: "
        "magenta dot · pooling (pool, downsample): magenta frame = the window one kept token averages"
    )
    legend_lines = _wrap(legend, small, width - 2 * PAD)
    height = top + col_h + len(legend_lines) * line + PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (chunk, colour) in enumerate(wrapped):
        draw.text((PAD, PAD // 2 + i * line), chunk, fill=colour, font=font)
    panels: list[Panel] = []
    for ci, (res, events) in enumerate(columns):
        x = PAD + ci * (col_w + PAD)
        budget = res.get("budget")
        from vtprune.tables import budget as fmt_budget

        head = f"{res['method']} @ {fmt_budget(budget)}" if res["method"] != "none" else "none (all tokens)"
        draw.text((x, top), _fit(head, font, col_w), fill="black", font=font)
        y = top + header
        if "error" in res:
            draw.text((x, top + line), "not run:", fill=WRONG, font=small)
            for i, chunk in enumerate(_wrap(res["error"], small, col_w)[: max(1, panel_h // line)]):
                draw.text((x, y + i * line), chunk, fill=WRONG, font=small)
            continue
        answer = res.get("answer", "")
        colour, verdict = NEUTRAL, ""
        if expected is not None:
            ok = answers_match(answer, expected)
            colour, verdict = (RIGHT, " (right)") if ok else (WRONG, " (wrong)")
        draw.text((x, top + line), _fit(f"answer: {answer!r}{verdict}", small, col_w), fill=colour, font=small)
        pooling = _is_pooling(res["method"])
        for ei, ev in enumerate(events):
            kept_cells = layout.cells(ev["keep_idx"])
            merged_cells = layout.cells(ev.get("merged_idx", []))
            kept, merged = set(kept_cells), set(merged_cells)
            windows = pool_windows(layout, kept_cells) if pooling and merged == kept and kept else None
            covered: set[Cell] = set()
            if windows:
                for (crop, r0, c0), (_, r1, c1) in windows:
                    covered |= {(crop, r, c) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)}
                covered -= kept
            k, n_all = len(kept_cells), layout.n
            before_llm = ei == 0 and not str(ev["stage"]).startswith("llm")
            inserted = max(0, res["retained_tokens"] - k) if before_llm else 0  # e.g. VisionZip's [CLS]
            if windows:
                first = f"{ev['stage']}: {k} tokens, each the average of"
                second = "the framed window (all cells used)"
            else:
                first = f"{ev['stage']}: {k} of {n_all} tokens kept" + (f" + {inserted} inserted" if inserted else "")
                second = f"{len(merged)} of them carry merged tokens (dots)" if merged else ""
            if len(layout.views) > 1:  # label each view: "<caption> · base view" ... "tiles"
                for crop in range(1, len(layout.views)):
                    label = _fit(layout.view_names[crop], small, sizes[crop][0])
                    draw.text((x + x_crop[crop], y + line), label, fill="black", font=small)
                second = f"{second} · {layout.view_names[0]}" if second else layout.view_names[0]
            draw.text((x, y), _fit(first, small, col_w), fill="black", font=small)
            room = (x_crop[1] - GAP) if len(layout.views) > 1 else col_w
            if second:
                draw.text((x, y + line), _fit(second, small, room), fill=NEUTRAL, font=small)
            y_img = y + caption_lines * line
            boxes: dict[Cell, tuple[int, int, int, int]] = {}
            for vi, view in enumerate(layout.views):
                mine = {c: b for c, b in zip(all_cells, cell_boxes, strict=True) if layout.view(c[0]) == vi}
                wins = [w for w in windows or [] if layout.view(w[0][0]) == vi]
                img = _draw_view(view, scales[vi], mine, kept, merged, covered, wins)
                canvas.paste(img, (x + x_crop[vi], y_img))
                for c, (x0, y0, x1, y1) in mine.items():
                    ox, oy = x + x_crop[vi], y_img
                    boxes[c] = (x0 + ox, y0 + oy, x1 + ox, y1 + oy)
            panels.append(Panel(res["method"], budget, ei, str(ev["stage"]), kept_cells, merged_cells, boxes,
                                covered, list(windows or [])))  # fmt: skip
            y += caption_lines * line + panel_h + PAD
    for i, chunk in enumerate(legend_lines):
        draw.text((PAD, top + col_h + i * line), chunk, fill=NEUTRAL, font=small)
    path = None
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(path, format="PNG")
    return ShowResult(path, canvas, panels, list(results), layout)


def parse_methods(text: str | Sequence[str] | Sequence[tuple[str, object]], budget) -> list[tuple[str, object]]:
    """ "fastv,pool@32,visionzip" -> [("fastv", budget), ("pool", 32), ("visionzip", budget)] (a bad @BUDGET is a
    `BudgetError`); a list of names or of (name, budget) pairs is accepted too."""
    from vtprune.budget import Budget

    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    out = []
    for item in items:
        if isinstance(item, tuple):
            out.append(item)
            continue
        if not item:
            continue
        name, sep, b = item.partition("@")
        out.append((name.strip(), Budget.from_text(b).value if sep else budget))
    if not out:
        from vtprune.errors import VtpruneError

        raise VtpruneError(f"no method given (expected e.g. 'pool,fastv@0.5'), got {text!r}")
    return out


def show(
    loaded,
    image: Image.Image | str | Path,
    prompt: str,
    methods: str | Sequence[str] | Sequence[tuple[str, object]],
    budget: int | float = 64,
    out: str | Path | None = "vtprune-out/show.png",
    *,
    budget_mode: str = "layer_avg",
    positions: str = "keep",
    options: dict | None = None,
    max_new_tokens: int = 8,
    expected: str | None = None,
) -> ShowResult:
    """Run every method (`"a,b@32,c"`) on one image + prompt and draw their kept tokens side by side.

    options: KEY=VALUE for every method that has the option, or "METHOD.KEY" for one method (an option no
    chosen method has is a `VtpruneError`). expected: the right answer, if known (answers drawn green / red).
    A method that cannot run (e.g. an infeasible budget) gets a column saying why.
    """
    from vtprune.cli import options_by_method
    from vtprune.errors import VtpruneError
    from vtprune.runner import build_inputs, run_one

    if not isinstance(image, Image.Image):
        image = Image.open(image)
    image = image.convert("RGB")
    chosen = parse_methods(methods, budget)
    per_method = options_by_method(options or {}, list(dict.fromkeys(name for name, _ in chosen)))
    inputs = build_inputs(loaded, image, prompt)
    layout = layout_for(loaded, image, inputs)
    results = []
    for name, b in chosen:
        try:
            res = run_one(
                loaded,
                image,
                prompt,
                name,
                b,
                budget_mode=budget_mode,
                positions=positions,
                options=per_method[name],
                max_new_tokens=max_new_tokens,
                inputs=inputs,
            )
        except VtpruneError as err:  # e.g. an infeasible budget: its column says why
            res = {"method": name, "budget": b, "error": str(err)}
        results.append(res)
    return render(layout, results, out, title=loaded.source, question=prompt, expected=expected)
