"""`show`'s picture without a model (issue 27): answers green when they match the expected one and red when not,
pooled tokens drawn as the windows they average (cells inside not faded), pruned cells faded but not black."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vtprune import show
from vtprune.cli import answers_match

SIDE, CELL = 8, 40  # an 8×8 grid of 40-px cells
COLOUR = (200, 120, 40)


def _layout() -> show.Layout:
    view = Image.new("RGB", (SIDE * CELL, SIDE * CELL), COLOUR)
    return show.Layout("llava", [(SIDE, SIDE)], [view], ["model input"],
                       lambda crop, r, c: (c * CELL, r * CELL, (c + 1) * CELL, (r + 1) * CELL))  # fmt: skip


def _result(method: str, keep: list[int], merged: list[int], answer: str) -> dict:
    return {
        "method": method, "budget": len(keep), "answer": answer, "n_visual": SIDE * SIDE,
        "retained_tokens": len(keep), "layer_avg_tokens": float(len(keep)),
        "events": [{"stage": "pre_llm", "keep_idx": torch.tensor(keep), "merged_idx": merged}],
    }  # fmt: skip


def _has(pixels: np.ndarray, colour, tol: int = 40) -> bool:
    return bool((np.abs(pixels.astype(int) - np.array(colour)).max(-1) <= tol).any())


def test_answers_windows_and_fading():
    from vtprune.methods.pool import cell_bounds

    rows = [(a + b - 1) // 2 for a, b in cell_bounds(SIDE, 2)]  # pool's representatives of a 2×2 pooling
    pool_keep = sorted(r * SIDE + c for r in rows for c in rows)
    other_keep = [0, 9, 18]
    results = [
        _result("pool", pool_keep, pool_keep, "Orange."),
        _result("divprune", other_keep, [], "blue"),
    ]
    res = show.render(_layout(), results, None, title="m", question="what colour ?", expected="orange")
    pool, div = res.panels
    assert len(pool.windows) == 4 and pool.covered == set(res.layout.all_cells()) - set(pool.cells)
    assert not div.windows and not div.covered
    img = np.asarray(res.image)
    # every pool cell shows the image as is (window covered), divprune's pruned cells are faded, not black
    x, y = pool.centre((0, 1, 2))
    assert tuple(img[y, x]) == COLOUR
    x, y = div.centre((0, 5, 5))
    faded = show.dim_colour(COLOUR)
    assert tuple(img[y, x]) == faded and min(faded) > 60
    # the pool window frames are magenta, the answer lines green (right) and red (wrong)
    x0, y0, x1, y1 = pool.boxes[(0, 0, 0)]
    assert _has(img[y0 : y0 + 2, x0 : x0 + CELL * 4], show.MERGED, tol=10)
    top = min(b[1] for b in pool.boxes.values())
    header = img[:top]
    left, right = header[:, : header.shape[1] // 2], header[:, header.shape[1] // 2 :]
    assert _has(left, show.RIGHT) and not _has(left, show.WRONG)
    assert _has(right, show.WRONG) and not _has(right, show.RIGHT)


def test_answers_match_ignores_case_and_punctuation():
    assert answers_match(" Orange.", "orange") and answers_match("YES", "yes")
    assert not answers_match("blue", "orange") and not answers_match("", "orange")
