"""Display geometry of one image's candidate tokens, as an adapter's `display_layout` gives it to `vtprune show`.

A `Layout` says where every candidate token (in the engine's candidate order: crop after crop, raster order
within a crop) lies on pictures of the input image: one background view per crop (several crops may share a
view) and a box per (crop, row, col) in that view's pixels. The helpers here are the geometry that several
families share (the processor's normalisation undone, LLaVA-NeXT-style AnyRes tiling).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

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


def unnormalise(pixels: torch.Tensor, image_processor) -> Image.Image:
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


def original_view(image: Image.Image, size: Sequence[int] | None = None) -> Image.Image:
    """The image in RGB, resized to `size` (H, W) when given and different."""
    view = image.convert("RGB")
    if size is not None and (view.height, view.width) != tuple(size):
        view = view.resize((int(size[1]), int(size[0])), Image.BICUBIC)
    return view


def square_grid_layout(family: str, view: Image.Image, side: int, name: str) -> Layout:
    """One side×side grid stretched over the whole `view`."""
    cw, ch = view.width / side, view.height / side

    def box(crop: int, r: int, c: int) -> Box:
        return c * cw, r * ch, (c + 1) * cw, (r + 1) * ch

    return Layout(family, [(side, side)], [view], [name], box)


def anyres_tile_geometry(config, image_size: Sequence[int]) -> dict:
    """LLaVA-NeXT-style AnyRes tile area of one image of `image_size` (H, W): the unpadded grid (rows, cols), its
    offset in the full tile grid, and the processor's resize/paste of the image into the pinpoint canvas."""
    from transformers.image_processing_utils import select_best_resolution

    tile = int(config.vision_config.image_size)
    side = tile // int(config.vision_config.patch_size)
    h_img, w_img = (int(v) for v in image_size)
    ph, pw = select_best_resolution((h_img, w_img), config.image_grid_pinpoints)
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


def anyres_layout(family: str, config, image: Image.Image, size: Sequence[int], grids: list[tuple[int, int]]) -> Layout:
    """Base view (side×side over the whole image) and the AnyRes tile area mapped back onto the image through the
    processor's resize / centred padding and the model's `unpad_image`. grids: [(side, side)] + [(h, w)] of the
    tile area when present; a tile grid smaller than the unpadded one (`anyres_max_N` down-sizing) maps each
    token to the rows/h × cols/w block it was interpolated from."""
    geo = anyres_tile_geometry(config, size)
    view = original_view(image, size)
    s, (w_img, h_img) = geo["side"], geo["image"]
    (new_w, new_h), (px, py), p = geo["resized"], geo["paste"], geo["cell_px"]
    sx, sy = w_img / new_w, h_img / new_h
    fr = fc = 1.0
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
    return Layout(family, grids, [view] * len(grids), names, box)
