"""`vtprune show`: the kept visual tokens of one image drawn over it, one column per method, one panel per
pruning event (PIL only, no matplotlib).

Where each kept index lands (indices into the image's candidates, as `vtprune.last_run(model)` gives them) is
the adapter's `display_layout` (`vtprune.models.display.Layout`: one background view per crop, a box per
(crop, row, col)); e.g. LLaVA-1.5: cells of the processed square; LLaVA-NeXT / OneVision: base view | the
unpadded AnyRes tile area mapped back onto the image; Qwen: merged cells over the resized image; Gemma 3:
the image and its pan-and-scan crops; InternVL: dynamic tiles | thumbnail.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from vtprune.models.display import Box, Cell, Layout

DIM = 0.5  # pruned cells: DIM · pixel + (1 − DIM) · FADE
FADE = 128
MERGED = (255, 0, 255)
KEPT_EDGE = (0, 190, 0)
RIGHT, WRONG, NEUTRAL = (0, 130, 0), (200, 0, 0), (60, 60, 60)
GAP, PAD, MIN_SIDE, MAX_SIDE = 6, 12, 320, 768


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


# --- layout -------------------------------------------------------------------------------------------
def layout_for(loaded, image: Image.Image, inputs: dict) -> Layout:
    """The layout of the (single) image of `inputs`: the adapter's `display_layout`."""
    return loaded.adapter.display_layout(image, inputs, loaded.image_processor)


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
    from vtprune.commands.common import answers_match

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
    from vtprune.commands.common import options_by_method
    from vtprune.errors import VtpruneError
    from vtprune.loading import build_inputs
    from vtprune.single import run_one

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
