"""`vtprune show` on LLaVA-OneVision, Gemma 3 and InternVL (issue 24): tiny random checkpoints saved with a
word-level tokenizer and a PIL image processor are loaded by `runner.load`; the cells `show` draws equal
`vtprune.last_run`'s kept indices through the adapter's own layout, the PNG's pixels agree (kept as is,
pruned faded), and each token's box lies where its pixels come from (NeXT geometry / the InternVL canvas)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from factories import tiny
from PIL import Image
from saved_models import save_tiny_2026_families

import vtprune
from vtprune import runner, show
from vtprune.api import session_of
from vtprune.models.display import anyres_tile_geometry, unnormalise
from vtprune.models.internvl import internvl_canvas

torch.set_num_threads(1)

COLOUR = (180, 200, 220)
SIZE = (160, 100)  # W, H
METHODS = "pool,divprune,fastv@0.7"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    import transformers as T

    root = tmp_path_factory.mktemp("show-families")
    dirs = save_tiny_2026_families(root)
    gs = tiny("gemma3").config.vision_config.image_size
    gemma = runner.load(dirs["gemma3"])
    pan = T.Gemma3ImageProcessorPil(
        size={"height": gs, "width": gs},
        do_pan_and_scan=True,
        pan_and_scan_min_crop_size=32,
        pan_and_scan_max_num_crops=4,
        pan_and_scan_min_ratio_to_activate=1.2,
    )
    return {
        "gemma3_pan": dataclasses.replace(gemma, image_processor=pan),
        "llava_onevision": runner.load(dirs["llava_onevision"]),
        "gemma3": gemma,
        "internvl": runner.load(dirs["internvl"]),
    }


def _close(pixel, colour, tol=3) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, colour, strict=True))


def test_load_missing_path_is_named(tmp_path):
    with pytest.raises(vtprune.errors.VtpruneError, match="not found"):
        runner.load(tmp_path / "nothing-here")


@pytest.mark.parametrize("family", ["llava_onevision", "gemma3", "internvl", "gemma3_pan"])
def test_show_cells_equal_last_run_and_png_pixels(loaded, family, tmp_path):
    """gemma3_pan: pan-and-scan on a wide image, the image and its crops are the sample's engine images."""
    lm = loaded[family]
    assert lm.family == family.removesuffix("_pan")
    image = Image.new("RGB", (320, 100) if family == "gemma3_pan" else SIZE, COLOUR)
    out = tmp_path / "show.png"
    result = show.show(lm, image, "w5 w6 w7", METHODS, 0.3, out, max_new_tokens=1)
    assert all("error" not in r for r in result.results)
    pixels = np.asarray(Image.open(out).convert("RGB"))
    dim = show.dim_colour(COLOUR)
    inputs = runner.build_inputs(lm, image, "w5 w6 w7")
    for method, b in show.parse_methods(METHODS, 0.3):
        panels = [p for p in result.panels if p.method == method]
        vtprune.apply(lm.model, method, b)
        try:
            with torch.inference_mode():
                lm.model(**inputs)
            sample = vtprune.last_run(lm.model).samples[0]
            expected = _engine_cells(lm, sample, image, inputs)
        finally:
            vtprune.remove(lm.model)
        assert [p.cells for p in panels] == expected, method
        assert sample.n_visual == result.layout.n
        for p in panels:
            assert set(p.boxes) == set(result.layout.all_cells())
            kept, merged = set(p.cells), set(p.merged_cells)
            for cell in p.boxes:
                x, y = p.centre(cell)
                want = show.MERGED if cell in merged else COLOUR if cell in kept | p.covered else dim
                assert _close(pixels[y, x], want), (method, cell, tuple(pixels[y, x]), want)


def _engine_cells(lm, sample, image, inputs) -> list[list[tuple[int, int, int]]]:
    """keep_idx of every event -> (crop, row, col) through the adapter's own layout of each engine image of the
    sample (one image, or Gemma 3's image + pan-and-scan crops: crop = engine image)."""
    adapter = session_of(lm.model).adapter
    if lm.family == "gemma3":
        per = adapter.nominal_visual_tokens()
        layouts = [adapter.image_layout(k, per) for k in range(sample.n_visual // per)]
        coords = torch.cat([c for _, c, _ in layouts])
        crop = torch.cat([torch.full((per,), k) for k in range(len(layouts))])
        assert len(layouts) == int(inputs["pixel_values"].shape[0])
    else:
        _, coords, crop = adapter.image_layout(0, sample.n_visual)
    return [[(int(crop[i]), int(coords[i, 0]), int(coords[i, 1])) for i in ev.keep_idx] for ev in sample.events]


def _same_content(model_view: Image.Image, part: Image.Image) -> bool:
    """A processor crop / tile and the part of a random-noise image a box names hold the same pixels: their
    column and row mean profiles correlate (> 0.9; a box shifted by 10 px of a ~100 px crop gives ≈ 0)."""
    a = np.asarray(model_view, dtype=float)
    b = np.asarray(part.resize(model_view.size, Image.BILINEAR), dtype=float)
    return all(np.corrcoef(a.mean(axes), b.mean(axes))[0, 1] > 0.9 for axes in ((0, 2), (1, 2)))


def _union_covers(boxes, w, h, tol=1e-6) -> None:
    """Boxes tile [0, w) × [0, h): inside it, and their areas add up to the image (no overlap, no hole)."""
    assert all(-tol <= x0 < x1 <= w + tol and -tol <= y0 < y1 <= h + tol for x0, y0, x1, y1 in boxes)
    assert sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes) == pytest.approx(w * h, rel=0.02)


def test_onevision_tiles_cover_the_image_also_when_downsized(loaded):
    """The tile area's boxes cover the image; an image large enough for `anyres_max_9` down-sizing (the model
    interpolates the unpadded grid) still maps its smaller grid onto the whole image."""
    lm = loaded["llava_onevision"]
    for w, h in [(160, 100), (224, 224), (90, 200)]:
        image = Image.new("RGB", (w, h), COLOUR)
        inputs = runner.build_inputs(lm, image, "w5")
        layout = show.layout_for(lm, image, inputs)
        geo = anyres_tile_geometry(lm.model.config, (h, w))
        rows, cols = layout.grids[1]
        if (w, h) == (224, 224):
            assert rows * cols < geo["rows"] * geo["cols"]  # down-sized by the model
        else:
            assert (rows, cols) == (geo["rows"], geo["cols"])
        base = [layout.box(0, r, c) for r in range(layout.grids[0][0]) for c in range(layout.grids[0][1])]
        tiles = [layout.box(1, r, c) for r in range(rows) for c in range(cols)]
        _union_covers(base, w, h)
        _union_covers(tiles, w, h)
        n_tiles = sum(1 for _ in tiles)
        assert n_tiles + layout.grids[0][0] * layout.grids[0][1] == layout.n


def test_onevision_tile_area_is_the_image_in_the_processor_canvas(loaded):
    """The processor's tiles, put back together, hold the image where the layout's tile area says (its boxes'
    union, in canvas pixels, is the resized image)."""
    lm = loaded["llava_onevision"]
    w, h = 90, 200
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (h, w, 3), dtype=np.uint8))
    inputs = runner.build_inputs(lm, image, "w5")
    geo = anyres_tile_geometry(lm.model.config, (h, w))
    pix = inputs["pixel_values"][0]  # (1 + tiles, 3, tile, tile): base view, then the tiles in raster order
    (new_w, new_h), (px, py) = geo["resized"], geo["paste"]
    per_row = (geo["cols"] + 2 * geo["col_off"]) // geo["side"]  # tiles per canvas row
    canvas = torch.cat([torch.cat(list(row), 2) for row in pix[1:].split(per_row)], 1)  # (3, ph, pw)
    view = unnormalise(canvas, lm.image_processor)
    assert _same_content(view.crop((px, py, px + new_w, py + new_h)), image)
    layout = show.layout_for(lm, image, inputs)
    rows_, cols_ = layout.grids[1]
    boxes = [layout.box(1, r, c) for r in range(rows_) for c in range(cols_)]
    assert min(b[0] for b in boxes) == pytest.approx(0, abs=w / new_w * geo["cell_px"])
    assert max(b[2] for b in boxes) == pytest.approx(w, abs=w / new_w * geo["cell_px"])


def test_internvl_tiles_sit_on_the_processor_canvas(loaded):
    """Each tile's grid covers the rectangle of the image the processor cut that tile from (pixel rows of
    `pixel_values` compared with the image resized to the canvas), the thumbnail the whole image."""
    lm = loaded["internvl"]
    w, h = SIZE
    arr = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    image = Image.fromarray(arr)
    inputs = runner.build_inputs(lm, image, "w5")
    layout = show.layout_for(lm, image, inputs)
    cols, rows, thumb = internvl_canvas(lm.image_processor, (h, w))
    assert thumb and len(layout.grids) == cols * rows + 1 == inputs["pixel_values"].shape[0]
    side = layout.grids[0][0]
    for t in range(cols * rows):
        boxes = [layout.box(t, r, c) for r in range(side) for c in range(side)]
        x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
        assert (x0, y0, x1, y1) == pytest.approx(((t % cols) * w / cols, (t // cols) * h / rows,
                                                  (t % cols + 1) * w / cols, (t // cols + 1) * h / rows))  # fmt: skip
        # the processor's tile t is the canvas-resized image's block t (a box shifted by a few pixels fails)
        tile = unnormalise(inputs["pixel_values"][t], lm.image_processor)
        assert _same_content(tile, image.crop((round(x0), round(y0), round(x1), round(y1)))), t
    thumb_boxes = [layout.box(cols * rows, r, c) for r in range(side) for c in range(side)]
    _union_covers(thumb_boxes, w, h)
    assert layout.view_of == [0] * (cols * rows) + [1]


def test_gemma3_grid_covers_the_whole_image(loaded):
    lm = loaded["gemma3"]
    image = Image.new("RGB", SIZE, COLOUR)
    layout = show.layout_for(lm, image, runner.build_inputs(lm, image, "w5"))
    ((s, s2),) = layout.grids
    assert s == s2 and s * s == lm.model.config.mm_tokens_per_image
    _union_covers([layout.box(0, r, c) for r in range(s) for c in range(s)], *SIZE)


def test_gemma3_pan_and_scan_crops_sit_where_the_processor_cut_them(loaded):
    """Each crop's grid covers the part of the image whose pixels the processor put into that crop."""
    lm = loaded["gemma3_pan"]
    w, h = 320, 100
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (h, w, 3), dtype=np.uint8))
    inputs = runner.build_inputs(lm, image, "w5")
    layout = show.layout_for(lm, image, inputs)
    n = len(layout.grids)
    assert n == int(inputs["pixel_values"].shape[0]) > 2 and layout.view_of == [0] + [1] * (n - 1)
    s = layout.grids[0][0]
    for k in range(n):
        boxes = [layout.box(k, r, c) for r in range(s) for c in range(s)]
        x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
        if k == 0:
            assert (x0, y0, x1, y1) == pytest.approx((0, 0, w, h))
        pix = unnormalise(inputs["pixel_values"][k], lm.image_processor)
        assert _same_content(pix, image.crop((round(x0), round(y0), round(x1), round(y1)))), k


def test_show_cli_on_saved_folders(loaded, tmp_path, capsys):
    """`vtprune show --model DIR` loads each of the three families from its saved folder and writes the PNG."""
    from vtprune.cli import main

    image = tmp_path / "in.png"
    Image.new("RGB", SIZE, COLOUR).save(image)
    for family in ("llava_onevision", "gemma3", "internvl"):
        out = tmp_path / f"{family}.png"
        args = ["show", "--model", loaded[family].source, "--image", str(image), "--prompt", "w5 w6"]
        assert main([*args, "--methods", "divprune", "--budget", "0.3", "--out", str(out)]) == 0, family
        assert Image.open(out).format == "PNG"
    assert "picture:" in capsys.readouterr().err
