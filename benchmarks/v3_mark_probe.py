"""Do the count marks' errors go together? Per-patch probes of each mark on one tower's frozen features.

    python benchmarks/v3_mark_probe.py MODEL [--train-scenes 1200] [--epochs 10] [--test-scenes 240]

For each mark of `scenes_v3.COUNT_MARKS` (an object's centre, or its top / bottom / left / right visible pixel) a
small MLP (the 3 x 3 neighbourhood of a patch's penultimate tower features -> 256 -> C + S sigmoid outputs, binary
cross-entropy against `scenes_v3.object_marks`) is fitted on train-split scenes of seed 9 and applied to calibration
scenes of seed 20001 (never the test split). Summed over a column's patches its probabilities estimate the number of
objects of that colour or shape; the script prints, per mark and for the mean of several marks' estimates, the
standard deviation of that estimate's error and how often it rounds to the true count (columns with at least one
object; and with at least four), and the correlations between the marks' errors. If the errors were independent,
the mean of M marks would have 1 / sqrt(M) of one mark's error. Last, one probe fitted on the mean of the four pixel
marks' targets (fractional targets in one output per column). One CPU thread: about 8 minutes with the defaults.
docs/testbed.md ("v3 training: twenty-first session") lists what it measured.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch
from torch import nn

from vtprune.testbed.builtin import resolve_model
from vtprune.testbed.data_v3 import scene_pixels
from vtprune.testbed.features import vision_features
from vtprune.testbed.scenes import COLOURS, GRID, SHAPES
from vtprune.testbed.scenes_v3 import COUNT_MARKS, id_map, object_marks
from vtprune.testbed.splits import Split, calibration_split, train_split

WIDTH = len(COLOURS) + len(SHAPES)


@torch.no_grad()
def features_and_marks(model, split: Split, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(each patch's 3 x 3 neighbourhood of penultimate tower features [n, 576, 9 Dv] float16, every mark's targets
    [n, 576, len(COUNT_MARKS) C + S])."""
    feats, marks = [], []
    for start in range(0, n, 16):
        idx = list(range(start, min(n, start + 16)))
        feats.append(neighbourhood(vision_features(model, scene_pixels(split, idx)).float()).half())
        marks += [object_marks(split.scene(i), COUNT_MARKS, id_map(split.scene(i))) for i in idx]
    return torch.cat(feats), torch.from_numpy(np.stack(marks))


def neighbourhood(feats: torch.Tensor) -> torch.Tensor:
    """[n, 576, D] -> [n, 576, 9 D]: each patch's features and its eight neighbours' (zeros off the grid)."""
    n, _, d = feats.shape
    grid = nn.functional.pad(feats.view(n, GRID, GRID, d).permute(0, 3, 1, 2), (1, 1, 1, 1))  # [n, D, 26, 26]
    parts = [grid[:, :, 1 + dy:1 + dy + GRID, 1 + dx:1 + dx + GRID] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return torch.cat(parts, 1).permute(0, 2, 3, 1).reshape(n, GRID * GRID, 9 * d)


def fit_and_count(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, epochs: int, seed: int = 0) -> torch.Tensor:
    """Fit a probe of targets y [n, 576, K] (clamped to 1) on x [n, 576, F]; -> the summed probabilities on x_test,
    i.e. the estimated counts [n_test, K]."""
    torch.manual_seed(seed)
    probe = nn.Sequential(nn.Linear(x.shape[-1], 256), nn.GELU(), nn.Linear(256, y.shape[-1]))
    opt = torch.optim.Adam(probe.parameters(), 1e-3)
    rows, goal = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]).clamp(max=1.0)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(rows), generator=order).split(4096):
            loss = nn.functional.binary_cross_entropy_with_logits(probe(rows[batch].float()), goal[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return torch.sigmoid(probe(x_test.float())).sum(1)


def summary(error: torch.Tensor, true: torch.Tensor) -> str:
    """error / true [n, C + S]: one line over the columns with an object."""
    has, many = true > 0, true >= 4
    right = (error.round() == 0).float()
    return (f"error sd {error[has].std():.3f}  rounds right {right[has].mean():.3f}  "
            f"(k >= 4: {right[many].mean():.3f}, {int(many.sum())} columns)")


def report(errors: dict[str, torch.Tensor], true: torch.Tensor) -> dict[str, float]:
    """Print each mark's line, the error correlations and the means of mark subsets; -> {name: error sd}."""
    out = {}
    for name, error in errors.items():
        print(f"{name:36s} {summary(error, true)}")
        out[name] = float(error[true > 0].std())
    names = list(errors)
    has = true > 0
    corr = np.corrcoef(torch.stack([errors[m][has] for m in names]).numpy())
    print("error correlations (" + ", ".join(names) + "):")
    for name, row in zip(names, corr, strict=True):
        print(f"  {name:8s} " + " ".join(f"{v:5.2f}" for v in row))
    for size in range(2, len(names) + 1):
        for subset in itertools.combinations(names, size):
            name = "mean " + "+".join(subset)
            error = sum(errors[m] for m in subset) / size
            print(f"{name:36s} {summary(error, true)}")
            out[name] = float(error[has].std())
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="model directory or builtin:NAME (its tower's features are probed)")
    ap.add_argument("--train-scenes", type=int, default=1200)
    ap.add_argument("--test-scenes", type=int, default=240)
    ap.add_argument("--epochs", type=int, default=10)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = resolve_model(a.model)[0].eval()
    x, y = features_and_marks(model, train_split(9), a.train_scenes)
    x_test, y_test = features_and_marks(model, calibration_split(20001), a.test_scenes)
    true = y_test[..., :WIDTH].sum(1)  # [n, C + S]: every mark counts each object once
    errors = {m: fit_and_count(x, y[..., i * WIDTH:(i + 1) * WIDTH], x_test, a.epochs) - true
              for i, m in enumerate(COUNT_MARKS)}
    report(errors, true)
    pixel = sum(y[..., i * WIDTH:(i + 1) * WIDTH] for i in range(1, len(COUNT_MARKS))) / (len(COUNT_MARKS) - 1)
    error = fit_and_count(x, pixel, x_test, a.epochs) - true
    print(f"{'one probe, mean pixel-mark target':36s} {summary(error, true)}")


if __name__ == "__main__":
    main()
