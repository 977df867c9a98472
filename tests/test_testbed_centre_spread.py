"""`TrainConfig.centre_spread`: each object's unit in the centre targets split over the patches a square around its
centre overlaps (`scenes_v3.object_centres(scene, spread)`), reaching the tower's centre target and the count
attention target through the packed batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtprune.testbed import data_v3
from vtprune.testbed.data import Packing
from vtprune.testbed.scenes import CELL, COLOURS, IMAGE_SIZE, SHAPES
from vtprune.testbed.scenes_v3 import Object3, Scene3, centre_patch, object_centres
from vtprune.testbed.splits import train_split

_objects = st.lists(
    st.tuples(st.sampled_from(SHAPES), st.sampled_from(list(COLOURS)), st.floats(0.0, IMAGE_SIZE - 1e-3),
              st.floats(0.0, IMAGE_SIZE - 1e-3)),
    min_size=0, max_size=14)


def _scene(objects) -> Scene3:
    return Scene3(key=(0, 0, 0), objects=tuple(Object3(s, c, x, y, 10.0) for s, c, x, y in objects), distractors=(),
                  number=42, box=(0.0, 0.0, 30.0, 20.0), digit_height=16.0)


@settings(max_examples=60, deadline=None)
@given(objects=_objects, spread=st.floats(0.5, 2 * CELL))
def test_every_object_stays_one_unit_near_its_centre(objects, spread):
    scene = _scene(objects)
    hard, soft = object_centres(scene), object_centres(scene, spread)  # [576, C + S]
    assert soft.shape == hard.shape and (soft >= 0).all()
    np.testing.assert_allclose(soft.sum(0), hard.sum(0), atol=1e-4)  # every column still counts its objects
    for o in scene.objects:  # alone in a scene: its mass lies within spread / 2 of its centre, on its two columns
        one = object_centres(_scene([(o.shape, o.colour, o.cx, o.cy)]), spread)
        cells = one.sum(1).nonzero()[0]
        rows, cols = cells // 24, cells % 24
        assert (cols * CELL < o.cx + spread / 2 + 1e-6).all() and ((cols + 1) * CELL > o.cx - spread / 2 - 1e-6).all()
        assert (rows * CELL < o.cy + spread / 2 + 1e-6).all() and ((rows + 1) * CELL > o.cy - spread / 2 - 1e-6).all()
        assert (one.sum(0) > 0).sum() == 2
        inside = min(o.cx % CELL, CELL - o.cx % CELL, o.cy % CELL, CELL - o.cy % CELL) >= spread / 2
        if inside:  # a centre well inside its patch: the hard target exactly
            np.testing.assert_allclose(one, object_centres(_scene([(o.shape, o.colour, o.cx, o.cy)])))


def test_a_centre_on_a_border_is_shared_evenly():
    soft = object_centres(_scene([("circle", "red", 2 * CELL, 0.5 * CELL)]), 7.0)  # on the border of columns 1 | 2
    red = list(COLOURS).index("red")
    assert soft[1, red] == pytest.approx(0.5) and soft[2, red] == pytest.approx(0.5)
    assert soft[:, red].sum() == pytest.approx(1.0)
    # no spread: all of it in the patch holding the centre
    hard = object_centres(_scene([("circle", "red", 2 * CELL, 0.5 * CELL)]))
    assert hard[centre_patch(Object3("circle", "red", 2 * CELL, 0.5 * CELL, 10.0)), red] == 1.0


def test_packed_batches_carry_the_spread_centres():
    split = train_split(3)
    hard = data_v3.question_batch(split, 0, 3, Packing(2), with_pixels=False, with_counts=True)
    soft = data_v3.question_batch(split, 0, 3, Packing(2), with_pixels=False, with_counts=True, centre_spread=7.0)
    torch.testing.assert_close(soft["centre"].sum(1), hard["centre"].sum(1))
    assert (soft["centre"] > 0).sum() > (hard["centre"] > 0).sum()
    for i in range(3):
        assert torch.equal(soft["centre"][i], torch.from_numpy(object_centres(split.scene(i), 7.0)))


def test_training_passes_the_spread_to_both_centre_targets_and_refuses_a_negative_one(tmp_path, monkeypatch):
    from test_testbed_tower_tune import _cfg, _run

    spreads = []
    real = data_v3.object_centres
    monkeypatch.setattr(data_v3, "object_centres", lambda scene, spread=0.0: spreads.append(spread) or real(scene,
                                                                                                           spread))
    cfg = _cfg(tower_lr_b=1e-3, head_fit_steps=1, tower_share_weight=1.0, tower_count_target="centre",
               count_attention_weight=1.0, count_sink_weight=4.0, centre_spread=7.0)
    _run(tmp_path / "soft", cfg)
    assert spreads and set(spreads) == {7.0}  # the head fit's batches and Stage B's
    with pytest.raises(ValueError, match="centre_spread -1.0 is negative"):
        _run(tmp_path / "negative", _cfg(centre_spread=-1.0))
