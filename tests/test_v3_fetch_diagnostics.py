"""benchmarks/v3_fetch_diagnostics.py on a tiny random v3 model."""

import numpy as np
import torch

from scripts import benchmark_script
from vtprune.testbed.answer_readout import AnswerReadout
from vtprune.testbed.data_v3 import build_model
from vtprune.testbed.train_v3 import TINY_V3


def _module():
    return benchmark_script("v3_fetch_diagnostics")


def test_readings_measure_the_readout_against_the_asked_objects():
    """A read-out whose maps are zero predicts the image centre for every object: its error is each target's mean
    absolute distance from the centre, in patches."""
    diag = _module()
    torch.manual_seed(0)
    model = build_model(TINY_V3, seed=0).eval()
    readout = AnswerReadout(model.config.text_config.hidden_size, 1)
    with torch.no_grad():
        for p in readout.parameters():
            p.zero_()
    r = diag.fetch_readings(model, readout, "relation", 8)
    assert r["right"].dtype == bool and len(r["right"]) == 8
    np.testing.assert_allclose(r["early"], np.abs(r["target"][:, :2]).mean(1) * 12, rtol=1e-5)
    np.testing.assert_allclose(r["late_second"], np.abs(r["target"][:, 2:]).mean(1) * 12, rtol=1e-5)
    assert r["above"].any() or (~r["above"]).any()
    ok, gap = diag.implied_relation(r)  # all-zero predictions: "named < second" is never implied
    axis = r["above"].astype(int)
    k = np.arange(8)
    np.testing.assert_array_equal(ok, ~(r["target"][k, axis] < r["target"][k, 2 + axis]))
    assert (gap >= 2 - 1e-4).all()  # relations are asked only for objects at least 2 patches apart


def test_implied_relation_reads_the_asked_axis():
    diag = _module()
    target = np.array([[-0.5, 0.5, 0.5, -0.5], [-0.5, 0.5, 0.5, -0.5]], np.float32)  # named left of and below
    late = np.array([[-0.4, -0.9, 0.6, 0.9], [0.9, 0.4, -0.9, -0.6]], np.float32)
    r = {"target": target, "late": late, "above": np.array([False, True])}
    ok, gap = diag.implied_relation(r)
    np.testing.assert_array_equal(ok, [True, True])  # x order right in row 0; y order right in row 1
    np.testing.assert_allclose(gap, [12.0, 12.0])
