"""benchmarks/v3_mark_probe.py: the neighbourhood features, the report's arithmetic, and a run on a tiny model."""

import torch

from scripts import benchmark_script
from vtprune.testbed.scenes_v3 import COUNT_MARKS


def test_neighbourhood_holds_each_patch_and_its_eight_neighbours():
    probe = benchmark_script("v3_mark_probe")
    feats = torch.arange(2 * 576, dtype=torch.float32).view(2, 576, 1)
    hood = probe.neighbourhood(feats)  # [2, 576, 9]
    assert hood.shape == (2, 576, 9)
    p = 5 * 24 + 7  # row 5, column 7
    assert hood[1, p].tolist() == [576 + p + dy * 24 + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    assert hood[0, 0, :4].tolist() == [0.0, 0.0, 0.0, 0.0]  # above and left of the corner: off the grid
    assert hood[0, 0, 4] == 0.0 and hood[0, 0, 8] == 25.0


def test_the_mean_of_independent_errors_shrinks_and_of_identical_ones_does_not(capsys):
    probe = benchmark_script("v3_mark_probe")
    g = torch.Generator().manual_seed(0)
    true = torch.randint(1, 9, (400, 10), generator=g).float()
    a, b = torch.randn(400, 10, generator=g) * 0.4, torch.randn(400, 10, generator=g) * 0.4
    sd = probe.report({"centre": a, "top": b, "left": a.clone()}, true)
    assert abs(sd["mean centre+top"] - 0.4 / 2 ** 0.5) < 0.03  # independent: 1 / sqrt(2)
    assert abs(sd["mean centre+left"] - sd["centre"]) < 1e-6  # identical: no gain
    out = capsys.readouterr().out
    assert "error correlations (centre, top, left)" in out and "mean centre+top+left" in out


def test_a_tiny_run_prints_every_mark(monkeypatch, capsys):
    probe = benchmark_script("v3_mark_probe")
    from vtprune.testbed.data_v3 import build_model
    from vtprune.testbed.train_v3 import TINY_V3

    monkeypatch.setattr(probe, "resolve_model", lambda _: (build_model(TINY_V3, seed=0), None))
    probe.main(["tiny", "--train-scenes", "3", "--test-scenes", "2", "--epochs", "1"])
    out = capsys.readouterr().out
    for mark in COUNT_MARKS:
        assert f"\n{mark} " in "\n" + out
    assert "one probe, mean pixel-mark target" in out
