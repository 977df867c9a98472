"""`TrainConfig.count_mark`: where each object's unit sits in the centre targets (`scenes_v3.object_marks`: its
centre or an extreme visible pixel), several marks at once with one count head each, reaching the tower's centre
target and the count attention targets through the packed batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vtprune.testbed import data_v3
from vtprune.testbed.data import Packing
from vtprune.testbed.scenes import CELL, COLOURS, GRID, SHAPES
from vtprune.testbed.scenes_v3 import COUNT_MARKS, id_map, mark_points, object_centres, object_marks
from vtprune.testbed.splits import train_split

C = len(COLOURS) + len(SHAPES)


def _extreme_pixels(ids: np.ndarray, n: int) -> dict[str, dict[int, tuple[int, int]]]:
    """mark -> object index -> (x, y) of its extreme pixel, by a plain scan of the id map (the oracle)."""
    ys, xs = np.nonzero((ids >= 1) & (ids <= n))
    out = {m: {} for m in ("top", "bottom", "left", "right")}
    for i in range(n):
        sel = ids[ys, xs] == i + 1
        y, x = ys[sel], xs[sel]
        if len(y) == 0:
            continue
        out["top"][i] = min(zip(y, x, strict=True))[::-1]
        out["bottom"][i] = max(zip(y, x, strict=True))[::-1]
        out["left"][i] = min(zip(x, y, strict=True))
        out["right"][i] = max(zip(x, y, strict=True))
    return out


@pytest.mark.parametrize("index", [0, 1, 2])
def test_each_mark_is_the_objects_extreme_pixel_and_counts_every_object_once(index):
    scene = train_split(5).scene(index)
    ids = id_map(scene)
    oracle = _extreme_pixels(ids, len(scene.objects))
    for mark, points in oracle.items():
        got = mark_points(scene, mark, ids)
        assert len(points) == len(scene.objects)
        for i, xy in points.items():
            assert tuple(got[i]) == tuple(float(v) for v in xy), (mark, i)
    marks = object_marks(scene, COUNT_MARKS, ids)  # [576, 5 C]
    centres = object_centres(scene)
    np.testing.assert_array_equal(marks[:, :C], centres)  # "centre" is the centre target exactly
    for m in range(len(COUNT_MARKS)):  # every mark counts every column's objects once
        np.testing.assert_array_equal(marks[:, m * C:(m + 1) * C].sum(0), centres.sum(0))
    for m, mark in enumerate(COUNT_MARKS[1:], start=1):  # and sits on the patch of the mark's pixel
        for i, o in enumerate(scene.objects):
            x, y = oracle[mark][i]
            patch = (y // CELL) * GRID + x // CELL
            assert marks[patch, m * C + list(COLOURS).index(o.colour)] >= 1
            assert marks[patch, m * C + len(COLOURS) + SHAPES.index(o.shape)] >= 1
    assert (mark_points(scene, "top", ids)[:, 1] <= [o.cy for o in scene.objects]).all()
    assert (mark_points(scene, "right", ids)[:, 0] >= [o.cx - 1 for o in scene.objects]).all()
    with pytest.raises(ValueError, match="unknown count mark 'corner'"):
        mark_points(scene, "corner", ids)


def test_packed_batches_carry_the_marks():
    split = train_split(3)
    centre = data_v3.question_batch(split, 0, 3, Packing(2), with_pixels=False, with_counts=True)
    marks = data_v3.question_batch(split, 0, 3, Packing(2), with_pixels=False, with_counts=True,
                                   count_marks=("centre", "top", "left"))
    assert marks["centre"].shape == (3, 576, 3 * C) and centre["centre"].shape == (3, 576, C)
    assert torch.equal(marks["centre"][..., :C], centre["centre"])
    for i in range(3):
        want = object_marks(split.scene(i), ("centre", "top", "left"))
        assert torch.equal(marks["centre"][i], torch.from_numpy(want))
    for key in ("input_ids", "share", "count", "count_channel"):  # nothing else changes
        torch.testing.assert_close(marks[key], centre[key], equal_nan=True, rtol=0, atol=0)
    with pytest.raises(ValueError, match="centre_spread spreads the centre mark only"):
        data_v3.question_batch(split, 0, 1, Packing(2), with_pixels=False, with_counts=True, centre_spread=7.0,
                               count_marks=("top",))


def test_training_gives_each_count_head_its_own_mark(tmp_path, monkeypatch):
    from test_testbed_tower_tune import _cfg, _run

    import vtprune.testbed.train as train_module

    seen = []
    real = train_module.count_attention_loss

    def spy(model, layer, head, *args, **kwargs):
        channel, centre = args[5], args[6]
        seen.append((layer, head, channel[channel >= 0].tolist(), centre.shape[-1]))
        return real(model, layer, head, *args, **kwargs)

    monkeypatch.setattr(train_module, "count_attention_loss", spy)
    cfg = _cfg(tower_lr_b=1e-3, head_fit_steps=1, tower_share_weight=1.0, tower_count_target="centre",
               count_attention_weight=1.0, count_sink_weight=4.0, count_mark="centre+top",
               count_attention_heads="1:1", type_schedule="100:count")
    _run(tmp_path / "marks", cfg)
    first = [s for s in seen if (s[0], s[1]) == (1, 0)]  # the count layer's head 0 (the one-layer decoder's)
    second = [s for s in seen if (s[0], s[1]) == (1, 1)]
    assert first and second and all(s[3] == 2 * C for s in seen)
    for a, b in zip(first, second, strict=True):  # the same questions, the second head on the second mark's columns
        assert a[2] and b[2] == [c + C for c in a[2]] and max(a[2]) < C


@pytest.mark.parametrize(("change", "message"), [
    ({"count_mark": "centre+corner"}, "not a '\\+'-joined list of distinct marks"),
    ({"count_mark": "top+top"}, "not a '\\+'-joined list of distinct marks"),
    ({"count_mark": "top", "centre_spread": 7.0}, "count_mark must be 'centre'"),
    ({"count_mark": "centre+top", "count_attention_weight": 1.0}, "give 1 heads in count_attention_heads"),
    ({"count_mark": "centre+top", "tower_lr_b": 1e-3, "tower_share_weight": 1.0}, "must be 'centre'"),
    ({"centre_sum_weight": 1.0, "tower_count_target": "share"}, "centre_sum_weight 1.0 needs tower_count_target"),
    ({"centre_sum_weight": -1.0, "tower_count_target": "centre"}, "must be >= 0"),
])
def test_bad_mark_configurations_are_refused(tmp_path, change, message):
    from test_testbed_tower_tune import _cfg, _run

    with pytest.raises(ValueError, match=message):
        _run(tmp_path / "bad", _cfg(**change))
