"""`vtprune show`: the kept visual tokens of one image drawn over it, one column per method, one panel per
pruning event (PIL only, no matplotlib).

Where each kept index lands (indices into the image's candidates, as `vtprune.last_run(model)` gives them):

- LLaVA-1.5: cell (row, col) of the side×side grid (24×24) over the square the model sees, i.e. the
  processor's resized and center-cropped image (recovered exactly from `pixel_values`);
- LLaVA-NeXT: crop 0 = the base view, side×side cells over the whole image (the model sees it squashed
  to one tile); crop 1 = the unpadded tile area, one grid in packed raster order (as the adapter's
  `image_layout`), mapped through the processor's resize-to-pinpoint, centred padding and the model's
  `unpad_image` back onto the image; the two are drawn side by side ("base" | "tiles");
- Qwen2.5-VL: merged 28-px cells (patch × spatial merge) over the image resized to the processor's
  `image_grid_thw` size.

Kept cells show the image as is, pruned cells are dimmed (×`DIM`), kept tokens that carry merged
features get a magenta dot at their centre. `ShowResult.panels[i].cells` / `.boxes` expose what was
drawn, in PNG pixel coordinates, so tests (and users) can check the picture against the record.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

DIM = 0.3
MERGED = (255, 0, 255)
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


def layout_for(loaded, image: Image.Image, inputs: dict) -> Layout:
    """The layout of the (single) image of `inputs` for the loaded model's family."""
    if loaded.family == "llava":
        return llava_layout(loaded.model, loaded.image_processor, inputs)
    if loaded.family == "llava_next":
        return llava_next_layout(loaded.model, image, inputs)
    return qwen_layout(loaded.model, image, inputs)


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


def _draw_view(view: Image.Image, f: float, boxes: dict[Cell, tuple], kept: set[Cell], merged: set[Cell]):
    """One crop's view scaled by f, pruned cells dimmed, merged cells dotted."""
    size = (max(1, round(view.width * f)), max(1, round(view.height * f)))
    base = np.asarray(view.resize(size, Image.NEAREST if f >= 1 else Image.BICUBIC).convert("RGB")).copy()
    dimmed = (base.astype(np.float32) * DIM).round().astype(np.uint8)
    out = base.copy()
    for cell, (x0, y0, x1, y1) in boxes.items():
        if cell not in kept:
            out[y0:y1, x0:x1] = dimmed[y0:y1, x0:x1]
    img = Image.fromarray(out)
    draw = ImageDraw.Draw(img)
    for cell in merged & boxes.keys():
        x0, y0, x1, y1 = boxes[cell]
        cx, cy = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
        rad = max(1.5, min(6.0, min(x1 - x0, y1 - y0) / 4))
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


def render(layout: Layout, results: Sequence[dict], out: str | Path | None = None, title: str = "") -> ShowResult:
    """Draw `run_one` results (one column each, one panel per event) over `layout`; write a PNG to `out`."""
    font, small = _font(14), _font(12)
    line = 18
    scales = [_scale(v) for v in layout.views]
    sizes = [(round(v.width * f), round(v.height * f)) for v, f in zip(layout.views, scales, strict=True)]
    panel_w = sum(w for w, _ in sizes) + GAP * (len(sizes) - 1)
    panel_h = max(h for _, h in sizes)
    all_cells = layout.all_cells()
    cell_boxes = [_ibox(layout.box(*c), scales[c[0]]) for c in all_cells]
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
    col_w = max(panel_w, 200)
    header = 2 * line
    col_h = header + max([1, *(len(ev) for _, ev in columns)]) * (line + panel_h + PAD)
    top = (line + PAD) if title else PAD
    width = PAD + len(columns) * (col_w + PAD)
    height = top + col_h + line + PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((PAD, PAD // 2), _fit(title, font, width - 2 * PAD), fill="black", font=font)
    panels: list[Panel] = []
    for ci, (res, events) in enumerate(columns):
        x = PAD + ci * (col_w + PAD)
        budget = res.get("budget")
        head = f"{res['method']} @ {budget}" if res["method"] != "none" else "none (all tokens)"
        draw.text((x, top), _fit(head, font, col_w), fill="black", font=font)
        y = top + header
        if "error" in res:
            draw.text((x, top + line), "not run:", fill=(160, 0, 0), font=small)
            for i, chunk in enumerate(_wrap(res["error"], small, col_w)[: max(1, panel_h // line)]):
                draw.text((x, y + i * line), chunk, fill=(160, 0, 0), font=small)
            continue
        answer = f"answer: {res.get('answer', '')!r}"
        draw.text((x, top + line), _fit(answer, small, col_w), fill=(60, 60, 60), font=small)
        for ei, ev in enumerate(events):
            kept_cells = layout.cells(ev["keep_idx"])
            merged_cells = layout.cells(ev.get("merged_idx", []))
            kept, merged = set(kept_cells), set(merged_cells)
            n_merged = len(merged)
            caption = f"{ev['stage']}: {len(kept_cells)}/{layout.n} kept" + (f", {n_merged} merged" if n_merged else "")
            if len(layout.views) > 1:  # label each view: "<caption> · base view" ... "tiles"
                caption = f"{caption} · {layout.view_names[0]}"
                for crop in range(1, len(layout.views)):
                    label = _fit(layout.view_names[crop], small, sizes[crop][0])
                    draw.text((x + x_crop[crop], y), label, fill="black", font=small)
            room = (x_crop[1] - GAP) if len(layout.views) > 1 else col_w
            draw.text((x, y), _fit(caption, small, room), fill="black", font=small)
            y_img = y + line
            boxes: dict[Cell, tuple[int, int, int, int]] = {}
            for crop, view in enumerate(layout.views):
                mine = {c: b for c, b in zip(all_cells, cell_boxes, strict=True) if c[0] == crop}
                img = _draw_view(view, scales[crop], mine, kept, merged)
                canvas.paste(img, (x + x_crop[crop], y_img))
                for c, (x0, y0, x1, y1) in mine.items():
                    ox, oy = x + x_crop[crop], y_img
                    boxes[c] = (x0 + ox, y0 + oy, x1 + ox, y1 + oy)
            panels.append(Panel(res["method"], budget, ei, str(ev["stage"]), kept_cells, merged_cells, boxes))
            y += line + panel_h + PAD
    names = " | ".join(layout.view_names)
    legend = f"views: {names} · kept: as is · pruned: dimmed · merged: magenta dot"
    draw.text((PAD, height - line - PAD // 2), _fit(legend, small, width - 2 * PAD), fill=(60, 60, 60), font=small)
    path = None
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(path, format="PNG")
    return ShowResult(path, canvas, panels, list(results), layout)


def parse_methods(text: str | Sequence[str], budget) -> list[tuple[str, object]]:
    """ "fastv,pool@32,visionzip" -> [("fastv", budget), ("pool", 32), ("visionzip", budget)]."""
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    out = []
    for item in items:
        if not item:
            continue
        name, sep, b = item.partition("@")
        out.append((name, (int(b) if b.isdigit() else float(b)) if sep else budget))
    return out


def show(
    loaded,
    image: Image.Image | str | Path,
    prompt: str,
    methods: str | Sequence[str],
    budget: int | float = 64,
    out: str | Path | None = "vtprune-show.png",
    *,
    budget_mode: str = "layer_avg",
    positions: str = "keep",
    options: dict | None = None,
    max_new_tokens: int = 8,
) -> ShowResult:
    """Run every method (`"a,b@32,c"`) on one image + prompt and draw their kept tokens side by side.

    options: KEY=VALUE for every method that has the option, or "METHOD.KEY" for one method.
    """
    from vtprune.errors import VtpruneError
    from vtprune.methods import method_class
    from vtprune.runner import build_inputs, run_one

    if not isinstance(image, Image.Image):
        image = Image.open(image)
    image = image.convert("RGB")
    inputs = build_inputs(loaded, image, prompt)
    layout = layout_for(loaded, image, inputs)
    results = []
    chosen = parse_methods(methods, budget)
    names = {name for name, _ in chosen}
    for key in options or {}:
        target, dot, opt = key.rpartition(".")
        owners = [target] if dot else sorted(names)
        if not any(n in names and opt in method_class(n).config_class.option_names() for n in owners):
            raise VtpruneError(f"option {key!r} belongs to none of the methods {sorted(names)}")
    for name, b in chosen:
        valid = set(method_class(name).config_class.option_names())
        opts = {}
        for key, value in (options or {}).items():
            target, dot, opt = key.rpartition(".")
            if dot and target == name:
                opts[opt] = value
            elif not dot and key in valid:
                opts[key] = value
        try:
            res = run_one(
                loaded,
                image,
                prompt,
                name,
                b,
                budget_mode=budget_mode,
                positions=positions,
                options=opts,
                max_new_tokens=max_new_tokens,
                inputs=inputs,
            )
        except VtpruneError as err:  # e.g. an infeasible budget: its column says why
            res = {"method": name, "budget": b, "error": str(err)}
        results.append(res)
    title = f"{loaded.source}: {prompt}"
    return render(layout, results, out, title=title)
