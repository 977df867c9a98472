"""benchmarks/v3_centre_marks.py on a tiny random v3 model."""

import numpy as np
import pytest
import torch
from torch import nn

from scripts import benchmark_script
from vtprune.testbed.data_v3 import build_model
from vtprune.testbed.scenes import COLOURS
from vtprune.testbed.splits import calibration_split
from vtprune.testbed.train_v3 import TINY_V3


@pytest.mark.parametrize("marks", [("centre",), ("top",), ("centre", "top", "left")])
def test_every_patch_of_a_column_is_given_to_an_object_or_counted_stray(capsys, marks):
    """A constant probability p in every patch: per scene and column, the objects' masses plus the stray mass are
    576 p, and each object's mass is p times the patches nearest to it (at least its own centre or anchor patch)."""
    module = benchmark_script("v3_centre_marks")
    model = build_model(TINY_V3, seed=0).eval()
    head = nn.Linear(model.config.vision_config.hidden_size, 10 * len(marks))
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-2.0)
    p = torch.sigmoid(torch.tensor(-2.0)).item()
    records, stray = module.object_masses(model, head, scenes=3, marks=marks)
    split = calibration_split(20001)
    colour_columns = [len({o.colour for o in split.scene(i).objects}) for i in range(3)]
    assert len(stray["colour"]) == sum(colour_columns)
    total = sum(r["mass"] for r in records if r["kind"] == "colour") + sum(stray["colour"])
    np.testing.assert_allclose(total, 576 * p * sum(colour_columns), rtol=1e-4)
    assert all(r["mass"] >= p - 1e-6 for r in records)
    assert {r["colour"] for r in records} <= set(COLOURS)
    assert len([r for r in records if r["kind"] == "shape"]) == sum(len(split.scene(i).objects) for i in range(3))
    module.report(records, stray)
    out = capsys.readouterr().out
    assert "== colour columns" in out and "by mark to a patch border (px)" in out
